import FerrySys
import FerryWire

/// QEMU's `MigrationStatus`, exchanged as strings.
public enum MigrationStatus: String, Sendable, CaseIterable {
    case none
    case setup
    case cancelling
    case cancelled
    case active
    case device
    case postcopyDevice = "postcopy-device"
    case postcopyActive = "postcopy-active"
    case postcopyPaused = "postcopy-paused"
    case postcopyRecoverSetup = "postcopy-recover-setup"
    case postcopyRecover = "postcopy-recover"
    case completed
    case failed

    public var isPostcopy: Bool {
        switch self {
        case .postcopyDevice, .postcopyActive, .postcopyPaused, .postcopyRecoverSetup, .postcopyRecover: true
        default: false
        }
    }

    public var isFinished: Bool { self == .completed || self == .failed || self == .cancelled }
    /// The statuses whose error says why (query-migrate's `error-desc`, the log's cause).
    public var carriesError: Bool { self == .failed || self == .postcopyPaused }
    public var isRunning: Bool { !isFinished && self != .none }
}

/// Events the engine reports; the QMP layer turns them into `MIGRATION`, `MIGRATION_PASS`,
/// `STOP` and `RESUME`.
public enum MigrationEvent: Sendable, Equatable {
    case status(MigrationStatus)
    case pass(Int)
    case stop
    case resume
}

/// Capabilities as QEMU names them (all default off). Ferry acts on the ones it implements
/// and accepts the rest so that tools that set them keep working.
public enum MigrationCapability: String, Sendable, CaseIterable {
    case xbzrle, rdmaPinAll = "rdma-pin-all", autoConverge = "auto-converge", events,
         postcopyRAM = "postcopy-ram", xColo = "x-colo", releaseRAM = "release-ram", returnPath = "return-path",
         pauseBeforeSwitchover = "pause-before-switchover", multifd, dirtyBitmaps = "dirty-bitmaps",
         postcopyBlocktime = "postcopy-blocktime", lateBlockActivate = "late-block-activate",
         xIgnoreShared = "x-ignore-shared", validateUUID = "validate-uuid", backgroundSnapshot = "background-snapshot",
         zeroCopySend = "zero-copy-send", postcopyPreempt = "postcopy-preempt", switchoverAck = "switchover-ack",
         dirtyLimit = "dirty-limit", mappedRAM = "mapped-ram",
         /// Ferry's own: after a postcopy pause the destination keeps listening and the source
         /// keeps reconnecting (bounded backoff) until `auto-recover-timeout`.
         autoRecover = "auto-recover"

    /// Capabilities whose behaviour Ferry does not have; enabling them is refused.
    public var isUnsupported: Bool {
        switch self {
        case .rdmaPinAll, .xColo, .backgroundSnapshot, .mappedRAM, .xIgnoreShared, .zeroCopySend: true
        default: false
        }
    }
}

/// Tunables (QEMU's `MigrationParameters`, the subset Ferry acts on), with QEMU's defaults.
public struct MigrationParameters: Sendable, Equatable {
    /// Bytes per second outside postcopy. QEMU default 128 MiB/s; 0 = unlimited.
    public var maxBandwidth: UInt64 = 134_217_728
    /// Milliseconds the guest may be stopped at switchover.
    public var downtimeLimit: UInt64 = 300
    /// Bytes per second for background pages in postcopy; 0 = unlimited.
    public var maxPostcopyBandwidth: UInt64 = 0
    /// Ferry: milliseconds without a byte from the peer (heartbeats flow every 250 ms on
    /// socket migrations) before the link counts as down. 0 = rely on TCP alone.
    public var heartbeatTimeout: UInt64 = 1500
    /// Ferry: milliseconds the source waits in `postcopy-device` for the destination to run
    /// the guest (PONG 0x42) before it pauses; QEMU waits without a deadline.
    public var postcopyDeviceTimeout: UInt64 = 30_000
    /// Ferry: with `auto-recover`, how long the source keeps trying to reconnect after a pause.
    public var autoRecoverTimeout: UInt64 = 600_000
    /// Ferry: with `postcopy-ram`, switch to postcopy by itself after this many dirty-sync
    /// passes in a row that did not shrink the rest by a tenth. 0 = never.
    public var postcopyAutoSwitchPasses: UInt64 = 0
    /// Id of the TLS credentials object every migration channel uses; "" = no TLS.
    public var tlsCreds: String = ""
    /// The name the destination's certificate must carry; "" = the host of the URI.
    public var tlsHostname: String = ""
    /// Bytes of the XBZRLE page cache (a power of two of at least a page). QEMU: 64 MiB.
    public var xbzrleCacheSize: UInt64 = 64 << 20
    /// auto-converge: the first throttle (%), each step up, QEMU's "tailslow" steps, the
    /// ceiling, and the dirty share of the transfer (%) that counts as too much.
    public var cpuThrottleInitial: UInt64 = 20
    public var cpuThrottleIncrement: UInt64 = 10
    public var cpuThrottleTailslow = false
    public var maxCPUThrottle: UInt64 = 99
    public var throttleTriggerThreshold: UInt64 = 50
    /// multifd: how many extra channels carry precopy pages (1-255, both sides the same),
    /// their compression (none or zstd; both sides the same) and zstd's level (0-20).
    /// zlib's level is kept for clients that set it; Ferry has no zlib.
    public var multifdChannels: UInt64 = 2
    public var multifdCompression: MultiFD.Compression = .none
    public var multifdZstdLevel: UInt64 = 1
    public var multifdZlibLevel: UInt64 = 1
    public init() {}
}

/// Counters of one migration (source side), as `query-migrate` reports them.
public struct MigrationStats: Sendable {
    public var status: MigrationStatus = .none
    public var startNanos: UInt64 = 0
    public var endNanos: UInt64?
    public var setupTimeMs: UInt64 = 0
    public var downtimeMs: UInt64?
    public var expectedDowntimeMs: UInt64?
    public var transferred: UInt64 = 0
    public var remaining: UInt64 = 0
    public var total: UInt64 = 0
    public var duplicate: UInt64 = 0
    public var normal: UInt64 = 0
    public var dirtySyncCount: UInt64 = 0
    public var mbps: Double = 0
    public var pagesPerSecond: UInt64 = 0
    public var dirtyPagesRate: UInt64 = 0
    public var precopyBytes: UInt64 = 0
    public var downtimeBytes: UInt64 = 0
    public var postcopyRequests: UInt64 = 0
    public var postcopyBytes: UInt64 = 0
    /// Source, postcopy: wire bytes of the pages the destination asked for (on the urgent
    /// channel with preempt, else ahead of the background stream) and of the background
    /// stream's pages; with their rates over the last second while postcopy runs.
    public var postcopyRequestedBytes: UInt64 = 0
    public var postcopyBackgroundBytes: UInt64 = 0
    public var postcopyRequestedRate: Double?
    public var postcopyBackgroundRate: Double?
    /// Bytes written (source) or read (destination) on the multifd channels.
    public var multifdBytes: UInt64 = 0
    /// Precopy did not converge and the source switched to postcopy by itself.
    public var autoSwitched = false
    /// Postcopy pauses, time spent paused or recovering, and the last recovery.
    public var postcopyPauses: UInt64 = 0
    public var pausedMs: UInt64 = 0
    /// From `migrate resume` (or the automatic attempt that succeeded) to postcopy-active.
    public var lastRecoveryMs: Double?
    /// From a pause (failure detected) to postcopy-active again.
    public var lastOutageMs: Double?
    public var recoveries: UInt64 = 0
    public var recoveryAttempts: UInt64 = 0
    public var bitmapBytes: UInt64 = 0
    public var pagesResent: UInt64 = 0
    /// Destination: fault metrics (capability postcopy-blocktime).
    public var faults: PostcopyFaultReport?
    public var errorDescription: String?
    public var socketAddress: MigrationURI?
    /// Destination: how far the guest's kvmclock moved between the source stopping the
    /// guest (the clock it sent) and the guest running here (read right after start), µs.
    /// The guest's clock stands still through the downtime; this is what it lost or gained.
    public var guestClockGapUs: Double?
    /// The TLS protocol and cipher of the last channel opened, e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384".
    public var tls: String?
    /// Where the last switch-over's time went, step by step (`x-switchover-us`).
    public var switchover: SwitchoverTimeline?
    /// With the `xbzrle` capability (`query-migrate`'s `xbzrle-cache`).
    public var xbzrle: XBZRLEReport?
    /// auto-converge's throttle while it is on (`cpu-throttle-percentage`).
    public var cpuThrottlePercentage: UInt64?

    public var totalTimeMs: UInt64 {
        guard startNanos > 0 else { return 0 }
        return ((endNanos ?? Sys.monotonicNanos()) - startNanos) / 1_000_000
    }
    public init() {}
}

/// QEMU's `XBZRLECacheStats`: totals over the migration, the rates over the last pass.
public struct XBZRLEReport: Sendable, Equatable {
    public var cacheSize: UInt64
    /// Wire bytes of the delta pages (and of overflowed pages, a page each, as QEMU counts).
    public var bytes: UInt64 = 0
    /// Pages sent as deltas.
    public var pages: UInt64 = 0
    public var cacheMiss: UInt64 = 0
    public var cacheMissRate: Double = 0
    /// Page bytes over delta bytes, over the last pass (0: no delta sent).
    public var encodingRate: Double = 0
    public var overflow: UInt64 = 0
    public init(cacheSize: UInt64, bytes: UInt64 = 0, pages: UInt64 = 0, cacheMiss: UInt64 = 0, cacheMissRate: Double = 0,
                encodingRate: Double = 0, overflow: UInt64 = 0) {
        self.cacheSize = cacheSize; self.bytes = bytes; self.pages = pages; self.cacheMiss = cacheMiss
        self.cacheMissRate = cacheMissRate; self.encodingRate = encodingRate; self.overflow = overflow
    }
}

/// The steps of one switch-over and the microseconds each took, in order: on the source
/// from the stop request (stop, sync, ram, device-state / package, destination), on the
/// destination from the first byte of the final state (read, restore, start). Pure: fed
/// the time at each step's end.
public struct SwitchoverTimeline: Sendable, Equatable {
    public struct Step: Sendable, Equatable {
        public let name: String
        public let micros: UInt64
    }
    public private(set) var steps: [Step] = []
    private var last: UInt64

    public init(start: UInt64) { last = start }

    /// Ends step `name` at `now` (a clock that went backwards counts 0).
    public mutating func mark(_ name: String, now: UInt64) {
        steps.append(Step(name: name, micros: now > last ? (now - last) / 1000 : 0))
        last = max(last, now)
    }

    public var totalMicros: UInt64 { steps.reduce(0) { $0 + $1.micros } }
}

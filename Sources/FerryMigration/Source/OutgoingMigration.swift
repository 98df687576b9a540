import CFerry
import FerryKVM
import FerryMachine
import FerryMemory
import FerrySys
import FerryWire
import Glibc

/// The source side of one migration: its phase, its counters, and what QMP may ask of it
/// (cancel, start-postcopy, pause, resume). The work happens on two threads:
/// `mig/src/main` runs setup, the precopy passes and the switch-over
/// (`PrecopyStream.swift`), postcopy's background stream (`PostcopyStream.swift`) and
/// pause/recovery (`Recovery.swift`); `mig/src/return` reads the return path and serves
/// page requests (`ReturnPathReader.swift`).
///
/// Ownership of the mutable fields:
/// - guarded by `lock`: `phase`, `_stats`, `_parameters`, `channel`, `urgent`, `inbox`, `wireRate`, `requestedRate`, `backgroundRate`,
///   `requests`, `asked`, `recoveryURI`, `multifd` (set by `mig/src/main`, which reads it
///   without the lock);
/// - `mig/src/main` only: `cursor`, `header`, `limiter`, `pings`, `switchover`, `rpThread`
///   (joined by main before it starts another), `xbzrle`, `xbzrleReported`, `pagesThisPass`, `autoConverge`, `lastSyncNanos`;
/// - `toSend` is an atomic bitmap shared by both threads; the rest is immutable.
final class OutgoingMigration: @unchecked Sendable {
    let host: VMHost
    let uri: MigrationURI
    let capabilities: Set<MigrationCapability>
    let block: RAMBlock
    let machine: Machine
    /// TLS on every channel of this migration (main, urgent, recovery), or nil.
    let tls: ChannelSecurity?
    /// Pages still to send (set = to send). Cleared bit by bit as pages go, by the main
    /// thread and (postcopy-preempt) the return-path thread.
    let toSend: PageBitmap

    let lock = Monitor()
    /// Read by other files only with `lock` held; changed only by `advance` and `cancel`.
    private(set) var phase = SourcePhase.none
    private var _stats = MigrationStats()
    private var _parameters: MigrationParameters
    /// The main channel (nil while paused).
    var channel: MigrationChannel?
    /// postcopy-preempt's urgent channel, written by the return-path thread.
    var urgent: UrgentPageSender?
    /// With capability `multifd`: the extra channels precopy pages go on (kept after they
    /// close, for their byte counts).
    var multifd: MultifdSenders?
    /// What the return-path thread heard, for the main thread.
    var inbox = ReturnPathInbox()
    /// Page requests waiting for the main thread (without postcopy-preempt).
    var requests = PageRequestQueue()
    /// What the operator asked for over QMP and the main thread has not acted on yet.
    var asked = OperatorRequests()
    /// The address recovery reconnects to automatically (the last one that worked).
    var recoveryURI: MigrationURI
    /// Bytes written on channels already closed (recovery replaces them; guarded by `lock`): `transferred`
    /// stays cumulative across pauses, as QEMU's.
    var retiredBytes: UInt64 = 0
    /// `transferred` when the postcopy package went out: what follows is `postcopy-bytes`.
    var bytesAtPostcopyStart: UInt64?

    static let ramSectionID: UInt32 = 0
    static let shapeSectionID: UInt32 = 1
    /// Device sections take ids from here on, in `Machine.saveDevices` order.
    static let firstDeviceSectionID: UInt32 = 2

    // mig/src/main only
    var cursor = 0
    var header = WireBuffer(capacity: 512)
    /// max-bandwidth / max-postcopy-bandwidth over 100 ms windows.
    var limiter = RateLimiter(now: 0, sent: 0)
    var pings = PingSchedule()
    var switchover = SwitchoverRecord()
    /// Which pages have memory behind them, read chunk by chunk after the last bitmap sync
    /// (`collectDirtyPages` starts it afresh): a page unpopulated when its chunk is read
    /// reads as zero, and a write after that is in the next dirty log. Precopy's first pass
    /// only (nil after it).
    var populated: PopulatedPages?
    var rpThread: KernelThread?
    /// With the `xbzrle` capability: the page cache and the deltas (precopy only).
    var xbzrle: XBZRLESender?
    /// The XBZRLE counters at the last bitmap sync (the rates in `query-migrate` run from there).
    var xbzrleReported = XBZRLECounters()
    /// Dirty pages sent (or found unchanged) since the last bitmap sync.
    var pagesThisPass: UInt64 = 0
    /// With the `auto-converge` capability: when to throttle the guest.
    var autoConverge: AutoConvergePolicy?
    /// When the dirty log was last collected.
    var lastSyncNanos: UInt64 = 0
    /// `mbps` between bitmap syncs, sampled as the stats are read.
    private var wireRate = RateWindow()
    /// Postcopy's requested and background page bytes per second, sampled likewise.
    private var requestedRate = RateWindow(), backgroundRate = RateWindow()

    init(host: VMHost, uri: MigrationURI, parameters: MigrationParameters, capabilities: Set<MigrationCapability>, tls: ChannelSecurity?) {
        self.host = host
        self.tls = tls
        self.uri = uri
        self._parameters = parameters
        self.capabilities = capabilities
        self.machine = host.machine
        self.block = host.machine.ram
        self.toSend = PageBitmap(bitCount: host.machine.ram.pageCount)
        self.recoveryURI = uri
    }

    // MARK: phase

    /// The one way the phase changes: legal per `SourcePhase.next`, checked and changed in
    /// one step under the lock (with `body`, which runs under it too); the status event
    /// goes out after, outside the lock. An illegal event throws: `.cancelled` if a cancel
    /// got there first, else a state error.
    @discardableResult
    func advance(_ event: SourceEvent, _ body: (inout MigrationStats) -> Void = { _ in }) throws -> SourcePhase {
        let (before, after, cause) = lock.withLock {
            let r = SourcePhase.step(&phase, event)
            if r.after != nil { body(&_stats); lock.broadcast() }
            return (r.before, r.after, r.after?.status.carriesError == true ? _stats.errorDescription : nil)
        }
        guard let after else {
            if before == .cancelling { throw MigrationError.cancelledByUser }
            throw MigrationError(.state, "migration event \(event) is not valid in phase \(before)")
        }
        host.announce(before.status, after.status, side: "source", cause: cause)
        return after
    }

    var currentPhase: SourcePhase { lock.withLock { phase } }
    var status: MigrationStatus { currentPhase.status }
    private var isCancelled: Bool { currentPhase == .cancelling }

    var stats: MigrationStats {
        lock.withLock {
            var s = _stats
            s.status = phase.status
            if phase.isRunning {
                s.transferred = bytesSentLocked
                // As QEMU's counters, live: what went before the postcopy package is precopy's.
                if bytesAtPostcopyStart == nil && s.downtimeBytes == 0 { s.precopyBytes = s.transferred }
                if let r = wireRate.rate(now: Sys.monotonicNanos(), bytes: s.transferred) {
                    s.mbps = r * 8 / 1e6
                    s.pagesPerSecond = UInt64(r / Double(Wire.pageSize))
                }
            }
            s.multifdBytes = multifd?.bytesWritten ?? 0
            if let start = bytesAtPostcopyStart {
                s.precopyBytes = start
                s.postcopyBytes = s.transferred - min(start, s.transferred)
                if phase.isRunning {
                    let now = Sys.monotonicNanos()
                    s.postcopyRequestedRate = requestedRate.rate(now: now, bytes: s.postcopyRequestedBytes)
                    s.postcopyBackgroundRate = backgroundRate.rate(now: now, bytes: s.postcopyBackgroundBytes)
                }
            }
            s.xbzrle?.cacheSize = _parameters.xbzrleCacheSize // as QEMU: the parameter
            return s
        }
    }

    /// Every byte of this migration written so far, on every channel. Caller holds `lock`.
    var bytesSentLocked: UInt64 {
        retiredBytes + (channel?.bytesWritten ?? 0) + (urgent?.channel.bytesWritten ?? 0) + (multifd?.bytesWritten ?? 0)
    }

    var parameters: MigrationParameters { lock.withLock { _parameters } }
    func updateParameters(_ p: MigrationParameters) { lock.withLock { _parameters = p } }
    @discardableResult
    func updateStats<T>(_ body: (inout MigrationStats) -> T) -> T { lock.withLock { body(&_stats) } }

    /// The destination may have run the guest: it must never run here again.
    var guestHandedOver: Bool { currentPhase.guestSplit }

    // MARK: QMP entry points

    func start() throws {
        updateStats { $0.startNanos = Sys.monotonicNanos(); $0.total = UInt64(block.length) }
        try advance(.start)
        // Nobody waits for it: the status and events say when it is done.
        try KernelThread.detached(name: "mig/src/main") { [self] in self.run() }
    }

    /// QMP migrate_cancel. Check and change are one step under the lock: from the moment
    /// the postcopy package starts out, the destination may run the guest, and cancel is
    /// refused. Ends a blocked exec:/file: migration too (the channel is aborted, its
    /// command killed).
    func cancel() throws {
        let (step, ch): ((before: SourcePhase, after: SourcePhase?), MigrationChannel?) = try lock.withLock {
            if phase.guestSplit || phase == .packageSending {
                throw MigrationError(.state, "Postcopy migration in progress, cannot cancel (status \(phase.status.rawValue)): the guest's state is split between both hosts; recover it with migrate resume=true")
            }
            let r = SourcePhase.step(&phase, .cancel) // refused once finished or cancelling: nothing to do
            if r.after != nil { lock.broadcast() }
            if r.after != nil { multifd?.abort() }
            return (r, channel)
        }
        guard let after = step.after else { return }
        host.announce(step.before.status, after.status, side: "source")
        ch?.abort()
    }

    /// QMP migrate-start-postcopy: switch at the end of the current section.
    func startPostcopy() throws {
        guard capabilities.contains(.postcopyRAM) else { throw MigrationError(.config, "Enable postcopy with migrate_set_capability before the start of migration") }
        try lock.withLock {
            guard phase == .setup || phase == .precopy else {
                throw MigrationError(.state, "Postcopy must be started after migration has been started (status \(phase.status.rawValue))")
            }
            asked.postcopy = true
        }
    }

    /// QMP `migrate` with resume=true.
    func resume(_ target: MigrationURI) throws {
        try lock.withLock {
            guard phase == .postcopyPaused else {
                throw MigrationError(.state, "Cannot resume if there is no paused migration (status \(phase.status.rawValue))")
            }
            asked.resume = (target, Sys.monotonicNanos())
            lock.broadcast()
        }
    }

    /// QMP `migrate-pause`: force postcopy-paused (the link may merely stall).
    func pause() throws {
        let (ch, pc): (MigrationChannel?, MigrationChannel?) = try lock.withLock {
            guard phase.pausable else {
                throw MigrationError(.state, "migrate-pause is currently only supported during postcopy-active or postcopy-recover state")
            }
            asked.pause = true
            lock.broadcast()
            return (channel, urgent?.channel)
        }
        ch?.shutdown()
        pc?.shutdown()
    }

    // MARK: main thread

    /// The multifd channels, after the main channel's setup (the destination takes the
    /// first connection that starts a stream as the main one).
    private func openMultifdChannels() throws {
        let p = parameters
        var rng = SystemRandomNumberGenerator()
        let uuid = (0..<16).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let senders = try MultifdSenders(uri: uri, count: Int(p.multifdChannels), tls: tls, heartbeatTimeoutMs: p.heartbeatTimeout, uuid: uuid,
                                         block: block, compression: p.multifdCompression, zstdLevel: Int(p.multifdZstdLevel),
                                         isCancelled: { [self] in isCancelled }) { [weak self] normal, zero in
            self?.updateStats { $0.normal += normal; $0.duplicate += zero }
        }
        lock.withLock { multifd = senders }
    }

    private func run() {
        do {
            if capabilities.contains(.multifd), !uri.isBidirectional {
                throw MigrationError.multifdNeedsSocket
            }
            let ch = try ChannelSetup.connect(uri, role: .main, tls: tls, heartbeatTimeoutMs: parameters.heartbeatTimeout,
                                              isCancelled: { [self] in isCancelled })
            try lock.withLock {
                channel = ch
                if let t = ch.tlsDescription { _stats.tls = t }
                if phase == .cancelling { throw MigrationError.cancelledByUser }
            }
            let returnPath = uri.isBidirectional
            // As QEMU: with multifd, pages go on its channels whole (or compressed), never as deltas.
            if capabilities.contains(.xbzrle) && !capabilities.contains(.multifd) {
                let size = parameters.xbzrleCacheSize
                xbzrle = try XBZRLESender(cacheSize: size)
                updateStats { $0.xbzrle = XBZRLEReport(cacheSize: size) }
            }
            if capabilities.contains(.autoConverge) { autoConverge = AutoConvergePolicy(now: Sys.monotonicNanos(), sent: 0) }
            try sendSetup(ch, returnPath: returnPath)
            if returnPath { try startReturnPath(ch) }
            if capabilities.contains(.multifd) { try openMultifdChannels() }
            // The first pass sends everything; the log only matters from here on.
            try keepingHeartbeat(ch) { [self] in
                try machine.vm.setDirtyLogging(machine.ram, true)
                try machine.vm.collectDirtyLog(machine.ram, into: PageBitmap(bitCount: block.pageCount))
            }
            toSend.setAll()
            countBitmapSync()
            // Read (chunk by chunk) after dirty logging is on: a page unpopulated then and
            // written later is in the log, so the first pass may send it as zero unread.
            populated = PopulatedPages(block)
            let limit = parameters.downtimeLimit
            try advance(.setupSent) {
                $0.setupTimeMs = Sys.nanosSince($0.startNanos) / 1_000_000
                // As QEMU: until a pass has measured the link, the expectation is the limit.
                $0.expectedDowntimeMs = limit
                $0.remaining = UInt64(block.length)
            }
            switch try iterateUntilConverged(ch) {
            case .switchToPostcopy: try runPostcopy(ch)
            case .stopAndCopy, .anotherPass: try completePrecopy(ch, returnPath: returnPath)
            }
        } catch {
            failed(error)
        }
        rpThread?.join()
    }

    /// A failure before the destination could run the guest (or it said it never did): the
    /// guest runs here again, unless the operator had paused it.
    private func failed(_ error: any Error) {
        let neverRan = error is DestinationNeverRan
        // A destination that failed closes its end right after saying why: our write may
        // fail first. Let the return-path reader deliver the reason before the channel goes.
        if rpThread != nil {
            let deadline = Sys.monotonicNanos() + 200_000_000 // it comes within ms; a dead link waits no longer
            lock.withLock {
                _ = lock.wait(until: deadline) { phase == .cancelling || inbox.shut != nil || inbox.failure != nil ? true : nil }
            }
        }
        try? machine.vm.setDirtyLogging(machine.ram, false) // cleanup: the migration failed already
        let (ch, mf) = lock.withLock { (channel, multifd) }
        ch?.abort()
        mf?.abort()
        mf?.close()
        ch?.close()
        if case let .file(path) = uri { Transport.removePartialFile(path) }
        let (cancelled, splitWithoutWord) = lock.withLock { (phase == .cancelling, phase.guestSplit && !neverRan) }
        if splitWithoutWord {
            // The transition table forbids it: a split guest is never failed. Keep it split.
            updateStats { $0.errorDescription = "internal error: failure in a postcopy phase: \(error)" }
            return
        }
        throttleGuest(0) // the source guest runs at full speed again
        if switchover.stoppedByUs {
            machine.resume()
            host.setRunState(.running)
            host.emit(.resume)
        } else if let before = switchover.runStateBefore {
            host.setRunState(before) // it was paused before: it stays paused
        }
        let (sent, requestCount, rp, peer) = lock.withLock { (bytesSentLocked, requests.served, inbox.failure, inbox.destinationError) }
        let reason = (error as? DestinationNeverRan)?.error ?? error
        // A bad return-path message shuts the channel: the write error that follows is a
        // symptom; the message is the reason.
        do {
            try advance(neverRan ? .destinationNeverRan : .failure) { // legal from every phase that reaches here
                $0.endNanos = Sys.monotonicNanos()
                $0.postcopyRequests = requestCount
                $0.transferred = sent
                if !cancelled {
                    $0.errorDescription = peer.map { "the destination failed: \($0)" } ?? rp.map { "return path: \($0)" } ?? "\(reason)"
                }
            }
        } catch {
            // A table that refused it would leave the status stale with no thread behind it: say so.
            MigrationLog.logger.error("internal error: no transition to failed: \(error) (after \(reason))", metadata: ["side": "source"])
        }
    }

    /// A failure that must end in `failed` (or `cancelled`): the cancel, the destination's
    /// own error or its SHUT, in that order. Called between precopy sections.
    func checkPrecopy() throws {
        let (cancelled, peer, shut) = lock.withLock { (phase == .cancelling, inbox.destinationError, inbox.shut) }
        if cancelled { throw MigrationError.cancelledByUser }
        if let peer { throw MigrationError(.peerFailed, "the destination failed: \(peer)") }
        if let shut, shut != 0 { throw MigrationError(.peerFailed, "the destination failed the migration (SHUT \(shut))") }
    }

    /// Shuts and closes the main and urgent channels and waits for the return-path thread.
    func closeChannels(_ ch: MigrationChannel?) {
        let pc: UrgentPageSender? = lock.withLock {
            // Count what the closing channels carried once, then never again.
            retiredBytes += (ch?.bytesWritten ?? 0) + (urgent?.channel.bytesWritten ?? 0)
            if channel === ch { channel = nil }
            defer { urgent = nil }
            return urgent
        }
        ch?.shutdown()
        pc?.channel.shutdown()
        rpThread?.join()
        rpThread = nil
        ch?.close()
        pc?.channel.close()
    }

    /// Test hook: called by the main thread at the named points of the switch-over.
    func reach(_ point: SwitchoverPoint) { host.switchoverHook?(point) }
}

/// Points of the switch-over a test may act at (`VMHost.switchoverHook`).
enum SwitchoverPoint: Sendable, Equatable {
    /// The guest is stopped for postcopy; the package is not built yet (cancel still wins).
    case postcopyStopped
    /// The package went out whole; the hand-over to the destination comes next.
    case packageFlushed
}

/// The guest was stopped by this migration's switch-over, or was paused already.
struct SwitchoverRecord {
    /// The switch-over stopped a running guest: a failure before the hand-over resumes it.
    var stoppedByUs = false
    /// The run state before the switch-over (a guest paused by the operator stays paused).
    var runStateBefore: RunState?
}

/// What the return-path thread heard, for the main thread. Guarded by the migration's lock.
struct ReturnPathInbox {
    var shut: UInt32?
    /// The reader's own failure (a bad message, a dead link).
    var failure: MigrationError?
    /// The destination's account of why it failed (Ferry's message before SHUT).
    var destinationError: String?
    /// PONG 0x42: the guest runs on the destination. Never reset: once true, always true.
    var destinationRunning = false
    var receivedBitmap: [UInt8]?
    var resumeAcked = false
    /// The PONG after the discards sent before the postcopy stop came back.
    var earlyDiscardsApplied = false
    /// The PONG to the PING sent just before the precopy stop came back.
    var caughtUp = false

    /// A new channel: what the old one said no longer applies.
    mutating func newChannel() { shut = nil; failure = nil; receivedBitmap = nil; resumeAcked = false }
}

/// Page requests queued for the main thread (without postcopy-preempt). Guarded by the lock.
struct PageRequestQueue {
    /// A destination has a request per waiting thread in flight, not thousands: a flood is
    /// a broken or hostile peer, and must not grow our memory.
    static let maxQueued = 65_536
    var pending: [Range<Int>] = []
    /// REQ_PAGES without a block name means the block of the previous request.
    var lastBlock: String?
    var served: UInt64 = 0
    /// Where the background scan should continue: just after the last requested page.
    var hint: Int?
}

/// What the operator asked for over QMP. Guarded by the lock.
struct OperatorRequests {
    var postcopy = false
    var pause = false
    /// `migrate resume=true`: the address and when it was asked.
    var resume: (uri: MigrationURI, at: UInt64)?
}

/// A recovery attempt (or the package's wait) reached a destination that failed before it
/// ever ran the guest: the guest's only copy is here, so it runs here again.
struct DestinationNeverRan: Error { let error: MigrationError }

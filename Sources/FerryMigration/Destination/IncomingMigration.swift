import CFerry
import FerryKVM
import FerryMachine
import FerryMemory
import FerrySys
import FerryTLS
import FerryWire
import Glibc

/// The destination side of one migration: its phase, its counters, and what QMP may ask of
/// it (migrate-recover, migrate-pause). `mig/dst/main` accepts the source
/// (`SourceAcceptor.swift`), loads the stream through the validating decoder
/// (`StreamLoader.swift`), and in postcopy reads the main channel and recovers
/// (`Recovery.swift`); `mig/dst/fault` turns userfaultfd faults into page requests
/// (`FaultService.swift`); `mig/dst/preempt` installs urgent pages (`PageInstaller.swift`).
/// A bad stream fails the migration with the decoder's error; the guest here never runs
/// from a partial load.
///
/// Ownership of the mutable fields:
/// - guarded by `lock`: `phase`, `_stats`, `_capabilities`, `channel`, `urgentChannel`,
///   `urgentThread`, `urgentInFlight`, `faultService`, `recoveryListener`, `recoverTriggered`, `pauseRequested`,
///   `multifd` (set by `mig/dst/main`, which reads it without the lock);
/// - `mig/dst/main` only: `postcopyAdvised`, `switchoverTimeline`;
/// - `returnPath` serialises its writers itself; `received` / `requested` are atomic bitmaps;
///   the rest is immutable.
final class IncomingMigration: @unchecked Sendable {
    let host: VMHost
    let uri: MigrationURI
    let machine: Machine
    let listener: MigrationListener
    let layout: RAMLayout
    /// Server credentials every accepted channel must complete a handshake with, or nil.
    let tls: TLSCredentials?
    /// Bytes read on channels already closed (guarded by `lock`).
    var retiredBytes: UInt64 = 0
    /// Pages present here (precopy writes, postcopy installs): the recovery contract.
    let received: PageBitmap
    /// Pages asked of the source and not yet installed.
    let requested: PageBitmap
    let faults = PostcopyFaultTracker()
    /// Every return-path message goes through here (main, fault and preempt threads).
    let returnPath = ReturnPathWriter()

    let lock = Monitor()
    /// Read by other files only with `lock` held; changed only by `advance`.
    private(set) var phase = DestinationPhase.none
    private var _stats = MigrationStats()
    /// Capabilities may change until the source's stream arrives (QEMU allows setting them
    /// on a listening destination); then they are taken from the host once.
    private var _capabilities: Set<MigrationCapability>
    var channel: MigrationChannel?
    var urgentChannel: MigrationChannel?
    var urgentThread: KernelThread?
    /// A recovery's urgent channel, accepted from the main channel's arrival to POSTCOPY_RESUME.
    var urgentInFlight: ChannelInFlight?
    /// With capability `multifd`: the channels precopy pages come on.
    var multifd: MultifdReceivers?
    /// Userfaultfd and its fault thread, from POSTCOPY_LISTEN on.
    var faultService: FaultService?
    var recoveryListener: MigrationListener?
    /// `migrate-recover` was given and no recovery attempt has failed since (QEMU's
    /// postcopy_recover_triggered): a second one is refused instead of replacing the first.
    var recoverTriggered = false
    /// `migrate-pause` broke the channels: the pause's cause, not the symptom, is reported.
    var pauseRequested = false

    // mig/dst/main only
    var postcopyAdvised = false
    /// The postcopy switch-over as this side sees it, from the PING after the source's early
    /// discards (the source stops its guest right after) to the guest running here.
    var switchoverTimeline: SwitchoverTimeline?

    init(host: VMHost, uri: MigrationURI, capabilities: Set<MigrationCapability>, tls: TLSCredentials?) throws {
        self.host = host
        self.uri = uri
        self._capabilities = capabilities
        self.tls = tls
        self.machine = host.machine
        self.listener = try MigrationListener(uri, tls: tls)
        self.layout = RAMLayout(blocks: host.machine.memory.blocks.map { .init(name: $0.name, length: UInt64($0.length)) })
        self.received = PageBitmap(bitCount: host.machine.ram.pageCount)
        self.requested = PageBitmap(bitCount: host.machine.ram.pageCount)
        _stats.socketAddress = listener.boundURI
        faults.setVCPUCount(host.machine.vcpuCount)
    }

    // MARK: phase

    /// The one way the phase changes: legal per `DestinationPhase.next`, checked and
    /// changed in one step under the lock (with `body`, under it too); the status event
    /// goes out after, outside the lock. An illegal event throws a protocol error.
    @discardableResult
    func advance(_ event: DestinationEvent, _ body: (inout MigrationStats) -> Void = { _ in }) throws -> DestinationPhase {
        let (before, after, cause) = lock.withLock {
            let r = DestinationPhase.step(&phase, event)
            if r.after != nil { body(&_stats); lock.broadcast() }
            return (r.before, r.after, r.after?.status.carriesError == true ? _stats.errorDescription : nil)
        }
        guard let after else { throw MigrationError(.protocolError, "migration event \(event) is not valid in phase \(before)") }
        host.announce(before.status, after.status, side: "destination", cause: cause)
        return after
    }

    var currentPhase: DestinationPhase { lock.withLock { phase } }
    var status: MigrationStatus { currentPhase.status }
    var capabilities: Set<MigrationCapability> { lock.withLock { _capabilities } }

    @discardableResult
    func updateStats<T>(_ body: (inout MigrationStats) -> T) -> T { lock.withLock { body(&_stats) } }

    var stats: MigrationStats {
        let (s, caught, caps): (MigrationStats, Bool, Set<MigrationCapability>) = lock.withLock {
            var s = _stats
            s.status = phase.status
            s.multifdBytes = multifd?.bytesRead ?? 0
            s.transferred = retiredBytes + (channel?.bytesRead ?? 0) + (urgentChannel?.bytesRead ?? 0) + s.multifdBytes
            return (s, faultService != nil, _capabilities) // from LISTEN on, through the end
        }
        var out = s
        if caught && caps.contains(.postcopyBlocktime) { out.faults = faults.report() }
        return out
    }

    // MARK: main thread

    func start() {
        updateStats { $0.startNanos = Sys.monotonicNanos() }
        do {
            try advance(.start)
            // Nobody waits for it: the status and events say when it is done.
            try KernelThread.detached(name: "mig/dst/main") { [self] in self.run() }
        } catch {
            fail(error)
        }
    }

    private func run() {
        do {
            let (ch, early) = try acceptSource()
            // From here on the stream decides: capabilities set over QMP until now apply.
            let caps = host.takeIncomingCapabilities()
            lock.withLock { _capabilities = caps }
            ChannelSetup.configure(ch, role: .main, heartbeatTimeoutMs: host.parameters.heartbeatTimeout)
            try advance(.sourceConnected) {
                if let t = ch.tlsDescription { $0.tls = t }
                self.channel = ch
            }
            if caps.contains(.multifd) {
                try acceptMultifdChannels(early: early, postcopy: caps.contains(.postcopyRAM))
            } else {
                for c in early { c.close() } // multifd is not enabled here: the source's connect fails it
            }
            // Postcopy keeps listening: the urgent channel and automatic recovery come here.
            if !caps.contains(.postcopyRAM) { listener.close() }
            if ch.isSocket { try startKeepalive() }
            switch try load(ch) {
            case .precopy(let devices, var timeline):
                try machine.restoreDevices(devices)
                timeline.mark("restore", now: Sys.monotonicNanos())
                try machine.start()
                timeline.mark("start", now: Sys.monotonicNanos())
                let gap = machine.guestClockGapUs()
                updateStats { $0.guestClockGapUs = gap; $0.switchover = timeline }
                host.setRunState(.running)
                host.emit(.resume)
                returnPath.send { $0.rpShut(0) }
                try advance(.finished) { $0.endNanos = Sys.monotonicNanos() }
                returnPath.attach(nil) // no writer may touch the fd once it is closed
                multifd?.close()
                ch.close()
                listener.close()
            case .postcopy(let decoder):
                postcopyMain(decoder, ch)
            }
        } catch {
            // Postcopy was coming but this guest never ran: the source still has the only
            // copy. Keep answering on the address with SHUT(1), so a source that tries to
            // recover learns that and runs its guest again instead of waiting forever.
            let refuse = postcopyAdvised && capabilities.contains(.postcopyRAM)
            // A multifd channel that failed shut the main one: its error is the reason.
            fail(multifd?.failure ?? error)
            multifd?.close()
            let ch = lock.withLock { channel }
            ch?.shutdown()
            returnPath.attach(nil) // no writer may touch the fd once it is closed
            ch?.close()
            stopCatchingFaults()
            if refuse { refuseRecovery() } else {
                listener.close()
                host.incomingFailed("\(error)")
            }
        }
    }

    /// The source's multifd channels (`multifd-channels` and `multifd-compression` as set
    /// here, which must match the source's) and their receiver threads.
    private func acceptMultifdChannels(early: [MigrationChannel], postcopy: Bool) throws {
        guard listener.isSocket else { throw MigrationError.multifdNeedsSocket }
        let p = host.parameters
        let channels = try ChannelSetup.acceptMultifd(on: listener, count: Int(p.multifdChannels), early: early, heartbeatTimeoutMs: p.heartbeatTimeout)
        let receivers = try MultifdReceivers(channels: channels, block: machine.ram, layout: layout, compression: p.multifdCompression,
                                             received: received, populateZeroPages: postcopy) { [weak self] _ in self?.multifdFailed() }
        lock.withLock { multifd = receivers }
    }

    /// A multifd channel failed: before the postcopy package that fails the migration
    /// (the main channel is shut, so the loader stops); later the channels are idle and
    /// their end means nothing.
    private func multifdFailed() {
        let ch: MigrationChannel? = lock.withLock {
            switch phase {
            case .listening, .loading: channel
            default: nil
            }
        }
        ch?.shutdown()
    }

    /// The destination's side of the heartbeat (`mig/dst/alive`): a keep-alive PONG every
    /// 250 ms on whatever return path is open, from its own thread, so that the source's
    /// read timeout measures the link and this process, not how far the loader lags behind
    /// its socket buffers (a slow destination is not a partitioned one). Ends with the
    /// migration (`advance` wakes it).
    private func startKeepalive() throws {
        try KernelThread.detached(name: "mig/dst/alive") { [self] in
            while true {
                let deadline = Sys.monotonicNanos() + DestinationKeepalive.intervalNanos
                let ended: Bool? = lock.withLock {
                    lock.wait(until: deadline, recheckNanos: DestinationKeepalive.intervalNanos) { phase.isRunning ? nil : true }
                }
                if ended == true { return }
                returnPath.send { $0.rpPong(Wire.pongKeepalive) }
            }
        }
    }

    /// Fails the migration (only legal before the guest ran here).
    private func fail(_ error: any Error) {
        // The reason first (Ferry's own message; a source that does not know it fails the
        // same way on the SHUT), so the source reports why, not the broken pipe that follows.
        returnPath.send { $0.rpError("\(error)"); $0.rpShut(1) }
        _ = try? advance(.failure) { // legal in every phase that can throw out of run()
            $0.errorDescription = "\(error)"
            $0.endNanos = Sys.monotonicNanos()
        }
    }

    /// Stops catching faults (every page is here, or the process is going away); idempotent.
    func stopCatchingFaults() {
        lock.withLock { faultService }?.stop()
    }

    // MARK: QMP entry points

    /// QMP `migrate-pause` on the destination.
    func pause() throws {
        let (ch, pc): (MigrationChannel?, MigrationChannel?) = try lock.withLock {
            guard phase.pausable else {
                throw MigrationError(.state, "migrate-pause is currently only supported during postcopy-active or postcopy-recover state")
            }
            pauseRequested = true
            return (channel, urgentChannel)
        }
        ch?.shutdown()
        pc?.shutdown()
    }

    /// The process is going away with postcopy unfinished: wake every thread waiting on a
    /// missing page (the unregister does that) so the vCPU can be stopped.
    func releaseGuestMemory() {
        guard currentPhase.faultsCaught else { return }
        stopCatchingFaults()
    }
}

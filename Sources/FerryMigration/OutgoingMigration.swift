import CFerry
import FerryKVM
import FerryMachine
import FerryMemory
import FerrySys
import FerryWire
import Glibc

/// The source side of one migration, run on its own thread (`mig/src/main`).
///
/// Precopy: setup (header, configuration, RAM block list), then passes over the pages still
/// to send, re-collecting KVM's dirty log after each pass. When the rest fits the downtime
/// limit at the measured bandwidth (and another pass would no longer halve it), the guest
/// stops, the last dirty pages and the vCPU state go over, then EOF. With a socket transport
/// the destination answers over the return path once its guest runs, which is when the
/// downtime ends. Any failure or cancel before that leaves the source guest running.
final class OutgoingMigration: @unchecked Sendable {
    let host: VMHost
    let uri: MigrationURI
    let capabilities: Set<MigrationCapability>
    let block: RAMBlock
    let machine: Machine

    private let lock = Monitor()
    private var _stats = MigrationStats()
    private var _parameters: MigrationParameters
    private var cancelRequested = false
    private var channel: MigrationChannel?
    private var rpThread: KernelThread?
    private var rpShut: UInt32?
    private var rpError: String?
    /// The destination's own account of why it failed (Ferry's error message before SHUT).
    private var destinationError: String?

    // postcopy
    private var postcopyRequested = false
    /// Page requests from the destination, served ahead of the background stream (without
    /// postcopy-preempt; with it the return-path thread sends them itself).
    private var requests: [Range<Int>] = []
    static let maxQueuedRequests = 65_536
    private var lastRequestBlock: String?
    private var postcopyRequestCount: UInt64 = 0
    /// Where the background scan should continue: just after the last requested page.
    private var pageHint: Int?
    /// The urgent-page channel (postcopy-preempt), written by the return-path thread.
    private var preempt: MigrationChannel?
    private var preemptNamed = false
    private var rpHeader = WireBuffer(capacity: 64)
    private var postcopyLoaded = false
    // recovery
    private var pauseRequested = false
    private var resumeURI: MigrationURI?
    private var resumeRequestedAt: UInt64 = 0
    private var recoverBitmap: [UInt8]?
    private var resumeAcked = false
    /// The address recovery reconnects to automatically (the last one that worked).
    private var recoveryURI: MigrationURI
    private var lastPing: UInt64 = 0
    private var pingCounter: UInt32 = 0x1000

    /// Pages still to send in this pass (set = dirty).
    let toSend: PageBitmap
    /// TLS on every channel of this migration (main, urgent, recovery), or nil.
    let tls: ChannelSecurity?
    private var cursor = 0
    private var header = WireBuffer(capacity: 512)
    static let ramSectionID: UInt32 = 0
    static let cpuSectionID: UInt32 = 1

    // rate limiting: 100 ms windows, as QEMU (main thread only)
    private var limiter = RateLimiter(now: 0, sent: 0)

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

    var stats: MigrationStats {
        lock.withLock {
            var s = _stats
            if let ch = channel, s.status.isRunning { s.transferred = ch.bytesWritten }
            return s
        }
    }
    var status: MigrationStatus { lock.withLock { _stats.status } }
    var parameters: MigrationParameters { lock.withLock { _parameters } }

    func updateParameters(_ p: MigrationParameters) { lock.withLock { _parameters = p } }

    private func setStatus(_ s: MigrationStatus) {
        let changed: Bool = lock.withLock {
            // Once cancelling, only the end of the cancel may follow.
            if _stats.status == .cancelling && s != .cancelled && s != .failed { return false }
            _stats.status = s
            return true
        }
        guard changed else { return }
        host.emit(.status(s))
        host.statusChanged()
    }

    private func updateStats(_ body: (inout MigrationStats) -> Void) { lock.withLock { body(&_stats) } }

    func start() throws {
        lock.withLock {
            _stats.startNanos = Sys.monotonicNanos()
            _stats.total = UInt64(block.length)
        }
        setStatus(.setup)
        // Nobody waits for it: the status and events say when it is done.
        try KernelThread.detached(name: "mig/src/main") { [self] in self.run() }
    }

    /// QMP migrate_cancel. Check and change are one step under the lock: once the postcopy
    /// package may be on its way, the destination may run the guest, and cancel is refused.
    /// Ends a blocked exec:/file: migration too (the channel is aborted, its child killed).
    func cancel() throws {
        let (accepted, ch): (Bool, MigrationChannel?) = try lock.withLock {
            if _stats.status.isPostcopy || destinationOwnsGuest || packageSent {
                throw MigrationError(.state, "Postcopy migration in progress, cannot cancel (status \(_stats.status.rawValue)): the guest's state is split between both hosts; recover it with migrate resume=true")
            }
            guard _stats.status.isRunning, !cancelRequested else { return (false, nil) }
            cancelRequested = true
            _stats.status = .cancelling
            return (true, channel)
        }
        guard accepted else { return }
        host.emit(.status(.cancelling))
        host.statusChanged()
        ch?.abort()
    }

    private var isCancelled: Bool { lock.withLock { cancelRequested } }

    /// QMP migrate-start-postcopy: switch at the next iteration.
    func startPostcopy() throws {
        guard capabilities.contains(.postcopyRAM) else { throw MigrationError(.config, "Enable postcopy with migrate_set_capability before the start of migration") }
        try lock.withLock {
            guard _stats.status == .setup || _stats.status == .active else {
                throw MigrationError(.state, "Postcopy must be started after migration has been started (status \(_stats.status.rawValue))")
            }
            postcopyRequested = true
        }
    }

    private func checkCancel() throws {
        let (cancelled, peer, shut) = lock.withLock { (cancelRequested, destinationError, rpShut) }
        if cancelled { throw MigrationError(.cancelled, "migration cancelled") }
        if let peer { throw MigrationError(.protocolError, "the destination failed: \(peer)") }
        if let shut, shut != 0 { throw MigrationError(.protocolError, "the destination failed the migration (SHUT \(shut))") }
    }

    // MARK: main thread

    /// The guest was paused by this migration, and may be resumed on failure until the
    /// destination could have started it (the postcopy package went out).
    private var guestStopped = false
    /// The run state when the switch-over stopped the guest: a guest that was already
    /// paused gets no second STOP and stays paused if the migration fails.
    private var runStateBefore: RunState?
    private var destinationOwnsGuest = false
    /// The postcopy package is on its way: from here on the destination may ask for pages.
    private var packageSent = false

    private func run() {
        var stopNanos: UInt64 = 0
        do {
            let ch = try Transport.connect(uri, tls: tls, isCancelled: { [self] in isCancelled })
            configure(ch)
            let cancelled: Bool = lock.withLock { channel = ch; return cancelRequested }
            if cancelled { throw MigrationError(.cancelled, "migration cancelled") }
            let returnPath = uri.isBidirectional
            try sendSetup(ch, returnPath: returnPath)
            if returnPath { startReturnPath(ch) }
            try machine.vm.setDirtyLogging(slot: Machine.ramSlot, true)
            // The first pass sends everything; the log only matters from here on.
            let discard = PageBitmap(bitCount: block.pageCount)
            try machine.vm.collectDirtyLog(slot: Machine.ramSlot, into: discard)
            toSend.setAll()
            updateStats { $0.setupTimeMs = (Sys.monotonicNanos() - $0.startNanos) / 1_000_000; $0.remaining = UInt64(block.length) }
            setStatus(.active)

            let postcopy = try iterateUntilConverged(ch)
            try checkCancel()
            if postcopy {
                try runPostcopy(ch)
                return
            }

            // Switchover: stop the guest, send the rest and the vCPU state.
            stopGuestForSwitchover()
            stopNanos = Sys.monotonicNanos()
            setStatus(.device)
            let before = ch.bytesWritten
            try machine.vm.collectDirtyLog(slot: Machine.ramSlot, into: toSend)
            header.removeAll()
            header.sectionShort(.end, id: Self.ramSectionID)
            try ch.write(header)
            cursor = 0
            _ = try sendPages(ch, limited: false)
            header.removeAll()
            header.ramEOS()
            header.footer(id: Self.ramSectionID)
            let cpu = try machine.vcpu.saveState().encoded()
            header.sectionHeader(.full, id: Self.cpuSectionID, name: Wire.cpuSectionName, version: Wire.cpuSectionVersion)
            header.be32(UInt32(cpu.count))
            header.append(cpu)
            header.footer(id: Self.cpuSectionID)
            header.eof()
            try ch.write(header)
            try ch.flush()
            updateStats { $0.downtimeBytes = ch.bytesWritten - before; $0.remaining = 0 }
            if returnPath {
                let shut = try waitForShut(seconds: 60)
                guard shut == 0 else { throw MigrationError(.protocolError, "the destination failed to load the migration (SHUT \(shut))") }
            } else if case .exec = uri {
                Glibc.shutdown(ch.fd, Int32(SHUT_WR))
            }
            try ch.finishOutput() // exec: the command consumed everything; file: on disk
            let end = Sys.monotonicNanos()
            try? machine.vm.setDirtyLogging(slot: Machine.ramSlot, false)
            updateStats {
                $0.downtimeMs = (end - stopNanos) / 1_000_000
                $0.endNanos = end
                $0.transferred = ch.bytesWritten
                $0.expectedDowntimeMs = nil
            }
            host.setRunState(.postmigrate)
            setStatus(.completed)
            ch.close()
        } catch {
            let cancelled = isCancelled
            try? machine.vm.setDirtyLogging(slot: Machine.ramSlot, false)
            lock.withLock { channel }?.abort()
            lock.withLock { channel }?.close()
            if case let .file(path) = uri { Transport.removePartialFile(path) }
            if !destinationOwnsGuest {
                if guestStopped {
                    machine.resume()
                    host.setRunState(.running)
                    host.emit(.resume)
                } else if let before = runStateBefore {
                    host.setRunState(before) // it was paused before: it stays paused
                }
            }
            let sent = lock.withLock { channel?.bytesWritten } ?? 0
            let requestCount = lock.withLock { postcopyRequestCount }
            // A bad return-path message shuts the channel: the write error that follows is a
            // symptom; the message is the reason.
            let (rp, peer) = lock.withLock { (rpError, destinationError) }
            updateStats {
                $0.endNanos = Sys.monotonicNanos()
                $0.postcopyRequests = requestCount
                $0.transferred = sent
                if !cancelled {
                    $0.errorDescription = peer.map { "the destination failed: \($0)" } ?? rp.map { "return path: \($0)" } ?? "\(error)"
                }
            }
            setStatus(cancelled ? .cancelled : .failed)
        }
        rpThread?.join()
    }

    private func sendSetup(_ ch: MigrationChannel, returnPath: Bool) throws {
        header.removeAll()
        header.fileHeader()
        header.configuration()
        if returnPath {
            header.command(.openReturnPath)
            header.ping(1)
        }
        if capabilities.contains(.postcopyRAM) {
            guard returnPath else { throw MigrationError(.config, "postcopy needs a return path: use a tcp: or unix: URI") }
            if capabilities.contains(.postcopyPreempt), case .exec = uri { throw MigrationError(.config, "postcopy-preempt needs a tcp: or unix: URI") }
            header.postcopyAdvise()
        }
        header.sectionHeader(.start, id: Self.ramSectionID, name: Wire.ramSectionName, version: Wire.ramSectionVersion)
        header.ramMemSize(blocks: [(block.name, UInt64(block.length))])
        header.ramEOS()
        header.footer(id: Self.ramSectionID)
        try ch.write(header)
        try ch.flush()
    }

    /// Precopy passes until the rest fits the downtime limit.
    @discardableResult
    private func iterateUntilConverged(_ ch: MigrationChannel) throws -> Bool {
        var lastSync = Sys.monotonicNanos()
        var bytesAtSync = ch.bytesWritten
        var bandwidth: Double = 0 // bytes per second
        var previousRemaining = UInt64.max
        var extraPasses = 0
        var bestRemaining = UInt64(block.length)
        var stuckPasses: UInt64 = 0
        limiter.reset(now: lastSync, sent: ch.bytesWritten, bytesPerSecond: parameters.maxBandwidth)
        while true {
            try checkCancel()
            if lock.withLock({ postcopyRequested }) { return true }
            header.removeAll()
            header.sectionShort(.part, id: Self.ramSectionID)
            try ch.write(header)
            let passDone = try sendPages(ch, limited: true)
            header.removeAll()
            header.ramEOS()
            header.footer(id: Self.ramSectionID)
            if uri.isBidirectional { pingIfDue() }
            try ch.write(header)
            try ch.flush()
            updateStats { $0.remaining = UInt64(toSend.popcount()) * UInt64(Wire.pageSize) }
            guard passDone else { continue }

            // End of a pass: collect what the guest dirtied meanwhile.
            let now = Sys.monotonicNanos()
            try machine.vm.collectDirtyLog(slot: Machine.ramSlot, into: toSend)
            let dirtyPages = UInt64(toSend.popcount())
            let elapsed = Double(now - lastSync) / 1e9
            let sent = ch.bytesWritten - bytesAtSync
            if sent >= 256 << 10 && elapsed > 0 { bandwidth = Double(sent) / elapsed }
            let limit = parameters.maxBandwidth
            if limit > 0 { bandwidth = bandwidth > 0 ? min(bandwidth, Double(limit)) : Double(limit) }
            let remaining = dirtyPages * UInt64(Wire.pageSize)
            let expectedMs = bandwidth > 0 ? UInt64(Double(remaining) / bandwidth * 1000) : UInt64.max
            let syncCount: UInt64 = lock.withLock {
                _stats.dirtySyncCount += 1
                _stats.remaining = remaining
                _stats.expectedDowntimeMs = expectedMs == .max ? nil : expectedMs
                _stats.dirtyPagesRate = elapsed > 0 ? UInt64(Double(dirtyPages) / elapsed) : 0
                _stats.mbps = elapsed > 0 ? Double(sent) * 8 / elapsed / 1e6 : 0
                _stats.pagesPerSecond = elapsed > 0 ? UInt64(Double(sent) / Double(Wire.pageSize) / elapsed) : 0
                _stats.precopyBytes = ch.bytesWritten
                return _stats.dirtySyncCount
            }
            host.emit(.pass(Int(syncCount)))
            lastSync = now
            bytesAtSync = ch.bytesWritten

            // Converged when the rest fits the limit; while each pass still halves the rest
            // (and the rest is not already tiny), one more pass buys a shorter downtime.
            let limitMs = parameters.downtimeLimit
            if expectedMs <= limitMs {
                let stillHalving = remaining < previousRemaining / 2
                if !stillHalving || expectedMs <= max(1, limitMs / 16) || extraPasses >= 8 { return false }
                extraPasses += 1
            }
            previousRemaining = remaining
            // Not converging: with the auto-switch parameter, go to postcopy by itself.
            let switchAfter = parameters.postcopyAutoSwitchPasses
            if switchAfter > 0 && capabilities.contains(.postcopyRAM) {
                if Double(remaining) < Double(bestRemaining) * 0.9 { bestRemaining = remaining; stuckPasses = 0 } else { stuckPasses += 1 }
                if stuckPasses >= switchAfter {
                    lock.withLock { _stats.autoSwitched = true }
                    return true
                }
            }
        }
    }

    /// A PING every 250 ms on socket migrations: the destination's PONGs are the return
    /// path's heartbeat, and the PINGs are the main channel's.
    private func pingIfDue() {
        let now = Sys.monotonicNanos()
        guard now - lastPing >= 250_000_000 else { return }
        lastPing = now
        pingCounter &+= 1
        header.ping(pingCounter)
    }

    /// Sends pages still to send, from the cursor on. With `limited`, stops at the rate
    /// limit or after 50 ms (QEMU's MAX_WAIT) so the caller can check for cancel.
    /// Returns true when no page is left in this pass.
    private func sendPages(_ ch: MigrationChannel, limited: Bool) throws -> Bool {
        let started = Sys.monotonicNanos()
        // With a limit, the budget is checked at every page: at low limits a 64-page batch
        // is more than several windows' worth.
        let checkEvery = limited && parameters.maxBandwidth > 0 && parameters.maxBandwidth < 64 << 20 ? 1 : 64
        var first = true
        var batch = 0
        var normal: UInt64 = 0, duplicate: UInt64 = 0
        defer { updateStats { $0.normal += normal; $0.duplicate += duplicate } }
        while let i = toSend.nextSet(from: cursor) {
            guard toSend.testAndClear(i) else { cursor = i + 1; continue }
            if try sendPage(ch, i, named: first) { duplicate += 1 } else { normal += 1 }
            first = false
            cursor = i + 1
            batch += 1
            if batch % checkEvery == 0 {
                if limited {
                    if try rateLimit(ch) { return false }
                    if Sys.monotonicNanos() - started > 50_000_000 { return false }
                } else {
                    try ch.flush()
                }
            }
        }
        cursor = 0
        return true
    }

    /// Sleeps while the rate limiter says the budget is spent. Returns true when the caller
    /// should end the section (it waited).
    private func rateLimit(_ ch: MigrationChannel) throws -> Bool {
        let limit = parameters.maxBandwidth
        var wait = limiter.delay(sent: ch.bytesWritten + UInt64(ch.pendingBytes), now: Sys.monotonicNanos(), bytesPerSecond: limit)
        guard wait > 0 else { return false }
        try ch.flush()
        while wait > 0 {
            try checkCancel()
            usleep(UInt32(min(wait / 1000, 10_000)))
            wait = limiter.delay(sent: ch.bytesWritten, now: Sys.monotonicNanos(), bytesPerSecond: parameters.maxBandwidth)
        }
        return true
    }

    /// Stops the guest for the switch-over (precopy's last pass or the postcopy package).
    /// A guest already paused by the operator gets no second STOP event.
    private func stopGuestForSwitchover() {
        let before = host.runState
        runStateBefore = before
        host.setRunState(.finishMigrate)
        machine.pause()
        guestStopped = before == .running
        if guestStopped { host.emit(.stop) }
    }

    // MARK: postcopy (source)

    /// Heartbeat and keep-alive settings for a socket channel.
    private func configure(_ ch: MigrationChannel) {
        if let s = ch.tls { updateStats { $0.tls = "\(s.version) \(s.cipher)" } }
        let t = Int32(clamping: parameters.heartbeatTimeout)
        guard ch.isSocket, t > 0 else { return }
        ch.setLiveness(timeoutMs: t)
        ch.readTimeoutMs = t
    }

    /// Stops the guest, tells the destination which pages to drop, ships the vCPU state in a
    /// package that starts the guest there, then streams the rest, requested pages first.
    /// Once the package is out the guest is never resumed here: failures pause, not fail.
    private func runPostcopy(_ ch: MigrationChannel) throws {
        stopGuestForSwitchover()
        let stopNanos = Sys.monotonicNanos()
        setStatus(.device)
        try machine.vm.collectDirtyLog(slot: Machine.ramSlot, into: toSend)
        try? machine.vm.setDirtyLogging(slot: Machine.ramSlot, false)
        // Discard every page still to send: the destination may hold a stale copy.
        header.removeAll()
        var ranges: [(start: UInt64, length: UInt64)] = []
        var i = toSend.nextSet(from: 0)
        while let s = i {
            var e = s + 1
            while e < toSend.bitCount && toSend.test(e) { e += 1 }
            ranges.append((UInt64(s) << 12, UInt64(e - s) << 12))
            if ranges.count == 12 { header.ramDiscard(block: block.name, ranges: ranges); ranges.removeAll() }
            i = toSend.nextSet(from: e)
        }
        if !ranges.isEmpty { header.ramDiscard(block: block.name, ranges: ranges) }
        header.ping(2)
        var package = WireBuffer(capacity: 16 << 10)
        package.command(.postcopyListen)
        let cpu = try machine.vcpu.saveState().encoded()
        package.sectionHeader(.full, id: Self.cpuSectionID, name: Wire.cpuSectionName, version: Wire.cpuSectionVersion)
        package.be32(UInt32(cpu.count))
        package.append(cpu)
        package.footer(id: Self.cpuSectionID)
        package.command(.postcopyRun)
        lock.withLock { packageSent = true }
        header.packaged(length: UInt32(package.count))
        header.append(package.bytes)
        try ch.write(header)
        try ch.flush()
        // The urgent channel is the second connection; the destination accepts it at LISTEN.
        if capabilities.contains(.postcopyPreempt) {
            let pc = try Transport.connect(uri, tls: tls)
            configure(pc)
            pc.readTimeoutMs = 0
            lock.withLock { preempt = pc; preemptNamed = false }
        }
        lock.withLock { destinationOwnsGuest = true } // the guest may run over there from now on
        setStatus(.postcopyDevice)
        host.setRunState(.postmigrate)

        // postcopy-device: the destination answers PONG 0x42 once its guest runs. A SHUT
        // with an error before that means it never ran, and the guest may run here again.
        var current = ch
        do {
            try lock.withLock {
                while !postcopyLoaded {
                    if let s = rpShut, s != 0 { throw PostcopyDeviceFailure(shut: s) }
                    if let e = rpError { throw MigrationError(.io, "return path failed before the destination ran the guest: \(e)") }
                    if pauseRequested { throw MigrationError(.io, "Postcopy migration is paused by the user") }
                    lock.wait(timeoutNanos: 10_000_000)
                }
            }
            updateStats { $0.downtimeMs = (Sys.monotonicNanos() - stopNanos) / 1_000_000 }
            setStatus(.postcopyActive)
        } catch let f as PostcopyDeviceFailure {
            lock.withLock { destinationOwnsGuest = false }
            try? machine.vm.setDirtyLogging(slot: Machine.ramSlot, true)
            throw MigrationError(.protocolError, "the destination failed to start the guest (SHUT \(f.shut)); the guest continues here")
        } catch {
            current = try pauseAndRecover(after: error, old: ch)
        }
        while true {
            do {
                try streamPostcopy(current)
                return
            } catch {
                current = try pauseAndRecover(after: error, old: current)
            }
        }
    }

    private struct PostcopyDeviceFailure: Error { let shut: UInt32 }

    /// A recovery attempt reached a destination that failed before it ever ran the guest
    /// (it answers SHUT(1)), and this side never heard that it did (no PONG 0x42): the
    /// guest's only copy is here, so it runs here again.
    private struct DestinationNeverRan: Error { let shut: UInt32 }

    /// The postcopy background stream until every page is on the destination, then EOF and
    /// the destination's SHUT(0). Throws on any channel error or a forced pause.
    private func streamPostcopy(_ ch: MigrationChannel) throws {
        cursor = 0
        limiter.reset(now: Sys.monotonicNanos(), sent: ch.bytesWritten, bytesPerSecond: parameters.maxPostcopyBandwidth, carriesDebt: false)
        while toSend.nextSet(from: 0) != nil {
            try checkPaused()
            header.removeAll()
            header.sectionShort(.part, id: Self.ramSectionID)
            try ch.write(header)
            var first = true
            let (pending, hint): ([Range<Int>], Int?) = lock.withLock {
                defer { requests.removeAll(); pageHint = nil }
                return (requests, pageHint)
            }
            for r in pending {
                for p in r where toSend.testAndClear(p) {
                    try sendPage(ch, p, named: first)
                    first = false
                    cursor = p + 1 // move the background scan near what the guest wants
                }
            }
            if let hint { cursor = hint }
            // Requested pages always go; the background stream respects max-postcopy-bandwidth.
            let delay = postcopyDelay(ch)
            let overBudget = delay > 0
            var sent = 0
            while !overBudget, sent < 64, let p = toSend.nextSet(from: cursor) ?? toSend.nextSet(from: 0) {
                if toSend.testAndClear(p) { try sendPage(ch, p, named: first); first = false; sent += 1 }
                cursor = p + 1
            }
            header.removeAll()
            header.ramEOS()
            header.footer(id: Self.ramSectionID)
            pingIfDue()
            try ch.write(header)
            try ch.flush()
            let left = UInt64(toSend.popcount()) * 4096
            let requestCount = lock.withLock { postcopyRequestCount }
            updateStats { $0.remaining = left; $0.transferred = ch.bytesWritten; $0.postcopyRequests = requestCount }
            if overBudget { try waitForRequestOrWindow(delay) }
        }
        header.removeAll()
        header.eof()
        try ch.write(header)
        try ch.flush()
        let shut = try waitForShut(seconds: 600)
        guard shut == 0 else {
            // The destination's guest runs; never give up on it: pause and let recovery decide.
            throw MigrationError(.protocolError, "the destination reported an error at the end of postcopy (SHUT \(shut))")
        }
        let end = Sys.monotonicNanos()
        let requestCount = lock.withLock { postcopyRequestCount }
        updateStats { $0.endNanos = end; $0.transferred = ch.bytesWritten; $0.remaining = 0; $0.postcopyRequests = requestCount }
        setStatus(.completed)
        closeChannels(ch)
    }

    private func checkPaused() throws {
        try lock.withLock {
            if pauseRequested { throw MigrationError(.io, "Postcopy migration is paused by the user") }
            if let e = rpError { throw MigrationError(.io, "return path failed in postcopy: \(e)") }
        }
    }

    /// Shuts and closes the main and urgent channels and waits for the return-path thread.
    private func closeChannels(_ ch: MigrationChannel?) {
        let pc: MigrationChannel? = lock.withLock { defer { preempt = nil }; return preempt }
        ch?.shutdown()
        pc?.shutdown()
        rpThread?.join()
        rpThread = nil
        ch?.close()
        pc?.close()
    }

    /// postcopy-paused until recovered: keeps every page and queued request, waits for
    /// `migrate resume=true` (or, with auto-recover, reconnects by itself with backoff), and
    /// runs the recovery handshake. A failed attempt returns here; this never gives up.
    private func pauseAndRecover(after error: any Error, old: MigrationChannel) throws -> MigrationChannel {
        let pausedAt = Sys.monotonicNanos()
        closeChannels(old)
        lock.withLock {
            // A forced pause also breaks the channels; report the cause, not the symptom.
            _stats.errorDescription = pauseRequested ? "Postcopy migration is paused by the user" : "\(error)"
            rpError = nil; rpShut = nil; pauseRequested = false
            _stats.postcopyPauses += 1
        }
        lock.withLock { channel = nil }
        setStatus(.postcopyPaused)
        let auto = capabilities.contains(.autoRecover)
        // First attempt almost at once (a reset link is often back already), then backoff.
        var backoff: UInt64 = 50_000_000
        var nextAttempt = pausedAt + 10_000_000
        while true {
            let deadline = pausedAt + parameters.autoRecoverTimeout * 1_000_000
            let target: MigrationURI = lock.withLock {
                while true {
                    if let u = resumeURI { resumeURI = nil; return u }
                    let now = Sys.monotonicNanos()
                    if auto && now < deadline {
                        if now >= nextAttempt { resumeRequestedAt = now; return recoveryURI }
                        lock.wait(timeoutNanos: nextAttempt - now)
                    } else {
                        lock.wait(timeoutNanos: 100_000_000)
                    }
                }
            }
            let attemptStart = lock.withLock { resumeRequestedAt }
            updateStats { $0.recoveryAttempts += 1 }
            setStatus(.postcopyRecoverSetup)
            var newChannel: MigrationChannel?
            do {
                let ch = try Transport.connect(target, tls: tls)
                configure(ch)
                newChannel = ch
                lock.withLock { channel = ch; recoverBitmap = nil; resumeAcked = false }
                setStatus(.postcopyRecover)
                try resumeHandshake(ch, target)
                let now = Sys.monotonicNanos()
                recoveryURI = target
                updateStats {
                    $0.recoveries += 1
                    $0.lastRecoveryMs = Double(now - attemptStart) / 1e6
                    $0.lastOutageMs = Double(now - pausedAt) / 1e6
                    $0.pausedMs += (now - pausedAt) / 1_000_000
                    $0.errorDescription = nil
                }
                setStatus(.postcopyActive)
                return ch
            } catch let never as DestinationNeverRan {
                closeChannels(newChannel)
                lock.withLock { destinationOwnsGuest = false; channel = nil }
                try? machine.vm.setDirtyLogging(slot: Machine.ramSlot, false)
                throw MigrationError(.protocolError, "the destination failed before it ran the guest (it answered recovery with SHUT \(never.shut)); the guest continues here")
            } catch {
                closeChannels(newChannel)
                lock.withLock {
                    rpError = nil; rpShut = nil; pauseRequested = false; channel = nil
                    _stats.errorDescription = "recovery failed: \(error)"
                }
                setStatus(.postcopyPaused)
                nextAttempt = Sys.monotonicNanos() + backoff
                backoff = min(backoff * 2, 1_000_000_000)
            }
        }
    }

    /// The source half of recovery on a new channel (which starts with commands, no header):
    /// RECV_BITMAP → the destination's received bitmap → "still to send" is its complement;
    /// a new urgent channel; POSTCOPY_RESUME → RESUME_ACK.
    private func resumeHandshake(_ ch: MigrationChannel, _ target: MigrationURI) throws {
        startReturnPath(ch)
        header.removeAll()
        header.recvBitmapRequest(block: block.name)
        try ch.write(header)
        try ch.flush()
        let bits = try waitRecovery(seconds: 30) { recoverBitmap }
        guard let received = PageBitmap.deserialize(bits, bitCount: block.pageCount) else {
            throw MigrationError(.protocolError, "received bitmap of \(bits.count) bytes does not fit \(block.pageCount) pages")
        }
        let before = toSend.popcount()
        received.complement()
        toSend.clearAll()
        toSend.formUnion(received)
        let after = toSend.popcount()
        updateStats {
            $0.bitmapBytes += UInt64(bits.count + 16 + 5 + block.name.utf8.count)
            $0.pagesResent += UInt64(max(0, after - before))
            $0.remaining = UInt64(after) * 4096
        }
        cursor = 0
        header.removeAll()
        header.command(.postcopyResume)
        try ch.write(header)
        try ch.flush()
        // The destination accepts the new urgent channel when it reads POSTCOPY_RESUME, and
        // acks after: with TLS the channel's handshake needs that accept, so it comes second.
        if capabilities.contains(.postcopyPreempt) {
            let pc = try Transport.connect(target, tls: tls)
            configure(pc)
            pc.readTimeoutMs = 0
            lock.withLock { preempt = pc; preemptNamed = false }
        }
        _ = try waitRecovery(seconds: 30) { resumeAcked ? true : nil }
    }

    /// Waits (lock held) for `value` from the return-path thread, or its error, a forced
    /// pause, or the deadline.
    private func waitRecovery<T>(seconds: Double, _ value: () -> T?) throws -> T {
        let deadline = Sys.monotonicNanos() + UInt64(seconds * 1e9)
        return try lock.withLock {
            while true {
                if let v = value() { return v }
                if let s = rpShut, s != 0 {
                    if !postcopyLoaded { throw DestinationNeverRan(shut: s) }
                    throw MigrationError(.protocolError, "the destination refused recovery (SHUT \(s))")
                }
                if let e = rpError { throw MigrationError(.io, "return path failed during recovery: \(e)") }
                if pauseRequested { throw MigrationError(.io, "Postcopy recovery is paused by the user") }
                if Sys.monotonicNanos() > deadline { throw MigrationError(.timeout, "the destination did not answer within \(Int(seconds)) s") }
                lock.wait(timeoutNanos: 10_000_000)
            }
        }
    }

    /// The destination may have run the guest: it must never run here again.
    var guestHandedOver: Bool { lock.withLock { destinationOwnsGuest } }

    /// QMP `migrate` with resume=true.
    func resume(_ target: MigrationURI) throws {
        try lock.withLock {
            guard _stats.status == .postcopyPaused else {
                throw MigrationError(.state, "Cannot resume if there is no paused migration (status \(_stats.status.rawValue))")
            }
            resumeURI = target
            resumeRequestedAt = Sys.monotonicNanos()
            lock.broadcast()
        }
    }

    /// QMP `migrate-pause`: force postcopy-paused (the link may merely stall).
    func pause() throws {
        let (ch, pc): (MigrationChannel?, MigrationChannel?) = try lock.withLock {
            let s = _stats.status
            guard s == .postcopyActive || s == .postcopyRecover || s == .postcopyDevice || s == .postcopyRecoverSetup else {
                throw MigrationError(.state, "migrate-pause is currently only supported during postcopy-active or postcopy-recover state")
            }
            pauseRequested = true
            lock.broadcast()
            return (channel, preempt)
        }
        ch?.shutdown()
        pc?.shutdown()
    }

    /// Queues one page record: ZERO for an all-zero page, else PAGE with the page referenced
    /// straight from guest RAM. The block name goes with the first record of a section.
    /// Returns true for a zero page.
    @discardableResult
    private func sendPage(_ ch: MigrationChannel, _ i: Int, named: Bool) throws -> Bool {
        try Self.sendPage(ch, block, i, named: named, buffer: &header)
    }

    @discardableResult
    private static func sendPage(_ ch: MigrationChannel, _ block: RAMBlock, _ i: Int, named: Bool, buffer: inout WireBuffer) throws -> Bool {
        let page = block.page(i)
        buffer.removeAll()
        if ferry_page_is_zero(page) != 0 {
            buffer.ramRecord(offset: UInt64(i) << 12, flags: .zero, block: named ? block.name : nil)
            try ch.write(buffer)
            return true
        } else {
            buffer.ramRecord(offset: UInt64(i) << 12, flags: .page, block: named ? block.name : nil)
            try ch.write(buffer)
            try ch.write(reference: page, count: Wire.pageSize)
            return false
        }
    }

    /// How long the background stream must wait for max-postcopy-bandwidth (0: go on).
    private func postcopyDelay(_ ch: MigrationChannel) -> UInt64 {
        limiter.delay(sent: ch.bytesWritten, now: Sys.monotonicNanos(), bytesPerSecond: parameters.maxPostcopyBandwidth)
    }

    /// Sleeps until the window ends, or until a page request arrives (served at once).
    private func waitForRequestOrWindow(_ delay: UInt64) throws {
        let wake = Sys.monotonicNanos() + delay
        try lock.withLock {
            while requests.isEmpty {
                if let e = rpError { throw MigrationError(.io, "return path failed in postcopy: \(e)") }
                if pauseRequested { throw MigrationError(.io, "Postcopy migration is paused by the user") }
                let t = Sys.monotonicNanos()
                if t >= wake { break }
                lock.wait(timeoutNanos: wake - t)
            }
        }
    }

    // MARK: return path

    private func startReturnPath(_ ch: MigrationChannel) {
        rpThread = try? KernelThread(name: "mig/src/return") { [self] in
            do {
                while true {
                    let msg = try ReturnPathDecoder.next(ch)
                    switch msg {
                    case .shut(let v):
                        lock.withLock { rpShut = v; lock.broadcast() }
                        return
                    case .pong(let v):
                        if v == Wire.pingPackagedLoaded { lock.withLock { postcopyLoaded = true; lock.broadcast() } }
                    case .switchoverAck:
                        continue
                    case .error(let text):
                        lock.withLock { destinationError = text; lock.broadcast() }
                    case let .requestPages(blockName, offset, length):
                        let name = blockName ?? lock.withLock { lastRequestBlock }
                        guard name == block.name else { throw MigrationError(.protocolError, "page request for unknown RAM block \(name ?? "(none)")") }
                        let pages: Range<Int>
                        do { pages = try PageRequest(block: name, offset: offset, length: length).pages(blockLength: UInt64(block.length)) } catch {
                            throw MigrationError(.protocolError, "bad page request from the destination", cause: error)
                        }
                        try serveRequest(pages, name: name)
                    case .receivedBitmap(let name):
                        let expecting = lock.withLock { _stats.status == .postcopyRecover && recoverBitmap == nil }
                        guard expecting else { throw MigrationError(.protocolError, "unexpected received bitmap") }
                        guard name == block.name else { throw MigrationError(.protocolError, "received bitmap for unknown RAM block \(name)") }
                        let bits = try ReturnPathDecoder.readReceivedBitmap(ch, expectedBytes: toSend.byteCount)
                        lock.withLock { recoverBitmap = bits; lock.broadcast() }
                    case .resumeAck(let v):
                        guard v == Wire.resumeAckValue else { throw MigrationError(.protocolError, "RESUME_ACK with value \(v)") }
                        lock.withLock { resumeAcked = true; lock.broadcast() }
                    }
                }
            } catch {
                lock.withLock { rpError = "\(error)"; lock.broadcast() }
                // Unblock the main thread if it is stuck in a send to a dead peer.
                ch.shutdown()
                lock.withLock { preempt }?.shutdown()
            }
        }
    }

    /// A page request: with postcopy-preempt the pages go out right here on the urgent
    /// channel (no hop through the main thread); otherwise they are queued ahead of the
    /// background stream. Either way the background scan moves on from just after them.
    private func serveRequest(_ pages: Range<Int>, name: String?) throws {
        let (pc, refusal): (MigrationChannel?, String?) = lock.withLock {
            // Only a destination running the guest asks for pages.
            guard packageSent else { return (nil, "page request from the destination before postcopy started") }
            lastRequestBlock = name
            postcopyRequestCount += 1
            pageHint = pages.upperBound < block.pageCount ? pages.upperBound : nil
            if preempt == nil {
                // A destination has a request per waiting thread in flight, not thousands:
                // a flood is a broken or hostile peer, and must not grow our memory.
                guard requests.count < Self.maxQueuedRequests else {
                    return (nil, "page request flood: \(Self.maxQueuedRequests) requests queued and unserved")
                }
                requests.append(pages); lock.broadcast()
            }
            return (preempt, nil)
        }
        if let refusal { throw MigrationError(.protocolError, refusal) }
        guard let pc else { return }
        var sent = false
        for p in pages where toSend.testAndClear(p) {
            try Self.sendPage(pc, block, p, named: !preemptNamed, buffer: &rpHeader)
            preemptNamed = true
            sent = true
        }
        if sent {
            do { try pc.flush() } catch {
                // A broken urgent channel is a link failure: pause like the main channel would.
                throw MigrationError(.io, "urgent-page channel failed", cause: error)
            }
        }
    }

    private func waitForShut(seconds: Double) throws -> UInt32 {
        let deadline = Sys.monotonicNanos() + UInt64(seconds * 1e9)
        return try lock.withLock {
            while true {
                if let s = rpShut { return s }
                if let e = rpError { throw MigrationError(.io, "return path failed before the destination confirmed: \(e)") }
                if cancelRequested { throw MigrationError(.cancelled, "migration cancelled") }
                if pauseRequested { throw MigrationError(.io, "Postcopy migration is paused by the user") }
                if Sys.monotonicNanos() > deadline { throw MigrationError(.timeout, "the destination did not confirm within \(Int(seconds)) s") }
                lock.wait(timeoutNanos: 10_000_000)
            }
        }
    }
}

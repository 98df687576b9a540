import FerryHarness
import FerryMachine
import FerryMigration
import FerryWire
import Glibc
import Testing

/// A source and destination joined through a fault-injecting TCP proxy.
struct ProxiedPair {
    let pair: Pair
    let proxy: FaultProxy
    let sourceStatuses = Recorder<MigrationStatus>()
    let destinationStatuses = Recorder<MigrationStatus>()

    init(memory: Int = 64 << 20, vcpus: Int = testVCPUs, autoRecover: Bool = true, preempt: Bool = false, heartbeatMs: UInt64 = 500, tls: TLSFixture.Kind? = nil) throws {
        pair = try Pair(memory: memory, vcpus: vcpus)
        if let tls { try TLSFixture.install(tls, source: pair.source, destination: pair.destination) }
        var caps: [(MigrationCapability, Bool)] = [(.postcopyRAM, true), (.postcopyBlocktime, true)]
        if autoRecover { caps.append((.autoRecover, true)) }
        if preempt { caps.append((.postcopyPreempt, true)) }
        for h in [pair.source, pair.destination] {
            try h.setCapabilities(caps)
            h.setParameters { $0.heartbeatTimeout = heartbeatMs * testTimeScale; $0.autoRecoverTimeout = 120_000 }
        }
        let target = try pair.listen()
        guard case let .tcp(_, port) = try MigrationURI(target) else { throw MigrationError(.badURI, target) }
        proxy = try FaultProxy(upstream: port)
        let s = sourceStatuses, d = destinationStatuses
        pair.source.subscribe { if case .status(let x) = $0 { s.append(x) } }
        pair.destination.subscribe { if case .status(let x) = $0 { d.append(x) } }
    }

    var source: VMHost { pair.source }
    var destination: VMHost { pair.destination }

    /// Starts a migration that switches to postcopy at once and then moves slowly enough
    /// for failures to land in the middle of postcopy.
    func startPostcopy(postcopyBandwidth: UInt64 = 12_000_000) throws {
        source.setParameters { $0.maxBandwidth = 10_000_000; $0.maxPostcopyBandwidth = postcopyBandwidth }
        try source.migrate(uri: proxy.uri)
        #expect(waitUntil { source.queryMigrate().status == .active })
        try source.startPostcopy()
    }

    func bothPaused(seconds: Double = 10) -> Bool {
        waitUntil(seconds: seconds) {
            source.queryMigrate().status == .postcopyPaused && destination.queryMigrate().status == .postcopyPaused
        }
    }

    func bothActive(seconds: Double = 20) -> Bool {
        waitUntil(seconds: seconds) {
            source.queryMigrate().status == .postcopyActive && destination.queryMigrate().status == .postcopyActive
        }
    }

    /// A migration that failed before the destination ran the guest: it runs on here, its
    /// memory intact, and never ran there.
    func expectGuestStayedOnSource() {
        #expect(source.runState == .running)
        #expect(waitForPasses(source.machine, 2), "the source guest runs on")
        source.machine.pause()
        #expect(checkMemory(source.machine).passed)
        source.machine.resume()
        #expect(destination.runState != .running)
    }

    func expectCompleted() {
        #expect(source.waitForMigration(seconds: scaled(120)) == .completed, "source: \(source.queryMigrate().status) \(source.queryMigrate().errorDescription ?? "")")
        #expect(destination.waitForMigration(seconds: scaled(30)) == .completed, "destination: \(destination.queryMigrate().status) \(destination.queryMigrate().errorDescription ?? "")")
        pair.expectDestinationRunsCorrectly()
    }
}

@Suite("postcopy recovery", .serialized)
struct RecoveryTests {
    enum Failure: String, CaseIterable, Sendable { case reset, blackhole }
    enum Point: String, CaseIterable, Sendable { case switchover, postcopy, bitmapSync, handshake, afterResumeAck }

    /// Fails the link at `point` with `failure`; auto-recover heals it. A blackhole needs the
    /// link back (the proxy passes bytes again) once both sides noticed.
    @Test("a failure at every point, by reset or by a silent blackhole, pauses both sides and recovery completes with memory verified",
          arguments: Point.allCases, Failure.allCases)
    func failureAtPoint(point: Point, failure: Failure) throws {
        let p = try ProxiedPair()
        let action: FaultProxy.Action = failure == .reset ? .reset : .blackhole
        func inject() { if failure == .reset { p.proxy.reset() } else { p.proxy.set(.blackhole) } }
        func heal() {
            if failure == .blackhole {
                #expect(p.bothPaused(), "both sides must notice a silent link within the heartbeat timeout")
                p.proxy.set(.pass)
            }
        }
        switch point {
        case .switchover:
            p.proxy.on(.toSource, pattern: WirePoint.guestStarted, action)
            try p.startPostcopy()
            #expect(waitUntil { p.source.queryMigrate().postcopyPauses >= 1 })
            heal()
        case .postcopy:
            try p.startPostcopy()
            #expect(p.bothActive())
            // query-migrate's rates while postcopy runs: the background stream at its limit
            // (12 MB/s), measured over the last second.
            _ = p.source.queryMigrate()
            usleep(400_000)
            let rate = p.source.queryMigrate().postcopyBackgroundRate ?? 0
            #expect(rate > 0 && rate < 24e6, "background \(rate) B/s at max-postcopy-bandwidth 12 MB/s")
            inject()
            #expect(waitUntil { p.source.queryMigrate().postcopyPauses >= 1 && p.destination.queryMigrate().postcopyPauses >= 1 })
            heal()
        case .bitmapSync, .handshake, .afterResumeAck:
            try p.startPostcopy()
            #expect(p.bothActive())
            let pattern = point == .bitmapSync ? WirePoint.bitmapReply : point == .handshake ? WirePoint.resumeCommand : WirePoint.resumeAck
            let direction: FaultProxy.Direction = point == .handshake ? .toDestination : .toSource
            p.proxy.on(direction, pattern: pattern, action)
            p.proxy.reset() // the first failure; the second comes during recovery
            #expect(waitUntil(seconds: 15) { p.proxy.fired.count >= 2 }, "the recovery-time failure did not fire: \(p.proxy.fired)")
            heal()
        }
        p.expectCompleted()
        let s = p.source.queryMigrate(), d = p.destination.queryMigrate()
        #expect(s.recoveries >= 1)
        #expect(p.sourceStatuses.values.contains(.postcopyPaused))
        #expect(p.destinationStatuses.values.contains(.postcopyPaused))
        #expect(!p.sourceStatuses.values.contains(.failed) && !p.destinationStatuses.values.contains(.failed))
        // QEMU's counters stay cumulative across pauses: everything the guest's RAM needed
        // went over some channel, and postcopy's share is counted.
        let ram = UInt64(p.source.machine.ram.length)
        #expect(s.transferred >= s.precopyBytes + s.postcopyBytes && s.postcopyBytes > 0, "transferred \(s.transferred), precopy \(s.precopyBytes), postcopy \(s.postcopyBytes)")
        // Postcopy's pages split into requested and background, counted as queued: within
        // postcopy's bytes but for what a failed channel's buffers dropped (64 KiB staged
        // plus what the kernel held, per channel and failure).
        #expect(s.postcopyBackgroundBytes > 0 && s.postcopyRequestedBytes + s.postcopyBackgroundBytes <= s.postcopyBytes + (8 << 20),
                "requested \(s.postcopyRequestedBytes), background \(s.postcopyBackgroundBytes), postcopy \(s.postcopyBytes)")
        #expect(s.transferred + UInt64(s.duplicate) * 4096 >= ram / 2, "transferred \(s.transferred) for \(ram) bytes of RAM")
        #expect(d.transferred >= s.transferred / 2, "bytes lost in flight are re-sent, not more: destination read \(d.transferred), source wrote \(s.transferred)")
        if point == .bitmapSync || point == .handshake || point == .afterResumeAck {
            #expect(s.postcopyPauses >= 2 || d.postcopyPauses >= 2, "the failure during recovery must pause again: \(s.postcopyPauses)/\(d.postcopyPauses)")
        }
    }

    @Test("manual recovery: reset → both paused; cancel refused; stop/cont/query answer; migrate-recover + migrate resume=true complete it")
    func manualRecovery() throws {
        let p = try ProxiedPair(autoRecover: false)
        try p.startPostcopy()
        #expect(p.bothActive())
        p.proxy.reset()
        #expect(p.bothPaused(seconds: 5))
        #expect(throws: MigrationError.self) { try p.source.cancel() }
        #expect(throws: MigrationError.self) { try p.source.migrate(uri: p.proxy.uri) } // not a resume
        #expect(throws: MigrationError.self) { try p.destination.migrateRecover(uri: "udp:1") }
        // The paused destination still answers; stop/cont do not hang on a guest blocked on a page.
        p.destination.stop()
        try p.destination.cont()
        #expect(p.destination.queryMigrate().status == .postcopyPaused)
        // Nothing happens without the operator.
        usleep(800_000)
        #expect(p.source.queryMigrate().status == .postcopyPaused)
        let target = p.destination.queryMigrate().socketAddress!.description
        try p.destination.migrateRecover(uri: target) // the old port, reused
        try p.source.migrate(uri: p.proxy.uri, resume: true)
        #expect(waitUntil { p.source.queryMigrate().recoveries == 1 })
        p.expectCompleted()
        let s = p.source.queryMigrate()
        #expect(s.bitmapBytes > 0)
        #expect(s.lastRecoveryMs != nil)
        let src = p.sourceStatuses.values, dst = p.destinationStatuses.values
        #expect(Array(src.suffix(5)) == [.postcopyPaused, .postcopyRecoverSetup, .postcopyRecover, .postcopyActive, .completed], "\(src)")
        #expect(Array(dst.suffix(4)) == [.postcopyPaused, .postcopyRecover, .postcopyActive, .completed], "\(dst)")
    }

    @Test("four failures in one migration (reset, blackhole, forced pause on each side) and a retry after a failed resume")
    func repeatedFailures() throws {
        let p = try ProxiedPair(autoRecover: false)
        try p.startPostcopy(postcopyBandwidth: 6_000_000)
        #expect(p.bothActive())
        let target = p.destination.queryMigrate().socketAddress!.description
        func recover() throws {
            try p.destination.migrateRecover(uri: target)
            try p.source.migrate(uri: p.proxy.uri, resume: true)
            #expect(p.bothActive(), "\(p.source.queryMigrate().status) / \(p.destination.queryMigrate().status)")
        }
        // 1: reset
        p.proxy.reset()
        #expect(p.bothPaused())
        // a resume to a dead address fails back to paused, and can be retried
        try p.source.migrate(uri: "tcp:127.0.0.1:1", resume: true)
        #expect(waitUntil { p.source.queryMigrate().recoveryAttempts == 1 && p.source.queryMigrate().status == .postcopyPaused })
        try recover()
        // 2: silent partition
        p.proxy.set(.blackhole)
        #expect(p.bothPaused(seconds: 5))
        p.proxy.set(.pass)
        try recover()
        // 3: operator pause on the source (the link merely stalls)
        p.proxy.set(.stall)
        try p.source.migratePause()
        #expect(p.bothPaused(seconds: 5))
        p.proxy.set(.pass)
        try recover()
        // 4: operator pause on the destination
        try p.destination.migratePause()
        #expect(p.bothPaused(seconds: 5))
        try recover()
        p.expectCompleted()
        #expect(p.source.queryMigrate().postcopyPauses == 4)
        #expect(p.source.queryMigrate().recoveries == 4)
        #expect(p.destination.queryMigrate().errorDescription == nil || p.destination.queryMigrate().status == .completed)
    }

    @Test("a precopy failure (reset or blackhole) fails the migration and the source guest keeps running intact",
          arguments: Failure.allCases)
    func precopyFailure(failure: Failure) throws {
        let p = try ProxiedPair()
        p.source.setParameters { $0.maxBandwidth = 10_000_000 }
        try p.source.migrate(uri: p.proxy.uri)
        #expect(waitUntil { p.source.queryMigrate().status == .active && p.source.queryMigrate().transferred > 2 << 20 })
        if failure == .reset { p.proxy.reset() } else { p.proxy.set(.blackhole) }
        #expect(p.source.waitForMigration(seconds: scaled(10)) == .failed)
        #expect(p.source.runState == .running)
        #expect(waitForPasses(p.source.machine, 1))
        p.source.machine.pause()
        #expect(checkMemory(p.source.machine).passed)
        p.source.machine.resume()
    }

    @Test("with postcopy-preempt, urgent pages use their own channel, and recovery re-opens it")
    func preemptRecovery() throws {
        let p = try ProxiedPair(preempt: true)
        try p.startPostcopy()
        #expect(p.bothActive())
        #expect(waitUntil { p.proxy.accepted >= 2 }, "no urgent-page channel was opened")
        p.proxy.reset()
        #expect(waitUntil { p.source.queryMigrate().recoveries >= 1 })
        p.expectCompleted()
        #expect(p.proxy.accepted >= 4)
        let f = p.destination.queryMigrate().faults
        #expect((f?.faults ?? 0) > 0)
    }

    @Test("a wrong peer on the recovery address (garbage, then a fresh migration stream) puts the destination back to paused; the real source then recovers")
    func wrongPeer() throws {
        let p = try ProxiedPair(autoRecover: false)
        try p.startPostcopy()
        #expect(p.bothActive())
        p.proxy.reset()
        #expect(p.bothPaused())
        let target = p.destination.queryMigrate().socketAddress!.description
        try p.destination.migrateRecover(uri: target)
        guard case let .tcp(_, port) = try MigrationURI(target) else { return }
        for (n, junk) in [[0xde, 0xad, 0xbe, 0xef, 1, 2, 3], [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]].enumerated() {
            let fd = connectLoopback(port: port)
            #expect(fd >= 0)
            let junk: [UInt8] = junk.map { UInt8($0) }
            _ = junk.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            #expect(waitUntil { p.destination.queryMigrate().postcopyPauses >= UInt64(2 + n) && p.destination.queryMigrate().status == .postcopyPaused })
            close(fd)
        }
        #expect(p.destination.queryMigrate().postcopyPauses >= 3, "each wrong peer is a failed recovery: back to paused")
        #expect(p.destination.queryMigrate().status == .postcopyPaused)
        try p.source.migrate(uri: p.proxy.uri, resume: true)
        p.expectCompleted()
    }

    @Test("a destination that fails at the postcopy switch-over before the package (a corrupted discard PING) never ran the guest: the source fails, its guest runs on, memory intact")
    func destinationFailsBeforePackage() throws {
        let p = try ProxiedPair()
        // The PING after the discards sent before the stop ("FDIS"): a framing byte flipped.
        p.proxy.on(.toDestination, pattern: [8, 0, 2, 0, 4] + Array("FDIS".utf8), .corrupt)
        try p.startPostcopy()
        #expect(p.destination.waitForMigration(seconds: scaled(20)) == .failed)
        // Found by the soak: the source's SHUT(1) → "never ran" had no transition before the
        // split, and the source stayed "active" with no migration thread left.
        #expect(p.source.waitForMigration(seconds: scaled(20)) == .failed, "source: \(p.source.queryMigrate().status)")
        #expect(p.proxy.fired == ["corrupt toDestination"])
        #expect(!p.sourceStatuses.values.contains { $0.isPostcopy })
        p.expectGuestStayedOnSource()
    }

    @Test("the link dies with the postcopy package in flight: the destination never ran the guest, so the source learns it on recovery and runs it again")
    func packageLost() throws {
        let p = try ProxiedPair()
        p.proxy.on(.toDestination, pattern: WirePoint.packaged, .reset)
        try p.startPostcopy()
        #expect(p.destination.waitForMigration(seconds: scaled(10)) == .failed)
        #expect(p.source.waitForMigration(seconds: scaled(20)) == .failed, "source: \(p.source.queryMigrate().status)")
        #expect(p.source.queryMigrate().postcopyPauses == 1, "the source paused first: it could not know")
        p.expectGuestStayedOnSource()
    }
}

import FerryMachine
import FerryMigration
import Testing

@Suite("postcopy", .serialized)
struct PostcopyTests {
    func postcopyPair(memory: Int = 64 << 20) throws -> Pair {
        let pair = try Pair(memory: memory)
        for h in [pair.source, pair.destination] { try h.setCapabilities([(.postcopyRAM, true)]) }
        return pair
    }

    @Test("postcopy right after setup: nearly every page arrives by fault or background push; memory is whole")
    func immediate() throws {
        let pair = try postcopyPair()
        let target = try pair.listen()
        pair.source.setParameters { $0.maxBandwidth = 5_000_000; $0.maxPostcopyBandwidth = 20_000_000 }
        let events = Recorder<MigrationEvent>()
        pair.source.subscribe { events.append($0) }
        try pair.source.migrate(uri: target)
        #expect(waitUntil { pair.source.queryMigrate().status == .active })
        try pair.source.startPostcopy()
        #expect(waitUntil { pair.destination.queryMigrate().status == .postcopyActive || pair.destination.queryMigrate().status == .completed })
        #expect(pair.source.waitForMigration(seconds: scaled(120)) == .completed, "\(pair.source.queryMigrate().errorDescription ?? "")")
        #expect(pair.destination.waitForMigration(seconds: scaled(20)) == .completed, "\(pair.destination.queryMigrate().errorDescription ?? "")")
        let statuses = events.values.compactMap { if case .status(let s) = $0 { s } else { nil } }
        #expect(statuses == [.setup, .active, .device, .postcopyDevice, .postcopyActive, .completed])
        #expect(pair.source.queryMigrate().switchover?.steps.map(\.name) == ["early-discards", "stop", "sync", "discards", "device-state", "package", "destination"])
        #expect(pair.destination.queryMigrate().switchover?.steps.map(\.name) == ["final-discards", "read", "listen", "device-state", "restore", "start"])
        #expect(pair.source.queryMigrate().postcopyRequests > 0, "the guest never faulted on a missing page")
        #expect(pair.source.runState == .postmigrate)
        pair.expectDestinationRunsCorrectly()
    }

    @Test("postcopy after some precopy passes at a limited rate completes with memory verified")
    func afterPrecopy() throws {
        let pair = try postcopyPair()
        let target = try pair.listen()
        pair.source.setParameters { $0.maxBandwidth = 50_000_000; $0.downtimeLimit = 1 }
        try pair.source.migrate(uri: target)
        #expect(waitUntil(seconds: 30) { pair.source.queryMigrate().dirtySyncCount >= 2 })
        try pair.source.startPostcopy()
        #expect(pair.source.waitForMigration(seconds: scaled(120)) == .completed, "\(pair.source.queryMigrate().errorDescription ?? "")")
        #expect(pair.destination.waitForMigration(seconds: scaled(20)) == .completed)
        pair.expectDestinationRunsCorrectly()
    }

    @Test("migrate_cancel is refused in postcopy; start-postcopy without the capability is refused")
    func refusals() throws {
        let plain = try Pair(memory: 16 << 20)
        let t = try plain.listen()
        plain.source.setParameters { $0.maxBandwidth = 1_000_000 }
        try plain.source.migrate(uri: t)
        #expect(throws: MigrationError.self) { try plain.source.startPostcopy() }
        try plain.source.cancel()

        let pair = try postcopyPair(memory: 32 << 20)
        let target = try pair.listen()
        pair.source.setParameters { $0.maxBandwidth = 2_000_000; $0.maxPostcopyBandwidth = 2_000_000 }
        try pair.source.migrate(uri: target)
        try pair.source.startPostcopy()
        #expect(waitUntil { pair.source.queryMigrate().status == .postcopyActive })
        #expect(throws: MigrationError.self) { try pair.source.cancel() }
        pair.source.setParameters { $0.maxPostcopyBandwidth = 0 }
        #expect(pair.source.waitForMigration(seconds: scaled(120)) == .completed)
        pair.expectDestinationRunsCorrectly()
    }

    @Test("the destination guest is stopped while postcopy pages still arrive; the migration completes and the guest continues")
    func stoppedDestination() throws {
        let pair = try postcopyPair()
        let target = try pair.listen()
        pair.source.setParameters { $0.maxBandwidth = 5_000_000; $0.maxPostcopyBandwidth = 30_000_000 }
        try pair.source.migrate(uri: target)
        #expect(waitUntil { pair.source.queryMigrate().status == .active })
        try pair.source.startPostcopy()
        #expect(waitUntil { pair.destination.queryMigrate().status == .postcopyActive })
        pair.destination.stop()
        #expect(pair.destination.runState == .paused)
        // The destination can enter postcopy-active (at RUN) a moment before the source
        // does (after flushing the package); either way the stream is not finished yet.
        #expect(waitUntil { pair.source.queryMigrate().status == .postcopyActive }, "the test wants pages still in flight while stopped")
        #expect(pair.source.waitForMigration(seconds: scaled(120)) == .completed)
        #expect(pair.destination.waitForMigration(seconds: scaled(20)) == .completed)
        #expect(pair.destination.runState == .paused, "completing postcopy must not restart a stopped guest")
        try pair.destination.cont()
        pair.expectDestinationRunsCorrectly()
    }

    @Test("a precopy that does not converge switches to postcopy by itself (postcopy-auto-switch-passes) and completes")
    func autoSwitch() throws {
        let pair = try postcopyPair()
        for h in [pair.source, pair.destination] { try h.setCapabilities([(.postcopyBlocktime, true)]) }
        let target = try pair.listen()
        // 20 MB/s against a guest that dirties all 64 MiB in well under a second: never converges.
        pair.source.setParameters { $0.maxBandwidth = 20_000_000; $0.maxPostcopyBandwidth = 20_000_000; $0.postcopyAutoSwitchPasses = 1 }
        try pair.source.migrate(uri: target)
        #expect(pair.source.waitForMigration(seconds: scaled(120)) == .completed, "\(pair.source.queryMigrate().errorDescription ?? "")")
        #expect(pair.destination.waitForMigration(seconds: scaled(20)) == .completed)
        let s = pair.source.queryMigrate()
        #expect(s.autoSwitched)
        // Setup, the pass that decided, and the switch-over's two syncs (before the early
        // discards, and after the stop).
        #expect(s.dirtySyncCount >= 1 && s.dirtySyncCount <= 4, "switched after \(s.dirtySyncCount) passes")
        #expect(s.postcopyRequests > 0)
        let f = try #require(pair.destination.queryMigrate().faults, "postcopy-blocktime is on: the destination reports fault metrics")
        #expect(f.faults > 0 && f.p50Us > 0 && f.p99Us >= f.p50Us && f.maxUs >= f.p99Us)
        #expect(f.vcpuFaults > 0, "the vCPU thread's faults are attributed to it")
        #expect(f.distribution.reduce(0, +) == UInt64(f.faults))
        pair.expectDestinationRunsCorrectly()
    }
}

import FerryMachine
import FerryMemory
import FerryMigration
import FerrySys
import FerryWire
import Glibc
import Testing

/// A source VM running the test guest and a destination waiting for it, in this process,
/// joined by a real socket.
struct Pair {
    let source: VMHost
    let destination: VMHost
    let lifetime: StopsOnRelease

    /// What the guest's pages hold (the memory check verifies it).
    let contents: TestGuestContents

    init(memory: Int = 64 << 20, vcpus: Int = testVCPUs, contents: TestGuestContents = .zero) throws {
        source = try VMHost.forTest(memory: memory, vcpus: vcpus, incoming: false)
        destination = try VMHost.forTest(memory: memory, vcpus: vcpus, incoming: true)
        lifetime = StopsOnRelease([source, destination])
        self.contents = contents
        try source.boot(image: nil, contents: contents)
        #expect(waitForPasses(source.machine, 2))
    }

    /// Starts the destination on `uri` (port 0 picks a free one) and returns the address the source should use.
    func listen(_ uri: String = "tcp:127.0.0.1:0") throws -> String {
        try destination.migrateIncoming(uri: uri)
        return destination.queryMigrate().socketAddress!.description
    }

    func expectDestinationRunsCorrectly() {
        #expect(destination.runState == .running)
        #expect(waitForPasses(destination.machine, 2), "the destination guest is not counting")
        destination.machine.pause()
        let report = checkMemory(destination.machine, contents: contents)
        #expect(report.passed, "\(report)")
    }
}

@Suite("precopy", .serialized)
struct PrecopyTests {
    @Test("precopy over tcp completes; the destination guest keeps counting and passes the memory check",
          arguments: ["tcp:127.0.0.1:0", "unix:/tmp/ferry-test-precopy.sock"])
    func precopy(uri: String) throws {
        let pair = try Pair()
        let target = try pair.listen(uri)
        pair.source.setParameters { $0.maxBandwidth = 0 }
        let events = Recorder<MigrationEvent>()
        // A slow subscriber: a waiter returns only once the last MIGRATION event went out
        // (it once returned on query-migrate's status alone, and the event came after).
        pair.source.subscribe { e in
            if e == .status(.completed) { usleep(200_000) }
            events.append(e)
        }
        try pair.source.migrate(uri: target)
        #expect(pair.source.waitForMigration(seconds: scaled(60)) == .completed, "\(pair.source.queryMigrate().errorDescription ?? "")")
        #expect(pair.destination.waitForMigration(seconds: scaled(10)) == .completed, "\(pair.destination.queryMigrate().errorDescription ?? "")")
        let stats = pair.source.queryMigrate()
        #expect(stats.downtimeMs != nil)
        #expect(stats.transferred > 0)
        #expect(pair.source.runState == .postmigrate)
        let statuses = events.values.compactMap { if case .status(let s) = $0 { s } else { nil } }
        #expect(statuses == [.setup, .active, .device, .completed])
        #expect(events.values.contains(.stop))
        // QEMU's counting: the sync at setup is pass 1, each later sync (the switch-over's
        // too) one more, and dirty-sync-count says how many there were.
        let passes = events.values.compactMap { if case .pass(let n) = $0 { n } else { nil } }
        #expect(passes.first == 1 && passes == Array(1...max(1, passes.count)), "\(passes)")
        #expect(passes.count >= 2 && UInt64(passes.count) == stats.dirtySyncCount, "\(passes), dirty-sync-count \(stats.dirtySyncCount)")
        // The switch-over's timeline: every step (the first, the destination catching up,
        // with the guest running); after the stop, they add up to the downtime.
        let steps = stats.switchover?.steps ?? []
        #expect(steps.map(\.name) == ["caught-up", "stop", "sync", "ram", "device-state", "destination"])
        let afterStop = steps.dropFirst(2).reduce(0) { $0 + $1.micros }
        #expect(afterStop / 1000 <= (stats.downtimeMs ?? 0) + 1 && afterStop / 1000 + 1 >= (stats.downtimeMs ?? 0), "\(steps), downtime \(stats.downtimeMs ?? 0) ms")
        #expect(pair.destination.queryMigrate().switchover?.steps.map(\.name) == ["ram", "device-state", "restore", "start"])
        pair.expectDestinationRunsCorrectly()
    }

    @Test("precopy through exec: and file: transports")
    func execAndFile() throws {
        // exec: the source pipes into socat, which serves the destination's unix socket.
        let pair = try Pair()
        _ = try pair.listen("unix:/tmp/ferry-test-exec.sock")
        // About the transports, not convergence: a loaded machine must not make it flaky.
        pair.source.setParameters { $0.maxBandwidth = 0; $0.downtimeLimit = 5000 }
        try pair.source.migrate(uri: "exec:socat -u STDIN UNIX-CONNECT:/tmp/ferry-test-exec.sock")
        #expect(pair.source.waitForMigration(seconds: scaled(60)) == .completed, "\(pair.source.queryMigrate().errorDescription ?? "")")
        #expect(pair.destination.waitForMigration(seconds: scaled(10)) == .completed, "\(pair.destination.queryMigrate().errorDescription ?? "")")
        pair.expectDestinationRunsCorrectly()

        // file: save, then load into a fresh VM through exec:cat.
        let path = "/tmp/ferry-test-\(getpid()).mig"
        defer { unlink(path) }
        let saver = try Pair()
        saver.source.setParameters { $0.maxBandwidth = 0; $0.downtimeLimit = 5000 }
        try saver.source.migrate(uri: "file:\(path)")
        #expect(saver.source.waitForMigration(seconds: scaled(60)) == .completed, "\(saver.source.queryMigrate().errorDescription ?? "")")
        try saver.destination.migrateIncoming(uri: "exec:cat \(path)")
        #expect(saver.destination.waitForMigration(seconds: scaled(30)) == .completed, "\(saver.destination.queryMigrate().errorDescription ?? "")")
        saver.expectDestinationRunsCorrectly()
    }

    @Test("a rate-limited migration of a fast-dirtying guest does not converge; cancel leaves the source running and intact")
    func nonConvergingCancel() throws {
        let pair = try Pair(memory: 64 << 20)
        let target = try pair.listen()
        pair.source.setParameters { $0.maxBandwidth = 20_000_000; $0.downtimeLimit = 10 }
        try pair.source.migrate(uri: target)
        #expect(waitUntil(seconds: 30) { pair.source.queryMigrate().dirtySyncCount >= 3 })
        let s = pair.source.queryMigrate()
        #expect(s.status == .active)
        // A guest starved of CPU (a sanitizer, a loaded host) may dirty nothing for a moment.
        #expect(waitUntil(seconds: scaled(10)) { pair.source.queryMigrate().remaining > 0 })
        #expect(s.dirtyPagesRate > 0)
        try pair.source.cancel()
        #expect(pair.source.waitForMigration(seconds: scaled(10)) == .cancelled)
        #expect(pair.source.runState == .running)
        #expect(waitForPasses(pair.source.machine, 2), "the source guest must keep running")
        pair.source.machine.pause()
        #expect(checkMemory(pair.source.machine).passed)
        #expect(pair.destination.waitForMigration(seconds: scaled(10)) == .failed)
        #expect(pair.destination.runState == .inmigrate)
    }

    @Test("a destination that is not there fails the migration and the source keeps running")
    func connectFailure() throws {
        let pair = try Pair(memory: 16 << 20)
        try pair.source.migrate(uri: "tcp:127.0.0.1:1")
        #expect(pair.source.waitForMigration(seconds: scaled(10)) == .failed)
        #expect(pair.source.queryMigrate().errorDescription?.contains("connect") == true)
        #expect(pair.source.runState == .running)
        #expect(waitForPasses(pair.source.machine, 1))
    }

    @Test("bad URIs are refused with a clear error", arguments: ["tcp:nohost", "foo:bar", "unix:", "tcp:1.2.3.4:99999", "nonsense"])
    func badURI(uri: String) throws {
        let host = try VMHost.forTest(memory: 4 << 20, incoming: false)
        defer { stopInBackground([host]) }
        try host.boot(image: nil)
        #expect(throws: MigrationError.self) { try host.migrate(uri: uri) }
        #expect(host.runState == .running)
    }
}

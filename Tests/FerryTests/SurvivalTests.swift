import FerryHarness
import FerryMachine
@testable import FerryMigration
import FerrySys
import Foundation
import Glibc
import Testing

/// Issue 12's defects that show inside one process: engines, sockets and the fault proxy
/// are real; the VMs are in-process `VMHost`s.
@Suite("a VM survives its clients and operators", .serialized)
struct SurvivalTests {
    @Test("the fault tracker's clocks are read under its lock: reports polled while faults are recorded never underflow")
    func trackerClockRace() {
        let tracker = PostcopyFaultTracker()
        let stop = Recorder<Bool>()
        let recorder = Thread {
            var page = 0
            while stop.values.isEmpty {
                tracker.faulted(page: page, vcpu: 0)
                tracker.installed(page: page)
                page = (page + 1) & 0xffff
            }
        }
        recorder.start()
        let pollers = (0..<2).map { _ in Thread { while stop.values.isEmpty { _ = tracker.report() } } }
        pollers.forEach { $0.start() }
        usleep(1_500_000)
        stop.append(true)
        usleep(100_000)
        let r = tracker.report()
        #expect(r.faults > 1000)
        #expect(r.blocktimeMs < 60_000, "blocked time \(r.blocktimeMs) ms: an underflow wrapped")
    }

    @Test("query-migrate polled from several threads through whole postcopy migrations never crashes the destination")
    func pollDuringPostcopy() throws {
        for _ in 0..<2 {
            let pair = try Pair()
            for h in [pair.source, pair.destination] { try h.setCapabilities([(.postcopyRAM, true), (.postcopyBlocktime, true)]) }
            let target = try pair.listen()
            pair.source.setParameters { $0.maxBandwidth = 5_000_000; $0.maxPostcopyBandwidth = 40_000_000 }
            let done = Recorder<Bool>()
            let polls = Recorder<Int>()
            let pollers = (0..<3).map { _ in
                Thread {
                    var n = 0
                    while done.values.isEmpty { _ = pair.destination.queryMigrate(); _ = pair.source.queryMigrate(); n += 1 }
                    polls.append(n)
                }
            }
            pollers.forEach { $0.start() }
            try pair.source.migrate(uri: target)
            #expect(waitUntil { pair.source.queryMigrate().status == .active })
            try pair.source.startPostcopy()
            #expect(pair.source.waitForMigration(seconds: scaled(120)) == .completed)
            #expect(pair.destination.waitForMigration(seconds: scaled(20)) == .completed)
            done.append(true)
            #expect(waitUntil { polls.values.count == 3 })
            #expect(polls.values.allSatisfy { $0 > 100 })
            #expect((pair.destination.queryMigrate().faults?.faults ?? 0) > 0)
            pair.expectDestinationRunsCorrectly()
        }
    }

    @Test("stop on a postcopy-paused destination never reports paused while the vCPU runs: it stays pending and completes when the page arrives")
    func honestStop() throws {
        let p = try ProxiedPair(autoRecover: false)
        try p.startPostcopy(postcopyBandwidth: 4_000_000)
        #expect(p.bothActive())
        usleep(200_000)
        p.proxy.reset()
        #expect(p.bothPaused(seconds: 5))
        let stops = Recorder<MigrationEvent>()
        p.destination.subscribe { if $0 == .stop { stops.append($0) } }
        // The guest walks its memory: while paused it soon waits for a page it lacks.
        usleep(300_000)
        // Paused 300 ms into a slow postcopy, the walking guest waits for a page it lacks.
        #expect(p.destination.stop() == .pending)
        #expect(p.destination.runState == .running, "reported paused while the vCPU still runs")
        #expect(stops.values.isEmpty)
        let target = p.destination.queryMigrate().socketAddress!.description
        try p.destination.migrateRecover(uri: target)
        // A second migrate-recover does not silently replace the first.
        #expect(throws: MigrationError.self) { try p.destination.migrateRecover(uri: "tcp:127.0.0.1:0") }
        try p.source.migrate(uri: p.proxy.uri, resume: true)
        #expect(waitUntil { p.destination.runState == .paused }, "the pending stop never completed")
        #expect(stops.values.count == 1)
        p.source.setParameters { $0.maxPostcopyBandwidth = 30_000_000 } // the in-process proxy relays it
        let s = p.source.waitForMigration(seconds: scaled(60)), d = p.destination.waitForMigration(seconds: scaled(20))
        // (A memory check reads every page: only safe once all are here.)
        try #require(s == .completed && d == .completed, "\(s) / \(d): \(p.source.queryMigrate().errorDescription ?? "") / \(p.destination.queryMigrate().errorDescription ?? "")")
        // Paused means paused: no output, and the memory is a consistent snapshot.
        let printed = p.destination.machine.serial.bytesWritten
        usleep(300_000)
        #expect(p.destination.machine.serial.bytesWritten == printed, "the guest ran while reported paused")
        let report = checkMemory(p.destination.machine)
        #expect(report.passed, "\(report)")
        try p.destination.cont()
        #expect(waitForPasses(p.destination.machine, 2))
    }

    @Test("migrate_cancel ends a blocked exec: or file: (FIFO) migration at once and kills the command")
    func cancelBlocked() throws {
        let dir = "/tmp/ferry-cancel-\(getpid())"
        mkdir(dir, 0o700)
        let fifo = "\(dir)/fifo"
        unlink(fifo)
        #expect(mkfifo(fifo, 0o600) == 0)
        // A FIFO nobody reads from, one whose reader never reads, a command that never reads.
        var reader: Int32 = -1
        for (n, uri) in ["file:\(fifo)", "file:\(fifo)", "exec:sleep 61.25"].enumerated() {
            if n == 1 { reader = open(fifo, O_RDONLY | O_NONBLOCK) }
            let host = try VMHost.forTest(memory: 32 << 20, incoming: false)
            defer { stopInBackground([host]) }
            try host.boot(image: nil)
            host.setParameters { $0.maxBandwidth = 0 }
            try host.migrate(uri: uri)
            usleep(500_000)
            #expect(!host.queryMigrate().status.isFinished, "\(uri): \(host.queryMigrate().status)")
            let start = Sys.monotonicNanos()
            try host.cancel()
            #expect(host.waitForMigration(seconds: scaled(5)) == .cancelled, "\(uri)")
            #expect(Double(Sys.monotonicNanos() - start) / 1e9 < 3, "\(uri): cancel took too long")
            #expect(host.runState == .running)
            // A new migration is accepted again.
            try host.migrate(uri: "exec:cat > /dev/null")
            #expect(host.waitForMigration(seconds: scaled(60)) == .completed)
            try host.cont(force: true)
            host.stop()
        }
        if reader >= 0 { close(reader) }
        #expect(waitUntil(seconds: 3) { !sleepersExist("61.25") }, "the exec: command survived the cancel")
    }

    @Test("a cancel between the postcopy package and the hand-over is refused; the status never freezes at cancelling")
    func cancelAfterPackage() throws {
        let pair = try Pair()
        for h in [pair.source, pair.destination] { try h.setCapabilities([(.postcopyRAM, true)]) }
        let target = try pair.listen()
        pair.source.setParameters { $0.maxBandwidth = 5_000_000; $0.maxPostcopyBandwidth = 20_000_000 }
        try pair.source.migrate(uri: target)
        #expect(waitUntil { pair.source.queryMigrate().status == .active })
        try pair.source.startPostcopy()
        // Hammer cancel through the switch-over: every answer is either accepted before the
        // package (then the migration ends cancelled) or refused after it.
        var refused = 0, accepted = 0
        while !pair.source.queryMigrate().status.isFinished && pair.source.queryMigrate().status != .postcopyActive {
            do { try pair.source.cancel(); accepted += 1 } catch { refused += 1 }
        }
        let end = pair.source.waitForMigration(seconds: scaled(120))
        #expect(end == .completed || end == .cancelled, "\(end)")
        #expect(pair.source.queryMigrate().status != .cancelling)
        if end == .cancelled { #expect(pair.source.runState == .running) } else { pair.expectDestinationRunsCorrectly() }
    }

    @Test("cancel at the exact points of the postcopy switch-over: accepted while the guest is stopped and no package is built (the guest runs here again), refused once the package went out (the migration completes, the status never freezes, the next migration works)",
          arguments: [SwitchoverPoint.postcopyStopped, .packageFlushed])
    func cancelAtSwitchoverPoint(point: SwitchoverPoint) throws {
        let pair = try Pair()
        for h in [pair.source, pair.destination] { try h.setCapabilities([(.postcopyRAM, true)]) }
        let target = try pair.listen()
        pair.source.setParameters { $0.maxBandwidth = 5_000_000 }
        let answers = Recorder<String>()
        pair.source.switchoverHook = { [source = pair.source] reached in
            guard reached == point else { return }
            do { try source.cancel(); answers.append("accepted") } catch { answers.append("refused: \(error)") }
        }
        let statuses = Recorder<MigrationStatus>()
        pair.source.subscribe { if case .status(let s) = $0 { statuses.append(s) } }
        try pair.source.migrate(uri: target)
        #expect(waitUntil { pair.source.queryMigrate().status == .active })
        try pair.source.startPostcopy()
        let end = pair.source.waitForMigration(seconds: scaled(120))
        #expect(answers.values.count == 1, "the hook ran \(answers.values.count) times")
        if point == .postcopyStopped {
            #expect(answers.values.first == "accepted")
            #expect(end == .cancelled)
            #expect(statuses.values.suffix(2) == [.cancelling, .cancelled], "\(statuses.values)")
            #expect(pair.source.runState == .running)
            #expect(waitForPasses(pair.source.machine, 2), "the source guest does not run after the cancel")
            return
        }
        #expect(answers.values.first?.hasPrefix("refused: Postcopy migration in progress") == true, "\(answers.values)")
        #expect(end == .completed)
        #expect(!statuses.values.contains(.cancelling), "\(statuses.values)")
        #expect(pair.destination.waitForMigration(seconds: scaled(30)) == .completed)
        pair.expectDestinationRunsCorrectly()
        pair.destination.machine.resume()
        // Nothing stayed frozen: the guest moves on again, from its new host to a third one
        // (stopped, so the hop does not depend on convergence speed under load).
        #expect(pair.destination.stop() == .stopped)
        let third = try VMHost.forTest(memory: 64 << 20, incoming: true)
        defer { stopInBackground([third]) }
        try third.migrateIncoming(uri: "tcp:127.0.0.1:0")
        pair.destination.setParameters { $0.maxBandwidth = 0 }
        try pair.destination.setCapabilities([(.postcopyRAM, false)])
        try pair.destination.migrate(uri: third.queryMigrate().socketAddress!.description)
        #expect(pair.destination.waitForMigration(seconds: scaled(60)) == .completed, "\(pair.destination.queryMigrate().errorDescription ?? "")")
        #expect(third.waitForMigration(seconds: scaled(20)) == .completed)
    }

    @Test("a stray connection (connect+close, garbage) does not ruin a waiting destination; the real source then migrates")
    func strayConnections() throws {
        let pair = try Pair(memory: 32 << 20)
        let target = try pair.listen()
        guard case let .tcp(_, port) = try MigrationURI(target) else { return }
        for junk in [[UInt8](), [0x47, 0x45, 0x54, 0x20, 0x2f, 0x20], [0x51, 0x45]] {
            let fd = connectLoopback(port: port)
            #expect(fd >= 0)
            _ = junk.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            close(fd)
        }
        usleep(300_000)
        #expect(pair.destination.queryMigrate().status == .setup)
        #expect(pair.destination.queryMigrate().errorDescription?.contains("ignored a connection") == true)
        try pair.source.migrate(uri: target)
        #expect(pair.source.waitForMigration(seconds: scaled(60)) == .completed, "\(pair.source.queryMigrate().errorDescription ?? "")")
        pair.expectDestinationRunsCorrectly()
    }

    @Test("cont after a completed precopy is refused (one guest, one host) unless forced")
    func contAfterCompletion() throws {
        let pair = try Pair(memory: 32 << 20)
        let target = try pair.listen()
        try pair.source.migrate(uri: target)
        #expect(pair.source.waitForMigration(seconds: scaled(60)) == .completed)
        #expect(throws: MigrationError.self) { try pair.source.cont() }
        #expect(pair.source.runState == .postmigrate)
        try pair.source.cont(force: true)
        #expect(pair.source.runState == .running)
    }

    @Test("capabilities can be set on a destination that only listens; a mismatch is reported on the source with the real reason")
    func capabilitiesWhileListening() throws {
        let pair = try Pair(memory: 32 << 20)
        let target = try pair.listen()
        try pair.destination.setCapabilities([(.postcopyRAM, true)])
        try pair.source.setCapabilities([(.postcopyRAM, true)])
        pair.source.setParameters { $0.maxBandwidth = 5_000_000 }
        try pair.source.migrate(uri: target)
        // Once the destination took the stream (active there), its capabilities are fixed.
        #expect(waitUntil { pair.destination.queryMigrate().status == .active })
        #expect(throws: MigrationError.self) { try pair.destination.setCapabilities([(.postcopyRAM, false)]) }
        try pair.source.startPostcopy()
        pair.source.setParameters { $0.maxPostcopyBandwidth = 0 }
        #expect(pair.source.waitForMigration(seconds: scaled(60)) == .completed)
        pair.expectDestinationRunsCorrectly()

        let mismatch = try Pair(memory: 32 << 20)
        let t2 = try mismatch.listen()
        try mismatch.source.setCapabilities([(.postcopyRAM, true)])
        try mismatch.source.migrate(uri: t2)
        #expect(mismatch.source.waitForMigration(seconds: scaled(20)) == .failed)
        let why = mismatch.source.queryMigrate().errorDescription ?? ""
        #expect(why.contains("postcopy-ram is off on the destination"), "\(why)")
        #expect(mismatch.source.runState == .running)
    }

    @Test("a low max-bandwidth is honoured (100 kB/s sends about 100 kB a second)")
    func lowBandwidth() throws {
        let pair = try Pair(memory: 32 << 20)
        let target = try pair.listen()
        pair.source.setParameters { $0.maxBandwidth = 100_000 }
        try pair.source.migrate(uri: target)
        #expect(waitUntil { pair.source.queryMigrate().status == .active })
        let t0 = Sys.monotonicNanos(), b0 = pair.source.queryMigrate().transferred
        usleep(3_000_000)
        let rate = Double(pair.source.queryMigrate().transferred - b0) / (Double(Sys.monotonicNanos() - t0) / 1e9)
        #expect(rate < 130_000 && rate > 50_000, "\(Int(rate)) B/s at a 100000 B/s limit")
        try pair.source.cancel()
        #expect(pair.source.waitForMigration(seconds: scaled(10)) == .cancelled)
    }

    @Test("a file: migration that runs out of disk fails and leaves no partial file")
    func fileOutOfSpace() throws {
        #expect(getuid() == 0, "mounting a small tmpfs needs root (CI runs as root)")
        let dir = "/tmp/ferry-enospc-\(getpid())"
        mkdir(dir, 0o700)
        #expect(mount("tmpfs", dir, "tmpfs", 0, "size=1m") == 0, "mount: \(String(cString: strerror(errno)))")
        defer { umount(dir); rmdir(dir) }
        let host = try VMHost.forTest(memory: 32 << 20, incoming: false)
        defer { stopInBackground([host]) }
        try host.boot(image: nil)
        #expect(waitForPasses(host.machine, 1))
        host.setParameters { $0.maxBandwidth = 0 }
        try host.migrate(uri: "file:\(dir)/vm.stream")
        #expect(host.waitForMigration(seconds: scaled(30)) == .failed)
        #expect(host.queryMigrate().errorDescription?.contains("No space") == true, "\(host.queryMigrate().errorDescription ?? "")")
        #expect(access("\(dir)/vm.stream", F_OK) != 0, "the partial stream was left behind")
        #expect(host.runState == .running)
    }

    @Test("migrating a VM that is already stopped sends no second STOP, and it stays stopped if the migration fails")
    func stoppedVM() throws {
        let pair = try Pair(memory: 32 << 20)
        let events = Recorder<MigrationEvent>()
        pair.source.subscribe { if $0 == .stop || $0 == .resume { events.append($0) } }
        pair.source.stop()
        let target = try pair.listen()
        try pair.source.migrate(uri: target)
        #expect(pair.source.waitForMigration(seconds: scaled(60)) == .completed)
        #expect(events.values == [.stop])

        let failing = try Pair(memory: 32 << 20)
        failing.source.stop()
        let t2 = try failing.listen()
        let proxy = try FaultProxy(upstream: { if case let .tcp(_, p) = try MigrationURI(t2) { return p }; return 0 }())
        proxy.on(.toDestination, pattern: WirePoint.cpuSection, .reset) // at the switch-over
        try failing.source.migrate(uri: proxy.uri)
        #expect(failing.source.waitForMigration(seconds: scaled(30)) == .failed)
        #expect(failing.source.runState == .paused, "a VM stopped before the migration must stay stopped")
    }
}

import ArgumentParser
import FerryMachine
import FerryMemory
import FerryQMP
import FerrySys
import Foundation
import Glibc

/// Starts `ferry run` children for source and destination on this machine and migrates.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Migrate a running guest between two ferry processes on this machine and verify its memory.")

    @Option(help: "Guest RAM size.")
    var memory: ByteSize = ByteSize(argument: "512M")!

    @Option(help: "Bandwidth limit in bytes/s (0 = unlimited).")
    var maxBandwidth: UInt64 = 0

    @Option(help: "Transport: tcp or unix.")
    var transport: String = "tcp"

    func run() throws {
        let dir = "/tmp/ferry-demo-\(getpid())"
        mkdir(dir, 0o700)
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        let mem = String(memory.bytes)
        print("Ferry demo: \(memory.bytes >> 20) MiB guest, source and destination are separate ferry processes; files in \(dir)")
        let src = try spawn(exe, ["run", "--memory", mem, "--qmp", "\(dir)/src.qmp", "--serial", "\(dir)/src-serial.log"])
        let dst = try spawn(exe, ["run", "--memory", mem, "--qmp", "\(dir)/dst.qmp", "--serial", "\(dir)/dst-serial.log", "--incoming", "defer"])
        defer { kill(src, SIGTERM); kill(dst, SIGTERM); var st: Int32 = 0; waitpid(src, &st, 0); waitpid(dst, &st, 0) }
        do {
            let s = try QMPClient(path: "\(dir)/src.qmp"), d = try QMPClient(path: "\(dir)/dst.qmp")
            for c in [s, d] { try c.execute("migrate-set-capabilities", ["capabilities": [["capability": "events", "state": true]]]) }
            // Let the guest dirty its memory for a couple of passes first.
            waitFor(seconds: 30) { fileSize("\(dir)/src-serial.log") >= 3 }
            print("source guest serial so far: \(serialSummary("\(dir)/src-serial.log"))")
            let incoming = transport == "unix" ? "unix:\(dir)/migrate.sock" : "tcp:127.0.0.1:0"
            try d.execute("migrate-incoming", ["uri": incoming])
            let q = try d.execute("query-migrate") as? [String: Any] ?? [:]
            var target = incoming
            if let addr = (q["socket-address"] as? [[String: Any]])?.first, addr["type"] as? String == "inet" {
                target = "tcp:\(addr["host"]!):\(addr["port"]!)"
            }
            try s.execute("migrate-set-parameters", ["max-bandwidth": maxBandwidth])
            print("migrating to \(target) ...")
            try s.execute("migrate", ["uri": target])
            let info = try followMigration(s, label: "source: ")
            printSummary(info)
            guard info["status"] as? String == "completed" else { throw ExitCode(1) }
            let before = fileSize("\(dir)/dst-serial.log")
            let t0 = Sys.monotonicNanos()
            waitFor(seconds: 30) { fileSize("\(dir)/dst-serial.log") >= before + 2 }
            let after = fileSize("\(dir)/dst-serial.log")
            print("destination guest printed \(after - before) B in \((Sys.monotonicNanos() - t0) / 1_000_000) ms after switchover (serial: \(serialSummary("\(dir)/dst-serial.log")))")
            let status = try d.execute("query-status") as? [String: Any] ?? [:]
            print("destination run state: \(status["status"] ?? "?"); source: \((try s.execute("query-status") as? [String: Any])?["status"] ?? "?")")
            try d.execute("stop")
            try d.execute("pmemsave", ["val": 0, "size": memory.bytes, "filename": "\(dir)/dst-ram.bin"])
            let ram = try readFile("\(dir)/dst-ram.bin")
            let report = ram.withUnsafeBytes { MemoryChecker(top: UInt64(TestGuest.top(forMemory: memory.bytes))).check($0) }
            print("destination \(report)")
            unlink("\(dir)/dst-ram.bin")
            if !report.passed || after <= before { throw ExitCode(1) }
            print("demo OK")
        } catch let e as QMPError {
            fail(e.desc)
        }
    }

    func waitFor(seconds: Double, _ cond: () -> Bool) {
        let end = Sys.monotonicNanos() + UInt64(seconds * 1e9)
        while !cond() && Sys.monotonicNanos() < end { usleep(20_000) }
    }

    func fileSize(_ path: String) -> Int {
        var st = stat()
        return stat(path, &st) == 0 ? Int(st.st_size) : 0
    }

    func serialSummary(_ path: String) -> String {
        let b = (try? readFile(path)) ?? []
        return "\(b.count) bytes, starts \"\(String(decoding: b.prefix(8), as: UTF8.self))\""
    }
}

func spawn(_ exe: String, _ args: [String]) throws -> pid_t {
    var pid: pid_t = 0
    var cargs = ([exe] + args).map { strdup($0) } + [nil]
    defer { for p in cargs { free(p) } }
    // The child must see SIGINT/SIGTERM again (we block them for sigwait).
    var attr = posix_spawnattr_t()
    posix_spawnattr_init(&attr)
    var empty = sigset_t()
    sigemptyset(&empty)
    posix_spawnattr_setsigmask(&attr, &empty)
    posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK))
    defer { posix_spawnattr_destroy(&attr) }
    let r = posix_spawn(&pid, exe, nil, &attr, &cargs, environ)
    guard r == 0 else { throw SysError(errno: r, call: "posix_spawn(\(exe))") }
    return pid
}

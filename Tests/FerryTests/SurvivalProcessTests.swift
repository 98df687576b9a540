import FerryHarness
import FerryQMP
import FerrySys
import Foundation
import Glibc
import Testing

/// A `ferry` child process with its stderr in a file: the issue-12 defects that only a real
/// process shows (signals, exit codes, sockets on disk).
final class FerryChild {
    let pid: pid_t
    let stderrPath: String
    private var reaped: Int32?

    /// Runs `ferry ARGS` (through `sh -c` when `shellSuffix` is given, e.g. "| head -c 10").
    init(_ args: [String], shellSuffix: String? = nil) throws {
        stderrPath = "/tmp/ferry-child-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).err"
        let quoted = ([Paths.ferry] + args).map { "'\($0.replacingOccurrences(of: "'", with: "'\\''"))'" }.joined(separator: " ")
        let command = (shellSuffix.map { "\(quoted) \($0)" } ?? "exec \(quoted)") + " 2> \(stderrPath)"
        pid = try spawn("/bin/sh", ["-c", command])
    }

    deinit {
        if reaped == nil { kill(pid, SIGKILL); var st: Int32 = 0; waitpid(pid, &st, 0) }
        unlink(stderrPath)
    }

    var alive: Bool {
        if reaped != nil { return false }
        var st: Int32 = 0
        if waitpid(pid, &st, WNOHANG) == pid { reaped = st; return false }
        return true
    }

    /// Waits for the process to exit; its raw wait status, or nil after `seconds`.
    func waitExit(seconds: Double) -> Int32? {
        _ = waitUntil(seconds: seconds) { !alive }
        return reaped
    }

    var stderr: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }

    static func exitCode(_ status: Int32) -> Int32? { status & 0x7f == 0 ? (status >> 8) & 0xff : nil }
    static func signal(_ status: Int32) -> Int32? { status & 0x7f != 0 ? status & 0x7f : nil }
}

/// Resident set size (KiB) and number of memory mappings of a process.
func memoryFootprint(_ pid: pid_t) -> (rssKiB: Int, mappings: Int) {
    let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
    let rss = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") }
        .flatMap { Int($0.split(separator: " ", omittingEmptySubsequences: true)[1]) } ?? 0
    let maps = (try? String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8))?.split(separator: "\n").count ?? 0
    return (rss, maps)
}

/// Whether a `sleep SECONDS` process (an exec: migration's command) exists.
func sleepersExist(_ seconds: String) -> Bool {
    for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
        guard let pid = pid_t(entry), let cmd = try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8) else { continue }
        if cmd.contains("sleep\u{0}\(seconds)") || cmd.contains("sleep \(seconds)"), !processEnded(pid) { return true }
    }
    return false
}

/// True once `pid` has exited (a zombie not yet reaped counts as ended).
func processEnded(_ pid: pid_t) -> Bool {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return true }
    return stat.contains(") Z ") || stat.contains(") X ")
}

/// One QMP connection that sends `text` (if any) and closes, reading nothing.
func connectSendClose(_ path: String, _ text: String?) {
    guard let fd = try? UnixSocket.connect(path) else { return }
    if let text { _ = Array(text.utf8).withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } }
    close(fd)
}

/// A healthy client gets an answer: the process still serves QMP.
func qmpAnswers(_ path: String) -> Bool {
    guard let c = try? RawQMP(path), c.negotiate() else { return false }
    c.send(#"{"execute":"query-status"}"#)
    return c.waitFor(#""status""#)
}

@Suite("a VM survives its clients and operators (processes)", .serialized)
struct SurvivalProcessTests {
    let dir = "/tmp/ferry-survival-\(getpid())"
    init() { mkdir(dir, 0o700) }

    @Test("a QMP client that disconnects before reading, or a pipe reader that goes away, never kills the VM (was SIGPIPE)")
    func sigpipe() throws {
        for incoming in [false, true] {
            let sock = "\(dir)/pipe-\(incoming).qmp"
            let vm = try FerryChild(["run", "--memory", "32M", "--serial", "none", "--qmp", sock] + (incoming ? ["--incoming", "tcp:127.0.0.1:0"] : []))
            #expect(waitUntil { qmpAnswers(sock) })
            for i in 0..<300 {
                // Half send commands and leave before the reply; half connect and close.
                connectSendClose(sock, i % 2 == 0 ? #"{"execute":"qmp_capabilities"}{"execute":"query-migrate-capabilities"}"# : nil)
            }
            #expect(vm.alive, "ferry died: \(vm.waitExit(seconds: 0).map { "status \($0)" } ?? "") \(vm.stderr)")
            // Serves again once the burst's client threads are gone (at most 32 clients at once).
            #expect(waitUntil { qmpAnswers(sock) })
        }
        // `ferry run --serial stdio | head`: the reader leaves after 10 bytes; the guest goes on.
        let sock = "\(dir)/head.qmp"
        let piped = try FerryChild(["run", "--memory", "32M", "--serial", "stdio", "--qmp", sock], shellSuffix: "| head -c 10 > /dev/null")
        #expect(waitUntil { qmpAnswers(sock) })
        usleep(1_500_000) // the guest prints far more than 10 bytes meanwhile
        #expect(qmpAnswers(sock), "ferry died when its stdout reader went away: \(piped.stderr)")
        connectSendClose(sock, #"{"execute":"qmp_capabilities"}{"execute":"quit"}"#)
        #expect(piped.waitExit(seconds: 10) != nil)
    }

    @Test("QMP connections do not leak thread stacks: thousands of connect/close cycles keep RSS and mappings flat")
    func noThreadLeak() throws {
        let sock = "\(dir)/leak.qmp"
        let vm = try FerryChild(["run", "--memory", "32M", "--serial", "none", "--qmp", sock])
        #expect(waitUntil { qmpAnswers(sock) })
        for _ in 0..<200 { connectSendClose(sock, nil) } // warm-up: allocator arenas settle
        usleep(300_000)
        let before = memoryFootprint(vm.pid)
        for i in 0..<4000 {
            connectSendClose(sock, i % 2 == 0 ? #"{"execute":"qmp_capabilities"}{"execute":"query-migrate"}"# : nil)
        }
        // glibc may still open malloc arenas (up to 8 per core, 2 mappings each: 32 here) as
        // client threads come and go; a leaked stack per connection is 2 mappings and ~16 KiB
        // RSS: 8,000 mappings here.
        let slack = 8 * 2 * Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        #expect(waitUntil(seconds: 10) { memoryFootprint(vm.pid).mappings <= before.mappings + slack })
        let after = memoryFootprint(vm.pid)
        #expect(after.mappings <= before.mappings + slack, "mappings \(before.mappings) → \(after.mappings)")
        #expect(after.rssKiB <= before.rssKiB + 16 * 1024, "RSS \(before.rssKiB) → \(after.rssKiB) KiB")
        #expect(waitUntil { qmpAnswers(sock) })
        #expect(vm.alive)
    }

    @Test("a failed incoming migration prints its error and exits 1 (as QEMU); --keep-on-incoming-failure keeps it")
    func failedIncomingExits() throws {
        for uri in ["file:/nonexistent/ferry-stream", "exec:echo garbage"] {
            let vm = try FerryChild(["run", "--memory", "16M", "--serial", "none", "--incoming", uri])
            let status = try #require(vm.waitExit(seconds: 15), "still running after a failed incoming migration from \(uri)")
            #expect(FerryChild.exitCode(status) == 1)
            #expect(vm.stderr.contains("incoming migration failed"), "\(vm.stderr)")
        }
        let sock = "\(dir)/keep.qmp"
        let kept = try FerryChild(["run", "--memory", "16M", "--serial", "none", "--qmp", sock, "--incoming", "exec:echo garbage", "--keep-on-incoming-failure"])
        #expect(waitUntil { qmpAnswers(sock) })
        usleep(500_000)
        #expect(kept.alive)
    }

    @Test("--qmp refuses a live VM's socket and a file that is not a socket; a stale socket is replaced")
    func qmpPathNotClobbered() throws {
        let sock = "\(dir)/shared.qmp"
        let first = try FerryChild(["run", "--memory", "16M", "--serial", "none", "--qmp", sock])
        #expect(waitUntil { qmpAnswers(sock) })
        let second = try FerryChild(["run", "--memory", "16M", "--serial", "none", "--qmp", sock])
        let st = try #require(second.waitExit(seconds: 10), "a second VM took over a live VM's QMP socket")
        #expect(FerryChild.exitCode(st) == 1)
        #expect(second.stderr.contains("in use"), "\(second.stderr)")
        #expect(first.alive && qmpAnswers(sock), "the first VM lost its socket")

        let file = "\(dir)/precious.txt"
        try "keep me".write(toFile: file, atomically: true, encoding: .utf8)
        let third = try FerryChild(["run", "--memory", "16M", "--serial", "none", "--qmp", file])
        #expect(third.waitExit(seconds: 10).flatMap(FerryChild.exitCode) == 1)
        #expect((try? String(contentsOfFile: file, encoding: .utf8)) == "keep me")

        // A socket left behind by a process that died: nobody listens, so it is reused.
        let stale = "\(dir)/stale.qmp"
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        _ = try UnixSocket.withAddress(stale) { bind(fd, $0, $1) }
        close(fd)
        let fourth = try FerryChild(["run", "--memory", "16M", "--serial", "none", "--qmp", stale])
        #expect(waitUntil { qmpAnswers(stale) }, "\(fourth.stderr)")
    }

    @Test("sizes: huge values are refused with an error (no crash), hex is accepted")
    func sizes() throws {
        for args in [["run", "--memory", "17179869184G"], ["guest-image", "--memory", "17179869184G", "--output", "\(dir)/g.img"],
                     ["check-memory", "/dev/null", "--memory", "17179869184G"], ["run", "--memory", "99999999999999999999"]] {
            let c = try FerryChild(args)
            let st = try #require(c.waitExit(seconds: 10))
            #expect(FerryChild.signal(st) == nil, "\(args) died of signal \(FerryChild.signal(st) ?? 0)")
            #expect(FerryChild.exitCode(st) != 0, "\(args) accepted")
        }
        let sock = "\(dir)/hex.qmp"
        let hex = try FerryChild(["run", "--memory", "0x2000000", "--serial", "none", "--qmp", sock])
        #expect(waitUntil { qmpAnswers(sock) }, "--memory 0x2000000 refused: \(hex.stderr)")
    }

    @Test("quit during a blocked exec: migration leaves no orphaned command behind")
    func noOrphanAfterQuit() throws {
        let sock = "\(dir)/orphan.qmp"
        let vm = try FerryChild(["run", "--memory", "32M", "--serial", "none", "--qmp", sock])
        #expect(waitUntil { qmpAnswers(sock) })
        let c = try RawQMP(sock)
        #expect(c.negotiate())
        c.send(#"{"execute":"migrate","arguments":{"uri":"exec:sleep 61.5"}}"#)
        #expect(c.waitFor(#""return""#))
        usleep(500_000)
        c.send(#"{"execute":"quit"}"#)
        #expect(vm.waitExit(seconds: 10) != nil, "quit did not end the VM")
        #expect(waitUntil(seconds: 3) { !sleepersExist("61.5") }, "the exec: command outlived ferry")
    }

    @Test("ferry migrate with a QMP socket that is not there fails at once with the reason")
    func migrateMissingSocket() throws {
        let start = Sys.monotonicNanos()
        let c = try FerryChild(["migrate", "--qmp", "\(dir)/missing.sock", "tcp:127.0.0.1:1"])
        let st = try #require(c.waitExit(seconds: 10))
        #expect(FerryChild.exitCode(st) == 1)
        #expect(Double(Sys.monotonicNanos() - start) / 1e9 < 3)
        #expect(c.stderr.contains("missing.sock"), "\(c.stderr)")
    }

    /// Two ferry processes in a slow postcopy (2 MB/s), both postcopy-active.
    func slowPostcopy(_ tag: String) throws -> (src: FerryProcess, dst: FerryProcess) {
        let src = try FerryProcess(executable: Paths.ferry, directory: dir, name: "\(tag)src", arguments: ["--memory", "64M"])
        let dst = try FerryProcess(executable: Paths.ferry, directory: dir, name: "\(tag)dst", arguments: ["--memory", "64M", "--incoming", "defer"])
        for p in [src, dst] {
            try p.qmp.execute("migrate-set-capabilities", ["capabilities": [["capability": "postcopy-ram", "state": true]]])
        }
        src.waitForSerial(3, seconds: 30)
        try dst.qmp.execute("migrate-incoming", ["uri": "tcp:127.0.0.1:0"])
        let addr = try #require(((try dst.qmp.execute("query-migrate") as? [String: Any])?["socket-address"] as? [[String: Any]])?.first)
        try src.qmp.execute("migrate-set-parameters", ["max-bandwidth": 5_000_000, "max-postcopy-bandwidth": 2_000_000])
        try src.qmp.execute("migrate", ["uri": "tcp:127.0.0.1:\(addr["port"]!)"])
        try src.qmp.execute("migrate-start-postcopy")
        #expect(waitUntil { migrationStatus(src) == "postcopy-active" && migrationStatus(dst) == "postcopy-active" })
        return (src, dst)
    }

    func migrationStatus(_ p: FerryProcess) -> String {
        ((try? p.qmp.execute("query-migrate")) as? [String: Any])?["status"] as? String ?? "?"
    }

    @Test("quit and SIGTERM during postcopy: refused with the reason (x-force, a second SIGTERM still end it); allowed once completed")
    func quitDuringPostcopy() throws {
        let (src, dst) = try slowPostcopy("q")
        defer { src.terminate(); dst.terminate() }
        // quit on either side is refused with the reason.
        for p in [src, dst] {
            do { try p.qmp.execute("quit"); Issue.record("quit accepted during postcopy") } catch let e as QMPError {
                #expect(e.desc.contains("postcopy") && e.desc.contains("loses the guest"), "\(e.desc)")
            }
        }
        // A first SIGTERM is refused, with an event saying why.
        kill(dst.pid, SIGTERM)
        usleep(500_000)
        #expect(!processEnded(dst.pid), "the destination exited on the first SIGTERM during postcopy")
        _ = try dst.qmp.execute("query-status")
        #expect(dst.qmp.events.contains { $0["event"] as? String == "X_EXIT_REFUSED" })
        // Let it finish: then quit is allowed.
        try src.qmp.execute("migrate-set-parameters", ["max-postcopy-bandwidth": 0])
        #expect(waitUntil(seconds: 60) { migrationStatus(src) == "completed" && migrationStatus(dst) == "completed" })
        try src.qmp.execute("quit")
        #expect(waitUntil { processEnded(src.pid) }, "quit after completion did not end the source")
    }

    @Test("a second SIGTERM ends a process the first one did not (postcopy in progress)")
    func secondSigterm() throws {
        let (src, dst) = try slowPostcopy("t")
        defer { src.terminate() }
        let start = Sys.monotonicNanos()
        dst.terminate() // SIGTERM, SIGTERM again: gone
        #expect(Double(Sys.monotonicNanos() - start) / 1e9 < 4, "terminate needed SIGKILL")
    }
}

import FerryHarness
import FerrySys
import Foundation
import Glibc
import Testing

/// The operator's CLI, as real processes: `ferry run` with migration settings and no QMP
/// client, `ferry migrate` with a timeout and its actions, Ctrl-C, `status --json`, and the
/// options it refuses.
@Suite("ferry CLI (processes)", .serialized)
struct CLITests {
    let dir = "/tmp/ferry-cli-\(getpid())"
    init() { mkdir(dir, 0o700) }

    func status(_ p: FerryProcess) -> String {
        ((try? p.qmp.execute("query-migrate")) as? [String: Any])?["status"] as? String ?? "?"
    }

    func runState(_ p: FerryProcess) -> String {
        ((try? p.qmp.execute("query-status")) as? [String: Any])?["status"] as? String ?? "?"
    }

    /// A counting 64 MiB source and a destination started with `destination` as its extra
    /// `ferry run` arguments.
    func pair(_ tag: String, destination: [String] = ["--incoming", "tcp:127.0.0.1:0"]) throws -> (src: FerryProcess, dst: FerryProcess, uri: String) {
        let src = try FerryProcess(executable: Paths.ferry, directory: dir, name: "\(tag)src", arguments: ["--memory", "64M"])
        let dst = try FerryProcess(executable: Paths.ferry, directory: dir, name: "\(tag)dst", arguments: ["--memory", "64M"] + destination)
        src.waitForSerial(3, seconds: 30)
        let q = try dst.qmp.execute("query-migrate") as? [String: Any] ?? [:]
        let addr = try #require((q["socket-address"] as? [[String: Any]])?.first, "\(q)")
        return (src, dst, "tcp:127.0.0.1:\(addr["port"]!)")
    }

    @Test("ferry run --incoming with --migrate-capability / --migrate-parameter: the destination is set up without a QMP client; bad ones are refused with the reason")
    func runSettings() throws {
        let p = try FerryProcess(executable: Paths.ferry, directory: dir, name: "settings",
                                 arguments: ["--memory", "16M", "--incoming", "tcp:127.0.0.1:0",
                                             "--migrate-capability", "postcopy-ram,postcopy-preempt", "--migrate-capability", "auto-recover",
                                             "--migrate-parameter", "heartbeat-timeout=1500", "--migrate-parameter", "xbzrle-cache-size=128M"])
        defer { p.terminate() }
        let caps = try p.qmp.execute("query-migrate-capabilities") as? [[String: Any]] ?? []
        let on = Set(caps.filter { $0["state"] as? Bool == true }.compactMap { $0["capability"] as? String })
        #expect(on.isSuperset(of: ["postcopy-ram", "postcopy-preempt", "auto-recover"]), "\(on)")
        let params = try p.qmp.execute("query-migrate-parameters") as? [String: Any] ?? [:]
        #expect(qmpNumber(params["heartbeat-timeout"]) == 1500 && qmpNumber(params["xbzrle-cache-size"]) == 128 << 20, "\(params)")

        // The parser refuses what it can tell is wrong (exit 64); QMP's checks the rest (exit 1).
        for (args, code, text) in [
            (["--migrate-capability", "postcopy-rma"], 64, "unknown capability 'postcopy-rma'; one of xbzrle"),
            (["--migrate-parameter", "downtime-limit"], 64, "expected NAME=VALUE"),
            (["--migrate-parameter", "downtime-limit=9999999"], 1, "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000"),
            (["--migrate-parameter", "no-such-thing=1"], 1, "no-such-thing"),
        ] as [([String], Int32, String)] {
            let c = try FerryChild(["run", "--memory", "16M", "--serial", "none"] + args)
            let st = try #require(c.waitExit(seconds: 20))
            #expect(FerryChild.exitCode(st) == code && c.stderr.contains(text), "\(args): exit \(FerryChild.exitCode(st) ?? -1), \(c.stderr)")
        }
    }

    @Test("ferry migrate --timeout with action cancel: exit 3 after the timeout, the source cancelled and its guest running")
    func timeoutCancel() throws {
        let (src, dst, uri) = try pair("tc")
        defer { src.terminate(); dst.terminate() }
        let start = Sys.monotonicNanos()
        let c = try FerryChild(["migrate", "--qmp", src.qmpPath, "--max-bandwidth", "1M", "--timeout", "1.5", uri], shellSuffix: "> /dev/null")
        let st = try #require(c.waitExit(seconds: 30))
        let secs = Double(Sys.monotonicNanos() - start) / 1e9
        #expect(FerryChild.exitCode(st) == 3, "\(c.stderr)")
        #expect(secs >= 1.5 && secs < 15, "\(secs) s")
        #expect(c.stderr.contains("timed out after 1.5 s") && c.stderr.contains("cancelling"), "\(c.stderr)")
        #expect(status(src) == "cancelled" && runState(src) == "running")
    }

    @Test("ferry migrate --timeout-action postcopy with --dest-qmp: precopy that cannot finish switches to postcopy and completes (exit 0), capabilities set on both sides")
    func timeoutPostcopy() throws {
        let (src, dst, uri) = try pair("tp", destination: ["--incoming", "tcp:127.0.0.1:0", "--keep-on-incoming-failure"])
        defer { src.terminate(); dst.terminate() }
        let c = try FerryChild(["migrate", "--qmp", src.qmpPath, "--dest-qmp", dst.qmpPath, "--postcopy", "--max-bandwidth", "2M",
                                "--migrate-parameter", "max-postcopy-bandwidth=0", "--timeout", "1", "--timeout-action", "postcopy", uri],
                               shellSuffix: "> /dev/null")
        let st = try #require(c.waitExit(seconds: 120))
        #expect(FerryChild.exitCode(st) == 0, "\(c.stderr)")
        #expect(c.stderr.contains("switching to postcopy"), "\(c.stderr)")
        #expect(status(src) == "completed" && status(dst) == "completed")
        let info = try src.qmp.execute("query-migrate") as? [String: Any] ?? [:]
        #expect(qmpNumber((info["ram"] as? [String: Any])?["postcopy-bytes"]) > 0 || qmpNumber((info["ram"] as? [String: Any])?["postcopy-requests"]) > 0, "\(info)")
        #expect(runState(dst) == "running")
    }

    @Test("ferry migrate --timeout-action pause in postcopy: exit 4, both sides postcopy-paused; ferry migrate recover resumes it to completion")
    func timeoutPause() throws {
        let (src, dst, uri) = try pair("tq", destination: ["--incoming", "tcp:127.0.0.1:0", "--migrate-capability", "postcopy-ram"])
        defer { src.terminate(); dst.terminate() }
        let c = try FerryChild(["migrate", "--qmp", src.qmpPath, "--postcopy", "--postcopy-after", "200",
                                "--migrate-parameter", "max-postcopy-bandwidth=2M", "--timeout", "1.5", "--timeout-action", "pause", uri],
                               shellSuffix: "> /dev/null")
        let st = try #require(c.waitExit(seconds: 30))
        #expect(FerryChild.exitCode(st) == 4, "\(c.stderr)")
        #expect(c.stderr.contains("pausing"), "\(c.stderr)")
        #expect(status(src) == "postcopy-paused")
        #expect(waitUntil(seconds: 10) { status(dst) == "postcopy-paused" })
        let port = 20_000 + Int(getpid() % 20_000)
        let r = try FerryChild(["migrate", "recover", "--qmp", src.qmpPath, "--dest-qmp", dst.qmpPath, "tcp:127.0.0.1:\(port)"],
                               shellSuffix: "> /dev/null")
        // Unthrottled for the rest: the recovery completes quickly.
        try src.qmp.execute("migrate-set-parameters", ["max-postcopy-bandwidth": 0])
        let rs = try #require(r.waitExit(seconds: 120))
        #expect(FerryChild.exitCode(rs) == 0, "\(r.stderr)")
        #expect(status(src) == "completed" && status(dst) == "completed")
    }

    @Test("Ctrl-C (SIGINT) on ferry migrate in precopy cancels it: exit 2, the source guest runs on")
    func interruptCancels() throws {
        let (src, dst, uri) = try pair("ci")
        defer { src.terminate(); dst.terminate() }
        let c = try FerryChild(["migrate", "--qmp", src.qmpPath, "--max-bandwidth", "1M", uri], shellSuffix: nil)
        #expect(waitUntil(seconds: 20) { status(src) == "active" })
        usleep(300_000)
        kill(c.pid, SIGINT)
        let st = try #require(c.waitExit(seconds: 20))
        #expect(FerryChild.exitCode(st) == 2, "\(c.stderr)")
        #expect(c.stderr.contains("cancelling the migration (Ctrl-C)"), "\(c.stderr)")
        #expect(status(src) == "cancelled" && runState(src) == "running")
    }

    @Test("ferry migrate status --json reads the same numbers as query-migrate; the text form is virsh domjobinfo's")
    func statusJSON() throws {
        let (src, dst, uri) = try pair("sj")
        defer { src.terminate(); dst.terminate() }
        try src.qmp.execute("migrate-set-parameters", ["max-bandwidth": 2_000_000])
        try src.qmp.execute("migrate", ["uri": uri])
        #expect(waitUntil(seconds: 20) { status(src) == "active" })
        usleep(1_500_000)
        let out = "\(dir)/status.json"
        let c = try FerryChild(["migrate", "status", "--qmp", src.qmpPath, "--json"], shellSuffix: "> \(out)")
        #expect(try FerryChild.exitCode(#require(c.waitExit(seconds: 10))) == 0, "\(c.stderr)")
        let q = try src.qmp.execute("query-migrate") as? [String: Any] ?? [:]
        let j = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out))) as? [String: Any])
        #expect(j["status"] as? String == "active")
        #expect(qmpNumber(j["total-bytes"]) == 64 << 20 && qmpNumber(j["total-bytes"]) == qmpNumber((q["ram"] as? [String: Any])?["total"]))
        let sent = qmpNumber(j["transferred-bytes"])
        #expect(sent > 0 && sent <= qmpNumber((q["ram"] as? [String: Any])?["transferred"]), "\(j)")
        let pct = (j["percent-done"] as? NSNumber)?.doubleValue ?? -1
        #expect(pct >= 0 && pct <= 100, "\(j)")
        #expect(qmpNumber(j["elapsed-ms"]) >= 1000, "\(j)")
        // Inside the first pass (32 s at 2 MB/s): the rate is measured, not 0 until a sync.
        let mbps = (j["mbps"] as? NSNumber)?.doubleValue ?? 0
        #expect(mbps > 8 && mbps < 40, "\(j)")
        for k in ["remaining-bytes", "mbps", "dirty-pages-rate", "passes", "eta-ms", "expected-downtime-ms", "downtime-ms", "blocktime-ms", "postcopy-pauses", "error"] {
            #expect(j.keys.contains(k), "no \(k) in \(j)")
        }
        let t = "\(dir)/status.txt"
        let c2 = try FerryChild(["migrate", "status", "--qmp", src.qmpPath], shellSuffix: "> \(t)")
        _ = c2.waitExit(seconds: 10)
        let text = (try? String(contentsOfFile: t, encoding: .utf8)) ?? ""
        for label in ["Phase:", "Time elapsed:", "Data processed:", "Data remaining:", "Data total:", "Memory bandwidth:", "Dirty rate:"] {
            #expect(text.contains(label), "\(label) missing in \(text)")
        }
        try src.qmp.execute("migrate_cancel")
    }

    @Test("--log-format json --log-file: one JSON object per line, every status change on both sides, a refused QMP command with its reason")
    func logs() throws {
        let slog = "\(dir)/src.log.json", dlog = "\(dir)/dst.log.json"
        unlink(slog); unlink(dlog)
        let s2 = try FerryProcess(executable: Paths.ferry, directory: dir, name: "lgs", arguments: ["--memory", "64M", "--log-format", "json", "--log-file", slog])
        let d2 = try FerryProcess(executable: Paths.ferry, directory: dir, name: "lgd",
                                  arguments: ["--memory", "64M", "--incoming", "tcp:127.0.0.1:0", "--log-format", "json", "--log-file", dlog, "--log-level", "debug"])
        defer { s2.terminate(); d2.terminate() }
        s2.waitForSerial(3, seconds: 30)
        let q = try d2.qmp.execute("query-migrate") as? [String: Any] ?? [:]
        let addr = try #require((q["socket-address"] as? [[String: Any]])?.first)
        #expect(throws: (any Error).self) { try s2.qmp.execute("migrate-start-postcopy") } // not migrating: refused
        try s2.qmp.execute("migrate-set-parameters", ["max-bandwidth": 0])
        try s2.qmp.execute("migrate", ["uri": "tcp:127.0.0.1:\(addr["port"]!)"])
        #expect(waitUntil(seconds: 60) { status(s2) == "completed" && status(d2) == "completed" })
        func entries(_ path: String) -> [[String: String]] {
            let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
            return text.split(separator: "\n").map { line in
                (try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: String]) ?? ["unparsed": String(line)]
            }
        }
        let se = entries(slog), de = entries(dlog)
        #expect(!se.isEmpty && se.allSatisfy { $0["unparsed"] == nil && $0["time"] != nil && $0["level"] != nil }, "\(se)")
        let changes = se.filter { $0["side"] == "source" }.compactMap { e in e["from"].flatMap { f in e["to"].map { "\(f)→\($0)" } } }
        #expect(changes.contains("none→setup") || changes.contains("setup→active"), "\(changes)")
        #expect(changes.contains("setup→active") && changes.last?.hasSuffix("→completed") == true, "\(changes)")
        let dchanges = de.filter { $0["side"] == "destination" }.compactMap { $0["to"] }
        #expect(dchanges.last == "completed", "\(de)")
        #expect(se.contains { $0["command"] == "migrate-start-postcopy" && $0["level"] == "notice" && ($0["message"] ?? "").contains("refused") }, "\(se)")
    }

    @Test("bad options are refused with the allowed values and a non-zero exit; --version and help show plain values")
    func badOptions() throws {
        for (args, code, text) in [
            (["demo", "--transport", "foo"], 64, "'tcp' and 'unix'"),
            (["demo", "--failure", "cut"], 64, "link-down"),
            (["migrate", "--qmp", "/nowhere", "--timeout", "1", "--timeout-action", "sometime", "tcp:127.0.0.1:1"], 64, "'cancel', 'postcopy' or 'pause'"),
            (["migrate", "--qmp", "/nowhere", "--timeout", "1", "--timeout-action", "pause", "tcp:127.0.0.1:1"], 64, "needs --postcopy"),
            (["migrate", "--qmp", "/nowhere", "--timeout", "0", "tcp:127.0.0.1:1"], 64, "--timeout must be a positive"),
            (["migrate", "--qmp", "/nowhere", "--max-bandwidth", "fast", "tcp:127.0.0.1:1"], 64, "max-bandwidth"),
            (["run", "--memory", "lots"], 64, "memory"),
        ] as [([String], Int32, String)] {
            let c = try FerryChild(args, shellSuffix: "> /dev/null")
            let st = try #require(c.waitExit(seconds: 20))
            #expect(FerryChild.exitCode(st) == code && c.stderr.contains(text), "\(args): exit \(FerryChild.exitCode(st) ?? -1), \(c.stderr)")
        }
        let v = "\(dir)/version.txt", h = "\(dir)/help.txt"
        let c = try FerryChild(["--version"], shellSuffix: "> \(v)")
        #expect(try FerryChild.exitCode(#require(c.waitExit(seconds: 10))) == 0)
        #expect(((try? String(contentsOfFile: v, encoding: .utf8)) ?? "").hasPrefix("ferry "))
        let hc = try FerryChild(["run", "--help"], shellSuffix: "> \(h)")
        _ = hc.waitExit(seconds: 10)
        let help = (try? String(contentsOfFile: h, encoding: .utf8)) ?? ""
        #expect(help.contains("(default: 256M)") && !help.contains("ByteSize("), "\(help)")
    }
}

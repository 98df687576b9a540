import FerryHarness
import FerrySys
import Foundation
import Glibc
import Testing

/// GET `path` from 127.0.0.1:`port` (HTTP/1.0, the whole answer), nil when nothing answers.
func httpGet(port: UInt16, _ path: String) -> String? {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var tv = timeval(tv_sec: 5, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    var sin = sockaddr_in()
    sin.sin_family = sa_family_t(AF_INET)
    sin.sin_port = port.bigEndian
    inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr)
    let ok = withUnsafePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    guard ok == 0 else { return nil }
    var req = Array("GET \(path) HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".utf8)
    _ = req.withUnsafeMutableBytes { send(fd, $0.baseAddress, $0.count, 0) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if n <= 0 { break }
        out += buf[0..<n]
    }
    return String(decoding: out, as: UTF8.self)
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
func freePort() -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var sin = sockaddr_in()
    sin.sin_family = sa_family_t(AF_INET)
    inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr)
    _ = withUnsafePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
    return UInt16(bigEndian: sin.sin_port)
}

@Suite("Prometheus metrics (processes, a real Prometheus server)", .serialized)
struct MetricsTests {
    let dir = "/tmp/ferry-metrics-\(getpid())"
    init() { mkdir(dir, 0o700) }

    /// The value of an instant query, from Prometheus' HTTP API.
    func query(_ prometheusPort: UInt16, _ q: String) -> Double? {
        let encoded = q.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? q
        guard let text = httpGet(port: prometheusPort, "/api/v1/query?query=\(encoded)"),
              let body = text.range(of: "\r\n\r\n").map({ String(text[$0.upperBound...]) }),
              let j = try? JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any],
              let result = (j["data"] as? [String: Any])?["result"] as? [[String: Any]], let first = result.first,
              let value = first["value"] as? [Any], value.count == 2, let s = value[1] as? String else { return nil }
        return Double(s)
    }

    @Test("ferry run --metrics-listen: Prometheus scrapes it and its API gives the migration's numbers (bytes, phase, counters, latency histogram)")
    func scrapedByPrometheus() throws {
        #expect(FileManager.default.isExecutableFile(atPath: "/usr/bin/prometheus"), "Debian's prometheus is not installed (.ci/run installs it)")
        let (sm, dm, pp) = (freePort(), freePort(), freePort())
        let src = try FerryProcess(executable: Paths.ferry, directory: dir, name: "src", arguments: ["--memory", "64M", "--metrics-listen", "127.0.0.1:\(sm)"])
        let dst = try FerryProcess(executable: Paths.ferry, directory: dir, name: "dst",
                                   arguments: ["--memory", "64M", "--incoming", "tcp:127.0.0.1:0", "--metrics-listen", "127.0.0.1:\(dm)",
                                               "--migrate-capability", "postcopy-ram,postcopy-blocktime"])
        defer { src.terminate(); dst.terminate() }
        // Ferry's own endpoint first: the text format, and 404 elsewhere.
        let direct = httpGet(port: sm, "/metrics") ?? ""
        #expect(direct.hasPrefix("HTTP/1.1 200") && direct.contains("ferry_migration_phase{phase=\"none\"} 1"), "\(direct.prefix(400))")
        #expect(httpGet(port: sm, "/")?.hasPrefix("HTTP/1.1 404") == true)

        let config = """
            global:
              scrape_interval: 1s
            scrape_configs:
              - job_name: ferry
                static_configs:
                  - targets: ['127.0.0.1:\(sm)', '127.0.0.1:\(dm)']
            """
        try config.write(toFile: "\(dir)/prometheus.yml", atomically: true, encoding: .utf8)
        let prom = try spawn("/usr/bin/prometheus", ["--config.file=\(dir)/prometheus.yml", "--storage.tsdb.path=\(dir)/tsdb",
                                                     "--web.listen-address=127.0.0.1:\(pp)", "--log.level=warn"])
        defer { kill(prom, SIGTERM); var st: Int32 = 0; waitpid(prom, &st, 0) }

        // A postcopy migration, so the destination has faults to show.
        src.waitForSerial(3, seconds: 30)
        try src.qmp.execute("migrate-set-capabilities", ["capabilities": [["capability": "postcopy-ram", "state": true]]])
        let q = try dst.qmp.execute("query-migrate") as? [String: Any] ?? [:]
        let addr = try #require((q["socket-address"] as? [[String: Any]])?.first)
        // The background stream at 16 MB/s: unlimited, it can bring the 64 MiB before a vCPU
        // starved by the tests beside it touches a page that is still missing, and then no
        // page is ever requested (seen once in CI).
        try src.qmp.execute("migrate-set-parameters", ["max-bandwidth": 0, "max-postcopy-bandwidth": 16_000_000])
        try src.qmp.execute("migrate", ["uri": "tcp:127.0.0.1:\(addr["port"]!)"])
        try src.qmp.execute("migrate-start-postcopy")
        func status(_ p: FerryProcess) -> String { ((try? p.qmp.execute("query-migrate")) as? [String: Any])?["status"] as? String ?? "?" }
        #expect(waitUntil(seconds: 60) { status(src) == "completed" && status(dst) == "completed" })

        let s = "instance=\"127.0.0.1:\(sm)\"", d = "instance=\"127.0.0.1:\(dm)\""
        // Prometheus scrapes every second; give it time to see the end.
        #expect(waitUntil(seconds: 60) { query(pp, "ferry_migration_phase{\(s),phase=\"completed\"}") == 1 && query(pp, "ferry_migration_phase{\(d),phase=\"completed\"}") == 1 },
                "Prometheus never saw both completed")
        let total = query(pp, "ferry_migration_data_total_bytes{\(s)}")
        #expect(total == Double(64 << 20), "\(total.map { "\($0)" } ?? "none")")
        let sent = query(pp, "ferry_migration_data_processed_bytes{\(s)}") ?? 0
        #expect(sent >= Double(60 << 20), "\(sent)")
        #expect(query(pp, "ferry_migration_postcopy_bytes{\(s)}") ?? 0 > 0)
        // The destination faulted, so the source served requested pages, and streamed the rest.
        #expect(query(pp, "ferry_migration_postcopy_requested_bytes{\(s)}") ?? 0 > 0)
        #expect(query(pp, "ferry_migration_postcopy_background_bytes{\(s)}") ?? 0 > 0)
        #expect(query(pp, "ferry_migration_postcopy_pauses_total{\(s)}") == 0)
        // The destination resolved faults: its histogram's count is theirs.
        let faults = query(pp, "ferry_migration_postcopy_fault_latency_seconds_count{\(d)}") ?? 0
        #expect(faults > 0, "no faults in the destination's histogram")
        #expect(query(pp, "ferry_migration_postcopy_fault_latency_seconds_bucket{\(d),le=\"+Inf\"}") == faults)
    }
}

import FerryMigration
import FerrySys
import Glibc
import Logging
import Metrics
import Prometheus

/// `ferry run --metrics-listen HOST:PORT`: Prometheus' text format on `GET /metrics`, from
/// a thread of its own (`metrics`). The values are query-migrate's, read at each scrape and
/// handed to swift-metrics (backed by swift-prometheus' registry); names follow KubeVirt's
/// `kubevirt_vmi_migration_*` with the prefix `ferry_migration_`. The fault-latency
/// histogram is the destination's QEMU-style log2 distribution, cumulated into Prometheus
/// buckets. Ownership: `exporter` state (the last cumulative values) belongs to the
/// `metrics` thread; the rest is immutable.
public final class MetricsServer: @unchecked Sendable {
    private let fd: Int32
    private let host: VMHost
    private let registry = PrometheusCollectorRegistry()
    private let factory: PrometheusMetricsFactory
    private var thread: KernelThread?
    /// The port bound (for port 0).
    public let port: UInt16
    private var last: (pauses: UInt64, recoveries: UInt64, attempts: UInt64) = (0, 0, 0)

    static let statuses: [MigrationStatus] = MigrationStatus.allCases

    public init(host: VMHost, address: String, port: UInt16) throws {
        self.host = host
        factory = PrometheusMetricsFactory(registry: registry)
        let sock = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard sock >= 0 else { throw SysError(errno: errno, call: "socket") }
        var one: Int32 = 1
        setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_port = port.bigEndian
        guard inet_pton(AF_INET, address, &sin.sin_addr) == 1 else {
            Glibc.close(sock)
            throw SysError(errno: EINVAL, call: "--metrics-listen \(address): not an IPv4 address")
        }
        let bound = withUnsafePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(sock, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard bound == 0, listen(sock, 16) == 0 else {
            let e = errno
            Glibc.close(sock)
            throw SysError(errno: e, call: "bind/listen \(address):\(port)")
        }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(sock, $0, &len) } }
        fd = sock
        self.port = UInt16(bigEndian: sin.sin_port)
    }

    public func start() throws {
        thread = try KernelThread(name: "metrics") { [self] in serve() }
    }

    private func serve() {
        while true {
            let c = accept(fd, nil, nil)
            if c < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                return // closed
            }
            _ = fcntl(c, F_SETFD, FD_CLOEXEC)
            answer(c)
            Glibc.close(c)
        }
    }

    /// One HTTP/1.0-style exchange: the request line decides, the connection closes after.
    private func answer(_ c: Int32) {
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var request: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 2048)
        while request.count < 16 << 10 {
            let n = buf.withUnsafeMutableBytes { recv(c, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            request += buf[0..<n]
            if request.count >= 4 && request.suffix(4) == [13, 10, 13, 10] { break }
        }
        let line = String(decoding: request.prefix { $0 != 13 && $0 != 10 }, as: UTF8.self)
        let parts = line.split(separator: " ")
        let (status, type, body): (String, String, [UInt8])
        if parts.count >= 2 && parts[0] == "GET" && (parts[1] == "/metrics" || parts[1].hasPrefix("/metrics?")) {
            (status, type, body) = ("200 OK", "text/plain; version=0.0.4; charset=utf-8", exposition())
        } else {
            (status, type, body) = ("404 Not Found", "text/plain", Array("only GET /metrics here\n".utf8))
        }
        let head = "HTTP/1.1 \(status)\r\nContent-Type: \(type)\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n"
        var out = Array(head.utf8) + body
        _ = out.withUnsafeMutableBytes { try? Sys.writeAll(c, UnsafeRawBufferPointer($0)) }
    }

    /// Reads the migration's counters and writes them in Prometheus' text format.
    func exposition() -> [UInt8] {
        let s = host.queryMigrate()
        func gauge(_ name: String, _ value: Double, _ dims: [(String, String)] = []) {
            Gauge(label: "ferry_migration_\(name)", dimensions: dims, factory: factory).record(value)
        }
        func counter(_ name: String, _ now: UInt64, _ before: UInt64) {
            let c = Counter(label: "ferry_migration_\(name)_total", factory: factory)
            if now > before { c.increment(by: Int(now - before)) } else { c.increment(by: 0) }
        }
        gauge("data_processed_bytes", Double(s.transferred))
        gauge("data_remaining_bytes", Double(s.remaining))
        gauge("data_total_bytes", Double(s.total))
        gauge("dirty_memory_rate_bytes", Double(s.dirtyPagesRate) * 4096)
        gauge("memory_transfer_rate_bytes", s.mbps * 1e6 / 8)
        gauge("postcopy_bytes", Double(s.postcopyBytes))
        gauge("postcopy_requests", Double(s.postcopyRequests))
        gauge("postcopy_requested_bytes", Double(s.postcopyRequestedBytes))
        gauge("postcopy_background_bytes", Double(s.postcopyBackgroundBytes))
        gauge("downtime_seconds", Double(s.downtimeMs ?? 0) / 1000)
        gauge("vcpu_blocked_seconds", Double(s.faults?.blocktimeMs ?? 0) / 1000)
        for st in Self.statuses { gauge("phase", st == s.status ? 1 : 0, [("phase", st.rawValue)]) }
        // Counters are per process: a second migration goes on from the first's totals.
        counter("postcopy_pauses", s.postcopyPauses, last.pauses)
        counter("postcopy_recoveries", s.recoveries, last.recoveries)
        counter("postcopy_recovery_attempts", s.recoveryAttempts, last.attempts)
        if s.postcopyPauses >= last.pauses && s.recoveries >= last.recoveries && s.recoveryAttempts >= last.attempts {
            last = (s.postcopyPauses, s.recoveries, s.recoveryAttempts)
        } else {
            last = (0, 0, 0) // a new migration started from zero
        }
        var out = registry.emitToBuffer()
        out += Array(Self.latencyHistogram(s.faults?.distribution ?? Array(repeating: 0, count: 24)).utf8)
        return out
    }

    /// QEMU's postcopy-latency-dist (bucket N = faults resolved in [2^N, 2^(N+1)) µs) as a
    /// Prometheus histogram in seconds (`le` = 2^(N+1) µs). The sum is not kept by the
    /// distribution: bucket midpoints stand in for it.
    static func latencyHistogram(_ dist: [UInt64]) -> String {
        let name = "ferry_migration_postcopy_fault_latency_seconds"
        var text = "# HELP \(name) Postcopy fault latency (fault to page installed), destination.\n# TYPE \(name) histogram\n"
        var cumulative: UInt64 = 0
        var sum = 0.0
        for (n, count) in dist.enumerated() {
            cumulative += count
            let upper = Double(UInt64(1) << UInt64(n + 1)) / 1e6
            sum += Double(count) * upper * 0.75
            text += "\(name)_bucket{le=\"\(upper)\"} \(cumulative)\n"
        }
        text += "\(name)_bucket{le=\"+Inf\"} \(cumulative)\n\(name)_sum \(sum)\n\(name)_count \(cumulative)\n"
        return text
    }

    public func close() {
        shutdown(fd, Int32(SHUT_RDWR))
        Glibc.close(fd)
        thread?.join()
    }
}

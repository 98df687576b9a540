import CFerry
import FerrySys
import Foundation
import Glibc

/// Two network namespaces joined by a veth pair (needs root): source at 10.77.0.1 in
/// `ferry-src`, destination at 10.77.0.2 in `ferry-dst`. The link can be taken down (a
/// silent partition: no RST, packets go nowhere) and shaped with `tc tbf`.
/// Ownership: every field is immutable; the namespaces are the kernel's.
public final class VethLink: @unchecked Sendable {
    public let sourceNamespace = "ferry-src"
    public let destinationNamespace = "ferry-dst"
    public let sourceAddress = "10.77.0.1"
    public let destinationAddress = "10.77.0.2"

    public init(rate: String? = nil) throws {
        teardown()
        try Self.ip(["netns", "add", sourceNamespace])
        try Self.ip(["netns", "add", destinationNamespace])
        try Self.ip(["link", "add", "fvs", "type", "veth", "peer", "name", "fvd"])
        try Self.ip(["link", "set", "fvs", "netns", sourceNamespace])
        try Self.ip(["link", "set", "fvd", "netns", destinationNamespace])
        try Self.ip(["-n", sourceNamespace, "addr", "add", "\(sourceAddress)/24", "dev", "fvs"])
        try Self.ip(["-n", destinationNamespace, "addr", "add", "\(destinationAddress)/24", "dev", "fvd"])
        for (ns, dev) in [(sourceNamespace, "fvs"), (destinationNamespace, "fvd")] {
            try Self.ip(["-n", ns, "link", "set", dev, "up"])
            try Self.ip(["-n", ns, "link", "set", "lo", "up"])
            if let rate {
                // Both directions shaped; a short queue keeps shaping from adding latency.
                try Self.run("/usr/sbin/ip", ["netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                                              "rate", rate, "burst", "256kb", "latency", "20ms"])
            }
        }
    }

    deinit { teardown() }

    /// Takes the link down on both ends: nothing is sent, nothing is reset.
    public func down() throws {
        try Self.ip(["-n", sourceNamespace, "link", "set", "fvs", "down"])
        try Self.ip(["-n", destinationNamespace, "link", "set", "fvd", "down"])
    }

    public func up() throws {
        try Self.ip(["-n", sourceNamespace, "link", "set", "fvs", "up"])
        try Self.ip(["-n", destinationNamespace, "link", "set", "fvd", "up"])
    }

    public func teardown() {
        _ = try? Self.run("/usr/sbin/ip", ["netns", "del", sourceNamespace], quiet: true)
        _ = try? Self.run("/usr/sbin/ip", ["netns", "del", destinationNamespace], quiet: true)
    }

    static func ip(_ args: [String]) throws { try run("/usr/sbin/ip", args) }

    @discardableResult
    static func run(_ exe: String, _ args: [String], quiet: Bool = false) throws -> String {
        let (status, text) = try runProcess(exe, args)
        if status != 0 && !quiet {
            throw HarnessError("\(exe) \(args.joined(separator: " ")) failed (\(status)): \(text)")
        }
        return text
    }
}

/// Runs a program to its end; returns its exit status and its stdout and stderr together.
/// Not Foundation's `Process`: its waitUntilExit hung forever in the ThreadSanitizer run
/// with the child already a zombie (tests spawn processes on several threads at once). A
/// close-on-exec pipe (no other child inherits its write end, so EOF comes when this one
/// exits), posix_spawn and waitpid.
public func runProcess(_ exe: String, _ args: [String]) throws -> (status: Int32, output: String) {
    var fds: [Int32] = [0, 0]
    let made = fds.withUnsafeMutableBufferPointer { ferry_pipe_cloexec($0.baseAddress) }
    guard made == 0 else { throw SysError(errno: -made, call: "pipe2") }
    let pid: pid_t
    do { pid = try Sys.spawn(exe, args, fdMap: [(fds[1], 1), (fds[1], 2)]) } catch {
        close(fds[0]); close(fds[1])
        throw error
    }
    close(fds[1])
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 1 << 14)
    while true {
        let n = buf.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        out += buf[0..<n]
    }
    close(fds[0])
    var st: Int32 = 0
    while waitpid(pid, &st, 0) < 0 && errno == EINTR {}
    let status = st & 0x7f == 0 ? (st >> 8) & 0xff : 128 + (st & 0x7f)
    return (status, String(decoding: out, as: UTF8.self))
}

public struct HarnessError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}

/// Median TCP round trip to an echo server (`socat ... PIPE`), from inside `namespace` when
/// given (the measuring thread joins it with setns), in microseconds.
public func measureRoundTrip(host: String, port: Int = 7790, namespace: String?, samples: Int = 200) throws -> Double {
    var server: [String] = []
    if let ns = namespace.map({ $0 == "ferry-src" ? "ferry-dst" : $0 }) { server = ["netns", "exec", ns] }
    let echo = try Sys.spawn(server.isEmpty ? "/usr/bin/socat" : "/usr/sbin/ip",
                             server + (server.isEmpty ? [] : ["socat"]) + ["TCP-LISTEN:7790,reuseaddr", "PIPE"])
    defer { kill(echo, SIGTERM); var st: Int32 = 0; waitpid(echo, &st, 0) }
    usleep(300_000)
    let result = Monitor()
    nonisolated(unsafe) var median: Double = -1
    nonisolated(unsafe) var failure: String?
    let t = try KernelThread(name: "rtt") {
        if let namespace {
            let nfd = open("/var/run/netns/\(namespace)", O_RDONLY)
            guard nfd >= 0, ferry_setns_net(nfd) == 0 else { result.withLock { failure = "setns \(namespace): \(errno)" }; return }
            close(nfd)
        }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, 4)
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = UInt16(port).bigEndian
        inet_pton(AF_INET, host, &sa.sin_addr)
        let r = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard r == 0 else { result.withLock { failure = "connect to echo server: \(errno)" }; close(fd); return }
        var times: [Double] = []
        var b: [UInt8] = [1, 2, 3, 4]
        for _ in 0..<samples {
            let t0 = Sys.monotonicNanos()
            _ = write(fd, &b, 4)
            var got = 0
            while got < 4 { let n = read(fd, &b, 4 - got); if n <= 0 { break }; got += n }
            times.append(Double(Sys.monotonicNanos() - t0) / 1000)
        }
        close(fd)
        times.sort()
        result.withLock { median = times[times.count / 2] }
    }
    t.join()
    if let failure { throw HarnessError(failure) }
    return median
}

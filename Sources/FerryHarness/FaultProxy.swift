import CFerry
import FerrySys
import Glibc

/// A TCP proxy between a migration source and destination that injects link failures:
/// reset (RST), blackhole (bytes silently dropped, no RST: a partition), stall (nothing
/// read, nothing forwarded), corrupt (flip bytes). Failures fire on command or when a byte
/// pattern (a command or return-path message) passes in a chosen direction.
///
/// Ownership: the ports, `listenFd`, `delayNanos`, `namespace`, `listenHost` are immutable;
/// `mode`, `connections`, `triggers`, `acceptThread`, `closed` and the counters are guarded
/// by `lock`.
public final class FaultProxy: @unchecked Sendable {
    public enum Mode: Sendable, Equatable { case pass, blackhole, stall }
    public enum Action: Sendable { case reset, blackhole, stall, corrupt }
    public enum Direction: Sendable { case toDestination, toSource }

    public let port: UInt16
    private let upstreamPort: UInt16
    private let listenFd: Int32
    private let lock = Monitor()
    private var mode: Mode = .pass
    private var connections: [Link] = []
    private var triggers: [(Direction, [UInt8], Action)] = []
    private var acceptThread: KernelThread?
    private var closed = false
    /// Connections accepted so far and failures injected (by action). Read from test
    /// threads while the pumps write them: guarded by `lock`.
    public var accepted: Int { lock.withLock { acceptedCount } }
    public var fired: [String] { lock.withLock { firedActions } }
    private var acceptedCount = 0
    private var firedActions: [String] = []

    /// One proxied connection. Ownership: `a` and `b` are immutable; `dead`, `threads`,
    /// `finishedPumps` are guarded by the proxy's `lock`.
    final class Link: @unchecked Sendable {
        let a: Int32, b: Int32 // a: client (source) side, b: upstream (destination) side
        var dead = false
        var threads: [KernelThread] = []
        /// Pumps that ended by themselves (EOF or error); at 2 the link cleans up.
        var finishedPumps = 0
        init(_ a: Int32, _ b: Int32) { self.a = a; self.b = b }
    }

    /// One-way delay added to every byte (a user-space stand-in for netem, which this
    /// kernel lacks): chunks are released to the far side `delayNanos` after they arrived.
    public let delayNanos: UInt64
    private let namespace: String?
    private let listenHost: String

    /// Listens on `host`:`port` (0 = any free port) and forwards to 127.0.0.1:`upstream`; with
    /// `namespace`, all of its sockets live in that network namespace.
    public init(upstream: UInt16, port: UInt16 = 0, host: String = "127.0.0.1", delayNanos: UInt64 = 0, namespace: String? = nil) throws {
        upstreamPort = upstream
        self.delayNanos = delayNanos
        self.namespace = namespace
        self.listenHost = host
        nonisolated(unsafe) var made: (Int32, UInt16, Int32) = (-1, 0, 0)
        let t = try KernelThread(name: "proxy/setup") {
            if let namespace, !FaultProxy.enter(namespace) { made = (-1, 0, EPERM); return }
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, 4)
            var sa = sockaddr_in()
            sa.sin_family = sa_family_t(AF_INET)
            sa.sin_port = port.bigEndian
            inet_pton(AF_INET, host, &sa.sin_addr)
            let r = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            guard r == 0, listen(fd, 8) == 0 else { made = (-1, 0, errno); Glibc.close(fd); return }
            var len = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
            made = (fd, UInt16(bigEndian: sa.sin_port), 0)
        }
        t.join()
        guard made.0 >= 0 else { throw SysError(errno: made.2, call: "bind/listen proxy on \(host):\(port)") }
        listenFd = made.0
        self.port = made.1
        acceptThread = try KernelThread(name: "proxy/accept") { [self] in
            if let namespace { _ = FaultProxy.enter(namespace) }
            acceptLoop()
        }
    }

    /// Moves the calling thread into a named network namespace.
    static func enter(_ namespace: String) -> Bool {
        let nfd = open("/var/run/netns/\(namespace)", O_RDONLY | O_CLOEXEC)
        guard nfd >= 0 else { return false }
        defer { Glibc.close(nfd) }
        return ferry_setns_net(nfd) == 0
    }

    deinit { close() }

    public var uri: String { "tcp:\(listenHost):\(port)" }

    /// What happens to bytes from now on (for new connections too).
    public func set(_ m: Mode) { lock.withLock { mode = m } }

    /// Resets every open connection (RST to both peers).
    public func reset() {
        let links = lock.withLock { defer { connections.removeAll() }; firedActions.append("reset"); return connections }
        for l in links { kill(l) }
    }

    /// Arms a one-shot failure for when `pattern` next passes in `direction` (an empty pattern:
    /// the next bytes); the bytes that contain it are not forwarded, except for `.corrupt`,
    /// which flips the pattern's first byte still in the chunk (a framing byte, so the peer
    /// can notice: a flipped page byte on a plain link would be silent damage) or, for an
    /// empty pattern, the chunk's middle byte (on a TLS link the record's MAC catches it).
    public func on(_ direction: Direction, pattern: [UInt8], _ action: Action) {
        lock.withLock { triggers.append((direction, pattern, action)) }
    }

    public var openConnections: Int { lock.withLock { connections.count } }

    public func close() {
        let links: [Link] = lock.withLock {
            guard !closed else { return [] }
            closed = true
            _ = Glibc.shutdown(listenFd, Int32(SHUT_RDWR))
            defer { connections.removeAll() }
            return connections
        }
        for l in links { kill(l) }
        acceptThread?.join()
        acceptThread = nil
        Glibc.close(listenFd)
    }

    private func acceptLoop() {
        while true {
            let c = accept(listenFd, nil, nil)
            if c < 0 { if errno == EINTR { continue }; return }
            if lock.withLock({ closed }) { Glibc.close(c); return }
            let u = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            var sa = sockaddr_in()
            sa.sin_family = sa_family_t(AF_INET)
            sa.sin_port = upstreamPort.bigEndian
            sa.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
            let r = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(u, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            if r != 0 { Glibc.close(u); rst(c); continue }
            var one: Int32 = 1
            setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, 4)
            setsockopt(u, Int32(IPPROTO_TCP), TCP_NODELAY, &one, 4)
            let link = Link(c, u)
            lock.withLock { connections.append(link); acceptedCount += 1 }
            let t1 = try? KernelThread(name: "proxy/down") { [self] in pump(link, from: c, to: u, .toDestination) }
            let t2 = try? KernelThread(name: "proxy/up") { [self] in pump(link, from: u, to: c, .toSource) }
            let late: [KernelThread] = lock.withLock {
                link.threads = [t1, t2].compactMap { $0 }
                return link.dead && link.finishedPumps == 2 ? link.threads : [] // both already gone
            }
            for t in late { t.detach() }
        }
    }

    private func pump(_ link: Link, from: Int32, to: Int32, _ dir: Direction) {
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 64 << 10, alignment: 16)
        defer { buf.deallocate() }
        var tail: [UInt8] = [] // last bytes of the previous chunk, so patterns may straddle reads
        let delayed = DelayLine()
        if delayNanos > 0 {
            _ = try? KernelThread(name: "proxy/delay") { [self] in
                while let (chunk, due) = delayed.pop() {
                    let now = Sys.monotonicNanos()
                    if due > now { usleep(UInt32((due - now) / 1000)) }
                    if lock.withLock({ link.dead }) { return }
                    if !chunk.withUnsafeBytes({ writeAll(to, $0) }) { return }
                }
                if !lock.withLock({ link.dead }) { _ = Glibc.shutdown(to, Int32(SHUT_WR)) }
            }
        }
        while true {
            if lock.withLock({ link.dead }) { return }
            if lock.withLock({ mode == .stall }) { usleep(5_000); continue }
            var p = pollfd(fd: from, events: Int16(POLLIN), revents: 0)
            let pr = poll(&p, 1, 10)
            if pr == 0 { continue }
            if pr < 0 { if errno == EINTR { continue }; break }
            let n = read(from, buf, 64 << 10)
            if n <= 0 { break }
            let chunk = [UInt8](UnsafeRawBufferPointer(start: buf, count: n))
            let hay = tail + chunk
            tail = Array(hay.suffix(32))
            var action: Action?
            var flip = chunk.count / 2
            lock.withLock {
                for (i, t) in triggers.enumerated() where t.0 == dir {
                    guard let at = Self.match(hay, t.1) else { continue }
                    action = t.2
                    // hay = the previous chunk's tail + this chunk: the first matched byte in this chunk.
                    if !t.1.isEmpty { flip = max(at - (hay.count - chunk.count), 0) }
                    triggers.remove(at: i)
                    firedActions.append("\(t.2) \(dir)")
                    break
                }
            }
            switch action {
            case .reset?:
                lock.withLock { connections.removeAll { $0 === link } }
                kill(link, fromPump: true)
                return
            case .blackhole?: set(.blackhole); continue
            case .stall?: set(.stall); continue
            case .corrupt?:
                var bad = chunk
                bad[flip] ^= 0xff
                _ = bad.withUnsafeBytes { writeAll(to, $0) }
                continue
            case nil: break
            }
            if lock.withLock({ mode == .blackhole }) { continue }
            if delayNanos > 0 {
                delayed.push(chunk, due: Sys.monotonicNanos() + delayNanos)
                continue
            }
            if !chunk.withUnsafeBytes({ writeAll(to, $0) }) { break }
        }
        delayed.finish()
        // One side closed or failed: pass the close on (FIN), as a router would.
        if delayNanos == 0 && !lock.withLock({ link.dead }) {
            _ = Glibc.shutdown(to, Int32(SHUT_WR))
        }
        // The second pump to end by itself retires the link: its threads are detached
        // (nobody will join them) and its sockets closed.
        let retired: [KernelThread]? = lock.withLock {
            link.finishedPumps += 1
            guard link.finishedPumps == 2, !link.dead else { return nil }
            link.dead = true
            connections.removeAll { $0 === link }
            return link.threads
        }
        if let retired {
            for t in retired { t.detach() }
            Glibc.close(link.a)
            Glibc.close(link.b)
        }
    }

    /// Where `needle` starts in `hay` (an empty needle matches at 0).
    private static func match(_ hay: [UInt8], _ needle: [UInt8]) -> Int? {
        guard !needle.isEmpty else { return 0 }
        guard hay.count >= needle.count else { return nil }
        for i in 0...(hay.count - needle.count) where hay[i] == needle[0] {
            if hay[i..<i + needle.count].elementsEqual(needle) { return i }
        }
        return nil
    }

    private func writeAll(_ fd: Int32, _ b: UnsafeRawBufferPointer) -> Bool {
        var off = 0
        while off < b.count {
            let w = write(fd, b.baseAddress! + off, b.count - off)
            if w < 0 { if errno == EINTR { continue }; return false }
            off += w
        }
        return true
    }

    /// RST: linger 0, then close.
    private func rst(_ fd: Int32) {
        var l = linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
        Glibc.close(fd)
    }

    private func kill(_ link: Link, fromPump: Bool = false) {
        // Already dead (killed, or retired by its pumps): its sockets are closed already.
        let alive: [KernelThread]? = lock.withLock {
            if link.dead { return nil }
            link.dead = true
            return link.threads
        }
        guard let threads = alive else { return }
        if !fromPump { for t in threads { t.join() } }
        else {
            // Called on one pump: the other notices `dead` within its 10 ms poll; close
            // after it is gone so no fd number is reused under it.
            let other = threads
            let a = link.a, b = link.b
            _ = try? KernelThread(name: "proxy/reset") { [self] in
                for t in other where !pthread_equal(t.handle, pthread_self()).isTrue { t.join() }
                rst(a); rst(b)
            }
            return
        }
        rst(link.a)
        rst(link.b)
    }
}

private extension Int32 { var isTrue: Bool { self != 0 } }

/// A FIFO of chunks with release times, between a proxy pump and its delayed writer.
/// Ownership: `items`, `head` and `done` are guarded by `m`.
final class DelayLine: @unchecked Sendable {
    private let m = Monitor()
    private var items: [([UInt8], UInt64)] = []
    private var head = 0
    private var done = false
    func push(_ c: [UInt8], due: UInt64) { m.withLock { items.append((c, due)); m.broadcast() } }
    func finish() { m.withLock { done = true; m.broadcast() } }
    func pop() -> ([UInt8], UInt64)? {
        m.withLock {
            while head == items.count {
                if done { return nil }
                m.wait(timeoutNanos: 50_000_000)
            }
            let v = items[head]
            head += 1
            if head > 4096 { items.removeFirst(head); head = 0 }
            return v
        }
    }
}

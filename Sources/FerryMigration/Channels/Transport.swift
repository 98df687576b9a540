import FerrySys
import FerryTLS
import Glibc

/// A migration's TLS: the credentials object `tls-creds` names and the name the
/// destination's certificate must carry (`tls-hostname`, else the URI's host).
public struct ChannelSecurity: Sendable {
    public let credentials: TLSCredentials
    public let hostname: String?
    public init(credentials: TLSCredentials, hostname: String?) {
        self.credentials = credentials; self.hostname = hostname
    }
    /// How long a TLS handshake may take before the connection counts as failed, when no
    /// heartbeat bounds a link's silence.
    public static let handshakeTimeoutMs: Int32 = 10_000

    /// With a heartbeat, a handshake gets twice its silence bound (at least 1 s, at most the
    /// default): a recovery attempt whose bytes a dead link swallowed fails as soon as the
    /// heartbeat would call the link dead, and the next attempt (or, on the destination, the
    /// next connection: it accepts one at a time) follows a link that came back.
    static func handshakeTimeoutMs(heartbeatTimeoutMs: UInt64) -> Int32 {
        heartbeatTimeoutMs == 0 ? handshakeTimeoutMs : Int32(clamping: min(max(2 * heartbeatTimeoutMs, 1000), UInt64(handshakeTimeoutMs)))
    }
}

/// A migration address as QEMU spells it: `tcp:HOST:PORT`, `unix:PATH`, `exec:COMMAND`,
/// `file:PATH`.
public enum MigrationURI: Sendable, Equatable, CustomStringConvertible {
    case tcp(host: String, port: UInt16)
    case unix(path: String)
    case exec(command: String)
    case file(path: String)

    public init(_ text: String) throws {
        func bad(_ why: String) -> MigrationError {
            MigrationError(.badURI, "invalid migration URI '\(text)': \(why) (expected tcp:HOST:PORT, unix:PATH, exec:COMMAND or file:PATH)")
        }
        guard let colon = text.firstIndex(of: ":") else { throw bad("no transport") }
        let scheme = String(text[..<colon]), rest = String(text[text.index(after: colon)...])
        switch scheme {
        case "tcp":
            guard let c = rest.lastIndex(of: ":") else { throw bad("no port") }
            var host = String(rest[..<c])
            if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            guard let port = UInt16(rest[rest.index(after: c)...]) else { throw bad("bad port") }
            self = .tcp(host: host.isEmpty ? "0.0.0.0" : host, port: port)
        case "unix":
            guard !rest.isEmpty, rest.utf8.count < 108 else { throw bad("bad socket path") }
            self = .unix(path: rest)
        case "exec":
            guard !rest.isEmpty else { throw bad("empty command") }
            self = .exec(command: rest)
        case "file":
            guard !rest.isEmpty else { throw bad("empty path") }
            // QEMU allows ",offset=N"; Ferry supports offset 0 only.
            if rest.contains(",offset=") { throw bad("file offsets are not supported") }
            self = .file(path: rest)
        default:
            throw bad("unknown transport '\(scheme)'")
        }
    }

    public var description: String {
        switch self {
        case let .tcp(h, p): h.contains(":") ? "tcp:[\(h)]:\(p)" : "tcp:\(h):\(p)"
        case let .unix(p): "unix:\(p)"
        case let .exec(c): "exec:\(c)"
        case let .file(p): "file:\(p)"
        }
    }

    /// Socket transports can carry a return path; exec and file are one-way.
    public var isBidirectional: Bool {
        switch self { case .tcp, .unix: true; case .exec, .file: false }
    }
}

enum Socket {
    static func setCommonOptions(_ fd: Int32, tcp: Bool) {
        var one: Int32 = 1
        if tcp { setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(4)) }
        var buf: Int32 = 4 << 20
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, socklen_t(4))
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, socklen_t(4))
    }

    static func withAddress<T>(_ uri: MigrationURI, _ body: (UnsafePointer<sockaddr>, socklen_t, Int32) throws -> T) throws -> T {
        switch uri {
        case let .tcp(host, port):
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            hints.ai_flags = AI_NUMERICSERV
            var res: UnsafeMutablePointer<addrinfo>?
            let r = getaddrinfo(host == "localhost" ? "127.0.0.1" : host, String(port), &hints, &res)
            guard r == 0, let ai = res else {
                throw MigrationError(.badURI, "cannot resolve \(host): \(String(cString: gai_strerror(r)))")
            }
            defer { freeaddrinfo(res) }
            return try body(ai.pointee.ai_addr, ai.pointee.ai_addrlen, ai.pointee.ai_family)
        case let .unix(path):
            return try UnixSocket.withAddress(path) { try body($0, $1, AF_UNIX) }
        default:
            throw MigrationError(.badURI, "\(uri) is not a socket address")
        }
    }
}

public enum Transport {
    /// Opens the outgoing channel for `uri`; with `tls`, completes a TLS handshake on it first.
    /// `isCancelled` is polled while waiting for a reader of a `file:` FIFO.
    public static func connect(_ uri: MigrationURI, tls: ChannelSecurity? = nil, handshakeTimeoutMs: Int32 = ChannelSecurity.handshakeTimeoutMs,
                               isCancelled: () -> Bool = { false }) throws -> MigrationChannel {
        if let tls {
            guard uri.isBidirectional else { throw MigrationError(.config, "TLS needs a tcp: or unix: migration address, not \(uri)") }
            let ch = try connect(uri)
            var name = tls.hostname
            if name == nil, case let .tcp(host, _) = uri { name = host }
            do {
                ch.attach(try TLSSession.client(fd: ch.fd, credentials: tls.credentials, expectedName: name, timeoutMs: handshakeTimeoutMs))
            } catch {
                ch.close()
                throw MigrationError(.tls, "TLS with \(uri) failed", cause: error)
            }
            return ch
        }
        switch uri {
        case .tcp, .unix:
            return try Socket.withAddress(uri) { addr, len, family in
                let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                guard fd >= 0 else { throw MigrationError(.connect, "socket() failed", cause: SysError(errno: errno, call: "socket")) }
                Socket.setCommonOptions(fd, tcp: family != AF_UNIX)
                while Glibc.connect(fd, addr, len) != 0 {
                    if errno == EINTR { continue }
                    let e = errno
                    Sys.close(fd)
                    throw MigrationError(.connect, "cannot connect to \(uri)", cause: SysError(errno: e, call: "connect"))
                }
                return MigrationChannel(fd: fd, description: uri.description)
            }
        case let .exec(command):
            return try spawn(command, childFd: 0, uri: uri)
        case let .file(path):
            // Non-blocking: a FIFO without a reader (ENXIO) is waited for here, where cancel
            // can end the wait, and a full one in the channel's writer, which abort wakes.
            while true {
                let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NONBLOCK, 0o600)
                if fd >= 0 { return MigrationChannel(fd: fd, description: uri.description) }
                let e = errno
                guard e == ENXIO || e == EINTR else { throw MigrationError(.connect, "cannot create \(path)", cause: SysError(errno: e, call: "open")) }
                if isCancelled() { throw MigrationError(.cancelled, "migration cancelled while \(path) had no reader") }
                usleep(20_000)
            }
        }
    }

    /// After a failed or cancelled `file:` migration: a partial stream is useless and may
    /// fill a disk; a regular file is removed (a FIFO or device is left alone).
    static func removePartialFile(_ path: String) {
        var st = stat()
        if lstat(path, &st) == 0 && st.st_mode & S_IFMT == S_IFREG { unlink(path) }
    }

    /// Runs `sh -c command` with one end of a socketpair as its stdin (`childFd` 0, outgoing)
    /// or stdout (`childFd` 1, incoming).
    static func spawn(_ command: String, childFd: Int32, uri: MigrationURI) throws -> MigrationChannel {
        var sv: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv) == 0 else {
            throw MigrationError(.connect, "socketpair failed", cause: SysError(errno: errno, call: "socketpair"))
        }
        // Its own process group, so a cancel can end the command and whatever it started.
        let pid: pid_t
        do {
            pid = try Sys.spawn("/bin/sh", ["-c", command], fdMap: [(sv[1], childFd)], ownProcessGroup: true)
        } catch {
            Sys.close(sv[1]); Sys.close(sv[0])
            throw MigrationError(.connect, "cannot run \(command)", cause: error)
        }
        Sys.close(sv[1])
        let ch = MigrationChannel(fd: sv[0], description: uri.description)
        ch.childPID = pid
        return ch
    }
}

/// The destination's side of an address: accepts the incoming channel(s).
/// Ownership: `uri`, `tls`, `fd` are immutable; `boundURI` is set in init only; `closed`
/// is guarded by `lock`.
public final class MigrationListener: @unchecked Sendable {
    public let uri: MigrationURI
    /// With credentials, every accepted connection must complete a TLS handshake.
    public let tls: TLSCredentials?
    /// The listening socket (-1 for exec:/file:), for callers that poll it with others.
    public let fd: Int32
    private var closed = false
    private let lock = Monitor()
    /// The bound address (with the real port when the URI asked for port 0).
    public private(set) var boundURI: MigrationURI

    public init(_ uri: MigrationURI, tls: TLSCredentials? = nil) throws {
        if tls != nil && !uri.isBidirectional { throw MigrationError(.config, "TLS needs a tcp: or unix: migration address, not \(uri)") }
        self.uri = uri
        self.tls = tls
        self.boundURI = uri
        switch uri {
        case .tcp, .unix:
            // A stale socket is replaced; another process's live one, or a file, is not.
            if case let .unix(path) = uri {
                do { try UnixSocket.claim(path) } catch { throw MigrationError(.connect, "cannot listen on \(uri)", cause: error) }
            }
            fd = try Socket.withAddress(uri) { addr, len, family in
                let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                guard fd >= 0 else { throw MigrationError(.connect, "socket() failed", cause: SysError(errno: errno, call: "socket")) }
                var one: Int32 = 1
                setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(4))
                guard bind(fd, addr, len) == 0, listen(fd, 4) == 0 else {
                    let e = errno
                    Sys.close(fd)
                    throw MigrationError(.connect, "cannot listen on \(uri)", cause: SysError(errno: e, call: "bind/listen"))
                }
                return fd
            }
            if case let .tcp(host, 0) = uri {
                var ss = sockaddr_in()
                var l = socklen_t(MemoryLayout<sockaddr_in>.size)
                withUnsafeMutablePointer(to: &ss) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = getsockname(fd, $0, &l) } }
                boundURI = .tcp(host: host, port: UInt16(bigEndian: ss.sin_port))
            }
        case .exec, .file:
            fd = -1
        }
    }

    deinit { close() }

    /// Blocks until a peer connects (or, for exec/file, opens the source of the stream).
    /// With TLS, the handshake completes here; a peer that fails it (a plain client, a
    /// certificate we do not trust) is an error of code `.tls`, and the listener stays open.
    public func accept(handshakeTimeoutMs: Int32 = ChannelSecurity.handshakeTimeoutMs) throws -> MigrationChannel {
        let ch = try acceptRaw()
        try secure(ch, handshakeTimeoutMs: handshakeTimeoutMs)
        return ch
    }

    /// With credentials, completes the server side of a TLS handshake on an accepted
    /// channel; a peer that fails it is an error of code `.tls` (the channel is closed).
    public func secure(_ ch: MigrationChannel, handshakeTimeoutMs: Int32 = ChannelSecurity.handshakeTimeoutMs) throws {
        guard let tls else { return }
        do {
            ch.attach(try TLSSession.server(fd: ch.fd, credentials: tls, timeoutMs: handshakeTimeoutMs))
        } catch {
            ch.close()
            throw MigrationError(.tls, "refused a connection on \(uri)", cause: error)
        }
    }

    public var isSocket: Bool { fd >= 0 }
    public var isClosed: Bool { lock.withLock { closed } }

    /// The next connection as it comes (no TLS handshake yet).
    public func acceptRaw() throws -> MigrationChannel {
        switch uri {
        case .tcp, .unix:
            while true {
                let c = Glibc.accept(fd, nil, nil)
                if c >= 0 {
                    _ = fcntl(c, F_SETFD, FD_CLOEXEC)
                    Socket.setCommonOptions(c, tcp: { if case .tcp = uri { return true }; return false }())
                    return MigrationChannel(fd: c, description: uri.description)
                }
                if errno == EINTR { continue }
                let closedNow = lock.withLock { closed }
                throw MigrationError(closedNow ? .cancelled : .io, closedNow ? "listening on \(uri) was cancelled" : "accept on \(uri) failed",
                                     cause: SysError(errno: errno, call: "accept"))
            }
        case let .exec(command):
            return try Transport.spawn(command, childFd: 1, uri: uri)
        case let .file(path):
            let f = open(path, O_RDONLY | O_CLOEXEC)
            guard f >= 0 else { throw MigrationError(.connect, "cannot open \(path)", cause: SysError(errno: errno, call: "open")) }
            return MigrationChannel(fd: f, description: uri.description)
        }
    }

    /// Waits up to `timeoutMs` for a pending connection (sockets; exec/file are always ready).
    public func waitForConnection(timeoutMs: Int32) -> Bool {
        guard fd >= 0 else { return true }
        guard !lock.withLock({ closed }) else { return false }
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, timeoutMs) > 0 && p.revents & Int16(POLLIN) != 0
    }

    /// Stops listening; a blocked `accept` returns with an error.
    public func close() {
        lock.withLock {
            guard !closed else { return }
            closed = true
            if fd >= 0 {
                _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
                Sys.close(fd)
            }
            if case let .unix(path) = uri { unlink(path) }
        }
    }
}

import COpenSSL
import FerrySys
import Glibc

/// One TLS connection over a socket fd the caller owns.
///
/// Migration channels are full duplex from two threads (the source's main thread writes
/// while its return-path thread reads). An OpenSSL `SSL` must not be entered by two
/// threads at once, so the socket is non-blocking, every OpenSSL call holds `lock` only
/// for the call itself, and waits for the socket happen in `poll` outside it: a reader
/// waiting for bytes never holds up a writer.
public final class TLSSession: @unchecked Sendable {
    let ssl: OpaquePointer
    public let fd: Int32
    private let lock = Monitor()
    private var freed = false
    /// Client, x509: the credentials and name its session is kept for when it is freed.
    private var resumption: (credentials: TLSCredentials, name: String)?
    /// Negotiated protocol and cipher suite, e.g. "TLSv1.3" / "TLS_AES_256_GCM_SHA384".
    public private(set) var version = ""
    public private(set) var cipher = ""
    /// The handshake resumed an earlier session (no certificates exchanged).
    public private(set) var resumed = false

    private init(fd: Int32, credentials: TLSCredentials) throws {
        ERR_clear_error()
        guard let s = SSL_new(credentials.context) else {
            throw TLSError(.handshake, "cannot create a TLS session", cause: TLSError.openSSLReason())
        }
        ssl = s
        self.fd = fd
        ferry_ssl_ignore_unexpected_eof(s)
        guard SSL_set_fd(s, fd) == 1 else {
            SSL_free(s)
            throw TLSError(.handshake, "cannot attach TLS to fd \(fd)", cause: TLSError.openSSLReason())
        }
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
    }

    deinit { free() }

    /// Releases OpenSSL's state (the fd stays the caller's).
    public func free() {
        lock.withLock {
            guard !freed else { return }
            freed = true
            if let r = resumption { r.credentials.rememberSession(of: ssl, name: r.name) }
            SSL_free(ssl)
        }
    }

    /// Connects as a client. `expectedName` is what the server's certificate must name: an
    /// IP address is matched against IP SANs, anything else against DNS names.
    public static func client(fd: Int32, credentials: TLSCredentials, expectedName: String?, timeoutMs: Int32) throws -> TLSSession {
        guard credentials.endpoint == .client else {
            throw TLSError(.credentials, "TLS credentials '\(credentials.id)' are for a server endpoint; the migration source needs endpoint=client")
        }
        let t = try TLSSession(fd: fd, credentials: credentials)
        if case .x509 = credentials.kind {
            guard let name = expectedName, !name.isEmpty else {
                throw TLSError(.verify, "no hostname to check the destination's certificate against: set tls-hostname")
            }
            var probe = in6_addr()
            let isIP = inet_pton(AF_INET, name, &probe) == 1 || inet_pton(AF_INET6, name, &probe) == 1
            let ok = isIP ? ferry_ssl_expect_ip(t.ssl, name) : SSL_set1_host(t.ssl, name)
            guard ok == 1 else { throw TLSError(.verify, "cannot expect the name \(name)", cause: TLSError.openSSLReason()) }
            if !isIP { _ = ferry_ssl_set_sni(t.ssl, name) }
            // A reconnection to the same server (a recovery) skips certificates and signatures.
            credentials.offerSession(to: t.ssl, name: name)
            t.resumption = (credentials, name)
        }
        SSL_set_connect_state(t.ssl)
        try t.handshake(timeoutMs: timeoutMs, credentials: credentials)
        return t
    }

    /// Accepts as a server. A peer whose first byte is not a TLS handshake record is refused
    /// before OpenSSL sees it, with an error that says so.
    public static func server(fd: Int32, credentials: TLSCredentials, timeoutMs: Int32) throws -> TLSSession {
        guard credentials.endpoint == .server else {
            throw TLSError(.credentials, "TLS credentials '\(credentials.id)' are for a client endpoint; the migration destination needs endpoint=server")
        }
        let t = try TLSSession(fd: fd, credentials: credentials)
        let deadline = Sys.monotonicNanos() + UInt64(max(timeoutMs, 1)) * 1_000_000
        try t.wait(POLLIN, deadline: deadline, what: "the TLS handshake")
        var first: [UInt8] = [0, 0, 0, 0]
        let n = recv(fd, &first, 4, Int32(MSG_PEEK))
        if n <= 0 { throw TLSError(.closed, "the peer closed the connection before the TLS handshake") }
        if first[0] != 0x16 {
            let what = n == 4 && first == [0x51, 0x45, 0x56, 0x4d] ? "a plain migration stream (QEVM)" : "non-TLS data (first byte 0x\(String(first[0], radix: 16)))"
            throw TLSError(.plainPeer, "TLS is required on this address (tls-creds '\(credentials.id)'), but the peer sent \(what): refused")
        }
        SSL_set_accept_state(t.ssl)
        try t.handshake(timeoutMs: Int32(clamping: Int64(deadline - min(deadline, Sys.monotonicNanos())) / 1_000_000), credentials: credentials)
        return t
    }

    private func handshake(timeoutMs: Int32, credentials: TLSCredentials) throws {
        let deadline = Sys.monotonicNanos() + UInt64(max(timeoutMs, 1)) * 1_000_000
        while true {
            let (r, err) = call { SSL_do_handshake(ssl) }
            if r == 1 { break }
            switch err {
            case SSL_ERROR_WANT_READ: try wait(POLLIN, deadline: deadline, what: "the TLS handshake")
            case SSL_ERROR_WANT_WRITE: try wait(POLLOUT, deadline: deadline, what: "the TLS handshake")
            default:
                let reason = TLSError.openSSLReason()
                let v = SSL_get_verify_result(ssl)
                if v != X509_V_OK {
                    throw TLSError(.verify, "TLS handshake failed: the peer's certificate was rejected (credentials '\(credentials.id)')",
                                   cause: String(cString: X509_verify_cert_error_string(v)))
                }
                if reason == nil && (err == SSL_ERROR_SYSCALL || err == SSL_ERROR_ZERO_RETURN) {
                    throw TLSError(.closed, "the peer closed the connection during the TLS handshake (does it use TLS, and trust our certificate?)")
                }
                throw TLSError(.handshake, "TLS handshake failed (credentials '\(credentials.id)')", cause: reason)
            }
        }
        version = String(cString: SSL_get_version(ssl))
        cipher = String(cString: ferry_ssl_cipher_name(ssl))
        resumed = SSL_session_reused(ssl) == 1
    }

    /// Runs one OpenSSL call under the lock; returns its result and SSL_get_error's verdict.
    @inline(__always)
    private func call(_ body: () -> Int32) -> (Int32, Int32) {
        lock.withLock {
            if freed { return (-1, SSL_ERROR_SSL) }
            ERR_clear_error()
            let r = body()
            return (r, r > 0 ? SSL_ERROR_NONE : SSL_get_error(ssl, r))
        }
    }

    private func wait(_ events: Int32, deadline: UInt64?, what: String) throws {
        var p = pollfd(fd: fd, events: Int16(events), revents: 0)
        while true {
            var ms: Int32 = -1
            if let deadline {
                let now = Sys.monotonicNanos()
                if now >= deadline { throw TLSError(.timeout, "timed out waiting for \(what)") }
                ms = Int32(clamping: (deadline - now + 999_999) / 1_000_000)
            }
            let r = poll(&p, 1, ms)
            if r > 0 { return }
            if r < 0 && errno != EINTR { throw TLSError(.io, "poll failed", cause: String(cString: strerror(errno))) }
        }
    }

    /// A writer that must read (or a reader that must write) first: the other thread may
    /// do that I/O for it, so wait briefly and retry instead of waiting for the socket alone.
    private func crossWait(_ events: Int32) throws {
        var p = pollfd(fd: fd, events: Int16(events), revents: 0)
        _ = poll(&p, 1, 5)
    }

    /// Whether OpenSSL holds bytes already read from the socket (decrypted or not, with
    /// read-ahead): a reader must not wait for the socket then.
    public var pending: Bool { lock.withLock { freed ? false : SSL_has_pending(ssl) == 1 } }

    /// Reads up to `count` bytes; 0 at end of stream. With `timeoutMs` > 0, throws
    /// `.timeout` when nothing arrives for that long.
    public func read(_ p: UnsafeMutableRawPointer, _ count: Int, timeoutMs: Int32) throws -> Int {
        while true {
            let (r, err) = call { SSL_read(ssl, p, Int32(clamping: count)) }
            if r > 0 { return Int(r) }
            switch err {
            case SSL_ERROR_ZERO_RETURN: return 0
            case SSL_ERROR_WANT_READ:
                let deadline = timeoutMs > 0 ? Sys.monotonicNanos() + UInt64(timeoutMs) * 1_000_000 : nil
                do { try wait(POLLIN, deadline: deadline, what: "data") } catch let e as TLSError where e.code == .timeout {
                    throw TLSError(.timeout, "no data from the peer for \(timeoutMs) ms")
                }
            case SSL_ERROR_WANT_WRITE: try crossWait(POLLOUT)
            case SSL_ERROR_SYSCALL:
                let e = errno
                if let reason = TLSError.openSSLReason() { throw TLSError(.io, "TLS read failed", cause: reason) }
                if e == EAGAIN || e == EINTR { try crossWait(POLLIN); continue }
                if e == 0 { return 0 } // the peer closed the socket without close_notify
                throw TLSError(.io, "TLS read failed", cause: String(cString: strerror(e)))
            default:
                throw TLSError(.io, "TLS read failed", cause: TLSError.openSSLReason() ?? "error \(err)")
            }
        }
    }

    /// Writes all `count` bytes (one TLS record per 16 KiB).
    public func write(_ p: UnsafeRawPointer, _ count: Int) throws {
        var off = 0
        while off < count {
            let (r, err) = call { SSL_write(ssl, p + off, Int32(clamping: count - off)) }
            if r > 0 { off += Int(r); continue }
            switch err {
            case SSL_ERROR_WANT_WRITE: try wait(POLLOUT, deadline: nil, what: "the socket")
            case SSL_ERROR_WANT_READ: try crossWait(POLLIN)
            case SSL_ERROR_SYSCALL:
                let e = errno
                throw TLSError(.io, "TLS write failed", cause: TLSError.openSSLReason() ?? String(cString: strerror(e)))
            default:
                throw TLSError(.io, "TLS write failed", cause: TLSError.openSSLReason() ?? "error \(err)")
            }
        }
    }

    /// Sends close_notify if the socket takes it now; never waits.
    public func sendCloseNotify() {
        _ = call { SSL_shutdown(ssl) }
    }
}

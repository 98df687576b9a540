import COpenSSL
import FerrySys
import Glibc

/// The TLS layer's error: what failed, and OpenSSL's own reason when it gave one.
public struct TLSError: Error, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable {
        case credentials, handshake, plainPeer, verify, io, closed, timeout
    }
    public let code: Code
    public let message: String
    public let cause: String?
    public init(_ code: Code, _ message: String, cause: String? = nil) {
        self.code = code; self.message = message; self.cause = cause
    }
    public var description: String { cause.map { "\(message): \($0)" } ?? message }

    /// Drains OpenSSL's per-thread error queue into one line.
    static func openSSLReason() -> String? {
        var parts: [String] = []
        while true {
            let e = ERR_get_error()
            if e == 0 { break }
            var buf = [CChar](repeating: 0, count: 256)
            ERR_error_string_n(e, &buf, buf.count)
            parts.append(String(cString: buf))
        }
        return parts.isEmpty ? nil : parts.joined(separator: "; ")
    }
}

/// Which side of a connection credentials serve, as QEMU's `endpoint` property says it.
public enum TLSEndpoint: String, Sendable { case client, server }

/// TLS credentials, the counterpart of QEMU's `tls-creds-x509` and `tls-creds-psk` objects.
///
/// x509 (`dir` holds QEMU's file names): `ca-cert.pem` always; the server has
/// `server-cert.pem` + `server-key.pem`; the client has `client-cert.pem` + `client-key.pem`,
/// needed when the server verifies peers (QEMU's default). PSK: `dir/keys.psk` with lines
/// `identity:hexkey`; the client uses `username` (default "qemu").
/// Ownership: every field but `sessions` is immutable after init, and the SSL_CTX is
/// shared read-only; `sessions` is guarded by `sessionLock`.
public final class TLSCredentials: @unchecked Sendable {
    public enum Kind: Sendable, Equatable { case x509(dir: String), psk(dir: String, username: String) }
    public let id: String
    public let kind: Kind
    public let endpoint: TLSEndpoint
    public let verifyPeer: Bool
    /// Immutable once built; OpenSSL allows one SSL_CTX to serve many threads.
    let context: OpaquePointer
    /// Client, x509: the last resumable session per name the server's certificate was
    /// checked against (owned references, freed on replacement and in deinit).
    private let sessionLock = Monitor()
    private var sessions: [String: OpaquePointer] = [:]

    public var qomType: String {
        switch kind { case .x509: "tls-creds-x509"; case .psk: "tls-creds-psk" }
    }

    public init(id: String, kind: Kind, endpoint: TLSEndpoint, verifyPeer: Bool = true) throws {
        self.id = id
        self.kind = kind
        self.endpoint = endpoint
        self.verifyPeer = verifyPeer
        ERR_clear_error()
        guard let ctx = SSL_CTX_new(endpoint == .server ? TLS_server_method() : TLS_client_method()) else {
            throw TLSError(.credentials, "cannot create a TLS context", cause: TLSError.openSSLReason())
        }
        ferry_ssl_ctx_set_modes(ctx)
        _ = ferry_ssl_ctx_set_min_tls12(ctx)
        do {
            switch kind {
            case .x509(let dir): try Self.loadX509(ctx, dir: dir, endpoint: endpoint, verifyPeer: verifyPeer, id: id)
            case let .psk(dir, username): try Self.loadPSK(ctx, dir: dir, username: username, endpoint: endpoint, id: id)
            }
        } catch {
            ferry_ssl_ctx_free(ctx)
            throw error
        }
        if case .x509 = kind, endpoint == .server { _ = ferry_ssl_ctx_enable_resumption(ctx) }
        context = ctx
    }

    deinit {
        for s in sessions.values { SSL_SESSION_free(s) }
        ferry_ssl_ctx_free(context)
    }

    /// Keeps `ssl`'s session for the next connection to `name`, if the server sent a ticket
    /// that this channel read (the main channel's reader does; write-only channels do not).
    func rememberSession(of ssl: OpaquePointer, name: String) {
        guard let s = SSL_get1_session(ssl) else { return }
        guard SSL_SESSION_is_resumable(s) == 1 else { SSL_SESSION_free(s); return }
        let old: OpaquePointer? = sessionLock.withLock { defer { sessions[name] = s }; return sessions[name] }
        if let old { SSL_SESSION_free(old) }
    }

    /// Offers the session last kept for `name` (the server falls back to a full handshake if
    /// it cannot resume it: another process, or an expired ticket).
    func offerSession(to ssl: OpaquePointer, name: String) {
        sessionLock.withLock {
            if let s = sessions[name] { _ = SSL_set_session(ssl, s) }
        }
    }

    private static func readable(_ path: String) -> Bool { access(path, R_OK) == 0 }

    private static func loadX509(_ ctx: OpaquePointer, dir: String, endpoint: TLSEndpoint, verifyPeer: Bool, id: String) throws {
        func need(_ file: String) throws -> String {
            let p = "\(dir)/\(file)"
            guard readable(p) else { throw TLSError(.credentials, "TLS credentials '\(id)': cannot read \(p)") }
            return p
        }
        let ca = try need("ca-cert.pem")
        guard SSL_CTX_load_verify_locations(ctx, ca, nil) == 1 else {
            throw TLSError(.credentials, "TLS credentials '\(id)': bad CA certificate \(ca)", cause: TLSError.openSSLReason())
        }
        let prefix = endpoint == .server ? "server" : "client"
        let certPath = "\(dir)/\(prefix)-cert.pem", keyPath = "\(dir)/\(prefix)-key.pem"
        // A client without a certificate is allowed; the server then refuses it if it verifies peers.
        if endpoint == .server || readable(certPath) {
            let cert = try need("\(prefix)-cert.pem"), key = try need("\(prefix)-key.pem")
            guard SSL_CTX_use_certificate_chain_file(ctx, cert) == 1 else {
                throw TLSError(.credentials, "TLS credentials '\(id)': bad certificate \(cert)", cause: TLSError.openSSLReason())
            }
            guard SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) == 1, SSL_CTX_check_private_key(ctx) == 1 else {
                throw TLSError(.credentials, "TLS credentials '\(id)': bad key \(keyPath) for \(certPath)", cause: TLSError.openSSLReason())
            }
        }
        // The client always checks the server's certificate; the server checks clients when asked.
        switch endpoint {
        case .client: ferry_ssl_ctx_require_peer_cert(ctx, 0)
        case .server: if verifyPeer { ferry_ssl_ctx_require_peer_cert(ctx, 1) }
        }
    }

    private static func loadPSK(_ ctx: OpaquePointer, dir: String, username: String, endpoint: TLSEndpoint, id: String) throws {
        let path = "\(dir)/keys.psk"
        guard let text = Self.readSmallFile(path) else { throw TLSError(.credentials, "TLS credentials '\(id)': cannot read \(path)") }
        var pairs: [(String, [UInt8])] = []
        for (n, line) in text.split(separator: "\n").enumerated() where !line.isEmpty {
            guard let colon = line.firstIndex(of: ":"), let key = Self.hex(line[line.index(after: colon)...]), !key.isEmpty, key.count <= 256 else {
                throw TLSError(.credentials, "TLS credentials '\(id)': \(path) line \(n + 1) is not identity:hexkey")
            }
            let identity = String(line[..<colon])
            guard identity.utf8.count <= 128 else { throw TLSError(.credentials, "TLS credentials '\(id)': identity too long on line \(n + 1)") }
            pairs.append((identity, key))
        }
        if endpoint == .client {
            guard let mine = pairs.first(where: { $0.0 == username }) else {
                throw TLSError(.credentials, "TLS credentials '\(id)': no key for username '\(username)' in \(path)")
            }
            pairs = [mine]
        }
        guard !pairs.isEmpty else { throw TLSError(.credentials, "TLS credentials '\(id)': \(path) has no keys") }
        let ids = pairs.map { strdup($0.0) }
        defer { ids.forEach { free($0) } }
        let keys = pairs.map { p -> UnsafeMutablePointer<UInt8> in
            let b = UnsafeMutablePointer<UInt8>.allocate(capacity: p.1.count)
            b.initialize(from: p.1, count: p.1.count)
            return b
        }
        defer { for (i, k) in keys.enumerated() { k.update(repeating: 0, count: pairs[i].1.count); k.deallocate() } }
        let lens = pairs.map { UInt32($0.1.count) }
        let ok = ids.map { UnsafePointer($0) }.withUnsafeBufferPointer { ip in
            keys.map { UnsafePointer($0) }.withUnsafeBufferPointer { kp in
                ferry_ssl_ctx_set_psk(ctx, endpoint == .server ? 1 : 0, UInt32(pairs.count), ip.baseAddress, kp.baseAddress, lens)
            }
        }
        guard ok == 1 else { throw TLSError(.credentials, "TLS credentials '\(id)': cannot install the pre-shared keys") }
        // The classic PSK callbacks are used on TLS 1.3 with a SHA-256 suite; no fallback to 1.2.
        _ = ferry_ssl_ctx_set_min_tls13(ctx)
    }

    static func readSmallFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while out.count < 1 << 20 {
            let n = read(fd, &buf, buf.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func hex(_ s: Substring) -> [UInt8]? {
        let u = Array(s.utf8.filter { $0 != UInt8(ascii: "\r") && $0 != UInt8(ascii: " ") })
        guard u.count % 2 == 0 else { return nil }
        func nib(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
            default: nil
            }
        }
        var out: [UInt8] = []
        var i = 0
        while i < u.count {
            guard let h = nib(u[i]), let l = nib(u[i + 1]) else { return nil }
            out.append(h << 4 | l)
            i += 2
        }
        return out
    }
}

/// The one place every migration channel is set up, on both sides: the main channel and
/// its return path, the postcopy-preempt (urgent) channel, and every recovery connection.
///
/// A socket channel gets the heartbeat read timeout (`heartbeat-timeout`: silence that long
/// is a dead link) and TCP keep-alive / user timeout, so the kernel gives up on a dead peer
/// as soon. The urgent channel carries pages only when asked, so it has no read timeout:
/// the main channel carries the heartbeat.
enum ChannelSetup {
    enum Role: Sendable { case main, urgent }

    /// Applies the heartbeat and liveness settings to `ch` for its role.
    static func configure(_ ch: MigrationChannel, role: Role, heartbeatTimeoutMs: UInt64) {
        let t = Int32(clamping: heartbeatTimeoutMs)
        guard ch.isSocket, t > 0 else { return }
        ch.setLiveness(timeoutMs: t)
        ch.readTimeoutMs = role == .main ? t : 0
    }

    /// Connects (with TLS when `tls` is set) and configures a source-side channel.
    static func connect(_ uri: MigrationURI, role: Role, tls: ChannelSecurity?, heartbeatTimeoutMs: UInt64,
                        isCancelled: () -> Bool = { false }) throws -> MigrationChannel {
        let ch = try Transport.connect(uri, tls: tls, isCancelled: isCancelled)
        configure(ch, role: role, heartbeatTimeoutMs: heartbeatTimeoutMs)
        return ch
    }

    /// How long the destination waits for the source's urgent channel after LISTEN or
    /// POSTCOPY_RESUME.
    static let urgentAcceptTimeoutMs: Int32 = 10_000

    /// Accepts (with the listener's TLS) and configures a destination-side channel.
    static func accept(on listener: MigrationListener, role: Role, heartbeatTimeoutMs: UInt64) throws -> MigrationChannel {
        if role == .urgent {
            guard listener.waitForConnection(timeoutMs: urgentAcceptTimeoutMs) else {
                throw MigrationError(.timeout, "the source did not open the postcopy-preempt channel")
            }
        }
        let ch = try listener.accept()
        configure(ch, role: role, heartbeatTimeoutMs: heartbeatTimeoutMs)
        return ch
    }
}

extension MigrationChannel {
    /// "TLSv1.3 TLS_AES_128_GCM_SHA256" on a TLS channel, else nil (query-migrate's `x-tls`).
    var tlsDescription: String? { tls.map { "\($0.version) \($0.cipher)" } }
}

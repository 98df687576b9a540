import FerrySys
import FerryWire

/// The one place every migration channel is set up, on both sides: the main channel and
/// its return path, the postcopy-preempt (urgent) channel, and every recovery connection.
///
/// A socket channel gets the heartbeat read timeout (`heartbeat-timeout`: silence that long
/// is a dead link) and TCP keep-alive / user timeout, so the kernel gives up on a dead peer
/// as soon. The urgent channel carries pages only when asked, and a multifd channel only
/// in precopy, so they have no read timeout: the main channel carries the heartbeat.
enum ChannelSetup {
    enum Role: Sendable { case main, urgent, multifd }

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
        let ch = try Transport.connect(uri, tls: tls, handshakeTimeoutMs: ChannelSecurity.handshakeTimeoutMs(heartbeatTimeoutMs: heartbeatTimeoutMs),
                                       isCancelled: isCancelled)
        configure(ch, role: role, heartbeatTimeoutMs: heartbeatTimeoutMs)
        return ch
    }

    /// How long the destination waits for the source's urgent channel after LISTEN or
    /// POSTCOPY_RESUME.
    static let urgentAcceptTimeoutMs: Int32 = 10_000

    /// Accepts the source's `count` multifd channels (with the listener's TLS), each
    /// starting with its `MultiFDInit`: one migration's uuid, ids 0..<count once each.
    /// Returned in id order. A connection that does not start as a multifd channel (a port
    /// scan) is dropped; the channels must all come within `urgentAcceptTimeoutMs`.
    /// `early` are channels accepted before the main one (already plain: no TLS).
    static func acceptMultifd(on listener: MigrationListener, count: Int, early: [MigrationChannel], heartbeatTimeoutMs: UInt64) throws -> [MigrationChannel] {
        var byID: [Int: MigrationChannel] = [:]
        var uuid: [UInt8]?
        var early = early
        let deadline = Sys.monotonicNanos() + UInt64(urgentAcceptTimeoutMs) * 1_000_000
        do {
            while byID.count < count {
                let left = Int32(clamping: (deadline - min(deadline, Sys.monotonicNanos())) / 1_000_000)
                let ch: MigrationChannel
                if !early.isEmpty {
                    ch = early.removeFirst()
                } else {
                    guard left > 0, listener.waitForConnection(timeoutMs: left) else {
                        throw MigrationError(.timeout, "the source opened \(byID.count) of \(count) multifd channels (multifd-channels is \(count) here)")
                    }
                    ch = try listener.accept(handshakeTimeoutMs: ChannelSecurity.handshakeTimeoutMs(heartbeatTimeoutMs: heartbeatTimeoutMs))
                }
                ch.readTimeoutMs = max(1, Int32(clamping: left))
                let initial: MultiFD.Initial
                do {
                    initial = try MultiFD.Initial(decoding: try ch.bytes(MultiFD.initSize))
                } catch let e as WireError where e.code == .badMagic {
                    ch.close() // not a multifd channel
                    continue
                } catch {
                    ch.close()
                    throw error
                }
                guard Int(initial.id) < count, byID[Int(initial.id)] == nil else {
                    ch.close()
                    throw MigrationError(.protocolError, "multifd: received channel id \(initial.id), expected one of 0..<\(count) not seen yet (multifd-channels is \(count) here)")
                }
                if let uuid, uuid != initial.uuid {
                    ch.close()
                    throw MigrationError(.protocolError, "multifd: channel \(initial.id) belongs to another migration (uuid differs)")
                }
                uuid = initial.uuid
                configure(ch, role: .multifd, heartbeatTimeoutMs: heartbeatTimeoutMs)
                if !ch.isSocket || heartbeatTimeoutMs == 0 { ch.readTimeoutMs = 0 }
                byID[Int(initial.id)] = ch
            }
        } catch {
            for ch in Array(byID.values) + early { ch.close() }
            throw error
        }
        for ch in early { ch.close() } // more than `count`: the id check above already failed
        return (0..<count).map { byID[$0]! }
    }

    /// Accepts (with the listener's TLS) and configures a destination-side channel. The
    /// urgent channel is waited for up to `urgentAcceptTimeoutMs`, or until `isAbandoned`.
    static func accept(on listener: MigrationListener, role: Role, heartbeatTimeoutMs: UInt64,
                       isAbandoned: () -> Bool = { false }) throws -> MigrationChannel {
        if role == .urgent {
            let deadline = Sys.monotonicNanos() + UInt64(urgentAcceptTimeoutMs) * 1_000_000
            while !listener.waitForConnection(timeoutMs: 50) {
                if isAbandoned() { throw MigrationError(.cancelled, "the postcopy-preempt channel is no longer awaited") }
                guard Sys.monotonicNanos() < deadline else {
                    throw MigrationError(.timeout, "the source did not open the postcopy-preempt channel")
                }
            }
        }
        let ch = try listener.accept(handshakeTimeoutMs: ChannelSecurity.handshakeTimeoutMs(heartbeatTimeoutMs: heartbeatTimeoutMs))
        configure(ch, role: role, heartbeatTimeoutMs: heartbeatTimeoutMs)
        return ch
    }
}

extension MigrationChannel {
    /// "TLSv1.3 TLS_AES_128_GCM_SHA256" on a TLS channel (", resumed session" after a
    /// reconnection that resumed one), else nil (query-migrate's `x-tls`).
    var tlsDescription: String? { tls.map { "\($0.version) \($0.cipher)\($0.resumed ? ", resumed session" : "")" } }
}

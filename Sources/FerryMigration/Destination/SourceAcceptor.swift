import FerrySys
import FerryWire
import Glibc

/// Who may connect to a waiting destination: the source's main channel is the first
/// connection that starts a migration stream; anything else (a port scan, a health check)
/// is dropped and the listener kept. After a failure before the guest ran here, the
/// address keeps answering recovery attempts with SHUT(1).
extension IncomingMigration {
    /// How long a connection may stay silent before it counts as a stray one.
    static let headerTimeoutNanos: UInt64 = 10_000_000_000

    /// The source's main channel. A connection that never sends a migration header (a port
    /// scan, a health check, a client that connects and closes) is dropped and the listener
    /// kept, so the real source still finds it; the last one dropped is reported in
    /// query-migrate's error. A connection that starts a migration stream (or, with TLS, a
    /// TLS handshake or a plain stream) is the source: its errors fail the migration.
    /// A multifd channel that overtook the main one (without TLS the source opens them
    /// right after the main channel's header, and a proxy may reorder the two) is kept in
    /// `early` for `ChannelSetup.acceptMultifd`, and so is a connection that has sent
    /// nothing yet when the main channel is found (it may be one, its bytes still coming).
    func acceptSource() throws -> (main: MigrationChannel, early: [MigrationChannel]) {
        guard listener.isSocket else { return (try listener.accept(), []) }
        var early: [MigrationChannel] = []
        var candidates: [(channel: MigrationChannel, deadline: UInt64)] = []
        var handedOver = false
        defer {
            for c in candidates { c.channel.close() }
            if !handedOver { for ch in early { ch.close() } }
        }
        func drop(_ i: Int, _ why: String) {
            let c = candidates.remove(at: i)
            let text = "ignored a connection on \(listener.boundURI) (\(c.channel.peerDescription)): \(why)"
            updateStats { $0.errorDescription = text }
            MigrationLog.logger.warning("\(text)", metadata: ["side": "destination"])
            c.channel.close()
        }
        while true {
            var fds = [pollfd(fd: listener.fd, events: Int16(POLLIN), revents: 0)]
            fds += candidates.map { pollfd(fd: $0.channel.fd, events: Int16(POLLIN), revents: 0) }
            if poll(&fds, nfds_t(fds.count), 100) < 0 && errno != EINTR {
                throw MigrationError(.io, "poll on \(listener.boundURI) failed", cause: SysError(errno: errno, call: "poll"))
            }
            if listener.isClosed { throw MigrationError(.cancelled, "listening on \(uri) was cancelled") }
            let now = Sys.monotonicNanos()
            // Newest first, so removing by index keeps the earlier indices valid.
            for i in candidates.indices.reversed() {
                let ch = candidates[i].channel
                if fds[i + 1].revents == 0 {
                    if now > candidates[i].deadline { drop(i, "sent nothing for \(Self.headerTimeoutNanos / 1_000_000_000) s") }
                    continue
                }
                switch ch.peekStreamStart(tls: tls != nil) {
                case .incomplete:
                    if now > candidates[i].deadline { drop(i, "sent an incomplete header") }
                case .stray(let why):
                    drop(i, why)
                case .multifd:
                    early.append(candidates.remove(at: i).channel)
                case .source:
                    candidates.remove(at: i)
                    try listener.secure(ch) // with TLS: the handshake; its failure fails the migration
                    handedOver = true
                    // Connections that have sent nothing yet may be multifd channels still on
                    // their way (through a proxy): the multifd accept reads their first bytes.
                    let pending = candidates.map(\.channel)
                    candidates.removeAll()
                    return (ch, early + pending)
                }
            }
            if fds[0].revents & Int16(POLLIN) != 0 {
                candidates.append((try listener.acceptRaw(), now + Self.headerTimeoutNanos))
            }
            // A candidate with a partial header stays readable: do not spin on it.
            if !candidates.isEmpty && fds.dropFirst().contains(where: { $0.revents != 0 }) { usleep(1_000) }
        }
    }

    /// Answers every later connection with SHUT(1) until the listener closes (the process
    /// exits). Runs on `mig/dst/main`, whose migration has failed: it has nothing else to do.
    func refuseRecovery() {
        var b = WireBuffer(capacity: 8)
        b.rpShut(1)
        while true {
            let ch: MigrationChannel
            do { ch = try listener.accept() } catch let e as MigrationError where e.code == .tls { continue } catch { return }
            // A source that cannot read the answer tries again; nothing to report here.
            try? ch.write(b)
            try? ch.flush()
            _ = ch.waitReadable(timeoutMs: 1000) // let the source read it before the close
            ch.close()
        }
    }
}

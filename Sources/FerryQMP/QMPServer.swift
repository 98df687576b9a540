import Foundation
import FerryMachine
import FerryMigration
import FerrySys
import Glibc
import Logging
import Synchronization

/// QEMU Machine Protocol server on a Unix socket (mode 0600). Each client has a reader
/// thread and a writer thread; events go to every client that finished capabilities
/// negotiation. A client that sends garbage gets an error; one that disconnects
/// mid-command affects nobody else. Every buffer is bounded: a value over 1 MiB is
/// refused, and a client that stops reading is dropped once 1 MiB of replies and events
/// wait for it, so a stuck client never blocks the migration threads that emit events.
public final class QMPServer: @unchecked Sendable {
    public let path: String
    public let host: VMHost
    /// Called after `quit` has been answered.
    public var onQuit: (@Sendable () -> Void)?
    private let listenFd: Int32
    private let lock = Monitor()
    private var clients: [Int32: Client] = [:]
    private var acceptThread: KernelThread?

    /// Most clients at once (QEMU allows one per monitor; tools open a few).
    static let maxClients = 32
    /// Replies and events queued for one client before it counts as stuck.
    static let maxOutbox = 1 << 20

    /// One connected client. Ownership: `fd` is immutable; `negotiated` is written by the
    /// client's reader thread and read by whoever emits an event: an atomic; `outbox`,
    /// `inFlight` and `dead` are guarded by `outLock`.
    final class Client: @unchecked Sendable {
        let fd: Int32
        private let negotiatedFlag = Atomic<Bool>(false)
        var negotiated: Bool {
            get { negotiatedFlag.load(ordering: .acquiring) }
            set { negotiatedFlag.store(newValue, ordering: .releasing) }
        }
        private let outLock = Monitor()
        private var outbox: [UInt8] = []
        private var dead = false
        /// The writer took a chunk and is sending it.
        private var inFlight = false
        init(fd: Int32) { self.fd = fd }

        /// Waits until everything queued so far went out (or the client is gone), at most
        /// until `deadline`: the reply to `quit` must reach the client before we exit.
        func waitSent(until deadline: UInt64) {
            outLock.withLock { _ = outLock.wait(until: deadline) { (outbox.isEmpty && !inFlight) || dead ? true : nil } }
        }

        /// Queues a message; never blocks on the socket.
        func send(_ object: [String: Any]) {
            guard var data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return }
            data.append(UInt8(ascii: "\r")); data.append(UInt8(ascii: "\n"))
            let overflow: Bool = outLock.withLock {
                guard !dead else { return false }
                if outbox.count + data.count > QMPServer.maxOutbox { dead = true; outLock.broadcast(); return true }
                outbox.append(contentsOf: data)
                outLock.broadcast()
                return false
            }
            // Stuck client: end its connection (its reader sees EOF and cleans up).
            if overflow { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
        }

        /// The writer thread: drains the outbox into the socket until the client goes.
        func drain() {
            while true {
                let chunk: [UInt8]? = outLock.withLock {
                    while outbox.isEmpty && !dead { outLock.wait() }
                    if dead && outbox.isEmpty { return nil }
                    defer { outbox.removeAll(keepingCapacity: true); inFlight = true }
                    return outbox
                }
                guard let chunk else { return }
                let ok = chunk.withUnsafeBytes { (try? Sys.sendAll(fd, $0)) != nil } // a failed send ends the client below
                outLock.withLock { inFlight = false; outLock.broadcast() }
                if !ok {
                    outLock.withLock { dead = true; outbox.removeAll(); outLock.broadcast() }
                    _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
                    return
                }
            }
        }

        /// The reader is done: let the writer finish what is queued and stop.
        func finish() { outLock.withLock { dead = true; outLock.broadcast() } }
    }

    /// Binds `path`: a stale socket there is replaced, a live one (another VM's) or a
    /// file that is not a socket is refused.
    public init(path: String, host: VMHost) throws {
        Sys.ignoreSIGPIPE() // a client that goes away is EPIPE on its socket, never the VM's end
        self.path = path
        self.host = host
        try UnixSocket.claim(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SysError(errno: errno, call: "socket") }
        // The socket controls the VM: only its owner may connect.
        let old = umask(0o077)
        let r: Int32
        do { r = try UnixSocket.withAddress(path) { bind(fd, $0, $1) } } catch { umask(old); Sys.close(fd); throw error }
        umask(old)
        guard r == 0, listen(fd, 16) == 0 else {
            let e = errno; Sys.close(fd); throw SysError(errno: e, call: "bind/listen(\(path))")
        }
        chmod(path, 0o600)
        listenFd = fd
        host.subscribe { [weak self] e in self?.migrationEvent(e) }
    }

    public func start() throws {
        acceptThread = try KernelThread(name: "qmp/accept") { [self] in
            while true {
                let c = accept(listenFd, nil, nil)
                if c < 0 {
                    if errno == EINTR || errno == ECONNABORTED { continue }
                    // Out of fds or memory: wait and keep serving, never stop accepting for good.
                    if errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM { usleep(100_000); continue }
                    return
                }
                _ = fcntl(c, F_SETFD, FD_CLOEXEC)
                admit(c)
            }
        }
    }

    /// Serves a new connection on two detached threads (reader, writer). When they cannot be
    /// made, the client is told why and closed; nothing is left behind.
    private func admit(_ c: Int32) {
        let full = lock.withLock { clients.count >= Self.maxClients }
        if full { refuse(c, "too many QMP clients"); return }
        let client = Client(fd: c)
        lock.withLock { clients[c] = client }
        let writer: KernelThread
        do { writer = try KernelThread(name: "qmp/writer") { client.drain() } } catch {
            lock.withLock { _ = clients.removeValue(forKey: c) }
            refuse(c, "cannot serve this client: \(error)")
            return
        }
        do {
            try KernelThread.detached(name: "qmp/client") { [self] in
                serve(client)
                client.finish()
                writer.join()
                Sys.close(client.fd)
            }
        } catch {
            lock.withLock { _ = clients.removeValue(forKey: c) }
            client.finish()
            _ = Glibc.shutdown(c, Int32(SHUT_RDWR))
            writer.join()
            refuse(c, "cannot serve this client: \(error)")
        }
    }

    private func refuse(_ c: Int32, _ why: String) {
        let reply: [String: Any] = ["error": ["class": "GenericError", "desc": why]]
        if var msg = try? JSONSerialization.data(withJSONObject: reply, options: [.sortedKeys]) {
            msg.append(contentsOf: [13, 10])
            _ = msg.withUnsafeBytes { send(c, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL)) }
        }
        Sys.close(c)
    }

    public func close() {
        Glibc.shutdown(listenFd, Int32(SHUT_RDWR)) // wakes the accept thread, which ends
        acceptThread?.join()
        Sys.close(listenFd)
        unlink(path)
        // Replies already queued (the one to `quit` among them) go out before we exit.
        let deadline = Sys.monotonicNanos() + 1_000_000_000
        for c in lock.withLock({ Array(clients.values) }) { c.waitSent(until: deadline) }
    }

    // MARK: events

    private func migrationEvent(_ e: MigrationEvent) {
        let eventsOn = host.capabilities.contains(.events)
        switch e {
        case .status(let s): if eventsOn { broadcast("MIGRATION", ["status": s.rawValue]) }
        case .pass(let n): if eventsOn { broadcast("MIGRATION_PASS", ["pass": n]) }
        case .stop: broadcast("STOP", nil)
        case .resume: broadcast("RESUME", nil)
        }
    }

    public func broadcast(_ name: String, _ data: [String: Any]?) {
        let t = Sys.wallClock()
        var ev: [String: Any] = ["event": name, "timestamp": ["seconds": t.seconds, "microseconds": t.microseconds]]
        if let data { ev["data"] = data }
        let targets = lock.withLock { clients.values.filter(\.negotiated) }
        for c in targets { c.send(ev) }
    }

    // MARK: clients

    private func serve(_ client: Client) {
        defer { lock.withLock { _ = clients.removeValue(forKey: client.fd) } }
        client.send(["QMP": ["version": FerryIdentity.qmpVersion, "capabilities": [String]()]])
        var splitter = JSONStreamSplitter()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buf.withUnsafeMutableBytes { read(client.fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            for item in splitter.feed(buf[0..<n]) {
                switch item {
                case .tooLong:
                    client.send(error(QMPError("JSON value too long (limit 1 MiB)"), id: nil))
                case .stray:
                    client.send(error(QMPError("JSON parse error, invalid character"), id: nil))
                case .value(let bytes):
                    switch QMPRequest.parse(bytes) {
                    case .failure(let e): client.send(error(e.error, id: e.id))
                    case .success(let request):
                        let reply = handle(request, client)
                        client.send(reply)
                        if request.name == "quit", reply["return"] != nil { onQuit?() }
                    }
                }
            }
        }
    }

    private func error(_ e: QMPError, id: Any?) -> [String: Any] {
        var r: [String: Any] = ["error": ["class": e.errorClass, "desc": e.desc]]
        if let id { r["id"] = id }
        return r
    }

    private func handle(_ request: QMPRequest, _ client: Client) -> [String: Any] {
        let id = request.id, name = request.name, args = request.arguments
        if name == "qmp_capabilities" {
            if client.negotiated {
                return error(QMPError("Capabilities negotiation is already complete, command ignored", class: "CommandNotFound"), id: id)
            }
            client.negotiated = true
            var r: [String: Any] = ["return": [String: Any]()]
            if let id { r["id"] = id }
            return r
        }
        guard client.negotiated else {
            return error(QMPError("Expecting capabilities negotiation with 'qmp_capabilities'", class: "CommandNotFound"), id: id)
        }
        do {
            let value = try QMPCommands.run(name, args, host: host)
            var r: [String: Any] = ["return": value]
            if let id { r["id"] = id }
            return r
        } catch {
            let e = error as? QMPError ?? QMPError("\(error)")
            // Refused commands are the operator's business: say which and why (queries never fail).
            MigrationLog.logger.notice("QMP \(name) refused: \(e.desc)", metadata: ["command": .string(name), "class": .string(e.errorClass)])
            return self.error(e, id: id)
        }
    }
}

import Foundation
import FerrySys
import Glibc

/// A small blocking QMP client: Ferry's own tools (`ferry migrate`, `ferry demo`) drive a
/// VM over QMP exactly as other management tools do.
public final class QMPClient: @unchecked Sendable {
    private let fd: Int32
    private var splitter = JSONStreamSplitter()
    private var pending: [[String: Any]] = []
    /// Events received so far (in order), kept until `takeEvents`.
    public private(set) var events: [[String: Any]] = []
    private var nextID = 1

    /// Connects to the QMP socket at `path`, retrying for up to `timeoutSeconds` while the
    /// socket is not there yet or not yet listening (a VM process that is starting); 0 tries
    /// once.
    public init(path: String, timeoutSeconds: Double = 10) throws {
        Sys.ignoreSIGPIPE()
        let deadline = Sys.monotonicNanos() + UInt64(timeoutSeconds * 1e9)
        while true {
            do {
                fd = try UnixSocket.connect(path)
                break
            } catch let e as SysError where (e.errno == ENOENT || e.errno == ECONNREFUSED) && Sys.monotonicNanos() < deadline {
                usleep(20_000)
            }
        }
        let greeting = try readMessage()
        guard greeting["QMP"] != nil else { throw QMPError("not a QMP server: \(greeting)") }
        _ = try execute("qmp_capabilities")
    }

    deinit { Glibc.close(fd) }

    /// Runs a command; returns its `return` value or throws its QMP error.
    @discardableResult
    public func execute(_ command: String, _ arguments: [String: Any]? = nil) throws -> Any {
        let id = nextID
        nextID += 1
        var msg: [String: Any] = ["execute": command, "id": id]
        if let arguments { msg["arguments"] = arguments }
        var data = try JSONSerialization.data(withJSONObject: msg)
        data.append(UInt8(ascii: "\n"))
        try data.withUnsafeBytes { try Sys.writeAll(fd, $0) }
        while true {
            let m = try readMessage()
            if m["event"] != nil { events.append(m); continue }
            guard (m["id"] as? Int) == id else { continue }
            if let e = m["error"] as? [String: Any] {
                throw QMPError(e["desc"] as? String ?? "error", class: e["class"] as? String ?? "GenericError")
            }
            return m["return"] ?? [String: Any]()
        }
    }

    public func takeEvents() -> [[String: Any]] {
        defer { events.removeAll() }
        return events
    }

    /// Waits up to `seconds` for an event named `name` (optionally with data status `status`).
    public func waitForEvent(_ name: String, status: String? = nil, seconds: Double) throws -> [String: Any]? {
        let deadline = Sys.monotonicNanos() + UInt64(seconds * 1e9)
        while true {
            if let i = events.firstIndex(where: { $0["event"] as? String == name && (status == nil || (($0["data"] as? [String: Any])?["status"] as? String) == status) }) {
                return events.remove(at: i)
            }
            let now = Sys.monotonicNanos()
            if now >= deadline { return nil }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if pending.isEmpty && poll(&p, 1, Int32((deadline - now) / 1_000_000)) <= 0 { return nil }
            let m = try readMessage()
            if m["event"] != nil { events.append(m) }
        }
    }

    private func readMessage() throws -> [String: Any] {
        while pending.isEmpty {
            var buf = [UInt8](repeating: 0, count: 65536)
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { throw QMPError("QMP connection closed") }
            for item in splitter.feed(buf[0..<n]) {
                if case .value(let bytes) = item, let obj = try? JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any] {
                    pending.append(obj)
                }
            }
        }
        return pending.removeFirst()
    }
}

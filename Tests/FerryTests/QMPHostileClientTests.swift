import FerryMachine
import FerryMigration
import FerryQMP
import FerrySys
import Foundation
import Glibc
import Testing

/// A raw QMP connection: bytes in, bytes out, no protocol help.
final class RawQMP {
    let fd: Int32
    var received: [UInt8] = []

    init(_ path: String) throws {
        fd = try UnixSocket.connect(path)
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }
    deinit { close(fd) }

    func send(_ s: String) { send(Array(s.utf8)) }
    func send(_ b: [UInt8]) { _ = b.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } }

    /// Reads until `text` has appeared in what this client received (or EOF / timeout).
    func waitFor(_ text: String) -> Bool {
        var buf = [UInt8](repeating: 0, count: 65536)
        while !String(decoding: received, as: UTF8.self).contains(text) {
            let n = recv(fd, &buf, buf.count, 0)
            if n <= 0 { return false }
            received += buf[0..<n]
        }
        return true
    }

    /// True when the server has closed this connection (EOF or reset), reading what is left.
    func closedByServer(seconds: Double) -> Bool {
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        let end = Sys.monotonicNanos() + UInt64(seconds * 1e9)
        while Sys.monotonicNanos() < end {
            let n = recv(fd, &buf, buf.count, 0)
            if n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) { return true }
        }
        return false
    }

    func negotiate() -> Bool {
        send(#"{"execute":"qmp_capabilities"}"#)
        return waitFor(#""return":{}"#)
    }
}

@Suite("QMP against hostile clients", .serialized)
struct QMPHostileClientTests {
    let path = "/tmp/ferry-qmp-hostile-\(getpid()).sock"

    func withServer(_ body: (VMHost, QMPServer) throws -> Void) throws {
        let host = try VMHost.forTest(memory: 32 << 20, incoming: false)
        try host.boot(image: nil)
        let server = try QMPServer(path: path, host: host)
        try server.start()
        defer { server.close(); host.stop() }
        try body(host, server)
        // Whatever the clients did, the guest still runs and its memory is whole.
        #expect(host.runState == .running)
        #expect(waitForPasses(host.machine, 1))
        host.machine.pause()
        #expect(checkMemory(host.machine).passed)
        host.machine.resume()
    }

    /// A well-behaved client must be answered promptly throughout.
    func expectHealthy() throws {
        let c = try RawQMP(path)
        #expect(c.negotiate())
        c.send(#"{"execute":"query-status","id":7}"#)
        #expect(c.waitFor(#""status":"running""#))
    }

    @Test("the socket is created with mode 0600")
    func socketMode() throws {
        try withServer { _, _ in
            var st = stat()
            #expect(stat(path, &st) == 0)
            #expect(st.st_mode & 0o777 == 0o600)
        }
    }

    @Test("garbage, non-objects, unknown members and deep nesting get errors; the same client then works")
    func garbage() throws {
        try withServer { _, _ in
            let c = try RawQMP(path)
            #expect(c.waitFor(#""QMP""#))
            c.send([0x00, 0xff, 0x7f] + Array("garbage".utf8))
            #expect(c.waitFor("invalid character"))
            c.send(#"{"execute": 12}"#)
            #expect(c.waitFor("lacks member 'execute'"))
            c.send(#"{"execute":"query-status","bogus":1}"#)
            #expect(c.waitFor("'bogus' is unexpected"))
            c.send(#"{"execute":"query-status","arguments":[1]}"#)
            #expect(c.waitFor("must be an object"))
            c.send(String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000))
            #expect(c.waitFor("nesting deeper"))
            c.send(#"{"unterminated": "string\"}"# + "\n}")
            c.send(#""}"#)
            #expect(c.negotiate())
            c.send(#"{"execute":"query-status"}"#)
            #expect(c.waitFor(#""running":true"#))
            try expectHealthy()
        }
    }

    @Test("an endless line is cut at 1 MiB with an error; memory stays bounded and other clients are served")
    func endlessLine() throws {
        try withServer { _, _ in
            let c = try RawQMP(path)
            #expect(c.negotiate())
            c.send(#"{"execute":"query-status","arguments":{"x":""#)
            let chunk = [UInt8](repeating: UInt8(ascii: "x"), count: 256 << 10)
            for _ in 0..<12 { c.send(chunk) } // 3 MiB and never closed
            #expect(c.waitFor("too long"))
            try expectHealthy()
        }
    }

    @Test("a client that disconnects mid-command, or sends and never reads, affects neither the VM nor other clients")
    func disconnectsAndStuckReaders() throws {
        try withServer { _, _ in
            for _ in 0..<20 {
                let c = try RawQMP(path)
                #expect(c.negotiate())
                c.send(#"{"execute":"query-migrate-param"#) // and gone
            }
            // Tens of MB of replies to a client that never reads: dropped, not buffered.
            let stuck = try RawQMP(path)
            #expect(stuck.negotiate())
            var tiny = Int32(4096)
            setsockopt(stuck.fd, SOL_SOCKET, SO_RCVBUF, &tiny, 4)
            let burst = String(repeating: #"{"execute":"query-migrate-parameters"}"#, count: 2000)
            let start = Sys.monotonicNanos()
            for _ in 0..<40 { stuck.send(burst) }
            try expectHealthy()
            #expect(Sys.monotonicNanos() - start < 10_000_000_000 * testTimeScale)
            #expect(stuck.closedByServer(seconds: 10), "a client that never reads must be dropped")
            try expectHealthy()
        }
    }
}

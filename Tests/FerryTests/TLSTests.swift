import FerryHarness
import FerryMachine
import FerryMigration
import FerryQMP
import FerryTLS
import Foundation
import Glibc
import Testing

/// Test credentials made once per test run by scripts/tls-creds.sh (openssl), in QEMU's
/// tls-creds-x509 layout.
enum TLSFixture {
    enum Kind: Sendable { case x509, psk }

    static let directory: String = {
        let dir = "/tmp/ferry-tls-\(getpid())"
        do { try makeTestTLSCredentials(in: dir) } catch { preconditionFailure("\(error)") }
        return dir
    }()

    static func credentials(_ kind: Kind, _ side: String, id: String = "tls0") throws -> TLSCredentials {
        switch kind {
        case .x509:
            return try TLSCredentials(id: id, kind: .x509(dir: "\(directory)/\(side)"), endpoint: side == "server" ? .server : .client)
        case .psk:
            return try TLSCredentials(id: id, kind: .psk(dir: "\(directory)/psk", username: "qemu"), endpoint: side == "server" ? .server : .client)
        }
    }

    /// Source: endpoint=client; destination: endpoint=server (verify-peer on: client certificates checked).
    static func install(_ kind: Kind, source: VMHost, destination: VMHost) throws {
        try source.addObject(try credentials(kind, "client"))
        try destination.addObject(try credentials(kind, "server"))
        for h in [source, destination] { h.setParameters { $0.tlsCreds = "tls0" } }
    }
}

@Suite("TLS migration", .serialized)
struct TLSTests {
    /// The stream's header, magic "QEVM" and version 3, which must never cross the wire in the clear.
    static let magic: [UInt8] = [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]

    @Test("precopy over TLS (x509 with client certificates, and PSK) completes; nothing crosses the wire in the clear; the memory check passes",
          arguments: [TLSFixture.Kind.x509, .psk])
    func precopy(kind: TLSFixture.Kind) throws {
        let pair = try Pair()
        try TLSFixture.install(kind, source: pair.source, destination: pair.destination)
        let target = try pair.listen()
        guard case let .tcp(_, port) = try MigrationURI(target) else { Issue.record("not tcp"); return }
        let proxy = try FaultProxy(upstream: port)
        defer { proxy.close() }
        proxy.on(.toDestination, pattern: Self.magic, .reset)
        // The pattern-watching proxy is slower than the guest dirties memory: allow the downtime.
        // Scaled as every test's limits are: under ThreadSanitizer the proxy is slower still.
        pair.source.setParameters { $0.maxBandwidth = 0; $0.downtimeLimit = 5000 * testTimeScale }
        try pair.source.migrate(uri: proxy.uri)
        #expect(pair.source.waitForMigration(seconds: scaled(60)) == .completed, "\(pair.source.queryMigrate().errorDescription ?? "")")
        #expect(pair.destination.waitForMigration(seconds: scaled(10)) == .completed, "\(pair.destination.queryMigrate().errorDescription ?? "")")
        #expect(proxy.fired.isEmpty, "the stream's header crossed the wire in the clear")
        #expect(pair.source.queryMigrate().tls?.hasPrefix("TLSv1.3") == true, "\(pair.source.queryMigrate().tls ?? "no TLS")")
        #expect(pair.destination.queryMigrate().tls?.hasPrefix("TLSv1.3") == true)
        pair.expectDestinationRunsCorrectly()
    }

    @Test("postcopy with preempt over TLS: a reset link pauses both sides, recovery reconnects through TLS (main and urgent channels), memory verified")
    func postcopyRecovery() throws {
        let p = try ProxiedPair(preempt: true, tls: .x509)
        p.proxy.on(.toDestination, pattern: Self.magic, .corrupt)
        try p.startPostcopy()
        #expect(p.bothActive())
        #expect(waitUntil { p.proxy.accepted >= 2 }, "no urgent-page channel was opened")
        p.proxy.reset()
        #expect(waitUntil { p.source.queryMigrate().recoveries >= 1 }, "\(p.source.queryMigrate().status): \(p.source.queryMigrate().errorDescription ?? "")")
        p.proxy.reset() // and once more, in the recovered migration
        #expect(waitUntil { p.source.queryMigrate().recoveries >= 2 || p.source.queryMigrate().status == .completed })
        p.expectCompleted()
        #expect(p.proxy.accepted >= 4)
        // The recoveries' channels resumed the first TLS session: no certificates, no signatures.
        #expect(p.source.queryMigrate().tls?.hasSuffix("resumed session") == true, "\(p.source.queryMigrate().tls ?? "no TLS")")
        #expect(!p.proxy.fired.contains { $0.hasPrefix("corrupt") }, "the stream's header crossed the wire in the clear: \(p.proxy.fired)")
        #expect(!p.sourceStatuses.values.contains(.failed) && !p.destinationStatuses.values.contains(.failed))
    }

    @Test("a plain source against a TLS destination is refused with a clear error; the source guest keeps running intact")
    func plainClientRefused() throws {
        let pair = try Pair()
        try pair.destination.addObject(try TLSFixture.credentials(.x509, "server"))
        pair.destination.setParameters { $0.tlsCreds = "tls0" }
        let target = try pair.listen()
        try pair.source.migrate(uri: target)
        #expect(pair.destination.waitForMigration(seconds: scaled(10)) == .failed)
        let why = pair.destination.queryMigrate().errorDescription ?? ""
        #expect(why.contains("TLS is required") && why.contains("plain migration stream"), "\(why)")
        #expect(pair.source.waitForMigration(seconds: scaled(10)) == .failed)
        #expect(pair.source.runState == .running)
        #expect(waitForPasses(pair.source.machine, 1))
        #expect(pair.destination.runState == .inmigrate)
    }

    enum Mismatch: String, CaseIterable, Sendable { case untrustedClient, wrongHostname, plainDestination, noClientCertificate }

    @Test("TLS mismatches fail the migration with the reason, never the source guest", arguments: Mismatch.allCases)
    func mismatch(_ m: Mismatch) throws {
        let pair = try Pair()
        switch m {
        case .untrustedClient:
            try pair.source.addObject(try TLSCredentials(id: "tls0", kind: .x509(dir: "\(TLSFixture.directory)/rogue"), endpoint: .client))
            try pair.destination.addObject(try TLSFixture.credentials(.x509, "server"))
        case .wrongHostname:
            try TLSFixture.install(.x509, source: pair.source, destination: pair.destination)
            pair.source.setParameters { $0.tlsHostname = "evil.example" }
        case .plainDestination:
            try pair.source.addObject(try TLSFixture.credentials(.x509, "client"))
        case .noClientCertificate:
            // A client directory with the CA only: the server's verify-peer refuses it.
            let dir = "\(TLSFixture.directory)/ca-only"
            mkdir(dir, 0o700)
            _ = try? FileManager.default.copyItem(atPath: "\(TLSFixture.directory)/client/ca-cert.pem", toPath: "\(dir)/ca-cert.pem")
            try pair.source.addObject(try TLSCredentials(id: "tls0", kind: .x509(dir: dir), endpoint: .client))
            try pair.destination.addObject(try TLSFixture.credentials(.x509, "server"))
        }
        pair.source.setParameters { $0.tlsCreds = "tls0" }
        if m != .plainDestination { pair.destination.setParameters { $0.tlsCreds = "tls0" } }
        let target = try pair.listen()
        try pair.source.migrate(uri: target)
        #expect(pair.source.waitForMigration(seconds: scaled(15)) == .failed)
        let why = pair.source.queryMigrate().errorDescription ?? ""
        switch m {
        case .wrongHostname: #expect(why.contains("certificate") && why.contains("rejected"), "\(why)")
        default: #expect(why.contains("TLS"), "\(why)")
        }
        if m != .plainDestination {
            #expect(pair.destination.waitForMigration(seconds: scaled(15)) == .failed)
            #expect(pair.destination.runState == .inmigrate, "the destination must not start a guest")
        }
        #expect(pair.source.runState == .running)
        #expect(waitForPasses(pair.source.machine, 1))
    }

    @Test("bad TLS set-ups are refused before anything is sent: unknown id, wrong endpoint, missing files, a non-socket URI")
    func badSetups() throws {
        let pair = try Pair()
        pair.source.setParameters { $0.tlsCreds = "nope" }
        #expect(throws: MigrationError.self) { try pair.source.migrate(uri: "tcp:127.0.0.1:1") }
        try pair.source.addObject(try TLSFixture.credentials(.x509, "server", id: "srv"))
        pair.source.setParameters { $0.tlsCreds = "srv" }
        do { try pair.source.migrate(uri: "tcp:127.0.0.1:1"); Issue.record("wrong endpoint accepted") } catch {
            #expect("\(error)".contains("client endpoint"), "\(error)")
        }
        #expect(throws: TLSError.self) { try TLSCredentials(id: "x", kind: .x509(dir: "/nonexistent"), endpoint: .server) }
        #expect(throws: (any Error).self) { try pair.source.addObject(try TLSFixture.credentials(.x509, "server", id: "srv")) }
        try pair.source.addObject(try TLSFixture.credentials(.x509, "client", id: "cli"))
        pair.source.setParameters { $0.tlsCreds = "cli" }
        do { try pair.source.migrate(uri: "exec:cat > /dev/null"); Issue.record("TLS over exec accepted") } catch {
            #expect("\(error)".contains("tcp: or unix:"), "\(error)")
        }
        #expect(pair.source.runState == .running)
        // The command-line syntax of -object.
        let props = try QOMObjects.parseCommandLine("tls-creds-x509,id=t1,dir=/a,,b,endpoint=server,verify-peer=off")
        #expect(props["qom-type"] as? String == "tls-creds-x509" && props["dir"] as? String == "/a,b" && props["verify-peer"] as? Bool == false)
    }
}

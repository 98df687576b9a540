import FerryHarness
import FerryMachine
@testable import FerryMigration
import FerrySys
import FerryWire
import Glibc
import Testing

@Suite("multifd codec")
struct MultifdCodecTests {
    static let layout = RAMLayout(blocks: [.init(name: "pc.ram", length: 64 << 20)])

    @Test("MultiFDInit: 64 bytes, QEMU's magic and version, the uuid at 8 and the id at 24; a wrong magic or version is refused")
    func initial() throws {
        let uuid = (0..<16).map { UInt8($0 + 1) }
        let b = MultiFD.Initial(uuid: uuid, id: 3).encoded()
        #expect(b.count == 64)
        #expect(Array(b[0..<8]) == [0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1])
        #expect(Array(b[8..<24]) == uuid && b[24] == 3 && b[25...].allSatisfy { $0 == 0 })
        #expect(try MultiFD.Initial(decoding: b) == MultiFD.Initial(uuid: uuid, id: 3))
        var bad = b; bad[0] = 0x51
        #expect(throws: WireError.self) { try MultiFD.Initial(decoding: bad) }
        bad = b; bad[7] = 2
        #expect(throws: WireError.self) { try MultiFD.Initial(decoding: bad) }
        #expect(throws: WireError.self) { try MultiFD.Initial(decoding: Array(b[0..<63])) }
    }

    @Test("packet header: 320 bytes and 128 offsets (1344), QEMU's field order, normal offsets then zero ones; decodes to itself")
    func packetRoundTrip() throws {
        let p = MultiFD.Packet(flags: MultiFD.flagSync | MultiFD.Compression.zstd.flag, nextPacketSize: 777, packetNum: 0x0102_0304_0506_0708,
                               blockName: "pc.ram", normal: [0x1000, 0x5000], zero: [0x3000])
        var b = WireBuffer()
        p.encode(into: &b)
        #expect(b.count == 1344 && MultiFD.packetHeaderSize == 1344)
        let bytes = b.bytes
        func be32(_ at: Int) -> UInt32 { bytes[at..<at + 4].reduce(0) { $0 << 8 | UInt32($1) } }
        #expect(be32(0) == 0x1122_3344 && be32(4) == 1 && be32(8) == 5 && be32(12) == 128)
        #expect(be32(16) == 2 && be32(20) == 777 && be32(24) == 0x0102_0304 && be32(28) == 0x0506_0708 && be32(32) == 1)
        #expect(String(decoding: bytes[64..<70], as: UTF8.self) == "pc.ram" && bytes[70] == 0)
        #expect(be32(320) == 0 && be32(324) == 0x1000 && be32(332) == 0x5000 && be32(340) == 0x3000 && be32(348) == 0)
        #expect(try MultiFD.Packet(decoding: bytes, layout: Self.layout, compression: .zstd) == p)
    }

    @Test("a bad packet header is refused with the reason: magic, version, another compression, too many pages, unknown block, offset outside or unaligned, data size")
    func hostileHeaders() throws {
        func header(_ edit: (inout [UInt8]) -> Void = { _ in }, normal: [UInt64] = [0x1000], zero: [UInt64] = [], size: UInt32 = 4096,
                    block: String = "pc.ram") -> [UInt8] {
            var b = WireBuffer()
            MultiFD.Packet(flags: 0, nextPacketSize: size, packetNum: 1, blockName: block, normal: normal, zero: zero).encode(into: &b)
            var bytes = b.bytes
            edit(&bytes)
            return bytes
        }
        func refused(_ bytes: [UInt8], _ code: WireError.Code, compression: MultiFD.Compression = .none) {
            #expect(throws: WireError.self) {
                do { _ = try MultiFD.Packet(decoding: bytes, layout: Self.layout, compression: compression) } catch let e as WireError {
                    #expect(e.code == code, "\(e)")
                    throw e
                }
            }
        }
        #expect(try MultiFD.Packet(decoding: header(), layout: Self.layout, compression: .none).normal == [0x1000])
        refused(header { $0[3] = 0x45 }, .badMagic)
        refused(header { $0[7] = 9 }, .badVersion)
        refused(header(), .badFlags, compression: .zstd) // the source compresses nothing, this side expects zstd
        refused(header { $0[11] = 0x40 }, .badFlags) // an unknown flag
        refused(header { $0[14] = 1 }, .badLength) // pages_alloc 384 > 128
        refused(header { $0[19] = 100; $0[35] = 100 }, .badLength) // 100 normal + 100 zero > 128
        refused(header(block: "vga.vram"), .unknownBlock)
        refused(header(normal: [64 << 20]), .badOffset)
        refused(header(normal: [0x1800]), .badOffset)
        refused(header(size: 4095), .badLength)
        refused(Array(header().dropLast()), .truncated)
        // A SYNC packet without pages names no block it must have.
        var sync = WireBuffer()
        MultiFD.Packet(flags: MultiFD.flagSync, nextPacketSize: 0, packetNum: 9, blockName: "", normal: [], zero: []).encode(into: &sync)
        #expect(try MultiFD.Packet(decoding: sync.bytes, layout: Self.layout, compression: .none).isSync)
    }

    @Test("RAM_SAVE_FLAG_MULTIFD_FLUSH decodes alone; with other bits it is refused")
    func flushRecord() throws {
        var b = WireBuffer()
        b.multifdFlush()
        b.ramEOS()
        #expect(b.bytes == [0, 0, 0, 0, 0, 0, 2, 0] + [0, 0, 0, 0, 0, 0, 0, 0x10])
        let d = StreamDecoder(source: ByteArraySource(b.bytes), layout: Self.layout)
        #expect(try d.nextRAMRecord() == .multifdFlush)
        #expect(try d.nextRAMRecord() == .eos)
        let bad = StreamDecoder(source: ByteArraySource([0, 0, 0, 0, 0, 0, 0x12, 0]), layout: Self.layout)
        #expect(throws: WireError.self) { try bad.nextRAMRecord() }
    }

    @Test("zstd: one context per channel, packets decode in order with the previous ones; a flipped byte or a short packet fails, never traps")
    func zstdStream() throws {
        let pages = (0..<6).map { k -> UnsafeMutableRawPointer in
            let p = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
            for i in 0..<4096 { p.storeBytes(of: UInt8((i * (k + 1)) & 0xff), toByteOffset: i, as: UInt8.self) }
            return p
        }
        let out = (0..<6).map { _ in UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096) }
        defer { for p in pages + out { p.deallocate() } }
        let c = try ZstdCompressor(level: 1)
        let d = try ZstdDecompressor()
        var packets: [[UInt8]] = []
        for r in [0..<3, 3..<6] {
            let n = try c.compress(r.map { UnsafeRawPointer(pages[$0]) })
            packets.append(Array(UnsafeRawBufferPointer(rebasing: c.output[0..<n])))
        }
        #expect(packets[0].count < 3 * 4096 / 4, "patterned pages compress: \(packets[0].count) bytes")
        for (k, r) in [0..<3, 3..<6].enumerated() {
            try packets[k].withUnsafeBytes { try d.decompress($0, into: r.map { out[$0] }) }
        }
        for k in 0..<6 { #expect(memcmp(pages[k], out[k], 4096) == 0, "page \(k)") }
        // The same packets on a fresh context: a flipped byte, or one byte short.
        let c2 = try ZstdCompressor(level: 1)
        let n = try c2.compress([UnsafeRawPointer(pages[0]), UnsafeRawPointer(pages[1])])
        var bad = Array(UnsafeRawBufferPointer(rebasing: c2.output[0..<n]))
        bad[bad.count / 2] ^= 0xff
        bad[3] ^= 0x5a
        #expect(throws: MigrationError.self) { try bad.withUnsafeBytes { try ZstdDecompressor().decompress($0, into: [out[0], out[1]]) } }
        let short = Array(UnsafeRawBufferPointer(rebasing: c2.output[0..<(n - 1)]))
        #expect(throws: MigrationError.self) { try short.withUnsafeBytes { try ZstdDecompressor().decompress($0, into: [out[0], out[1]]) } }
    }
}

@Suite("multifd migration", .serialized)
struct MultifdMigrationTests {
    static func enable(_ pair: Pair, channels: UInt64 = 4, compression: MultiFD.Compression = .none, extra: [(MigrationCapability, Bool)] = []) throws {
        for h in [pair.source, pair.destination] {
            try h.setCapabilities([(.multifd, true)] + extra)
            h.setParameters { $0.multifdChannels = channels; $0.multifdCompression = compression }
        }
    }

    @Test("multifd, 4 channels, no compression: a random-content guest completes, its pages on the multifd channels, memory exact",
          arguments: [MultiFD.Compression.none, .zstd])
    func completes(compression: MultiFD.Compression) throws {
        let pair = try Pair(contents: .random(seed: 21))
        try Self.enable(pair, compression: compression)
        let target = try pair.listen()
        pair.source.setParameters { $0.maxBandwidth = 0 }
        try pair.source.migrate(uri: target)
        #expect(pair.source.waitForMigration(seconds: scaled(60)) == .completed, "\(pair.source.queryMigrate().errorDescription ?? "")")
        #expect(pair.destination.waitForMigration(seconds: scaled(10)) == .completed, "\(pair.destination.queryMigrate().errorDescription ?? "")")
        let s = pair.source.queryMigrate(), d = pair.destination.queryMigrate()
        // Every page goes on the multifd channels: the main one carries the rest.
        #expect(s.multifdBytes > 64 << 20 && s.transferred - s.multifdBytes < 2 << 20, "multifd \(s.multifdBytes) of \(s.transferred)")
        #expect(d.multifdBytes == s.multifdBytes && d.transferred == s.transferred, "destination read \(d.multifdBytes)/\(d.transferred)")
        #expect(s.normal >= 16_000, "\(s.normal) normal pages")
        pair.expectDestinationRunsCorrectly()
    }

    @Test("multifd + zstd on the page-counting guest (mostly zero bytes): far fewer bytes than RAM; zero pages counted on the sender threads")
    func zstdCompresses() throws {
        let pair = try Pair()
        try Self.enable(pair, channels: 2, compression: .zstd)
        let target = try pair.listen()
        pair.source.setParameters { $0.maxBandwidth = 0 }
        try pair.source.migrate(uri: target)
        #expect(pair.source.waitForMigration(seconds: scaled(60)) == .completed, "\(pair.source.queryMigrate().errorDescription ?? "")")
        #expect(pair.destination.waitForMigration(seconds: scaled(10)) == .completed, "\(pair.destination.queryMigrate().errorDescription ?? "")")
        let s = pair.source.queryMigrate()
        #expect(s.multifdBytes > 0 && s.transferred < 16 << 20, "\(s.transferred) bytes for 64 MiB; multifd \(s.multifdBytes), normal \(s.normal), duplicate \(s.duplicate), syncs \(s.dirtySyncCount), mbps \(s.mbps), remaining \(s.remaining)")
        #expect(s.normal + s.duplicate >= 16_384, "normal \(s.normal), duplicate \(s.duplicate)")
        pair.expectDestinationRunsCorrectly()
    }

    @Test("a multifd channel reset in precopy (at its first SYNC packet): both sides fail, the destination saying why, the source guest runs on intact, and migrates again")
    func channelLoss() throws {
        let pair = try Pair(contents: .random(seed: 22))
        try Self.enable(pair, channels: 2)
        let target = try pair.listen()
        guard case let .tcp(_, port) = try MigrationURI(target) else { throw MigrationError(.badURI, target) }
        let proxy = try FaultProxy(upstream: port)
        defer { proxy.close() }
        // A SYNC packet: magic, version 1, flags SYNC, 128 pages, no normal pages.
        proxy.on(.toDestination, pattern: [0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0x80, 0, 0, 0, 0], .reset)
        pair.source.setParameters { $0.maxBandwidth = 50_000_000 }
        try pair.source.migrate(uri: proxy.uri)
        #expect(pair.source.waitForMigration(seconds: scaled(60)) == .failed)
        let error = pair.source.queryMigrate().errorDescription ?? ""
        #expect(proxy.fired == ["reset toDestination"], "\(error)")
        #expect(pair.destination.waitForMigration(seconds: scaled(10)) == .failed)
        #expect((pair.destination.queryMigrate().errorDescription ?? "").contains("multifd channel"), "\(pair.destination.queryMigrate().errorDescription ?? "")")
        // The source learns it from its own channel's reset or from the destination closing
        // the main channel, whichever comes first (the return path has no words for why).
        #expect(error.contains("multifd") || error.contains("connection closed by peer"), "\(error)")
        #expect(pair.source.runState == .running)
        #expect(waitForPasses(pair.source.machine, 2), "the source guest is not counting")
        // The source is intact: a second migration, to a fresh destination, completes exactly.
        let again = try VMHost.forTest(memory: 64 << 20, incoming: true)
        let keep = StopsOnRelease([again])
        try again.setCapabilities([(.multifd, true)])
        again.setParameters { $0.multifdChannels = 2 }
        try again.migrateIncoming(uri: "tcp:127.0.0.1:0")
        pair.source.setParameters { $0.maxBandwidth = 0 }
        try pair.source.migrate(uri: again.queryMigrate().socketAddress!.description)
        #expect(pair.source.waitForMigration(seconds: scaled(60)) == .completed, "\(pair.source.queryMigrate().errorDescription ?? "")")
        #expect(again.waitForMigration(seconds: scaled(10)) == .completed)
        #expect(waitForPasses(again.machine, 2))
        again.machine.pause()
        let report = checkMemory(again.machine, contents: pair.contents)
        #expect(report.passed, "\(report)")
        _ = keep
    }

    @Test("multifd + postcopy (as QEMU allows): precopy pages on multifd, flushed before the discards; postcopy completes, memory exact")
    func withPostcopy() throws {
        let pair = try Pair(contents: .random(seed: 23))
        try Self.enable(pair, channels: 2, extra: [(.postcopyRAM, true)])
        let target = try pair.listen()
        pair.source.setParameters { $0.maxBandwidth = 20_000_000 }
        try pair.source.migrate(uri: target)
        #expect(waitUntil { pair.source.queryMigrate().multifdBytes > 4 << 20 })
        try pair.source.startPostcopy()
        pair.source.setParameters { $0.maxBandwidth = 0 }
        #expect(pair.source.waitForMigration(seconds: scaled(60)) == .completed, "\(pair.source.queryMigrate().errorDescription ?? "")")
        #expect(pair.destination.waitForMigration(seconds: scaled(10)) == .completed, "\(pair.destination.queryMigrate().errorDescription ?? "")")
        let s = pair.source.queryMigrate()
        #expect(s.multifdBytes > 4 << 20 && s.postcopyBytes > 0, "multifd \(s.multifdBytes), postcopy \(s.postcopyBytes)")
        pair.expectDestinationRunsCorrectly()
    }

    @Test("mismatched multifd settings fail clearly and leave the source guest running: channel count, compression, exec: URI")
    func mismatches() throws {
        // The destination waits for 2 channels; the source opens 1, compressed.
        let pair = try Pair()
        try Self.enable(pair, channels: 2)
        pair.source.setParameters { $0.multifdChannels = 1; $0.multifdCompression = .zstd; $0.maxBandwidth = 0 }
        let target = try pair.listen()
        try pair.source.migrate(uri: target)
        #expect(pair.destination.waitForMigration(seconds: scaled(30)) == .failed)
        #expect((pair.destination.queryMigrate().errorDescription ?? "").contains("1 of 2 multifd channels"), "\(pair.destination.queryMigrate().errorDescription ?? "")")
        #expect(pair.source.waitForMigration(seconds: scaled(30)) == .failed)
        #expect(pair.source.runState == .running)
        // Same count, other compression: the first packet is refused by name.
        let pair2 = try Pair()
        try Self.enable(pair2, channels: 2)
        pair2.source.setParameters { $0.multifdCompression = .zstd; $0.maxBandwidth = 0 }
        try pair2.source.migrate(uri: try pair2.listen())
        #expect(pair2.destination.waitForMigration(seconds: scaled(30)) == .failed)
        #expect((pair2.destination.queryMigrate().errorDescription ?? "").contains("multifd-compression none here"), "\(pair2.destination.queryMigrate().errorDescription ?? "")")
        #expect(pair2.source.waitForMigration(seconds: scaled(30)) == .failed)
        #expect(pair2.source.runState == .running)
        // exec: has one channel only: QEMU's words.
        try pair2.source.migrate(uri: "exec:cat > /dev/null")
        #expect(pair2.source.waitForMigration(seconds: scaled(30)) == .failed)
        #expect((pair2.source.queryMigrate().errorDescription ?? "").contains("multifd is not supported by current protocol"))
        #expect(pair2.source.runState == .running)
    }
}

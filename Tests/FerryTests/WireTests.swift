import FerryWire
import Testing

/// Builds streams with the encoder, decodes them with the decoder.
@Suite("wire codec")
struct WireTests {
    let layout = RAMLayout(blocks: [.init(name: "pc.ram", length: 1 << 20)])

    func stream(pages: [(UInt64, Bool)] = [(0, false), (4096, true)], cpu: [UInt8] = [1, 2, 3],
                mutate: (inout WireBuffer) -> Void = { _ in }) -> [UInt8] {
        var w = WireBuffer()
        w.fileHeader()
        w.configuration()
        w.command(.openReturnPath)
        w.ping(1)
        w.sectionHeader(.start, id: 0, name: "ram", version: 4)
        w.ramMemSize(blocks: [("pc.ram", 1 << 20)])
        w.ramEOS()
        w.footer(id: 0)
        w.sectionShort(.part, id: 0)
        var first = true
        for (off, zero) in pages {
            w.ramRecord(offset: off, flags: zero ? .zero : .page, block: first ? "pc.ram" : nil)
            if !zero { w.append([UInt8](repeating: 0xab, count: 4096)) }
            first = false
        }
        w.ramEOS()
        w.footer(id: 0)
        mutate(&w)
        w.sectionHeader(.full, id: 1, name: Wire.cpuSectionName, version: 1)
        w.be32(UInt32(cpu.count)); w.append(cpu)
        w.footer(id: 1)
        w.eof()
        return w.bytes
    }

    /// Decodes a whole stream the way the destination does; returns the pages seen.
    @discardableResult
    func decode(_ bytes: [UInt8]) throws -> [RAMRecord] {
        let src = ByteArraySource(bytes)
        let d = StreamDecoder(source: src, layout: layout)
        try d.readFileHeader()
        var records: [RAMRecord] = []
        while true {
            switch try d.nextItem() {
            case .configuration(let m): if m != Wire.machineType { throw WireError(.badMachine, m) }
            case .section(let h) where h.name == "ram":
                while true {
                    let r = try d.nextRAMRecord()
                    if r == .eos { break }
                    if case .page = r { _ = try src.bytes(4096) }
                    records.append(r)
                }
                try d.readFooter(expecting: h.id)
            case .section(let h):
                _ = try d.readDeviceBlob()
                try d.readFooter(expecting: h.id)
            case .command: continue
            case .eof: return records
            }
        }
    }

    func code(_ bytes: [UInt8]) -> WireError.Code? {
        do { try decode(bytes); return nil } catch let e as WireError { return e.code } catch { return nil }
    }

    @Test("a valid stream decodes to the records that were encoded")
    func roundTrip() throws {
        let records = try decode(stream())
        #expect(records == [.memSize(blocks: [.init(name: "pc.ram", length: 1 << 20)]), .page(block: 0, offset: 0), .zero(block: 0, offset: 4096)])
    }

    @Test("ZERO records written in bulk are the bytes of one record at a time and decode to the same pages")
    func bulkZeroRecords() throws {
        let first = 5, count = 70
        var one = WireBuffer()
        for k in 0..<count { one.ramRecord(offset: UInt64(first + k) << 12, flags: .zero, block: nil) }
        var bulk = [UInt8](repeating: 0xee, count: count * WireBuffer.continuedZeroRecordBytes)
        bulk.withUnsafeMutableBytes { WireBuffer.continuedZeroRecords(firstPage: first, count: count, into: $0.baseAddress! ) }
        #expect(bulk == one.bytes)
        let records = try decode(stream(pages: [(0, false)]) { w in
            w.sectionShort(.part, id: 0)
            w.ramRecord(offset: 0, flags: .zero, block: "pc.ram")
            w.append(bulk)
            w.ramEOS()
            w.footer(id: 0)
        })
        #expect(records.suffix(count) == (0..<count).map { RAMRecord.zero(block: 0, offset: UInt64(first + $0) << 12) }[...])
    }

    @Test("wrong magic and obsolete version are refused")
    func magic() {
        var s = stream(); s[0] = 0x00
        #expect(code(s) == .badMagic)
        var v = stream(); v[7] = 2
        #expect(code(v) == .badVersion)
    }

    @Test("an unknown section is refused")
    func unknownSection() {
        let s = stream { w in w.sectionHeader(.full, id: 9, name: "virtio-net", version: 1) }
        #expect(code(s) == .unknownSection)
        var t = stream(); t[8] = 0x66 // configuration byte replaced by an unknown type
        #expect(code(t) == .unknownSection)
    }

    @Test("a bad block name is refused")
    func badBlock() {
        let s = stream { w in w.sectionShort(.part, id: 0); w.ramRecord(offset: 0, flags: .zero, block: "nope"); w.ramEOS(); w.footer(id: 0) }
        #expect(code(s) == .unknownBlock)
    }

    @Test("an offset past the block is refused", arguments: [UInt64(1 << 20), UInt64(1 << 40), UInt64(0xffff_ffff_ffff_f000)])
    func offsetPastBlock(offset: UInt64) {
        let s = stream { w in w.sectionShort(.part, id: 0); w.ramRecord(offset: offset, flags: .page, block: "pc.ram") }
        #expect(code(s) == .badOffset)
    }

    @Test("oversized lengths are refused before anything is allocated")
    func oversized() {
        var w = WireBuffer(); w.fileHeader(); w.u8(SectionType.configuration.rawValue); w.be32(0xffff_ffff)
        #expect(code(w.bytes) == .badLength)
        var big = WireBuffer(); big.fileHeader(); big.configuration()
        big.sectionHeader(.full, id: 1, name: Wire.cpuSectionName, version: 1); big.be32(0x7fff_ffff)
        #expect(code(big.bytes) == .badLength)
        var ping = WireBuffer(); ping.fileHeader(); ping.u8(SectionType.command.rawValue); ping.be16(CommandType.ping.rawValue); ping.be16(9); ping.append([UInt8](repeating: 0, count: 9))
        #expect(code(ping.bytes) == .badLength)
    }

    @Test("a stream that ends mid-page, mid-header or anywhere else is truncated, never a crash")
    func truncated() {
        let s = stream()
        for cut in stride(from: 0, to: s.count - 1, by: 97) {
            #expect(code(Array(s[0..<cut])) != nil, "a stream cut at \(cut) decoded")
        }
        #expect(code(Array(s.dropLast(4200))) == .truncated)
    }

    @Test("section footers and ids are checked")
    func footers() {
        let s = stream { w in w.sectionShort(.part, id: 0); w.ramEOS(); w.footer(id: 5) }
        #expect(code(s) == .badFooter)
        let unknownID = stream { w in w.sectionShort(.part, id: 3) }
        #expect(code(unknownID) == .badSectionID)
    }

    @Test("a layout mismatch is refused")
    func layoutMismatch() {
        var w = WireBuffer(); w.fileHeader(); w.configuration()
        w.sectionHeader(.start, id: 0, name: "ram", version: 4); w.ramMemSize(blocks: [("pc.ram", 2 << 20)])
        #expect(code(w.bytes) == .badBlockLayout)
    }

    @Test("random corruption never traps")
    func randomCorruption() {
        var rng = SystemRandomNumberGenerator()
        let base = stream()
        for _ in 0..<2000 {
            var s = base
            for _ in 0..<Int.random(in: 1...4, using: &rng) { s[Int.random(in: 0..<s.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng) }
            _ = code(s)
        }
    }

    @Test("return-path messages round-trip and bad ones are refused")
    func returnPath() throws {
        var w = WireBuffer()
        w.rpPong(7)
        w.rpRequestPages(block: "pc.ram", offset: 8192, length: 4096)
        w.rpRequestPages(block: nil, offset: 12288, length: 4096)
        w.rpShut(0)
        let src = ByteArraySource(w.bytes)
        #expect(try ReturnPathDecoder.next(src) == .pong(7))
        #expect(try ReturnPathDecoder.next(src) == .requestPages(block: "pc.ram", offset: 8192, length: 4096))
        #expect(try ReturnPathDecoder.next(src) == .requestPages(block: nil, offset: 12288, length: 4096))
        #expect(try ReturnPathDecoder.next(src) == .shut(0))
        var bad = WireBuffer(); bad.be16(4); bad.be16(600)
        #expect(throws: WireError.self) { try ReturnPathDecoder.next(ByteArraySource(bad.bytes)) }
        var bitmap = WireBuffer(); bitmap.rpReceivedBitmap(block: "pc.ram", bitmap: [UInt8](repeating: 0xff, count: 32))
        let bs = ByteArraySource(bitmap.bytes)
        #expect(try ReturnPathDecoder.next(bs) == .receivedBitmap(block: "pc.ram"))
        #expect(try ReturnPathDecoder.readReceivedBitmap(bs, expectedBytes: 32).count == 32)
        // A bitmap of the wrong size, or a huge claimed size, is refused before it is read.
        for claimed in [UInt64(31), 33, 1 << 62] {
            var w = WireBuffer(); w.be64(claimed); w.append([UInt8](repeating: 0, count: 40))
            #expect(throws: WireError.self) { try ReturnPathDecoder.readReceivedBitmap(ByteArraySource(w.bytes), expectedBytes: 32) }
        }
        var badEnd = WireBuffer(); badEnd.be64(32); badEnd.append([UInt8](repeating: 0, count: 32)); badEnd.be64(0xdead)
        #expect(throws: WireError.self) { try ReturnPathDecoder.readReceivedBitmap(ByteArraySource(badEnd.bytes), expectedBytes: 32) }
    }

    @Test("names must be UTF-8: invalid bytes are refused, not replaced (found by fuzzing the return path)")
    func namesAreUTF8() throws {
        #expect(throws: WireError.self) { try ByteArraySource([3, 0xff, 0xfe, 0xfd]).countedString() }
        #expect(try ByteArraySource([6] + Array("pc.ram".utf8)).countedString() == "pc.ram")
        var w = WireBuffer(); w.be16(ReturnPathType.recvBitmap.rawValue); w.be16(4); w.append([3, 0xc3, 0x28, 0xa0])
        #expect(throws: WireError.self) { try ReturnPathDecoder.next(ByteArraySource(w.bytes)) }
    }

    @Test("RAM_DISCARD ranges outside the block, and unknown blocks, are refused")
    func discardBounds() throws {
        for (block, start, length) in [("pc.ram", UInt64(1 << 20), UInt64(4096)), ("pc.ram", 4096, UInt64.max & ~4095), ("pc.ram", 1, 4096), ("nvram", 0, 4096)] {
            var w = WireBuffer()
            w.ramDiscard(block: block, ranges: [(start, length)])
            let d = StreamDecoder(source: ByteArraySource(w.bytes), layout: layout)
            #expect(throws: WireError.self, "\(block) \(start)+\(length)") { _ = try d.nextItem() }
        }
    }

    @Test("page requests are checked against the block: aligned, non-empty, bounded, inside")
    func pageRequests() throws {
        let len: UInt64 = 1 << 20
        #expect(try PageRequest(block: "pc.ram", offset: 8192, length: 8192).pages(blockLength: len) == 2..<4)
        #expect(try PageRequest(block: nil, offset: len - 4096, length: 4096).pages(blockLength: len) == 255..<256)
        for (off, l) in [(len, UInt32(4096)), (len - 4096, 8192), (0xffff_ffff_ffff_f000, 4096), (100, 4096), (0, 100), (0, 0), (0, 0xffff_f000)] {
            #expect(throws: WireError.self, "\(off)+\(l)") { try PageRequest(block: nil, offset: off, length: l).pages(blockLength: len) }
        }
    }
}


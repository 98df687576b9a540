/// The destination's RAM layout, against which every record is validated.
public struct RAMLayout: Sendable {
    public struct Block: Sendable, Equatable { public let name: String; public let length: UInt64; public init(name: String, length: UInt64) { self.name = name; self.length = length } }
    public let blocks: [Block]
    public init(blocks: [Block]) { self.blocks = blocks }
    public func index(of name: String) -> Int? { blocks.firstIndex { $0.name == name } }
    public var totalBytes: UInt64 { blocks.reduce(0) { $0 + $1.length } }
}

/// A section header as read from the stream.
public struct SectionHeader: Sendable, Equatable {
    public let type: SectionType
    public let id: UInt32
    public let name: String
    public let instance: UInt32
    public let version: UInt32
}

/// Top-level items of the main channel.
public enum StreamItem: Sendable, Equatable {
    case configuration(machine: String)
    case section(SectionHeader)
    case command(Command)
    case eof
}

/// A decoded `QEMU_VM_COMMAND`.
public enum Command: Sendable, Equatable {
    case openReturnPath
    case ping(UInt32)
    case postcopyAdvise(pageSizeSummary: UInt64, targetPageSize: UInt64)
    case postcopyListen
    case postcopyRun
    case ramDiscard(block: Int, ranges: [Range<UInt64>])
    case packaged(length: UInt32)
    case postcopyResume
    case recvBitmap(block: String)
    case switchoverStart
}

/// One RAM record, validated against the layout. For `.page` the caller reads the 4096
/// payload bytes from the source itself (straight into guest memory, no copy here).
public enum RAMRecord: Sendable, Equatable {
    case memSize(blocks: [RAMLayout.Block])
    case page(block: Int, offset: UInt64)
    case zero(block: Int, offset: UInt64)
    /// An XBZRLE delta of `length` bytes (at most a page) follows; the caller reads it.
    case xbzrle(block: Int, offset: UInt64, length: Int)
    /// RAM_SAVE_FLAG_MULTIFD_FLUSH: every multifd channel's pages up to its SYNC packet
    /// land before anything after this record.
    case multifdFlush
    case eos
}

/// Decodes QEMU's migration stream from a `ByteSource`, validating every length, block
/// name, offset and section id against the destination's layout. Never traps on input.
public final class StreamDecoder {
    public let source: any ByteSource
    public let layout: RAMLayout
    /// Sections named in START/FULL headers, by id (PART/END refer to them).
    private var sections: [UInt32: SectionHeader] = [:]
    /// The block of the previous RAM record on this channel (for CONTINUE).
    private var lastBlock: Int?
    /// Largest device blob accepted (Ferry's vCPU state is a few KiB).
    public static let maxDeviceBlob = 1 << 20

    /// The device sections this destination has, with the newest version of each it reads.
    public let devices: [String: UInt32]

    public init(source: any ByteSource, layout: RAMLayout, devices: [String: UInt32] = [Wire.cpuSectionName: Wire.cpuSectionVersion]) {
        self.source = source
        self.layout = layout
        self.devices = devices
    }

    /// A decoder for a new channel of the same migration (postcopy recovery): it knows the
    /// sections already started, and the next RAM record must name its block.
    public func continuing(on newSource: any ByteSource) -> StreamDecoder {
        let d = StreamDecoder(source: newSource, layout: layout, devices: devices)
        d.sections = sections
        return d
    }

    /// Forget CONTINUE state, e.g. when a new channel starts.
    public func resetBlockContext() { lastBlock = nil }

    public func readFileHeader() throws {
        let magic = try source.be32()
        guard magic == Wire.fileMagic else {
            throw WireError(.badMagic, "not a migration stream: magic 0x\(String(magic, radix: 16)), expected 0x5145564d")
        }
        let version = try source.be32()
        if version == Wire.fileVersionCompat { throw WireError(.badVersion, "stream version 2 (SaveVM v2) is obsolete") }
        guard version == Wire.fileVersion else { throw WireError(.badVersion, "unsupported stream version \(version)") }
    }

    public func nextItem() throws -> StreamItem {
        let t = try source.u8()
        guard let type = SectionType(rawValue: t) else {
            throw WireError(.unknownSection, "unknown section type 0x\(String(t, radix: 16))")
        }
        switch type {
        case .eof: return .eof
        case .configuration:
            let n = try source.be32()
            guard n <= 256 else { throw WireError(.badLength, "machine type name of \(n) bytes") }
            guard let name = String(validating: try source.bytes(Int(n)), as: UTF8.self) else {
                throw WireError(.badMachine, "machine type name is not valid UTF-8")
            }
            return .configuration(machine: name)
        case .start, .full:
            let id = try source.be32()
            let name = try source.countedString()
            let instance = try source.be32()
            let version = try source.be32()
            let h = SectionHeader(type: type, id: id, name: name, instance: instance, version: version)
            try validateNew(h)
            sections[id] = h
            return .section(h)
        case .part, .end:
            let id = try source.be32()
            guard let known = sections[id] else { throw WireError(.badSectionID, "section id \(id) was never started") }
            guard known.type == .start else { throw WireError(.badSectionID, "section id \(id) (\(known.name)) is not iterative") }
            return .section(SectionHeader(type: type, id: id, name: known.name, instance: known.instance, version: known.version))
        case .command:
            return .command(try readCommandBody())
        case .subsection, .vmDescription, .footer:
            throw WireError(.unknownSection, "unexpected section type 0x\(String(t, radix: 16)) at top level")
        }
    }

    private func validateNew(_ h: SectionHeader) throws {
        switch h.name {
        case Wire.ramSectionName:
            guard h.type == .start, h.instance == 0 else { throw WireError(.unknownSection, "section ram must be iterative instance 0") }
            guard h.version == Wire.ramSectionVersion else { throw WireError(.badVersion, "ram section version \(h.version), expected 4") }
        case _ where devices[h.name] != nil:
            guard h.type == .full else { throw WireError(.unknownSection, "section \(h.name) must be FULL") }
            guard h.version >= 1 && h.version <= devices[h.name]! else { throw WireError(.badVersion, "\(h.name) version \(h.version) is newer than ours") }
        default:
            throw WireError(.unknownSection, "unknown section \"\(h.name)\" (instance \(h.instance))")
        }
    }

    public func readFooter(expecting id: UInt32) throws {
        let t = try source.u8()
        guard t == SectionType.footer.rawValue else {
            throw WireError(.badFooter, "missing section footer for section \(id) (found 0x\(String(t, radix: 16)))")
        }
        let fid = try source.be32()
        guard fid == id else { throw WireError(.badFooter, "section footer id \(fid) does not match section \(id)") }
    }

    /// Reads the body of a command (after the 0x08 type byte).
    public func readCommandBody() throws -> Command {
        let raw = try source.be16()
        let len = Int(try source.be16())
        guard let type = CommandType(rawValue: raw) else { throw WireError(.unknownCommand, "unknown command \(raw)") }
        if let fixed = type.fixedLength, fixed != len {
            throw WireError(.badLength, "command \(type) has length \(len), expected \(fixed)")
        }
        let payload = ByteArraySource(try source.bytes(len))
        switch type {
        case .openReturnPath: return .openReturnPath
        case .ping: return .ping(try payload.be32())
        case .postcopyAdvise:
            guard len == 16 else { throw WireError(.badLength, "POSTCOPY_ADVISE of \(len) bytes") }
            return .postcopyAdvise(pageSizeSummary: try payload.be64(), targetPageSize: try payload.be64())
        case .postcopyListen: return .postcopyListen
        case .postcopyRun: return .postcopyRun
        case .postcopyResume: return .postcopyResume
        case .switchoverStart: return .switchoverStart
        case .packaged: return .packaged(length: try payload.be32())
        case .enableCOLO: throw WireError(.unknownCommand, "COLO is not supported")
        case .recvBitmap:
            let name = try payload.countedString()
            guard payload.remaining == 0, len == name.utf8.count + 1 else { throw WireError(.badLength, "RECV_BITMAP length \(len)") }
            guard layout.index(of: name) != nil else { throw WireError(.unknownBlock, "RECV_BITMAP for unknown RAM block \"\(name)\"") }
            return .recvBitmap(block: name)
        case .postcopyRAMDiscard:
            guard len >= 20 else { throw WireError(.badLength, "RAM_DISCARD of \(len) bytes") }
            let version = try payload.u8()
            guard version == 0 else { throw WireError(.badPayload, "RAM_DISCARD version \(version)") }
            let name = try payload.countedString()
            guard try payload.u8() == 0 else { throw WireError(.badPayload, "RAM_DISCARD name not terminated") }
            guard payload.remaining % 16 == 0 else { throw WireError(.badLength, "RAM_DISCARD ranges not a multiple of 16 bytes") }
            guard let b = layout.index(of: name) else { throw WireError(.unknownBlock, "RAM_DISCARD for unknown RAM block \"\(name)\"") }
            var ranges: [Range<UInt64>] = []
            while payload.remaining > 0 {
                let start = try payload.be64(), length = try payload.be64()
                guard start & ~Wire.pageMask == 0, length & ~Wire.pageMask == 0,
                      start <= layout.blocks[b].length, length <= layout.blocks[b].length - start else {
                    throw WireError(.badOffset, "RAM_DISCARD range \(start)+\(length) outside block \(name)")
                }
                ranges.append(start..<start + length)
            }
            return .ramDiscard(block: b, ranges: ranges)
        }
    }

    /// Reads the next record of a RAM section.
    public func nextRAMRecord() throws -> RAMRecord {
        let word = try source.be64()
        let flags = RAMFlags(rawValue: word & ~Wire.pageMask)
        let offset = word & Wire.pageMask
        if flags.contains(.eos) {
            guard flags == .eos, offset == 0 else { throw WireError(.badFlags, "EOS with other bits set: 0x\(String(word, radix: 16))") }
            return .eos
        }
        if flags.contains(.multifdFlush) {
            guard flags == .multifdFlush, offset == 0 else { throw WireError(.badFlags, "MULTIFD_FLUSH with other bits set: 0x\(String(word, radix: 16))") }
            return .multifdFlush
        }
        if flags.contains(.memSize) {
            guard flags == .memSize else { throw WireError(.badFlags, "MEM_SIZE with other flags") }
            return .memSize(blocks: try readBlockList(total: offset))
        }
        guard flags.subtracting(.known).isEmpty else {
            throw WireError(.badFlags, "unsupported RAM flags 0x\(String(flags.rawValue, radix: 16))")
        }
        let block: Int
        if flags.contains(.continue) {
            guard let b = lastBlock else { throw WireError(.badFlags, "CONTINUE record with no previous block") }
            block = b
        } else {
            let name = try source.countedString()
            guard let b = layout.index(of: name) else { throw WireError(.unknownBlock, "unknown RAM block \"\(name)\"") }
            block = b
        }
        lastBlock = block
        guard offset < layout.blocks[block].length, layout.blocks[block].length - offset >= UInt64(Wire.pageSize) else {
            throw WireError(.badOffset, "page offset 0x\(String(offset, radix: 16)) past the end of \(layout.blocks[block].name) (\(layout.blocks[block].length) bytes)")
        }
        let kind = flags.subtracting(.continue)
        if kind == .zero {
            let fill = try source.u8()
            guard fill == 0 else { throw WireError(.badPayload, "ZERO page with fill byte \(fill)") }
            return .zero(block: block, offset: offset)
        }
        if kind == .page { return .page(block: block, offset: offset) }
        if kind == .xbzrle {
            let encoding = try source.u8()
            guard encoding == XBZRLE.encodingFlag else { throw WireError(.badPayload, "XBZRLE page with encoding flag \(encoding)") }
            let length = Int(try source.be16())
            guard length <= Wire.pageSize else { throw WireError(.badLength, "XBZRLE page of \(length) bytes, more than a page") }
            return .xbzrle(block: block, offset: offset, length: length)
        }
        throw WireError(.badFlags, "RAM record flags 0x\(String(flags.rawValue, radix: 16))")
    }

    private func readBlockList(total: UInt64) throws -> [RAMLayout.Block] {
        guard total == layout.totalBytes else {
            throw WireError(.badBlockLayout, "source RAM is \(total) bytes, destination has \(layout.totalBytes)")
        }
        var sum: UInt64 = 0
        var blocks: [RAMLayout.Block] = []
        while sum < total {
            let name = try source.countedString()
            let length = try source.be64()
            guard let i = layout.index(of: name) else { throw WireError(.unknownBlock, "unknown RAM block \"\(name)\"") }
            guard layout.blocks[i].length == length else {
                throw WireError(.badBlockLayout, "RAM block \(name) is \(length) bytes at the source, \(layout.blocks[i].length) here")
            }
            guard !blocks.contains(where: { $0.name == name }) else { throw WireError(.badBlockLayout, "RAM block \(name) listed twice") }
            blocks.append(.init(name: name, length: length))
            sum += length
        }
        guard sum == total else { throw WireError(.badBlockLayout, "block lengths add up to \(sum), not \(total)") }
        return blocks
    }

    /// Ferry's device payload: be32 length + bytes, bounded.
    public func readDeviceBlob() throws -> [UInt8] {
        let n = Int(try source.be32())
        guard n <= Self.maxDeviceBlob else { throw WireError(.badLength, "device state of \(n) bytes (limit \(Self.maxDeviceBlob))") }
        return try source.bytes(n)
    }
}

/// A decoded return-path message (destination -> source).
public enum ReturnPathMessage: Sendable, Equatable {
    case shut(UInt32)
    case pong(UInt32)
    /// A page request; `block` nil means the block of the previous request.
    case requestPages(block: String?, offset: UInt64, length: UInt32)
    /// Header of a received bitmap; the blob follows (see `readReceivedBitmap`).
    case receivedBitmap(block: String)
    case resumeAck(UInt32)
    case switchoverAck
    /// Ferry's own: why the destination failed (before its SHUT).
    case error(String)
}

public enum ReturnPathDecoder {
    public static func next(_ source: any ByteSource) throws -> ReturnPathMessage {
        let raw = try source.be16()
        let len = Int(try source.be16())
        guard len <= Wire.maxReturnPathLength else { throw WireError(.badLength, "return-path message of \(len) bytes") }
        guard let type = ReturnPathType(rawValue: raw) else { throw WireError(.unknownCommand, "unknown return-path message \(raw)") }
        let p = ByteArraySource(try source.bytes(len))
        func exact(_ n: Int) throws { guard len == n else { throw WireError(.badLength, "return-path \(type) of \(len) bytes, expected \(n)") } }
        switch type {
        case .shut: try exact(4); return .shut(try p.be32())
        case .pong: try exact(4); return .pong(try p.be32())
        case .resumeAck: try exact(4); return .resumeAck(try p.be32())
        case .switchoverAck: try exact(0); return .switchoverAck
        case .xError:
            guard let text = String(validating: try p.bytes(len), as: UTF8.self) else { throw WireError(.badLength, "error message is not UTF-8") }
            return .error(text)
        case .reqPages:
            try exact(12)
            return .requestPages(block: nil, offset: try p.be64(), length: try p.be32())
        case .reqPagesID:
            guard len >= 13 else { throw WireError(.badLength, "REQ_PAGES_ID of \(len) bytes") }
            let off = try p.be64(), l = try p.be32()
            let name = try p.countedString()
            guard p.remaining == 0 else { throw WireError(.badLength, "REQ_PAGES_ID name length mismatch") }
            return .requestPages(block: name, offset: off, length: l)
        case .recvBitmap:
            let name = try p.countedString()
            guard p.remaining == 0 else { throw WireError(.badLength, "RECV_BITMAP name length mismatch") }
            return .receivedBitmap(block: name)
        }
    }

    /// Reads the bitmap blob after a RECV_BITMAP header: be64 size (must be `expectedBytes`),
    /// little-endian words, be64 end marker.
    public static func readReceivedBitmap(_ source: any ByteSource, expectedBytes: Int) throws -> [UInt8] {
        let size = try source.be64()
        guard size == UInt64(expectedBytes) else {
            throw WireError(.badBitmap, "received bitmap of \(size) bytes, expected \(expectedBytes)")
        }
        let bytes = try source.bytes(expectedBytes)
        let end = try source.be64()
        guard end == Wire.recvBitmapEnding else { throw WireError(.badBitmap, "received bitmap end marker 0x\(String(end, radix: 16))") }
        return bytes
    }
}

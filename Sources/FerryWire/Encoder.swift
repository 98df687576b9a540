/// An append-only byte buffer with big-endian writers: the encoding half of the codec.
/// Page contents are not copied in here; the channel sends them straight from guest RAM.
public struct WireBuffer: Sendable {
    public var bytes: [UInt8] = []
    public init(capacity: Int = 256) { bytes.reserveCapacity(capacity) }

    @inline(__always) public mutating func u8(_ v: UInt8) { bytes.append(v) }
    @inline(__always) public mutating func be16(_ v: UInt16) { bytes.append(UInt8(v >> 8)); bytes.append(UInt8(v & 0xff)) }
    @inline(__always) public mutating func be32(_ v: UInt32) {
        bytes.append(UInt8(v >> 24)); bytes.append(UInt8(v >> 16 & 0xff)); bytes.append(UInt8(v >> 8 & 0xff)); bytes.append(UInt8(v & 0xff))
    }
    @inline(__always) public mutating func be64(_ v: UInt64) { be32(UInt32(v >> 32)); be32(UInt32(v & 0xffff_ffff)) }
    public mutating func append(_ b: some Sequence<UInt8>) { bytes.append(contentsOf: b) }
    public mutating func counted(_ s: String) {
        let u = Array(s.utf8)
        precondition(u.count <= 255, "counted string longer than 255 bytes")
        u8(UInt8(u.count)); bytes += u
    }
    public mutating func removeAll() { bytes.removeAll(keepingCapacity: true) }
    public var count: Int { bytes.count }
}

extension WireBuffer {
    /// File header: magic, version.
    public mutating func fileHeader() { be32(Wire.fileMagic); be32(Wire.fileVersion) }

    /// Configuration block: 0x07, be32 len + machine type name.
    public mutating func configuration(machine: String = Wire.machineType) {
        u8(SectionType.configuration.rawValue)
        let u = Array(machine.utf8)
        be32(UInt32(u.count)); bytes += u
    }

    /// START or FULL header.
    public mutating func sectionHeader(_ type: SectionType, id: UInt32, name: String, instance: UInt32 = 0, version: UInt32) {
        precondition(type == .start || type == .full)
        u8(type.rawValue); be32(id); counted(name); be32(instance); be32(version)
    }

    /// PART or END header.
    public mutating func sectionShort(_ type: SectionType, id: UInt32) {
        precondition(type == .part || type == .end)
        u8(type.rawValue); be32(id)
    }

    public mutating func footer(id: UInt32) { u8(SectionType.footer.rawValue); be32(id) }

    public mutating func eof() { u8(SectionType.eof.rawValue) }

    /// Opens a RAM section that continues the RAM setup: PART (iterations) or END (the last).
    /// Page records follow; `ramSectionEnd` closes it.
    public mutating func ramSectionBegin(_ type: SectionType, id: UInt32) { sectionShort(type, id: id) }

    /// Closes a RAM section: the EOS record and the footer.
    public mutating func ramSectionEnd(id: UInt32) { ramEOS(); footer(id: id) }

    /// A whole device section (FULL): header, be32 length, the device's blob, footer.
    public mutating func deviceSection(id: UInt32, name: String, instance: UInt32 = 0, version: UInt32, blob: [UInt8]) {
        sectionHeader(.full, id: id, name: name, instance: instance, version: version)
        be32(UInt32(blob.count))
        append(blob)
        footer(id: id)
    }

    /// RAM setup record: total size with MEM_SIZE, then each block's name and used length.
    public mutating func ramMemSize(blocks: [(name: String, length: UInt64)]) {
        be64(blocks.reduce(0) { $0 + $1.length } | RAMFlags.memSize.rawValue)
        for b in blocks { counted(b.name); be64(b.length) }
    }

    /// A page record header. `block` nil means the same block as the previous record (CONTINUE).
    /// PAGE is followed by 4096 bytes the caller sends; ZERO by one 0x00 byte, written here.
    public mutating func ramRecord(offset: UInt64, flags: RAMFlags, block: String?) {
        var f = flags
        if block == nil { f.insert(.continue) }
        be64(offset | f.rawValue)
        if let block { counted(block) }
        if flags.contains(.zero) { u8(0) }
    }

    public mutating func ramEOS() { be64(RAMFlags.eos.rawValue) }

    /// The bytes of a ZERO record that continues the previous record's block.
    public static let continuedZeroRecordBytes = 9

    /// ZERO records (CONTINUE) for `count` consecutive pages from page `firstPage`, stored
    /// into `out` (at least `count * continuedZeroRecordBytes` bytes): the same bytes as
    /// `ramRecord(offset:flags: .zero, block: nil)` for each, without a call per record
    /// (a big sparse guest's first pass has millions of them).
    public static func continuedZeroRecords(firstPage: Int, count: Int, into out: UnsafeMutableRawPointer) {
        let flags = RAMFlags.zero.rawValue | RAMFlags.continue.rawValue
        for k in 0..<count {
            let p = out + k * continuedZeroRecordBytes
            p.storeBytes(of: (UInt64(firstPage + k) << UInt64(Wire.pageShift) | flags).bigEndian, as: UInt64.self)
            p.storeBytes(of: 0, toByteOffset: 8, as: UInt8.self)
        }
    }

    /// RAM_SAVE_FLAG_MULTIFD_FLUSH, after every multifd channel's SYNC packet.
    public mutating func multifdFlush() { be64(RAMFlags.multifdFlush.rawValue) }

    /// A `QEMU_VM_COMMAND`.
    public mutating func command(_ type: CommandType, _ payload: [UInt8] = []) {
        precondition(payload.count <= Wire.maxCommandLength)
        u8(SectionType.command.rawValue); be16(type.rawValue); be16(UInt16(payload.count)); bytes += payload
    }

    public mutating func ping(_ value: UInt32) {
        var p = WireBuffer(); p.be32(value); command(.ping, p.bytes)
    }

    public mutating func postcopyAdvise(pageSizeSummary: UInt64 = UInt64(Wire.pageSize), targetPageSize: UInt64 = UInt64(Wire.pageSize)) {
        var p = WireBuffer(); p.be64(pageSizeSummary); p.be64(targetPageSize); command(.postcopyAdvise, p.bytes)
    }

    /// RAM_DISCARD: version 0, block name, 0x00, then up to 12 (start, length) byte ranges.
    public mutating func ramDiscard(block: String, ranges: [(start: UInt64, length: UInt64)]) {
        var p = WireBuffer(); p.u8(0); p.counted(block); p.u8(0)
        for r in ranges { p.be64(r.start); p.be64(r.length) }
        command(.postcopyRAMDiscard, p.bytes)
    }

    public mutating func recvBitmapRequest(block: String) {
        var p = WireBuffer(); p.counted(block); command(.recvBitmap, p.bytes)
    }

    /// PACKAGED: the be32 length; the nested stream follows outside the command.
    public mutating func packaged(length: UInt32) {
        var p = WireBuffer(); p.be32(length); command(.packaged, p.bytes)
    }

    // MARK: return path

    public mutating func returnPath(_ type: ReturnPathType, _ payload: [UInt8] = []) {
        be16(type.rawValue); be16(UInt16(payload.count)); bytes += payload
    }

    public mutating func rpPong(_ v: UInt32) { var p = WireBuffer(); p.be32(v); returnPath(.pong, p.bytes) }
    public mutating func rpShut(_ v: UInt32) { var p = WireBuffer(); p.be32(v); returnPath(.shut, p.bytes) }
    /// Ferry's error message: `text` cut at a character boundary to fit one message.
    public mutating func rpError(_ text: String) {
        var cut = Substring(text)
        while cut.utf8.count > Wire.maxReturnPathLength { cut = cut.dropLast() }
        returnPath(.xError, Array(cut.utf8))
    }
    public mutating func rpResumeAck() { var p = WireBuffer(); p.be32(Wire.resumeAckValue); returnPath(.resumeAck, p.bytes) }

    /// A page request; with `block` the long form (REQ_PAGES_ID), else REQ_PAGES.
    public mutating func rpRequestPages(block: String?, offset: UInt64, length: UInt32) {
        var p = WireBuffer(); p.be64(offset); p.be32(length)
        if let block { p.counted(block); returnPath(.reqPagesID, p.bytes) } else { returnPath(.reqPages, p.bytes) }
    }

    /// RECV_BITMAP header, size, little-endian words, end marker.
    public mutating func rpReceivedBitmap(block: String, bitmap: [UInt8]) {
        var p = WireBuffer(); p.counted(block); returnPath(.recvBitmap, p.bytes)
        be64(UInt64(bitmap.count)); bytes += bitmap; be64(Wire.recvBitmapEnding)
    }
}

/// QEMU's multifd channels (migration/multifd.c): each extra socket starts with a 64-byte
/// `MultiFDInit_t` and then carries packets, each a fixed-size header (`MultiFDPacket_t`
/// with room for a whole packet's page offsets) followed by the pages' data. All numbers
/// are big-endian. The layout is QEMU 9.0's, which keeps 7.2's and puts the zero-page
/// count in what 7.2 left unused (a 7.2 packet reads as one without zero pages).
public enum MultiFD {
    /// Both headers start with the magic and the version (QEMU's messages; `what` names the
    /// header in the version's).
    fileprivate static func checkMagicAndVersion(_ r: inout ByteReader, of what: String) throws {
        let m = r.be32()
        guard m == magic else { throw WireError(.badMagic, "multifd: received packet magic \(hex(m)) expected \(hex(magic))") }
        let v = r.be32()
        guard v == version else { throw WireError(.badVersion, "multifd: received \(what) version \(v) expected \(version)") }
    }

    public static let magic: UInt32 = 0x1122_3344
    public static let version: UInt32 = 1
    /// Bytes of `MultiFDInit_t`: magic, version, uuid[16], id, unused[7], unused[4] (be64).
    public static let initSize = 64
    /// Pages one packet may carry: MULTIFD_PACKET_SIZE (512 KiB) of target pages.
    public static let pagesPerPacket = (512 * 1024) / Wire.pageSize
    /// The header before the offsets: magic, version, flags, pages_alloc, normal_pages,
    /// next_packet_size, packet_num, zero_pages, unused32, unused64[3], ramblock[256].
    public static let headerBytes = 320
    /// Every packet header is this long: the receiver reads it whole.
    public static let packetHeaderSize = headerBytes + 8 * pagesPerPacket
    public static let blockNameBytes = 256

    /// MULTIFD_FLAG_SYNC: the sender's last packet before a main-channel flush.
    public static let flagSync: UInt32 = 1
    /// The compression method in bits 1-4 of the flags.
    public static let compressionMask: UInt32 = 0xf << 1

    public enum Compression: String, Sendable, CaseIterable {
        case none, zlib, zstd
        /// MULTIFD_FLAG_NOCOMP / ZLIB / ZSTD.
        public var flag: UInt32 {
            switch self {
            case .none: 0
            case .zlib: 1 << 1
            case .zstd: 2 << 1
            }
        }
    }

    /// `MultiFDInit_t`: which migration (the source's uuid) and which channel this is.
    public struct Initial: Sendable, Equatable {
        public var uuid: [UInt8]
        public var id: UInt8
        public init(uuid: [UInt8], id: UInt8) {
            precondition(uuid.count == 16)
            self.uuid = uuid
            self.id = id
        }

        public func encoded() -> [UInt8] {
            var b = WireBuffer(capacity: MultiFD.initSize)
            b.be32(MultiFD.magic); b.be32(MultiFD.version)
            b.append(uuid); b.u8(id)
            b.append(repeatElement(0, count: MultiFD.initSize - b.count))
            return b.bytes
        }

        public init(decoding bytes: [UInt8]) throws {
            guard bytes.count == MultiFD.initSize else { throw WireError(.truncated, "multifd channel header of \(bytes.count) bytes, want \(MultiFD.initSize)") }
            var r = ByteReader(bytes)
            try MultiFD.checkMagicAndVersion(&r, of: "channel")
            uuid = Array(bytes[8..<24])
            id = bytes[24]
        }
    }

    /// One packet's header: the pages that follow (normal ones, with data) and the zero
    /// pages (offsets only), all in one RAM block.
    public struct Packet: Sendable, Equatable {
        public var flags: UInt32
        public var pagesAlloc: UInt32 = UInt32(MultiFD.pagesPerPacket)
        /// Bytes of page data after the header (compressed size with compression).
        public var nextPacketSize: UInt32
        public var packetNum: UInt64
        public var blockName: String
        public var normal: [UInt64]
        public var zero: [UInt64]

        public init(flags: UInt32, nextPacketSize: UInt32, packetNum: UInt64, blockName: String, normal: [UInt64], zero: [UInt64]) {
            self.flags = flags
            self.nextPacketSize = nextPacketSize
            self.packetNum = packetNum
            self.blockName = blockName
            self.normal = normal
            self.zero = zero
        }

        public var isSync: Bool { flags & MultiFD.flagSync != 0 }

        /// Exactly `packetHeaderSize` bytes, appended to `b`.
        public func encode(into b: inout WireBuffer) {
            precondition(normal.count + zero.count <= MultiFD.pagesPerPacket)
            let start = b.count
            b.be32(MultiFD.magic); b.be32(MultiFD.version); b.be32(flags); b.be32(pagesAlloc)
            b.be32(UInt32(normal.count)); b.be32(nextPacketSize); b.be64(packetNum)
            b.be32(UInt32(zero.count)); b.be32(0); b.be64(0); b.be64(0); b.be64(0)
            let name = Array(blockName.utf8.prefix(MultiFD.blockNameBytes - 1))
            b.append(name)
            b.append(repeatElement(0, count: MultiFD.blockNameBytes - name.count))
            for o in normal { b.be64(o) }
            for o in zero { b.be64(o) }
            b.append(repeatElement(0, count: start + MultiFD.packetHeaderSize - b.count))
        }

        /// Decodes and checks a header as QEMU's receiver does: magic, version, the
        /// compression the destination expects, page counts within the packet, a known
        /// block, page-aligned offsets inside it, and (without compression) a data size
        /// that is exactly the normal pages.
        public init(decoding bytes: [UInt8], layout: RAMLayout, compression: Compression) throws {
            guard bytes.count == MultiFD.packetHeaderSize else { throw WireError(.truncated, "multifd packet header of \(bytes.count) bytes") }
            var r = ByteReader(bytes)
            try MultiFD.checkMagicAndVersion(&r, of: "packet")
            flags = r.be32()
            let method = flags & MultiFD.compressionMask
            guard method == compression.flag else {
                throw WireError(.badFlags, "multifd: flags received \(hex(flags)) flags expected \(hex(compression.flag)) (multifd-compression \(compression.rawValue) here)")
            }
            guard flags & ~(MultiFD.compressionMask | MultiFD.flagSync) == 0 else { throw WireError(.badFlags, "multifd: unknown packet flags \(hex(flags))") }
            pagesAlloc = r.be32()
            guard pagesAlloc <= UInt32(MultiFD.pagesPerPacket) else {
                throw WireError(.badLength, "multifd: received packet with \(pagesAlloc) pages and expected maximum pages are \(MultiFD.pagesPerPacket)")
            }
            let normalCount = Int(r.be32())
            nextPacketSize = r.be32()
            packetNum = r.be64()
            let zeroCount = Int(r.be32())
            guard normalCount + zeroCount <= Int(pagesAlloc) else {
                throw WireError(.badLength, "multifd: received packet with \(normalCount) normal and \(zeroCount) zero pages, more than its \(pagesAlloc)")
            }
            let nameBytes = bytes[64..<(64 + MultiFD.blockNameBytes)]
            guard let nul = nameBytes.firstIndex(of: 0) else { throw WireError(.badPayload, "multifd: block name without its terminating zero") }
            blockName = String(decoding: bytes[64..<nul], as: UTF8.self)
            normal = []
            zero = []
            let hasPages = normalCount + zeroCount > 0
            var block: RAMLayout.Block?
            if hasPages {
                guard let i = layout.index(of: blockName) else { throw WireError(.unknownBlock, "multifd: unknown ramblock \"\(blockName)\"") }
                block = layout.blocks[i]
            }
            var o = ByteReader(Array(bytes[MultiFD.headerBytes...]))
            for k in 0..<(normalCount + zeroCount) {
                let off = o.be64()
                guard let block, off & ~Wire.pageMask == 0, off < block.length, block.length - off >= UInt64(Wire.pageSize) else {
                    throw WireError(.badOffset, "multifd: offset 0x\(String(off, radix: 16)) outside block \(blockName)")
                }
                if k < normalCount { normal.append(off) } else { zero.append(off) }
            }
            switch compression {
            case .none:
                guard Int(nextPacketSize) == normalCount * Wire.pageSize else {
                    throw WireError(.badLength, "multifd: packet size \(nextPacketSize) for \(normalCount) pages")
                }
            case .zlib, .zstd:
                guard Int(nextPacketSize) <= MultiFD.maxCompressedSize, normalCount > 0 || nextPacketSize == 0 else {
                    throw WireError(.badLength, "multifd: compressed packet of \(nextPacketSize) bytes for \(normalCount) pages")
                }
            }
        }
    }

    /// The most compressed data one packet may carry: a full packet's pages with zstd's
    /// worst-case growth (ZSTD_compressBound) and slack.
    public static let maxCompressedSize = pagesPerPacket * Wire.pageSize + 64 * 1024
}

private func hex(_ v: UInt32) -> String { "0x" + String(v, radix: 16) }

/// Big-endian reads from a byte array whose length the caller checked.
private struct ByteReader {
    let bytes: [UInt8]
    var at = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    mutating func be32() -> UInt32 {
        defer { at += 4 }
        return UInt32(bytes[at]) << 24 | UInt32(bytes[at + 1]) << 16 | UInt32(bytes[at + 2]) << 8 | UInt32(bytes[at + 3])
    }
    mutating func be64() -> UInt64 { UInt64(be32()) << 32 | UInt64(be32()) }
}

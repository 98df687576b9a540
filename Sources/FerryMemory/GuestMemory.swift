import CFerry
import FerrySys
import Glibc

/// Target page size: dirty tracking, the wire and the bitmaps all count 4 KiB pages.
public let targetPageSize = 4096
public let targetPageShift = 12

/// The memory layer's error: a code, a message and the system error behind it.
public struct MemoryError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable { case mapFailed, outOfRange, badSize }
    public let code: Code
    public let message: String
    public let cause: SysError?
    public init(_ code: Code, _ message: String, cause: SysError? = nil) {
        self.code = code; self.message = message; self.cause = cause
    }
    public var description: String { "\(message)" + (cause.map { ": \($0)" } ?? "") }
}

/// Where part of a RAM block appears in guest-physical space (one KVM memory slot).
public struct GuestMapping: Sendable, Equatable {
    public let guestAddress: UInt64
    /// Offset of the part inside its block.
    public let offset: Int
    public let length: Int
    public init(guestAddress: UInt64, offset: Int, length: Int) {
        self.guestAddress = guestAddress; self.offset = offset; self.length = length
    }
    public var guestEnd: UInt64 { guestAddress + UInt64(length) }
}

/// One RAM block: host-anonymous memory, mapped lazily (untouched pages cost nothing),
/// that appears in the guest as one or more `mappings`. The named unit of the migration
/// stream (QEMU's RAMBlock, e.g. `pc.ram`); offsets in the stream are block offsets.
public final class RAMBlock: @unchecked Sendable {
    public let name: String
    public let mappings: [GuestMapping]
    /// Used length in bytes, a multiple of the target page size.
    public let length: Int
    public let host: UnsafeMutableRawPointer
    /// Pages written by Ferry itself (loader, device models, the migration destination),
    /// which KVM's dirty log does not see.
    public let vmmDirty: PageBitmap

    public convenience init(name: String, guestAddress: UInt64, length: Int) throws(MemoryError) {
        try self.init(name: name, length: length, mappings: [GuestMapping(guestAddress: guestAddress, offset: 0, length: length)])
    }

    public init(name: String, length: Int, mappings: [GuestMapping]) throws(MemoryError) {
        guard length > 0, length % targetPageSize == 0 else {
            throw MemoryError(.badSize, "RAM block \(name): size \(length) is not a positive multiple of \(targetPageSize)")
        }
        guard name.utf8.count <= 255 else { throw MemoryError(.badSize, "RAM block name longer than 255 bytes") }
        guard mappings.reduce(0, { $0 + $1.length }) == length, mappings.allSatisfy({ $0.length % targetPageSize == 0 && $0.offset % targetPageSize == 0 }) else {
            throw MemoryError(.badSize, "RAM block \(name): its guest mappings do not cover its \(length) bytes in whole pages")
        }
        self.name = name
        self.mappings = mappings
        self.length = length
        do {
            self.host = try Sys.mmapAnonymous(size: length)
        } catch {
            throw MemoryError(.mapFailed, "cannot map \(length) bytes for RAM block \(name)", cause: error)
        }
        self.vmmDirty = PageBitmap(bitCount: length / targetPageSize)
    }

    deinit { Sys.munmap(host, size: length) }

    /// Transparent huge pages for what is touched from here on, or not. A precopy
    /// destination asks for them: writing the incoming RAM then costs a fault per 2 MiB
    /// instead of per page. A postcopy destination does not (userfaultfd resolves one
    /// missing page at a time). A running guest's RAM stays on small pages: measured here,
    /// huge pages behind a dirty-logged guest made its precopy passes slower.
    public func useHugePages(_ on: Bool) { Sys.adviseHugePages(host, size: length, on) }

    public var pageCount: Int { length / targetPageSize }

    @inline(__always) public func page(_ index: Int) -> UnsafeMutableRawPointer {
        host + index << targetPageShift
    }

    public func contains(offset: UInt64, count: Int) -> Bool {
        count >= 0 && offset <= UInt64(length) && UInt64(count) <= UInt64(length) - offset
    }

    /// Copies bytes in at `offset` and marks the pages dirty for migration.
    public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(MemoryError) {
        guard contains(offset: UInt64(offset), count: bytes.count) else {
            throw MemoryError(.outOfRange, "write of \(bytes.count) bytes at \(offset) outside \(name) (\(length) bytes)")
        }
        guard bytes.count > 0 else { return }
        (host + offset).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
        markDirty(offset: offset, count: bytes.count)
    }

    public func markDirty(offset: Int, count: Int) {
        guard count > 0 else { return }
        for p in (offset >> targetPageShift)...((offset + count - 1) >> targetPageShift) { vmmDirty.set(p) }
    }
}

/// The guest's RAM: its blocks and where they sit in guest-physical space.
public final class GuestMemory: @unchecked Sendable {
    public let blocks: [RAMBlock]

    public init(blocks: [RAMBlock]) { self.blocks = blocks }

    /// A PC's layout (QEMU's i440fx): one block `pc.ram`; from 3.5 GiB up, its first 3 GiB
    /// sit at 0 and the rest at 4 GiB, leaving the hole below 4 GiB for devices (the
    /// IOAPIC at 0xfec00000, the local APICs at 0xfee00000).
    public static func pc(size: Int) throws(MemoryError) -> GuestMemory {
        GuestMemory(blocks: [try RAMBlock(name: "pc.ram", length: size, mappings: pcMappings(size: size))])
    }

    public static let pcLowLimit = 0xc000_0000
    public static let pcSplitAbove = 0xe000_0000
    public static let pcHighBase: UInt64 = 0x1_0000_0000

    public static func pcMappings(size: Int) -> [GuestMapping] {
        if size < pcSplitAbove { return [GuestMapping(guestAddress: 0, offset: 0, length: size)] }
        return [GuestMapping(guestAddress: 0, offset: 0, length: pcLowLimit),
                GuestMapping(guestAddress: pcHighBase, offset: pcLowLimit, length: size - pcLowLimit)]
    }

    public var totalBytes: Int { blocks.reduce(0) { $0 + $1.length } }

    public func block(named name: String) -> RAMBlock? { blocks.first { $0.name == name } }

    /// The block and offset holding guest-physical address `gpa` with `count` bytes after it.
    public func resolve(gpa: UInt64, count: Int) -> (RAMBlock, Int)? {
        for b in blocks {
            for m in b.mappings where gpa >= m.guestAddress && gpa < m.guestEnd {
                guard count >= 0, UInt64(count) <= m.guestEnd - gpa else { return nil }
                return (b, m.offset + Int(gpa - m.guestAddress))
            }
        }
        return nil
    }

    public func write(gpa: UInt64, _ bytes: UnsafeRawBufferPointer) throws(MemoryError) {
        guard let (b, off) = resolve(gpa: gpa, count: bytes.count) else {
            throw MemoryError(.outOfRange, "guest address 0x\(String(gpa, radix: 16)) + \(bytes.count) is not RAM")
        }
        try b.write(bytes, at: off)
    }

    public func read(gpa: UInt64, count: Int) throws(MemoryError) -> [UInt8] {
        guard let (b, off) = resolve(gpa: gpa, count: count) else {
            throw MemoryError(.outOfRange, "guest address 0x\(String(gpa, radix: 16)) + \(count) is not RAM")
        }
        return Array(UnsafeRawBufferPointer(start: b.host + off, count: count))
    }
}

/// Which pages of a RAM block have memory behind them (resident or swapped, from
/// /proc/self/pagemap), read a chunk at a time when first asked about, so no single call
/// stalls a migration thread on a large guest. A page without memory has never been touched
/// (or was discarded): it reads as zero, and reading it would fault it in. A page written
/// after its chunk was read is for the dirty log to report. Ownership: one thread uses it.
public final class PopulatedPages {
    public let block: RAMBlock
    private let bits: PageBitmap
    private var scanned: [Bool]
    public static let chunkPages = 1 << 16

    public init(_ block: RAMBlock) {
        self.block = block
        self.bits = PageBitmap(bitCount: block.pageCount)
        self.scanned = Array(repeating: false, count: (block.pageCount + Self.chunkPages - 1) / Self.chunkPages)
    }

    /// False when the page is known to read as zero without reading it.
    public func mayHoldData(_ page: Int) throws(MemoryError) -> Bool {
        let c = page / Self.chunkPages
        if !scanned[c] {
            let first = c * Self.chunkPages
            let count = min(Self.chunkPages, block.pageCount - first)
            do {
                try Sys.forEachPopulatedPage(address: block.page(first), pages: count) { bits.set(first + $0) }
            } catch {
                throw MemoryError(.mapFailed, "cannot read which pages of RAM block \(block.name) are populated", cause: error)
            }
            scanned[c] = true
        }
        return bits.test(page)
    }

    /// How many pages from `start` on (at most `limit`) are known to read as zero.
    public func knownZeroRun(from start: Int, limit: Int) throws(MemoryError) -> Int {
        var n = 0
        let end = min(block.pageCount, start + limit)
        while start + n < end {
            let p = start + n
            guard try !mayHoldData(p) else { break }
            // A whole word of untouched pages at once (the chunk it is in was just read).
            n += p & 63 == 0 && end - p >= 64 && bits.words[p >> 6] == 0 ? 64 : 1
        }
        return n
    }

    /// How many pages have memory behind them now (reads every chunk not yet read).
    public func count() throws(MemoryError) -> Int {
        var n = 0
        for p in 0..<block.pageCount where try mayHoldData(p) { n += 1 }
        return n
    }
}

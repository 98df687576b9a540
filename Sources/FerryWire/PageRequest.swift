/// A page request from the destination (REQ_PAGES / REQ_PAGES_ID), validated against the
/// block it names before the source touches memory: aligned, non-empty, inside the block.
public struct PageRequest: Sendable, Equatable {
    public let block: String?
    public let offset: UInt64
    public let length: UInt32
    /// Largest single request accepted (QEMU asks for one host page at a time; huge pages are 2 MiB).
    public static let maxLength: UInt32 = 2 << 20

    public init(block: String?, offset: UInt64, length: UInt32) {
        self.block = block; self.offset = offset; self.length = length
    }

    /// The page indices asked for in a block of `blockLength` bytes.
    public func pages(blockLength: UInt64) throws -> Range<Int> {
        guard offset & ~Wire.pageMask == 0, length > 0, UInt64(length) & ~Wire.pageMask == 0 else {
            throw WireError(.badOffset, "page request \(offset)+\(length) is not page-aligned")
        }
        guard length <= Self.maxLength else {
            throw WireError(.badLength, "page request of \(length) bytes (limit \(Self.maxLength))")
        }
        guard offset < blockLength, UInt64(length) <= blockLength - offset else {
            throw WireError(.badOffset, "page request \(offset)+\(length) outside the block (\(blockLength) bytes)")
        }
        let first = Int(offset >> 12)
        return first..<first + Int(length >> 12)
    }
}

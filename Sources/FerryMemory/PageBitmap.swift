import CFerry

/// One bit per target page, shared between threads: the vCPU dirty log, the set of pages
/// still to send, the destination's received pages. Bit operations are atomic.
///
/// Wire form (QEMU's received bitmap): little-endian 64-bit words, bit i = page i,
/// i.e. page i is bit (i % 8) of byte (i / 8).
///
/// Ownership: the sizes and the `words` pointer are immutable; the words themselves are
/// read and changed only with atomic operations (or, for whole-bitmap operations, by one
/// thread while the others are known to be quiet, as each caller says).
public final class PageBitmap: @unchecked Sendable {
    public let bitCount: Int
    public let wordCount: Int
    /// Raw words; KVM's dirty log and the wire codec use them directly.
    public let words: UnsafeMutablePointer<UInt64>

    public init(bitCount: Int) {
        precondition(bitCount >= 0)
        self.bitCount = bitCount
        self.wordCount = (bitCount + 63) / 64
        self.words = .allocate(capacity: max(wordCount, 1))
        words.initialize(repeating: 0, count: max(wordCount, 1))
    }

    deinit { words.deallocate() }

    /// Serialised size in bytes: whole 64-bit words (QEMU rounds to 8 bytes too).
    public var byteCount: Int { wordCount * 8 }

    @inline(__always) public func set(_ i: Int) {
        precondition(i >= 0 && i < bitCount, "bit \(i) outside bitmap of \(bitCount)")
        _ = ferry_atomic_or64(words + (i >> 6), 1 << UInt64(i & 63))
    }

    @inline(__always) public func clear(_ i: Int) {
        precondition(i >= 0 && i < bitCount, "bit \(i) outside bitmap of \(bitCount)")
        _ = ferry_atomic_and64(words + (i >> 6), ~(1 << UInt64(i & 63)))
    }

    @inline(__always) public func test(_ i: Int) -> Bool {
        precondition(i >= 0 && i < bitCount, "bit \(i) outside bitmap of \(bitCount)")
        return ferry_atomic_load64(words + (i >> 6)) & (1 << UInt64(i & 63)) != 0
    }

    /// Clears bit i and says whether it was set (one atomic step).
    @inline(__always) public func testAndClear(_ i: Int) -> Bool {
        precondition(i >= 0 && i < bitCount)
        let mask: UInt64 = 1 << UInt64(i & 63)
        return ferry_atomic_and64(words + (i >> 6), ~mask) & mask != 0
    }

    /// Clears the set bits from `start` on, up to the first clear one and at most `limit`,
    /// and says how many it cleared (each in one atomic step).
    public func takeRun(from start: Int, limit: Int) -> Int {
        var n = 0
        let end = min(bitCount, start + limit)
        while start + n < end, testAndClear(start + n) { n += 1 }
        return n
    }

    /// Sets bit i and says whether it was already set.
    @inline(__always) public func testAndSet(_ i: Int) -> Bool {
        precondition(i >= 0 && i < bitCount)
        let mask: UInt64 = 1 << UInt64(i & 63)
        return ferry_atomic_or64(words + (i >> 6), mask) & mask != 0
    }

    public func setAll() {
        for w in 0..<wordCount { _ = ferry_atomic_exchange64(words + w, ~0) }
        trimTail()
    }

    public func clearAll() {
        for w in 0..<wordCount { _ = ferry_atomic_exchange64(words + w, 0) }
    }

    /// Number of set bits.
    public func popcount() -> Int {
        var n = 0
        for w in 0..<wordCount { n += ferry_atomic_load64(words + w).nonzeroBitCount }
        return n
    }

    /// First set bit at or after `start`, or nil. Skips empty words 64 bits at a time.
    public func nextSet(from start: Int) -> Int? {
        if start >= bitCount { return nil }
        var w = start >> 6
        var word = ferry_atomic_load64(words + w) & (~0 << UInt64(start & 63))
        while true {
            if word != 0 {
                let i = (w << 6) + word.trailingZeroBitCount
                return i < bitCount ? i : nil
            }
            w += 1
            if w >= wordCount { return nil }
            word = ferry_atomic_load64(words + w)
        }
    }

    /// Calls `body` for every set bit in ascending order.
    public func forEachSet(_ body: (Int) throws -> Void) rethrows {
        for w in 0..<wordCount {
            var word = ferry_atomic_load64(words + w)
            while word != 0 {
                let i = (w << 6) + word.trailingZeroBitCount
                if i >= bitCount { return }
                try body(i)
                word &= word - 1
            }
        }
    }

    /// Flips every bit (the source turns "received" into "still to send" this way).
    public func complement() {
        for w in 0..<wordCount { words[w] = ~ferry_atomic_load64(words + w) }
        trimTail()
    }

    /// ORs another bitmap of the same size into this one.
    public func formUnion(_ other: PageBitmap) {
        precondition(other.bitCount == bitCount)
        for w in 0..<wordCount { _ = ferry_atomic_or64(words + w, ferry_atomic_load64(other.words + w)) }
    }

    /// This bitmap's bits that `other` (same size) does not have, as a new bitmap.
    public func subtracting(_ other: PageBitmap) -> PageBitmap {
        precondition(other.bitCount == bitCount)
        let r = PageBitmap(bitCount: bitCount)
        for w in 0..<wordCount { r.words[w] = ferry_atomic_load64(words + w) & ~ferry_atomic_load64(other.words + w) }
        return r
    }

    /// Atomically takes all bits out of this bitmap into `into` (OR), leaving this one empty.
    public func drain(into other: PageBitmap) {
        precondition(other.bitCount == bitCount)
        drain(into: other, atBit: 0)
    }

    /// As `drain(into:)`, into bits `atBit ..< atBit + bitCount` of a larger bitmap
    /// (`atBit` a multiple of 64: a memory slot's part of its RAM block).
    public func drain(into other: PageBitmap, atBit: Int) {
        precondition(atBit % 64 == 0 && atBit + bitCount <= other.bitCount)
        let base = other.words + atBit / 64
        for w in 0..<wordCount {
            let v = ferry_atomic_exchange64(words + w, 0)
            if v != 0 { _ = ferry_atomic_or64(base + w, v) }
        }
    }

    /// Bits past `bitCount` in the last word are always zero.
    private func trimTail() {
        let extra = wordCount * 64 - bitCount
        if extra > 0 { words[wordCount - 1] &= ~0 >> UInt64(extra) }
    }

    // MARK: wire form

    /// Little-endian 64-bit words, `byteCount` bytes.
    public func serialized() -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: byteCount) { buf, n in
            let out = UnsafeMutableRawPointer(buf.baseAddress!)
            for w in 0..<wordCount {
                out.storeBytes(of: ferry_atomic_load64(words + w).littleEndian, toByteOffset: w * 8, as: UInt64.self)
            }
            n = byteCount
        }
    }

    /// Parses the wire form; `bytes.count` must equal the serialised size for `bitCount`.
    public static func deserialize(_ bytes: some Collection<UInt8>, bitCount: Int) -> PageBitmap? {
        let bm = PageBitmap(bitCount: bitCount)
        guard bytes.count == bm.byteCount else { return nil }
        let fast: Void? = bytes.withContiguousStorageIfAvailable { b in
            let raw = UnsafeRawPointer(b.baseAddress!)
            for w in 0..<bm.wordCount { bm.words[w] = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: w * 8, as: UInt64.self)) }
        }
        if fast == nil {
            var idx = bytes.startIndex
            for w in 0..<bm.wordCount {
                var v: UInt64 = 0
                for k in 0..<8 {
                    v |= UInt64(bytes[idx]) << UInt64(8 * k)
                    idx = bytes.index(after: idx)
                }
                bm.words[w] = v
            }
        }
        bm.trimTail()
        return bm
    }
}

extension PageBitmap: Equatable {
    public static func == (a: PageBitmap, b: PageBitmap) -> Bool {
        guard a.bitCount == b.bitCount else { return false }
        for w in 0..<a.wordCount where ferry_atomic_load64(a.words + w) != ferry_atomic_load64(b.words + w) { return false }
        return true
    }
}

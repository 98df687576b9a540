/// QEMU's XBZRLE page delta (`migration/xbzrle.c`'s format): the new page against the copy
/// the receiver already has, as alternating runs
///
///     page  = zrun nzrun | zrun nzrun page
///     zrun  = length                (bytes that did not change)
///     nzrun = length byte...        (bytes that did, as they are now)
///
/// lengths in ULEB128 of at most two bytes. Only the first zero run may be empty; a trailing
/// zero run is left out; an unchanged page encodes to nothing (and is not sent at all).
/// On the wire a record with `RAM_SAVE_FLAG_XBZRLE` carries `u8 0x01 | be16 length |
/// encoded bytes`, the length at most a page.
public enum XBZRLE {
    /// The one encoding flag QEMU defines (`ENCODING_FLAG_XBZRLE`).
    public static let encodingFlag: UInt8 = 0x01

    /// Equal bytes shorter than this stay inside a changed run: a separate zero run would
    /// cost a length byte for it and another for the changed run after it.
    static let shortestZeroRun = 3

    /// Encodes `new` against `old` (`count` bytes each, `count` < 16384, both 8-aligned) into `out`, at most
    /// `capacity` bytes. Returns the encoded length, 0 when the two are equal, or nil when
    /// the encoding would not fit (an "overflow": the page goes whole).
    public static func encode(old: UnsafeRawPointer, new: UnsafeRawPointer, count: Int,
                              into out: UnsafeMutableRawPointer, capacity: Int) -> Int? {
        encode(old: old, new: new, count: count, into: out, capacity: capacity, updating: nil)
    }

    /// `encode` against a cached copy that then becomes what the receiver will hold: each
    /// changed run goes from the output into `cache` as it is written. `new` may be a page
    /// the guest is writing meanwhile: every byte sent is read from it once, and the cache
    /// takes it from the output, so the cache always equals the receiver's page after the
    /// delta (a byte written after it was compared is in the dirty log, sent next pass).
    /// On nil (overflow) `cache` is partly updated: the caller sends the page whole from
    /// a copy it makes into `cache`.
    public static func encode(updating cache: UnsafeMutableRawPointer, new: UnsafeRawPointer, count: Int,
                              into out: UnsafeMutableRawPointer, capacity: Int) -> Int? {
        encode(old: UnsafeRawPointer(cache), new: new, count: count, into: out, capacity: capacity, updating: cache)
    }

    @inline(__always)
    private static func encode(old o: UnsafeRawPointer, new n: UnsafeRawPointer, count: Int, into d: UnsafeMutableRawPointer,
                               capacity: Int, updating cache: UnsafeMutableRawPointer?) -> Int? {
        precondition(count < 1 << 14, "XBZRLE lengths are at most two ULEB128 bytes")
        precondition((Int(bitPattern: o) | Int(bitPattern: n)) & 7 == 0, "XBZRLE compares 8-aligned pages a word at a time")
        var i = 0, written = 0
        while i < count {
            let changed = firstDifference(o, n, from: i, count: count)
            if changed == count {
                // Only equal bytes left: the unchanged page, or the trailing zero run.
                return i == 0 ? 0 : written
            }
            guard let w = putLength(changed - i, d, at: written, capacity: capacity) else { return nil }
            written = w
            // The changed run: up to the next run of equal bytes worth its own length byte.
            // It holds at least the byte found different (a guest may have written it back
            // since: sending it anyway is harmless).
            var end = changed + 1
            while end < count {
                end = firstEqual(o, n, from: end, count: count)
                if end == count { break }
                let equalEnd = firstDifference(o, n, from: end, count: count)
                if equalEnd == count || equalEnd - end >= shortestZeroRun { break }
                end = equalEnd
            }
            let length = end - changed
            guard let w2 = putLength(length, d, at: written, capacity: capacity), w2 + length <= capacity else { return nil }
            (d + w2).copyMemory(from: n + changed, byteCount: length)
            cache.map { ($0 + changed).copyMemory(from: d + w2, byteCount: length) }
            written = w2 + length
            i = end
        }
        return written
    }

    /// Applies an encoded delta to `page` (`count` bytes) in place. Returns the number of
    /// bytes of the page the delta covers; malformed input (a bad length, an empty changed
    /// run, an empty zero run past the start, runs past the page) is a `WireError` and
    /// may leave `page` partly updated, as QEMU's decoder does.
    @discardableResult
    public static func decode(_ encoded: UnsafeRawBufferPointer, into page: UnsafeMutableRawPointer, count: Int) throws(WireError) -> Int {
        let s = encoded.baseAddress.map { $0.assumingMemoryBound(to: UInt8.self) }
        let length = encoded.count
        var i = 0, d = 0
        func readLength() throws(WireError) -> Int {
            guard length - i >= 2, let s else { throw WireError(.badPayload, "XBZRLE data ends inside a run at byte \(i)") }
            let first = Int(s[i])
            if first & 0x80 == 0 { i += 1; return first }
            let second = Int(s[i + 1])
            guard second & 0x80 == 0 else { throw WireError(.badPayload, "XBZRLE length longer than two bytes at byte \(i)") }
            i += 2
            return first & 0x7f | second << 7
        }
        while i < length {
            let at = i
            let zero = try readLength()
            guard zero > 0 || at == 0 else { throw WireError(.badPayload, "XBZRLE empty zero run past the start") }
            d += zero
            guard d <= count else { throw WireError(.badPayload, "XBZRLE zero run past the end of the page") }
            let changed = try readLength()
            guard changed > 0 else { throw WireError(.badPayload, "XBZRLE empty changed run") }
            guard d + changed <= count, i + changed <= length, let s else {
                throw WireError(.badPayload, "XBZRLE changed run of \(changed) bytes past the page or the data")
            }
            (page + d).copyMemory(from: s + i, byteCount: changed)
            d += changed
            i += changed
        }
        return d
    }

    /// The first index from `i` on where the pages differ (`count` if none): 64 bytes at a
    /// step while they are equal (no branch inside the step), the differing byte found from
    /// the XOR of a word. Written out by hand, without helpers: the tests' unoptimised
    /// builds run migrations on it.
    @inline(__always)
    static func firstDifference(_ o: UnsafeRawPointer, _ n: UnsafeRawPointer, from i: Int, count: Int) -> Int {
        var j = i
        while j & 7 != 0 && j < count {
            if o.load(fromByteOffset: j, as: UInt8.self) != n.load(fromByteOffset: j, as: UInt8.self) { return j }
            j += 1
        }
        let ow = o.assumingMemoryBound(to: UInt64.self), nw = n.assumingMemoryBound(to: UInt64.self)
        var w = j >> 3
        let words = count >> 3
        while w + 8 <= words {
            let x = (ow[w] ^ nw[w]) | (ow[w + 1] ^ nw[w + 1]) | (ow[w + 2] ^ nw[w + 2]) | (ow[w + 3] ^ nw[w + 3])
            let y = (ow[w + 4] ^ nw[w + 4]) | (ow[w + 5] ^ nw[w + 5]) | (ow[w + 6] ^ nw[w + 6]) | (ow[w + 7] ^ nw[w + 7])
            if x | y != 0 { break }
            w += 8
        }
        while w < words {
            let x = ow[w] ^ nw[w]
            if x != 0 { return w << 3 + UInt64(littleEndian: x).trailingZeroBitCount >> 3 }
            w += 1
        }
        j = w << 3
        while j < count && o.load(fromByteOffset: j, as: UInt8.self) == n.load(fromByteOffset: j, as: UInt8.self) { j += 1 }
        return j
    }

    /// The first index from `i` on where the pages are equal (`count` if none): a word at a
    /// step, its lowest zero byte of the XOR found without a loop (the lowest set bit of
    /// `(x - 0x01..) & ~x & 0x80..` marks exactly the lowest zero byte).
    @inline(__always)
    static func firstEqual(_ o: UnsafeRawPointer, _ n: UnsafeRawPointer, from i: Int, count: Int) -> Int {
        var j = i
        while j & 7 != 0 && j < count {
            if o.load(fromByteOffset: j, as: UInt8.self) == n.load(fromByteOffset: j, as: UInt8.self) { return j }
            j += 1
        }
        let ow = o.assumingMemoryBound(to: UInt64.self), nw = n.assumingMemoryBound(to: UInt64.self)
        var w = j >> 3
        let words = count >> 3
        while w < words {
            let x = UInt64(littleEndian: ow[w] ^ nw[w])
            let zeroBytes = (x &- 0x0101_0101_0101_0101) & ~x & 0x8080_8080_8080_8080
            if zeroBytes != 0 { return w << 3 + zeroBytes.trailingZeroBitCount >> 3 }
            w += 1
        }
        j = w << 3
        while j < count && o.load(fromByteOffset: j, as: UInt8.self) != n.load(fromByteOffset: j, as: UInt8.self) { j += 1 }
        return j
    }

    /// Writes `v` as ULEB128 (one byte below 128, else two) at `at`; nil if it does not fit.
    @inline(__always)
    static func putLength(_ v: Int, _ p: UnsafeMutableRawPointer, at: Int, capacity: Int) -> Int? {
        let d = p.assumingMemoryBound(to: UInt8.self)
        if v < 0x80 {
            guard at + 1 <= capacity else { return nil }
            d[at] = UInt8(v)
            return at + 1
        }
        guard at + 2 <= capacity else { return nil }
        d[at] = UInt8(v & 0x7f) | 0x80
        d[at + 1] = UInt8(v >> 7)
        return at + 2
    }
}

extension WireBuffer {
    /// An XBZRLE record: the page header with `RAM_SAVE_FLAG_XBZRLE`, the encoding flag,
    /// the be16 length and the encoded bytes.
    public mutating func xbzrleRecord(offset: UInt64, block: String?, encoded: UnsafeRawBufferPointer) {
        precondition(encoded.count <= Wire.pageSize)
        ramRecord(offset: offset, flags: .xbzrle, block: block)
        u8(XBZRLE.encodingFlag)
        be16(UInt16(encoded.count))
        bytes.append(contentsOf: encoded)
    }
}

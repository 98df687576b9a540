/// Where a decoder reads from. The codec does no I/O itself: a socket-backed source lives
/// in the migration layer, `ByteArraySource` serves tests and fuzzing.
public protocol ByteSource: AnyObject {
    /// Fills `buffer` completely, or throws `WireError(.truncated)` at end of input.
    func readExactly(_ buffer: UnsafeMutableRawBufferPointer) throws
}

extension ByteSource {
    @inline(__always) public func u8() throws -> UInt8 {
        var v: UInt8 = 0
        try withUnsafeMutableBytes(of: &v) { try readExactly($0) }
        return v
    }
    @inline(__always) public func be16() throws -> UInt16 {
        var v: UInt16 = 0
        try withUnsafeMutableBytes(of: &v) { try readExactly($0) }
        return UInt16(bigEndian: v)
    }
    @inline(__always) public func be32() throws -> UInt32 {
        var v: UInt32 = 0
        try withUnsafeMutableBytes(of: &v) { try readExactly($0) }
        return UInt32(bigEndian: v)
    }
    @inline(__always) public func be64() throws -> UInt64 {
        var v: UInt64 = 0
        try withUnsafeMutableBytes(of: &v) { try readExactly($0) }
        return UInt64(bigEndian: v)
    }
    public func bytes(_ n: Int) throws -> [UInt8] {
        var a = [UInt8](repeating: 0, count: n)
        if n > 0 { try a.withUnsafeMutableBytes { try readExactly($0) } }
        return a
    }
    /// A counted string: u8 length + bytes, which must be UTF-8. (Decoding with
    /// replacement would turn each bad byte into three: a name could then outgrow its
    /// 255-byte field and two different names could read the same. Found by fuzzing.)
    public func countedString() throws -> String {
        let n = Int(try u8())
        guard let s = String(validating: try bytes(n), as: UTF8.self) else {
            throw WireError(.badPayload, "a name of \(n) bytes is not valid UTF-8")
        }
        return s
    }
}

/// An in-memory source.
public final class ByteArraySource: ByteSource {
    public let data: [UInt8]
    public private(set) var position = 0
    public init(_ data: [UInt8]) { self.data = data }
    public var remaining: Int { data.count - position }
    public func readExactly(_ buffer: UnsafeMutableRawBufferPointer) throws {
        guard buffer.count <= remaining else {
            position = data.count
            throw WireError(.truncated, "stream ended \(buffer.count - remaining) bytes early")
        }
        if buffer.count > 0 {
            data.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress! + position, byteCount: buffer.count) }
        }
        position += buffer.count
    }
}

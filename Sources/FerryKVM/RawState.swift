import CFerry
import FerrySys

/// Kernel state structs move as raw bytes (source and destination are both Ferry on
/// x86_64 KVM); these two helpers are the one place that reads and writes them.
@inline(__always)
func readRaw<T>(_ fd: Int32, _ request: UInt, _ name: String, _ initial: T) throws(KVMError) -> [UInt8] {
    var v = initial
    _ = try kvmCall(name) { () throws(SysError) in try Sys.ioctl(fd, request, name, &v) }
    return withUnsafeBytes(of: v) { Array($0) }
}

/// Writes `bytes`, which must be exactly one `T`.
func writeRaw<T>(_ fd: Int32, _ request: UInt, _ name: String, _ bytes: [UInt8], as: T.Type) throws(KVMError) {
    guard bytes.count == MemoryLayout<T>.size else {
        throw KVMError(.state, "\(name): state of \(bytes.count) bytes, expected \(MemoryLayout<T>.size)")
    }
    var b = bytes
    let r = b.withUnsafeMutableBytes { ferry_ioctl_ptr(fd, request, $0.baseAddress) }
    if r < 0 { throw KVMError(.ioctl, name, cause: SysError(errno: -r, call: name)) }
}

import CFerry

extension Sys {
    /// ioctl with a pointer argument; EINTR retried unless `retryOnInterrupt` is false.
    @inline(__always)
    public static func ioctl(_ fd: Int32, _ request: UInt, _ name: @autoclosure () -> String,
                             _ arg: UnsafeMutableRawPointer?, retryOnInterrupt: Bool = true) throws(SysError) -> Int32 {
        try negErrno(name(), retryOnInterrupt: retryOnInterrupt) { ferry_ioctl_ptr(fd, request, arg) }
    }

    /// ioctl with an integer argument.
    @inline(__always)
    public static func ioctl(_ fd: Int32, _ request: UInt, _ name: @autoclosure () -> String, value: UInt) throws(SysError) -> Int32 {
        try negErrno(name()) { ferry_ioctl_int(fd, request, value) }
    }

    /// ioctl on a value of type T passed by pointer.
    @inline(__always)
    public static func ioctl<T>(_ fd: Int32, _ request: UInt, _ name: @autoclosure () -> String, _ value: inout T) throws(SysError) -> Int32 {
        let n = name()
        return try withUnsafeMutableBytes(of: &value) { (p) throws(SysError) -> Int32 in
            try negErrno(n) { ferry_ioctl_ptr(fd, request, p.baseAddress) }
        }
    }
}

import CFerry
import Glibc

/// An errno from a failed system call, with the call that failed.
/// The one error type of the syscall layer.
public struct SysError: Error, CustomStringConvertible, Sendable, Equatable {
    public let errno: Int32
    public let call: String

    public init(errno: Int32, call: String) {
        self.errno = errno
        self.call = call
    }

    public var description: String {
        "\(call): \(String(cString: strerror(errno))) (errno \(errno))"
    }

    public static let wouldBlock = EAGAIN
}

/// The typed syscall gateway: every libc/ioctl call of Ferry goes through here.
/// EINTR is retried unless the caller asks otherwise; failures become `SysError`.
public enum Sys {
    /// Runs `body`, which returns -errno or a result, retrying EINTR.
    @inline(__always)
    public static func negErrno(_ call: @autoclosure () -> String, retryOnInterrupt: Bool = true,
                                _ body: () -> Int32) throws(SysError) -> Int32 {
        while true {
            let r = body()
            if r >= 0 { return r }
            if -r == EINTR && retryOnInterrupt { continue }
            throw SysError(errno: -r, call: call())
        }
    }

    /// Runs a libc call that returns -1 and sets errno, retrying EINTR.
    @inline(__always)
    public static func libc<T: BinaryInteger>(_ call: @autoclosure () -> String, retryOnInterrupt: Bool = true,
                                              _ body: () -> T) throws(SysError) -> T {
        while true {
            let r = body()
            if r >= 0 { return r }
            let e = Glibc.errno
            if e == EINTR && retryOnInterrupt { continue }
            throw SysError(errno: e, call: call())
        }
    }

    public static func close(_ fd: Int32) {
        _ = Glibc.close(fd)
    }

    /// Writes all of `buffer`, looping on short writes.
    public static func writeAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) throws(SysError) {
        var done = 0
        while done < buffer.count {
            let n = try libc("write") { Glibc.write(fd, buffer.baseAddress! + done, buffer.count - done) }
            done += n
        }
    }

    /// Sends all of `buffer` on a socket with MSG_NOSIGNAL: a peer that went away is EPIPE,
    /// never SIGPIPE.
    public static func sendAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) throws(SysError) {
        var done = 0
        while done < buffer.count {
            let n = try libc("send") { Glibc.send(fd, buffer.baseAddress! + done, buffer.count - done, Int32(MSG_NOSIGNAL)) }
            done += n
        }
    }

    /// Reads exactly `buffer.count` bytes; returns false on EOF before the first byte,
    /// throws ECONNRESET-like `SysError(errno: EPIPE)` on EOF mid-buffer.
    public static func readExactly(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer) throws(SysError) -> Bool {
        var done = 0
        while done < buffer.count {
            let n = try libc("read") { Glibc.read(fd, buffer.baseAddress! + done, buffer.count - done) }
            if n == 0 {
                if done == 0 { return false }
                throw SysError(errno: EPIPE, call: "read (EOF after \(done) of \(buffer.count) bytes)")
            }
            done += n
        }
        return true
    }

    /// Anonymous private mapping, the backing of guest RAM. With `hugePages` the kernel is
    /// asked for transparent huge pages (`MADV_HUGEPAGE`, best effort: THP may be off):
    /// first touching 2 MiB costs one fault instead of 512.
    public static func mmapAnonymous(size: Int, hugePages: Bool = false) throws(SysError) -> UnsafeMutableRawPointer {
        let p = Glibc.mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if p == MAP_FAILED || p == nil { throw SysError(errno: Glibc.errno, call: "mmap(\(size))") }
        if hugePages { adviseHugePages(p!, size: size, true) }
        return p!
    }

    /// `MADV_HUGEPAGE` or `MADV_NOHUGEPAGE` on a mapping; best effort (THP may be off).
    public static func adviseHugePages(_ p: UnsafeMutableRawPointer, size: Int, _ on: Bool) {
        _ = Glibc.madvise(p, size, on ? MADV_HUGEPAGE : MADV_NOHUGEPAGE)
    }

    /// For each page of `[address, address + pages * 4096)` of this process's memory, whether a
    /// page backs it (present in RAM or in swap: /proc/self/pagemap bits 63 and 62). A page
    /// with neither was never touched (or was discarded) and reads as zero. `body` gets each
    /// populated page's index.
    public static func forEachPopulatedPage(address: UnsafeRawPointer, pages: Int, _ body: (Int) -> Void) throws(SysError) {
        let fd = try libc("open(/proc/self/pagemap)") { Int(Glibc.open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)) }
        defer { Glibc.close(Int32(fd)) }
        let chunk = 1 << 16
        let entries = UnsafeMutablePointer<UInt64>.allocate(capacity: chunk)
        defer { entries.deallocate() }
        let first = Int(bitPattern: address) >> 12
        var done = 0
        while done < pages {
            let n = min(chunk, pages - done)
            let got = try libc("pread(pagemap)") { Glibc.pread(Int32(fd), entries, n * 8, off_t((first + done) * 8)) }
            guard got == n * 8 else { throw SysError(errno: EIO, call: "pread(pagemap): \(got) of \(n * 8) bytes") }
            for k in 0..<n where entries[k] & (3 << 62) != 0 { body(done + k) }
            done += n
        }
    }

    public static func mmapShared(fd: Int32, size: Int) throws(SysError) -> UnsafeMutableRawPointer {
        let p = Glibc.mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED || p == nil { throw SysError(errno: Glibc.errno, call: "mmap(fd \(fd))") }
        return p!
    }

    public static func munmap(_ p: UnsafeMutableRawPointer, size: Int) {
        _ = Glibc.munmap(p, size)
    }

    public static func eventfd(initial: UInt32 = 0) throws(SysError) -> Int32 {
        try negErrno("eventfd") { ferry_eventfd(initial) }
    }

    public static func monotonicNanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Nanoseconds from `start` to now, never negative: `start` may come from another thread's
    /// clock read that raced with ours (a plain difference would trap on underflow).
    public static func nanosSince(_ start: UInt64) -> UInt64 {
        let now = monotonicNanos()
        return now >= start ? now - start : 0
    }

    /// A peer, a pipe or a client that goes away must be an EPIPE error on that fd, never a
    /// signal that kills the process (and its guest). Idempotent; call before any write.
    public static func ignoreSIGPIPE() { _ = sigpipeIgnored }
    private static let sigpipeIgnored: Void = { _ = signal(SIGPIPE, SIG_IGN) }()

    public static func wallClock() -> (seconds: Int, microseconds: Int) {
        var tv = timeval()
        gettimeofday(&tv, nil)
        return (Int(tv.tv_sec), Int(tv.tv_usec))
    }
}

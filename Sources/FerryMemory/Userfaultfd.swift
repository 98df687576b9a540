import CFerry
import FerrySys
import Glibc

/// A userfaultfd in MISSING mode over guest RAM: the postcopy destination's way to catch
/// the guest (and KVM, from inside the kernel) touching pages that have not arrived yet.
///
/// Opened through `/dev/userfaultfd` first, then the `userfaultfd(2)` syscall; never
/// user-mode-only, because KVM reads and writes guest memory from the kernel.
///
/// Ownership: `fd` and `features` are immutable; the kernel serialises the ioctls.
public final class Userfaultfd: @unchecked Sendable {
    public let fd: Int32
    /// Features the kernel granted (e.g. UFFD_FEATURE_THREAD_ID for per-vCPU blocktime).
    public let features: UInt64

    public enum Event: Sendable, Equatable {
        /// A thread faulted on `address` (page-aligned by the caller); `threadID` with THREAD_ID.
        case pageFault(address: UInt64, write: Bool, threadID: UInt32)
        case other(UInt8)
    }

    public init(nonBlocking: Bool = true) throws(MemoryError) {
        let flags = Int32(O_CLOEXEC) | (nonBlocking ? Int32(O_NONBLOCK) : 0)
        var attempts: [String] = []
        var fd: Int32 = -1
        let dev = ferry_open_rw_cloexec("/dev/userfaultfd")
        if dev >= 0 {
            let r = ferry_ioctl_int(dev, ferry_USERFAULTFD_IOC_NEW, UInt(flags))
            Sys.close(dev)
            if r >= 0 { fd = r } else { attempts.append("/dev/userfaultfd USERFAULTFD_IOC_NEW: \(String(cString: strerror(-r)))") }
        } else {
            attempts.append("/dev/userfaultfd: \(String(cString: strerror(-dev)))")
        }
        if fd < 0 {
            let r = ferry_userfaultfd_syscall(flags)
            if r >= 0 { fd = r } else { attempts.append("userfaultfd(2): \(String(cString: strerror(-r)))") }
        }
        guard fd >= 0 else {
            throw MemoryError(.mapFailed, "userfaultfd is not available (\(attempts.joined(separator: "; "))). Fix: give this process read/write access to /dev/userfaultfd, or set sysctl vm.unprivileged_userfaultfd=1, or run with CAP_SYS_PTRACE")
        }
        var api = uffdio_api()
        api.api = UInt64(UFFD_API)
        api.features = UInt64(UFFD_FEATURE_THREAD_ID)
        let r = ferry_ioctl_ptr(fd, ferry_UFFDIO_API, &api)
        if r < 0 {
            Sys.close(fd)
            throw MemoryError(.mapFailed, "UFFDIO_API failed", cause: SysError(errno: -r, call: "UFFDIO_API"))
        }
        self.fd = fd
        self.features = api.features
    }

    deinit { Sys.close(fd) }

    /// Registers `[start, start+length)` for missing-page faults.
    public func register(_ start: UnsafeMutableRawPointer, length: Int) throws(MemoryError) {
        var reg = uffdio_register()
        reg.range.start = UInt64(UInt(bitPattern: start))
        reg.range.len = UInt64(length)
        reg.mode = UInt64(UFFDIO_REGISTER_MODE_MISSING)
        let r = ferry_ioctl_ptr(fd, ferry_UFFDIO_REGISTER, &reg)
        if r < 0 { throw MemoryError(.mapFailed, "UFFDIO_REGISTER of \(length) bytes", cause: SysError(errno: -r, call: "UFFDIO_REGISTER")) }
    }

    public func unregister(_ start: UnsafeMutableRawPointer, length: Int) {
        var range = uffdio_range(start: UInt64(UInt(bitPattern: start)), len: UInt64(length))
        _ = ferry_ioctl_ptr(fd, ferry_UFFDIO_UNREGISTER, &range)
    }

    /// Installs `length` bytes from `source` at `destination` atomically and wakes waiters.
    /// Returns false when the page was already there (EEXIST: a background push and a demand
    /// fault raced; that is success).
    @discardableResult
    public func copy(to destination: UnsafeMutableRawPointer, from source: UnsafeRawPointer, length: Int) throws(MemoryError) -> Bool {
        var c = uffdio_copy()
        c.dst = UInt64(UInt(bitPattern: destination))
        c.src = UInt64(UInt(bitPattern: source))
        c.len = UInt64(length)
        while true {
            let r = ferry_ioctl_ptr(fd, ferry_UFFDIO_COPY, &c)
            if r >= 0 { return true }
            if -r == EEXIST { return false }
            if -r == EAGAIN || -r == EINTR { c.copy = 0; continue }
            throw MemoryError(.outOfRange, "UFFDIO_COPY at 0x\(String(c.dst, radix: 16))", cause: SysError(errno: -r, call: "UFFDIO_COPY"))
        }
    }

    /// Installs zero pages; false when already present.
    @discardableResult
    public func zeroPage(at destination: UnsafeMutableRawPointer, length: Int) throws(MemoryError) -> Bool {
        var z = uffdio_zeropage()
        z.range.start = UInt64(UInt(bitPattern: destination))
        z.range.len = UInt64(length)
        while true {
            let r = ferry_ioctl_ptr(fd, ferry_UFFDIO_ZEROPAGE, &z)
            if r >= 0 { return true }
            if -r == EEXIST { return false }
            if -r == EAGAIN || -r == EINTR { z.zeropage = 0; continue }
            throw MemoryError(.outOfRange, "UFFDIO_ZEROPAGE at 0x\(String(z.range.start, radix: 16))", cause: SysError(errno: -r, call: "UFFDIO_ZEROPAGE"))
        }
    }

    /// Reads one event; nil when none is pending (non-blocking fd).
    public func readEvent() throws(MemoryError) -> Event? {
        var msg = uffd_msg()
        let n = read(fd, &msg, MemoryLayout<uffd_msg>.size)
        if n < 0 {
            if errno == EAGAIN || errno == EINTR { return nil }
            throw MemoryError(.mapFailed, "reading userfaultfd", cause: SysError(errno: errno, call: "read(userfaultfd)"))
        }
        guard n == MemoryLayout<uffd_msg>.size else { return nil }
        if msg.event == UInt8(UFFD_EVENT_PAGEFAULT) {
            let pf = msg.arg.pagefault
            return .pageFault(address: pf.address, write: pf.flags & UInt64(UFFD_PAGEFAULT_FLAG_WRITE) != 0, threadID: pf.feat.ptid)
        }
        return .other(msg.event)
    }

    /// Waits up to `timeoutMs` for an event (or for `wakeFd`, an eventfd used to stop the waiter).
    public func waitReadable(timeoutMs: Int32, wakeFd: Int32 = -1) -> Bool {
        var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: wakeFd, events: Int16(POLLIN), revents: 0)]
        return poll(&fds, wakeFd >= 0 ? 2 : 1, timeoutMs) > 0 && fds[0].revents != 0
    }
}

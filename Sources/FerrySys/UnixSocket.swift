import Glibc

/// Unix-domain socket addresses: the one place that builds a `sockaddr_un` and decides
/// whether a path may be bound (QMP sockets, `unix:` migration addresses, clients).
public enum UnixSocket {
    /// Longest path `sun_path` holds with its terminating NUL.
    public static let maxPathBytes = 107

    /// Calls `body` with the address of `path`; ENAMETOOLONG if it does not fit.
    public static func withAddress<T>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) throws -> T) throws -> T {
        let u = Array(path.utf8)
        guard !u.isEmpty, u.count <= maxPathBytes else { throw SysError(errno: ENAMETOOLONG, call: "unix socket address (\(path))") }
        var sa = sockaddr_un()
        sa.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &sa.sun_path) { for i in 0..<u.count { $0[i] = u[i] } }
        return try withUnsafePointer(to: &sa) {
            try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { try body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    /// A connected stream socket to `path`, or the connect error (no retry).
    public static func connect(_ path: String) throws -> Int32 {
        let fd = try Sys.libc("socket(AF_UNIX)") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        do {
            _ = try withAddress(path) { addr, len in try Sys.libc("connect(\(path))") { Glibc.connect(fd, addr, len) } }
            return fd
        } catch {
            Sys.close(fd)
            throw error
        }
    }

    /// Makes `path` free for a new listening socket without taking anything over: nothing
    /// there is fine; a socket nobody listens on (left by a process that died) is removed;
    /// a socket something still answers on (a live VM's QMP socket) or anything that is not
    /// a socket (a regular file, a directory) is refused with EADDRINUSE / EEXIST.
    public static func claim(_ path: String) throws(SysError) {
        var st = stat()
        guard lstat(path, &st) == 0 else {
            if errno == ENOENT { return }
            throw SysError(errno: errno, call: "lstat(\(path))")
        }
        guard st.st_mode & S_IFMT == S_IFSOCK else {
            throw SysError(errno: EEXIST, call: "\(path) exists and is not a socket; refusing to replace it")
        }
        if let fd = try? connect(path) {
            Sys.close(fd)
            throw SysError(errno: EADDRINUSE, call: "\(path) is in use by a running process; refusing to take it over")
        }
        guard unlink(path) == 0 || errno == ENOENT else { throw SysError(errno: errno, call: "unlink(\(path))") }
    }
}

import CFerry
import FerrySys
import FerryTLS
import FerryWire
import Glibc
import Synchronization

/// One migration connection (socket, pipe or file), owning its fd. Reads are buffered and
/// feed the stream decoder; writes batch small headers and whole pages from guest RAM into
/// large `writev` calls, so bulk sending does no per-page allocation or copy.
///
/// Ownership: `fd`, `description`, `isSocket`, `abortFd` and the buffers' addresses are
/// immutable; the read side (`readStart`, `readEnd`, the read buffer) belongs to the one
/// thread that reads the channel, the write side (`iovecs`, `stagingUsed`, `queuedBytes`,
/// the staging and TLS gather areas) to the one thread that writes it; the byte counters
/// are atomics; `closed`, `childPID` (set before the channel is shared) and the read timeout are
/// guarded by `closeLock`; `tls`
/// is set once, right after the handshake, before either side is used.
public final class MigrationChannel: ByteSource, @unchecked Sendable {
    public let fd: Int32
    public let description: String
    public let isSocket: Bool
    /// A child process behind an exec: channel, reaped on close.
    var childPID: pid_t = 0
    /// TLS on this socket (set by `Transport` right after the handshake, before any other
    /// use). Reads and writes then go through it; the fd stays ours.
    public private(set) var tls: TLSSession?
    /// TLS writes gather headers and pages here: one record per 16 KiB, not one per iovec.
    private var tlsGather: UnsafeMutableRawPointer?
    private let tlsGatherCapacity = 64 << 10

    // read side
    private let readBuffer: UnsafeMutableRawPointer
    private let readCapacity = 256 << 10
    private var readStart = 0
    private var readEnd = 0
    /// Bytes read so far. The reading thread adds, any thread (query-migrate) reads: atomic.
    public var bytesRead: UInt64 { readCount.load(ordering: .relaxed) }
    private let readCount = Atomic<UInt64>(0)

    // write side
    private let staging: UnsafeMutableRawPointer
    private let stagingCapacity = 64 << 10
    private var stagingUsed = 0
    private var iovecs: [iovec]
    private let maxIovecs = 256
    /// Bytes sent so far. The writing thread adds, any thread (query-migrate) reads: atomic.
    public var bytesWritten: UInt64 { writeCount.load(ordering: .relaxed) }
    private let writeCount = Atomic<UInt64>(0)
    private var closed = false
    private let closeLock = Monitor()
    /// Bytes queued in `iovecs` (kept so the rate limiter's per-page check is O(1)).
    private var queuedBytes = 0
    /// Signalled by `abort`: wakes a writer waiting for a pipe or FIFO that nobody reads
    /// (shutdown only reaches sockets). -1 if it could not be made.
    private let abortFd: Int32
    /// When positive, a read that sees no byte for this long fails: the heartbeat that turns
    /// a silent partition (no RST, no FIN) into an error within a bounded time.
    public var readTimeoutMs: Int32 {
        get { closeLock.withLock { timeoutStorage } }
        set { closeLock.withLock { timeoutStorage = newValue } }
    }
    private var timeoutStorage: Int32 = 0

    public init(fd: Int32, description: String) {
        Sys.ignoreSIGPIPE() // a peer that goes away is EPIPE on this channel, not a signal
        self.fd = fd
        abortFd = ferry_eventfd(0)
        self.description = description
        var st = stat()
        fstat(fd, &st)
        isSocket = (st.st_mode & S_IFMT) == S_IFSOCK
        readBuffer = .allocate(byteCount: readCapacity, alignment: Wire.pageSize)
        staging = .allocate(byteCount: stagingCapacity, alignment: 64)
        iovecs = []
        iovecs.reserveCapacity(maxIovecs)
    }

    deinit {
        close()
        if abortFd >= 0 { Sys.close(abortFd) }
        readBuffer.deallocate()
        staging.deallocate()
        tlsGather?.deallocate()
    }

    func attach(_ session: TLSSession) {
        tls = session
        tlsGather = .allocate(byteCount: tlsGatherCapacity, alignment: 64)
    }

    /// Closes the fd (once) and reaps an exec child.
    public func close() {
        closeLock.withLock {
            guard !closed else { return }
            closed = true
            tls?.sendCloseNotify()
            tls?.free()
            Sys.close(fd)
            if childPID > 0 {
                var status: Int32 = 0
                waitpid(childPID, &status, 0)
            }
        }
    }

    /// Ends the channel for good from any thread (cancel, failure): wakes a blocked writer
    /// on a socket, pipe or FIFO, and kills an exec: command (its whole process group:
    /// `sh -c` and what it started), so `close` reaps it at once.
    public func abort() {
        closeLock.withLock {
            guard !closed else { return }
            var one: UInt64 = 1
            if abortFd >= 0 { _ = Glibc.write(abortFd, &one, 8) }
            if isSocket { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
            if childPID > 0 { _ = kill(-childPID, SIGKILL) }
        }
    }

    /// The end of a successful outgoing stream: an exec: command must consume it all and
    /// exit with status 0 (a failing command is a failed migration, not a completed one).
    public func finishOutput() throws {
        let pid: pid_t = closeLock.withLock { childPID }
        guard pid > 0 else { return }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno == EINTR { continue }
            return
        }
        closeLock.withLock { childPID = 0 }
        let exited = status & 0x7f == 0, code = (status >> 8) & 0xff
        guard exited && code == 0 else {
            throw MigrationError(.io, exited ? "the exec: command exited with status \(code)" : "the exec: command was killed by signal \(status & 0x7f)")
        }
    }

    /// Unblocks any thread reading or writing this channel (cancel, pause, fault injection).
    public func shutdown() {
        closeLock.withLock {
            guard !closed else { return }
            if isSocket { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
        }
    }

    /// What the first bytes of a new connection say about the peer (peeked, not consumed).
    enum StreamStart: Equatable { case source, multifd, incomplete, stray(String) }

    /// Classifies a freshly accepted connection without reading from it: the start of a
    /// migration stream (`QEVM`), or with `tls` a TLS handshake record or a plain stream
    /// (the real source, misconfigured: the handshake reports it), is a source; a plain
    /// multifd channel's magic is one of the source's multifd channels, come early; EOF, a
    /// reset or other bytes are a stray connection.
    func peekStreamStart(tls: Bool) -> StreamStart {
        var b = [UInt8](repeating: 0, count: 4)
        let n = b.withUnsafeMutableBytes { recv(fd, $0.baseAddress, 4, Int32(MSG_PEEK | MSG_DONTWAIT)) }
        if n == 0 { return .stray("closed before sending a migration header") }
        if n < 0 {
            if errno == EAGAIN || errno == EINTR { return .incomplete }
            return .stray("\(SysError(errno: errno, call: "recv"))")
        }
        let magic: [UInt8] = [0x51, 0x45, 0x56, 0x4d] // "QEVM"
        if tls && b[0] == 0x16 { return .source } // a TLS handshake record
        if Array(b[0..<n]) == Array(magic[0..<n]) { return n == 4 ? .source : .incomplete }
        let multifd: [UInt8] = [0x11, 0x22, 0x33, 0x44] // MultiFD.magic, big-endian
        if !tls && Array(b[0..<n]) == Array(multifd[0..<n]) { return n == 4 ? .multifd : .incomplete }
        let hex = b[0..<n].map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: " ")
        return .stray("not a migration stream (bad magic: \(hex))")
    }

    /// The peer's address, for messages ("127.0.0.1:5501", a Unix socket, or "?").
    var peerDescription: String {
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &ss) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &len) } } == 0
        guard ok else { return "peer unknown" }
        if Int32(ss.ss_family) == AF_INET {
            return withUnsafePointer(to: &ss) { $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sin in
                var a = sin.pointee.sin_addr
                var buf = [CChar](repeating: 0, count: 64)
                inet_ntop(AF_INET, &a, &buf, 64)
                return "from \(String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)):\(UInt16(bigEndian: sin.pointee.sin_port))"
            } }
        }
        return Int32(ss.ss_family) == AF_UNIX ? "a local client" : "peer family \(ss.ss_family)"
    }

    // MARK: reading

    public func readExactly(_ buffer: UnsafeMutableRawBufferPointer) throws {
        var done = 0
        let want = buffer.count
        while done < want {
            if readStart == readEnd {
                // Large reads go straight to the destination (e.g. a page into guest RAM).
                if want - done >= readCapacity / 2 {
                    let n = try rawRead(buffer.baseAddress! + done, want - done)
                    if n == 0 { throw eof(done, want) }
                    done += n
                    continue
                }
                let n = try rawRead(readBuffer, readCapacity)
                if n == 0 { throw eof(done, want) }
                readStart = 0
                readEnd = n
            }
            let k = min(readEnd - readStart, want - done)
            (buffer.baseAddress! + done).copyMemory(from: readBuffer + readStart, byteCount: k)
            readStart += k
            done += k
        }
    }

    /// Bytes already buffered (readable without blocking).
    public var bufferedCount: Int { readEnd - readStart }

    private func eof(_ done: Int, _ want: Int) -> MigrationError {
        MigrationError(.closed, done == 0 ? "connection closed by peer (\(description))"
                                          : "connection closed in the middle of a record (\(done) of \(want) bytes)")
    }

    private func rawRead(_ p: UnsafeMutableRawPointer, _ n: Int) throws -> Int {
        let timeout = readTimeoutMs
        if let tls {
            do {
                let r = try tls.read(p, n, timeoutMs: timeout)
                readCount.wrappingAdd(UInt64(r), ordering: .relaxed)
                return r
            } catch let e as TLSError where e.code == .timeout {
                throw MigrationError(.timeout, "no data from the peer on \(description) for \(timeout) ms: link presumed down")
            } catch {
                throw MigrationError(.io, "read from \(description) failed", cause: error)
            }
        }
        if timeout > 0 {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            while true {
                let r = poll(&pfd, 1, timeout)
                if r > 0 { break }
                if r < 0 && errno == EINTR { continue }
                if r == 0 { throw MigrationError(.timeout, "no data from the peer on \(description) for \(timeout) ms: link presumed down") }
                break
            }
        }
        while true {
            let r = Glibc.read(fd, p, n)
            if r >= 0 { readCount.wrappingAdd(UInt64(r), ordering: .relaxed); return r }
            if errno == EINTR { continue }
            throw MigrationError(.io, "read from \(description) failed", cause: SysError(errno: errno, call: "read"))
        }
    }

    // MARK: writing

    /// Queues bytes (copied into the staging area).
    public func write(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write(raw: $0) }
    }

    public func write(_ buffer: WireBuffer) throws { try write(buffer.bytes) }

    public func write(raw: UnsafeRawBufferPointer) throws {
        var off = 0
        while off < raw.count {
            if stagingUsed == stagingCapacity || iovecs.count >= maxIovecs { try flush() }
            let k = min(raw.count - off, stagingCapacity - stagingUsed)
            let dst = staging + stagingUsed
            dst.copyMemory(from: raw.baseAddress! + off, byteCount: k)
            if let last = iovecs.last, last.iov_base! + last.iov_len == dst {
                iovecs[iovecs.count - 1].iov_len += k
            } else {
                iovecs.append(iovec(iov_base: dst, iov_len: k))
            }
            stagingUsed += k
            queuedBytes += k
            off += k
        }
    }

    /// Queues `count` bytes from memory the caller keeps valid until the next flush (a page
    /// of guest RAM). No copy.
    public func write(reference p: UnsafeRawPointer, count: Int) throws {
        if iovecs.count >= maxIovecs { try flush() }
        iovecs.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: p), iov_len: count))
        queuedBytes += count
    }

    /// Bytes queued but not yet sent.
    public var pendingBytes: Int { queuedBytes }

    /// A non-blocking pipe or FIFO is full: waits until it drains or the channel is aborted.
    private func waitWritable() throws {
        var fds = [pollfd(fd: fd, events: Int16(POLLOUT), revents: 0), pollfd(fd: abortFd, events: Int16(POLLIN), revents: 0)]
        while poll(&fds, abortFd >= 0 ? 2 : 1, -1) < 0 {
            if errno != EINTR { throw MigrationError(.io, "poll on \(description) failed", cause: SysError(errno: errno, call: "poll")) }
        }
        if abortFd >= 0 && fds[1].revents != 0 { throw MigrationError(.cancelled, "\(description) was aborted") }
    }

    public func flush() throws {
        if tls != nil { return try flushTLS() }
        var first = 0
        while first < iovecs.count {
            let n = iovecs.withUnsafeMutableBufferPointer { v in
                Glibc.writev(fd, v.baseAddress! + first, Int32(min(v.count - first, 1024)))
            }
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN {
                    do { try waitWritable(); continue } catch { iovecs.removeAll(keepingCapacity: true); stagingUsed = 0; queuedBytes = 0; throw error }
                }
                let e = errno
                iovecs.removeAll(keepingCapacity: true); stagingUsed = 0; queuedBytes = 0
                throw MigrationError(.io, "write to \(description) failed", cause: SysError(errno: e, call: "writev"))
            }
            writeCount.wrappingAdd(UInt64(n), ordering: .relaxed)
            queuedBytes -= n
            var left = n
            while left > 0 && first < iovecs.count {
                if iovecs[first].iov_len <= left {
                    left -= iovecs[first].iov_len
                    first += 1
                } else {
                    iovecs[first].iov_base! += left
                    iovecs[first].iov_len -= left
                    left = 0
                }
            }
        }
        iovecs.removeAll(keepingCapacity: true)
        stagingUsed = 0
        queuedBytes = 0
    }

    /// Copies the queued iovecs into 64 KiB runs and hands each to TLS (which encrypts a
    /// copy anyway): a page header and its page become one record, not two.
    private func flushTLS() throws {
        guard let tls, let gather = tlsGather else { return }
        defer { iovecs.removeAll(keepingCapacity: true); stagingUsed = 0; queuedBytes = 0 }
        var used = 0
        do {
            for v in iovecs {
                var off = 0
                while off < v.iov_len {
                    let k = min(v.iov_len - off, tlsGatherCapacity - used)
                    (gather + used).copyMemory(from: v.iov_base! + off, byteCount: k)
                    used += k; off += k
                    if used == tlsGatherCapacity { try tls.write(gather, used); writeCount.wrappingAdd(UInt64(used), ordering: .relaxed); used = 0 }
                }
            }
            if used > 0 { try tls.write(gather, used); writeCount.wrappingAdd(UInt64(used), ordering: .relaxed) }
        } catch {
            throw MigrationError(.io, "write to \(description) failed", cause: error)
        }
    }

    /// TCP keep-alive probes and TCP_USER_TIMEOUT, so the kernel too gives up on a dead peer
    /// within about `timeoutMs` (a blocked send fails with ETIMEDOUT instead of waiting ~15 min).
    public func setLiveness(timeoutMs: Int32) {
        guard isSocket, timeoutMs > 0 else { return }
        var family = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let isTCP = withUnsafeMutablePointer(to: &family) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } } == 0
            && (Int32(family.ss_family) == AF_INET || Int32(family.ss_family) == AF_INET6)
        guard isTCP else { return }
        var one: Int32 = 1
        var idle = max(1, timeoutMs / 2000), interval: Int32 = 1, count = max(1, timeoutMs / 2000)
        var user = UInt32(timeoutMs)
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, 4)
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_KEEPIDLE, &idle, 4)
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_KEEPINTVL, &interval, 4)
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_KEEPCNT, &count, 4)
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_USER_TIMEOUT, &user, 4)
    }

    /// Waits up to `timeoutMs` for input; true when readable (or buffered).
    public func waitReadable(timeoutMs: Int32) -> Bool {
        if bufferedCount > 0 || tls?.pending == true { return true }
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, timeoutMs) > 0
    }
}

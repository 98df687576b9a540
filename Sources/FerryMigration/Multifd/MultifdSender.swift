import CFerry
import FerryMemory
import FerrySys
import FerryWire

/// The source's multifd channels (capability `multifd`, `multifd-channels` of them): the
/// main thread walks the dirty bitmap and hands packets of up to 128 page numbers to the
/// next idle channel; each channel's thread (`mig/src/send_N`) tells zero pages from the
/// rest (the zero check runs here, on the sender threads, as in QEMU 9), compresses with
/// zstd if asked, and writes QEMU's packet. Before every `RAM_SAVE_FLAG_MULTIFD_FLUSH` on
/// the main channel each channel sends a SYNC packet: the destination loads nothing after
/// the flush before every channel's pages up to its SYNC are in, so a page sent again in
/// a later pass never lands before its older copy.
///
/// Ownership: `lock` guards each sender's `job`, `stopping` and `failure`; `nextSender`
/// and `packetNumber` belong to the main thread (the only one that queues); the rest is
/// immutable. A sender's zstd context and header buffer belong to its thread.
final class MultifdSenders: @unchecked Sendable {
    /// One page for a packet: its number, and whether it is known to read as zero without
    /// reading it (never touched).
    struct Page: Sendable {
        var index: Int
        var knownZero: Bool
    }

    private struct Job {
        var pages: [Page]
        var sync: Bool
        var packetNumber: UInt64
    }

    private final class Sender: @unchecked Sendable {
        let id: Int
        let channel: MigrationChannel
        /// The packet being sent (nil = idle). Guarded by `MultifdSenders.lock`.
        var job: Job?
        var thread: KernelThread?
        init(id: Int, channel: MigrationChannel) { self.id = id; self.channel = channel }
    }

    let block: RAMBlock
    let compression: MultiFD.Compression
    private let senders: [Sender]
    private let lock = Monitor()
    private var stopping = false
    private var failure: MigrationError?
    private var nextSender = 0
    private var packetNumber: UInt64 = 0
    /// Called on a sender thread after each packet: its normal and zero pages.
    private let counted: @Sendable (_ normal: UInt64, _ zero: UInt64) -> Void

    /// Opens `count` channels to `uri` (each with TLS when `tls` is set), sends each its
    /// `MultiFDInit` (this migration's `uuid`, its id) and starts its thread.
    init(uri: MigrationURI, count: Int, tls: ChannelSecurity?, heartbeatTimeoutMs: UInt64, uuid: [UInt8], block: RAMBlock,
         compression: MultiFD.Compression, zstdLevel: Int, isCancelled: () -> Bool,
         counted: @escaping @Sendable (UInt64, UInt64) -> Void) throws {
        self.block = block
        self.compression = compression
        self.counted = counted
        var opened: [Sender] = []
        do {
            for id in 0..<count {
                let ch = try ChannelSetup.connect(uri, role: .multifd, tls: tls, heartbeatTimeoutMs: heartbeatTimeoutMs, isCancelled: isCancelled)
                opened.append(Sender(id: id, channel: ch))
                try ch.write(MultiFD.Initial(uuid: uuid, id: UInt8(id)).encoded())
                try ch.flush()
            }
        } catch {
            for s in opened { s.channel.close() }
            throw MigrationError(.connect, "multifd: cannot open channel \(opened.count) of \(count)", cause: error)
        }
        senders = opened
        for s in senders {
            let zstd = compression == .zstd ? try ZstdCompressor(level: zstdLevel) : nil
            s.thread = try KernelThread(name: "mig/src/send_\(s.id)") { [self] in run(s, zstd) }
        }
    }

    /// Bytes written on every multifd channel (`multifd-bytes`).
    var bytesWritten: UInt64 { senders.reduce(0) { $0 + $1.channel.bytesWritten } }

    /// Hands one packet's pages (at most `MultiFD.pagesPerPacket`, all of `block`) to the
    /// next idle channel, waiting for one. Main thread.
    func queue(_ pages: [Page]) throws {
        precondition(pages.count <= MultiFD.pagesPerPacket)
        try hand(Job(pages: pages, sync: false, packetNumber: packetNumber))
    }

    /// A SYNC packet on every channel, after everything queued so far. Main thread; the
    /// caller writes the main channel's flush record next. Each channel gets its own (the
    /// destination waits for one on every channel), whichever is idle first.
    func sync() throws {
        for s in senders { try hand(Job(pages: [], sync: true, packetNumber: packetNumber), to: s) }
    }

    /// Waits until every channel has written everything queued.
    func drain() throws {
        try lock.withLock {
            _ = try lock.wait { () throws -> Bool? in
                if let failure { throw failure }
                if stopping { throw MigrationError(.cancelled, "the multifd channels were stopped") }
                return senders.allSatisfy { $0.job == nil } ? true : nil
            }
        }
    }

    /// Gives `job` to `target`, or (nil) to the first idle channel round robin from the last
    /// one used, waiting until it is idle.
    private func hand(_ job: Job, to target: Sender? = nil) throws {
        try lock.withLock {
            let s = try lock.wait { () throws -> Sender? in
                if let failure { throw failure }
                if stopping { throw MigrationError(.cancelled, "the multifd channels were stopped") }
                if let target { return target.job == nil ? target : nil }
                for k in 0..<senders.count {
                    let s = senders[(nextSender + k) % senders.count]
                    if s.job == nil { return s }
                }
                return nil
            }!
            nextSender = (s.id + 1) % senders.count
            s.job = job
            lock.broadcast()
        }
        packetNumber += 1
    }

    private func run(_ s: Sender, _ zstd: ZstdCompressor?) {
        var header = WireBuffer(capacity: MultiFD.packetHeaderSize)
        while true {
            let job: Job? = lock.withLock { lock.wait { stopping ? .some(nil) : s.job.map { .some($0) } } ?? nil }
            guard let job else { return }
            do {
                try send(job, on: s.channel, header: &header, zstd: zstd)
            } catch {
                lock.withLock {
                    if failure == nil, !stopping {
                        failure = MigrationError(.io, "multifd channel \(s.id) failed", cause: error)
                    }
                    lock.broadcast()
                }
                return
            }
            lock.withLock { s.job = nil; lock.broadcast() }
        }
    }

    private func send(_ job: Job, on ch: MigrationChannel, header: inout WireBuffer, zstd: ZstdCompressor?) throws {
        var normal: [UInt64] = [], zero: [UInt64] = []
        var data: [UnsafeRawPointer] = []
        for p in job.pages {
            let page = block.page(p.index)
            let offset = UInt64(p.index) << Wire.pageShift
            if p.knownZero || ferry_page_is_zero(page) != 0 { zero.append(offset) } else { normal.append(offset); data.append(UnsafeRawPointer(page)) }
        }
        var size = normal.count * Wire.pageSize
        if let zstd, !data.isEmpty { size = try zstd.compress(data) }
        let flags = compression.flag | (job.sync ? MultiFD.flagSync : 0)
        header.removeAll()
        MultiFD.Packet(flags: flags, nextPacketSize: UInt32(size), packetNum: job.packetNumber, blockName: block.name, normal: normal, zero: zero)
            .encode(into: &header)
        try ch.write(header)
        if let zstd {
            if size > 0 { try ch.write(reference: zstd.output.baseAddress!, count: size) }
        } else {
            // Straight from guest RAM; a page written meanwhile is in the dirty log.
            for p in data { try ch.write(reference: p, count: Wire.pageSize) }
        }
        try ch.flush()
        if !job.pages.isEmpty { counted(UInt64(normal.count), UInt64(zero.count)) }
    }

    /// Closes every channel once all is written (the destination reads EOF after the last
    /// SYNC, with TLS after its close_notify).
    func finish() throws {
        try drain()
        close()
    }

    /// Unblocks every sender (a failure or cancel elsewhere): their writes fail.
    func abort() {
        lock.withLock { stopping = true; lock.broadcast() }
        for s in senders { s.channel.abort() }
    }

    /// Stops the threads (after their current packet; a packet queued and not yet started is
    /// dropped: `finish` sends everything), joins them and closes the channels.
    func close() {
        stop()
        for s in senders {
            s.thread?.join()
            s.channel.close()
        }
    }

    private func stop() { lock.withLock { stopping = true; lock.broadcast() } }
}

import FerrySys
import Glibc

/// Faults in a RAM block's fresh memory a little ahead of the threads writing a stream into
/// it, on a thread of its own (`mig/dst/prefault`): the kernel clears every new page on its
/// first touch (`clear_page_erms`, slow on this nested host), and measured with multifd
/// that clearing, not decompression, held the destination's receivers back while a core idled.
///
/// Only ahead of a sequential run: when chunk c (2 MiB) is written after c-1, up to as many
/// chunks as the run is long, at most `lookahead`, are populated. Memory that is written
/// here and there gets nothing ahead, so what is populated is at most twice what was written
/// (a sparse guest's untouched memory stays untouched). Never for a postcopy destination:
/// a page populated before it arrives would read as zero instead of faulting.
///
/// Ownership: `lock` guards `written`, `queued`, `pending` and `stopped`; `thread` belongs to
/// the owner's thread (set in init, cleared by `stop`); the rest is immutable.
public final class Prefaulter: @unchecked Sendable {
    public static let chunkBytes = 2 << 20
    static let lookahead = 4
    private let block: RAMBlock
    private let lock = Monitor()
    private var written: [Bool]
    private var queued: [Bool]
    private var pending: [Int] = []
    private var stopped = false
    private var thread: KernelThread?

    public init(_ block: RAMBlock) throws(SysError) {
        self.block = block
        let chunks = (block.length + Self.chunkBytes - 1) / Self.chunkBytes
        written = Array(repeating: false, count: chunks)
        queued = Array(repeating: false, count: chunks)
        thread = try KernelThread(name: "mig/dst/prefault") { [self] in run() }
    }

    /// A writer's position: tells the prefaulter only when it enters another chunk.
    public struct Cursor {
        var chunk = -1
        public init() {}
        @inline(__always) public mutating func wrote(_ offset: Int, _ p: Prefaulter) {
            let c = offset / Prefaulter.chunkBytes
            if c != chunk { chunk = c; p.entered(c) }
        }
    }

    func entered(_ c: Int) {
        lock.withLock {
            guard c < written.count, !written[c] else { return }
            written[c] = true
            queued[c] = true
            var run = 1
            while run <= Self.lookahead, c - run >= 0, written[c - run] { run += 1 }
            guard run > 1 else { return }
            var added = false
            for n in (c + 1)..<min(written.count, c + run) where !queued[n] {
                queued[n] = true
                pending.append(n)
                added = true
            }
            if added { lock.broadcast() }
        }
    }

    private func run() {
        while let c = lock.withLock({ () -> Int? in
            lock.wait { stopped ? -1 : (pending.isEmpty ? nil : pending.removeFirst()) }
        }), c >= 0 {
            let start = c * Self.chunkBytes
            // MADV_POPULATE_WRITE (Linux 5.14): faults the range in as a write would, keeping
            // what is there; an older kernel refuses it and nothing is lost but the head start.
            if madvise(block.host + start, min(Self.chunkBytes, block.length - start), 23) != 0 { return }
        }
    }

    /// Ends the thread (the stream is loaded or failed); what is populated stays.
    public func stop() {
        lock.withLock { stopped = true; lock.broadcast() }
        thread?.join()
        thread = nil
    }
}

/// One writer's prefaulters for several blocks, started at its first page (a stream that
/// never writes one starts no thread). Ownership: the writer's thread uses it alone.
public final class PrefaultAhead {
    private let blocks: [RAMBlock]
    private var prefaulters: [Prefaulter]?
    private var cursors: [Prefaulter.Cursor]

    public init(_ blocks: [RAMBlock]) {
        self.blocks = blocks
        cursors = blocks.map { _ in Prefaulter.Cursor() }
    }

    /// The writer is about to write block `b` at `offset`. A prefaulter that cannot start
    /// (no thread) leaves the writer faulting its own pages, as without one.
    @inline(__always) public func wrote(block b: Int, _ offset: Int) {
        if prefaulters == nil { prefaulters = (try? blocks.map { b throws(SysError) in try Prefaulter(b) }) ?? [] }
        guard let p = prefaulters, b < p.count else { return }
        cursors[b].wrote(offset, p[b])
    }

    public func stop() {
        for p in prefaulters ?? [] { p.stop() }
        prefaulters = []
    }
}

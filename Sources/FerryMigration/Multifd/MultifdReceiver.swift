import CFerry
import FerryMemory
import FerrySys
import FerryWire
import Glibc

/// The destination's multifd channels: one thread per channel (`mig/dst/recv_N`) reads
/// QEMU's packets straight into guest RAM (zstd decompressed into the pages), writes zero
/// pages only where the page may hold data, and marks every page received. At a SYNC
/// packet a receiver waits until the main thread has seen the main channel's
/// `RAM_SAVE_FLAG_MULTIFD_FLUSH` and every other channel has reached its SYNC too
/// (`flush`): the barrier that keeps a page's older copy from landing after its newer one.
///
/// Ownership: `lock` guards `reached`, `ended`, `released`, `closing` and `firstFailure`; each
/// receiver's decompressor, header buffer and populated-pages cache belong to its thread;
/// the rest is immutable.
final class MultifdReceivers: @unchecked Sendable {
    private let channels: [MigrationChannel]
    private let block: RAMBlock
    private let layout: RAMLayout
    private let compression: MultiFD.Compression
    private let received: PageBitmap
    /// Postcopy may follow: a zero page must be populated, never skipped (a page marked
    /// received but missing would fault and never be asked for).
    private let populateZeroPages: Bool
    /// Faults fresh RAM in ahead of the receivers (precopy only: see `Prefaulter`).
    private let prefaulter: Prefaulter?
    private let lock = Monitor()
    private var threads: [KernelThread] = []
    /// SYNC packets each channel has reached.
    private var reached: [UInt64]
    /// A channel whose source closed it (after its last SYNC).
    private var ended: [Bool]
    /// Flushes the main thread has completed.
    private var released: UInt64 = 0
    private var closing = false
    private var firstFailure: MigrationError?
    /// The first channel's failure, if one failed.
    var failure: MigrationError? { lock.withLock { firstFailure } }
    /// Called once, on a receiver thread, when a channel fails (the migration decides).
    private let failed: @Sendable (MigrationError) -> Void

    init(channels: [MigrationChannel], block: RAMBlock, layout: RAMLayout, compression: MultiFD.Compression, received: PageBitmap,
         populateZeroPages: Bool, failed: @escaping @Sendable (MigrationError) -> Void) throws {
        self.channels = channels
        self.block = block
        self.layout = layout
        self.compression = compression
        self.received = received
        self.populateZeroPages = populateZeroPages
        prefaulter = populateZeroPages ? nil : try Prefaulter(block)
        self.failed = failed
        reached = Array(repeating: 0, count: channels.count)
        ended = Array(repeating: false, count: channels.count)
        do {
            for (id, ch) in channels.enumerated() {
                let zstd = compression == .zstd ? try ZstdDecompressor() : nil
                threads.append(try KernelThread(name: "mig/dst/recv_\(id)") { [self] in run(id, ch, zstd) })
            }
        } catch {
            prefaulter?.stop()
            throw error
        }
    }

    var bytesRead: UInt64 { channels.reduce(0) { $0 + $1.bytesRead } }

    /// The main channel's RAM_SAVE_FLAG_MULTIFD_FLUSH: waits until every channel has
    /// loaded its pages up to its next SYNC, then lets them all go on. Main thread.
    func flush() throws {
        try lock.withLock {
            let generation = released + 1
            _ = try lock.wait { () throws -> Bool? in
                if let firstFailure { throw firstFailure }
                for k in channels.indices where reached[k] < generation {
                    if ended[k] { throw MigrationError(.protocolError, "multifd channel \(k) ended before its SYNC packet") }
                    return nil
                }
                return true
            }
            released = generation
            lock.broadcast()
        }
    }

    /// Stops every receiver (the stream is loaded, or the migration failed) and closes the
    /// channels. Errors from here on are the shutdown's, not the migration's.
    func close() {
        lock.withLock { closing = true; lock.broadcast() }
        for ch in channels { ch.shutdown() }
        for t in threads { t.join() }
        for ch in channels { ch.close() }
        prefaulter?.stop()
    }

    private func run(_ id: Int, _ ch: MigrationChannel, _ zstd: ZstdDecompressor?) {
        var header = [UInt8](repeating: 0, count: MultiFD.packetHeaderSize)
        let populated = PopulatedPages(block)
        var written = Prefaulter.Cursor()
        let compressed = UnsafeMutableRawBufferPointer.allocate(byteCount: zstd == nil ? 0 : MultiFD.maxCompressedSize, alignment: 16)
        defer { compressed.deallocate() }
        do {
            while true {
                let start = ch.bytesRead
                do {
                    try header.withUnsafeMutableBytes { try ch.readExactly($0) }
                } catch let e as MigrationError where e.code == .closed && ch.bytesRead == start {
                    // The source closed the channel between packets (after its last SYNC).
                    lock.withLock { ended[id] = true; lock.broadcast() }
                    return
                }
                let packet = try MultiFD.Packet(decoding: header, layout: layout, compression: compression)
                let pages = packet.normal.map { block.host + Int($0) }
                if let prefaulter { for o in packet.normal { written.wrote(Int(o), prefaulter) } }
                if let zstd {
                    let data = UnsafeMutableRawBufferPointer(rebasing: compressed[0..<Int(packet.nextPacketSize)])
                    try ch.readExactly(data)
                    try zstd.decompress(UnsafeRawBufferPointer(data), into: pages)
                } else {
                    for p in pages { try ch.readExactly(UnsafeMutableRawBufferPointer(start: p, count: Wire.pageSize)) }
                }
                for o in packet.normal { received.set(Int(o >> UInt64(Wire.pageShift))) }
                for o in packet.zero { try loadZero(o, populated) }
                if packet.isSync {
                    let go: Bool = lock.withLock {
                        reached[id] += 1
                        lock.broadcast()
                        return lock.wait { closing ? false : (released >= reached[id] ? true : nil) } ?? false
                    }
                    if !go { return }
                }
            }
        } catch {
            let e = error as? MigrationError ?? MigrationError(.protocolError, "\(error)")
            let report: Bool = lock.withLock {
                defer { lock.broadcast() }
                if closing || firstFailure != nil { return false }
                firstFailure = MigrationError(e.code, "multifd channel \(id): \(e.message)", cause: e.cause)
                return true
            }
            if report, let f = failure { failed(f) }
        }
    }

    /// A zero page: the memory here is fresh, so only a page that may hold data (received
    /// before, or populated) is cleared, unless postcopy needs every page populated.
    private func loadZero(_ offset: UInt64, _ populated: PopulatedPages) throws {
        let page = Int(offset >> UInt64(Wire.pageShift))
        let p = block.host + Int(offset)
        if populateZeroPages {
            p.initializeMemory(as: UInt8.self, repeating: 0, count: Wire.pageSize)
        } else if try received.test(page) || populated.mayHoldData(page), ferry_page_is_zero(p) == 0 {
            p.initializeMemory(as: UInt8.self, repeating: 0, count: Wire.pageSize)
        }
        received.set(page)
    }
}

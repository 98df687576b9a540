import FerryMemory
import FerryWire

/// postcopy-preempt's urgent channel with its record buffer. Used only by the return-path
/// thread once handed over (a recovery makes a new one), so its fields need no lock.
final class UrgentPageSender: @unchecked Sendable {
    let channel: MigrationChannel
    /// The block name went out on this channel (later records say CONTINUE).
    private var named = false
    private var buffer = WireBuffer(capacity: 64)

    init(channel: MigrationChannel) { self.channel = channel }

    /// Sends the pages of `pages` still to send, at once. Returns how many went as pages
    /// and as zero records (`normal`, `duplicate`).
    @discardableResult
    func send(_ pages: Range<Int>, of block: RAMBlock, from toSend: PageBitmap) throws -> PageCounts {
        var counts = PageCounts()
        for p in pages where toSend.testAndClear(p) {
            try counts.send(channel, block, p, named: !named, buffer: &buffer)
            named = true
        }
        guard counts.total > 0 else { return counts }
        do { try channel.flush() } catch {
            // A broken urgent channel is a link failure: pause like the main channel would.
            throw MigrationError(.io, "urgent-page channel failed", cause: error)
        }
        return counts
    }
}

/// Pages sent whole and as zero records, for `normal` and `duplicate` (QEMU counts zero
/// pages in every phase, postcopy's too), and their records' wire bytes (postcopy's
/// requested and background bytes).
struct PageCounts {
    var normal: UInt64 = 0
    var duplicate: UInt64 = 0
    var bytes: UInt64 = 0
    var total: UInt64 { normal + duplicate }

    /// Sends page `i` (`PageRecord.send`) and counts it.
    mutating func send(_ ch: MigrationChannel, _ block: RAMBlock, _ i: Int, named: Bool, buffer: inout WireBuffer) throws {
        let zero = try PageRecord.send(ch, block, i, named: named, buffer: &buffer)
        if zero { duplicate += 1 } else { normal += 1 }
        bytes += UInt64(buffer.count + (zero ? 0 : Wire.pageSize))
    }
}

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

    /// Sends the pages of `pages` still to send, at once.
    func send(_ pages: Range<Int>, of block: RAMBlock, from toSend: PageBitmap) throws {
        var sent = false
        for p in pages where toSend.testAndClear(p) {
            try PageRecord.send(channel, block, p, named: !named, buffer: &buffer)
            named = true
            sent = true
        }
        guard sent else { return }
        do { try channel.flush() } catch {
            // A broken urgent channel is a link failure: pause like the main channel would.
            throw MigrationError(.io, "urgent-page channel failed", cause: error)
        }
    }
}

import FerrySys
import FerryWire

/// The destination's return path: one writer at a time (main, fault and preempt threads),
/// on its own lock apart from the migration's, so a send blocked on a dead link never
/// blocks query-migrate. Lock order: this writer's lock, then the migration's.
/// Ownership: `channel`, `buffer`, `lastRequestedBlock`, `deferred` are guarded by `lock`.
final class ReturnPathWriter: @unchecked Sendable {
    private let lock = Monitor()
    private var channel: MigrationChannel?
    private var buffer = WireBuffer(capacity: 64)
    /// The block of the last page request on this channel (later ones may omit it).
    private var lastRequestedBlock: String?
    /// Pages asked for while requests did not flow (before RUN, while paused), in order.
    private var deferred: [Int] = []

    /// The return path is now `ch` (or none): the next page request names its block.
    func attach(_ ch: MigrationChannel?) {
        lock.withLock { channel = ch; lastRequestedBlock = nil }
    }

    var isOpen: Bool { lock.withLock { channel != nil } }

    /// Writes one message; a failed write is noticed by the main thread's read.
    func send(_ body: (inout WireBuffer) -> Void) {
        lock.withLock {
            guard let rp = channel else { return }
            buffer.removeAll()
            body(&buffer)
            try? rp.write(buffer) // see above: the reader notices a dead link
            try? rp.flush()
        }
    }

    /// A page request, if `allowed` (asked with this writer's lock held) says requests flow.
    /// True when the request went out.
    @discardableResult
    func requestPage(_ page: Int, block: String, allowed: () -> Bool) -> Bool {
        lock.withLock {
            guard let rp = channel, allowed() else { deferred.append(page); return false }
            return write(page, block: block, on: rp)
        }
    }

    /// Once requests flow (after RUN): sends what was deferred, and returns those pages.
    /// Decided under the same lock as `requestPage`, so a request is either deferred and
    /// sent here, or sent at once — never lost, never sent twice.
    func sendDeferred(block: String) -> [Int] {
        lock.withLock {
            guard let rp = channel else { return [] }
            let pages = deferred
            deferred.removeAll()
            return pages.filter { write($0, block: block, on: rp) }
        }
    }

    /// RESUME re-asks every outstanding page itself: what was deferred is covered.
    func dropDeferred() { lock.withLock { deferred.removeAll() } }

    /// Caller holds `lock`.
    private func write(_ page: Int, block: String, on rp: MigrationChannel) -> Bool {
        let name: String? = lastRequestedBlock == block ? nil : block
        lastRequestedBlock = block
        buffer.removeAll()
        buffer.rpRequestPages(block: name, offset: UInt64(page) << Wire.pageShift, length: UInt32(Wire.pageSize))
        do { try rp.write(buffer); try rp.flush() } catch { return false }
        return true
    }
}

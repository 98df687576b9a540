import FerryMemory
import FerrySys
import FerryWire

/// The source's return-path thread (`mig/src/return`): reads the destination's messages and
/// hands them to the main thread through `inbox`; serves page requests. With
/// postcopy-preempt the requested pages go out right here on the urgent channel (no hop
/// through the main thread); otherwise they are queued ahead of the background stream.
/// Either way the background scan moves on from just after them.
extension OutgoingMigration {
    func startReturnPath(_ ch: MigrationChannel) throws {
        rpThread = try KernelThread(name: "mig/src/return") { [self] in
            do {
                try readReturnPath(ch)
            } catch {
                let failure = error as? MigrationError ?? MigrationError(.io, "return path failed", cause: error)
                let pc: UrgentPageSender? = lock.withLock { inbox.failure = failure; lock.broadcast(); return urgent }
                // Unblock the main thread if it is stuck in a send to a dead peer.
                ch.shutdown()
                pc?.channel.shutdown()
            }
        }
    }

    private func readReturnPath(_ ch: MigrationChannel) throws {
        while true {
            switch try ReturnPathDecoder.next(ch) {
            case .shut(let v):
                lock.withLock { inbox.shut = v; lock.broadcast() }
                return
            case .pong(let v):
                if v == Wire.pingPackagedLoaded { lock.withLock { inbox.destinationRunning = true; lock.broadcast() } }
                if v == Wire.pingEarlyDiscards { lock.withLock { inbox.earlyDiscardsApplied = true; lock.broadcast() } }
                if v == Wire.pingCaughtUp { lock.withLock { inbox.caughtUp = true; lock.broadcast() } }
            case .switchoverAck:
                continue
            case .error(let text):
                lock.withLock { inbox.destinationError = text; lock.broadcast() }
            case let .requestPages(blockName, offset, length):
                let name = blockName ?? lock.withLock { requests.lastBlock }
                guard name == block.name else { throw MigrationError(.protocolError, "page request for unknown RAM block \(name ?? "(none)")") }
                let pages: Range<Int>
                do { pages = try PageRequest(block: name, offset: offset, length: length).pages(blockLength: UInt64(block.length)) } catch {
                    throw MigrationError(.protocolError, "bad page request from the destination", cause: error)
                }
                try serveRequest(pages, name: name)
            case .receivedBitmap(let name):
                let expecting = lock.withLock { phase == .postcopyResuming && inbox.receivedBitmap == nil }
                guard expecting else { throw MigrationError(.protocolError, "unexpected received bitmap") }
                guard name == block.name else { throw MigrationError(.protocolError, "received bitmap for unknown RAM block \(name)") }
                let bits = try ReturnPathDecoder.readReceivedBitmap(ch, expectedBytes: toSend.byteCount)
                lock.withLock { inbox.receivedBitmap = bits; lock.broadcast() }
            case .resumeAck(let v):
                guard v == Wire.resumeAckValue else { throw MigrationError(.protocolError, "RESUME_ACK with value \(v)") }
                lock.withLock { inbox.resumeAcked = true; lock.broadcast() }
            }
        }
    }

    /// One page request, checked and accounted under the lock in one step.
    private func serveRequest(_ pages: Range<Int>, name: String?) throws {
        let (pc, refusal): (UrgentPageSender?, String?) = lock.withLock {
            // Only a destination running the guest asks for pages.
            guard phase.servesPageRequests else { return (nil, "page request from the destination before postcopy started") }
            requests.lastBlock = name
            requests.served += 1
            requests.hint = pages.upperBound < block.pageCount ? pages.upperBound : nil
            if urgent == nil {
                guard requests.pending.count < PageRequestQueue.maxQueued else {
                    return (nil, "page request flood: \(PageRequestQueue.maxQueued) requests queued and unserved")
                }
                requests.pending.append(pages)
                lock.broadcast()
            }
            return (urgent, nil)
        }
        if let refusal { throw MigrationError(.protocolError, refusal) }
        if let counts = try pc?.send(pages, of: block, from: toSend), counts.total > 0 {
            updateStats { $0.normal += counts.normal; $0.duplicate += counts.duplicate; $0.postcopyRequestedBytes += counts.bytes }
        }
    }
}

import FerryMachine
import FerryMemory
import FerrySys
import FerryWire

/// Postcopy on the source's main thread: the switch-over (stop the guest, tell the
/// destination which pages to drop, ship the vCPU state in a package that starts the guest
/// there), then the background stream, requested pages first. Once the package is out the
/// guest is never resumed here: failures pause (`Recovery.swift`), never fail.
extension OutgoingMigration {
    func runPostcopy(_ ch: MigrationChannel) throws {
        var timeline = SwitchoverTimeline(start: Sys.monotonicNanos())
        if let multifd {
            // Postcopy's pages go on the main and urgent channels: every multifd page lands
            // before the discards, and the channels close.
            header.removeAll()
            header.ramSectionBegin(.part, id: Self.ramSectionID)
            try appendMultifdFlush()
            header.ramSectionEnd(id: Self.ramSectionID)
            try ch.write(header)
            try ch.flush()
            try multifd.finish()
        }
        // While the guest still runs here: the destination drops its stale copy of every page
        // still to send (nothing is sent in between) and reads the precopy backlog in the
        // sockets; the PONG after says it has (at most 200 ms: then the stop goes ahead). The
        // pause then carries only the discards of the pages the last sync adds. A sync first
        // (counted, as every sync): what the guest dirtied since the last pass is in the log.
        try collectDirtyPages()
        let discardedEarly = PageBitmap(bitCount: block.pageCount)
        discardedEarly.formUnion(toSend)
        header.removeAll()
        appendDiscards(of: toSend, to: &header)
        try pingBeforeStop(ch, Wire.pingEarlyDiscards, during: "the discards before the stop") { inbox.earlyDiscardsApplied }
        timeline.mark("early-discards", now: Sys.monotonicNanos())
        stopGuestForSwitchover()
        let stopNanos = Sys.monotonicNanos()
        timeline.mark("stop", now: stopNanos)
        try advance(.switchToPostcopy)
        reach(.postcopyStopped)
        try collectDirtyPages()
        timeline.mark("sync", now: Sys.monotonicNanos())
        try? machine.vm.setDirtyLogging(machine.ram, false) // the log is read; a failure to stop it costs only speed
        header.removeAll()
        appendDiscards(of: toSend.subtracting(discardedEarly), to: &header)
        timeline.mark("discards", now: Sys.monotonicNanos())
        header.ping(Wire.pingDiscardsSent)
        // QEMU's package: LISTEN, the device state, PING 3, PING 0x42, RUN.
        var package = WireBuffer(capacity: 16 << 10)
        package.command(.postcopyListen)
        try appendDeviceState(to: &package)
        timeline.mark("device-state", now: Sys.monotonicNanos())
        package.ping(Wire.pingDeviceStateSent)
        package.ping(Wire.pingPackagedLoaded)
        package.command(.postcopyRun)
        header.packaged(length: UInt32(package.count))
        header.append(package.bytes)
        header.ping(Wire.pingPackageSent)
        // From here cancel is refused: the package may reach the destination whole.
        try advance(.packageWriting)
        try ch.write(header)
        try ch.flush()
        timeline.mark("package", now: Sys.monotonicNanos())
        reach(.packageFlushed)
        // The destination has the package: it may run the guest from now on.
        try advance(.packageSent) { _ in self.bytesAtPostcopyStart = self.bytesSentLocked }
        host.setRunState(.postmigrate)

        var current = ch
        do {
            // The urgent channel is the second connection; the destination accepts it at LISTEN.
            if capabilities.contains(.postcopyPreempt) {
                try openUrgentChannel(uri)
                timeline.mark("urgent-channel", now: Sys.monotonicNanos())
            }
            // postcopy-device: the destination answers PING 0x42 once its guest runs. A SHUT
            // with an error before that means it never ran, and the guest may run here again;
            // silence past the deadline pauses (the guest may run there: never resume here).
            _ = try waitForDestination(seconds: Double(parameters.postcopyDeviceTimeout) / 1000, during: "the postcopy switch-over") {
                inbox.destinationRunning ? true : nil
            }
            timeline.mark("destination", now: Sys.monotonicNanos())
            try advance(.destinationRunning) { $0.downtimeMs = Sys.nanosSince(stopNanos) / 1_000_000; $0.switchover = timeline }
        } catch let never as DestinationNeverRan {
            try? machine.vm.setDirtyLogging(machine.ram, true) // best effort: a later migration re-enables it
            throw never
        } catch {
            current = try pauseAndRecover(after: error, old: ch)
        }
        while true {
            do {
                try streamPostcopy(current)
                return
            } catch {
                current = try pauseAndRecover(after: error, old: current)
            }
        }
    }

    /// RAM_DISCARD for every page in `pages` (still to send), 12 ranges a command: the
    /// destination may hold a stale copy of each.
    private func appendDiscards(of pages: PageBitmap, to buffer: inout WireBuffer) {
        var ranges: [(start: UInt64, length: UInt64)] = []
        var i = pages.nextSet(from: 0)
        while let s = i {
            var e = s + 1
            while e < pages.bitCount && pages.test(e) { e += 1 }
            ranges.append((UInt64(s) << Wire.pageShift, UInt64(e - s) << Wire.pageShift))
            if ranges.count == 12 { buffer.ramDiscard(block: block.name, ranges: ranges); ranges.removeAll() }
            i = pages.nextSet(from: e)
        }
        if !ranges.isEmpty { buffer.ramDiscard(block: block.name, ranges: ranges) }
    }

    /// Connects postcopy-preempt's urgent channel and hands it to the return-path thread.
    func openUrgentChannel(_ target: MigrationURI) throws {
        useUrgentChannel(try connectUrgentChannel(target))
    }

    /// Connects postcopy-preempt's urgent channel (any thread).
    func connectUrgentChannel(_ target: MigrationURI) throws -> MigrationChannel {
        try ChannelSetup.connect(target, role: .urgent, tls: tls, heartbeatTimeoutMs: parameters.heartbeatTimeout)
    }

    /// Requested pages go on `pc` from now on.
    func useUrgentChannel(_ pc: MigrationChannel) {
        lock.withLock { urgent = UrgentPageSender(channel: pc) }
    }

    /// The postcopy background stream until every page is on the destination, then EOF and
    /// the destination's SHUT(0). Throws on any channel error or a forced pause.
    func streamPostcopy(_ ch: MigrationChannel) throws {
        cursor = 0
        limiter.reset(now: Sys.monotonicNanos(), sent: ch.bytesWritten, bytesPerSecond: parameters.maxPostcopyBandwidth, carriesDebt: false)
        while toSend.nextSet(from: 0) != nil {
            try checkPostcopy()
            header.removeAll()
            header.ramSectionBegin(.part, id: Self.ramSectionID)
            try ch.write(header)
            var first = true
            var requested = PageCounts(), background = PageCounts()
            defer {
                if requested.total + background.total > 0 {
                    updateStats {
                        $0.normal += requested.normal + background.normal
                        $0.duplicate += requested.duplicate + background.duplicate
                        $0.postcopyRequestedBytes += requested.bytes
                        $0.postcopyBackgroundBytes += background.bytes
                    }
                }
            }
            let (pending, hint): ([Range<Int>], Int?) = lock.withLock {
                defer { requests.pending.removeAll(); requests.hint = nil }
                return (requests.pending, requests.hint)
            }
            for r in pending {
                for p in r where toSend.testAndClear(p) {
                    try requested.send(ch, block, p, named: first, buffer: &header)
                    first = false
                    cursor = p + 1 // move the background scan near what the guest wants
                }
            }
            if let hint { cursor = hint }
            // Requested pages always go; the background stream respects max-postcopy-bandwidth.
            let delay = limiter.delay(sent: ch.bytesWritten, now: Sys.monotonicNanos(), bytesPerSecond: parameters.maxPostcopyBandwidth)
            let overBudget = delay > 0
            var sent = 0
            while !overBudget, sent < 64, let p = toSend.nextSet(from: cursor) ?? toSend.nextSet(from: 0) {
                if toSend.testAndClear(p) { try background.send(ch, block, p, named: first, buffer: &header); first = false; sent += 1 }
                cursor = p + 1
            }
            header.removeAll()
            header.ramSectionEnd(id: Self.ramSectionID)
            pingIfDue()
            try ch.write(header)
            try ch.flush()
            let left = UInt64(toSend.popcount()) << Wire.pageShift
            updateStats { $0.remaining = left; $0.transferred = self.bytesSentLocked; $0.postcopyRequests = self.requests.served }
            if overBudget { try waitForRequestOrWindow(delay) }
        }
        header.removeAll()
        header.eof()
        try ch.write(header)
        try ch.flush()
        let shut = try waitForShut(seconds: 600)
        guard shut == 0 else {
            // The destination's guest runs; never give up on it: pause and let recovery decide.
            throw MigrationError(.peerFailed, "the destination reported an error at the end of postcopy (SHUT \(shut))")
        }
        let end = Sys.monotonicNanos()
        try advance(.finished) {
            $0.endNanos = end; $0.transferred = self.bytesSentLocked; $0.remaining = 0; $0.postcopyRequests = self.requests.served
            $0.postcopyBytes = $0.transferred - min(self.bytesAtPostcopyStart ?? 0, $0.transferred)
        }
        closeChannels(ch)
    }

    /// A forced pause or a failed return path ends the postcopy stream (and pauses).
    private func checkPostcopy() throws {
        try lock.withLock {
            if asked.pause { throw MigrationError.pausedByUser }
            if let e = inbox.failure { throw MigrationError(.io, "return path failed in postcopy", cause: e) }
        }
    }

    /// Sleeps until the window ends, or until a page request arrives (served at once).
    private func waitForRequestOrWindow(_ delay: UInt64) throws {
        let wake = Sys.monotonicNanos() + delay
        try lock.withLock {
            _ = try lock.wait(until: wake, recheckNanos: delay) { () throws -> Bool? in
                if !requests.pending.isEmpty { return true }
                if let e = inbox.failure { throw MigrationError(.io, "return path failed in postcopy", cause: e) }
                if asked.pause { throw MigrationError.pausedByUser }
                return nil
            }
        }
    }
}

extension OutgoingMigration {
    /// Appends PING `value` to what `header` holds, sends it, and waits, guest still running,
    /// until `answered` (read under the lock) says its PONG came back: at most
    /// `SwitchoverWait.seconds`, then the stop goes ahead as without the wait.
    func pingBeforeStop(_ ch: MigrationChannel, _ value: UInt32, during what: String, answered: () -> Bool) throws {
        header.ping(value)
        try ch.write(header)
        try ch.flush()
        do {
            _ = try waitForDestination(seconds: SwitchoverWait.seconds, during: what) { answered() ? true : nil }
        } catch let e as MigrationError where e.code == .timeout {
            // A slow destination: stop anyway.
        }
    }
}

/// The switch-overs' one tunable: how long the source waits, guest still running, for the
/// destination to have read everything sent before the stop (precopy: the backlog in the
/// sockets; postcopy: that and the discards sent early). Then the stop goes ahead anyway.
enum SwitchoverWait {
    static let seconds = 0.2
}

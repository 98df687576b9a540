import CFerry
import FerryMachine
import FerryMemory
import FerrySys
import FerryWire
import Glibc

/// Precopy on the source's main thread: the stream's setup, passes over the pages still to
/// send (KVM's dirty log re-collected after each), the convergence decision
/// (`ConvergencePolicy`), and the stop-and-copy switch-over: stop the guest, send the last
/// dirty pages and the vCPU state, EOF. With a socket transport the destination answers
/// over the return path once its guest runs, which is when the downtime ends. Any failure
/// or cancel before that leaves the source guest running.
extension OutgoingMigration {
    func sendSetup(_ ch: MigrationChannel, returnPath: Bool) throws {
        header.removeAll()
        header.fileHeader()
        header.configuration()
        // The machine's shape first: a destination shaped otherwise refuses before any RAM.
        header.deviceSection(id: Self.shapeSectionID, name: MachineShape.sectionName, version: MachineShape.version, blob: machine.shape.encoded())
        if returnPath {
            header.command(.openReturnPath)
            header.ping(Wire.pingReturnPathOpen)
        }
        if capabilities.contains(.postcopyRAM) {
            guard returnPath else { throw MigrationError(.config, "postcopy needs a return path: use a tcp: or unix: URI") }
            if capabilities.contains(.postcopyPreempt), case .exec = uri { throw MigrationError(.config, "postcopy-preempt needs a tcp: or unix: URI") }
            header.postcopyAdvise()
        }
        header.sectionHeader(.start, id: Self.ramSectionID, name: Wire.ramSectionName, version: Wire.ramSectionVersion)
        header.ramMemSize(blocks: [(block.name, UInt64(block.length))])
        header.ramSectionEnd(id: Self.ramSectionID)
        try ch.write(header)
        try ch.flush()
    }

    /// Every device's state (the guest is stopped), one section each. Returns the whole
    /// sections of the stream (the machine's shape first) for the VM description.
    @discardableResult
    func appendDeviceState(to buffer: inout WireBuffer) throws -> [VMDescription.Section] {
        let shape = machine.shape.encoded()
        var described = [VMDescription.Section(name: MachineShape.sectionName, instance: 0, version: MachineShape.version, blobSize: shape.count)]
        for (k, d) in try machine.saveDevices().enumerated() {
            buffer.deviceSection(id: Self.firstDeviceSectionID + UInt32(k), name: d.name, instance: d.instance, version: d.version, blob: d.blob)
            described.append(VMDescription.Section(name: d.name, instance: d.instance, version: d.version, blobSize: d.blob.count))
        }
        return described
    }

    /// Precopy passes until the policy says stop (or postcopy was asked for).
    func iterateUntilConverged(_ ch: MigrationChannel) throws -> ConvergencePolicy.Verdict {
        var policy = ConvergencePolicy(now: Sys.monotonicNanos(), sent: precopyBytesOut(ch), ramBytes: UInt64(block.length))
        limiter.reset(now: Sys.monotonicNanos(), sent: precopyBytesOut(ch), bytesPerSecond: parameters.maxBandwidth)
        while true {
            try checkPrecopy()
            if lock.withLock({ asked.postcopy }) { return .switchToPostcopy }
            header.removeAll()
            header.ramSectionBegin(.part, id: Self.ramSectionID)
            try ch.write(header)
            let passDone = try sendPages(ch, limited: true)
            header.removeAll()
            // The end of a pass: a page sent again in the next one must land after this copy.
            if passDone { try appendMultifdFlush() }
            header.ramSectionEnd(id: Self.ramSectionID)
            if uri.isBidirectional { pingIfDue() }
            try ch.write(header)
            try ch.flush()
            updateStats { $0.remaining = UInt64(toSend.popcount()) << Wire.pageShift }
            guard passDone else {
                // auto-converge decides at bitmap syncs, and a pass at a low bandwidth lasts
                // seconds: sync once a second in between (QEMU master's background sync for
                // auto-converge does the same every 5 s), or the throttle crawls.
                if autoConverge != nil && Sys.nanosSince(lastSyncNanos) >= AutoConvergePolicy.minPeriodNanos { try collectDirtyPages(heartbeatOn: ch) }
                continue
            }

            // End of a pass: collect what the guest dirtied meanwhile. XBZRLE deltas start
            // with the second pass (the first filled the cache).
            let now = Sys.monotonicNanos()
            // Every page went once: what is left to send was written since, so has memory
            // behind it, and reading which pages do (a walk of the whole RAM's page tables
            // at each sync, milliseconds in the downtime) would find nothing to skip.
            populated = nil
            try collectDirtyPages(heartbeatOn: ch)
            xbzrle?.started = true
            let p = parameters
            let autoSwitch = capabilities.contains(.postcopyRAM) ? p.postcopyAutoSwitchPasses : 0
            let (verdict, pass) = policy.passEnded(now: now, sent: precopyBytesOut(ch), dirtyPages: UInt64(toSend.popcount()), pageSize: Wire.pageSize,
                                                   downtimeLimitMs: p.downtimeLimit, maxBandwidth: p.maxBandwidth, autoSwitchPasses: autoSwitch,
                                                   pagesSent: pagesThisPass)
            pagesThisPass = 0
            updateStats {
                $0.remaining = pass.remaining
                $0.expectedDowntimeMs = pass.expectedDowntimeMs
                $0.dirtyPagesRate = pass.dirtyPagesRate
                $0.mbps = pass.mbps
                $0.pagesPerSecond = pass.pagesPerSecond
                $0.precopyBytes = self.bytesSentLocked
                if verdict == .switchToPostcopy { $0.autoSwitched = true }
            }
            if verdict != .anotherPass { return verdict }
        }
    }

    /// The stop-and-copy switch-over and the end of a precopy migration.
    func completePrecopy(_ ch: MigrationChannel, returnPath: Bool) throws {
        var timeline = SwitchoverTimeline(start: Sys.monotonicNanos())
        if returnPath {
            // The destination may still be reading the last pass (ZERO records of never-touched
            // memory go out faster than it loads them: 14 ms of an idle guest's pause). A PING
            // after it, and the stop once its PONG is back, guest running until then.
            lock.withLock { inbox.caughtUp = false }
            header.removeAll()
            try pingBeforeStop(ch, Wire.pingCaughtUp, during: "the last pass") { inbox.caughtUp }
            timeline.mark("caught-up", now: Sys.monotonicNanos())
        }
        stopGuestForSwitchover()
        let stopNanos = Sys.monotonicNanos()
        timeline.mark("stop", now: stopNanos)
        try advance(.converged)
        let before = precopyBytesOut(ch)
        try collectDirtyPages()
        timeline.mark("sync", now: Sys.monotonicNanos())
        header.removeAll()
        header.ramSectionBegin(.end, id: Self.ramSectionID)
        try ch.write(header)
        cursor = 0
        _ = try sendPages(ch, limited: false, lastStage: true)
        header.removeAll()
        try appendMultifdFlush() // every multifd page lands before the device state
        timeline.mark("ram", now: Sys.monotonicNanos())
        header.ramSectionEnd(id: Self.ramSectionID)
        let described = try appendDeviceState(to: &header)
        header.eof()
        // As QEMU after a precopy: the description tools read (the destination checks it).
        header.vmDescription(VMDescription(sections: described))
        try ch.write(header)
        try ch.flush()
        timeline.mark("device-state", now: Sys.monotonicNanos())
        updateStats {
            $0.downtimeBytes = self.precopyBytesOut(ch) - before
            $0.precopyBytes = self.bytesSentLocked - $0.downtimeBytes
            $0.remaining = 0
        }
        if returnPath {
            let shut = try waitForShut(seconds: 60)
            guard shut == 0 else { throw MigrationError(.peerFailed, "the destination failed to load the migration (SHUT \(shut))") }
        } else if case .exec = uri {
            Glibc.shutdown(ch.fd, Int32(SHUT_WR))
        }
        try ch.finishOutput() // exec: the command consumed everything; file: on disk
        try multifd?.finish()
        let end = Sys.monotonicNanos()
        timeline.mark("destination", now: end)
        try? machine.vm.setDirtyLogging(machine.ram, false) // the migration is done; a stale log costs nothing
        host.setRunState(.postmigrate)
        try advance(.finished) {
            $0.downtimeMs = (end - stopNanos) / 1_000_000
            $0.endNanos = end
            $0.transferred = self.bytesSentLocked
            $0.expectedDowntimeMs = nil
            $0.switchover = timeline
        }
        ch.close()
    }

    /// Adds what the guest dirtied since the last collection to `toSend`. What `populated`
    /// read before may be stale now (a page written since is in `toSend`): it is read
    /// afresh, chunk by chunk, as pages are sent.
    /// Counts as a bitmap sync as QEMU counts one (`dirty-sync-count`, `MIGRATION_PASS`).
    /// With `heartbeatOn` (between passes, the guest running) the destination keeps hearing
    /// PINGs while the log is collected (`keepingHeartbeat`); the switch-overs' collections,
    /// the guest stopped, run here directly.
    @discardableResult
    func collectDirtyPages(heartbeatOn ch: MigrationChannel? = nil) throws -> UInt64 {
        let before = autoConverge == nil ? 0 : toSend.popcount()
        try keepingHeartbeat(ch) { [self] in try machine.vm.collectDirtyLog(machine.ram, into: toSend) }
        lastSyncNanos = Sys.monotonicNanos()
        if populated != nil { populated = PopulatedPages(block) }
        if autoConverge != nil, !machine.pauseRequested {
            let p = parameters
            let settings = AutoConvergePolicy.Settings(initial: p.cpuThrottleInitial, increment: p.cpuThrottleIncrement, tailslow: p.cpuThrottleTailslow,
                                                       maximum: p.maxCPUThrottle, triggerThreshold: p.throttleTriggerThreshold)
            let sent = lock.withLock { bytesSentLocked }
            if let pct = autoConverge?.bitmapSynced(now: Sys.monotonicNanos(), sent: sent, newlyDirty: UInt64(toSend.popcount() - before),
                                                    pageSize: Wire.pageSize, settings: settings) {
                throttleGuest(Int(pct))
            }
        }
        return countBitmapSync()
    }

    /// auto-converge's throttle on the source guest (0 = off), reported as QEMU does while on.
    func throttleGuest(_ percent: Int) {
        guard autoConverge != nil else { return }
        machine.setThrottle(percent: percent)
        updateStats { $0.cpuThrottlePercentage = percent > 0 ? UInt64(percent) : nil }
    }

    /// One more bitmap sync: QEMU counts the one at setup too, so `dirty-sync-count` is 1
    /// during the first pass and `MIGRATION_PASS` 2 marks the start of the second.
    @discardableResult
    func countBitmapSync() -> UInt64 {
        let report = xbzrle?.report(previous: &xbzrleReported)
        let n: UInt64 = updateStats {
            $0.dirtySyncCount += 1
            if let report { $0.xbzrle = report }
            return $0.dirtySyncCount
        }
        host.emit(.pass(Int(n)))
        return n
    }

    /// A PING every 250 ms on socket migrations (`PingSchedule`), queued in `header`.
    func pingIfDue() {
        if let v = pings.due(now: Sys.monotonicNanos()) { header.ping(v) }
    }

    /// In the last stage the stream goes out whenever this much is queued, so the
    /// destination loads while the source still encodes: 64 whole pages, or thousands of
    /// deltas (a write per 64 deltas of ~20 bytes cost most of a small downtime).
    static let lastStageFlushBytes = 256 << 10

    /// Sends pages still to send, from the cursor on. With `limited`, stops at the rate
    /// limit or after 50 ms (QEMU's MAX_WAIT) so the caller can check for cancel.
    /// `lastStage`: the guest is stopped (the XBZRLE cache is no longer updated).
    /// Returns true when no page is left in this pass.
    func sendPages(_ ch: MigrationChannel, limited: Bool, lastStage: Bool = false) throws -> Bool {
        let started = Sys.monotonicNanos()
        // With a limit, the budget is checked at every page: at low limits a 64-page batch
        // is more than several windows' worth.
        let parameters = self.parameters
        let limit = parameters.maxBandwidth
        let checkEvery = limited && limit > 0 && limit < 64 << 20 ? 1 : 64
        var first = true
        var batch = 0
        var normal: UInt64 = 0, duplicate: UInt64 = 0
        defer { updateStats { $0.normal += normal; $0.duplicate += duplicate } }
        let populated = self.populated
        if let multifd { return try sendPagesMultifd(multifd, ch, limited: limited, checkEvery: checkEvery, started: started, populated: populated) }
        try xbzrle?.resize(parameters.xbzrleCacheSize)
        let deltas = xbzrle
        let generation = deltas == nil ? 0 : updateStats { $0.dirtySyncCount }
        while let i = toSend.nextSet(from: cursor) {
            guard toSend.testAndClear(i) else { cursor = i + 1; continue }
            pagesThisPass += 1
            let neverTouched = try populated.map { try !$0.mayHoldData(i) } ?? false
            var wrote = true
            var pages = 1
            if let deltas {
                switch try sendWithXBZRLE(deltas, ch, i, named: first, knownZero: neverTouched, generation: generation, lastStage: lastStage) {
                case .zero: duplicate += 1
                case .normal: normal += 1
                case .delta: break
                case .unchanged: wrote = false // nothing went: the next record still names the block
                }
            } else if neverTouched, !first, checkEvery == 64, let populated {
                // A never-touched stretch (most of a big sparse guest's first pass): its
                // ZERO records go in one write, not a call and a copy per record.
                pages = 1 + toSend.takeRun(from: i + 1, limit: try populated.knownZeroRun(from: i + 1, limit: Self.zeroRunPages - 1))
                try zeroRecords(ch, from: i, count: pages)
                duplicate += UInt64(pages)
                pagesThisPass += UInt64(pages - 1)
            } else if try PageRecord.send(ch, block, i, named: first, knownZero: neverTouched, buffer: &header) { duplicate += 1 } else { normal += 1 }
            if wrote { first = false }
            cursor = i + pages
            batch += pages
            if batch >= checkEvery {
                batch = 0
                if try checkBudget(limited: limited, started: started, ch) { return false }
            }
        }
        cursor = 0
        return true
    }

    /// Every `checkEvery` pages of `sendPages`: with `limited`, true when the pass should
    /// yield (the rate limit waited, or 50 ms went by); in the last stage, flushes what is
    /// queued past `lastStageFlushBytes`.
    private func checkBudget(limited: Bool, started: UInt64, _ ch: MigrationChannel) throws -> Bool {
        if limited {
            if try rateLimit(ch) { return true }
            if Sys.nanosSince(started) > 50_000_000 { return true }
        } else if ch.pendingBytes >= Self.lastStageFlushBytes {
            try ch.flush()
        }
        return false
    }

    /// At most this many ZERO records go in one write (36 KiB).
    static let zeroRunPages = 4096

    /// ZERO records for the pages `first ..< first + count` of the block, continuing it.
    private func zeroRecords(_ ch: MigrationChannel, from first: Int, count: Int) throws {
        try withUnsafeTemporaryAllocation(byteCount: count * WireBuffer.continuedZeroRecordBytes, alignment: 8) { buf in
            WireBuffer.continuedZeroRecords(firstPage: first, count: count, into: buf.baseAddress!)
            try ch.write(raw: UnsafeRawBufferPointer(buf))
        }
    }

    /// `sendPages` with multifd: the dirty pages go to the channels in packets of up to
    /// 128; the channels' threads read, test and write them.
    private func sendPagesMultifd(_ m: MultifdSenders, _ ch: MigrationChannel, limited: Bool, checkEvery: Int, started: UInt64,
                                  populated: PopulatedPages?) throws -> Bool {
        var packet: [MultifdSenders.Page] = []
        packet.reserveCapacity(MultiFD.pagesPerPacket)
        var batch = 0
        func queuePacket() throws {
            if !packet.isEmpty { try m.queue(packet) }
            packet.removeAll(keepingCapacity: true)
        }
        while let i = toSend.nextSet(from: cursor) {
            guard toSend.testAndClear(i) else { cursor = i + 1; continue }
            pagesThisPass += 1
            packet.append(.init(index: i, knownZero: try populated.map { try !$0.mayHoldData(i) } ?? false))
            cursor = i + 1
            if packet.count == MultiFD.pagesPerPacket { try queuePacket() }
            batch += 1
            if limited && batch % checkEvery == 0 {
                if try rateLimit(ch) || Sys.nanosSince(started) > 50_000_000 {
                    try queuePacket()
                    return false
                }
            }
        }
        try queuePacket()
        cursor = 0
        return true
    }

    /// With multifd: a SYNC packet on every channel and the main channel's flush record
    /// (queued in `header`, inside a RAM section).
    func appendMultifdFlush() throws {
        guard let multifd else { return }
        try multifd.sync()
        header.multifdFlush()
    }

    /// Precopy bytes out on the main and multifd channels (main thread).
    func precopyBytesOut(_ ch: MigrationChannel) -> UInt64 { ch.bytesWritten + (multifd?.bytesWritten ?? 0) }

    enum SentAs { case zero, normal, delta, unchanged }

    /// One dirty page with XBZRLE on: ZERO as ever (and the cache learns it), else a delta
    /// against the cached copy, the copy just cached whole, or, not cacheable, the page.
    private func sendWithXBZRLE(_ x: XBZRLESender, _ ch: MigrationChannel, _ i: Int, named: Bool, knownZero: Bool,
                                generation: UInt64, lastStage: Bool) throws -> SentAs {
        let page = block.page(i)
        if knownZero || ferry_page_is_zero(page) != 0 {
            try PageRecord.send(ch, block, i, named: named, knownZero: true, buffer: &header)
            if x.started { x.sentZero(i, generation: generation, lastStage: lastStage) }
            return .zero
        }
        let offset = UInt64(i) << Wire.pageShift
        header.removeAll()
        switch x.started ? x.prepare(i, page, generation: generation, lastStage: lastStage) : x.prime(i, page, generation: generation) {
        case .unchanged:
            return .unchanged
        case .delta(let n):
            header.xbzrleRecord(offset: offset, block: named ? block.name : nil, encoded: UnsafeRawBufferPointer(rebasing: x.encodedBytes[0..<n]))
            x.sentDelta(wireBytes: header.count)
            try ch.write(header)
            return .delta
        case .whole(let copy):
            // A copy the cache (or the encoder) owns: queued by value, not by reference.
            header.ramRecord(offset: offset, flags: .page, block: named ? block.name : nil)
            try ch.write(header)
            try ch.write(raw: UnsafeRawBufferPointer(start: copy, count: Wire.pageSize))
            return .normal
        case .uncached:
            try PageRecord.send(ch, block, i, named: named, knownZero: false, buffer: &header)
            return .normal
        }
    }

    /// Sleeps while the rate limiter says the budget is spent. Returns true when the caller
    /// should end the section (it waited).
    private func rateLimit(_ ch: MigrationChannel) throws -> Bool {
        var wait = limiter.delay(sent: precopyBytesOut(ch) + UInt64(ch.pendingBytes), now: Sys.monotonicNanos(), bytesPerSecond: parameters.maxBandwidth)
        guard wait > 0 else { return false }
        try ch.flush()
        while wait > 0 {
            try checkPrecopy()
            usleep(UInt32(min(wait / 1000, 10_000)))
            wait = limiter.delay(sent: precopyBytesOut(ch), now: Sys.monotonicNanos(), bytesPerSecond: parameters.maxBandwidth)
        }
        return true
    }

    /// Stops the guest for the switch-over (precopy's last pass or the postcopy package).
    /// A guest already paused by the operator gets no second STOP event.
    func stopGuestForSwitchover() {
        let before = host.runState
        switchover.runStateBefore = before
        host.setRunState(.finishMigrate)
        machine.pause()
        throttleGuest(0) // stopped: nothing left to slow down
        switchover.stoppedByUs = before == .running
        if switchover.stoppedByUs { host.emit(.stop) }
    }

    /// Waits for the destination's SHUT after EOF: 0 means its guest runs.
    func waitForShut(seconds: Double) throws -> UInt32 {
        let deadline = Sys.monotonicNanos() + UInt64(seconds * 1e9)
        let shut: UInt32? = try lock.withLock {
            try lock.wait(until: deadline) { () throws -> UInt32? in
                if let s = inbox.shut { return s }
                if let e = inbox.failure { throw MigrationError(.io, "return path failed before the destination confirmed", cause: e) }
                if phase == .cancelling { throw MigrationError.cancelledByUser }
                if asked.pause { throw MigrationError.pausedByUser }
                return nil
            }
        }
        guard let shut else { throw MigrationError(.timeout, "the destination did not confirm within \(Int(seconds)) s") }
        return shut
    }
}

/// One page on the wire: ZERO for an all-zero page, else PAGE with the page referenced
/// straight from guest RAM (no copy). The block name goes with the first record of a
/// section (later ones say CONTINUE). `knownZero`: the page was never touched, so it is
/// not read (reading would fault it in).
enum PageRecord {
    /// Returns true for a zero page.
    @discardableResult
    static func send(_ ch: MigrationChannel, _ block: RAMBlock, _ i: Int, named: Bool, knownZero: Bool = false, buffer: inout WireBuffer) throws -> Bool {
        let page = block.page(i)
        buffer.removeAll()
        let offset = UInt64(i) << Wire.pageShift
        if knownZero || ferry_page_is_zero(page) != 0 {
            buffer.ramRecord(offset: offset, flags: .zero, block: named ? block.name : nil)
            try ch.write(buffer)
            return true
        }
        buffer.ramRecord(offset: offset, flags: .page, block: named ? block.name : nil)
        try ch.write(buffer)
        try ch.write(reference: page, count: Wire.pageSize)
        return false
    }
}

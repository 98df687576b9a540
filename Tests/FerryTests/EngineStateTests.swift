@testable import FerryMigration
@testable import FerryWire
import Testing

/// The engine's phases and policies, as pure values: no KVM, no sockets, virtual time.
@Suite("engine phases and policies")
struct EngineStateTests {
    // MARK: source phases

    func statuses(_ events: [SourceEvent]) -> [MigrationStatus]? { SourcePhase.none.statuses(after: events) }

    @Test("the source's phases give QEMU's status sequences for precopy, postcopy and a recovery")
    func sourceSequences() {
        #expect(statuses([.start, .setupSent, .converged, .finished]) == [.setup, .active, .device, .completed])
        #expect(statuses([.start, .setupSent, .switchToPostcopy, .packageWriting, .packageSent, .destinationRunning, .finished])
                == [.setup, .active, .device, .postcopyDevice, .postcopyActive, .completed])
        #expect(statuses([.start, .setupSent, .switchToPostcopy, .packageWriting, .packageSent, .destinationRunning,
                          .linkLost, .recoveryAttempt, .linkLost, .recoveryAttempt, .recoveryConnected, .resumed, .finished])
                == [.setup, .active, .device, .postcopyDevice, .postcopyActive, .postcopyPaused, .postcopyRecoverSetup,
                    .postcopyPaused, .postcopyRecoverSetup, .postcopyRecover, .postcopyActive, .completed])
        #expect(statuses([.start, .setupSent, .cancel, .failure]) == [.setup, .active, .cancelling, .cancelled])
    }

    @Test("a split guest is never failed or cancelled: only completing, or the destination saying it never ran it, ends a postcopy phase")
    func splitNeverFails() {
        for p in SourcePhase.allCases where p.guestSplit {
            #expect(p.next(.failure) == nil, "\(p) failed")
            #expect(p.next(.cancel) == nil, "\(p) cancelled")
            #expect(p.next(.destinationNeverRan) == .failed)
        }
        for p in SourcePhase.allCases where !p.guestSplit {
            // Found by the soak: a SHUT(1) in precopy left the source "active" with no thread.
            #expect(p.next(.destinationNeverRan) == p.next(.failure), "\(p): the destination never ran it before the split either")
        }
        #expect(SourcePhase.packageSending.next(.cancel) == nil, "cancel once the package is on its way")
        #expect(SourcePhase.packageSending.next(.failure) == .failed, "a package that did not go out whole")
        #expect(SourcePhase.postcopySwitchover.next(.cancel) == .cancelling)
        #expect(SourcePhase.cancelling.next(.cancel) == nil, "a second cancel changes nothing")
        #expect(SourcePhase.cancelling.next(.packageWriting) == nil, "no package after a cancel")
        #expect(SourcePhase.cancelling.next(.finished) == .cancelled)
    }

    @Test("finished phases accept no event; every phase has one status and page requests are served only once the package may be there")
    func sourceTableShape() {
        let events: [SourceEvent] = [.start, .setupSent, .cancel, .converged, .switchToPostcopy, .packageWriting, .packageSent,
                                     .destinationRunning, .linkLost, .recoveryAttempt, .recoveryConnected, .resumed, .finished,
                                     .failure, .destinationNeverRan]
        for p in SourcePhase.allCases where p.isFinished {
            for e in events { #expect(p.next(e) == nil, "\(p) + \(e)") }
        }
        for p in SourcePhase.allCases {
            #expect(p.servesPageRequests == (p.guestSplit || p == .packageSending))
            if p.pausable { #expect(p.guestSplit) }
        }
    }

    // MARK: destination phases and the legality table

    @Test("the destination's phases give QEMU's status sequences")
    func destinationSequences() {
        func walk(_ events: [DestinationEvent]) -> [MigrationStatus]? { DestinationPhase.none.statuses(after: events) }
        #expect(walk([.start, .sourceConnected, .finished]) == [.setup, .active, .completed])
        #expect(walk([.start, .sourceConnected, .packageOpened, .listen, .run, .linkLost, .recoveryConnected, .resumed, .finished])
                == [.setup, .active, .postcopyDevice, .postcopyActive, .postcopyPaused, .postcopyRecover, .postcopyActive, .completed])
        for p in DestinationPhase.allCases where p.guestSplit { #expect(p.next(.failure) == nil, "\(p) failed with the guest running") }
    }

    @Test("the legality table: each phase accepts what QEMU's loader accepts there, and nothing else")
    func legality() {
        let ram = StreamItem.section(SectionHeader(type: .part, id: 0, name: Wire.ramSectionName, instance: 0, version: 4))
        let ramSetup = StreamItem.section(SectionHeader(type: .start, id: 0, name: Wire.ramSectionName, instance: 0, version: 4))
        let cpu = StreamItem.section(SectionHeader(type: .full, id: 1, name: Wire.cpuSectionName, instance: 0, version: 1))
        func ok(_ p: DestinationPhase, _ item: StreamItem) -> Bool { (try? p.check(item)) != nil }
        #expect(ok(.loading, ramSetup) && ok(.loading, ram) && ok(.loading, cpu) && ok(.loading, .eof))
        #expect(ok(.loading, .command(.packaged(length: 10))) && ok(.loading, .command(.ramDiscard(block: 0, ranges: []))))
        #expect(!ok(.loading, .command(.postcopyListen)) && !ok(.loading, .command(.postcopyRun)))
        #expect(!ok(.loading, .command(.recvBitmap(block: "pc.ram"))) && !ok(.loading, .command(.postcopyResume)))
        #expect(ok(.package, .command(.postcopyListen)) && !ok(.package, .command(.postcopyRun)), "RUN before LISTEN")
        #expect(ok(.postcopyDevice, cpu) && ok(.postcopyDevice, .command(.postcopyRun)) && !ok(.postcopyDevice, .eof))
        #expect(ok(.postcopyActive, ram) && ok(.postcopyActive, .eof) && ok(.postcopyActive, .command(.ping(7))))
        #expect(!ok(.postcopyActive, .command(.recvBitmap(block: "pc.ram"))), "RECV_BITMAP outside postcopy-recover")
        #expect(!ok(.postcopyActive, ramSetup) && !ok(.postcopyActive, cpu) && !ok(.postcopyActive, .configuration(machine: "x")))
        #expect(ok(.postcopyResuming, .command(.recvBitmap(block: "pc.ram"))) && ok(.postcopyResuming, .command(.postcopyResume)))
        #expect(!ok(.postcopyResuming, ram), "pages before POSTCOPY_RESUME")
        for p in [DestinationPhase.none, .listening, .postcopyPaused, .completed, .failed] {
            #expect(p.acceptedItems.isEmpty)
        }
        do { try DestinationPhase.postcopyActive.check(.command(.postcopyResume)); Issue.record("accepted") } catch {
            #expect("\(error)".contains("POSTCOPY_RESUME is not valid during postcopy"), "\(error)")
        }
    }

    // MARK: convergence

    let ms: UInt64 = 1_000_000
    let s: UInt64 = 1_000_000_000

    /// One pass ending at second `t` of a 1 GB/s link (`t` GB sent), `dirty` bytes left,
    /// a 300 ms downtime limit.
    private func passEnded(_ c: inout ConvergencePolicy, second t: UInt64, dirty: UInt64) -> ConvergencePolicy.Verdict {
        c.passEnded(now: t * s, sent: t * 1_000_000_000, dirtyPages: dirty / 4096, pageSize: 4096,
                    downtimeLimitMs: 300, maxBandwidth: 0, autoSwitchPasses: 0).0
    }

    @Test("convergence: stops once the rest fits the downtime limit, one more pass while each still shrinks it to two thirds")
    func convergenceShrinking() {
        var c = ConvergencePolicy(now: 0, sent: 0, ramBytes: 512 << 20)
        // 1 GB/s measured; 500 MiB dirty: 524 ms > 300: go on.
        #expect(passEnded(&c, second: 1, dirty: 500 << 20) == .anotherPass)
        // 200 MiB fits (210 ms) and shrank the rest: one more pass.
        #expect(passEnded(&c, second: 2, dirty: 200 << 20) == .anotherPass)
        // 50 MiB: fits, shrank again, 52 ms > 300/16: one more.
        #expect(passEnded(&c, second: 3, dirty: 50 << 20) == .anotherPass)
        // 40 MiB no longer shrinks to two thirds: stop.
        #expect(passEnded(&c, second: 4, dirty: 40 << 20) == .stopAndCopy)
        // A pass that leaves just over half the rest (102 of 200 MiB, 107 ms) is still worth
        // another (a half stopped here); one that leaves 70 % is not.
        var h = ConvergencePolicy(now: 0, sent: 0, ramBytes: 512 << 20)
        #expect(passEnded(&h, second: 1, dirty: 200 << 20) == .anotherPass)
        #expect(passEnded(&h, second: 2, dirty: 102 << 20) == .anotherPass)
        #expect(passEnded(&h, second: 3, dirty: 72 << 20) == .stopAndCopy)
        // A rest that still shrinks goes on below a sixteenth of the limit (10 ms, then 4 ms),
        // until it would take no more than 2 ms.
        var d = ConvergencePolicy(now: 0, sent: 0, ramBytes: 512 << 20)
        #expect(passEnded(&d, second: 1, dirty: 10_000 << 10) == .anotherPass) // 10 ms
        #expect(passEnded(&d, second: 2, dirty: 4_000 << 10) == .anotherPass)  // 4 ms
        #expect(passEnded(&d, second: 3, dirty: 1_600 << 10) == .stopAndCopy)  // 1.6 ms
    }

    @Test("convergence: a tiny rest stops at once; extra passes are bounded")
    func convergenceBounds() {
        var tiny = ConvergencePolicy(now: 0, sent: 0, ramBytes: 64 << 20)
        #expect(tiny.passEnded(now: s, sent: 1_000_000_000, dirtyPages: 1, pageSize: 4096, downtimeLimitMs: 300, maxBandwidth: 0, autoSwitchPasses: 0).0 == .stopAndCopy)
        var c = ConvergencePolicy(now: 0, sent: 0, ramBytes: 1 << 40)
        var dirty: UInt64 = 1 << 28 // always halving, never tiny enough at this rate
        var verdicts: [ConvergencePolicy.Verdict] = []
        for i in 1...12 {
            verdicts.append(c.passEnded(now: UInt64(i) * s, sent: UInt64(i) * 1_000_000_000, dirtyPages: dirty / 4096, pageSize: 4096,
                                        downtimeLimitMs: 100_000, maxBandwidth: 0, autoSwitchPasses: 0).0)
            dirty /= 2
            if verdicts.last == .stopAndCopy { break }
        }
        #expect(verdicts.last == .stopAndCopy)
        #expect(verdicts.count <= ConvergencePolicy.maxExtraPasses + 1)
    }

    @Test("convergence: zero bandwidth expects nothing; max-bandwidth caps the estimate and a change applies at the next pass")
    func convergenceBandwidth() {
        var c = ConvergencePolicy(now: 0, sent: 0, ramBytes: 64 << 20)
        // Under 256 KiB in a pass: no estimate, no expectation, never converged.
        let (v, r) = c.passEnded(now: s, sent: 100, dirtyPages: 1, pageSize: 4096, downtimeLimitMs: 300, maxBandwidth: 0, autoSwitchPasses: 0)
        #expect(v == .anotherPass && r.expectedDowntimeMs == nil && r.bandwidth == 0)
        // 1 GB/s measured but capped at 10 MB/s: 100 MiB dirty needs 10 s.
        let (v2, r2) = c.passEnded(now: 2 * s, sent: 1_000_000_100, dirtyPages: 25_600, pageSize: 4096, downtimeLimitMs: 300, maxBandwidth: 10_000_000, autoSwitchPasses: 0)
        #expect(v2 == .anotherPass && r2.bandwidth == 10_000_000 && r2.expectedDowntimeMs == 10_485)
        // The limit lifted mid-migration: the next pass measures the link again.
        let (v3, r3) = c.passEnded(now: 3 * s, sent: 2_000_000_100, dirtyPages: 25, pageSize: 4096, downtimeLimitMs: 300, maxBandwidth: 0, autoSwitchPasses: 0)
        #expect(v3 == .stopAndCopy && r3.bandwidth == 1e9)
    }

    @Test("convergence: compressed passes (under 256 KiB on the wire, over 256 KiB of pages) still measure the link and converge")
    func convergenceCompressed() {
        var c = ConvergencePolicy(now: 0, sent: 0, ramBytes: 64 << 20)
        // 16 KiB on the wire for 1000 pages in 5 ms: 3.3 MB/s at 16 B a page.
        let (v, r) = c.passEnded(now: 5 * ms, sent: 16_000, dirtyPages: 1240, pageSize: 4096, downtimeLimitMs: 300, maxBandwidth: 0,
                                 autoSwitchPasses: 0, pagesSent: 1000)
        #expect(r.bandwidth == 3_200_000 && v == .anotherPass) // the first pass costs pages whole: 1.6 s
        let (v2, r2) = c.passEnded(now: 10 * ms, sent: 32_000, dirtyPages: 1240, pageSize: 4096, downtimeLimitMs: 300, maxBandwidth: 0,
                                   autoSwitchPasses: 0, pagesSent: 1000)
        #expect(v2 == .stopAndCopy && r2.expectedDowntimeMs == 6, "\(r2)")
        // A near-empty pass (10 pages) still says nothing.
        var e = ConvergencePolicy(now: 0, sent: 0, ramBytes: 64 << 20)
        #expect(e.passEnded(now: s, sent: 160, dirtyPages: 1, pageSize: 4096, downtimeLimitMs: 300, maxBandwidth: 0,
                            autoSwitchPasses: 0, pagesSent: 10).1.bandwidth == 0)
    }

    @Test("rate window: bytes/s over the last second, updated at every read; too short a span says nothing; backwards restarts")
    func rateWindow() {
        var w = RateWindow()
        #expect(w.rate(now: 0, bytes: 0) == nil)
        #expect(w.rate(now: 100 * ms, bytes: 1_000_000) == nil) // 100 ms: too short
        #expect(w.rate(now: 500 * ms, bytes: 5_000_000) == 10_000_000)
        #expect(w.rate(now: 1000 * ms, bytes: 10_000_000) == 10_000_000)
        // The link slows: after a second only the slow part counts.
        _ = w.rate(now: 1500 * ms, bytes: 10_500_000)
        _ = w.rate(now: 2000 * ms, bytes: 11_000_000)
        #expect(w.rate(now: 2500 * ms, bytes: 11_500_000) == 1_000_000)
        // Reads closer than 50 ms are folded together (a client in a loop keeps memory flat).
        for k in 0..<1000 { _ = w.rate(now: 2500 * ms + UInt64(k) * 10_000, bytes: 11_500_000) }
        #expect(w.rate(now: 3000 * ms, bytes: 12_000_000) == 1_000_000)
        // A new counter (or clock) that went backwards starts again.
        #expect(w.rate(now: 3100 * ms, bytes: 10) == nil)
        #expect(w.rate(now: 3400 * ms, bytes: 300_010) == 1_000_000)
    }

    @Test("convergence: a clock that goes backwards counts as no time (no crash, no rate)")
    func convergenceClockBackwards() {
        var c = ConvergencePolicy(now: 10 * s, sent: 0, ramBytes: 64 << 20)
        let (v, r) = c.passEnded(now: 5 * s, sent: 1 << 30, dirtyPages: 100, pageSize: 4096, downtimeLimitMs: 300, maxBandwidth: 0, autoSwitchPasses: 0)
        #expect(v == .anotherPass && r.mbps == 0 && r.dirtyPagesRate == 0 && r.pagesPerSecond == 0)
        let (_, r2) = c.passEnded(now: 11 * s, sent: 2 << 30, dirtyPages: 100, pageSize: 4096, downtimeLimitMs: 300, maxBandwidth: 0, autoSwitchPasses: 0)
        #expect(r2.bandwidth > 0)
    }

    @Test("auto-switch: that many passes in a row that do not shrink the best rest by a tenth switch to postcopy; progress resets the count")
    func autoSwitch() {
        var c = ConvergencePolicy(now: 0, sent: 0, ramBytes: 512 << 20)
        var t: UInt64 = 0, sent: UInt64 = 0
        func pass(_ dirtyMB: UInt64, switchAfter: UInt64 = 2) -> ConvergencePolicy.Verdict {
            t += s; sent += 100_000_000 // 100 MB/s: nothing ever fits 300 ms
            return c.passEnded(now: t, sent: sent, dirtyPages: (dirtyMB << 20) / 4096, pageSize: 4096, downtimeLimitMs: 300, maxBandwidth: 0, autoSwitchPasses: switchAfter).0
        }
        #expect(pass(500) == .anotherPass) // 500 < 512 * 0.9? no (460.8): stuck 1
        #expect(pass(400) == .anotherPass) // progress: reset
        #expect(pass(390) == .anotherPass) // stuck 1
        #expect(pass(395) == .switchToPostcopy) // stuck 2
        var never = ConvergencePolicy(now: 0, sent: 0, ramBytes: 512 << 20)
        for i in 1...20 {
            #expect(never.passEnded(now: UInt64(i) * s, sent: UInt64(i) * 100_000_000, dirtyPages: 100_000, pageSize: 4096,
                                    downtimeLimitMs: 300, maxBandwidth: 0, autoSwitchPasses: 0).0 == .anotherPass)
        }
    }

    // MARK: recovery backoff and heartbeat

    @Test("recovery backoff: first attempt after 10 ms, then 50 ms doubling to 1 s; none after the timeout; clock backwards only waits")
    func backoff() {
        var b = RecoveryBackoff(pausedAt: 100 * s, timeoutMs: 10_000)
        #expect(b.decide(now: 100 * s) == .wait(10 * ms))
        #expect(b.decide(now: 100 * s + 10 * ms) == .attempt)
        var now = 100 * s + 10 * ms
        var gaps: [UInt64] = []
        for _ in 0..<7 {
            b.attemptFailed(now: now)
            gaps.append((b.nextAttempt - now) / ms)
            now = b.nextAttempt
            #expect(b.decide(now: now) == .attempt)
        }
        #expect(gaps == [50, 100, 200, 400, 800, 1000, 1000])
        #expect(b.decide(now: 110 * s) == .wait(RecoveryBackoff.idleRecheckNanos), "past auto-recover-timeout")
        #expect(b.decide(now: 50 * s) == .wait(RecoveryBackoff.idleRecheckNanos), "a clock before the pause waits, no underflow")
        let forever = RecoveryBackoff(pausedAt: 5, timeoutMs: .max)
        #expect(forever.deadline == .max)
    }

    @Test("heartbeat: a PING at once, then at most every 250 ms with a new value; a clock that goes backwards sends no burst")
    func heartbeat() {
        var p = PingSchedule()
        #expect(p.due(now: 1 * s) == 0x1001)
        #expect(p.due(now: 1 * s + 249 * ms) == nil)
        #expect(p.due(now: 1 * s + 250 * ms) == 0x1002)
        #expect(p.due(now: 0) == nil, "backwards: the interval restarts")
        #expect(p.due(now: 100 * ms) == nil)
        #expect(p.due(now: 250 * ms) == 0x1003)
    }
}

@Suite("switch-over timeline")
struct SwitchoverTimelineTests {
    @Test("each step counts from the end of the one before; a clock going backwards counts 0 and does not move the start")
    func steps() {
        var t = SwitchoverTimeline(start: 1_000_000)
        t.mark("stop", now: 3_000_000)
        t.mark("sync", now: 2_500_000)
        t.mark("send", now: 4_000_500)
        #expect(t.steps.map(\.name) == ["stop", "sync", "send"])
        #expect(t.steps.map(\.micros) == [2000, 0, 1000])
        #expect(t.totalMicros == 3000)
    }
}


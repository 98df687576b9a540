import FerryMachine
@testable import FerryMigration
import FerrySys
import Glibc
import Testing

@Suite("auto-converge policy")
struct AutoConvergePolicyTests {
    static let s: UInt64 = 1_000_000_000
    typealias Settings = AutoConvergePolicy.Settings

    /// Feeds one sync per second: `sentPerSecond` bytes on the wire, `dirtyPagesPerSecond` new dirty pages.
    static func run(_ p: inout AutoConvergePolicy, seconds: Int, from t0: Int = 1, sentPerSecond: UInt64, dirtyPagesPerSecond: UInt64,
                    settings: Settings = Settings()) -> [UInt64?] {
        (t0..<(t0 + seconds)).map { t in
            p.bitmapSynced(now: UInt64(t) * s, sent: UInt64(t) * sentPerSecond, newlyDirty: dirtyPagesPerSecond, pageSize: 4096, settings: settings)
        }
    }

    @Test("dirtying more than half of what the link carries, two periods running: 20 %, then +10 % every two periods, up to the maximum")
    func rampsAsQEMU() {
        var p = AutoConvergePolicy(now: 0, sent: 0)
        // 100 MB/s on the wire, 80 MB/s dirtied: above 50 %.
        let steps = Self.run(&p, seconds: 22, sentPerSecond: 100_000_000, dirtyPagesPerSecond: 80_000_000 / 4096,
                             settings: Settings(maximum: 99))
        #expect(steps.compactMap { $0 } == [20, 30, 40, 50, 60, 70, 80, 90, 99, 99].filter { $0 != 99 } + [99])
        #expect(steps[0] == nil && steps[1] == 20 && steps[2] == nil && steps[3] == 30)
        #expect(p.percentage == 99)
    }

    @Test("a guest dirtying less than the threshold is never throttled; syncs less than a second apart only add up")
    func belowThreshold() {
        var p = AutoConvergePolicy(now: 0, sent: 0)
        #expect(Self.run(&p, seconds: 10, sentPerSecond: 100_000_000, dirtyPagesPerSecond: 40_000_000 / 4096).allSatisfy { $0 == nil })
        let s = Self.s
        var q = AutoConvergePolicy(now: 0, sent: 0)
        // Ten syncs 100 ms apart: one period, whose dirty pages are the ten syncs' sum.
        for k in 1...9 {
            #expect(q.bitmapSynced(now: UInt64(k) * s / 10, sent: UInt64(k) * 10_000_000, newlyDirty: 2_000, pageSize: 4096, settings: Settings()) == nil)
        }
        #expect(q.bitmapSynced(now: s, sent: 100_000_000, newlyDirty: 2_000, pageSize: 4096, settings: Settings()) == nil) // first high period
        for k in 11...19 { _ = q.bitmapSynced(now: UInt64(k) * s / 10, sent: UInt64(k) * 10_000_000, newlyDirty: 2_000, pageSize: 4096, settings: Settings()) }
        #expect(q.bitmapSynced(now: 2 * s, sent: 200_000_000, newlyDirty: 2_000, pageSize: 4096, settings: Settings()) == 20)
    }

    @Test("tailslow: steps no larger than what brings the dirty rate to the threshold; settings honoured; a clock going back is no period")
    func tailslowAndSettings() {
        var p = AutoConvergePolicy(now: 0, sent: 0)
        let set = Settings(initial: 40, increment: 30, tailslow: true, maximum: 75, triggerThreshold: 50)
        // Dirty 60 % of the transfer: at 60 % CPU the ideal is 60 × 50/60 = 50 %, so +10;
        // then 50 × 50/60 = 41 (truncated, as QEMU), +9; then capped at the maximum.
        let steps = Self.run(&p, seconds: 8, sentPerSecond: 100_000_000, dirtyPagesPerSecond: 60_000_000 / 4096, settings: set)
        #expect(steps.compactMap { $0 } == [40, 50, 59, 66])
        var q = AutoConvergePolicy(now: 10 * Self.s, sent: 0)
        #expect(q.bitmapSynced(now: 5 * Self.s, sent: 1, newlyDirty: 1 << 30, pageSize: 4096, settings: set) == nil)
        #expect(q.percentage == 0)
    }
}

@Suite("auto-converge migration", .serialized)
struct AutoConvergeMigrationTests {
    /// Guest serial bytes (one per vCPU pass) per second over `seconds`.
    static func passRate(_ m: Machine, seconds: Double) -> Double {
        let a = m.serial.bytesWritten
        usleep(UInt32(seconds * 1e6))
        return Double(m.serial.bytesWritten - a) / seconds
    }

    @Test("the vCPU throttle: at 75 % the guest makes fewer than half its passes; off again, full speed")
    func throttleSlowsTheGuest() throws {
        let m = try runningTestGuest(memory: 16 << 20, vcpus: 2, passes: 2)
        defer { m.stop() }
        let free = Self.passRate(m, seconds: 1)
        m.setThrottle(percent: 75)
        #expect(m.throttlePercent == 75)
        let throttled = Self.passRate(m, seconds: 1)
        m.setThrottle(percent: 0)
        let again = Self.passRate(m, seconds: 1)
        #expect(free > 4 && throttled < free * 0.5, "passes/s: free \(free), at 75 % \(throttled)")
        #expect(again > throttled * 1.5, "passes/s after the throttle went off: \(again) (throttled \(throttled))")
        m.pause()
        #expect(checkMemory(m).passed)
    }

    @Test("auto-converge: a guest that never converges plain is throttled step by step (cpu-throttle-percentage, the guest's pass rate) until it converges; the throttle ends with the migration")
    func convergesByThrottling() throws {
        let pair = try Pair()
        let target = try pair.listen()
        try pair.source.setCapabilities([(.autoConverge, true)])
        pair.source.setParameters {
            $0.maxBandwidth = 100_000_000
            $0.cpuThrottleInitial = 60
            $0.cpuThrottleIncrement = 20
        }
        let free = Self.passRate(pair.source.machine, seconds: 1)
        try pair.source.migrate(uri: target)
        var seen: [UInt64] = []
        var throttledRate: Double?
        let done = waitUntil(seconds: 120) {
            let s = pair.source.queryMigrate()
            if let t = s.cpuThrottlePercentage, seen.last != t {
                seen.append(t)
                if t == 60 && throttledRate == nil { throttledRate = Self.passRate(pair.source.machine, seconds: 0.5) }
            }
            return s.status == .completed || s.status == .failed
        }
        #expect(done && pair.source.queryMigrate().status == .completed, "\(pair.source.queryMigrate().errorDescription ?? "")")
        // Under ThreadSanitizer the downtime limit is ×4 and the link slower: the guest may
        // converge with one step or none; the steps are checked at full speed.
        if testTimeScale == 1 {
            #expect(seen.first == 60 && seen == seen.sorted() && seen.count >= 2, "throttle steps seen: \(seen)")
        } else {
            #expect(seen == seen.sorted(), "throttle steps seen: \(seen)")
        }
        if let throttledRate { #expect(throttledRate < free * 0.7, "passes/s: free \(free), at 60 % \(throttledRate)") }
        #expect(pair.source.queryMigrate().cpuThrottlePercentage == nil, "the throttle outlived the migration")
        #expect(pair.source.machine.throttlePercent == 0)
        pair.expectDestinationRunsCorrectly()
    }

    @Test("a cancelled auto-converge migration leaves the source guest at full speed and intact")
    func cancelRestoresSpeed() throws {
        let pair = try Pair()
        let target = try pair.listen()
        try pair.source.setCapabilities([(.autoConverge, true)])
        pair.source.setParameters { $0.maxBandwidth = 100_000_000; $0.downtimeLimit = 0 }
        try pair.source.migrate(uri: target)
        #expect(waitUntil(seconds: 60) { pair.source.queryMigrate().cpuThrottlePercentage != nil })
        try pair.source.cancel()
        #expect(pair.source.waitForMigration(seconds: scaled(30)) == .cancelled)
        #expect(pair.source.machine.throttlePercent == 0)
        #expect(pair.source.runState == .running)
        #expect(waitForPasses(pair.source.machine, 4))
        pair.source.machine.pause()
        #expect(checkMemory(pair.source.machine).passed)
    }
}

@testable import FerryMigration
import Testing

/// The bandwidth policy in virtual time: no KVM, no sockets.
@Suite("rate limiter")
struct RateLimiterTests {
    let ms: UInt64 = 1_000_000

    /// Sends `chunk` bytes whenever allowed for `seconds` of virtual time; returns bytes/s.
    func simulate(limit: UInt64, chunk: UInt64, seconds: UInt64) -> Double {
        var l = RateLimiter(now: 0, sent: 0)
        l.reset(now: 0, sent: 0, bytesPerSecond: limit)
        var now: UInt64 = 0, sent: UInt64 = 0
        while now < seconds * 1000 * ms {
            let wait = l.delay(sent: sent, now: now, bytesPerSecond: limit)
            #expect(wait <= RateLimiter.periodNanos)
            if wait == 0 { sent += chunk } else { now += wait }
        }
        return Double(sent) / Double(seconds)
    }

    @Test("the long-run rate is the limit, also when one page is bigger than a window's budget", arguments: [
        (UInt64(100_000), UInt64(4104)), (10_000, 4104), (125_000_000, 4104), (1_000_000, 262_656),
    ])
    func longRunRate(limit: UInt64, chunk: UInt64) {
        let rate = simulate(limit: limit, chunk: chunk, seconds: 10)
        #expect(rate <= Double(limit) * 1.05 + Double(chunk) / 10, "\(Int(rate)) B/s at \(limit)")
        #expect(rate >= Double(limit) * 0.9, "\(Int(rate)) B/s at \(limit)")
    }

    @Test("zero is unlimited; a limit raised mid-pass applies at once")
    func unlimitedAndChange() {
        var l = RateLimiter(now: 0, sent: 0)
        l.reset(now: 0, sent: 0, bytesPerSecond: 0)
        #expect(l.delay(sent: 1 << 40, now: 1, bytesPerSecond: 0) == 0)
        l.reset(now: 0, sent: 0, bytesPerSecond: 1000)
        #expect(l.delay(sent: 10_000, now: 1 * ms, bytesPerSecond: 1000) > 0)
        #expect(l.delay(sent: 10_000, now: 2 * ms, bytesPerSecond: 0) == 0)
    }

    @Test("an idle spell lends at most one window; debt is bounded; a clock going backwards lends nothing")
    func edges() {
        var l = RateLimiter(now: 0, sent: 0)
        l.reset(now: 0, sent: 0, bytesPerSecond: 1_000_000) // 100 kB per window
        // 10 s idle: still only one window's worth before waiting.
        #expect(l.delay(sent: 50_000, now: 10_000 * ms, bytesPerSecond: 1_000_000) == 0)
        #expect(l.delay(sent: 150_001, now: 10_000 * ms + 1, bytesPerSecond: 1_000_000) > 0)
        // A huge burst (postcopy's requested pages) is forgiven after a bounded number of windows.
        var t = 10_000 * ms + 1
        var waits = 0
        while l.delay(sent: 1 << 30, now: t, bytesPerSecond: 1_000_000) > 0 { t += 100 * ms; waits += 1; if waits > 100 { break } }
        #expect(waits <= 5, "waited \(waits) windows after a 1 GiB burst")
        // Backwards: no credit appears.
        var b = RateLimiter(now: 0, sent: 0)
        b.reset(now: 1000 * ms, sent: 0, bytesPerSecond: 1000)
        #expect(b.delay(sent: 5000, now: 1000 * ms, bytesPerSecond: 1000) > 0)
        #expect(b.delay(sent: 5000, now: 500 * ms, bytesPerSecond: 1000) > 0)
        // A sent counter that goes down counts as nothing new.
        #expect(b.delay(sent: 0, now: 6100 * ms, bytesPerSecond: 1000) == 0)
    }
}

extension RateLimiterTests {
    @Test("postcopy's limiter forgets an overrun when its window ends (requested pages never starve the background stream)")
    func noDebt() {
        var l = RateLimiter(now: 0, sent: 0)
        l.reset(now: 0, sent: 0, bytesPerSecond: 1_000_000, carriesDebt: false) // 100 kB per window
        #expect(l.delay(sent: 10_000_000, now: 1, bytesPerSecond: 1_000_000) > 0)
        #expect(l.delay(sent: 10_000_000, now: 100_000_001, bytesPerSecond: 1_000_000) == 0)
    }
}

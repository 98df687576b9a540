/// The wire rate over the last second, from the byte counter sampled whenever the stats are
/// read: query-migrate's `mbps` and `pages-per-second` move during a pass (a pass at a low
/// bandwidth lasts seconds, and postcopy has none), where the convergence policy's figures
/// change only at bitmap syncs. Pure: the caller passes the clock.
struct RateWindow: Sendable, Equatable {
    static let windowNanos: UInt64 = 1_000_000_000
    /// Samples closer together than this add nothing (a client polling in a loop).
    static let minSpacingNanos: UInt64 = 50_000_000
    /// Less time than this says nothing about the link.
    static let minSpanNanos: UInt64 = 200_000_000

    private struct Sample: Sendable, Equatable { var t: UInt64; var bytes: UInt64 }
    private var samples: [Sample] = []

    /// Records `bytes` (a counter that only grows) at `now`; the bytes/s since the oldest
    /// sample inside the window (or the newest before it), nil over too short a span. A
    /// clock or counter going backwards starts again.
    mutating func rate(now: UInt64, bytes: UInt64) -> Double? {
        if let last = samples.last, now < last.t || bytes < last.bytes { samples.removeAll() }
        if let last = samples.last, now - last.t < Self.minSpacingNanos {
            samples[samples.count - 1].bytes = max(last.bytes, bytes) // the newest counter wins
        } else {
            samples.append(Sample(t: now, bytes: bytes))
        }
        // Keep one sample at or before the window's start as the base.
        while samples.count > 2 && now - samples[1].t >= Self.windowNanos { samples.removeFirst() }
        guard let base = samples.first, now - base.t >= Self.minSpanNanos else { return nil }
        return Double(bytes - base.bytes) / (Double(now - base.t) / 1e9)
    }
}

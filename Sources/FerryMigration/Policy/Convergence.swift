/// When precopy should stop iterating, as a pure policy: fed what each pass sent, how long
/// it took and what the guest dirtied meanwhile, it says whether to go on, stop the guest
/// for the last copy, or switch to postcopy.
///
/// Converged when the rest fits the downtime limit at the measured bandwidth; while each
/// pass still shrinks the rest to at most `worthwhileShrink` of the last and it would take
/// more than `tinyRestMs` (or a sixteenth of the limit, if less), one more pass buys a
/// shorter downtime, up to `maxExtraPasses`: such
/// a pass costs a dirty-log sync (0.1-0.3 ms here) and the guest keeps running meanwhile. With `autoSwitchPasses` > 0, that many passes
/// in a row that did not shrink the best rest so far by a tenth switch to postcopy.
///
/// The rest is costed at what a dirty page cost on the wire in the last pass (`pagesSent`
/// given, from the second pass on: XBZRLE deltas, zero pages), at most a page: with XBZRLE a
/// one-word change costs a few bytes, and the rest would never "fit" at a page each.
///
/// The bandwidth estimate needs at least 256 KiB in a pass, on the wire or, compressed
/// (multifd zstd, XBZRLE), in the pages the pass sent: a near-empty pass says nothing about
/// the link, but a pass of well-compressed pages is all the link will ever see. With
/// `max-bandwidth` set the estimate never exceeds it. A clock that goes
/// backwards counts as no time passed.
struct ConvergencePolicy: Sendable, Equatable {
    enum Verdict: Sendable, Equatable { case anotherPass, stopAndCopy, switchToPostcopy }

    /// What one pass measured, as query-migrate reports it.
    struct PassReport: Sendable, Equatable {
        var remaining: UInt64
        /// nil: no bandwidth known yet (nothing can be expected).
        var expectedDowntimeMs: UInt64?
        var bandwidth: Double
        var dirtyPagesRate: UInt64
        var mbps: Double
        var pagesPerSecond: UInt64
    }

    static let minBytesForEstimate: UInt64 = 256 << 10
    static let maxExtraPasses = 8
    /// A rest this short is not worth another pass. (It was a sixteenth of the limit, 19 ms
    /// at 300: an XBZRLE guest whose rest shrank twentyfold a pass stopped at 9-12 ms of
    /// encoding in the downtime, where QEMU's took 3.)
    static let tinyRestMs: UInt64 = 2
    /// A pass that leaves at most this share of the last rest is worth another. (It was a
    /// half: the unlimited dirtying guest, whose second pass leaves 0.35-0.51 of the first,
    /// stopped in some runs at 0.507 with ~66 k pages, a 90-130 ms downtime, and went on to
    /// 7 ms in the others.)
    static let worthwhileShrink = 2.0 / 3.0

    private var lastSync: UInt64
    private var sentAtSync: UInt64
    private var bandwidth: Double = 0
    private var previousRemaining = UInt64.max
    private var extraPasses = 0
    private var bestRemaining: UInt64
    private var stuckPasses: UInt64 = 0
    private var passes = 0

    init(now: UInt64, sent: UInt64, ramBytes: UInt64) {
        lastSync = now
        sentAtSync = sent
        bestRemaining = ramBytes
    }

    /// A pass ended at `now` with `sent` bytes on the channel so far and `dirtyPages` left.
    /// `autoSwitchPasses` is 0 when postcopy is not possible.
    mutating func passEnded(now: UInt64, sent: UInt64, dirtyPages: UInt64, pageSize: Int,
                            downtimeLimitMs: UInt64, maxBandwidth: UInt64, autoSwitchPasses: UInt64,
                            pagesSent: UInt64? = nil) -> (Verdict, PassReport) {
        let elapsed = now > lastSync ? Double(now - lastSync) / 1e9 : 0
        let bytes = sent > sentAtSync ? sent - sentAtSync : 0
        let pageBytes = (pagesSent ?? 0) * UInt64(pageSize)
        if max(bytes, pageBytes) >= Self.minBytesForEstimate && bytes > 0 && elapsed > 0 { bandwidth = Double(bytes) / elapsed }
        if maxBandwidth > 0 { bandwidth = bandwidth > 0 ? min(bandwidth, Double(maxBandwidth)) : Double(maxBandwidth) }
        passes += 1
        var costPerPage = Double(pageSize)
        if passes > 1, let pagesSent, pagesSent > 0 { costPerPage = min(costPerPage, Double(bytes) / Double(pagesSent)) }
        let remaining = dirtyPages * UInt64(pageSize)
        let wireRemaining = Double(dirtyPages) * costPerPage
        let expected: UInt64? = bandwidth > 0 ? UInt64(min(wireRemaining / bandwidth * 1000, Double(UInt64.max / 2))) : nil
        let report = PassReport(
            remaining: remaining, expectedDowntimeMs: expected, bandwidth: bandwidth,
            dirtyPagesRate: elapsed > 0 ? UInt64(Double(dirtyPages) / elapsed) : 0,
            mbps: elapsed > 0 ? Double(bytes) * 8 / elapsed / 1e6 : 0,
            pagesPerSecond: elapsed > 0 ? UInt64(Double(bytes) / Double(pageSize) / elapsed) : 0)
        lastSync = max(lastSync, now)
        sentAtSync = max(sentAtSync, sent)

        if let expected, expected <= downtimeLimitMs {
            let stillShrinking = Double(remaining) < Double(previousRemaining) * Self.worthwhileShrink
            if !stillShrinking || expected <= max(1, min(downtimeLimitMs / 16, Self.tinyRestMs)) || extraPasses >= Self.maxExtraPasses {
                return (.stopAndCopy, report)
            }
            extraPasses += 1
        }
        previousRemaining = remaining
        if autoSwitchPasses > 0 {
            if Double(remaining) < Double(bestRemaining) * 0.9 { bestRemaining = remaining; stuckPasses = 0 } else { stuckPasses += 1 }
            if stuckPasses >= autoSwitchPasses { return (.switchToPostcopy, report) }
        }
        return (.anotherPass, report)
    }
}

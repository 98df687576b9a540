/// Bandwidth limit over 100 ms windows (QEMU's rate-limit period), as a pure policy: fed
/// the bytes sent so far and the time, it says how long to wait before sending more.
///
/// Each window allows a tenth of the per-second limit. A window overrun (one page can be
/// larger than a whole window's budget at low limits) is carried as debt into the next
/// windows, so the long-run rate is the limit whatever the granularity of the sender;
/// unused budget is not saved up beyond one window, so an idle spell is no licence for a
/// burst. Debt is bounded (`maxDebt`). Postcopy's limiter carries none (`carriesDebt`
/// false): requested pages go whatever the budget, and the background stream gets each
/// window's budget afresh, as before (QEMU's max-postcopy-bandwidth limits the background
/// stream, not the guest's page faults). One answer never asks for
/// more than one window's wait, so a sender that sleeps on it comes back at least every
/// 100 ms (its heartbeat PINGs ride on that). A limit of 0 means unlimited. A clock that
/// goes backwards lends no credit; a limit changed mid-pass applies from the next call.
struct RateLimiter: Sendable, Equatable {
    static let periodNanos: UInt64 = 100_000_000
    /// Most debt carried, in bytes: a window's budget, or 256 KiB at low limits (a few
    /// pages that one window's budget cannot hold).
    static func maxDebt(_ budget: Int64) -> Int64 { max(budget, 256 << 10) }
    /// False: an overrun is forgotten when its window ends (postcopy's background stream).
    private let carriesDebt: Bool
    private var windowStart: UInt64
    private var lastSent: UInt64
    /// Bytes still allowed in the current window; negative: debt from an overrun.
    private var credit: Int64 = 0

    init(now: UInt64, sent: UInt64, carriesDebt: Bool = true) {
        windowStart = now
        lastSent = sent
        self.carriesDebt = carriesDebt
    }

    /// Starts over at `now` (a new pass, a new channel): no debt, one window's budget.
    mutating func reset(now: UInt64, sent: UInt64, bytesPerSecond: UInt64, carriesDebt: Bool = true) {
        self = RateLimiter(now: now, sent: sent, carriesDebt: carriesDebt)
        credit = Self.budget(bytesPerSecond)
    }

    static func budget(_ bytesPerSecond: UInt64) -> Int64 {
        Int64(clamping: max(1, bytesPerSecond / (1_000_000_000 / periodNanos)))
    }

    /// Nanoseconds to wait before sending more (0: go on), given every byte sent so far on
    /// the channel (`sent` only grows; a smaller value counts as nothing new).
    mutating func delay(sent: UInt64, now: UInt64, bytesPerSecond: UInt64) -> UInt64 {
        let fresh = sent > lastSent ? sent - lastSent : 0
        lastSent = max(lastSent, sent)
        guard bytesPerSecond > 0 else { credit = 0; return 0 }
        let budget = Self.budget(bytesPerSecond)
        credit = credit.subtractingReportingOverflow(Int64(clamping: fresh)).overflow ? Int64.min / 2 : credit - Int64(clamping: fresh)
        if now > windowStart {
            let windows = (now - windowStart) / Self.periodNanos
            if windows > 0 {
                windowStart += windows * Self.periodNanos
                let (gain, o) = budget.multipliedReportingOverflow(by: Int64(clamping: windows))
                credit = o || !carriesDebt ? budget : min(budget, credit.addingReportingOverflow(gain).overflow ? budget : credit + gain)
            }
        }
        credit = max(credit, -Self.maxDebt(budget))
        guard credit <= 0 else { return 0 }
        // Until the next window at most; the caller asks again then.
        let wake = windowStart + Self.periodNanos
        return wake > now ? min(wake - now, Self.periodNanos) : Self.periodNanos
    }
}

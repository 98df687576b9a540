/// When the source tries to reconnect after a postcopy pause (capability `auto-recover`), as
/// a pure policy: a first attempt almost at once (a reset link is often back already), then
/// exponential backoff from 50 ms to at most 1 s, until `auto-recover-timeout` after the
/// pause. Past that only the operator's `migrate resume=true` recovers (it is never too
/// late for that). A clock that goes backwards only delays the next attempt.
struct RecoveryBackoff: Sendable, Equatable {
    static let firstAttemptNanos: UInt64 = 10_000_000
    static let initialBackoffNanos: UInt64 = 50_000_000
    static let maxBackoffNanos: UInt64 = 1_000_000_000
    /// How often a paused source with no automatic attempt due looks for an operator's resume.
    static let idleRecheckNanos: UInt64 = 100_000_000

    let pausedAt: UInt64
    let deadline: UInt64
    private(set) var nextAttempt: UInt64
    private var backoff = Self.initialBackoffNanos

    init(pausedAt: UInt64, timeoutMs: UInt64) {
        self.pausedAt = pausedAt
        let (d, o) = pausedAt.addingReportingOverflow(timeoutMs.multipliedReportingOverflow(by: 1_000_000).overflow ? UInt64.max : timeoutMs * 1_000_000)
        deadline = o ? UInt64.max : d
        nextAttempt = pausedAt &+ Self.firstAttemptNanos
    }

    /// What to do at `now`: attempt, or wait this long (and ask again).
    enum Decision: Sendable, Equatable { case attempt, wait(UInt64) }

    func decide(now: UInt64) -> Decision {
        guard now < deadline else { return .wait(Self.idleRecheckNanos) }
        if now >= nextAttempt { return .attempt }
        return .wait(min(nextAttempt - now, Self.idleRecheckNanos))
    }

    /// An attempt that started at or before `now` failed: the next waits longer.
    mutating func attemptFailed(now: UInt64) {
        nextAttempt = now &+ backoff
        backoff = min(backoff * 2, Self.maxBackoffNanos)
    }
}

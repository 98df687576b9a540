/// When to throttle the guest's vCPUs so precopy can converge (`auto-converge`), as QEMU
/// 7.2's `migration_trigger_throttle` decides it, as a pure policy fed at each bitmap sync.
///
/// Over periods of at least a second: when the guest dirtied more than
/// `throttle-trigger-threshold` % of what the link carried in the period, twice, the
/// throttle starts at `cpu-throttle-initial` % or rises by `cpu-throttle-increment` (with
/// `cpu-throttle-tailslow`, by no more than what would bring the dirty rate down to the
/// threshold), never above `max-cpu-throttle`.
struct AutoConvergePolicy: Sendable, Equatable {
    struct Settings: Sendable, Equatable {
        var initial: UInt64 = 20
        var increment: UInt64 = 10
        var tailslow = false
        var maximum: UInt64 = 99
        var triggerThreshold: UInt64 = 50
    }

    static let minPeriodNanos: UInt64 = 1_000_000_000

    private(set) var percentage: UInt64 = 0
    private var highPeriods = 0
    private var periodStart: UInt64
    private var sentAtPeriodStart: UInt64
    private var dirtiedInPeriod: UInt64 = 0

    init(now: UInt64, sent: UInt64) {
        periodStart = now
        sentAtPeriodStart = sent
    }

    /// A bitmap sync at `now` found `newlyDirty` pages (not already to send), with `sent`
    /// bytes on the wire so far. Returns the new throttle percentage when it changes.
    mutating func bitmapSynced(now: UInt64, sent: UInt64, newlyDirty: UInt64, pageSize: Int, settings: Settings) -> UInt64? {
        dirtiedInPeriod += newlyDirty
        guard now >= periodStart && now - periodStart >= Self.minPeriodNanos else { return nil }
        let transferred = sent > sentAtPeriodStart ? sent - sentAtPeriodStart : 0
        let dirtyBytes = dirtiedInPeriod * UInt64(pageSize)
        let threshold = transferred * settings.triggerThreshold / 100
        periodStart = now
        sentAtPeriodStart = sent
        dirtiedInPeriod = 0
        guard dirtyBytes > threshold else { return nil }
        highPeriods += 1
        guard highPeriods >= 2 else { return nil }
        highPeriods = 0
        let next: UInt64
        if percentage == 0 {
            next = settings.initial
        } else {
            var increment = settings.increment
            if settings.tailslow {
                // The share of CPU at which the dirty rate would just meet the threshold.
                let running = 100 - percentage
                let ideal = UInt64(Double(running) * (Double(threshold) / Double(dirtyBytes)))
                increment = min(running - min(ideal, running), settings.increment)
            }
            next = min(percentage + increment, settings.maximum)
        }
        guard next != percentage else { return nil }
        percentage = next
        return next
    }
}

import Logging
/// What both sides' phase enums have in common: a transition function and the QMP status
/// each phase shows.
protocol MigrationPhase: Sendable, Equatable {
    associatedtype Event: Sendable
    /// The next phase, or nil when `event` is not legal here.
    func next(_ event: Event) -> Self?
    var status: MigrationStatus { get }
}

extension MigrationPhase {
    /// One step of the machine, on a phase the caller holds under its lock: the phase
    /// before, and the phase after (nil: `event` was refused and nothing changed).
    static func step(_ phase: inout Self, _ event: Event) -> (before: Self, after: Self?) {
        let before = phase
        guard let next = phase.next(event) else { return (before, nil) }
        phase = next
        return (before, next)
    }

    /// The statuses a client sees when `events` happen from `self` on (nil: one was refused).
    func statuses(after events: [Event]) -> [MigrationStatus]? {
        var p = self
        var seen: [MigrationStatus] = []
        for e in events {
            guard let n = p.next(e) else { return nil }
            if n.status != p.status { seen.append(n.status) }
            p = n
        }
        return seen
    }
}

extension SourcePhase: MigrationPhase {}
extension DestinationPhase: MigrationPhase {}

extension VMHost {
    /// A migration's phase changed from `before` to `after`: a status change is announced
    /// (MIGRATION event, waiters woken). Called outside the migration's lock.
    /// Logged with `side` and, entering a pause or failure, its `cause`.
    func announce(_ before: MigrationStatus, _ after: MigrationStatus, side: String, cause: String? = nil) {
        guard after != before else { return }
        var metadata: Logger.Metadata = ["side": .string(side), "from": .string(before.rawValue), "to": .string(after.rawValue)]
        if let cause { metadata["cause"] = .string(cause) }
        let level: Logger.Level = after == .failed ? .error : after == .postcopyPaused ? .warning : .info
        MigrationLog.logger.log(level: level, "migration \(before.rawValue) → \(after.rawValue)\(cause.map { ": \($0)" } ?? "")", metadata: metadata)
        emit(.status(after))
        statusChanged(after)
    }
}

/// Where an outgoing migration is, as one value: the source's phases, the events that move
/// between them, and the one transition function. `MigrationStatus` (what QMP shows) is
/// derived from the phase, never set on its own.
///
///     setup ─▶ precopy ─▶ stopAndCopy ─────────────────────────────▶ completed
///       │        │  └───▶ postcopySwitchover ─▶ packageSending ─▶ postcopyDevice ─▶ postcopyActive ─▶ completed
///       │        │                                                     │   ▲             │
///       ▼        ▼                                                     ▼   │             ▼
///    cancelling ─▶ cancelled           paused ◀────────────────────────────┴── (any link failure)
///    (setup…packageSending may fail; a split phase only if the destination never ran it)
///                                      paused ─▶ reconnecting ─▶ resuming ─▶ postcopyActive
///
/// Until the package is on its way the guest may still run here again (cancel and failure
/// resume it); from `postcopyDevice` on the destination may run it, and failures pause.
enum SourcePhase: Sendable, Equatable, CaseIterable {
    case none
    case setup
    case precopy
    case cancelling
    /// The guest is stopped for precopy's last pass, the vCPU state and EOF.
    case stopAndCopy
    /// The guest is stopped for postcopy: dirty log, discards, the package is built.
    case postcopySwitchover
    /// The package is being written: cancel is refused from here on, but a failed write
    /// means the destination cannot have it whole, so the guest may still run here.
    case packageSending
    /// The package was sent: the destination may run the guest; waiting for its word.
    case postcopyDevice
    case postcopyActive
    case postcopyPaused
    /// A recovery attempt is connecting (automatic or `migrate resume=true`).
    case postcopyReconnecting
    /// Connected: received bitmap, POSTCOPY_RESUME, RESUME_ACK.
    case postcopyResuming
    case completed
    case failed
    case cancelled

    var status: MigrationStatus {
        switch self {
        case .none: .none
        case .setup: .setup
        case .precopy: .active
        case .cancelling: .cancelling
        case .stopAndCopy, .postcopySwitchover, .packageSending: .device
        case .postcopyDevice: .postcopyDevice
        case .postcopyActive: .postcopyActive
        case .postcopyPaused: .postcopyPaused
        case .postcopyReconnecting: .postcopyRecoverSetup
        case .postcopyResuming: .postcopyRecover
        case .completed: .completed
        case .failed: .failed
        case .cancelled: .cancelled
        }
    }

    /// The guest's state may be split between both hosts: it must never run here again,
    /// the process must not exit, cancel is refused.
    var guestSplit: Bool {
        switch self {
        case .postcopyDevice, .postcopyActive, .postcopyPaused, .postcopyReconnecting, .postcopyResuming: true
        default: false
        }
    }

    var isFinished: Bool { self == .completed || self == .failed || self == .cancelled }
    var isRunning: Bool { !isFinished && self != .none }

    /// `migrate_cancel` is accepted (it may still leave the guest running here).
    var cancellable: Bool { self == .setup || self == .precopy || self == .stopAndCopy || self == .postcopySwitchover }
    /// A page request is legal: the package may have reached the destination whole.
    var servesPageRequests: Bool { self == .packageSending || guestSplit }
    /// `migrate-pause` is accepted.
    var pausable: Bool { self == .postcopyDevice || self == .postcopyActive || self == .postcopyReconnecting || self == .postcopyResuming }
}

/// What moves an outgoing migration from one phase to the next.
enum SourceEvent: Sendable, Equatable {
    case start
    case setupSent
    case cancel
    case converged
    case switchToPostcopy
    case packageWriting
    case packageSent
    case destinationRunning
    /// A link failure, silence, or `migrate-pause` in a postcopy phase.
    case linkLost
    case recoveryAttempt
    case recoveryConnected
    case resumed
    case finished
    /// A failure before the guest could run on the destination: the migration fails
    /// (cancelled, if a cancel was under way) and the guest runs here again.
    case failure
    /// The destination said it never ran the guest (SHUT before its PONG, or in answer to
    /// recovery): the only legal way out of a split phase other than completing; before
    /// the split, the same as `failure`.
    case destinationNeverRan
}

extension SourcePhase {
    /// The one transition function: the next phase, or nil when `event` is not legal here.
    func next(_ event: SourceEvent) -> SourcePhase? {
        switch (self, event) {
        case (.none, .start): .setup
        case (.setup, .setupSent): .precopy
        case (let p, .cancel) where p.cancellable: .cancelling
        case (.precopy, .converged): .stopAndCopy
        case (.precopy, .switchToPostcopy): .postcopySwitchover
        case (.postcopySwitchover, .packageWriting): .packageSending
        case (.packageSending, .packageSent): .postcopyDevice
        case (.postcopyDevice, .destinationRunning): .postcopyActive
        case (let p, .linkLost) where p.guestSplit: .postcopyPaused
        case (.postcopyPaused, .recoveryAttempt): .postcopyReconnecting
        case (.postcopyReconnecting, .recoveryConnected): .postcopyResuming
        case (.postcopyResuming, .resumed): .postcopyActive
        case (.stopAndCopy, .finished), (.postcopyActive, .finished): .completed
        case (.cancelling, .failure), (.cancelling, .finished): .cancelled
        case (.setup, .failure), (.precopy, .failure), (.stopAndCopy, .failure), (.postcopySwitchover, .failure),
             (.packageSending, .failure): .failed
        case (let p, .destinationNeverRan) where p.guestSplit: .failed
        // Before the split the destination's word that it never ran the guest (a postcopy
        // destination that failed in precopy answers SHUT(1)) is an ordinary failure.
        case (let p, .destinationNeverRan): p.next(.failure)
        default: nil
        }
    }
}

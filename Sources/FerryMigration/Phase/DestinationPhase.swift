import FerryWire

/// Where an incoming migration is, as one value: the destination's phases, the one
/// transition function, and the legality table that says which stream items each phase
/// accepts (one table instead of a switch per loader). `MigrationStatus` is derived.
///
///     listening ─▶ loading ─────────────────────────────────────────────▶ completed (precopy EOF)
///                     └─▶ package ─▶ postcopyDevice ─▶ postcopyActive ─▶ completed (postcopy EOF)
///                                                        │    ▲
///                                                        ▼    │
///                                     postcopyPaused ─▶ postcopyResuming
///     listening … postcopyDevice may fail (the guest never ran here); later phases never do.
enum DestinationPhase: Sendable, Equatable, CaseIterable {
    case none
    case listening
    /// The source's stream: precopy RAM, device state, commands.
    case loading
    /// Inside the postcopy package, before LISTEN.
    case package
    /// Userfaultfd is armed; the package's device state and RUN follow.
    case postcopyDevice
    /// The guest runs here; missing pages are asked for.
    case postcopyActive
    case postcopyPaused
    /// A recovery channel is connected: RECV_BITMAP, POSTCOPY_RESUME.
    case postcopyResuming
    case completed
    case failed

    var status: MigrationStatus {
        switch self {
        case .none: .none
        case .listening: .setup
        case .loading, .package: .active
        case .postcopyDevice: .postcopyDevice
        case .postcopyActive: .postcopyActive
        case .postcopyPaused: .postcopyPaused
        case .postcopyResuming: .postcopyRecover
        case .completed: .completed
        case .failed: .failed
        }
    }

    /// Userfaultfd watches guest RAM (faults are caught, the fault thread runs).
    var faultsCaught: Bool {
        switch self {
        case .postcopyDevice, .postcopyActive, .postcopyPaused, .postcopyResuming: true
        default: false
        }
    }

    /// The guest runs here while some of its pages are still only on the source.
    var guestSplit: Bool { self == .postcopyActive || self == .postcopyPaused || self == .postcopyResuming }

    /// The fault thread may send page requests (a return path is up and the source serves).
    var requestsFlow: Bool { self == .postcopyActive }

    /// `migrate-pause` is accepted.
    var pausable: Bool { self == .postcopyActive || self == .postcopyResuming }

    var isFinished: Bool { self == .completed || self == .failed }
    var isRunning: Bool { !isFinished && self != .none }
}

enum DestinationEvent: Sendable, Equatable {
    case start, sourceConnected, packageOpened, listen, run, linkLost, recoveryConnected, resumed, finished, failure
}

extension DestinationPhase {
    /// The one transition function: the next phase, or nil when `event` is not legal here.
    func next(_ event: DestinationEvent) -> DestinationPhase? {
        switch (self, event) {
        case (.none, .start): .listening
        case (.listening, .sourceConnected): .loading
        case (.loading, .packageOpened): .package
        case (.package, .listen): .postcopyDevice
        case (.postcopyDevice, .run): .postcopyActive
        case (.postcopyActive, .linkLost), (.postcopyResuming, .linkLost): .postcopyPaused
        case (.postcopyPaused, .recoveryConnected): .postcopyResuming
        case (.postcopyResuming, .resumed): .postcopyActive
        case (.loading, .finished), (.postcopyActive, .finished): .completed
        case (.none, .failure), (.listening, .failure), (.loading, .failure), (.package, .failure), (.postcopyDevice, .failure): .failed
        default: nil
        }
    }
}

/// The kinds of item a migration stream carries, as the legality table sees them.
enum StreamItemKind: String, Sendable, CaseIterable {
    case configuration, ramSetup = "RAM setup", ramPages = "RAM pages", deviceState = "device state"
    case openReturnPath = "OPEN_RETURN_PATH", ping = "PING", postcopyAdvise = "POSTCOPY_ADVISE"
    case ramDiscard = "POSTCOPY_RAM_DISCARD", packaged = "PACKAGED", switchoverStart = "SWITCHOVER_START"
    case listen = "POSTCOPY_LISTEN", run = "POSTCOPY_RUN", recvBitmap = "RECV_BITMAP"
    case postcopyResume = "POSTCOPY_RESUME", eof = "EOF"

    init(_ item: StreamItem) {
        switch item {
        case .configuration: self = .configuration
        case .section(let h) where h.name == Wire.ramSectionName: self = h.type == .start ? .ramSetup : .ramPages
        case .section: self = .deviceState
        case .eof: self = .eof
        case .command(let c):
            switch c {
            case .openReturnPath: self = .openReturnPath
            case .ping: self = .ping
            case .postcopyAdvise: self = .postcopyAdvise
            case .ramDiscard: self = .ramDiscard
            case .packaged: self = .packaged
            case .switchoverStart: self = .switchoverStart
            case .postcopyListen: self = .listen
            case .postcopyRun: self = .run
            case .recvBitmap: self = .recvBitmap
            case .postcopyResume: self = .postcopyResume
            }
        }
    }
}

extension DestinationPhase {
    /// The legality table: which stream items this phase accepts.
    var acceptedItems: Set<StreamItemKind> {
        switch self {
        case .loading: [.configuration, .ramSetup, .ramPages, .deviceState, .openReturnPath, .ping, .postcopyAdvise, .ramDiscard, .packaged, .switchoverStart, .eof]
        case .package: [.listen, .ping, .deviceState]
        case .postcopyDevice: [.ping, .deviceState, .run]
        case .postcopyActive: [.ramPages, .ping, .eof]
        case .postcopyResuming: [.recvBitmap, .postcopyResume, .ping]
        case .none, .listening, .postcopyPaused, .completed, .failed: []
        }
    }

    /// Throws the protocol error for an item this phase does not accept.
    func check(_ item: StreamItem) throws {
        let kind = StreamItemKind(item)
        guard acceptedItems.contains(kind) else {
            throw MigrationError(.protocolError, "\(kind.rawValue) is not valid \(phrase)")
        }
    }

    private var phrase: String {
        switch self {
        case .loading: "in a precopy stream"
        case .package: "in the postcopy package before POSTCOPY_LISTEN"
        case .postcopyDevice: "in the postcopy package"
        case .postcopyActive: "during postcopy"
        case .postcopyResuming: "during postcopy-recover"
        default: "in state \(status.rawValue)"
        }
    }
}

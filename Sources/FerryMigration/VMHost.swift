import FerryKVM
import FerryMachine
import FerryMemory
import FerrySys
import FerryTLS
import FerryWire

/// QEMU's run states as `query-status` reports them.
public enum RunState: String, Sendable {
    case running, paused, inmigrate, postmigrate, finishMigrate = "finish-migrate", shutdown,
         internalError = "internal-error", prelaunch
}

/// One VM process's control centre: the machine, its run state, migration capabilities and
/// parameters, and the current outgoing or incoming migration. QMP drives it; the engines
/// report through it. Takes exclusive charge of the machine while a migration runs.
///
/// Ownership: `machine` is immutable; every other mutable field is guarded by `lock`
/// (taken before a migration's own lock, never after it).
public final class VMHost: @unchecked Sendable {
    public let machine: Machine
    let lock = Monitor()
    private var _runState: RunState
    private var _capabilities: Set<MigrationCapability> = []
    private var _parameters = MigrationParameters()
    private var outgoing: OutgoingMigration?
    private var incoming: IncomingMigration?
    private var subscribers: [@Sendable (MigrationEvent) -> Void] = []
    /// QOM-style objects by id: the TLS credentials `tls-creds` may name.
    private var tlsObjects: [String: TLSCredentials] = [:]
    /// A `stop` that could not park the vCPU yet (it waits in the kernel for a postcopy
    /// page): the state turns `paused` and STOP is sent when it parks; `cont` cancels it.
    private var stopPending = false
    /// The incoming migration took its capabilities (its stream arrived): from here on they
    /// can no longer change.
    private var incomingCapabilitiesTaken = false
    /// The current migration's finished status once its MIGRATION event went out (nil before):
    /// a waiter returns only then, so what it saw in `query-migrate` its subscribers saw too.
    private var announcedFinish: MigrationStatus?

    /// Called (on a migration thread) when the incoming migration failed and this process
    /// has nothing left to do: no guest, and no source that still needs an answer from it.
    public var onIncomingFailure: (@Sendable (String) -> Void)? {
        get { lock.withLock { _onIncomingFailure } }
        set { lock.withLock { _onIncomingFailure = newValue } }
    }
    private var _onIncomingFailure: (@Sendable (String) -> Void)?

    func incomingFailed(_ why: String) { onIncomingFailure?(why) }

    /// Test hook: called on the outgoing migration's main thread at points of its
    /// switch-over (a test acts in a window no timing can hit).
    var switchoverHook: (@Sendable (SwitchoverPoint) -> Void)? {
        get { lock.withLock { _switchoverHook } }
        set { lock.withLock { _switchoverHook = newValue } }
    }
    private var _switchoverHook: (@Sendable (SwitchoverPoint) -> Void)?

    /// `incoming`: the VM waits for a migration stream instead of booting a guest.
    public init(machine: Machine, incoming: Bool) {
        self.machine = machine
        _runState = incoming ? .inmigrate : .prelaunch
        machine.onGuestStop = { [weak self] state, _ in
            self?.setRunState(state == .shutdown ? .shutdown : .internalError)
        }
    }

    public func subscribe(_ body: @escaping @Sendable (MigrationEvent) -> Void) {
        lock.withLock { subscribers.append(body) }
    }

    func emit(_ e: MigrationEvent) {
        let subs = lock.withLock { subscribers }
        for s in subs { s(e) }
    }

    public var runState: RunState { lock.withLock { _runState } }
    func setRunState(_ s: RunState) { lock.withLock { _runState = s } }

    public var capabilities: Set<MigrationCapability> { lock.withLock { _capabilities } }
    public var parameters: MigrationParameters { lock.withLock { _parameters } }

    public var migrationRunning: Bool {
        lock.withLock { (outgoing?.status.isRunning ?? false) || (incoming?.status.isRunning ?? false) }
    }

    /// Capabilities may change while no migration runs, and on a destination that is only
    /// listening (its stream has not arrived yet), as in QEMU.
    public func setCapabilities(_ caps: [(MigrationCapability, Bool)]) throws {
        for (c, on) in caps where on && c.isUnsupported {
            throw MigrationError(.unsupported, "capability '\(c.rawValue)' is not supported by Ferry")
        }
        try lock.withLock {
            if outgoing?.status.isRunning ?? false { throw MigrationError(.state, "There's a migration process in progress") }
            if let i = incoming, i.status.isRunning, incomingCapabilitiesTaken {
                throw MigrationError(.state, "There's a migration process in progress (incoming \(i.status.rawValue)): capabilities are fixed once the stream arrived")
            }
            var next = _capabilities
            for (c, on) in caps { if on { next.insert(c) } else { next.remove(c) } }
            if next.contains(.postcopyPreempt) && !next.contains(.postcopyRAM) {
                throw MigrationError(.config, "Postcopy preempt requires postcopy-ram")
            }
            _capabilities = next
        }
    }

    /// The incoming migration's capabilities, taken once when its stream arrives.
    func takeIncomingCapabilities() -> Set<MigrationCapability> {
        lock.withLock { incomingCapabilitiesTaken = true; return _capabilities }
    }

    /// Applies new parameters; bandwidth changes take effect immediately in a running migration.
    public func setParameters(_ update: (inout MigrationParameters) throws -> Void) rethrows {
        let p: MigrationParameters = try lock.withLock {
            var p = _parameters
            try update(&p)
            _parameters = p
            return p
        }
        lock.withLock { outgoing }?.updateParameters(p)
    }

    // MARK: TLS credentials (QMP object-add / object-del)

    public func addObject(_ creds: TLSCredentials) throws {
        try lock.withLock {
            guard tlsObjects[creds.id] == nil else { throw MigrationError(.config, "attempt to add duplicate property '\(creds.id)' to object (type 'container')") }
            tlsObjects[creds.id] = creds
        }
    }

    public func deleteObject(id: String) throws {
        let inUse = migrationRunning && parameters.tlsCreds == id
        try lock.withLock {
            guard tlsObjects[id] != nil else { throw MigrationError(.config, "object '\(id)' not found") }
            guard !inUse else { throw MigrationError(.state, "object '\(id)' is in use by the running migration, can not be deleted") }
            tlsObjects[id] = nil
        }
    }

    public var objects: [TLSCredentials] { lock.withLock { Array(tlsObjects.values) } }

    /// The TLS a new migration uses, from `tls-creds` / `tls-hostname`; nil without TLS.
    func channelSecurity(_ endpoint: TLSEndpoint) throws -> ChannelSecurity? {
        let p = parameters
        guard !p.tlsCreds.isEmpty else { return nil }
        guard let c = lock.withLock({ tlsObjects[p.tlsCreds] }) else {
            throw MigrationError(.config, "No TLS credentials with id '\(p.tlsCreds)'")
        }
        guard c.endpoint == endpoint else {
            throw MigrationError(.config, "Expecting TLS credentials with a \(endpoint.rawValue) endpoint (object '\(c.id)' has endpoint=\(c.endpoint.rawValue))")
        }
        return ChannelSecurity(credentials: c, hostname: p.tlsHostname.isEmpty ? nil : p.tlsHostname)
    }

    // MARK: run control

    /// Starts the guest the first time (prelaunch) or resumes it after `stop`. A guest that
    /// migrated away (the outgoing migration completed) is not resumed here unless `force`:
    /// it runs on the destination, and running it here too would run one guest on two
    /// hosts. While postcopy splits its state, not even `force` resumes it.
    public func cont(force: Bool = false) throws {
        if lock.withLock({ defer { stopPending = false }; return stopPending }) {
            machine.resume() // cancels the stop still waiting for the vCPU
        }
        switch runState {
        case .inmigrate: throw MigrationError(.state, "the guest is waiting for an incoming migration")
        case .shutdown, .internalError: throw MigrationError(.state, "the guest cannot run: \(runState.rawValue) (\(machine.lastError ?? ""))")
        case .finishMigrate: throw MigrationError(.state, "a migration is switching over")
        case .running: return
        case .prelaunch:
            try machine.start()
        case .paused, .postmigrate:
            let (handedOver, completed) = lock.withLock { (outgoing?.guestHandedOver ?? false, outgoing?.status == .completed) }
            if handedOver && !completed {
                throw MigrationError(.state, "the guest runs on the destination after postcopy; resuming it here would split it in two")
            }
            if completed && !force {
                throw MigrationError(.state, "the guest migrated to the destination (migration completed); running it here too would run it on two hosts. Use cont with x-force=true if the destination's copy is gone")
            }
            machine.resume()
        }
        setRunState(.running)
        emit(.resume)
    }

    /// What `stop` achieved.
    public enum StopOutcome: Sendable { case stopped, alreadyStopped, pending }

    /// Stops the guest. A vCPU blocked in the kernel on a missing postcopy page cannot park
    /// until the page arrives: then the stop stays pending (the state says `running`, which
    /// is true) and completes by itself, with its STOP event, when the vCPU parks.
    @discardableResult
    public func stop() -> StopOutcome {
        guard runState == .running else { return .alreadyStopped }
        // A signal makes KVM retry a userfaultfd fault in a busy loop until the page arrives:
        // while postcopy is paused (no page may come for a long time) a vCPU waiting on a
        // page is not kicked; the others are (a halted vCPU leaves the kernel only then).
        // While pages flow, the kick parks each as soon as its page is in.
        let stalled: @Sendable () -> Set<Int> = { [weak self] in
            guard let self else { return [] }
            return self.lock.withLock {
                guard let i = self.incoming, i.status == .postcopyPaused || i.status == .postcopyRecover else { return [] }
                return i.faults.waitingVCPUs
            }
        }
        let waiting = stalled()
        if machine.pause(timeoutNanos: 500_000_000, kick: { !waiting.contains($0) }) {
            setRunState(.paused)
            emit(.stop)
            return .stopped
        }
        let first: Bool = lock.withLock { defer { stopPending = true }; return !stopPending }
        if first {
            do {
                try KernelThread.detached(name: "vm/stop") { [weak self, machine] in
                    // A vCPU whose page arrived runs on, or sleeps halted in the kernel: kick
                    // it once it no longer waits on a page.
                    var parked = false
                    while !parked {
                        parked = machine.waitUntilParked(timeoutNanos: 20_000_000)
                        if parked || !machine.pauseRequested { break }
                        let w = stalled()
                        machine.kickUnparked { !w.contains($0) }
                    }
                    guard let self else { return }
                    let still: Bool = self.lock.withLock { defer { self.stopPending = false }; return self.stopPending }
                    guard parked, still, self.runState == .running else { return }
                    self.setRunState(.paused)
                    self.emit(.stop)
                }
            } catch {
                lock.withLock { stopPending = false }
                machine.resume()
            }
        }
        return .pending
    }

    /// Why this process must not exit now, or nil: while postcopy splits the guest's state
    /// between the two hosts, exiting either side loses the guest.
    public var exitRefusal: String? {
        let (o, i) = lock.withLock { (outgoing, incoming) }
        if let o, o.guestHandedOver, o.status.isPostcopy {
            return "a postcopy migration is in progress (\(o.status.rawValue)): the destination runs the guest but still needs pages only this process has; exiting now loses the guest"
        }
        if let i, i.status.isPostcopy {
            return "a postcopy migration is in progress (\(i.status.rawValue)): the guest runs here but pages it still needs are only on the source; exiting now loses the guest"
        }
        return nil
    }

    /// Boots the built-in test guest (its pages holding `contents`) or a boot sector and runs it.
    public func boot(image: [UInt8]?, contents: TestGuestContents = .zero) throws {
        if let image { try machine.loadBootSector(image) } else { try machine.loadTestGuest(contents: contents) }
        try cont()
    }

    // MARK: migration

    public func migrate(uri text: String, resume: Bool = false) throws {
        let uri = try MigrationURI(text)
        if resume {
            guard uri.isBidirectional else { throw MigrationError(.badURI, "postcopy recovery needs a tcp: or unix: URI") }
            guard let o = lock.withLock({ outgoing }) else { throw MigrationError(.state, "Cannot resume if there is no paused migration") }
            try o.resume(uri)
            return
        }
        let tls = try channelSecurity(.client)
        if tls != nil && !uri.isBidirectional { throw MigrationError(.config, "TLS needs a tcp: or unix: migration address, not \(uri)") }
        let m: OutgoingMigration = try lock.withLock {
            // A VM that arrived by migration may leave again once its incoming migration completed.
            if let i = incoming, i.status != .completed { throw MigrationError(.state, "this VM is a migration destination (incoming \(i.status.rawValue))") }
            if let o = outgoing, o.status.isRunning { throw MigrationError(.state, "There's a migration process in progress") }
            guard _runState == .running || _runState == .paused else {
                throw MigrationError(.state, "cannot migrate a VM in state \(_runState.rawValue)")
            }
            let m = OutgoingMigration(host: self, uri: uri, parameters: _parameters, capabilities: _capabilities, tls: tls)
            outgoing = m
            announcedFinish = nil
            return m
        }
        // Outside the lock: starting emits events, whose subscribers take it.
        try m.start()
    }

    public func migrateIncoming(uri text: String) throws {
        let uri = try MigrationURI(text)
        let tls = try channelSecurity(.server)
        let m: IncomingMigration = try lock.withLock {
            guard _runState == .inmigrate else { throw MigrationError(.state, "'-incoming' was not specified on the command line") }
            if incoming != nil { throw MigrationError(.state, "The incoming migration has already been started") }
            let m = try IncomingMigration(host: self, uri: uri, capabilities: _capabilities, tls: tls?.credentials)
            incoming = m
            announcedFinish = nil
            return m
        }
        m.start()
    }

    /// QMP migrate-start-postcopy.
    public func startPostcopy() throws {
        guard let o = lock.withLock({ outgoing }) else { throw MigrationError(.state, "Postcopy must be started after migration has been started") }
        try o.startPostcopy()
    }

    /// QMP `migrate-pause`, on either side: force postcopy-paused.
    public func migratePause() throws {
        let (o, i) = lock.withLock { (outgoing, incoming) }
        if let o, o.status.isRunning { try o.pause(); return }
        if let i, i.status.isRunning { try i.pause(); return }
        throw MigrationError(.state, "migrate-pause is currently only supported during postcopy-active or postcopy-recover state")
    }

    /// QMP `migrate-recover` (destination): listen on `uri` for the source's recovery channel.
    public func migrateRecover(uri text: String) throws {
        let uri = try MigrationURI(text)
        guard uri.isBidirectional else { throw MigrationError(.badURI, "postcopy recovery needs a tcp: or unix: URI") }
        guard let i = lock.withLock({ incoming }) else { throw MigrationError(.state, "Migrate recover can only be run when postcopy is paused.") }
        try i.recover(uri)
    }

    /// Before the process exits: a destination still in postcopy lets go of the guest's
    /// missing pages (they become zero pages), so the vCPU can stop.
    public func prepareForExit() {
        let (o, i) = lock.withLock { (outgoing, incoming) }
        i?.releaseGuestMemory()
        // A precopy still running is cancelled, so an exec: command does not outlive us.
        if let o, o.status.isRunning, (try? o.cancel()) != nil { _ = waitForMigration(seconds: 2) }
    }

    public func cancel() throws {
        let o = lock.withLock { outgoing }
        if let o { try o.cancel() }
    }

    /// The current (or last) migration's numbers; status `none` if there was none.
    public func queryMigrate() -> MigrationStats {
        let (o, i) = lock.withLock { (outgoing, incoming) }
        if let o { return o.stats }
        if let i { return i.stats }
        return MigrationStats()
    }

    /// Blocks until the current migration reaches a finished state or `seconds` pass.
    public func waitForMigration(seconds: Double) -> MigrationStatus {
        let deadline = Sys.monotonicNanos() + UInt64(seconds * 1e9)
        while Sys.monotonicNanos() < deadline {
            let s = queryMigrate().status
            if s.isFinished && lock.withLock({ announcedFinish }) == s { return s }
            lock.withLock { _ = lock.wait(timeoutNanos: 20_000_000) }
        }
        return queryMigrate().status
    }

    /// Wakes the waiters after a status change was announced (`after`).
    func statusChanged(_ after: MigrationStatus) {
        lock.withLock {
            if after.isFinished { announcedFinish = after }
            lock.broadcast()
        }
    }
}

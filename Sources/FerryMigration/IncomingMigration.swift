import CFerry
import FerryKVM
import FerryMachine
import FerryMemory
import FerrySys
import FerryTLS
import FerryWire
import Glibc

/// The destination side: accepts the channel, loads the stream into guest RAM through the
/// validating decoder, restores the vCPU at EOF and starts the guest. A bad stream fails
/// the migration with the decoder's error; the guest here never runs from a partial load.
final class IncomingMigration: @unchecked Sendable {
    let host: VMHost
    let uri: MigrationURI
    /// Capabilities may change until the source's stream arrives (QEMU allows setting them
    /// on a listening destination); then they are taken from the host once. Guarded by `lock`.
    private var _capabilities: Set<MigrationCapability>
    var capabilities: Set<MigrationCapability> { lock.withLock { _capabilities } }
    let machine: Machine
    let listener: MigrationListener
    let layout: RAMLayout
    /// Server credentials every accepted channel must complete a handshake with, or nil.
    let tls: TLSCredentials?

    private let lock = Monitor()
    /// Serialises return-path writers (main, fault and preempt threads), apart from `lock`
    /// so that a send blocked on a dead link never blocks query-migrate.
    private let rpLock = Monitor()
    private var _stats = MigrationStats()
    private var channel: MigrationChannel?
    /// Write side of the return path, once the source opened it.
    private var returnPath: MigrationChannel?
    private var rpBuffer = WireBuffer(capacity: 64)

    // postcopy
    /// Pages present here (precopy writes, postcopy installs): the recovery contract.
    let received: PageBitmap
    /// Pages asked of the source and not yet installed.
    let requested: PageBitmap
    private var postcopyAdvised = false
    private var uffd: Userfaultfd?
    private var faultThread: KernelThread?
    private var faultStop: Int32 = -1
    private var lastRequestedBlock: String?
    private let pageBuffer = UnsafeMutableRawPointer.allocate(byteCount: 8192, alignment: 4096) // main + preempt bounce pages
    /// The fault thread may send page requests (false while paused and until RESUME).
    private var requestsEnabled = false
    let faults = PostcopyFaultTracker()
    private var vcpuTID: UInt32 = 0
    // postcopy-preempt: the urgent-page channel and its reader
    private var preempt: MigrationChannel?
    private var preemptThread: KernelThread?
    // recovery
    private var recoveryListener: MigrationListener?
    /// The package's RUN started the guest here.
    private var guestStarted = false
    private var pauseRequested = false
    /// `migrate-recover` was given and no recovery attempt has failed since (QEMU's
    /// postcopy_recover_triggered): a second one is refused instead of replacing the first.
    private var recoverTriggered = false
    /// Userfaultfd is armed (LISTEN seen). Guarded by `lock` (readers: QMP threads).
    private var postcopyListening = false

    init(host: VMHost, uri: MigrationURI, capabilities: Set<MigrationCapability>, tls: TLSCredentials?) throws {
        self.host = host
        self.uri = uri
        self._capabilities = capabilities
        self.tls = tls
        self.machine = host.machine
        self.listener = try MigrationListener(uri, tls: tls)
        self.layout = RAMLayout(blocks: host.machine.memory.blocks.map { .init(name: $0.name, length: UInt64($0.length)) })
        self.received = PageBitmap(bitCount: host.machine.ram.pageCount)
        self.requested = PageBitmap(bitCount: host.machine.ram.pageCount)
        _stats.socketAddress = listener.boundURI
    }

    var stats: MigrationStats {
        var s: MigrationStats = lock.withLock {
            var s = _stats
            if let ch = channel { s.transferred = ch.bytesRead }
            return s
        }
        let (listening, caps) = lock.withLock { (postcopyListening, _capabilities) }
        if listening && caps.contains(.postcopyBlocktime) { s.faults = faults.report() }
        return s
    }

    /// The fault report with every latency sample (benchmarks).
    public func faultReport() -> PostcopyFaultReport { faults.report(samples: true) }
    var status: MigrationStatus { lock.withLock { _stats.status } }

    private func setStatus(_ s: MigrationStatus) {
        lock.withLock { _stats.status = s }
        host.emit(.status(s))
        host.statusChanged()
    }

    func start() {
        lock.withLock { _stats.startNanos = Sys.monotonicNanos() }
        setStatus(.setup)
        do {
            // Nobody waits for it: the status and events say when it is done.
            try KernelThread.detached(name: "mig/dst/main") { [self] in self.run() }
        } catch {
            fail(error)
        }
    }

    private func fail(_ error: any Error) {
        lock.withLock {
            _stats.errorDescription = "\(error)"
            _stats.endNanos = Sys.monotonicNanos()
        }
        // The reason first (Ferry's own message; a source that does not know it fails the
        // same way on the SHUT), so the source reports why, not the broken pipe that follows.
        sendReturnPath { $0.rpError("\(error)"); $0.rpShut(1) }
        setStatus(.failed)
    }

    /// Writes one return-path message; a failed write is noticed by the main thread's read.
    private func sendReturnPath(_ body: (inout WireBuffer) -> Void) {
        rpLock.withLock {
            guard let rp = lock.withLock({ returnPath }) else { return }
            rpBuffer.removeAll()
            body(&rpBuffer)
            try? rp.write(rpBuffer)
            try? rp.flush()
        }
    }

    /// Heartbeat (the source pings every 250 ms) and keep-alive on a socket channel.
    private func configure(_ ch: MigrationChannel) {
        if let s = ch.tls { lock.withLock { _stats.tls = "\(s.version) \(s.cipher)" } }
        let t = Int32(clamping: host.parameters.heartbeatTimeout)
        guard ch.isSocket, t > 0 else { return }
        ch.setLiveness(timeoutMs: t)
        ch.readTimeoutMs = t
    }

    private func run() {
        do {
            let ch = try acceptSource()
            // From here on the stream decides: capabilities set over QMP until now apply.
            let caps = host.takeIncomingCapabilities()
            lock.withLock { _capabilities = caps }
            // Postcopy keeps listening: the urgent channel and automatic recovery come here.
            if !caps.contains(.postcopyRAM) { listener.close() }
            configure(ch)
            lock.withLock { channel = ch }
            setStatus(.active)
            switch try load(ch) {
            case .precopy(let cpu):
                try machine.vcpu.restoreState(cpu)
                try machine.start()
                host.setRunState(.running)
                host.emit(.resume)
                lock.withLock { _stats.endNanos = Sys.monotonicNanos() }
                sendReturnPath { $0.rpShut(0) }
                setStatus(.completed)
                ch.close()
                listener.close()
            case .postcopy(let decoder):
                postcopyMain(decoder, ch)
            }
        } catch {
            // Postcopy was coming but this guest never ran: the source still has the only
            // copy. Keep answering on the address with SHUT(1), so a source that tries to
            // recover learns that and runs its guest again instead of waiting forever.
            let refuse = postcopyAdvised && !guestStarted && capabilities.contains(.postcopyRAM)
            fail(error)
            lock.withLock { channel }?.close()
            finishPostcopy()
            if refuse { refuseRecovery() } else {
                listener.close()
                host.incomingFailed("\(error)")
            }
        }
    }

    /// How long a connection may stay silent before it counts as a stray one.
    static let headerTimeoutNanos: UInt64 = 10_000_000_000

    /// The source's main channel. A connection that never sends a migration header (a port
    /// scan, a health check, a client that connects and closes) is dropped and the listener
    /// kept, so the real source still finds it; the last one dropped is reported in
    /// query-migrate's error. A connection that starts a migration stream (or, with TLS, a
    /// TLS handshake or a plain stream) is the source: its errors fail the migration.
    private func acceptSource() throws -> MigrationChannel {
        guard listener.isSocket else { return try listener.accept() }
        var candidates: [(channel: MigrationChannel, deadline: UInt64)] = []
        defer { for c in candidates { c.channel.close() } }
        func drop(_ i: Int, _ why: String) {
            let c = candidates.remove(at: i)
            lock.withLock { _stats.errorDescription = "ignored a connection on \(listener.boundURI) (\(c.channel.peerDescription)): \(why)" }
            c.channel.close()
        }
        while true {
            var fds = [pollfd(fd: listener.fd, events: Int16(POLLIN), revents: 0)]
            fds += candidates.map { pollfd(fd: $0.channel.fd, events: Int16(POLLIN), revents: 0) }
            if poll(&fds, nfds_t(fds.count), 100) < 0 && errno != EINTR {
                throw MigrationError(.io, "poll on \(listener.boundURI) failed", cause: SysError(errno: errno, call: "poll"))
            }
            if listener.isClosed { throw MigrationError(.cancelled, "listening on \(uri) was cancelled") }
            let now = Sys.monotonicNanos()
            // Newest first, so removing by index keeps the earlier indices valid.
            for i in candidates.indices.reversed() {
                let ch = candidates[i].channel
                if fds[i + 1].revents == 0 {
                    if now > candidates[i].deadline { drop(i, "sent nothing for \(Self.headerTimeoutNanos / 1_000_000_000) s") }
                    continue
                }
                switch ch.peekStreamStart(tls: tls != nil) {
                case .incomplete:
                    if now > candidates[i].deadline { drop(i, "sent an incomplete header") }
                case .stray(let why):
                    drop(i, why)
                case .source:
                    candidates.remove(at: i)
                    try listener.secure(ch) // with TLS: the handshake; its failure fails the migration
                    return ch
                }
            }
            if fds[0].revents & Int16(POLLIN) != 0 {
                candidates.append((try listener.acceptRaw(), now + Self.headerTimeoutNanos))
            }
            // A candidate with a partial header stays readable: do not spin on it.
            if !candidates.isEmpty && fds.dropFirst().contains(where: { $0.revents != 0 }) { usleep(1_000) }
        }
    }

    private func refuseRecovery() {
        let l = listener
        try? KernelThread.detached(name: "mig/dst/refuse") {
            while true {
                let ch: MigrationChannel
                do { ch = try l.accept() } catch let e as MigrationError where e.code == .tls { continue } catch { return }
                var b = WireBuffer(capacity: 8)
                b.rpShut(1)
                try? ch.write(b)
                try? ch.flush()
                _ = ch.waitReadable(timeoutMs: 1000) // let the source read it before the close
                ch.close()
            }
        }
    }

    private enum LoadResult { case precopy(VCPUState), postcopy(StreamDecoder) }

    /// Loads a stream up to its end (precopy: the vCPU state found at EOF) or up to the
    /// postcopy RUN (the guest runs here from then on; the decoder carries on).
    private func load(_ ch: MigrationChannel) throws -> LoadResult {
        let decoder = StreamDecoder(source: ch, layout: layout)
        try decoder.readFileHeader()
        var cpu: VCPUState?
        var sawRAMSetup = false
        while true {
            switch try decoder.nextItem() {
            case .configuration(let machineType):
                guard machineType == Wire.machineType else {
                    throw WireError(.badMachine, "source machine type \"\(machineType)\" differs from ours (\"\(Wire.machineType)\")")
                }
            case .section(let h) where h.name == Wire.ramSectionName:
                if h.type == .start { sawRAMSetup = true }
                guard sawRAMSetup else { throw WireError(.badSectionID, "RAM pages before the RAM setup section") }
                try loadRAM(decoder, ch)
                try decoder.readFooter(expecting: h.id)
            case .section(let h):
                // validated by the decoder: the vCPU device section
                let blob = try decoder.readDeviceBlob()
                cpu = try VCPUState(decoding: blob)
                try decoder.readFooter(expecting: h.id)
            case .command(.packaged(let length)):
                guard postcopyAdvised else { throw MigrationError(.protocolError, "PACKAGED without POSTCOPY_ADVISE") }
                guard length <= 16_777_216 else { throw WireError(.badLength, "postcopy package of \(length) bytes") }
                try loadPackage(try ch.bytes(Int(length)))
                return .postcopy(decoder)
            case .command(let c):
                try handleCommand(c, ch)
            case .eof:
                guard let cpu else { throw WireError(.truncated, "the stream ended without the vCPU state") }
                return .precopy(cpu)
            }
        }
    }

    private func handleCommand(_ c: Command, _ ch: MigrationChannel) throws {
        switch c {
        case .openReturnPath:
            guard ch.isSocket else { throw MigrationError(.protocolError, "return path requested on a one-way channel") }
            lock.withLock { if returnPath == nil { returnPath = ch } }
        case .ping(let v):
            guard lock.withLock({ returnPath }) != nil else { throw MigrationError(.protocolError, "PING without a return path") }
            sendReturnPath { $0.rpPong(v) }
        case .switchoverStart:
            break
        case let .postcopyAdvise(summary, target):
            guard capabilities.contains(.postcopyRAM) else {
                throw MigrationError(.config, "the source wants postcopy but capability postcopy-ram is off on the destination")
            }
            guard summary == 4096, target == 4096 else {
                throw MigrationError(.protocolError, "postcopy page sizes \(summary)/\(target) differ from ours (4096)")
            }
            postcopyAdvised = true
        case let .ramDiscard(b, ranges):
            guard postcopyAdvised, uffd == nil else { throw MigrationError(.protocolError, "RAM_DISCARD outside the postcopy switchover") }
            let block = machine.memory.blocks[b]
            for r in ranges {
                // Stale pages go back to "missing", so the guest faults and asks for the new copy.
                let start = Int(r.lowerBound), count = Int(r.upperBound - r.lowerBound)
                madvise(block.host + start, count, MADV_DONTNEED)
                for p in (start >> 12)..<((start + count) >> 12) { received.clear(p) }
            }
        default:
            throw MigrationError(.protocolError, "command \(c) is not valid in a precopy stream")
        }
    }

    private func loadRAM(_ decoder: StreamDecoder, _ ch: MigrationChannel) throws {
        let blocks = machine.memory.blocks
        while true {
            switch try decoder.nextRAMRecord() {
            case .eos: return
            case .memSize: continue // validated against our layout by the decoder
            case let .page(b, offset):
                // Straight into guest RAM; the decoder checked the offset is inside the block.
                try ch.readExactly(UnsafeMutableRawBufferPointer(start: blocks[b].host + Int(offset), count: Wire.pageSize))
                received.set(Int(offset >> 12))
            case let .zero(b, offset):
                let p = blocks[b].host + Int(offset)
                // With postcopy ahead, a zero page must be populated: a page marked received
                // but missing would fault later and never be asked for (QEMU 10.1's fix).
                if postcopyAdvised || ferry_page_is_zero(p) == 0 { p.initializeMemory(as: UInt8.self, repeating: 0, count: Wire.pageSize) }
                received.set(Int(offset >> 12))
            }
        }
    }
}


// MARK: postcopy (destination)
extension IncomingMigration {
    /// The package: LISTEN, device state, RUN, as one nested stream.
    private func loadPackage(_ blob: [UInt8]) throws {
        let decoder = StreamDecoder(source: ByteArraySource(blob), layout: layout)
        var cpu: VCPUState?
        while true {
            switch try decoder.nextItem() {
            case .command(.postcopyListen):
                try listen()
            case .command(.ping(let v)):
                sendReturnPath { $0.rpPong(v) }
            case .command(.postcopyRun):
                guard uffd != nil, let cpu else { throw MigrationError(.protocolError, "POSTCOPY_RUN before LISTEN and the vCPU state") }
                try machine.vcpu.restoreState(cpu)
                try machine.start()
                guestStarted = true
                host.setRunState(.running)
                host.emit(.resume)
                // The guest runs here now: tell the source (its downtime ends; it may no
                // longer resume the guest there).
                sendReturnPath { $0.rpPong(Wire.pingPackagedLoaded) }
                lock.withLock { requestsEnabled = true }
                setStatus(.postcopyActive)
                return
            case .section(let h) where h.name == Wire.cpuSectionName:
                cpu = try VCPUState(decoding: try decoder.readDeviceBlob())
                try decoder.readFooter(expecting: h.id)
            case .eof:
                throw MigrationError(.protocolError, "postcopy package ended without RUN")
            default:
                throw MigrationError(.protocolError, "unexpected item in the postcopy package")
            }
        }
    }

    /// Arms userfaultfd on all guest RAM, starts the fault thread and, with
    /// postcopy-preempt, accepts the urgent-page channel.
    private func listen() throws {
        let u = try Userfaultfd()
        let block = machine.ram
        try u.register(block.host, length: block.length)
        faultStop = try Sys.eventfd()
        uffd = u
        lock.withLock { postcopyListening = true }
        setStatus(.postcopyDevice)
        faultThread = try KernelThread(name: "mig/dst/fault") { [self] in faultLoop(u, block) }
        if capabilities.contains(.postcopyPreempt) { try acceptPreempt(on: listener) }
    }

    private func acceptPreempt(on l: MigrationListener) throws {
        guard l.waitForConnection(timeoutMs: 10_000) else {
            throw MigrationError(.timeout, "the source did not open the postcopy-preempt channel")
        }
        let pc = try l.accept()
        configure(pc)
        pc.readTimeoutMs = 0 // urgent pages come when asked; the main channel carries the heartbeat
        lock.withLock { preempt = pc }
        preemptThread = try KernelThread(name: "mig/dst/preempt") { [self] in
            let decoder = StreamDecoder(source: pc, layout: layout)
            do {
                while true {
                    switch try decoder.nextRAMRecord() {
                    case .eos: continue
                    case .memSize: throw MigrationError(.protocolError, "RAM setup on the urgent channel")
                    case let .page(b, offset): try installPage(b, offset, from: pc, buffer: preemptBuffer)
                    case let .zero(b, offset): try installZero(b, offset)
                    }
                }
            } catch {
                // A broken urgent channel is a broken link: make the main thread pause.
                if lock.withLock({ preempt === pc }) { lock.withLock { channel }?.shutdown() }
            }
        }
    }

    /// Turns each fault into a page request, once per page, straight onto the return path.
    /// While paused the requests are only recorded; RESUME re-sends them.
    private func faultLoop(_ u: Userfaultfd, _ block: RAMBlock) {
        let base = UInt64(UInt(bitPattern: block.host))
        let pollIn = Int16(POLLIN)
        // The vCPU thread starts at RUN, after this thread: learn its id on the first fault after.
        var vcpu: UInt32 = 0
        while true {
            var fds: [pollfd] = [pollfd(fd: u.fd, events: pollIn, revents: 0), pollfd(fd: faultStop, events: pollIn, revents: 0)]
            if poll(&fds, 2, -1) < 0 { if errno == EINTR { continue }; return }
            if fds[1].revents != 0 { return }
            while true {
                let event: Userfaultfd.Event?
                do { event = try u.readEvent() } catch { event = nil }
                guard let event else { break }
                guard case let .pageFault(address, _, tid) = event, address >= base else { continue }
                let page = Int((address - base) >> 12)
                guard page < block.pageCount, !received.test(page) else { continue }
                if vcpu == 0 { vcpu = machine.vcpuThreadID }
                faults.faulted(page: page, vcpu: tid == vcpu)
                if !requested.testAndSet(page) { requestPage(page, block) }
                // Installed between our check and the record: resolve it now.
                if received.test(page) { faults.installed(page: page) }
            }
        }
    }

    private func requestPage(_ page: Int, _ block: RAMBlock) {
        rpLock.withLock {
            let (rp, name): (MigrationChannel?, String?) = lock.withLock {
                guard requestsEnabled, let rp = returnPath else { return (nil, nil) }
                if lastRequestedBlock == block.name { return (rp, nil) }
                lastRequestedBlock = block.name
                return (rp, block.name)
            }
            guard let rp else { return }
            rpBuffer.removeAll()
            rpBuffer.rpRequestPages(block: name, offset: UInt64(page) << 12, length: 4096)
            try? rp.write(rpBuffer)
            try? rp.flush()
        }
    }

    private var preemptBuffer: UnsafeMutableRawPointer { pageBuffer + 4096 }

    /// Reads one page into a bounce buffer and installs it whole and atomically; only then
    /// does it count as received (the recovery contract).
    private func installPage(_ b: Int, _ offset: UInt64, from ch: MigrationChannel, buffer: UnsafeMutableRawPointer) throws {
        guard let u = uffd else { return }
        try ch.readExactly(UnsafeMutableRawBufferPointer(start: buffer, count: Wire.pageSize))
        try u.copy(to: machine.memory.blocks[b].host + Int(offset), from: buffer, length: Wire.pageSize)
        markInstalled(Int(offset >> 12))
    }

    private func installZero(_ b: Int, _ offset: UInt64) throws {
        guard let u = uffd else { return }
        try u.zeroPage(at: machine.memory.blocks[b].host + Int(offset), length: Wire.pageSize)
        markInstalled(Int(offset >> 12))
    }

    @inline(__always) private func markInstalled(_ page: Int) {
        received.set(page)
        if requested.test(page) { faults.installed(page: page) }
    }

    /// Postcopy RAM records on the main channel.
    private func loadRAMPostcopy(_ decoder: StreamDecoder, _ ch: MigrationChannel) throws {
        while true {
            switch try decoder.nextRAMRecord() {
            case .eos: return
            case .memSize: throw MigrationError(.protocolError, "RAM setup during postcopy")
            case let .page(b, offset): try installPage(b, offset, from: ch, buffer: pageBuffer)
            case let .zero(b, offset): try installZero(b, offset)
            }
        }
    }

    /// From RUN to the end: read the main channel; any failure pauses (never fails) and
    /// waits for a recovery channel, on which the same loop carries on.
    private func postcopyMain(_ first: StreamDecoder, _ firstChannel: MigrationChannel) {
        var decoder = first
        var ch = firstChannel
        while true {
            do {
                try postcopyLoad(decoder, ch)
                try waitForEveryPage()
                lock.withLock { _stats.endNanos = Sys.monotonicNanos() }
                finishPostcopy()
                sendReturnPath { $0.rpShut(0) }
                setStatus(.completed)
                closeChannels()
                listener.close()
                lock.withLock { recoveryListener }?.close()
                return
            } catch {
                (decoder, ch) = pauseAndWaitForRecovery(after: error, decoder: decoder)
            }
        }
    }

    /// One channel's worth of postcopy stream: RAM sections, pings, and the recovery
    /// commands. Returns at EOF.
    private func postcopyLoad(_ decoder: StreamDecoder, _ ch: MigrationChannel) throws {
        while true {
            switch try decoder.nextItem() {
            case .section(let h) where h.name == Wire.ramSectionName && (h.type == .part || h.type == .end):
                try loadRAMPostcopy(decoder, ch)
                try decoder.readFooter(expecting: h.id)
            case .command(.ping(let v)):
                sendReturnPath { $0.rpPong(v) }
            case .command(.recvBitmap(let name)):
                guard status == .postcopyRecover else { throw MigrationError(.protocolError, "RECV_BITMAP outside postcopy-recover") }
                guard name == machine.ram.name else { throw MigrationError(.protocolError, "RECV_BITMAP for unknown RAM block \(name)") }
                let bits = received.serialized()
                sendReturnPath { $0.rpReceivedBitmap(block: name, bitmap: bits) }
                lock.withLock { _stats.bitmapBytes += UInt64(bits.count + 16) }
            case .command(.postcopyResume):
                guard status == .postcopyRecover else { throw MigrationError(.protocolError, "POSTCOPY_RESUME outside postcopy-recover") }
                if capabilities.contains(.postcopyPreempt) {
                    try acceptPreempt(on: lock.withLock { recoveryListener } ?? listener)
                }
                sendReturnPath { $0.rpResumeAck() }
                setStatus(.postcopyActive)
                resendOutstandingRequests()
            case .eof:
                return
            case .command(let c):
                throw MigrationError(.protocolError, "command \(c) is not valid during postcopy")
            case .section(let h):
                throw MigrationError(.protocolError, "section \(h.name) (type \(h.type)) is not valid during postcopy")
            case .configuration:
                throw MigrationError(.protocolError, "configuration section during postcopy")
            }
        }
    }

    /// After RESUME: every page the guest asked for and does not have is asked again
    /// (the old connection may have lost the requests or their answers).
    private func resendOutstandingRequests() {
        let block = machine.ram
        rpLock.withLock { lock.withLock { requestsEnabled = true; lastRequestedBlock = nil } }
        var outstanding: [Int] = []
        requested.forEachSet { p in if !received.test(p) { outstanding.append(p) } }
        for p in outstanding { requestPage(p, block) }
    }

    /// At EOF every page must be here; with postcopy-preempt the last urgent pages may
    /// still be on their way.
    private func waitForEveryPage() throws {
        let deadline = Sys.monotonicNanos() + 30_000_000_000
        while received.popcount() < received.bitCount {
            if Sys.monotonicNanos() > deadline {
                throw MigrationError(.timeout, "\(received.bitCount - received.popcount()) pages still missing after the end of the stream")
            }
            usleep(500)
        }
    }

    private func closeChannels() {
        let (ch, pc): (MigrationChannel?, MigrationChannel?) = lock.withLock {
            defer { channel = nil; returnPath = nil; preempt = nil; requestsEnabled = false }
            return (channel, preempt)
        }
        ch?.shutdown()
        pc?.shutdown()
        preemptThread?.join()
        preemptThread = nil
        ch?.close()
        pc?.close()
    }

    /// postcopy-paused: the guest keeps running (blocking only on pages it lacks), faults
    /// are recorded, nothing received is dropped. Waits for the source's recovery channel
    /// on the `migrate-recover` address, or (auto-recover) on the original one.
    private func pauseAndWaitForRecovery(after error: any Error, decoder old: StreamDecoder) -> (StreamDecoder, MigrationChannel) {
        closeChannels()
        lock.withLock {
            pauseRequested = false
            recoverTriggered = false // a new migrate-recover may replace the address now
            _stats.postcopyPauses += 1
            _stats.errorDescription = "\(error)"
        }
        setStatus(.postcopyPaused)
        let auto = capabilities.contains(.autoRecover)
        while true {
            let l: MigrationListener = lock.withLock {
                while true {
                    if let l = recoveryListener ?? (auto ? listener : nil) { return l }
                    lock.wait(timeoutNanos: 100_000_000) // woken by migrate-recover
                }
            }
            guard l.waitForConnection(timeoutMs: 100) else { continue }
            let ch: MigrationChannel
            do { ch = try l.accept() } catch {
                // A peer that fails the TLS handshake does not end the pause; say why it was refused.
                lock.withLock { _stats.errorDescription = "\(error)" }
                continue
            }
            configure(ch)
            lock.withLock {
                channel = ch
                returnPath = ch
                _stats.recoveryAttempts += 1
            }
            setStatus(.postcopyRecover)
            // The recovery channel carries no header: it starts with RECV_BITMAP.
            return (old.continuing(on: ch), ch)
        }
    }

    /// QMP `migrate-recover`.
    func recover(_ uri: MigrationURI) throws {
        guard status == .postcopyPaused else { throw MigrationError(.state, "Migrate recover can only be run when postcopy is paused.") }
        if let pending = lock.withLock({ recoverTriggered ? recoveryListener?.boundURI : nil }) {
            throw MigrationError(.state, "Migrate recovery is triggered already (listening on \(pending)); it ends when the source connects, or when that attempt fails")
        }
        // The original address (the old port) is still ours: reuse its listener.
        let same = uri == listener.boundURI || uri == listener.uri
        let l = same ? listener : try MigrationListener(uri, tls: tls)
        let old: MigrationListener? = lock.withLock {
            defer { recoveryListener = l; recoverTriggered = true; lock.broadcast() }
            return recoveryListener
        }
        if let old, old !== listener, old !== l { old.close() }
    }

    /// QMP `migrate-pause` on the destination.
    func pause() throws {
        let ch: MigrationChannel? = try lock.withLock {
            let s = _stats.status
            guard s == .postcopyActive || s == .postcopyRecover else {
                throw MigrationError(.state, "migrate-pause is currently only supported during postcopy-active or postcopy-recover state")
            }
            pauseRequested = true
            return channel
        }
        ch?.shutdown()
        lock.withLock { preempt }?.shutdown()
    }

    /// The process is going away with postcopy unfinished: wake every thread waiting on a
    /// missing page (the unregister does that) so the vCPU can be stopped.
    func releaseGuestMemory() {
        guard lock.withLock({ postcopyListening }), status.isPostcopy else { return }
        finishPostcopy()
    }

    /// Every page is here: stop catching faults.
    private func finishPostcopy() {
        if faultStop >= 0 {
            var one: UInt64 = 1
            _ = write(faultStop, &one, 8)
        }
        faultThread?.join()
        faultThread = nil
        if let u = uffd { u.unregister(machine.ram.host, length: machine.ram.length) }
        if faultStop >= 0 { Sys.close(faultStop); faultStop = -1 }
    }
}

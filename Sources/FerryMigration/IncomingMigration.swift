import CFerry
import FerryKVM
import FerryMachine
import FerryMemory
import FerrySys
import FerryWire
import Glibc

/// The destination side: accepts the channel, loads the stream into guest RAM through the
/// validating decoder, restores the vCPU at EOF and starts the guest. A bad stream fails
/// the migration with the decoder's error; the guest here never runs from a partial load.
final class IncomingMigration: @unchecked Sendable {
    let host: VMHost
    let uri: MigrationURI
    let capabilities: Set<MigrationCapability>
    let machine: Machine
    let listener: MigrationListener
    let layout: RAMLayout

    private let lock = Monitor()
    private var _stats = MigrationStats()
    private var channel: MigrationChannel?
    private var thread: KernelThread?
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
    private let pageBuffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)

    init(host: VMHost, uri: MigrationURI, capabilities: Set<MigrationCapability>) throws {
        self.host = host
        self.uri = uri
        self.capabilities = capabilities
        self.machine = host.machine
        self.listener = try MigrationListener(uri)
        self.layout = RAMLayout(blocks: host.machine.memory.blocks.map { .init(name: $0.name, length: UInt64($0.length)) })
        self.received = PageBitmap(bitCount: host.machine.ram.pageCount)
        self.requested = PageBitmap(bitCount: host.machine.ram.pageCount)
        _stats.socketAddress = listener.boundURI
    }

    var stats: MigrationStats {
        lock.withLock {
            var s = _stats
            if let ch = channel { s.transferred = ch.bytesRead }
            return s
        }
    }
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
            thread = try KernelThread(name: "mig/dst/main") { [self] in self.run() }
        } catch {
            fail(error)
        }
    }

    private func fail(_ error: any Error) {
        lock.withLock {
            _stats.errorDescription = "\(error)"
            _stats.endNanos = Sys.monotonicNanos()
        }
        sendReturnPath { $0.rpShut(1) }
        setStatus(.failed)
    }

    private func sendReturnPath(_ body: (inout WireBuffer) -> Void) {
        guard let rp = lock.withLock({ returnPath }) else { return }
        lock.withLock {
            rpBuffer.removeAll()
            body(&rpBuffer)
            try? rp.write(rpBuffer)
            try? rp.flush()
        }
    }

    private func run() {
        do {
            let ch = try listener.accept()
            listener.close()
            lock.withLock { channel = ch }
            setStatus(.active)
            if let cpu = try load(ch) {
                try machine.vcpu.restoreState(cpu)
                try machine.start()
                host.setRunState(.running)
                host.emit(.resume)
            } else {
                finishPostcopy()
            }
            lock.withLock { _stats.endNanos = Sys.monotonicNanos() }
            sendReturnPath { $0.rpShut(0) }
            setStatus(.completed)
            ch.close()
        } catch {
            fail(error)
            lock.withLock { channel }?.close()
        }
    }

    /// Loads a whole stream. Precopy: returns the vCPU state found at EOF. Postcopy: the
    /// guest was started by the package's RUN; returns nil once every page is installed.
    private func load(_ ch: MigrationChannel) throws -> VCPUState? {
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
                if uffd != nil { try loadRAMPostcopy(decoder, ch) } else { try loadRAM(decoder, ch) }
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
            case .command(let c):
                try handleCommand(c, ch)
            case .eof:
                if uffd != nil { return nil }
                guard let cpu else { throw WireError(.truncated, "the stream ended without the vCPU state") }
                return cpu
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
    /// The package: LISTEN, device state, RUN (and pings), as one nested stream.
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
                host.setRunState(.running)
                host.emit(.resume)
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

    /// Arms userfaultfd on all guest RAM and starts the fault thread.
    private func listen() throws {
        let u = try Userfaultfd()
        let block = machine.ram
        try u.register(block.host, length: block.length)
        faultStop = try Sys.eventfd()
        uffd = u
        setStatus(.postcopyDevice)
        faultThread = try KernelThread(name: "mig/dst/fault") { [self] in faultLoop(u, block) }
    }

    /// Turns each fault into a page request, once per page, straight onto the return path.
    private func faultLoop(_ u: Userfaultfd, _ block: RAMBlock) {
        let base = UInt64(UInt(bitPattern: block.host))
        let pollIn = Int16(POLLIN)
        while true {
            var fds: [pollfd] = [pollfd(fd: u.fd, events: pollIn, revents: 0), pollfd(fd: faultStop, events: pollIn, revents: 0)]
            if poll(&fds, 2, -1) < 0 { if errno == EINTR { continue }; return }
            if fds[1].revents != 0 { return }
            while true {
                let event: Userfaultfd.Event?
                do { event = try u.readEvent() } catch { event = nil }
                guard let event else { break }
                guard case let .pageFault(address, _, _) = event, address >= base else { continue }
                let delta: UInt64 = address - base
                let page = Int(delta >> 12)
                guard page < block.pageCount, !received.test(page), !requested.testAndSet(page) else { continue }
                let name: String? = lock.withLock { () -> String? in
                    if lastRequestedBlock == block.name { return nil }
                    lastRequestedBlock = block.name
                    return block.name
                }
                let offset = UInt64(page) << 12
                sendReturnPath { $0.rpRequestPages(block: name, offset: offset, length: 4096) }
            }
        }
    }

    /// Postcopy RAM records: each page lands whole and atomically with UFFDIO_COPY/ZEROPAGE,
    /// and only then counts as received.
    private func loadRAMPostcopy(_ decoder: StreamDecoder, _ ch: MigrationChannel) throws {
        guard let u = uffd else { return }
        let blocks = machine.memory.blocks
        while true {
            switch try decoder.nextRAMRecord() {
            case .eos: return
            case .memSize: throw MigrationError(.protocolError, "RAM setup during postcopy")
            case let .page(b, offset):
                try ch.readExactly(UnsafeMutableRawBufferPointer(start: pageBuffer, count: Wire.pageSize))
                try u.copy(to: blocks[b].host + Int(offset), from: pageBuffer, length: Wire.pageSize)
                received.set(Int(offset >> 12))
            case let .zero(b, offset):
                try u.zeroPage(at: blocks[b].host + Int(offset), length: Wire.pageSize)
                received.set(Int(offset >> 12))
            }
        }
    }

    /// Every page is here: stop catching faults.
    private func finishPostcopy() {
        if faultStop >= 0 {
            var one: UInt64 = 1
            _ = write(faultStop, &one, 8)
        }
        faultThread?.join()
        if let u = uffd { u.unregister(machine.ram.host, length: machine.ram.length) }
        if faultStop >= 0 { Sys.close(faultStop); faultStop = -1 }
    }
}

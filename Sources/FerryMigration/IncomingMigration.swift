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

    init(host: VMHost, uri: MigrationURI, capabilities: Set<MigrationCapability>) throws {
        self.host = host
        self.uri = uri
        self.capabilities = capabilities
        self.machine = host.machine
        self.listener = try MigrationListener(uri)
        self.layout = RAMLayout(blocks: host.machine.memory.blocks.map { .init(name: $0.name, length: UInt64($0.length)) })
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
            let cpu = try load(ch)
            try machine.vcpu.restoreState(cpu)
            try machine.start()
            host.setRunState(.running)
            host.emit(.resume)
            lock.withLock { _stats.endNanos = Sys.monotonicNanos() }
            sendReturnPath { $0.rpShut(0) }
            setStatus(.completed)
            ch.close()
        } catch {
            fail(error)
            lock.withLock { channel }?.close()
        }
    }

    /// Loads a whole precopy stream; returns the vCPU state found in it.
    private func load(_ ch: MigrationChannel) throws -> VCPUState {
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
            case .command(let c):
                try handleCommand(c, ch)
            case .eof:
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
            case let .zero(b, offset):
                let p = blocks[b].host + Int(offset)
                if ferry_page_is_zero(p) == 0 { p.initializeMemory(as: UInt8.self, repeating: 0, count: Wire.pageSize) }
            }
        }
    }
}

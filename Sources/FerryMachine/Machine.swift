import CFerry
import FerryKVM
import FerryMemory
import FerrySys
import Glibc

/// The machine layer's error.
public struct MachineError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable { case config, guestImage, kvm, state, vcpu }
    public let code: Code
    public let message: String
    public let cause: (any Error)?
    public init(_ code: Code, _ message: String, cause: (any Error)? = nil) {
        self.code = code; self.message = message; self.cause = cause
    }
    public var description: String { message + (cause.map { ": \($0)" } ?? "") }
}

/// What the machine is doing, as seen by the VMM.
public enum VCPURunState: String, Sendable {
    case created, running, paused, shutdown, internalError = "internal-error", stopped
}

/// A running VM: KVM VM with its in-kernel interrupt controllers and PIT, guest RAM
/// (`pc.ram`, split around the hole below 4 GiB once large), `vcpuCount` vCPUs each on a
/// dedicated thread, and COM1 on IRQ 4. Pause/resume from any thread; pausing always
/// completes a pending I/O exit on every vCPU first (KVM_RUN with immediate_exit), so
/// saved state is consistent. A halted vCPU sleeps in the kernel until an interrupt or a
/// kick (KVM handles HLT with the in-kernel local APIC).
///
/// Ownership: `core` is immutable; its mutable state is `MachineCore`'s.
public final class Machine: @unchecked Sendable {
    /// Most vCPUs a Ferry machine has.
    public static let maxVCPUs = 16
    /// The signal that kicks a vCPU thread out of KVM_RUN.
    public static let kickSignal = SIGUSR1

    /// The state the vCPU threads share. The threads hold it strongly, so dropping the
    /// `Machine` can stop and join them from `deinit`.
    let core: MachineCore

    public init(memorySize: Int, vcpus: Int = 1, serial sink: SerialSink = .none, kvm: Kvm? = nil) throws(MachineError) {
        core = try MachineCore(memorySize: memorySize, vcpuCount: vcpus, serial: sink, kvm: kvm)
    }

    deinit { core.stop() }

    public var kvm: Kvm { core.kvm }
    public var vm: VirtualMachine { core.vm }
    public var memory: GuestMemory { core.memory }
    public var vcpus: [VCPU] { core.vcpus }
    public var vcpuCount: Int { core.vcpus.count }
    public var serial: SerialPort { core.serial }
    public var ram: RAMBlock { core.memory.blocks[0] }
    /// What a migration's two ends must agree on.
    public var shape: MachineShape { core.shape }
    /// The guest TSC's frequency (read once: a vCPU ioctl waits while its vCPU runs).
    public var tscKHz: UInt64? { core.tscKHz }
    /// Called on a vCPU thread when the guest stops by itself (shutdown or error).
    public var onGuestStop: (@Sendable (VCPURunState, String?) -> Void)? {
        get { core.onGuestStop }
        set { core.onGuestStop = newValue }
    }
    public func loadBootSector(_ image: [UInt8]) throws(MachineError) { try core.loadBootSector(image) }
    /// Loads the built-in test guest laid out for this machine (`touching` bytes of RAM
    /// walked, all of it by default), its pages filled with `contents` first.
    public func loadTestGuest(touching: Int? = nil, contents: TestGuestContents = .zero) throws(MachineError) {
        try core.loadTestGuest(touching: touching, contents: contents)
    }
    public var state: VCPURunState { core.state }
    public var lastError: String? { core.lastError }
    /// Port and MMIO accesses to devices Ferry does not model (ignored; reads give 0xff).
    public var unhandledIOCount: Int { core.unhandledIOCount }
    /// Starts the vCPU threads (running unless `paused`).
    public func start(paused: Bool = false) throws(MachineError) { try core.start(paused: paused) }
    /// Stops the guest and waits until every vCPU thread is parked with no pending I/O.
    public func pause() { _ = core.pause(timeoutNanos: nil) }
    /// As `pause()`, but gives up waiting after `timeoutNanos` (a vCPU blocked in the kernel
    /// on a missing postcopy page parks only once the page arrives). True when parked.
    /// `kick` says which vCPUs to kick out of the kernel (by index); one left alone (a signal
    /// makes KVM retry a userfaultfd fault in a busy loop until the page arrives) parks at
    /// its next exit or when kicked later (`kickUnparked`).
    public func pause(timeoutNanos: UInt64, kick: @escaping (Int) -> Bool = { _ in true }) -> Bool {
        core.pause(timeoutNanos: timeoutNanos, kick: kick)
    }
    /// After a `pause` that timed out: waits until every vCPU parks, up to `timeoutNanos`.
    /// False when the pause was cancelled by `resume`, the vCPU threads ended, or time ran out.
    public func waitUntilParked(timeoutNanos: UInt64? = nil) -> Bool { core.waitUntilParked(timeoutNanos: timeoutNanos) }
    /// During a pause: kicks the vCPUs not parked yet for which `which` says yes (a halted
    /// vCPU sleeps in the kernel and exits only when kicked).
    public func kickUnparked(_ which: (Int) -> Bool) { core.kickUnparked(which) }
    /// Whether vCPU `index` is parked in a pause.
    public func isParked(_ index: Int) -> Bool { core.isParked(index) }
    /// Each vCPU thread's kernel thread id (userfaultfd reports it with each fault), by
    /// vCPU index; 0 before start.
    public var vcpuThreadIDs: [UInt32] { core.vcpuThreadIDs }
    /// Lets the guest run again after `pause()`.
    public func resume() { core.resume() }
    public var isPaused: Bool { core.isPaused }
    /// A pause was asked for and not cancelled (the vCPUs may not all be parked yet).
    public var pauseRequested: Bool { core.isPauseRequested }
    /// Ends the vCPU threads for good.
    public func stop() { core.stop() }
    /// Throttles every vCPU to `100 - percent` % of the time (auto-converge); 0 = off.
    /// As QEMU's CPU throttle: each vCPU runs 10 ms, then sleeps `percent / (100 - percent)`
    /// × 10 ms, woken early by a pause or stop.
    public func setThrottle(percent: Int) { core.setThrottle(percent: percent) }
    public var throttlePercent: Int { core.throttlePercent }
}

/// Ownership: the devices are immutable references; `threads`, `tids`, `pauseRequested`,
/// `quitRequested`, `parked`, `_state`, `_error`, `_unhandledIO`, `_restoredClock`,
/// `throttle`, `throttleOwed`, `throttleRunning` are guarded by `monitor`;
/// `onGuestStop` is set before the vCPU threads start and only read after.
final class MachineCore: @unchecked Sendable {

    let kvm: Kvm
    let vm: VirtualMachine
    let memory: GuestMemory
    let vcpus: [VCPU]
    let serial: SerialPort
    let shape: MachineShape
    let tscKHz: UInt64?

    private let monitor = Monitor()
    private var threads: [KernelThread] = []
    private var tids: [UInt32]
    private var pauseRequested = false
    private var quitRequested = false
    /// Per vCPU: parked after an EINTR return, waiting to be resumed.
    private var parked: [Bool]
    private var _state: VCPURunState = .created
    private var _error: String?
    private var _unhandledIO = 0
    /// Throttle percentage (0 = off), each vCPU's sleep still owed (ns), and whether the
    /// `cpu-throttle` thread that hands out the sleeps runs.
    private var throttle = 0
    private var throttleOwed: [UInt64]
    private var throttleRunning = false
    /// QEMU's `CPU_THROTTLE_TIMESLICE_NS`.
    static let throttleTimeslice: Double = 10_000_000

    var onGuestStop: (@Sendable (VCPURunState, String?) -> Void)?
    private var _restoredClock: UInt64?

    var ram: RAMBlock { memory.blocks[0] }

    func restoredClock(_ nanos: UInt64) { monitor.withLock { _restoredClock = nanos } }
    var restoredClockNanos: UInt64? { monitor.withLock { _restoredClock } }

    init(memorySize: Int, vcpuCount: Int, serial sink: SerialSink, kvm: Kvm?) throws(MachineError) {
        guard memorySize >= 2 << 20 else {
            throw MachineError(.config, "memory size \(memorySize) is too small: the guest needs at least 2 MiB")
        }
        guard memorySize <= MachineShape.maxMemory else {
            throw MachineError(.config, "memory size \(memorySize >> 30) GiB is more than Ferry's limit of \(MachineShape.maxMemory >> 30) GiB")
        }
        guard memorySize % targetPageSize == 0 else { throw MachineError(.config, "memory size \(memorySize) is not a whole number of 4 KiB pages") }
        guard (1...Machine.maxVCPUs).contains(vcpuCount) else {
            throw MachineError(.config, "\(vcpuCount) vCPUs: Ferry machines have 1 to \(Machine.maxVCPUs)")
        }
        do {
            self.kvm = try kvm ?? Kvm()
            self.vm = try self.kvm.createVM()
            try vm.createInterruptControllers()
            self.memory = try GuestMemory.pc(size: memorySize)
            try vm.map(memory.blocks[0])
            var v: [VCPU] = []
            for i in 0..<vcpuCount { v.append(try vm.createVCPU(id: Int32(i), of: vcpuCount)) }
            self.vcpus = v
            self.serial = try SerialPort(sink: sink)
            self.shape = MachineShape(vcpus: vcpuCount, memory: memorySize,
                                      cpuidDigest: CPUIDModel.digest(supported: try self.kvm.cpuid(), count: vcpuCount))
        } catch let e as KVMError {
            throw MachineError(.kvm, "cannot create the VM", cause: e)
        } catch {
            throw MachineError(.config, "cannot create the VM", cause: error)
        }
        tscKHz = vcpus[0].tscKHz()
        tids = Array(repeating: 0, count: vcpuCount)
        parked = Array(repeating: false, count: vcpuCount)
        throttleOwed = Array(repeating: 0, count: vcpuCount)
        serial.raiseIRQ = { [vm] high in vm.setIRQLine(SerialPort.irq, high: high) }
        _ = ferry_install_kick_handler(Machine.kickSignal)
    }

    // MARK: guest loading

    /// Loads a raw disk image at 0x7c00 (its first sector a boot sector; later sectors
    /// follow it, as a BIOS that read them all would leave them) and sets the boot vCPU as
    /// a BIOS hands over: real mode, CS:IP = 0000:7c00, DL = 0x80. No BIOS services exist.
    /// The other vCPUs wait for INIT/SIPI.
    func loadBootSector(_ image: [UInt8]) throws(MachineError) {
        guard image.count >= 512 else {
            throw MachineError(.guestImage, "guest image is \(image.count) bytes; a boot sector needs 512")
        }
        guard image[510] == 0x55, image[511] == 0xaa else {
            throw MachineError(.guestImage, "guest image has no boot signature (bytes 510-511 are not 55 aa)")
        }
        // Up to the EBDA at 0x9fc00, as much as fits below it.
        let loaded = min(image.count, 0x9fc00 - 0x7c00)
        do {
            try Array(image[0..<loaded]).withUnsafeBytes { b throws in try memory.write(gpa: 0x7c00, b) }
            try vcpus[0].resetToRealMode(ip: 0x7c00)
        } catch {
            throw MachineError(.guestImage, "cannot load the boot sector", cause: error)
        }
    }

    func loadTestGuest(touching: Int?, contents: TestGuestContents) throws(MachineError) {
        let layout = TestGuestLayout(memory: ram.length, vcpus: vcpus.count, touched: touching, contents: contents)
        layout.fill(base: ram.host, size: ram.length)
        try loadBootSector(TestGuest.image(layout))
    }

    // MARK: state

    var state: VCPURunState { monitor.withLock { _state } }
    var lastError: String? { monitor.withLock { _error } }
    var unhandledIOCount: Int { monitor.withLock { _unhandledIO } }
    var vcpuThreadIDs: [UInt32] { monitor.withLock { tids } }
    private var allParked: Bool { !parked.contains(false) }

    // MARK: vCPU threads

    func start(paused: Bool = false) throws(MachineError) {
        let failure: MachineError? = monitor.withLock {
            guard threads.isEmpty else { return MachineError(.state, "the vCPUs are already started") }
            pauseRequested = paused
            for v in vcpus { v.immediateExit = paused }
            _state = paused ? .paused : .running
            do {
                for i in vcpus.indices {
                    threads.append(try KernelThread(name: "vcpu\(i)") { [self] in self.vcpuLoop(i) })
                }
                return nil
            } catch {
                quitRequested = true
                for v in vcpus { v.immediateExit = true }
                monitor.broadcast()
                return MachineError(.vcpu, "cannot start the vCPU threads", cause: error)
            }
        }
        if let failure { stop(); throw failure }
    }

    private func kickAll() { kickUnparked { _ in true } }

    func kickUnparked(_ which: (Int) -> Bool) {
        let ts: [(Int, KernelThread)] = monitor.withLock { threads.enumerated().filter { !parked[$0.offset] }.map { ($0.offset, $0.element) } }
        for (i, t) in ts where which(i) { t.kick(Machine.kickSignal) }
    }

    func isParked(_ index: Int) -> Bool { monitor.withLock { parked[index] } }

    /// Stops the guest and waits until every vCPU thread is parked with no pending I/O.
    /// Safe to call from any thread, repeatedly.
    func pause(timeoutNanos: UInt64?, kick: (Int) -> Bool = { _ in true }) -> Bool {
        let deadline = timeoutNanos.map { Sys.monotonicNanos() + $0 }
        monitor.withLock {
            guard !threads.isEmpty, !quitRequested else { return }
            for v in vcpus { v.immediateExit = true }
            pauseRequested = true
            monitor.broadcast()
        }
        kickUnparked(kick)
        return monitor.withLock {
            while !allParked && !quitRequested && !threads.isEmpty {
                if let deadline, Sys.monotonicNanos() >= deadline { break }
                monitor.wait(timeoutNanos: 10_000_000)
            }
            // Only a machine whose every vCPU parked is paused: one still in the kernel keeps
            // running the guest until it parks (at its next exit).
            if allParked && _state == .running { _state = .paused }
            return allParked || threads.isEmpty || quitRequested
        }
    }

    func waitUntilParked(timeoutNanos: UInt64?) -> Bool {
        let deadline = timeoutNanos.map { Sys.monotonicNanos() + $0 }
        return monitor.withLock {
            while pauseRequested && !allParked && !quitRequested && !threads.isEmpty {
                if let deadline, Sys.monotonicNanos() >= deadline { break }
                monitor.wait(timeoutNanos: 10_000_000)
            }
            return pauseRequested && allParked && !quitRequested
        }
    }

    func resume() {
        monitor.withLock {
            guard pauseRequested else { return }
            pauseRequested = false
            for v in vcpus { v.immediateExit = false }
            if _state == .paused { _state = .running }
            monitor.broadcast()
        }
    }

    var isPaused: Bool { monitor.withLock { pauseRequested && allParked } }
    var isPauseRequested: Bool { monitor.withLock { pauseRequested } }

    func stop() {
        let ts: [KernelThread] = monitor.withLock {
            quitRequested = true
            for v in vcpus { v.immediateExit = true }
            monitor.broadcast()
            return threads
        }
        guard !ts.isEmpty else { return }
        for t in ts { t.kick(Machine.kickSignal) }
        for t in ts { t.join() }
        monitor.withLock {
            threads = []
            if _state == .running || _state == .paused { _state = .stopped }
        }
    }

    private func vcpuLoop(_ index: Int) {
        let vcpu = vcpus[index]
        _ = ferry_unblock_signal(Machine.kickSignal)
        let tid = UInt32(truncatingIfNeeded: ferry_gettid())
        monitor.withLock { tids[index] = tid }
        var lastWasInterrupt = true
        while true {
            let proceed: Bool = monitor.withLock {
                // Park only after a KVM_RUN that returned EINTR, so a pending I/O exit
                // has been completed and the register state is final.
                while (pauseRequested && lastWasInterrupt) || isFinished {
                    if quitRequested { return false }
                    // A stopped guest's vCPU counts as parked: its state no longer changes.
                    if (pauseRequested && lastWasInterrupt || isFinished) && !parked[index] {
                        parked[index] = true
                        if allParked && _state == .running { _state = .paused }
                        monitor.broadcast()
                    }
                    monitor.wait()
                }
                parked[index] = false
                if quitRequested { return false }
                // Throttled: sleep what is owed before entering the guest again, unless a
                // pause is asked for (it parks at once, after the immediate exit).
                let owed = throttleOwed[index]
                if owed > 0 && !pauseRequested {
                    throttleOwed[index] = 0
                    let until = Sys.monotonicNanos() + owed
                    while !pauseRequested && !quitRequested, case let now = Sys.monotonicNanos(), now < until {
                        monitor.wait(timeoutNanos: until - now)
                    }
                }
                return !quitRequested
            }
            if !proceed { break }
            let exit: VCPUExit
            do {
                exit = try vcpu.runOnce()
            } catch {
                guestStopped(.internalError, "vCPU \(index): KVM_RUN failed: \(error)")
                continue
            }
            lastWasInterrupt = false
            switch exit {
            case .interrupted:
                lastWasInterrupt = true
            case let .io(port, isOut, size, count, data):
                handleIO(port: port, isOut: isOut, size: size, count: count, data: data)
            case let .mmio(_, isWrite, length, data):
                if !isWrite { data.initializeMemory(as: UInt8.self, repeating: 0xff, count: min(length, 8)) }
                monitor.withLock { _unhandledIO += 1 }
            case .hlt:
                break // the in-kernel local APIC handles HLT; never seen
            case .shutdown:
                guestStopped(.shutdown, "the guest shut down (triple fault on vCPU \(index))")
            case let .failEntry(reason):
                guestStopped(.internalError, "KVM could not enter vCPU \(index) (hardware entry failure reason 0x\(String(reason, radix: 16)))")
            case let .internalError(sub, instruction):
                let rip = (try? vcpu.getRegs().rip).map { " at rip 0x" + String($0, radix: 16) } ?? ""
                let bytes = instruction.isEmpty ? "" : ", instruction bytes " + instruction.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: " ")
                guestStopped(.internalError, "KVM internal error on vCPU \(index)\(rip), suberror \(sub)\(bytes) (often an instruction KVM cannot emulate)")
            case let .other(reason):
                guestStopped(.internalError, "unhandled KVM exit reason \(reason) on vCPU \(index)")
            }
        }
        monitor.withLock { parked[index] = true; monitor.broadcast() }
    }

    private var isFinished: Bool { _state == .shutdown || _state == .internalError }

    // MARK: CPU throttle (auto-converge)

    var throttlePercent: Int { monitor.withLock { throttle } }

    func setThrottle(percent: Int) {
        let startThread: Bool = monitor.withLock {
            throttle = max(0, min(99, percent))
            if throttle == 0 { for i in throttleOwed.indices { throttleOwed[i] = 0 } }
            monitor.broadcast()
            guard throttle > 0, !throttleRunning, !quitRequested else { return false }
            throttleRunning = true
            return true
        }
        guard startThread else { return }
        do {
            try KernelThread.detached(name: "cpu-throttle") { [self] in throttleLoop() }
        } catch {
            monitor.withLock { throttleRunning = false }
        }
    }

    /// Every `timeslice / (1 - p)`, owes each vCPU `p / (1 - p) × timeslice` of sleep and
    /// kicks it out of the guest to take it. Ends when the throttle goes to 0 or the VM stops.
    private func throttleLoop() {
        while true {
            let sleep: UInt64? = monitor.withLock {
                guard throttle > 0, !quitRequested else { throttleRunning = false; return nil }
                let p = Double(throttle) / 100
                let until = Sys.monotonicNanos() + UInt64(Self.throttleTimeslice / (1 - p))
                while throttle > 0 && !quitRequested, case let now = Sys.monotonicNanos(), now < until {
                    monitor.wait(timeoutNanos: until - now)
                }
                guard throttle > 0, !quitRequested else { throttleRunning = false; return nil }
                let q = Double(throttle) / 100
                let owed = UInt64(q / (1 - q) * Self.throttleTimeslice)
                for i in throttleOwed.indices { throttleOwed[i] = owed }
                return owed
            }
            guard sleep != nil else { return }
            kickAll()
        }
    }

    /// The guest stopped by itself: every vCPU stops (the others are kicked out of the guest).
    private func guestStopped(_ s: VCPURunState, _ message: String) {
        let first: Bool = monitor.withLock {
            guard !isFinished else { return false }
            _state = s; _error = message
            for v in vcpus { v.immediateExit = true }
            monitor.broadcast()
            return true
        }
        guard first else { return }
        kickAll()
        onGuestStop?(s, message)
    }

    private func handleIO(port: UInt16, isOut: Bool, size: Int, count: Int, data: UnsafeMutableRawPointer) {
        for i in 0..<count {
            let p = data + i * size
            if serial.contains(port) {
                if isOut { serial.write(port: port, value: p.load(as: UInt8.self)) }
                else { p.initializeMemory(as: UInt8.self, repeating: 0, count: size); p.storeBytes(of: serial.read(port: port), as: UInt8.self) }
            } else if port == 0x92 {
                // System control port A: report A20 enabled; writes (A20, fast reset) are ignored.
                if !isOut { p.initializeMemory(as: UInt8.self, repeating: 0, count: size); p.storeBytes(of: 0x02, as: UInt8.self) }
            } else {
                if !isOut { p.initializeMemory(as: UInt8.self, repeating: 0xff, count: size) }
                if i == 0 { monitor.withLock { _unhandledIO += 1 } }
            }
        }
    }
}

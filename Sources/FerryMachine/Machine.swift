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

/// What the vCPU is doing, as seen by the VMM.
public enum VCPURunState: String, Sendable {
    case created, running, paused, halted, shutdown, internalError = "internal-error", stopped
}

/// A running VM: KVM VM + guest RAM (`pc.ram` at 0, slot 0) + one vCPU on a dedicated
/// thread + COM1. Pause/resume from any thread; pausing always completes a pending I/O
/// exit first (KVM_RUN with immediate_exit), so saved state is consistent.
///
/// Ownership: `core` is immutable; its mutable state is `MachineCore`'s.
public final class Machine: @unchecked Sendable {
    public static let ramSlot: UInt32 = 0
    /// Largest guest RAM: up to the IOAPIC/LAPIC window at 0xfec00000 (4076 MiB).
    public static let maxMemory = 0xfec0_0000
    /// The signal that kicks the vCPU thread out of KVM_RUN.
    public static let kickSignal = SIGUSR1

    /// The state the vCPU thread shares. The thread holds it strongly, so dropping the
    /// `Machine` can stop and join the thread from `deinit`.
    let core: MachineCore

    public init(memorySize: Int, serial sink: SerialSink = .none, kvm: Kvm? = nil) throws(MachineError) {
        core = try MachineCore(memorySize: memorySize, serial: sink, kvm: kvm)
    }

    deinit { core.stop() }

    public var kvm: Kvm { core.kvm }
    public var vm: VirtualMachine { core.vm }
    public var memory: GuestMemory { core.memory }
    public var vcpu: VCPU { core.vcpu }
    public var serial: SerialPort { core.serial }
    public var ram: RAMBlock { core.memory.blocks[0] }
    /// Called on the vCPU thread when the guest stops by itself (shutdown or error).
    public var onGuestStop: (@Sendable (VCPURunState, String?) -> Void)? {
        get { core.onGuestStop }
        set { core.onGuestStop = newValue }
    }
    public func loadBootSector(_ image: [UInt8]) throws(MachineError) { try core.loadBootSector(image) }
    public func loadTestGuest() throws(MachineError) { try core.loadTestGuest() }
    public var state: VCPURunState { core.state }
    public var lastError: String? { core.lastError }
    /// Port and MMIO accesses to devices Ferry does not model (ignored; reads give 0xff).
    public var unhandledIOCount: Int { core.unhandledIOCount }
    /// Starts the vCPU thread (running unless `paused`).
    public func start(paused: Bool = false) throws(MachineError) { try core.start(paused: paused) }
    /// Stops the guest and waits until the vCPU thread is parked with no pending I/O.
    public func pause() { _ = core.pause(timeoutNanos: nil) }
    /// As `pause()`, but gives up waiting after `timeoutNanos` (a vCPU blocked in the kernel
    /// on a missing postcopy page parks only once the page arrives). True when parked.
    /// `kick: false` leaves a vCPU blocked in the kernel alone (a signal makes KVM retry a
    /// userfaultfd fault in a busy loop until the page arrives); it parks at its next exit.
    public func pause(timeoutNanos: UInt64, kick: Bool = true) -> Bool { core.pause(timeoutNanos: timeoutNanos, kick: kick) }
    /// After a `pause` that timed out: waits until the vCPU parks. False when the pause was
    /// cancelled by `resume` or the vCPU thread ended.
    public func waitUntilParked() -> Bool { core.waitUntilParked() }
    /// The vCPU thread's kernel thread id (userfaultfd reports it with each fault); 0 before start.
    public var vcpuThreadID: UInt32 { core.vcpuThreadID }
    /// Lets the guest run again after `pause()`.
    public func resume() { core.resume() }
    public var isPaused: Bool { core.isPaused }
    /// Ends the vCPU thread for good.
    public func stop() { core.stop() }
}

/// Ownership: the devices are immutable references; `thread`, `pauseRequested`,
/// `quitRequested`, `parked`, `_state`, `_error`, `_unhandledIO` and `_exits` are guarded by
/// `monitor`; `onGuestStop` is set before the vCPU thread starts and only read after.
final class MachineCore: @unchecked Sendable {

    public let kvm: Kvm
    public let vm: VirtualMachine
    public let memory: GuestMemory
    public let vcpu: VCPU
    public let serial: SerialPort

    private let monitor = Monitor()
    private var thread: KernelThread?
    private var pauseRequested = false
    private var quitRequested = false
    private var parked = false
    private var _state: VCPURunState = .created
    private var _error: String?
    private var _unhandledIO = 0
    private var _exits = 0

    var onGuestStop: (@Sendable (VCPURunState, String?) -> Void)?

    var ram: RAMBlock { memory.blocks[0] }

    public init(memorySize: Int, serial sink: SerialSink = .none, kvm: Kvm? = nil) throws(MachineError) {
        guard memorySize >= 2 << 20 else {
            throw MachineError(.config, "memory size \(memorySize) is too small: the guest needs at least 2 MiB")
        }
        // RAM is one slot from 0; it must end below the x86 interrupt controllers' window
        // (IOAPIC 0xfec00000, LAPIC 0xfee00000: KVM exits on LAPIC accesses even where RAM is
        // mapped) and KVM's TSS pages. No RAM above 4 GiB yet.
        guard memorySize <= Machine.maxMemory else {
            throw MachineError(.config, "memory size \(memorySize) reaches the interrupt controllers' window at 0xfec00000; at most \(Machine.maxMemory) bytes (\(Machine.maxMemory >> 20) MiB)")
        }
        do {
            self.kvm = try kvm ?? Kvm()
            self.vm = try self.kvm.createVM()
            self.memory = try GuestMemory.pc(size: memorySize)
            try vm.map(memory.blocks[0], slot: Machine.ramSlot)
            self.vcpu = try vm.createVCPU()
            self.serial = try SerialPort(sink: sink)
        } catch let e as KVMError {
            throw MachineError(.kvm, "cannot create the VM", cause: e)
        } catch {
            throw MachineError(.config, "cannot create the VM", cause: error)
        }
        _ = ferry_install_kick_handler(Machine.kickSignal)
    }

    // MARK: guest loading

    /// Loads a raw disk image's boot sector at 0x7c00 and sets the vCPU as a BIOS would
    /// hand over: real mode, CS:IP = 0000:7c00, DL = 0x80. No BIOS services exist.
    public func loadBootSector(_ image: [UInt8]) throws(MachineError) {
        guard image.count >= 512 else {
            throw MachineError(.guestImage, "guest image is \(image.count) bytes; a boot sector needs 512")
        }
        guard image[510] == 0x55, image[511] == 0xaa else {
            throw MachineError(.guestImage, "guest image has no boot signature (bytes 510-511 are not 55 aa)")
        }
        do {
            try Array(image[0..<512]).withUnsafeBytes { b throws in try memory.write(gpa: 0x7c00, b) }
            try vcpu.resetToRealMode(ip: 0x7c00)
        } catch {
            throw MachineError(.guestImage, "cannot load the boot sector", cause: error)
        }
    }

    public func loadTestGuest() throws(MachineError) {
        try loadBootSector(TestGuest.image(forMemory: ram.length))
    }

    // MARK: state

    public var state: VCPURunState { monitor.withLock { _state } }
    public var lastError: String? { monitor.withLock { _error } }
    /// Port and MMIO accesses to devices Ferry does not model (ignored; reads give 0xff).
    public var unhandledIOCount: Int { monitor.withLock { _unhandledIO } }

    // MARK: vCPU thread

    /// Starts the vCPU thread (running unless `paused`).
    public func start(paused: Bool = false) throws(MachineError) {
        let failure: MachineError? = monitor.withLock {
            guard thread == nil else { return MachineError(.state, "the vCPU is already started") }
            pauseRequested = paused
            if paused { vcpu.immediateExit = true }
            _state = paused ? .paused : .running
            do {
                thread = try KernelThread(name: "vcpu0") { [self] in self.vcpuLoop() }
                return nil
            } catch {
                return MachineError(.vcpu, "cannot start the vCPU thread", cause: error)
            }
        }
        if let failure { throw failure }
    }

    /// Stops the guest and waits until the vCPU thread is parked with no pending I/O.
    /// Safe to call from any thread, repeatedly.
    public func pause(timeoutNanos: UInt64?, kick: Bool = true) -> Bool {
        let deadline = timeoutNanos.map { Sys.monotonicNanos() + $0 }
        monitor.withLock {
            guard thread != nil, !quitRequested else { return }
            vcpu.immediateExit = true
            pauseRequested = true
            monitor.broadcast()
        }
        if kick { thread?.kick(Machine.kickSignal) }
        return monitor.withLock {
            while !parked && !quitRequested && thread != nil {
                if let deadline, Sys.monotonicNanos() >= deadline { break }
                monitor.wait(timeoutNanos: 10_000_000)
            }
            // Only a parked vCPU is paused: one still in the kernel keeps running the guest
            // until it parks (at its next exit), and must not be reported as paused before.
            if parked && (_state == .running || _state == .halted) { _state = .paused }
            return parked || thread == nil || quitRequested
        }
    }

    /// Waits, without kicking, until the vCPU parks for a pause already requested. False
    /// when the pause was cancelled (`resume`) or the vCPU thread ended first.
    public func waitUntilParked() -> Bool {
        monitor.withLock {
            while pauseRequested && !parked && !quitRequested && thread != nil { monitor.wait(timeoutNanos: 100_000_000) }
            return pauseRequested && parked && !quitRequested
        }
    }

    private var _vcpuTID: UInt32 = 0
    var vcpuThreadID: UInt32 { monitor.withLock { _vcpuTID } }

    /// Lets the guest run again after `pause()`.
    public func resume() {
        monitor.withLock {
            guard pauseRequested else { return }
            pauseRequested = false
            vcpu.immediateExit = false
            if _state == .paused { _state = .running }
            monitor.broadcast()
        }
    }

    public var isPaused: Bool { monitor.withLock { pauseRequested && parked } }

    /// Ends the vCPU thread for good.
    public func stop() {
        let t: KernelThread? = monitor.withLock {
            quitRequested = true
            vcpu.immediateExit = true
            monitor.broadcast()
            return thread
        }
        guard let t else { return }
        t.kick(Machine.kickSignal)
        t.join()
        monitor.withLock {
            thread = nil
            if _state == .running || _state == .paused || _state == .halted { _state = .stopped }
        }
    }

    private func vcpuLoop() {
        _ = ferry_unblock_signal(Machine.kickSignal)
        let tid = UInt32(truncatingIfNeeded: ferry_gettid())
        monitor.withLock { _vcpuTID = tid }
        var lastWasInterrupt = true
        while true {
            let proceed: Bool = monitor.withLock {
                // Park only after a KVM_RUN that returned EINTR, so a pending I/O exit
                // has been completed and the register state is final.
                while (pauseRequested && lastWasInterrupt) || (_state == .halted && !pauseRequested) || isFinished {
                    if quitRequested { return false }
                    if pauseRequested && lastWasInterrupt {
                        parked = true
                        if _state == .running || _state == .halted { _state = .paused }
                        monitor.broadcast()
                    }
                    monitor.wait()
                }
                parked = false
                if quitRequested { return false }
                return true
            }
            if !proceed { break }
            let exit: VCPUExit
            do {
                exit = try vcpu.runOnce()
            } catch {
                guestStopped(.internalError, "KVM_RUN failed: \(error)")
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
                monitor.withLock { if _state == .running { _state = .halted } }
            case .shutdown:
                guestStopped(.shutdown, "the guest shut down (triple fault)")
            case let .failEntry(reason):
                guestStopped(.internalError, "KVM could not enter the guest (hardware entry failure reason 0x\(String(reason, radix: 16)))")
            case let .internalError(sub):
                guestStopped(.internalError, "KVM internal error, suberror \(sub) (often an instruction KVM cannot emulate)")
            case let .other(reason):
                guestStopped(.internalError, "unhandled KVM exit reason \(reason)")
            }
            _exits &+= 1
        }
        monitor.withLock { parked = true; monitor.broadcast() }
    }

    private var isFinished: Bool { _state == .shutdown || _state == .internalError }

    private func guestStopped(_ s: VCPURunState, _ message: String) {
        monitor.withLock { _state = s; _error = message; monitor.broadcast() }
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

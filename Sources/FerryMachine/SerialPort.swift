import FerrySys
import Glibc

/// Where guest serial output goes. Bytes are written through at once, one write per byte
/// the guest emits, as QEMU does, so people and tools can tail it.
public enum SerialSink: Sendable {
    case none
    case stdout
    case file(String)
}

/// A 16550A UART at COM1 (0x3f8, IRQ 4). Transmission is instant (the transmitter is
/// always empty); the receive FIFO takes what `receive` is given (e.g. bytes typed on
/// stdin). Interrupts: received data (IER bit 0) and transmitter empty (IER bit 1), with
/// the IIR priorities of the real part; `raiseIRQ` drives the line when it changes.
/// Ownership: `fd`, `ownsFd`, `keep` are immutable; `raiseIRQ` is set before the guest
/// runs; every other field is guarded by `lock` (vCPU threads, the input thread and the
/// migration thread all reach the UART).
public final class SerialPort: @unchecked Sendable {
    public static let base: UInt16 = 0x3f8
    public static let irq: UInt32 = 4
    /// The receive FIFO holds 16 bytes on a 16550A; Ferry keeps more rather than drop typed input.
    static let receiveCapacity = 4096
    private let fd: Int32
    private let ownsFd: Bool
    private let lock = Monitor()
    private var regs = Registers()
    private var receiveQueue: [UInt8] = []
    private var irqLevel = false
    private var _output: [UInt8] = []
    private var _bytes = 0
    private var _received = 0
    /// The sink's reader is gone (EPIPE).
    private var sinkGone = false
    /// Keep at most this much output in memory for `recentOutput` (tests and status).
    private let keep = 4096
    /// Drives IRQ 4 (the machine sets it to its interrupt controller).
    public var raiseIRQ: (@Sendable (Bool) -> Void)?

    /// The software-visible registers (the migrated state, with the receive queue).
    struct Registers: Equatable {
        var ier: UInt8 = 0, lcr: UInt8 = 0, mcr: UInt8 = 0, scr: UInt8 = 0
        var dll: UInt8 = 0x0c, dlm: UInt8 = 0, fcr: UInt8 = 0
        /// A transmitter-empty interrupt is pending (cleared by reading IIR or writing THR).
        var thrEmptyPending = false
    }

    public init(sink: SerialSink) throws(SysError) {
        switch sink {
        case .none: fd = -1; ownsFd = false
        case .stdout: fd = 1; ownsFd = false
        case .file(let path):
            fd = try Sys.libc("open(\(path))") { open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644) }
            ownsFd = true
        }
    }

    deinit { if ownsFd { Sys.close(fd) } }

    public func contains(_ port: UInt16) -> Bool { port >= Self.base && port < Self.base + 8 }

    public func write(port: UInt16, value: UInt8) {
        locked { r in
            let dlab = r.lcr & 0x80 != 0
            switch Int(port - Self.base) {
            case 0 where dlab: r.dll = value
            case 0:
                emit(value)
                r.thrEmptyPending = true // sent at once: empty again
            case 1 where dlab: r.dlm = value
            case 1:
                // Enabling the empty interrupt while the transmitter is empty raises it (as QEMU).
                if value & 0x02 != 0 && r.ier & 0x02 == 0 { r.thrEmptyPending = true }
                r.ier = value & 0x0f
            case 2:
                r.fcr = value & 0xc9
                if value & 0x02 != 0 { receiveQueue.removeAll() }
            case 3: r.lcr = value
            case 4: r.mcr = value & 0x1f
            case 7: r.scr = value
            default: break
            }
        }
    }

    public func read(port: UInt16) -> UInt8 {
        locked { r in
            let dlab = r.lcr & 0x80 != 0
            switch Int(port - Self.base) {
            case 0 where dlab: return r.dll
            case 0: return receiveQueue.isEmpty ? 0 : receiveQueue.removeFirst()
            case 1 where dlab: return r.dlm
            case 1: return r.ier
            case 2:
                let iir = interruptIdentity(r)
                if iir == 0x02 { r.thrEmptyPending = false } // reading IIR acknowledges THRE
                return iir | (r.fcr & 0x01 != 0 ? 0xc0 : 0)
            case 3: return r.lcr
            case 4: return r.mcr
            case 5: return 0x60 | (receiveQueue.isEmpty ? 0 : 0x01) // THR empty, transmitter empty, data ready
            case 6:
                // Loopback mirrors MCR; otherwise CTS, DSR, DCD are up.
                if r.mcr & 0x10 != 0 { return (r.mcr & 0x0c) << 4 | (r.mcr & 0x03) << 4 }
                return 0xb0
            default: return r.scr
            }
        }
    }

    /// Bytes arriving on the line (typed on the console): queued, interrupt raised.
    public func receive(_ bytes: [UInt8]) {
        locked { _ in
            let room = Self.receiveCapacity - receiveQueue.count
            receiveQueue += bytes.prefix(max(0, room))
            _received += min(bytes.count, max(0, room))
        }
    }

    /// IIR's low bits: the highest-priority pending interrupt, or 1 (none).
    private func interruptIdentity(_ r: Registers) -> UInt8 {
        if r.ier & 0x01 != 0 && !receiveQueue.isEmpty { return 0x04 }
        if r.ier & 0x02 != 0 && r.thrEmptyPending { return 0x02 }
        return 0x01
    }

    /// Runs `body` on the registers under the lock, then brings the IRQ line up to date
    /// (outside the lock: the interrupt controller may call back into nothing of ours, but
    /// a KVM ioctl is not held under a device lock).
    private func locked<T>(_ body: (inout Registers) -> T) -> T {
        let (result, change): (T, Bool?) = lock.withLock {
            var r = regs
            let result = body(&r)
            regs = r
            let level = interruptIdentity(r) != 0x01
            defer { irqLevel = level }
            return (result, level != irqLevel ? level : nil)
        }
        if let change { raiseIRQ?(change) }
        return result
    }

    private func emit(_ byte: UInt8) {
        if fd >= 0 && !sinkGone {
            var b = byte
            do { try Sys.writeAll(fd, UnsafeRawBufferPointer(start: &b, count: 1)) } catch {
                // The reader went away (`ferry run | head`): the guest goes on, its output is
                // only kept in memory from now on.
                if error.errno == EPIPE { sinkGone = true }
            }
        }
        _bytes += 1
        _output.append(byte)
        if _output.count > keep * 2 { _output.removeFirst(_output.count - keep) }
    }

    /// Total bytes the guest has written.
    public var bytesWritten: Int { lock.withLock { _bytes } }
    /// Total bytes given to the guest's receiver.
    public var bytesReceived: Int { lock.withLock { _received } }

    /// The last few KiB of output.
    public var recentOutput: [UInt8] { lock.withLock { _output } }

    // MARK: migration ("serial", version 1)

    public static let stateVersion: UInt32 = 1

    /// Registers and the bytes received but not yet read by the guest.
    public func saveState() -> [UInt8] {
        lock.withLock {
            let r = regs
            var out: [UInt8] = [r.ier, r.lcr, r.mcr, r.scr, r.dll, r.dlm, r.fcr, r.thrEmptyPending ? 1 : 0]
            let n = UInt32(receiveQueue.count)
            out += [UInt8(n >> 24), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)]
            return out + receiveQueue
        }
    }

    public func restoreState(_ b: [UInt8]) throws(MachineError) {
        guard b.count >= 12 else { throw MachineError(.state, "serial state of \(b.count) bytes is truncated") }
        let n = Int(b[8]) << 24 | Int(b[9]) << 16 | Int(b[10]) << 8 | Int(b[11])
        guard n <= Self.receiveCapacity, b.count == 12 + n else { throw MachineError(.state, "serial state: receive queue of \(n) bytes in \(b.count - 12)") }
        locked { r in
            r = Registers(ier: b[0] & 0x0f, lcr: b[1], mcr: b[2] & 0x1f, scr: b[3], dll: b[4], dlm: b[5], fcr: b[6] & 0xc9, thrEmptyPending: b[7] != 0)
            receiveQueue = Array(b[12...])
            irqLevel = false // the new line starts low; `locked` raises it if an interrupt is pending
        }
    }
}

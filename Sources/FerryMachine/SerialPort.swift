import FerrySys
import Glibc

/// Where guest serial output goes. Bytes are written through at once, one write per byte
/// the guest emits, as QEMU does, so people and tools can tail it.
public enum SerialSink: Sendable {
    case none
    case stdout
    case file(String)
}

/// A minimal 16550 UART at COM1 (0x3f8): transmit only. The line status register always
/// says "transmitter empty", so polling guests never wait.
/// Ownership: `fd`, `ownsFd`, `keep` are immutable; `registers` and `sinkGone` belong to the
/// vCPU thread (port I/O exits); `_output` and `_bytes` are guarded by `lock`.
public final class SerialPort: @unchecked Sendable {
    public static let base: UInt16 = 0x3f8
    private let fd: Int32
    private let ownsFd: Bool
    private var registers = [UInt8](repeating: 0, count: 8)
    private let lock = Monitor()
    private var _output: [UInt8] = []
    private var _bytes = 0
    /// The sink's reader is gone (EPIPE); only the vCPU thread touches it.
    private var sinkGone = false
    /// Keep at most this much output in memory for `recentOutput` (tests and status).
    private let keep = 4096

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
        let reg = Int(port - Self.base)
        let dlab = registers[3] & 0x80 != 0
        if reg == 0 && !dlab {
            emit(value)
        } else {
            registers[reg] = value
        }
    }

    public func read(port: UInt16) -> UInt8 {
        let reg = Int(port - Self.base)
        switch reg {
        case 5: return 0x60 // LSR: THR empty, transmitter empty
        case 6: return 0xb0 // MSR: CTS, DSR, DCD
        case 2: return 0x01 // IIR: no interrupt pending
        default: return registers[reg]
        }
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
        lock.withLock {
            _bytes += 1
            _output.append(byte)
            if _output.count > keep * 2 { _output.removeFirst(_output.count - keep) }
        }
    }

    /// Total bytes the guest has written.
    public var bytesWritten: Int { lock.withLock { _bytes } }

    /// The last few KiB of output.
    public var recentOutput: [UInt8] { lock.withLock { _output } }
}

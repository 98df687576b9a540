import ArgumentParser
import FerryMachine
import FerryMigration
import FerryQMP
import FerryMemory
import FerrySys
import Glibc

@main
struct Ferry: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ferry",
        abstract: "Live migration of KVM virtual machines.",
        version: FerryIdentity.package,
        subcommands: [Run.self, Migrate.self, Demo.self, GuestImage.self, CheckMemory.self])

    static func main() {
        Sys.ignoreSIGPIPE() // before any thread: no write to a vanished reader kills ferry
        main(nil)
    }
}

/// Parses sizes as QEMU does: plain bytes (decimal or 0x hex) or a K/M/G/T suffix (powers
/// of 1024). A size that does not fit in 64 bits is refused, never wrapped or trapped.
struct ByteSize: ExpressibleByArgument, CustomStringConvertible {
    let bytes: Int
    init?(argument: String) {
        guard let b = ByteSize.parse(argument) else { return nil }
        bytes = b
    }

    static func parse(_ text: String) -> Int? {
        var s = text.uppercased()
        if s.hasPrefix("0X") {
            guard let v = Int(s.dropFirst(2), radix: 16), v > 0 else { return nil }
            return v
        }
        if s.hasSuffix("IB") { s.removeLast(2) } else if s.hasSuffix("B") { s.removeLast() }
        var mult = 1
        if let last = s.last, let k = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40][String(last)] {
            mult = k
            s.removeLast()
        }
        guard let v = Int(s), v > 0 else { return nil }
        let (product, overflow) = v.multipliedReportingOverflow(by: mult)
        return overflow ? nil : product
    }

    var description: String { bytes % (1 << 30) == 0 ? "\(bytes >> 30)G" : bytes % (1 << 20) == 0 ? "\(bytes >> 20)M" : "\(bytes)" }
    /// What --help shows as the default: "256M", not the struct.
    var defaultValueDescription: String { description }
    static var helpText: String { "bytes, 0x hex, or with a K/M/G/T suffix" }
}

extension TestGuestContents: ExpressibleByArgument {}

/// How the built-in test guest is laid out and filled (`ferry run`, `ferry check-memory`).
struct TestGuestOptions: ParsableArguments {
    @Option(help: "Built-in test guest: how much RAM it walks (from address 0), e.g. 1G of a 64G guest; all of it by default.")
    var touchRAM: ByteSize?

    @Option(help: "Built-in test guest: what its pages hold besides the byte it increments: zero, or random[:SEED] (filled from the host before it starts).")
    var fillRAM: TestGuestContents = .zero
}

extension SerialSink: ExpressibleByArgument {
    public init?(argument: String) {
        switch argument {
        case "stdio", "stdout": self = .stdout
        case "none", "null": self = .none
        default: self = .file(argument)
        }
    }
}

/// Blocks SIGINT/SIGTERM in every thread (call before starting any) and returns a waiter.
/// SIGPIPE is ignored too: a QMP client, a pipe on --serial stdio or a peer that goes away
/// is an EPIPE error where it matters, never the end of the VM.
func blockTerminationSignals() -> @Sendable () -> Int32 {
    Sys.ignoreSIGPIPE()
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGINT)
    sigaddset(&set, SIGTERM)
    pthread_sigmask(SIG_BLOCK, &set, nil)
    // A shell starts background jobs with SIGINT ignored; an ignored signal is dropped
    // even while blocked, so sigwait would never see it.
    signal(SIGINT, SIG_DFL)
    signal(SIGTERM, SIG_DFL)
    let blocked = set
    return {
        var waitSet = blocked
        var sig: Int32 = 0
        sigwait(&waitSet, &sig)
        return sig
    }
}

/// `--migrate-capability` / `--migrate-parameter` on this process's own VM, through the QMP
/// commands (their checks and messages).
func applyMigrationSettings(_ settings: MigrationSettingOptions, to host: VMHost) throws {
    do {
        let caps = try settings.capabilities()
        if !caps.isEmpty {
            _ = try LocalQMP.execute("migrate-set-capabilities", ["capabilities": caps.map { ["capability": $0.rawValue, "state": true] }], host: host)
        }
        let params = try settings.parameters()
        if !params.isEmpty { _ = try LocalQMP.execute("migrate-set-parameters", params, host: host) }
    } catch let e as QMPError {
        fail("migration settings: \(e.desc)")
    }
}

func fail(_ message: String) -> Never {
    FileHandleStderr.write("ferry: \(message)\n")
    Glibc.exit(1)
}

enum FileHandleStderr {
    static func write(_ s: String) {
        var s = s
        s.withUTF8 { _ = try? Sys.writeAll(2, UnsafeRawBufferPointer($0)) }
    }
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run a VM until interrupted (or until QMP 'quit').")

    @Option(help: "Guest RAM size (\(ByteSize.helpText), e.g. 256M, 8G; up to 64G, mapped lazily).")
    var memory: ByteSize = ByteSize(argument: "256M")!

    @Option(help: "Number of vCPUs (1-\(Machine.maxVCPUs)).")
    var smp: Int = 1

    @Option(help: "A raw disk image whose first sector is a boot sector. Default: the built-in test guest.")
    var guest: String?

    @Option(help: "Boot a Linux bzImage (64-bit boot protocol) instead of a disk image.")
    var kernel: String?

    @Option(help: "With --kernel: an initrd / initramfs image.")
    var initrd: String?

    @Option(help: "With --kernel: the kernel command line.")
    var append: String = "console=ttyS0 earlyprintk=ttyS0"


    @OptionGroup var testGuest: TestGuestOptions

    @Option(help: "Where guest serial (COM1) output goes: stdio, none, or a file path.")
    var serial: SerialSink = .stdout

    @Option(help: "QMP control socket path (created with mode 0600; refused if another process listens there).")
    var qmp: String?

    @Option(help: "Wait for an incoming migration on URI (tcp:HOST:PORT, unix:PATH, exec:CMD, file:PATH), or 'defer' for QMP migrate-incoming.")
    var incoming: String?

    @Flag(help: "Keep running after a failed incoming migration (default: print the error and exit 1, as QEMU does).")
    var keepOnIncomingFailure = false

    @Flag(name: [.customShort("S"), .long], help: "Do not start the guest until QMP 'cont'.")
    var paused = false

    @Option(name: .customLong("object"), help: "Create an object as QMP object-add would, e.g. tls-creds-x509,id=tls0,dir=PATH,endpoint=server (repeatable).")
    var objects: [String] = []

    @OptionGroup(title: "Migration settings (applied before --incoming starts listening)")
    var migration: MigrationSettingOptions

    @OptionGroup(title: "Log")
    var log: LogOptions

    @Option(help: ArgumentHelp("Serve Prometheus metrics of the migration on http://HOST:PORT/metrics (e.g. 127.0.0.1:9464).", valueName: "HOST:PORT"))
    var metricsListen: String?

    func validate() throws {
        if let m = metricsListen {
            guard let colon = m.lastIndex(of: ":"), UInt16(m[m.index(after: colon)...]) != nil, colon != m.startIndex else {
                throw ValidationError("--metrics-listen \(m): expected HOST:PORT, e.g. 127.0.0.1:9464")
            }
        }
    }

    func run() throws {
        try log.bootstrap() // before any thread or Logger
        let waitForSignal = blockTerminationSignals()
        let quit = QuitRequest()
        let host: VMHost
        var server: QMPServer?
        var metrics: MetricsServer?
        do {
            let machine = try Machine(memorySize: memory.bytes, vcpus: smp, serial: serial)
            if case .stdout = serial { try forwardStdin(to: machine.serial) }
            host = VMHost(machine: machine, incoming: incoming != nil)
            for o in objects { try host.addObject(try QOMObjects.create(try QOMObjects.parseCommandLine(o))) }
            try applyMigrationSettings(migration, to: host)
            if let m = metricsListen, let colon = m.lastIndex(of: ":"), let port = UInt16(m[m.index(after: colon)...]) {
                let exporter = try MetricsServer(host: host, address: String(m[..<colon]), port: port)
                try exporter.start()
                metrics = exporter
            }
            if let qmp {
                server = try QMPServer(path: qmp, host: host)
                server?.onQuit = { quit.request() }
                try server?.start()
            }
            if incoming != nil && !keepOnIncomingFailure {
                // As QEMU: a destination whose incoming migration failed has nothing to run.
                host.onIncomingFailure = { why in
                    FileHandleStderr.write("ferry: incoming migration failed: \(why)\n")
                    quit.request(exitCode: 1)
                }
            }
            if let incoming {
                if incoming != "defer" { try host.migrateIncoming(uri: incoming) }
            } else {
                if let kernel {
                    try machine.loadLinux(kernel: try readFile(kernel), initrd: try initrd.map(readFile), commandLine: append)
                } else if let guest { try machine.loadBootSector(try readFile(guest)) } else {
                    try machine.loadTestGuest(touching: testGuest.touchRAM?.bytes, contents: testGuest.fillRAM)
                }
                if !paused { try host.cont() }
            }
            machine.onGuestStop = { state, message in
                FileHandleStderr.write("ferry: guest stopped (\(state.rawValue)): \(message ?? "")\n")
            }
        } catch {
            fail("\(error)")
        }
        // SIGTERM/SIGINT end the VM, except the first one while postcopy splits the guest
        // between two hosts: exiting then loses the guest, so say why and wait for a second.
        var warned = false
        while true {
            let sig = waitForSignal()
            if quit.requested { break }
            if !warned, let why = host.exitRefusal {
                warned = true
                let name = sig == SIGINT ? "SIGINT" : "SIGTERM"
                FileHandleStderr.write("ferry: not exiting on \(name): \(why). Send it again (or SIGKILL) to exit anyway.\n")
                server?.broadcast("X_EXIT_REFUSED", ["signal": name, "reason": why])
                continue
            }
            break
        }
        server?.close()
        metrics?.close()
        host.prepareForExit()
        host.machine.stop()
        if host.machine.unhandledIOCount > 0 {
            FileHandleStderr.write("ferry: \(host.machine.unhandledIOCount) accesses to unmodelled I/O ports were ignored\n")
        }
        if quit.exitCode != 0 { throw ExitCode(quit.exitCode) }
    }
}

/// An exit asked for from another thread (QMP `quit`, a failed incoming migration): wakes
/// the main thread's signal wait with SIGTERM. Ownership: fields guarded by `lock`.
final class QuitRequest: @unchecked Sendable {
    private let lock = Monitor()
    private var _requested = false
    private var _exitCode: Int32 = 0
    func request(exitCode: Int32 = 0) {
        lock.withLock { _requested = true; _exitCode = max(_exitCode, exitCode) }
        kill(getpid(), SIGTERM)
    }
    var requested: Bool { lock.withLock { _requested } }
    var exitCode: Int32 { lock.withLock { _exitCode } }
}

func readFile(_ path: String) throws -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw SysError(errno: errno, call: "open(\(path))") }
    defer { close(fd) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = try buf.withUnsafeMutableBytes { p in try Sys.libc("read(\(path))") { read(fd, p.baseAddress, p.count) } }
        if n == 0 { break }
        out += buf[0..<n]
    }
    return out
}

func writeFile(_ path: String, _ bytes: [UInt8]) throws {
    let fd = try Sys.libc("open(\(path))") { open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) }
    defer { close(fd) }
    try bytes.withUnsafeBytes { try Sys.writeAll(fd, $0) }
}

struct GuestImage: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "guest-image",
        abstract: "Write the test guest's disk image laid out for a machine, for other VMMs (e.g. qemu-system-x86_64 -smp N -m M -drive file=IMG,format=raw).")

    @Option(help: "The guest's RAM size; its vCPUs walk pages from 1 MiB up to it.")
    var memory: ByteSize = ByteSize(argument: "512M")!

    @Option(help: "Number of vCPUs (1-\(Machine.maxVCPUs)); each walks its own stripe of RAM.")
    var smp: Int = 1

    @Option(help: "Output image path.")
    var output: String

    @Option(help: "How much RAM the guest walks (from address 0), e.g. 1G; all of it by default.")
    var touchRAM: ByteSize?

    func run() throws {
        guard memory.bytes >= 2 << 20, memory.bytes <= MachineShape.maxMemory else {
            fail("--memory \(memory.bytes): the test guest runs in 2 MiB to \(MachineShape.maxMemory >> 30) GiB of RAM")
        }
        guard (1...Machine.maxVCPUs).contains(smp) else { fail("--smp \(smp): 1 to \(Machine.maxVCPUs) vCPUs") }
        let layout = TestGuestLayout(memory: memory.bytes, vcpus: smp, touched: touchRAM?.bytes)
        let image = TestGuest.image(layout)
        do { try writeFile(output, image) } catch { fail("\(error)") }
        print("wrote \(output): \(image.count)-byte image for \(smp) vCPU\(smp == 1 ? "" : "s") and \(memory.bytes >> 20) MiB")
    }
}

struct CheckMemory: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-memory",
        abstract: "Check a raw guest memory dump (guest-physical, from 0) against the test guest's rule.")

    @Argument(help: "Raw memory dump, e.g. from QMP pmemsave.")
    var dump: String

    @Option(help: "The guest's RAM size (as given to guest-image), e.g. 512M.")
    var memory: ByteSize

    @Option(help: "The guest's vCPU count (as given to guest-image).")
    var smp: Int = 1

    @OptionGroup var testGuest: TestGuestOptions

    func run() throws {
        let bytes: [UInt8]
        do { bytes = try readFile(dump) } catch { fail("\(error)") }
        guard bytes.count > 0x10_0000 else { fail("\(dump) holds \(bytes.count) bytes; the test guest's pages start at 1 MiB") }
        guard memory.bytes < GuestMemory.pcSplitAbove else { fail("check-memory reads dumps of guests below 3.5 GiB (no hole in the dump)") }
        let layout = TestGuestLayout(memory: memory.bytes, vcpus: smp, touched: testGuest.touchRAM?.bytes, contents: testGuest.fillRAM)
        let report = bytes.withUnsafeBytes { TestGuestChecker(layout: layout).check(base: $0.baseAddress!, size: $0.count) }
        print(report)
        if !report.passed { throw ExitCode(1) }
    }
}

/// `--serial stdio`: what is typed on stdin reaches the guest's UART (`ferry-stdin` thread).
func forwardStdin(to serial: SerialPort) throws {
    try KernelThread.detached(name: "ferry-stdin") {
        var buf = [UInt8](repeating: 0, count: 256)
        while true {
            let n = buf.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return } // end of input: the guest just hears nothing more
            serial.receive(Array(buf[0..<n]))
        }
    }
}

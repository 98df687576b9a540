import Foundation
import FerryMachine
import FerryMemory
import FerryQMP
import FerrySys
import Glibc

/// Runs whole `ferry run` processes and drives them over QMP, as an operator would: the
/// demo and the benchmarks are built on it.
/// Ownership: every field is immutable; `qmp` serialises its own use.
public final class FerryProcess: @unchecked Sendable {
    public let pid: pid_t
    public let qmpPath: String
    public let serialPath: String
    public let qmp: QMPClient

    /// Starts `program` with the arguments `makeArguments(qmpPath, serialPath)` builds, inside
    /// `namespace` when given (`ip netns exec`), and connects to its QMP socket with events on.
    private init(directory: String, name: String, program: String, namespace: String?,
                 makeArguments: (_ qmp: String, _ serial: String) -> [String]) throws {
        qmpPath = "\(directory)/\(name).qmp"
        serialPath = "\(directory)/\(name)-serial.log"
        unlink(qmpPath)
        let args = makeArguments(qmpPath, serialPath)
        if let namespace {
            pid = try spawn("/usr/sbin/ip", ["netns", "exec", namespace, program] + args)
        } else {
            pid = try spawn(program, args)
        }
        ChildProcesses.shared.add(pid)
        qmp = try QMPClient(path: qmpPath)
        try qmp.execute("migrate-set-capabilities", ["capabilities": [["capability": "events", "state": true]]])
    }

    /// A `ferry run` process; `namespace`: run inside that network namespace.
    public convenience init(executable: String, directory: String, name: String, arguments: [String], namespace: String? = nil) throws {
        try self.init(directory: directory, name: name, program: executable, namespace: namespace) { qmp, serial in
            ["run", "--qmp", qmp, "--serial", serial] + arguments
        }
    }

    /// The same guest under QEMU (`qemu-system-x86_64`, KVM), for side-by-side numbers: the
    /// test guest image laid out as `guest` (or `image`), serial to a file, QMP on a socket.
    /// With `random` contents the source's `pc.ram` is a private mapping of a file filled
    /// the way `ferry run --fill-ram` fills RAM (`memory-backend-file`, `share=off`), and
    /// the destination's an anonymous `memory-backend-ram` of the same id.
    public convenience init(qemuDirectory directory: String, name: String, guest: TestGuestLayout, image: String?, incoming: Bool, namespace: String? = nil) throws {
        var img = image ?? ""
        if image == nil {
            img = "\(directory)/\(name)-guest.img"
            FileManager.default.createFile(atPath: img, contents: Data(TestGuest.image(guest)))
        }
        // A guest bigger than this host's RAM needs `reserve=off` (MAP_NORESERVE, as Ferry
        // maps RAM): QEMU 7.2 cannot set up 64 GiB of `pc.ram` here without it.
        var machine = ["-machine", "pc,accel=kvm"]
        let size = "size=\(guest.memory >> 20)M"
        var backend: String?
        if guest.contents != .zero && !incoming {
            let file = "\(directory)/\(name)-ram.bin"
            try writeFilledRAM(guest, to: file)
            backend = "memory-backend-file,id=pc.ram,\(size),mem-path=\(file),share=off"
        } else if guest.contents != .zero || guest.memory > 8 << 30 {
            backend = "memory-backend-ram,id=pc.ram,\(size)" + (guest.memory > 8 << 30 ? ",reserve=off" : "")
        }
        if let backend { machine += ["-object", backend]; machine[1] += ",memory-backend=pc.ram" }
        try self.init(directory: directory, name: name, program: "/usr/bin/qemu-system-x86_64", namespace: namespace) { qmp, serial in
            machine + ["-m", "\(guest.memory >> 20)M", "-smp", "\(guest.vcpus)", "-drive", "file=\(img),format=raw,if=ide",
             "-display", "none", "-vga", "none", "-nodefaults", "-serial", "file:\(serial)",
             "-qmp", "unix:\(qmp),server=on,wait=off"] + (incoming ? ["-incoming", "defer"] : [])
        }
    }

    /// TLS for this process's migrations over QMP: object-add of the x509 credentials in
    /// `directory` (made by scripts/tls-creds.sh: server/ and client/), then tls-creds. The
    /// source checks the destination's certificate for "localhost".
    public func enableTLS(credentials directory: String, server: Bool) throws {
        try qmp.execute("object-add", ["qom-type": "tls-creds-x509", "id": "tls0", "dir": "\(directory)/\(server ? "server" : "client")",
                                       "endpoint": server ? "server" : "client"])
        var params: [String: Any] = ["tls-creds": "tls0"]
        if !server { params["tls-hostname"] = "localhost" }
        try qmp.execute("migrate-set-parameters", params)
    }

    /// SIGTERM; a second one after 200 ms if the process is still there (ferry refuses the
    /// first while postcopy splits the guest, and says why); SIGKILL if it has not gone
    /// within 5 s.
    public func terminate() {
        defer { ChildProcesses.shared.remove(pid) }
        kill(pid, SIGTERM)
        var st: Int32 = 0
        for i in 0..<500 {
            if waitpid(pid, &st, WNOHANG) == pid { return }
            if i == 20 { kill(pid, SIGTERM) }
            usleep(10_000)
        }
        kill(pid, SIGKILL)
        waitpid(pid, &st, 0)
    }

    public var serialBytes: Int {
        var st = stat()
        return stat(serialPath, &st) == 0 ? Int(st.st_size) : 0
    }

    /// Waits until the guest has written at least `count` serial bytes.
    @discardableResult
    public func waitForSerial(_ count: Int, seconds: Double) -> Bool {
        let end = Sys.monotonicNanos() + UInt64(seconds * 1e9)
        while serialBytes < count {
            if Sys.monotonicNanos() > end { return false }
            usleep(20_000)
        }
        return true
    }

    /// Stops the guest, dumps its RAM with pmemsave (one dump per part of `pc.ram`, on
    /// each side of the hole below 4 GiB, mapped back to back as the block's offsets) and
    /// runs the memory check on it. `unfilled`: pages whose fill is not checked.
    public func checkMemory(_ guest: TestGuestLayout, scratch: String, unfilled: Set<UInt64> = []) throws -> TestGuestChecker.Report {
        try withRAMDump(size: guest.memory, upTo: guest.checkedBytes, scratch: scratch) {
            TestGuestChecker(layout: guest, unfilled: unfilled).check(base: $0, size: guest.memory)
        }
    }

    /// The walked pages whose random fill this VM itself no longer holds: under QEMU,
    /// SeaBIOS's own memory (tens of pages near the top of RAM, written before the guest
    /// runs). Read from the stopped source after its migration, so the destination's check
    /// skips exactly those.
    public func pagesWithoutFill(_ guest: TestGuestLayout, scratch: String) throws -> Set<UInt64> {
        guard guest.contents != .zero else { return [] }
        return try withRAMDump(size: guest.memory, upTo: guest.checkedBytes, scratch: scratch) { guest.pagesWithoutFill(base: $0, size: guest.memory) }
    }

    /// Dumps `pc.ram` from offset 0 up to `upTo` (the rest of the `size`-byte range stays
    /// unmapped: a sparse 64 GiB guest's check reads the touched GiB only).
    private func withRAMDump<T>(size: Int, upTo: Int, scratch: String, _ body: (UnsafeRawPointer) -> T) throws -> T {
        try qmp.execute("stop")
        let parts = GuestMemory.pcMappings(size: size).compactMap { m -> GuestMapping? in
            guard m.offset < upTo else { return nil }
            return GuestMapping(guestAddress: m.guestAddress, offset: m.offset, length: min(m.length, upTo - m.offset))
        }
        let files = parts.indices.map { "\(scratch).\($0)" }
        defer { for f in files { unlink(f) } }
        for (m, f) in zip(parts, files) {
            try qmp.execute("pmemsave", ["val": m.guestAddress, "size": m.length, "filename": f])
        }
        // One reserved range, each dump mapped over its part.
        guard let base = mmap(nil, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0), base != MAP_FAILED else {
            throw SysError(errno: errno, call: "mmap(\(size))")
        }
        defer { munmap(base, size) }
        for (m, f) in zip(parts, files) {
            let fd = open(f, O_RDONLY)
            guard fd >= 0 else { throw SysError(errno: errno, call: "open(\(f))") }
            defer { close(fd) }
            guard mmap(base + m.offset, m.length, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0) != MAP_FAILED else {
                throw SysError(errno: errno, call: "mmap(\(f))")
            }
        }
        return body(base)
    }
}

/// A `pc.ram` image for QEMU's `memory-backend-file`: sparse, with `guest.contents` in the
/// pages the guest walks.
func writeFilledRAM(_ guest: TestGuestLayout, to path: String) throws {
    let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw SysError(errno: errno, call: "open(\(path))") }
    defer { close(fd) }
    guard ftruncate(fd, off_t(guest.memory)) == 0 else { throw SysError(errno: errno, call: "ftruncate(\(path))") }
    guard let p = mmap(nil, guest.memory, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
        throw SysError(errno: errno, call: "mmap(\(path))")
    }
    defer { munmap(p, guest.memory) }
    guest.fill(base: p, size: guest.memory)
}

/// `ferry run` arguments for the test guest laid out as `guest`.
public func ferryGuestArguments(_ guest: TestGuestLayout, touched: Int?) -> [String] {
    var a = ["--memory", String(guest.memory), "--smp", String(guest.vcpus)]
    if let touched { a += ["--touch-ram", String(touched)] }
    if guest.contents != .zero { a += ["--fill-ram", guest.contents.description] }
    return a
}

/// Makes test TLS credentials in `directory` (QEMU's tls-creds-x509 layout: server/, client/,
/// plus rogue/ from another CA and psk/) with scripts/tls-creds.sh, which needs openssl.
public func makeTestTLSCredentials(in directory: String) throws {
    let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("scripts/tls-creds.sh").path
    var st: Int32 = 0
    waitpid(try spawn("/bin/bash", [script, directory]), &st, 0)
    guard st == 0, access("\(directory)/server/server-key.pem", R_OK) == 0 else {
        throw SysError(errno: ENOENT, call: "\(script) \(directory) (is openssl installed?)")
    }
}

/// The VM processes a demo or benchmark started, so that an interrupted run (Ctrl-C,
/// SIGTERM) takes them down with it instead of leaving them migrating in the background.
/// Ownership: `pids` is guarded by `lock`.
public final class ChildProcesses: @unchecked Sendable {
    public static let shared = ChildProcesses()
    private let lock = Monitor()
    private var pids: Set<pid_t> = []
    func add(_ p: pid_t) { lock.withLock { _ = pids.insert(p) } }
    func remove(_ p: pid_t) { lock.withLock { _ = pids.remove(p) } }

    /// Blocks SIGINT/SIGTERM in every thread (call first, before any thread starts) and
    /// starts a thread that, on either, kills every registered child and exits.
    public static func terminateOnSignals() {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        pthread_sigmask(SIG_BLOCK, &set, nil)
        let waitSet = set
        _ = try? KernelThread(name: "signals") {
            var set = waitSet, sig: Int32 = 0
            sigwait(&set, &sig)
            let all = shared.lock.withLock { shared.pids }
            for p in all { kill(p, SIGKILL) }
            for p in all { var st: Int32 = 0; waitpid(p, &st, 0) }
            Glibc.exit(128 + sig)
        }
    }
}

/// The path of the running executable's sibling `ferry` binary.
public func ferryExecutable() -> String {
    let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    let sibling = URL(fileURLWithPath: me).deletingLastPathComponent().appendingPathComponent("ferry").path
    return FileManager.default.isExecutableFile(atPath: sibling) ? sibling : me
}

public func spawn(_ exe: String, _ args: [String]) throws -> pid_t {
    try Sys.spawn(exe, args)
}

/// One measured migration between two fresh processes.
public struct MigrationRun: Codable, Sendable {
    public var engine: Engine = .ferry
    public var scenario: String
    public var memoryBytes: Int
    public var maxBandwidth: UInt64
    public var status: String
    public var totalTimeMs: UInt64
    public var downtimeMs: UInt64?
    public var setupTimeMs: UInt64
    public var bytesSent: UInt64
    public var throughputMBps: Double
    public var passes: UInt64
    /// Destination memory check after completion (test guest only).
    public var memoryCheckPassed: Bool?
    /// After a cancelled migration: the source guest still runs and passes the memory check.
    public var sourceIntactAfterCancel: Bool?
    public var error: String?
    /// The memory check's report (stripes, counters, ticks).
    public var memoryCheck: String?
    /// Destination: how far the guest clock moved across the switch-over (x-guest-clock-gap-us).
    public var guestClockGapUs: Double?
    /// The source's STOP event to the destination's RESUME, from the events' own timestamps.
    public var switchoverPauseMs: Double?
    /// Ferry's x-switchover-us of the source and the destination (step → µs).
    public var switchoverSteps: [String: UInt64]?
    /// The guest's passes per second (serial bytes) in the second before the migration and
    /// during it: what a throttle cost the guest (`auto-converge` scenarios).
    public var guestRateBefore: Double?
    public var guestRateDuring: Double?
    /// The guest's passes the throttle cost it: what it would have made at the rate before,
    /// over the migration's time, less what it made (a rate alone favours a slower engine).
    public var guestPassesLost: Double?
    /// The highest cpu-throttle-percentage seen.
    public var maxThrottlePercent: UInt64?
    /// xbzrle-cache at the end (pages, bytes, cache-miss, overflow).
    public var xbzrlePages: UInt64?
    public var xbzrleBytes: UInt64?
    /// Random contents: walked pages the source itself no longer held the fill of (its
    /// firmware's), not checked on the destination.
    public var pagesWithoutFill: Int?
}

/// The pause a guest sees at the switch-over: the source's STOP event to the destination's
/// RESUME, from the timestamps QEMU and Ferry put on their events (one host, one clock).
/// Ferry's own step-by-step account (x-switchover-us) of both sides, prefixed src./dst.
public func switchoverPause(source src: FerryProcess, destination dst: FerryProcess) -> (ms: Double?, steps: [String: UInt64]?) {
    _ = try? src.qmp.execute("query-status")  // collects the events that came meanwhile
    _ = try? dst.qmp.execute("query-status")
    func at(_ p: FerryProcess, _ name: String) -> Double? {
        guard let e = p.qmp.events.first(where: { $0["event"] as? String == name }), let ts = e["timestamp"] as? [String: Any] else { return nil }
        return Double(qmpNumber(ts["seconds"])) + Double(qmpNumber(ts["microseconds"])) / 1e6
    }
    let ms = at(src, "STOP").flatMap { s in at(dst, "RESUME").map { max(0, ($0 - s) * 1000) } }
    var steps: [String: UInt64] = [:]
    for (side, p) in [("src", src), ("dst", dst)] {
        let q = (try? p.qmp.execute("query-migrate")) as? [String: Any]
        for (k, v) in (q?["x-switchover-us"] as? [String: Any]) ?? [:] { steps["\(side).\(k)"] = qmpNumber(v) }
    }
    return (ms, steps.isEmpty ? nil : steps)
}

/// Which VMM runs both ends of a scenario.
public enum Engine: String, Codable, Sendable { case ferry, qemu }

/// Whether QEMU is installed for side-by-side runs.
public var qemuAvailable: Bool { FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64") }

public struct PrecopyScenario: Sendable {
    public var engine: Engine = .ferry
    public var name: String
    public var memory: Int
    /// nil: the built-in dirtying test guest; else a boot-sector image path.
    public var guestImage: String?
    public var maxBandwidth: UInt64 = 0
    public var downtimeLimit: UInt64 = 300
    /// Stop waiting for completion after this long and cancel (non-converging runs).
    public var timeoutSeconds: Double = 120
    public var transport = "tcp"
    /// TLS credentials directory (scripts/tls-creds.sh layout); nil = plain.
    public var tlsDirectory: String?
    public var vcpus = 1
    /// The test guest walks this much RAM (all by default) ...
    public var touched: Int?
    /// ... holding this.
    public var contents: TestGuestContents = .zero
    /// Capabilities and parameters set on both ends (QEMU's names), e.g. xbzrle, multifd.
    public var capabilities: [String] = []
    public var parameters: [String: UInt64] = [:]
    /// String-valued ones, e.g. `multifd-compression`.
    public var textParameters: [String: String] = [:]
    public init(name: String, memory: Int, guestImage: String? = nil) { self.name = name; self.memory = memory; self.guestImage = guestImage }
    public var guest: TestGuestLayout { TestGuestLayout(memory: memory, vcpus: vcpus, touched: touched, contents: contents) }
}

public func qmpNumber(_ v: Any?) -> UInt64 { (v as? NSNumber)?.uint64Value ?? 0 }

/// QEMU 7.2 sometimes says `completed` a moment before it has set `total-time` and
/// `downtime` (both 0 then): asks again, for up to a second, until they are there.
func settledCompletion(_ p: FerryProcess, _ info: [String: Any]) throws -> [String: Any] {
    var info = info
    for _ in 0..<50 where info["status"] as? String == "completed" && qmpNumber(info["total-time"]) == 0 {
        usleep(20_000)
        info = try p.qmp.execute("query-migrate") as? [String: Any] ?? info
    }
    return info
}

/// Starts source and destination processes, migrates with `scenario`'s settings, checks the
/// destination's memory (for the test guest) and returns the numbers. `progress` is called
/// with every `query-migrate` result while it runs.
public func runPrecopy(_ scenario: PrecopyScenario, directory: String, executable: String = ferryExecutable(),
                       progress: ([String: Any]) -> Void = { _ in }) throws -> MigrationRun {
    mkdir(directory, 0o700)
    var guestArgs: [String] = []
    if let g = scenario.guestImage { guestArgs = ["--guest", g] }
    let qemu = scenario.engine == .qemu
    let guest = scenario.guest
    let shape = ["--memory", String(scenario.memory), "--smp", String(scenario.vcpus)]
    let src = qemu ? try FerryProcess(qemuDirectory: directory, name: "src", guest: guest, image: scenario.guestImage, incoming: false)
                   : try FerryProcess(executable: executable, directory: directory, name: "src",
                                      arguments: scenario.guestImage == nil ? ferryGuestArguments(guest, touched: scenario.touched) : shape + guestArgs)
    defer { src.terminate() }
    let dst = qemu ? try FerryProcess(qemuDirectory: directory, name: "dst", guest: guest, image: scenario.guestImage, incoming: true)
                   : try FerryProcess(executable: executable, directory: directory, name: "dst", arguments: shape + ["--incoming", "defer"])
    defer { dst.terminate() }
    if scenario.guestImage == nil { src.waitForSerial(3, seconds: 60) } else { usleep(200_000) }
    let incoming = scenario.transport == "unix" ? "unix:\(directory)/migrate.sock" : "tcp:127.0.0.1:0"
    if let tls = scenario.tlsDirectory {
        try src.enableTLS(credentials: tls, server: false)
        try dst.enableTLS(credentials: tls, server: true)
    }
    // Capabilities on both ends, and on the destination before migrate-incoming (QEMU sizes
    // its listen backlog for multifd then). Parameters too on both: multifd's channel count
    // and compression must match (the source's limits mean nothing on the destination).
    if !scenario.capabilities.isEmpty {
        for p in [src, dst] { try p.qmp.execute("migrate-set-capabilities", ["capabilities": scenario.capabilities.map { ["capability": $0, "state": true] }]) }
    }
    var common: [String: Any] = scenario.parameters
    for (k, v) in scenario.textParameters { common[k] = v }
    if !common.isEmpty { try dst.qmp.execute("migrate-set-parameters", common) }
    try dst.qmp.execute("migrate-incoming", ["uri": incoming])
    var target = incoming
    if let q = try dst.qmp.execute("query-migrate") as? [String: Any],
       let addr = (q["socket-address"] as? [[String: Any]])?.first, addr["type"] as? String == "inet" {
        target = "tcp:\(addr["host"]!):\(addr["port"]!)"
    }
    var parameters = common
    parameters["max-bandwidth"] = scenario.maxBandwidth
    parameters["downtime-limit"] = scenario.downtimeLimit
    try src.qmp.execute("migrate-set-parameters", parameters)
    let measureGuest = scenario.capabilities.contains("auto-converge") && scenario.guestImage == nil
    var rateBefore: Double?
    if measureGuest {
        // Over 4 s: the guest writes a byte or two a second, so one second is too coarse.
        let a = src.serialBytes
        usleep(4_000_000)
        rateBefore = Double(src.serialBytes - a) / 4
    }
    let serialAtStart = src.serialBytes
    try src.qmp.execute("migrate", ["uri": target])
    let start = Sys.monotonicNanos()
    var info: [String: Any] = [:]
    var cancelled = false
    var maxThrottle: UInt64?
    var serialAtStop: Int?
    while true {
        info = try src.qmp.execute("query-migrate") as? [String: Any] ?? [:]
        progress(info)
        if let t = info["cpu-throttle-percentage"] { maxThrottle = max(maxThrottle ?? 0, qmpNumber(t)) }
        if serialAtStop == nil, let st = info["status"] as? String, st != "active" && st != "setup" { serialAtStop = src.serialBytes }
        let status = info["status"] as? String ?? ""
        if ["completed", "failed", "cancelled"].contains(status) { info = try settledCompletion(src, info); break }
        if !cancelled && Double(Sys.monotonicNanos() - start) / 1e9 > scenario.timeoutSeconds {
            try src.qmp.execute("migrate_cancel")
            cancelled = true
        }
        usleep(20_000)
    }
    let ram = info["ram"] as? [String: Any] ?? [:]
    let total = qmpNumber(info["total-time"])
    var run = MigrationRun(
        scenario: scenario.name, memoryBytes: scenario.memory, maxBandwidth: scenario.maxBandwidth,
        status: info["status"] as? String ?? "?", totalTimeMs: total,
        downtimeMs: info["downtime"].map { qmpNumber($0) }, setupTimeMs: qmpNumber(info["setup-time"]),
        bytesSent: qmpNumber(ram["transferred"]),
        throughputMBps: total > 0 ? Double(qmpNumber(ram["transferred"])) / 1e6 / (Double(total) / 1000) : 0,
        passes: qmpNumber(ram["dirty-sync-count"]), memoryCheckPassed: nil, sourceIntactAfterCancel: nil,
        error: info["error-desc"] as? String)
    run.engine = scenario.engine
    if measureGuest {
        run.guestRateBefore = rateBefore
        let secs = Double(Sys.monotonicNanos() - start) / 1e9
        let made = Double((serialAtStop ?? src.serialBytes) - serialAtStart)
        run.guestRateDuring = secs > 0 ? made / secs : nil
        run.guestPassesLost = rateBefore.map { max(0, $0 * secs - made) }
    }
    run.maxThrottlePercent = maxThrottle
    if let x = info["xbzrle-cache"] as? [String: Any] { run.xbzrlePages = qmpNumber(x["pages"]); run.xbzrleBytes = qmpNumber(x["bytes"]) }
    if run.status == "completed" { (run.switchoverPauseMs, run.switchoverSteps) = switchoverPause(source: src, destination: dst) }
    if run.status == "completed" && scenario.guestImage == nil {
        let before = dst.serialBytes
        dst.waitForSerial(before + 2, seconds: 60)
        let dinfo = try dst.qmp.execute("query-migrate") as? [String: Any] ?? [:]
        run.guestClockGapUs = (dinfo["x-guest-clock-gap-us"] as? NSNumber)?.doubleValue
        let unfilled = try src.pagesWithoutFill(guest, scratch: "\(directory)/src-ram.bin")
        run.pagesWithoutFill = unfilled.count
        let report = try dst.checkMemory(guest, scratch: "\(directory)/dst-ram.bin", unfilled: unfilled)
        run.memoryCheckPassed = report.passed
        run.memoryCheck = report.description
    }
    if run.status == "cancelled" && scenario.guestImage == nil {
        let status = try src.qmp.execute("query-status") as? [String: Any]
        let before = src.serialBytes
        let running = status?["status"] as? String == "running" && src.waitForSerial(before + 1, seconds: 30)
        run.sourceIntactAfterCancel = try running && src.checkMemory(guest, scratch: "\(directory)/src-ram.bin").passed
    }
    return run
}

/// A boot sector that halts at once: the "idle guest".
public let idleGuestBootSector: [UInt8] = {
    let code: [UInt8] = [0xfa, 0xf4, 0xeb, 0xfd] // cli; hlt; jmp $-1
    return code + [UInt8](repeating: 0, count: 510 - code.count) + [0x55, 0xaa]
}()

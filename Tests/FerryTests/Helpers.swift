import FerryMachine
import FerryMemory
import FerryMigration
import FerrySys
import Foundation
import Glibc
import Testing

/// ThreadSanitizer makes every thread several times slower (the guest, in KVM, is not):
/// its run in `.ci/run` sets FERRY_TEST_TIME_SCALE, and the tests' heartbeat timeouts,
/// downtime limits and waits scale with it. 1 everywhere else.
let testTimeScale: UInt64 = ProcessInfo.processInfo.environment["FERRY_TEST_TIME_SCALE"].flatMap { UInt64($0) }.map { max(1, $0) } ?? 1

/// A test's wait, scaled for sanitizers.
/// vCPUs of the tests' machines unless a test says otherwise.
let testVCPUs = 2

func scaled(_ seconds: Double) -> Double { seconds * Double(testTimeScale) }

extension VMHost {
    /// A VM host for a test: the test guest's machine, heartbeats scaled for sanitizers.
    /// Every migration test runs an SMP guest: concurrent faults, halted vCPUs and
    /// interrupts at the switch-over happen in all of them.
    static func forTest(memory: Int, vcpus: Int = testVCPUs, incoming: Bool) throws -> VMHost {
        let h = VMHost(machine: try Machine(memorySize: memory, vcpus: vcpus), incoming: incoming)
        if testTimeScale > 1 { h.setParameters { $0.heartbeatTimeout *= testTimeScale; $0.downtimeLimit *= testTimeScale } }
        return h
    }
}

/// Stops its VMs when the test that made it lets it go: a test's guests must not keep
/// running (and taking the host's two cores) through the rest of the suite. The stop runs on
/// its own thread: a vCPU left waiting for a postcopy page that never comes cannot hold up
/// the test.
final class StopsOnRelease: Sendable {
    let hosts: [VMHost]
    init(_ hosts: [VMHost]) { self.hosts = hosts }
    deinit { stopInBackground(hosts) }
}

/// The same for a test's own `VMHost`s: `defer { stopInBackground([host]) }`.
func stopInBackground(_ hosts: [VMHost]) {
    let machines = hosts.map(\.machine)
    Thread.detachNewThread { for m in machines { m.stop() } }
}

/// A machine running the test guest, after `passes` passes of its vCPUs.
func runningTestGuest(memory: Int, vcpus: Int, passes: Int, contents: TestGuestContents = .zero) throws -> Machine {
    let m = try Machine(memorySize: memory, vcpus: vcpus)
    try m.loadTestGuest(contents: contents)
    try m.start()
    #expect(waitForPasses(m, passes))
    return m
}

/// Polls `condition` every 5 ms until it holds or `seconds` pass; returns whether it held.
func waitUntil(seconds: Double = 20, _ condition: () -> Bool) -> Bool {
    let deadline = Sys.monotonicNanos() + UInt64(scaled(seconds) * 1e9)
    while Sys.monotonicNanos() < deadline {
        if condition() { return true }
        usleep(5_000)
    }
    return condition()
}

func count(_ byte: UInt8, in serial: SerialPort) -> Int {
    serial.recentOutput.reduce(0) { $0 + ($1 == byte ? 1 : 0) }
}

/// Waits until the guest has printed `n` more 'B's (full passes) than now.
func waitForPasses(_ m: Machine, _ n: Int, seconds: Double = 30) -> Bool {
    let start = m.serial.bytesWritten
    return waitUntil(seconds: seconds) { m.serial.bytesWritten >= start + n }
}

func checkMemory(_ m: Machine, touched: Int? = nil, contents: TestGuestContents = .zero) -> TestGuestChecker.Report {
    m.checkTestGuest(touched: touched, contents: contents)
}

/// Waits until vCPU 0 sleeps in HLT (KVM keeps a halted vCPU in the kernel: it is asked
/// while paused, its MP state says). Leaves the machine paused when it returns true.
func waitUntilHalted(_ m: Machine, seconds: Double = 30) -> Bool {
    waitUntil(seconds: seconds) {
        m.pause()
        if (try? m.vcpus[0].mpState()) == 3 { return true }
        m.resume()
        return false
    }
}

/// The first byte of every page the test guest walks.
func pageBytes(_ m: Machine) -> [UInt8] {
    stride(from: 0x10_0000, to: m.ram.length, by: 4096).map { m.ram.host.load(fromByteOffset: $0, as: UInt8.self) }
}

/// Collects values from other threads (event subscribers).
final class Recorder<T>: @unchecked Sendable {
    private let lock = Monitor()
    private var items: [T] = []
    func append(_ t: T) { lock.withLock { items.append(t) } }
    var values: [T] { lock.withLock { items } }
}

/// A TCP connection to 127.0.0.1:`port` (a stray or hand-made peer); -1 if it failed.
func connectLoopback(port: UInt16) -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var sa = sockaddr_in()
    sa.sin_family = sa_family_t(AF_INET)
    sa.sin_port = port.bigEndian
    sa.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    let r = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    if r != 0 { close(fd); return -1 }
    return fd
}

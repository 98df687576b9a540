import ArgumentParser
import FerryHarness
import FerryQMP
import FerrySys
import Foundation
import Glibc

/// Starts `ferry run` children for source and destination on this machine and migrates
/// the running test guest between them.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Migrate a running guest between two ferry processes on this machine and verify its memory.")

    @Option(help: "Guest RAM size.")
    var memory: ByteSize = ByteSize(argument: "512M")!

    @Option(help: "Number of vCPUs of the guest (1-16); each walks its own stripe of RAM.")
    var smp: Int = 1

    @Option(help: "Bandwidth limit in bytes/s (0 = unlimited).")
    var maxBandwidth: UInt64 = 0

    enum DemoTransport: String, ExpressibleByArgument, CaseIterable { case tcp, unix }

    @Option(help: "Transport: tcp or unix.")
    var transport: DemoTransport = .tcp

    @Flag(help: "Postcopy: a second of precopy, then the guest runs on the destination and pulls its pages.")
    var postcopy = false

    @Option(help: "Cut the link in the middle of postcopy and recover: reset, blackhole (silent loss) or link-down (two network namespaces, needs root).")
    var failure: PostcopyScenario.Failure?

    @Flag(help: "With --failure: recover by hand (migrate-recover + migrate resume=true) instead of auto-recover.")
    var manual = false

    @Option(help: "Migrate over TLS with the x509 credentials in DIR (make them with scripts/tls-creds.sh DIR).")
    var tls: String?

    func run() throws {
        ChildProcesses.terminateOnSignals()
        if postcopy || failure != nil { try runPostcopyDemo(); return }
        let dir = "/tmp/ferry-demo-\(getpid())"
        guard (1...16).contains(smp) else { fail("--smp \(smp): 1 to 16 vCPUs") }
        print("Ferry demo: a \(memory.bytes >> 20) MiB, \(smp)-vCPU guest that increments a byte in every page, moved between two")
        print("ferry processes over \(transport.rawValue) while it runs. QMP sockets and serial logs: \(dir)")
        var scenario = PrecopyScenario(name: "demo", memory: memory.bytes)
        scenario.vcpus = smp
        scenario.maxBandwidth = maxBandwidth
        scenario.transport = transport.rawValue
        scenario.timeoutSeconds = 600
        scenario.tlsDirectory = tls
        let tty = isatty(1) != 0
        let run: MigrationRun
        do {
            run = try runPrecopy(scenario, directory: dir) { info in
                let line = MigrationProgress(info).line
                if tty { print("\r\u{1b}[K" + line, terminator: ""); fflush(nil) }
            }
        } catch {
            fail("\(error)")
        }
        if tty { print("") }
        print("""
            status:       \(run.status)\(run.error.map { " (\($0))" } ?? "")
            total time:   \(run.totalTimeMs) ms (setup \(run.setupTimeMs) ms)
            downtime:     \(run.downtimeMs.map { "\($0) ms" } ?? "-")
            sent:         \(String(format: "%.1f", Double(run.bytesSent) / 1048576)) MiB in \(run.passes) passes, \(String(format: "%.0f", run.throughputMBps)) MB/s
            guest clock:  \(clockLine(run.guestClockGapUs, downtimeMs: run.downtimeMs))
            destination:  guest kept counting after switchover; \(run.memoryCheck ?? "memory check FAILED")
            """)
        if run.status != "completed" || run.memoryCheckPassed != true { throw ExitCode(1) }
        print("demo OK")
    }
}

/// The guest clock across the move: it stands still through the downtime (QEMU's kvmclock
/// behaviour), so the gap is how far it moved between the source's stop and the start here.
func clockLine(_ gapUs: Double?, downtimeMs: UInt64?) -> String {
    guard let g = gapUs else { return "-" }
    return String(format: "continuous: moved %.0f µs across the switch-over (wall-clock downtime %@)", g, downtimeMs.map { "\($0) ms" } ?? "-")
}

extension Demo {
    func runPostcopyDemo() throws {
        let dir = "/tmp/ferry-demo-\(getpid())"
        guard (1...16).contains(smp) else { fail("--smp \(smp): 1 to 16 vCPUs") }
        var sc = PostcopyScenario(name: "demo", memory: memory.bytes)
        sc.vcpus = smp
        sc.bandwidth = maxBandwidth == 0 ? 125_000_000 : maxBandwidth
        sc.preempt = true
        sc.timeoutSeconds = 600
        sc.tlsDirectory = tls
        if let f = failure {
            let kind = f
            sc.failure = kind
            sc.netns = kind == .linkDown
            sc.failureAfterMs = 800
            sc.outageMs = 3000
            sc.autoRecover = !manual
        }
        print("Ferry postcopy demo: a \(memory.bytes >> 20) MiB, \(smp)-vCPU guest that increments a byte in every page, moved at \(sc.bandwidth * 8 / 1_000_000) Mbit/s")
        print("between two ferry processes\(sc.netns ? " in two network namespaces (veth)" : "")\(sc.failure != nil ? "; the link is cut in the middle of postcopy" : ""). QMP sockets, logs: \(dir)")
        let tty = isatty(1) != 0
        let start = Sys.monotonicNanos()
        var lastStatus = ""
        let run: PostcopyRun
        do {
            run = try runPostcopy(sc, directory: dir) { info, note in
                let t = String(format: "%6.2f s", Double(Sys.monotonicNanos() - start) / 1e9)
                let status = info["status"] as? String ?? ""
                if let note { if tty { print("\r\u{1b}[K", terminator: "") }; print("\(t)  >> \(note)") }
                if status != lastStatus { if tty { print("\r\u{1b}[K", terminator: "") }; print("\(t)  source: \(status)"); lastStatus = status }
                if tty { print("\r\u{1b}[K\(t)  " + MigrationProgress(info).line, terminator: ""); fflush(nil) }
            }
        } catch {
            fail("\(error)")
        }
        if tty { print("") }
        func f(_ v: Double?, _ unit: String = "ms", _ d: Int = 1) -> String { v.map { String(format: "%.\(d)f \(unit)", $0) } ?? "-" }
        print("""

            status:               \(run.status)\(run.error.map { " (\($0))" } ?? "")
            total time:           \(run.totalTimeMs) ms (wire limit \(f(run.wireLimitMs, "ms", 0)), \(f(run.totalOverWireLimit, "×", 2)))
            downtime:             \(run.downtimeMs.map { "\($0) ms" } ?? "-")
            page requests:        \(run.requests); vCPU blocked \(run.blocktimeMs.map { "\($0) ms" } ?? "-"); fault latency p50 \(f(run.latencyP50Us, "µs", 0)), p99 \(f(run.latencyP99Us, "µs", 0))
            """)
        if run.failure != nil {
            print("""
                link failure:         \(run.failure!) → source paused after \(f(run.sourceDetectionMs)), destination after \(f(run.destinationDetectionMs))
                time paused:          \(run.timePausedMs.map { "\($0) ms" } ?? "-") (detected → postcopy-active again: \(f(run.outageMs)))
                recovery:             resume → postcopy-active \(f(run.resumeToActiveMs, "ms", 2)); received bitmap \(run.bitmapBytes ?? 0) bytes; \(run.pagesResent ?? 0) pages re-sent (lost in flight)
                """)
        }
        print("per-vCPU blocked:     \(run.vcpuBlocktimeMs.map { $0.map { "\($0) ms" }.joined(separator: ", ") } ?? "-"); page requests sent twice: \(run.requestsRepeated.map(String.init) ?? "-")")
        print("guest clock:          \(clockLine(run.guestClockGapUs, downtimeMs: run.downtimeMs))")
        print("destination:          guest kept counting; \(run.memoryCheck ?? "memory check FAILED")")
        if run.status != "completed" || run.memoryCheckPassed != true { throw ExitCode(1) }
        print("demo OK")
    }
}

extension PostcopyScenario.Failure: ExpressibleByArgument {}

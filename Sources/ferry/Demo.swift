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

    @Option(help: "Bandwidth limit in bytes/s (0 = unlimited).")
    var maxBandwidth: UInt64 = 0

    @Option(help: "Transport: tcp or unix.")
    var transport: String = "tcp"

    func run() throws {
        let dir = "/tmp/ferry-demo-\(getpid())"
        print("Ferry demo: a \(memory.bytes >> 20) MiB guest that increments a byte in every page, moved between two")
        print("ferry processes over \(transport) while it runs. QMP sockets and serial logs: \(dir)")
        var scenario = PrecopyScenario(name: "demo", memory: memory.bytes)
        scenario.maxBandwidth = maxBandwidth
        scenario.transport = transport
        scenario.timeoutSeconds = 600
        let tty = isatty(1) != 0
        let run: MigrationRun
        do {
            run = try runPrecopy(scenario, directory: dir) { info in
                let line = progressLine(info)
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
            destination:  guest kept counting after switchover; memory check \(run.memoryCheckPassed == true ? "passed" : "FAILED")
            """)
        if run.status != "completed" || run.memoryCheckPassed != true { throw ExitCode(1) }
        print("demo OK")
    }
}

func progressLine(_ info: [String: Any]) -> String {
    let ram = info["ram"] as? [String: Any] ?? [:]
    var line = info["status"] as? String ?? "none"
    if !ram.isEmpty {
        line += String(format: "  pass %llu  sent %.1f MiB  %.0f Mbit/s  remaining %.1f MiB  dirty %llu pages/s",
                       qmpNumber(ram["dirty-sync-count"]), Double(qmpNumber(ram["transferred"])) / 1048576,
                       (ram["mbps"] as? NSNumber)?.doubleValue ?? 0, Double(qmpNumber(ram["remaining"])) / 1048576,
                       qmpNumber(ram["dirty-pages-rate"]))
        if let e = info["expected-downtime"] { line += "  expected downtime \(qmpNumber(e)) ms" }
    }
    return line
}

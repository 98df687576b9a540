import ArgumentParser
import FerryHarness
import FerrySys
import Foundation
import Glibc

/// Ferry's benchmarks: whole migrations between real processes, numbers written to files.
@main
struct FerryBench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ferry-bench", abstract: "Measure Ferry's migrations and write the numbers to files.")

    @Option(help: "Repetitions per scenario.")
    var repetitions = 3

    @Option(help: "Output directory for JSON and Markdown.")
    var output = "bench-results"

    @Option(help: "Only scenarios whose name contains this.")
    var filter: String?

    func run() throws {
        mkdir(output, 0o755)
        let work = "/tmp/ferry-bench-\(getpid())"
        mkdir(work, 0o700)
        let idle = "\(work)/idle.img"
        FileManager.default.createFile(atPath: idle, contents: Data(idleGuestBootSector))
        var scenarios: [PrecopyScenario] = []
        var s = PrecopyScenario(name: "precopy-idle-1GiB-unlimited", memory: 1 << 30, guestImage: idle)
        scenarios.append(s)
        s = PrecopyScenario(name: "precopy-dirtying-512MiB-unlimited", memory: 512 << 20)
        scenarios.append(s)
        s = PrecopyScenario(name: "precopy-dirtying-512MiB-1Gbit", memory: 512 << 20)
        s.maxBandwidth = 125_000_000
        s.timeoutSeconds = 20
        scenarios.append(s)
        if let filter { scenarios = scenarios.filter { $0.name.contains(filter) } }

        var runs: [MigrationRun] = []
        for sc in scenarios {
            for i in 1...repetitions {
                let r = try runPrecopy(sc, directory: "\(work)/\(sc.name)-\(i)")
                print("\(sc.name) #\(i): \(r.status) total \(r.totalTimeMs) ms, downtime \(r.downtimeMs.map(String.init) ?? "-") ms, setup \(r.setupTimeMs) ms, \(r.bytesSent) bytes, \(String(format: "%.0f", r.throughputMBps)) MB/s, \(r.passes) passes, memory check \(r.memoryCheckPassed.map { $0 ? "passed" : "FAILED" } ?? "n/a")\(r.sourceIntactAfterCancel.map { $0 ? ", source running and intact after cancel" : ", SOURCE NOT INTACT after cancel" } ?? "")")
                runs.append(r)
            }
        }
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try enc.encode(runs).write(to: URL(fileURLWithPath: "\(output)/precopy.json"))
        var md = "| scenario | status | total ms (median, min-max) | downtime ms (median) | setup ms | MiB sent | MB/s | passes |\n|---|---|---|---|---|---|---|---|\n"
        for sc in scenarios {
            let rs = runs.filter { $0.scenario == sc.name }
            let totals = rs.map(\.totalTimeMs).sorted()
            let downs = rs.compactMap(\.downtimeMs).sorted()
            let statuses = Set(rs.map(\.status)).sorted().joined(separator: "/")
            md += "| \(sc.name) | \(statuses) | \(totals[totals.count / 2]) (\(totals.first!)-\(totals.last!)) | \(downs.isEmpty ? "-" : String(downs[downs.count / 2])) | \(rs.map(\.setupTimeMs).sorted()[rs.count / 2]) | \(String(format: "%.0f", Double(rs.map(\.bytesSent).sorted()[rs.count / 2]) / 1048576)) | \(String(format: "%.0f", rs.map(\.throughputMBps).sorted()[rs.count / 2])) | \(rs.map(\.passes).sorted()[rs.count / 2]) |\n"
        }
        try md.write(toFile: "\(output)/precopy.md", atomically: true, encoding: .utf8)
        print(md)
        print("wrote \(output)/precopy.json and \(output)/precopy.md")
    }
}

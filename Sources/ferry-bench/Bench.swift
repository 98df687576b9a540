import ArgumentParser
import FerryHarness
import FerryMachine
import FerrySys
import Foundation
import Glibc

/// Ferry's benchmarks: whole migrations between real processes, numbers written to files.
@main
struct FerryBench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ferry-bench", abstract: "Measure Ferry's migrations and write the numbers to files.")

    @Option(help: "Repetitions per scenario.")
    var repetitions = 3

    @Option(help: "compare: unrecorded runs of each engine before its measured ones in every scenario (the first migration after the host idled runs up to ~2-3× slower, for either engine).")
    var warmupRuns = 1

    @Option(help: "Output directory for JSON and Markdown.")
    var output = "bench-results"

    @Option(help: "Only scenarios whose name contains this.")
    var filter: String?

    @Option(help: "Suites to run: precopy, postcopy, recovery, compare (Ferry beside QEMU), tls (the cost of TLS), smp (postcopy by vCPU count), soak (migrations back and forth with random failures), soak-report (soak.md and its chart again from soak.json in --output); comma-separated.")
    var suites = "precopy,postcopy,recovery"

    @Option(help: "soak: how many migrations.")
    var migrations = 300

    @Option(help: "soak: the seed of the migrations' modes, faults and recoveries (a seed reproduces a run).")
    var seed: UInt64 = 1

    @Option(help: "soak: the test guest's vCPUs.")
    var vcpus = 2

    func run() throws {
        // A ferry child that dies must not kill the benchmark through its QMP socket.
        signal(SIGPIPE, SIG_IGN)
        ChildProcesses.terminateOnSignals()
        let wanted = Set(suites.split(separator: ",").map(String.init))
        if wanted.contains("precopy") { try runPrecopySuite() }
        if wanted.contains("postcopy") { try runPostcopySuite(postcopyScenarios(), file: "postcopy") }
        if wanted.contains("recovery") { try runPostcopySuite(recoveryScenarios(), file: "recovery") }
        if wanted.contains("smp") { try runPostcopySuite(smpScenarios(), file: "smp") }
        if wanted.contains("compare") { try runComparison() }
        if wanted.contains("tls") { try runTLSSuite() }
        if wanted.contains("soak") { try runSoak() }
        if wanted.contains("soak-report") { try rewriteSoakReport() }
    }

    func runPrecopySuite() throws {
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
        if scenarios.isEmpty { return }

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

extension FerryBench {
    func postcopyScenarios() -> [PostcopyScenario] {
        var list: [PostcopyScenario] = []
        for netns in [false, true] {
            for preempt in [false, true] {
                var s = PostcopyScenario(name: "postcopy-512MiB-1Gbit-\(netns ? "veth" : "loopback")\(preempt ? "-preempt" : "")", memory: 512 << 20)
                s.preempt = preempt
                s.netns = netns
                if netns { s.tcRate = "1gbit" }
                list.append(s)
                if netns {
                    var d = s
                    d.name += "-delay1ms"
                    d.delayMs = 1
                    list.append(d)
                }
            }
        }
        var auto = PostcopyScenario(name: "postcopy-auto-switch-512MiB-1Gbit-loopback", memory: 512 << 20)
        auto.postcopyAfterMs = nil
        auto.autoSwitchPasses = 1
        list.append(auto)
        return list
    }

    /// Postcopy of the SMP test guest by vCPU count: several vCPUs fault at once, on their
    /// own stripes and on the shared counters.
    func smpScenarios() -> [PostcopyScenario] {
        [1, 2, 4].map { n in
            var s = PostcopyScenario(name: "postcopy-512MiB-1Gbit-loopback-\(n)vcpu", memory: 512 << 20)
            s.vcpus = n
            return s
        }
    }

    func recoveryScenarios() -> [PostcopyScenario] {
        var list: [PostcopyScenario] = []
        // The large guest stays at the 4076 MiB of earlier runs so the rows compare; RAM above
        // 4 GiB is covered by `ferry demo --memory 8G` and the 64 GiB test.
        for memory in [512 << 20, 4076 << 20] {
            let size = "\(memory >> 20)MiB"
            for failure in [PostcopyScenario.Failure.reset, .blackhole, .linkDown] {
                var s = PostcopyScenario(name: "recovery-\(failure.rawValue)-\(size)-1Gbit", memory: memory)
                s.failure = failure
                s.netns = failure == .linkDown
                s.preempt = true
                s.postcopyAfterMs = 500
                s.failureAfterMs = 300
                s.outageMs = 1000
                // Reset and blackhole: the operator recovers once both sides paused, so
                // resume → active is the protocol alone; link-down heals by itself.
                s.autoRecover = failure == .linkDown
                list.append(s)
            }
        }
        return list
    }

    func runPostcopySuite(_ all: [PostcopyScenario], file: String) throws {
        var scenarios = all
        if let filter { scenarios = scenarios.filter { $0.name.contains(filter) } }
        if scenarios.isEmpty { return }
        mkdir(output, 0o755)
        let work = "/tmp/ferry-bench-\(getpid())"
        mkdir(work, 0o700)
        var runs: [PostcopyRun] = []
        for sc in scenarios {
            let reps = sc.memory >= 1 << 30 ? 1 : repetitions
            for i in 1...reps {
                let r: PostcopyRun
                do { r = try runPostcopy(sc, directory: "\(work)/\(sc.name)-\(i)") } catch {
                    print("\(sc.name) #\(i): harness error: \(error)")
                    continue
                }
                print("\(sc.name) #\(i): \(summary(r))"); fflush(nil)
                runs.append(r)
            }
        }
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        // A filtered run merges into the file: runs of other scenarios are kept.
        if filter != nil, let old = try? JSONDecoder().decode([PostcopyRun].self, from: Data(contentsOf: URL(fileURLWithPath: "\(output)/\(file).json"))) {
            let names = Set(scenarios.map(\.name))
            let current = Set(all.map(\.name))
            runs = old.filter { !names.contains($0.scenario) && current.contains($0.scenario) } + runs
        }
        try enc.encode(runs).write(to: URL(fileURLWithPath: "\(output)/\(file).json"))
        let allScenarios = all.filter { sc in runs.contains { $0.scenario == sc.name } }
        let md = switch file {
        case "postcopy": postcopyTable(allScenarios, runs)
        case "smp": smpTable(allScenarios, runs)
        default: recoveryTable(allScenarios, runs)
        }
        try md.write(toFile: "\(output)/\(file).md", atomically: true, encoding: .utf8)
        print(md)
        print("wrote \(output)/\(file).json and \(output)/\(file).md")
    }

    func summary(_ r: PostcopyRun) -> String {
        var parts = ["\(r.status) total \(r.totalTimeMs) ms"]
        if let x = r.totalOverWireLimit { parts.append(String(format: "%.2f× wire limit", x)) }
        if let d = r.downtimeMs { parts.append("downtime \(d) ms") }
        if let b = r.blocktimeMs { parts.append("blocktime \(b) ms") }
        if let p = r.latencyP50Us, let q = r.latencyP99Us { parts.append(String(format: "fault p50 %.0f µs p99 %.0f µs", p, q)) }
        if let f = r.faultFloorUs { parts.append(String(format: "floor %.0f µs", f)) }
        if r.pauses > 0 {
            parts.append("paused \(r.pauses)×, detected src \(fmt(r.sourceDetectionMs)) ms dst \(fmt(r.destinationDetectionMs)) ms, resume→active \(fmt(r.resumeToActiveMs)) ms, bitmap \(r.bitmapBytes ?? 0) B, re-sent \(r.pagesResent ?? 0) pages")
        }
        parts.append("memory check \(r.memoryCheckPassed.map { $0 ? "passed" : "FAILED" } ?? "n/a")")
        if let e = r.error { parts.append("error: \(e)") }
        return parts.joined(separator: ", ")
    }

    func fmt(_ v: Double?) -> String { v.map { String(format: "%.1f", $0) } ?? "-" }

    func median(_ v: [Double]) -> Double? { v.isEmpty ? nil : v.sorted()[v.count / 2] }
    func range(_ v: [Double], _ digits: Int = 0) -> String {
        guard let m = median(v) else { return "-" }
        let f = "%.\(digits)f"
        return v.count == 1 ? String(format: f, m) : String(format: "\(f) (\(f)-\(f))", m, v.min()!, v.max()!)
    }

    func postcopyTable(_ scenarios: [PostcopyScenario], _ runs: [PostcopyRun]) -> String {
        var md = "| scenario | link | status | total ms (median, min-max) | × wire limit | downtime ms | vCPU blocktime ms | faults | fault p50 µs | fault p99 µs | RTT+page µs | p50 / floor | p99 / floor | memory check |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        for sc in scenarios {
            let rs = runs.filter { $0.scenario == sc.name }
            guard let r0 = rs.first else { continue }
            md += "| \(sc.name) | \(r0.link) | \(Set(rs.map(\.status)).sorted().joined(separator: "/"))\(r0.autoSwitched ? " (auto-switched)" : "") | \(range(rs.map { Double($0.totalTimeMs) })) | \(range(rs.compactMap(\.totalOverWireLimit), 2)) | \(range(rs.compactMap { $0.downtimeMs.map { Double($0) } })) | \(range(rs.compactMap { $0.blocktimeMs.map { Double($0) } })) | \(range(rs.compactMap { $0.faults.map { Double($0) } })) | \(range(rs.compactMap(\.latencyP50Us))) | \(range(rs.compactMap(\.latencyP99Us))) | \(range(rs.compactMap(\.faultFloorUs))) | \(range(rs.compactMap(\.p50OverFloor), 1)) | \(range(rs.compactMap(\.p99OverFloor), 1)) | \(rs.filter { $0.memoryCheckPassed == true }.count)/\(rs.count) passed |\n"
        }
        return md
    }

    func smpTable(_ scenarios: [PostcopyScenario], _ runs: [PostcopyRun]) -> String {
        var md = "| scenario | vCPUs | status | total ms (median, min-max) | × wire limit | downtime ms | all-blocked ms | blocked ms per vCPU (median run) | faults | fault p50 µs | fault p99 µs | requests sent twice | memory check |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        for sc in scenarios {
            let rs = runs.filter { $0.scenario == sc.name }.sorted { $0.totalTimeMs < $1.totalTimeMs }
            guard !rs.isEmpty else { continue }
            let mid = rs[rs.count / 2]
            md += "| \(sc.name) | \(sc.vcpus) | \(Set(rs.map(\.status)).sorted().joined(separator: "/")) | \(range(rs.map { Double($0.totalTimeMs) })) | \(range(rs.compactMap(\.totalOverWireLimit), 2)) | \(range(rs.compactMap { $0.downtimeMs.map { Double($0) } })) | \(range(rs.compactMap { $0.blocktimeMs.map { Double($0) } })) | \((mid.vcpuBlocktimeMs ?? []).map(String.init).joined(separator: " / ")) | \(range(rs.compactMap { $0.faults.map { Double($0) } })) | \(range(rs.compactMap(\.latencyP50Us))) | \(range(rs.compactMap(\.latencyP99Us))) | \(range(rs.compactMap { $0.requestsRepeated.map { Double($0) } })) | \(rs.filter { $0.memoryCheckPassed == true }.count)/\(rs.count) passed |\n"
        }
        return md
    }

    func recoveryTable(_ scenarios: [PostcopyScenario], _ runs: [PostcopyRun]) -> String {
        var md = "| scenario | link | status | detection ms, source | detection ms, destination | resume → active ms | outage ms (detected → active) | bitmap bytes | pages re-sent | total ms | memory check |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
        for sc in scenarios {
            let rs = runs.filter { $0.scenario == sc.name }
            guard let r0 = rs.first else { continue }
            md += "| \(sc.name) | \(r0.link) | \(Set(rs.map(\.status)).sorted().joined(separator: "/")) | \(range(rs.compactMap(\.sourceDetectionMs))) | \(range(rs.compactMap(\.destinationDetectionMs))) | \(range(rs.compactMap(\.resumeToActiveMs), 2)) | \(range(rs.compactMap(\.outageMs))) | \(range(rs.compactMap { $0.bitmapBytes.map { Double($0) } })) | \(range(rs.compactMap { $0.pagesResent.map { Double($0) } })) | \(range(rs.map { Double($0.totalTimeMs) })) | \(rs.filter { $0.memoryCheckPassed == true }.count)/\(rs.count) passed |\n"
        }
        return md
    }
}

/// One row of the side-by-side report: the same scenario under Ferry and under QEMU.
struct ComparedRun: Codable {
    var engine: Engine
    var scenario: String
    var status: String
    var totalTimeMs: UInt64
    var downtimeMs: UInt64?
    var blocktimeMs: UInt64?
    var memoryCheckPassed: Bool?
    var resumeToActiveMs: Double?
    var error: String?
    var switchoverPauseMs: Double?
    var switchoverSteps: [String: UInt64]?
    /// Unrecorded runs of this engine just before this scenario's measured ones (nil: a run
    /// measured before warm-ups existed).
    var warmupRuns: Int?
    var timeline: [TimelineSample]?
    var latencyDistribution: [UInt64]?
    var totalOverWireLimit: Double?
    var latencyP50Us: Double?
    var latencyP99Us: Double?
    var faultFloorUs: Double?
    var bytesSent: UInt64?
    var guestRateBefore: Double?
    var guestRateDuring: Double?
    var guestPassesLost: Double?
    var maxThrottlePercent: UInt64?
    var xbzrlePages: UInt64?
    var pagesWithoutFill: Int?
}

extension FerryBench {
    /// Ferry and QEMU on the same machine, same guest image and RAM size, same parameters,
    /// both driven over QMP by Ferry's client.
    func runComparison() throws {
        let engines: [Engine] = qemuAvailable ? [.ferry, .qemu] : [.ferry]
        if !qemuAvailable { print("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86): running Ferry's side only") }
        let work = "/tmp/ferry-bench-\(getpid())"
        mkdir(work, 0o700)
        mkdir(output, 0o755)
        let idle = "\(work)/idle.img"
        FileManager.default.createFile(atPath: idle, contents: Data(idleGuestBootSector))
        var runs: [ComparedRun] = []
        var names: [String] = []
        func note(_ r: ComparedRun, _ i: Int) {
            print("\(r.scenario) [\(r.engine.rawValue)] #\(i): \(r.status) total \(r.totalTimeMs) ms, downtime \(r.downtimeMs.map { "\($0)" } ?? "-") ms, blocked \(r.blocktimeMs.map { "\($0)" } ?? "-") ms, resume→active \(r.resumeToActiveMs.map { String(format: "%.2f", $0) } ?? "-") ms, memory \(r.memoryCheckPassed.map { $0 ? "passed" : "FAILED" } ?? "n/a")\(r.error.map { " (\($0))" } ?? "")")
            fflush(nil)
        }
        var precopy: [PrecopyScenario] = []
        var p = PrecopyScenario(name: "precopy-idle-1GiB-unlimited", memory: 1 << 30, guestImage: idle); precopy.append(p)
        p = PrecopyScenario(name: "precopy-dirtying-512MiB-unlimited", memory: 512 << 20); precopy.append(p)
        p = PrecopyScenario(name: "precopy-dirtying-512MiB-1Gbit", memory: 512 << 20); p.maxBandwidth = 125_000_000; p.timeoutSeconds = 20; precopy.append(p)
        // Write-heavy guests, both engines with the same capabilities and parameters; the
        // page contents once zero but for the counter, once random (nothing compresses).
        for contents in [TestGuestContents.zero, .random(seed: TestGuestContents.defaultSeed)] {
            let tag = contents == .zero ? "" : "-random"
            p = PrecopyScenario(name: "precopy-dirtying\(tag)-512MiB-1Gbit-xbzrle", memory: 512 << 20)
            p.maxBandwidth = 125_000_000; p.timeoutSeconds = 60; p.contents = contents
            p.capabilities = ["xbzrle"]; p.parameters = ["xbzrle-cache-size": 512 << 20]
            precopy.append(p)
        }
        p = PrecopyScenario(name: "precopy-dirtying-512MiB-1Gbit-auto-converge", memory: 512 << 20)
        p.maxBandwidth = 125_000_000; p.timeoutSeconds = 90; p.capabilities = ["auto-converge"]
        precopy.append(p)
        p = PrecopyScenario(name: "precopy-dirtying-random-512MiB-unlimited", memory: 512 << 20); p.contents = .random(seed: TestGuestContents.defaultSeed)
        precopy.append(p)
        // multifd, QEMU's default 2 channels: without compression on random pages, and with
        // zstd (level 1 on both) on both contents.
        for (contents, compression) in [(TestGuestContents.random(seed: TestGuestContents.defaultSeed), "none"), (.random(seed: TestGuestContents.defaultSeed), "zstd"), (.zero, "zstd")] {
            let tag = contents == .zero ? "" : "-random"
            p = PrecopyScenario(name: "precopy-dirtying\(tag)-512MiB-unlimited-multifd-\(compression)", memory: 512 << 20)
            p.contents = contents; p.timeoutSeconds = 60
            p.capabilities = ["multifd"]; p.parameters = ["multifd-channels": 2]; p.textParameters = ["multifd-compression": compression]
            precopy.append(p)
        }
        // Cost grows with touched memory: the guest walks 1 GiB of a 1 GiB and of a 64 GiB RAM.
        for memory in [1 << 30, 64 << 30] {
            p = PrecopyScenario(name: "precopy-touching-1GiB-of-\(memory >> 30)GiB-unlimited", memory: memory)
            p.touched = 1 << 30; p.timeoutSeconds = 300
            precopy.append(p)
        }
        var postcopy: [PostcopyScenario] = []
        var q = PostcopyScenario(name: "postcopy-512MiB-1Gbit", memory: 512 << 20); postcopy.append(q)
        q.name += "-preempt"; q.preempt = true; postcopy.append(q)
        q = PostcopyScenario(name: "postcopy-512MiB-1Gbit-reset-recover", memory: 512 << 20)
        q.failure = .reset; q.autoRecover = false; q.postcopyAfterMs = 500; q.failureAfterMs = 300; postcopy.append(q)
        if getuid() == 0 {
            q = PostcopyScenario(name: "postcopy-512MiB-1Gbit-veth-delay1ms", memory: 512 << 20)
            q.netns = true; q.tcRate = "1gbit"; q.delayMs = 1; postcopy.append(q)
        }
        /// Every engine, `repetitions` times; a run the harness could not finish is reported, not fatal.
        func measure(_ name: String, _ body: (Engine, String) throws -> ComparedRun) {
            names.append(name)
            for e in engines {
                for i in 0..<warmupRuns {
                    let c = try? body(e, "\(work)/\(name)-\(e.rawValue)-warmup\(i + 1)")
                    print("\(name) [\(e.rawValue)] warm-up \(i + 1) (not counted): \(c.map { "\($0.status) total \($0.totalTimeMs) ms" } ?? "harness error")")
                }
                for i in 1...repetitions {
                    do {
                        var c = try body(e, "\(work)/\(name)-\(e.rawValue)-\(i)")
                        c.warmupRuns = warmupRuns
                        note(c, i)
                        runs.append(c)
                    } catch { print("\(name) [\(e.rawValue)] #\(i): harness error: \(error)") }
                }
            }
        }
        for sc in precopy where filter.map({ sc.name.contains($0) }) ?? true {
            measure(sc.name) { e, dir in
                var x = sc
                x.engine = e
                let r = try runPrecopy(x, directory: dir)
                var c = ComparedRun(engine: e, scenario: sc.name, status: r.status, totalTimeMs: r.totalTimeMs, downtimeMs: r.downtimeMs,
                                    memoryCheckPassed: r.memoryCheckPassed ?? r.sourceIntactAfterCancel, error: r.error)
                c.switchoverPauseMs = r.switchoverPauseMs
                c.switchoverSteps = r.switchoverSteps
                c.bytesSent = r.bytesSent
                c.guestRateBefore = r.guestRateBefore
                c.guestRateDuring = r.guestRateDuring
                c.guestPassesLost = r.guestPassesLost
                c.maxThrottlePercent = r.maxThrottlePercent
                c.xbzrlePages = r.xbzrlePages
                c.pagesWithoutFill = r.pagesWithoutFill
                return c
            }
        }
        for sc in postcopy where filter.map({ sc.name.contains($0) }) ?? true {
            measure(sc.name) { e, dir in
                var x = sc
                x.engine = e
                let r = try runPostcopy(x, directory: dir)
                var c = ComparedRun(engine: e, scenario: sc.name, status: r.status, totalTimeMs: r.totalTimeMs, downtimeMs: r.downtimeMs,
                                   blocktimeMs: r.blocktimeMs, memoryCheckPassed: r.memoryCheckPassed, resumeToActiveMs: r.resumeToActiveMs, error: r.error,
                                   timeline: r.timeline, latencyDistribution: r.latencyDistribution, totalOverWireLimit: r.totalOverWireLimit,
                                   latencyP50Us: r.latencyP50Us, latencyP99Us: r.latencyP99Us, faultFloorUs: r.faultFloorUs)
                c.switchoverPauseMs = r.switchoverPauseMs
                c.switchoverSteps = r.switchoverSteps
                return c
            }
        }
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        // A filtered run merges into the report: runs of the other scenarios are kept.
        if filter != nil, let old = try? JSONDecoder().decode([ComparedRun].self, from: Data(contentsOf: URL(fileURLWithPath: "\(output)/compare.json"))) {
            let fresh = Set(names)
            let kept = old.filter { !fresh.contains($0.scenario) }
            runs = kept + runs
            let all = (precopy.map(\.name) + postcopy.map(\.name))
            names = all.filter { n in runs.contains { $0.scenario == n } }
        }
        try enc.encode(runs).write(to: URL(fileURLWithPath: "\(output)/compare.json"))
        var md = qemuAvailable ? "" : "QEMU is not installed here: Ferry's side only.\n\n"
        md += "| scenario | metric | Ferry (median, min-max) | QEMU (median, min-max) | QEMU / Ferry | Ferry / physical limit | memory check Ferry / QEMU |\n|---|---|---|---|---|---|---|\n"
        var steps = "\nFerry's switch-over, step by step (x-switchover-us, median of the runs, µs; src from the stop request, dst from the final state's first byte):\n\n"
        for n in names {
            let f = runs.filter { $0.scenario == n && $0.engine == .ferry }
            let keys = Set(f.flatMap { $0.switchoverSteps.map { Array($0.keys) } ?? [] }).sorted()
            guard !keys.isEmpty else { continue }
            steps += "- \(n): " + keys.map { k in "\(k) \(median(f.compactMap { r -> Double? in r.switchoverSteps?[k].map { Double($0) } }).map { "\(Int($0.rounded()))" } ?? "-")" }.joined(separator: ", ") + "\n"
        }
        for n in names {
            let f = runs.filter { $0.scenario == n && $0.engine == .ferry }, g = runs.filter { $0.scenario == n && $0.engine == .qemu }
            /// `lowerIsBetter` metrics: a QEMU/Ferry ratio below 1 means Ferry loses, and the row says so.
            func row(_ metric: String, physical: ((ComparedRun) -> Double?)? = nil, higherIsBetter: Bool = false, _ v: (ComparedRun) -> Double?) {
                let fv = f.compactMap(v), gv = g.compactMap(v)
                guard !fv.isEmpty || !gv.isEmpty else { return }
                var ratio = "-"
                if let fm = median(fv), let gm = median(gv), fm > 0, gm > 0 {
                    let loses = higherIsBetter ? fm < gm : gm < fm
                    ratio = String(format: "%.2f", gm / fm) + (loses ? " **Ferry loses**" : "")
                }
                let phys = physical.map { p in range(f.compactMap(p), 2) } ?? "-"
                let mem = "\(f.filter { $0.memoryCheckPassed == true }.count)/\(f.count) / \(g.filter { $0.memoryCheckPassed == true }.count)/\(g.count)"
                md += "| \(n) | \(metric) | \(range(fv)) | \(range(gv)) | \(ratio) | \(phys) | \(mem) |\n"
            }
            let statuses = "Ferry: \(Set(f.map(\.status)).sorted().joined(separator: "/")); QEMU: \(Set(g.map(\.status)).sorted().joined(separator: "/"))"
            // A total of 0 is none reported (a cancelled run; QEMU sometimes, right after completing).
            row("total ms (\(statuses))", physical: { $0.totalOverWireLimit }) { $0.totalTimeMs == 0 ? nil : Double($0.totalTimeMs) }
            row("downtime ms") { $0.downtimeMs.map { Double($0) } }
            row("MiB sent") { $0.bytesSent.map { Double($0) / 1_048_576 } }
            row("xbzrle pages") { $0.xbzrlePages.map { Double($0) } }
            row("walked pages without the random fill on the source (firmware's; fill not checked there)") { $0.pagesWithoutFill.map { Double($0) } }
            row("highest cpu-throttle-percentage") { $0.maxThrottlePercent.map { Double($0) } }
            row("guest passes per minute during the migration (higher is better; before it: \(range(f.compactMap { $0.guestRateBefore.map { $0 * 60 } }))"
                + " / \(range(g.compactMap { $0.guestRateBefore.map { $0 * 60 } })))", higherIsBetter: true) { $0.guestRateDuring.map { $0 * 60 } }
            row("guest passes lost to the throttle (its rate before × the migration's time − passes made; lower is better)") { $0.guestPassesLost }
            row("switch-over pause ms (source STOP → destination RESUME)") { $0.switchoverPauseMs }
            row("vCPU blocked ms") { $0.blocktimeMs.map { Double($0) } }
            row("resume → active ms") { $0.resumeToActiveMs }
            row("fault latency p50 µs (fault → installed)", physical: { r in r.latencyP50Us.flatMap { p in r.faultFloorUs.map { p / $0 } } }) { $0.latencyP50Us }
            row("fault latency p99 µs", physical: { r in r.latencyP99Us.flatMap { p in r.faultFloorUs.map { p / $0 } } }) { $0.latencyP99Us }
        }
        // Charts: a timeline per postcopy scenario (first run of each engine) and the
        // fault-latency histogram.
        var charts: [String] = []
        for sc in postcopy where names.contains(sc.name) {
            let first = engines.compactMap { e in runs.first { $0.scenario == sc.name && $0.engine == e } }
            let panels = first.compactMap { r in r.timeline.map { (label: "\(r.engine == .ferry ? "Ferry" : "QEMU 7.2"): bytes/s sent, \(r.status) in \(r.totalTimeMs) ms", samples: $0) } }
            guard !panels.isEmpty else { continue }
            let tl = "timeline-\(sc.name).svg"
            try Chart.timeline(title: "\(sc.name): migration timeline", panels: panels).write(toFile: "\(output)/\(tl)", atomically: true, encoding: .utf8)
            let hist = "latency-\(sc.name).svg"
            let series = first.map { (label: $0.engine == .ferry ? "Ferry" : "QEMU 7.2", buckets: $0.latencyDistribution) }
            try Chart.histogram(title: "\(sc.name): postcopy fault latency", series: series).write(toFile: "\(output)/\(hist)", atomically: true, encoding: .utf8)
            charts += [tl, hist]
        }
        let cold = names.filter { n in runs.contains { $0.scenario == n && ($0.warmupRuns ?? 0) == 0 } }
        md += "\nBefore its measured runs of a scenario each engine ran unrecorded warm-up runs (`--warmup-runs`, 1 by default): the first migration after the host idled ran up to ~3× slower, for either engine."
        md += cold.isEmpty ? "\n" : " Measured without a warm-up (before it existed): " + cold.joined(separator: ", ") + ".\n"
        md += steps
        if !charts.isEmpty { md += "\nCharts: " + charts.map { "[\($0)](\($0))" }.joined(separator: ", ") + "\n" }
        try md.write(toFile: "\(output)/compare.md", atomically: true, encoding: .utf8)
        print(md)
        print("wrote \(output)/compare.json and \(output)/compare.md")
    }
}

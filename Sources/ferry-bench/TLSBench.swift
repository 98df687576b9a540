import FerryHarness
import Foundation
import Glibc

/// The cost of TLS: the same migrations plain and over TLS (x509, client certificates
/// verified; credentials made by scripts/tls-creds.sh), medians side by side in tls.md.
extension FerryBench {
    func runTLSSuite() throws {
        mkdir(output, 0o755)
        let work = "/tmp/ferry-bench-tls-\(getpid())"
        mkdir(work, 0o700)
        let creds = "\(work)/creds"
        try makeTestTLSCredentials(in: creds)

        var rows: [String] = []
        var json: [[String: Any]] = []
        func median<T: Comparable>(_ xs: [T]) -> T? { xs.isEmpty ? nil : xs.sorted()[xs.count / 2] }
        func f(_ v: Double?) -> String { v.map { String(format: "%.0f", $0) } ?? "-" }

        // Precopy, unlimited bandwidth: TLS's throughput cost shows directly.
        for tls in [false, true] {
            var sc = PrecopyScenario(name: "precopy-dirtying-512MiB-unlimited\(tls ? "-tls" : "")", memory: 512 << 20)
            sc.tlsDirectory = tls ? creds : nil
            if let filter, !sc.name.contains(filter) { continue }
            var runs: [MigrationRun] = []
            for i in 1...repetitions {
                let r = try runPrecopy(sc, directory: "\(work)/\(sc.name)-\(i)")
                print("\(sc.name) #\(i): \(r.status) total \(r.totalTimeMs) ms, downtime \(r.downtimeMs ?? 0) ms, \(String(format: "%.0f", r.throughputMBps)) MB/s, memory \(r.memoryCheckPassed == true ? "passed" : "FAILED")")
                fflush(nil)
                runs.append(r)
                json.append(["scenario": sc.name, "status": r.status, "total-ms": r.totalTimeMs, "downtime-ms": r.downtimeMs ?? 0,
                             "mb-per-s": r.throughputMBps, "memory-check": r.memoryCheckPassed ?? false])
            }
            rows.append("| \(sc.name) | \(Set(runs.map(\.status)).sorted().joined(separator: "/")) | \(median(runs.map(\.totalTimeMs)).map(String.init) ?? "-") | \(median(runs.compactMap(\.downtimeMs)).map(String.init) ?? "-") | \(f(median(runs.map(\.throughputMBps)))) | - | - | - | \(runs.filter { $0.memoryCheckPassed == true }.count)/\(runs.count) |")
        }

        // Postcopy at 1 Gbit/s and unlimited, with preempt; and a reset link with recovery.
        var post: [PostcopyScenario] = []
        for tls in [false, true] {
            for bw in [UInt64(125_000_000), 0] {
                var s = PostcopyScenario(name: "postcopy-512MiB-\(bw == 0 ? "unlimited" : "1Gbit")-preempt\(tls ? "-tls" : "")", memory: 512 << 20)
                s.preempt = true
                s.bandwidth = bw
                s.tlsDirectory = tls ? creds : nil
                post.append(s)
            }
            var r = PostcopyScenario(name: "recovery-reset-512MiB-1Gbit\(tls ? "-tls" : "")", memory: 512 << 20)
            r.failure = .reset
            r.preempt = true
            r.postcopyAfterMs = 500
            r.failureAfterMs = 300
            r.autoRecover = false
            r.tlsDirectory = tls ? creds : nil
            post.append(r)
        }
        for sc in post {
            if let filter, !sc.name.contains(filter) { continue }
            var runs: [PostcopyRun] = []
            for i in 1...repetitions {
                do {
                    let r = try runPostcopy(sc, directory: "\(work)/\(sc.name)-\(i)")
                    print("\(sc.name) #\(i): \(summary(r))"); fflush(nil)
                    runs.append(r)
                    json.append(["scenario": sc.name, "status": r.status, "total-ms": r.totalTimeMs, "downtime-ms": r.downtimeMs ?? 0,
                                 "blocktime-ms": r.blocktimeMs ?? 0, "fault-p50-us": r.latencyP50Us ?? 0, "resume-to-active-ms": r.resumeToActiveMs ?? 0,
                                 "memory-check": r.memoryCheckPassed ?? false])
                } catch { print("\(sc.name) #\(i): harness error: \(error)") }
            }
            let mbps = median(runs.map { Double($0.memoryBytes) / 1e6 / (Double($0.totalTimeMs) / 1000) })
            rows.append("| \(sc.name) | \(Set(runs.map(\.status)).sorted().joined(separator: "/")) | \(median(runs.map(\.totalTimeMs)).map(String.init) ?? "-") | \(median(runs.compactMap(\.downtimeMs)).map(String.init) ?? "-") | \(f(mbps)) | \(median(runs.compactMap(\.blocktimeMs)).map(String.init) ?? "-") | \(f(median(runs.compactMap(\.latencyP50Us)))) | \(median(runs.compactMap(\.resumeToActiveMs)).map { String(format: "%.2f", $0) } ?? "-") | \(runs.filter { $0.memoryCheckPassed == true }.count)/\(runs.count) |")
        }
        var md = "# TLS cost (\(repetitions) runs each, medians; x509 with client certificates, TLS 1.3)\n\n"
        md += "| scenario | status | total ms | downtime ms | MB/s (RAM / total time; precopy: bytes sent / total) | vCPU blocked ms | fault p50 µs | resume → active ms | memory check |\n"
        md += "|---|---|---|---|---|---|---|---|---|\n" + rows.joined(separator: "\n") + "\n"
        try md.write(toFile: "\(output)/tls.md", atomically: true, encoding: .utf8)
        try JSONSerialization.data(withJSONObject: json, options: [.prettyPrinted, .sortedKeys]).write(to: URL(fileURLWithPath: "\(output)/tls.json"))
        print(md)
        print("wrote \(output)/tls.md and \(output)/tls.json")
    }
}

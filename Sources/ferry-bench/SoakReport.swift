import Foundation

/// The soak's record, its Markdown summary and its chart.
struct SoakMigration: Codable, Sendable {
    var index: Int
    var plan: SoakPlan
    /// completed, precopy-failed-source-intact, switchover-failed-source-intact, or lost (with `detail`).
    var outcome: String
    var statuses: [String]
    /// The faults as injected (or armed, for a pattern) and what the proxy fired.
    var injected: [String]
    var proxyFired: [String]
    var pauses: UInt64
    /// Each time both sides sat paused with the link down: for how long, and the CPU time
    /// each process used meanwhile.
    var paused: [SoakPausedCPU]
    var totalMs: UInt64
    var memoryCheck: String
    var detail: String?
}

struct SoakPausedCPU: Codable, Sendable {
    var holdMs: Int
    /// CPU time of each process but its vCPU and live QMP session threads: the migration's
    /// own work while paused (heartbeats, recovery attempts) and short QMP sessions.
    var sourceCPUMs: Int
    var destinationCPUMs: Int
    /// The live QMP sessions' CPU time (the flooding client's answers), both processes.
    var qmpCPUMs: Int
    /// The destination's vCPU threads: the guest runs on there, on the pages it has.
    var destinationVCPUMs: Int
}

struct SoakSample: Codable, Sendable {
    var migration: Int
    var role: String // source (the guest's process before the migration), destination
    var pid: Int32
    var fds: Int
    var threads: Int
    var rssKiB: Int
}

struct SoakReport: Codable, Sendable {
    var seed: UInt64
    var vcpus: Int?
    var migrations: [SoakMigration]
    var samples: [SoakSample]
    var qmpClientSessions: Int
    var floodQueries: Int
}

extension FerryBench {
    /// `--suites soak-report`: the Markdown and the chart again from `soak.json` in `output`.
    func rewriteSoakReport() throws {
        let r = try JSONDecoder().decode(SoakReport.self, from: Data(contentsOf: URL(fileURLWithPath: "\(output)/soak.json")))
        try writeSoak(r, json: false)
    }

    func writeSoak(_ r: SoakReport, json: Bool = true) throws {
        if json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            try enc.encode(r).write(to: URL(fileURLWithPath: "\(output)/soak.json"))
        }
        var outcomes: [String: Int] = [:]
        for m in r.migrations { outcomes[m.outcome, default: 0] += 1 }
        var md = "# Soak (`ferry-bench --suites soak --migrations \(r.migrations.count) --seed \(r.seed)`)\n\n"
        md += "One 64 MiB, \(r.vcpus.map { "\($0)-vCPU" } ?? "1-vCPU") test guest migrated back and forth; each migration's mode, TLS, faults and recovery drawn from the seed. "
        md += "QMP client sessions meanwhile: \(r.qmpClientSessions) (a third of them leave mid-command); flooding query-migrate: \(r.floodQueries).\n\n"
        md += "| outcome | migrations |\n|---|---|\n"
        for (k, v) in outcomes.sorted(by: { $0.key < $1.key }) { md += "| \(k) | \(v) |\n" }
        var kinds: [String: Int] = [:]
        for m in r.migrations { kinds["\(m.plan.mode)\(m.plan.tls ? " + TLS" : "") / \(m.plan.faults.count) fault\(m.plan.faults.count == 1 ? "" : "s")", default: 0] += 1 }
        md += "\n| mode / faults drawn | migrations |\n|---|---|\n"
        for (k, v) in kinds.sorted(by: { $0.key < $1.key }) { md += "| \(k) | \(v) |\n" }
        // A pattern fault is armed, and fires only if its bytes pass before the migration ends.
        var faults: [String: (injected: Int, outcomes: [String: Int])] = [:]
        for m in r.migrations {
            for f in m.injected { faults[f, default: (0, [:])].injected += 1; faults[f]!.outcomes[m.outcome, default: 0] += 1 }
        }
        md += "\nFaults (kind@phase, /protocol point on a plain link; a point's fault fires when its bytes pass; proxy actions fired in all: \(r.migrations.map(\.proxyFired.count).reduce(0, +))):\n\n"
        md += "| fault | injected or armed | migrations' outcomes |\n|---|---|---|\n"
        for (k, v) in faults.sorted(by: { $0.key < $1.key }) {
            md += "| \(k) | \(v.injected) | \(v.outcomes.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")) |\n"
        }
        let holds = r.migrations.flatMap(\.paused)
        if !holds.isEmpty {
            let wall = Double(holds.map(\.holdMs).reduce(0, +))
            func share(_ k: KeyPath<SoakPausedCPU, Int>) -> String {
                let v = holds.map { $0[keyPath: k] }
                return String(format: "%d ms (%.1f %%), most in one outage %d ms", v.reduce(0, +), 100 * Double(v.reduce(0, +)) / wall, v.max()!)
            }
            md += "\nCPU time while both sides were paused with the link down (\(holds.count) outages of 200 ms or more, \(Int(wall)) ms in all):\n\n"
            md += "| threads | CPU time |\n|---|---|\n"
            md += "| source: migration, main and short QMP sessions | \(share(\.sourceCPUMs)) |\n"
            md += "| destination: migration, main and short QMP sessions | \(share(\.destinationCPUMs)) |\n"
            md += "| both: the live QMP sessions (the flooding client's answers) | \(share(\.qmpCPUMs)) |\n"
            md += "| destination vCPUs (the guest runs on its pages) | \(share(\.destinationVCPUMs)) |\n"
        }
        md += "\nPer process (each lives for at most two migrations as source and destination, longer after precopy failures), sampled as the source before each migration and as the destination after it:\n\n"
        md += "| role | fds min-max | threads min-max | RSS MiB min-max |\n|---|---|---|---|\n"
        for role in ["source", "destination"] {
            let s = r.samples.filter { $0.role == role }
            guard !s.isEmpty else { continue }
            md += "| \(role) | \(s.map(\.fds).min()!)-\(s.map(\.fds).max()!) | \(s.map(\.threads).min()!)-\(s.map(\.threads).max()!) | "
            md += String(format: "%.0f-%.0f |\n", Double(s.map(\.rssKiB).min()!) / 1024, Double(s.map(\.rssKiB).max()!) / 1024)
        }
        try md.write(toFile: "\(output)/soak.md", atomically: true, encoding: .utf8)
        let svg = Chart.soakUsage(title: "Soak: \(r.migrations.count) migrations, seed \(r.seed): per-process fds, threads, RSS",
                                  samples: r.samples.map { ($0.migration, $0.role, $0.fds, $0.threads, Double($0.rssKiB) / 1024) })
        try svg.write(toFile: "\(output)/soak-usage.svg", atomically: true, encoding: .utf8)
        print(md)
    }
}

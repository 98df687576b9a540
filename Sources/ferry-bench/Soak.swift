import FerryHarness
import FerryMachine
import FerryQMP
import FerrySys
import Foundation
import Glibc

/// `ferry-bench --suites soak`: one guest migrated back and forth between `ferry run`
/// processes (a completed migration's destination is the next source; every destination is
/// a fresh `--incoming defer` process), each migration drawn from a seeded generator:
/// precopy, postcopy or postcopy-preempt, plain or TLS, and a fault at a random moment
/// through the fault proxy (reset or blackhole, in precopy or postcopy), a `migrate-pause`,
/// or a first recovery attempt to a dead address; recovery by auto-recover or by hand.
/// QMP clients come and go meanwhile (some leave mid-command) and one floods query-migrate.
/// After each migration the running guest's memory is checked (on the destination, or on
/// the source after a precopy failure) and each live process's fds, threads and RSS are
/// sampled. Anything but "completed" or "precopy failed, source intact" is a lost guest.
struct SoakPlan: Codable, Sendable {
    var mode: String // precopy, postcopy, postcopy-preempt
    var tls: Bool
    var fault: String // none, reset-precopy, blackhole-precopy, reset-postcopy, blackhole-postcopy, pause, dead-address-first
    var faultAfterMs: Int
    var autoRecover: Bool

    static func draw(_ g: inout SplitMix) -> SoakPlan {
        let mode = ["precopy", "postcopy", "postcopy-preempt"][g.below(3)]
        let post = mode != "precopy"
        let faults = post ? ["none", "none", "reset-precopy", "reset-postcopy", "blackhole-postcopy", "pause", "dead-address-first"]
                          : ["none", "none", "reset-precopy", "blackhole-precopy"]
        let fault = faults[g.below(faults.count)]
        return SoakPlan(mode: mode, tls: g.below(3) == 0, fault: fault, faultAfterMs: 100 + g.below(500),
                        autoRecover: fault == "dead-address-first" ? false : g.below(2) == 0)
    }
}

/// A small seeded generator (SplitMix64): a seed reproduces a run's plan.
struct SplitMix: Sendable {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
}

struct SoakMigration: Codable, Sendable {
    var index: Int
    var plan: SoakPlan
    /// completed, precopy-failed-source-intact, or lost (with `detail`).
    var outcome: String
    var statuses: [String]
    var pauses: UInt64
    var totalMs: UInt64
    var memoryCheck: String
    var detail: String?
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
    var migrations: [SoakMigration]
    var samples: [SoakSample]
    var qmpClientSessions: Int
    var floodQueries: Int
}

/// A process's open fds, threads and resident KiB from /proc.
func processUsage(_ pid: pid_t) -> (fds: Int, threads: Int, rssKiB: Int) {
    let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
    let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
    func field(_ name: String) -> Int {
        for line in status.split(separator: "\n") where line.hasPrefix(name + ":") {
            return Int(line.dropFirst(name.count + 1).trimmingCharacters(in: .whitespaces).split(separator: " ").first ?? "") ?? -1
        }
        return -1
    }
    return (fds, field("Threads"), field("VmRSS"))
}

/// QMP clients that come and go against whichever process `target` names now, and one
/// that floods query-migrate. Errors are expected (processes are replaced): ignored.
final class QMPChurn: @unchecked Sendable {
    private let lock = Monitor()
    private var targets: [String] = [] // guarded by lock
    private var stopped = false // guarded by lock
    private var sessions = 0, floods = 0 // guarded by lock
    private var threads: [KernelThread] = []

    func point(at paths: [String]) { lock.withLock { targets = paths } }
    var counts: (sessions: Int, floods: Int) { lock.withLock { (sessions, floods) } }

    func start(seed: UInt64) throws {
        threads.append(try KernelThread(name: "soak/clients") { [self] in
            var g = SplitMix(state: seed ^ 0xC11E)
            while let paths = lock.withLock({ stopped ? nil : targets }) {
                usleep(UInt32(50_000 + g.below(200_000)))
                guard !paths.isEmpty else { continue }
                let path = paths[g.below(paths.count)]
                if g.below(3) == 0 {
                    // Connect, send half a command, leave.
                    if let fd = try? UnixSocket.connect(path) {
                        let partial = Array(#"{"execute":"qmp_capabilities"}{"execute":"query-mig"#.utf8)
                        _ = partial.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                        close(fd)
                    }
                } else if let c = try? QMPClient(path: path, timeoutSeconds: 2) {
                    _ = try? c.execute("query-status")
                    _ = try? c.execute("query-migrate")
                    if g.below(2) == 0 { _ = try? c.execute("query-migrate-capabilities") }
                }
                lock.withLock { sessions += 1 }
            }
        })
        threads.append(try KernelThread(name: "soak/flood") { [self] in
            var client: QMPClient?
            var current = ""
            while let paths = lock.withLock({ stopped ? nil : targets }) {
                guard let path = paths.first else { usleep(10_000); continue }
                if path != current || client == nil { client = try? QMPClient(path: path, timeoutSeconds: 2); current = path }
                if let c = client {
                    if (try? c.execute("query-migrate")) == nil { client = nil; usleep(20_000) } else { lock.withLock { floods += 1 } }
                } else {
                    usleep(20_000)
                }
            }
        })
    }

    func stop() {
        lock.withLock { stopped = true }
        for t in threads { t.join() }
    }
}

extension FerryBench {
    func runSoak() throws {
        mkdir(output, 0o755)
        let work = "/tmp/ferry-soak-\(getpid())"
        mkdir(work, 0o700)
        defer { try? FileManager.default.removeItem(atPath: work) }
        try makeTestTLSCredentials(in: "\(work)/tls")
        let guest = TestGuestLayout(memory: 64 << 20, vcpus: 1, touched: nil, contents: .zero)
        let exe = ferryExecutable()
        var g = SplitMix(state: seed)
        var serial = 0
        func newProcess(incoming: Bool) throws -> FerryProcess {
            serial += 1
            let p = try FerryProcess(executable: exe, directory: work, name: "vm\(serial)",
                                     arguments: ["--memory", "64M"] + (incoming ? ["--incoming", "defer"] : []))
            try p.qmp.execute("object-add", ["qom-type": "tls-creds-x509", "id": "tls-srv", "dir": "\(work)/tls/server", "endpoint": "server"])
            try p.qmp.execute("object-add", ["qom-type": "tls-creds-x509", "id": "tls-cli", "dir": "\(work)/tls/client", "endpoint": "client"])
            return p
        }
        var source = try newProcess(incoming: false)
        guard source.waitForSerial(2, seconds: 30) else { throw HarnessError("soak: the first guest never started") }
        let churn = QMPChurn()
        try churn.start(seed: seed)
        var done: [SoakMigration] = []
        var samples: [SoakSample] = []
        func sample(_ i: Int, _ role: String, _ p: FerryProcess) {
            let u = processUsage(p.pid)
            samples.append(SoakSample(migration: i, role: role, pid: p.pid, fds: u.fds, threads: u.threads, rssKiB: u.rssKiB))
        }
        for i in 0..<migrations {
            let plan = SoakPlan.draw(&g)
            let destination = try newProcess(incoming: true)
            churn.point(at: [source.qmpPath, destination.qmpPath])
            sample(i, "source", source)
            var m = try soakMigration(i, plan, source: source, destination: destination, guest: guest, work: work)
            // A destination whose incoming migration failed has exited (as QEMU's does).
            if m.outcome == "completed" { sample(i, "destination", destination) }
            let next: FerryProcess
            switch m.outcome {
            case "completed":
                next = destination
                source.terminate()
            case "precopy-failed-source-intact":
                next = source
                destination.terminate()
            default:
                done.append(m)
                print("soak: migration \(i) LOST the guest (seed \(seed)): \(m.detail ?? "")")
                churn.stop()
                source.terminate(); destination.terminate()
                try writeSoak(SoakReport(seed: seed, migrations: done, samples: samples, qmpClientSessions: churn.counts.sessions, floodQueries: churn.counts.floods))
                throw HarnessError("soak: guest lost at migration \(i) (seed \(seed)): \(m.detail ?? "")")
            }
            m.detail = m.detail.map { String($0.prefix(300)) }
            done.append(m)
            print(String(format: "soak %3d/%d  %-16@ %-5@ %-19@ %@  %@ %5llu ms  pauses %llu", i + 1, migrations, plan.mode, plan.tls ? "tls" : "plain",
                         plan.fault, plan.autoRecover ? "auto" : "hand", m.outcome, m.totalMs, m.pauses))
            source = next
        }
        churn.stop()
        source.terminate()
        let c = churn.counts
        try writeSoak(SoakReport(seed: seed, migrations: done, samples: samples, qmpClientSessions: c.sessions, floodQueries: c.floods))
    }

    /// One migration of the soak, its fault and its recovery; the outcome and the memory check.
    private func soakMigration(_ i: Int, _ plan: SoakPlan, source src: FerryProcess, destination dst: FerryProcess,
                               guest: TestGuestLayout, work: String) throws -> SoakMigration {
        let post = plan.mode != "precopy"
        let caps: [(String, Bool)] = [("postcopy-ram", post), ("postcopy-preempt", plan.mode == "postcopy-preempt"), ("auto-recover", post && plan.autoRecover)]
        for p in [src, dst] {
            try p.qmp.execute("migrate-set-capabilities", ["capabilities": caps.map { ["capability": $0.0, "state": $0.1] }])
            // The guest dirties all its RAM many times a second: precopy ends after a pass at 2 s.
            try p.qmp.execute("migrate-set-parameters", ["heartbeat-timeout": 1500, "max-bandwidth": 40_000_000, "max-postcopy-bandwidth": 40_000_000,
                                                         "downtime-limit": 2000])
        }
        try src.qmp.execute("migrate-set-parameters", ["tls-creds": plan.tls ? "tls-cli" : "", "tls-hostname": "localhost"])
        try dst.qmp.execute("migrate-set-parameters", ["tls-creds": plan.tls ? "tls-srv" : ""])
        try dst.qmp.execute("migrate-incoming", ["uri": "tcp:127.0.0.1:0"])
        let q = try dst.qmp.execute("query-migrate") as? [String: Any] ?? [:]
        guard let port = ((q["socket-address"] as? [[String: Any]])?.first?["port"]).flatMap({ UInt16("\($0)") }) else {
            throw HarnessError("soak: the destination reports no port: \(q)")
        }
        let proxy = try FaultProxy(upstream: port)
        defer { proxy.close() }
        _ = src.qmp.takeEvents()
        try src.qmp.execute("migrate", ["uri": proxy.uri])
        let start = Sys.monotonicNanos()
        func ms() -> Int { Int(Sys.nanosSince(start) / 1_000_000) }
        var statuses: [String] = []
        var postcopyAt: Int?, injected = false, deadTried = false, lastRecovery = -10_000
        var info: [String: Any] = [:]
        while true {
            info = try src.qmp.execute("query-migrate") as? [String: Any] ?? [:]
            let status = info["status"] as? String ?? "?"
            if statuses.last != status { statuses.append(status) }
            if ["completed", "failed", "cancelled"].contains(status) { break }
            if ms() > 180_000 { break }
            // A fault meant for precopy lands before the switch to postcopy.
            if post && postcopyAt == nil && status == "active" && ms() >= (plan.fault.hasSuffix("precopy") ? plan.faultAfterMs + 300 : 300) {
                try src.qmp.execute("migrate-start-postcopy")
                postcopyAt = ms()
            }
            let inPostcopy = status.hasPrefix("postcopy")
            let due = plan.fault.hasSuffix("precopy") ? status == "active" && ms() >= plan.faultAfterMs
                : inPostcopy && postcopyAt.map { ms() - $0 >= plan.faultAfterMs } ?? false
            if !injected && plan.fault != "none" && due {
                injected = true
                switch plan.fault {
                case "reset-precopy", "reset-postcopy", "dead-address-first": proxy.reset()
                case "blackhole-precopy", "blackhole-postcopy": proxy.set(.blackhole)
                case "pause": _ = try? src.qmp.execute("migrate-pause")
                default: break
                }
            }
            // Both paused (the fault, or a link that timed out under load): heal, and with
            // recovery by hand ask for it again every 1.5 s until it takes.
            if status == "postcopy-paused", ms() - lastRecovery >= 1500,
               (try? dst.qmp.execute("query-migrate") as? [String: Any])?["status"] as? String == "postcopy-paused" {
                proxy.set(.pass)
                if !plan.autoRecover {
                    _ = try? dst.qmp.execute("migrate-recover", ["uri": "tcp:127.0.0.1:\(port)"])
                    if plan.fault == "dead-address-first" && !deadTried {
                        deadTried = true
                        _ = try? src.qmp.execute("migrate", ["uri": "tcp:127.0.0.1:1", "resume": true])
                        // The attempt fails (nobody listens there): paused again, then the real one.
                        _ = waitFor(seconds: 10) { (try? src.qmp.execute("query-migrate") as? [String: Any])?["status"] as? String == "postcopy-paused" }
                    }
                    _ = try? src.qmp.execute("migrate", ["uri": proxy.uri, "resume": true])
                }
                lastRecovery = ms()
            }
            usleep(10_000)
        }
        let status = info["status"] as? String ?? "?"
        let pauses = qmpNumber((info["x-postcopy-recovery"] as? [String: Any])?["pauses"])
        var m = SoakMigration(index: i, plan: plan, outcome: "lost", statuses: statuses, pauses: pauses,
                              totalMs: qmpNumber(info["total-time"]), memoryCheck: "-", detail: info["error-desc"] as? String)
        if status == "completed" {
            _ = waitFor(seconds: 30) { (try? dst.qmp.execute("query-migrate") as? [String: Any])?["status"] as? String == "completed" }
            let before = dst.serialBytes
            dst.waitForSerial(before + 1, seconds: 30)
            let r = try dst.checkMemory(guest, scratch: "\(work)/ram-\(i).bin")
            try dst.qmp.execute("cont")
            m.memoryCheck = r.passed ? "passed" : r.description
            m.outcome = r.passed ? "completed" : "lost"
            if !r.passed { m.detail = "destination memory check: \(r.description)" }
        } else if status == "failed" && !statuses.contains(where: { $0.hasPrefix("postcopy") }) {
            let run = (try? src.qmp.execute("query-status") as? [String: Any])?["status"] as? String
            let before = src.serialBytes
            let counting = src.waitForSerial(before + 1, seconds: 30)
            let r = try src.checkMemory(guest, scratch: "\(work)/ram-\(i).bin")
            try src.qmp.execute("cont")
            m.memoryCheck = r.passed ? "passed" : r.description
            m.outcome = run == "running" && counting && r.passed ? "precopy-failed-source-intact" : "lost"
            if m.outcome == "lost" { m.detail = "source after a precopy failure: \(run ?? "?"), counting \(counting), \(r.description)" }
        } else {
            m.detail = "ended \(status) after \(statuses.joined(separator: " → ")): \(m.detail ?? "")"
        }
        return m
    }

    private func waitFor(seconds: Double, _ cond: () -> Bool) -> Bool {
        let end = Sys.monotonicNanos() + UInt64(seconds * 1e9)
        while Sys.monotonicNanos() < end { if cond() { return true }; usleep(20_000) }
        return cond()
    }

    private func writeSoak(_ r: SoakReport) throws {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try enc.encode(r).write(to: URL(fileURLWithPath: "\(output)/soak.json"))
        var outcomes: [String: Int] = [:]
        for m in r.migrations { outcomes[m.outcome, default: 0] += 1 }
        var md = "# Soak (`ferry-bench --suites soak --migrations \(r.migrations.count) --seed \(r.seed)`)\n\n"
        md += "One 64 MiB test guest migrated back and forth; each migration's mode, TLS, fault and recovery drawn from the seed. "
        md += "QMP client sessions meanwhile: \(r.qmpClientSessions) (a third of them leave mid-command); flooding query-migrate: \(r.floodQueries).\n\n"
        md += "| outcome | migrations |\n|---|---|\n"
        for (k, v) in outcomes.sorted(by: { $0.key < $1.key }) { md += "| \(k) | \(v) |\n" }
        var kinds: [String: Int] = [:]
        for m in r.migrations { kinds["\(m.plan.mode) / \(m.plan.fault)", default: 0] += 1 }
        md += "\n| mode / fault | migrations |\n|---|---|\n"
        for (k, v) in kinds.sorted(by: { $0.key < $1.key }) { md += "| \(k) | \(v) |\n" }
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

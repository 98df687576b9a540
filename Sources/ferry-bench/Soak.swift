import FerryHarness
import FerryMachine
import FerryQMP
import FerrySys
import Foundation
import Glibc

/// `ferry-bench --suites soak`: one guest (the 2-vCPU test guest by default) migrated back
/// and forth between `ferry run` processes (a completed migration's destination is the next
/// source; every destination is a fresh `--incoming defer` process), each migration drawn
/// from a seeded generator: precopy, postcopy or postcopy-preempt, plain or TLS, and up to
/// three faults through the fault proxy (reset, blackhole, stall, corrupt) or QMP
/// (`migrate-pause`, a recovery to a dead address first), in precopy, at the switch-over, in
/// postcopy or during a recovery; recovery by auto-recover or by hand. QMP clients come and
/// go meanwhile (some leave mid-command) and one floods query-migrate. After each migration
/// the running guest's memory is checked (on the destination, or on the source after a
/// failed migration) and each live process's fds, threads and RSS are sampled; while both
/// sides are paused, their CPU time. Anything but "completed" or a failure with the source
/// intact (before postcopy, or at a switch-over the destination never finished) is a lost guest.
struct SoakFault: Codable, Sendable {
    /// reset, blackhole, stall, corrupt, pause (`migrate-pause`), dead-address (a recovery by
    /// hand first sent to tcp:127.0.0.1:1).
    var kind: String
    /// precopy, switchover, postcopy, recovery.
    var at: String
    /// On a plain link, the protocol point (a `SoakFault.points` name) whose bytes trigger
    /// it; nil: by time (TLS hides the framing).
    var point: String?
    /// For a corruption by time: which way the flipped byte goes.
    var toSource: Bool
    /// precopy: after `migrate`; switchover: after `migrate-start-postcopy`; postcopy: after
    /// the guest last became active on the destination; recovery: after the link is healed.
    var afterMs: Int
    /// How long the link stays down after both sides paused (CPU time is measured meanwhile).
    var holdMs: Int

    /// Plain-link trigger points: the pattern and its direction.
    static let points: [String: ([UInt8], FaultProxy.Direction)] = [
        "pong": (WirePoint.anyPong, .toSource), "ping": (WirePoint.anyPing, .toDestination),
        "cpu-section": (WirePoint.cpuSection, .toDestination), "packaged": (WirePoint.packaged, .toDestination),
        "guest-started": (WirePoint.guestStarted, .toSource), "bitmap-reply": (WirePoint.bitmapReply, .toSource),
        "resume-command": (WirePoint.resumeCommand, .toDestination), "resume-ack": (WirePoint.resumeAck, .toSource),
    ]

    var label: String { "\(kind)@\(at)" + (point.map { "/\($0)" } ?? "") }
}

struct SoakPlan: Codable, Sendable {
    var mode: String // precopy, postcopy, postcopy-preempt
    var tls: Bool
    var faults: [SoakFault]
    var autoRecover: Bool

    static func draw(_ g: inout SplitMix) -> SoakPlan {
        let mode = ["precopy", "postcopy", "postcopy-preempt"][g.below(3)]
        let tls = g.below(3) == 0
        let autoRecover = g.below(2) == 0
        func pick(_ xs: [String]) -> String { xs[g.below(xs.count)] }
        func fault(_ kinds: [String], at: String, points: [String]) -> SoakFault {
            let kind = pick(kinds)
            // Framing bytes only carry a fault on a plain link; a corruption always needs one
            // there (a flipped page byte would be silent damage, as in QEMU's stream).
            let byPattern = !tls && (at == "switchover" || at == "recovery" || kind == "corrupt") && kind != "pause" && kind != "dead-address"
            let point = byPattern ? pick(kind == "corrupt" && at != "switchover" && at != "recovery" ? ["pong", "ping"] : points) : nil
            return SoakFault(kind: kind, at: at, point: point, toSource: g.below(2) == 0,
                             afterMs: at == "switchover" || at == "recovery" ? g.below(20) : 100 + g.below(500), holdMs: g.below(1000))
        }
        let link = ["reset", "blackhole", "stall", "corrupt"]
        var faults: [SoakFault] = []
        if mode == "precopy" {
            switch g.below(3) {
            case 0: break
            case 1: faults = [fault(link, at: "precopy", points: [])]
            // A precopy switch-over has no moment to aim at by time: TLS links fault in precopy.
            default: faults = [tls ? fault(link, at: "precopy", points: []) : fault(["reset", "blackhole", "corrupt"], at: "switchover", points: ["cpu-section"])]
            }
        } else {
            switch g.below(6) {
            case 0: break
            case 1: faults = [fault(link, at: "precopy", points: [])]
            default:
                faults = [g.below(3) == 0 ? fault(["reset", "blackhole", "corrupt"], at: "switchover", points: ["packaged", "guest-started"])
                                          : fault(link + ["pause"], at: "postcopy", points: [])]
                for _ in 0..<g.below(3) {
                    faults.append(g.below(2) == 0 ? fault(link + ["pause"], at: "postcopy", points: [])
                                  : fault(["reset", "blackhole", "corrupt"] + (autoRecover ? [] : ["dead-address"]), at: "recovery",
                                          points: ["bitmap-reply", "resume-command", "resume-ack"]))
                }
            }
        }
        return SoakPlan(mode: mode, tls: tls, faults: faults, autoRecover: autoRecover)
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

/// A process's user + system CPU time in ms (fields 14 and 15 of /proc/PID/stat, which count
/// exited threads too), and the shares of its live vCPU threads (the guest's own work) and
/// live QMP session threads (the clients' load: the flooding one keeps its session).
func processCPUMs(_ pid: pid_t) -> (total: Int, vcpus: Int, qmp: Int) {
    func cpu(_ path: String) -> (name: Substring, ms: Int)? {
        guard let stat = try? String(contentsOfFile: path, encoding: .utf8),
              let open = stat.firstIndex(of: "("), let close = stat.lastIndex(of: ")") else { return nil }
        let f = stat[stat.index(after: close)...].split(separator: " ")
        guard f.count > 12, let u = Int(f[11]), let s = Int(f[12]) else { return nil }
        return (stat[stat.index(after: open)..<close], (u + s) * 1000 / sysconf(Int32(_SC_CLK_TCK)))
    }
    var vcpus = 0, qmp = 0
    for tid in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? [] {
        guard let t = cpu("/proc/\(pid)/task/\(tid)/stat") else { continue }
        if t.name.hasPrefix("vcpu") { vcpus += t.ms } else if t.name.hasPrefix("qmp/client") { qmp += t.ms }
    }
    return (cpu("/proc/\(pid)/stat")?.ms ?? -1, vcpus, qmp)
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
        let guest = TestGuestLayout(memory: 64 << 20, vcpus: vcpus, touched: nil, contents: .zero)
        let exe = ferryExecutable()
        var g = SplitMix(state: seed)
        var serial = 0
        func newProcess(incoming: Bool) throws -> FerryProcess {
            serial += 1
            let p = try FerryProcess(executable: exe, directory: work, name: "vm\(serial)",
                                     arguments: ["--memory", "64M", "--smp", "\(vcpus)"] + (incoming ? ["--incoming", "defer"] : []))
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
            case "precopy-failed-source-intact", "switchover-failed-source-intact":
                next = source
                destination.terminate()
            default:
                done.append(m)
                print("soak: migration \(i) LOST the guest (seed \(seed)): \(m.detail ?? "")")
                churn.stop()
                source.terminate(); destination.terminate()
                try writeSoak(SoakReport(seed: seed, vcpus: vcpus, migrations: done, samples: samples, qmpClientSessions: churn.counts.sessions, floodQueries: churn.counts.floods))
                throw HarnessError("soak: guest lost at migration \(i) (seed \(seed)): \(m.detail ?? "")")
            }
            m.detail = m.detail.map { String($0.prefix(300)) }
            done.append(m)
            print(String(format: "soak %3d/%d  %-16@ %-5@ %@  %@ %5llu ms  pauses %llu  [%@] fired [%@]", i + 1, migrations, plan.mode, plan.tls ? "tls" : "plain",
                         plan.autoRecover ? "auto" : "hand", m.outcome, m.totalMs, m.pauses, m.injected.joined(separator: " "), m.proxyFired.joined(separator: ", ")))
            fflush(nil)
            source = next
        }
        churn.stop()
        source.terminate()
        let c = churn.counts
        try writeSoak(SoakReport(seed: seed, vcpus: vcpus, migrations: done, samples: samples, qmpClientSessions: c.sessions, floodQueries: c.floods))
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
        var injected: [String] = []
        var deadAddressNext = false, timedFaults = 0
        // Faults so far: the timed ones and the patterns the proxy has seen.
        func faultEvents() -> Int { timedFaults + proxy.fired.count }
        func inject(_ f: SoakFault) {
            injected.append(f.label)
            if f.point == nil { timedFaults += 1 }
            let action: FaultProxy.Action = ["reset": .reset, "blackhole": .blackhole, "stall": .stall][f.kind] ?? .corrupt
            if let name = f.point, let (pattern, direction) = SoakFault.points[name] {
                proxy.on(direction, pattern: pattern, action) // when those bytes next pass
                return
            }
            switch f.kind {
            case "reset": proxy.reset()
            case "blackhole": proxy.set(.blackhole)
            case "stall": proxy.set(.stall)
            case "corrupt": proxy.on(f.toSource ? .toSource : .toDestination, pattern: [], .corrupt) // the next bytes
            case "pause": _ = try? src.qmp.execute("migrate-pause")
            case "dead-address": deadAddressNext = true
            default: break
            }
        }
        var pending = plan.faults[...]
        // A precopy switch-over's fault waits for its bytes from the start.
        if let f = pending.first, f.at == "switchover", plan.mode == "precopy" { inject(f); pending.removeFirst() }
        _ = src.qmp.takeEvents()
        try src.qmp.execute("migrate", ["uri": proxy.uri])
        let start = Sys.monotonicNanos()
        func ms() -> Int { Int(Sys.nanosSince(start) / 1_000_000) }
        var statuses: [String] = []
        var postcopyAt: Int?, activeSince: Int?, healedAt: Int?, lastRecovery = -10_000
        var outageSince: Int?, outageFaults = 0, healed = false, holdMs = 0
        var outageCPU = ((total: 0, vcpus: 0, qmp: 0), (total: 0, vcpus: 0, qmp: 0))
        var paused: [SoakPausedCPU] = []
        var info: [String: Any] = [:]
        func statusOf(_ p: FerryProcess) -> String? { (try? p.qmp.execute("query-migrate") as? [String: Any])?["status"] as? String }
        while true {
            info = try src.qmp.execute("query-migrate") as? [String: Any] ?? [:]
            let status = info["status"] as? String ?? "?"
            if statuses.last != status { statuses.append(status) }
            if ["completed", "failed", "cancelled"].contains(status) { break }
            if ms() > 180_000 { break }
            let next = pending.first
            // A fault meant for precopy lands before the switch to postcopy.
            if post && postcopyAt == nil && status == "active" && ms() >= (next?.at == "precopy" ? next!.afterMs + 300 : 300) {
                let atSwitch = next?.at == "switchover" ? pending.removeFirst() : nil
                if let f = atSwitch, f.point != nil { inject(f) }
                try src.qmp.execute("migrate-start-postcopy")
                postcopyAt = ms()
                if let f = atSwitch, f.point == nil { usleep(UInt32(f.afterMs * 1000)); inject(f) }
            }
            activeSince = status == "postcopy-active" ? activeSince ?? ms() : nil
            if let f = next {
                let due = f.at == "precopy" ? status == "active" && ms() >= f.afterMs
                    : f.at == "postcopy" ? activeSince.map { ms() - $0 >= f.afterMs } ?? false
                    : f.at == "recovery" && f.point == nil ? healedAt.map { ms() - $0 >= f.afterMs } ?? false : false
                if due { inject(f); pending.removeFirst(); if f.at == "recovery" { healedAt = nil } }
            }
            // An outage: from both sides paused (a fault, or a link that timed out under load;
            // a destination that never ran the guest has failed and refuses recovery) to
            // postcopy-active again. After the fault's hold the link heals; a fault that fires
            // during the recovery starts a new outage. By hand, recovery is asked for every
            // 1.5 s while the source sits paused.
            let recovering = ["postcopy-paused", "postcopy-recover-setup", "postcopy-recover"].contains(status)
            if !recovering || faultEvents() != outageFaults { outageSince = nil; healed = false }
            guard recovering else { usleep(10_000); continue }
            let d = statusOf(dst) ?? "?"
            let dstWaits = d == "postcopy-paused" || d == "failed"
            if outageSince == nil, status == "postcopy-paused", dstWaits {
                outageSince = ms()
                outageFaults = faultEvents()
                outageCPU = (processCPUMs(src.pid), processCPUMs(dst.pid))
                holdMs = injected.isEmpty ? 0 : plan.faults[injected.count - 1].holdMs
            }
            guard let since = outageSince else { usleep(10_000); continue }
            if !healed && ms() - since >= holdMs {
                healed = true
                if holdMs >= 200 {
                    let s1 = processCPUMs(src.pid), d1 = processCPUMs(dst.pid)
                    let (s0, d0) = outageCPU
                    paused.append(SoakPausedCPU(holdMs: ms() - since, sourceCPUMs: (s1.total - s1.vcpus - s1.qmp) - (s0.total - s0.vcpus - s0.qmp),
                                                destinationCPUMs: (d1.total - d1.vcpus - d1.qmp) - (d0.total - d0.vcpus - d0.qmp),
                                                qmpCPUMs: s1.qmp - s0.qmp + d1.qmp - d0.qmp, destinationVCPUMs: d1.vcpus - d0.vcpus))
                }
                proxy.set(.pass)
                // A fault during the recovery: a pattern waits for its bytes, a timed one counts from now.
                if let f = pending.first, f.at == "recovery" {
                    if f.point != nil || f.kind == "dead-address" { inject(f); pending.removeFirst() } else { healedAt = ms() }
                    outageFaults = faultEvents()
                }
            }
            if healed, !plan.autoRecover, status == "postcopy-paused", dstWaits, ms() - lastRecovery >= 1500 {
                if d == "postcopy-paused" { _ = try? dst.qmp.execute("migrate-recover", ["uri": "tcp:127.0.0.1:\(port)"]) }
                if deadAddressNext {
                    deadAddressNext = false
                    _ = try? src.qmp.execute("migrate", ["uri": "tcp:127.0.0.1:1", "resume": true])
                    // The attempt fails (nobody listens there): paused again, then the real one.
                    _ = waitFor(seconds: 10) { statusOf(src) == "postcopy-paused" }
                }
                _ = try? src.qmp.execute("migrate", ["uri": proxy.uri, "resume": true])
                lastRecovery = ms()
            }
            usleep(10_000)
        }
        proxy.set(.pass)
        let status = info["status"] as? String ?? "?"
        let pauses = qmpNumber((info["x-postcopy-recovery"] as? [String: Any])?["pauses"])
        var m = SoakMigration(index: i, plan: plan, outcome: "lost", statuses: statuses, injected: injected, proxyFired: proxy.fired,
                              pauses: pauses, paused: paused, totalMs: qmpNumber(info["total-time"]), memoryCheck: "-",
                              detail: info["error-desc"] as? String)
        if status == "completed" {
            _ = waitFor(seconds: 30) { (try? dst.qmp.execute("query-migrate") as? [String: Any])?["status"] as? String == "completed" }
            let before = dst.serialBytes
            dst.waitForSerial(before + 1, seconds: 30)
            let r = try dst.checkMemory(guest, scratch: "\(work)/ram-\(i).bin")
            try dst.qmp.execute("cont")
            m.memoryCheck = r.passed ? "passed" : r.description
            m.outcome = r.passed ? "completed" : "lost"
            if !r.passed { m.detail = "destination memory check: \(r.description)" }
        } else if status == "failed" {
            // Before postcopy, or a switch-over the destination never finished (it said so):
            // the guest runs on here, and must never run there.
            let run = (try? src.qmp.execute("query-status") as? [String: Any])?["status"] as? String
            let there = (try? dst.qmp.execute("query-status") as? [String: Any])?["status"] as? String
            let before = src.serialBytes
            let counting = src.waitForSerial(before + 1, seconds: 30)
            let r = try src.checkMemory(guest, scratch: "\(work)/ram-\(i).bin")
            try src.qmp.execute("cont")
            m.memoryCheck = r.passed ? "passed" : r.description
            let kind = statuses.contains { $0.hasPrefix("postcopy") } ? "switchover" : "precopy"
            m.outcome = run == "running" && there != "running" && counting && r.passed ? "\(kind)-failed-source-intact" : "lost"
            if m.outcome == "lost" { m.detail = "source after a \(kind) failure: \(run ?? "?") (destination \(there ?? "gone")), counting \(counting), \(r.description)" }
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

    /// `--suites soak-report`: the Markdown and the chart again from `soak.json` in `output`.
    func rewriteSoakReport() throws {
        let r = try JSONDecoder().decode(SoakReport.self, from: Data(contentsOf: URL(fileURLWithPath: "\(output)/soak.json")))
        try writeSoak(r, json: false)
    }

    private func writeSoak(_ r: SoakReport, json: Bool = true) throws {
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

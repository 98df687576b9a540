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
        // Sampled with no churn client connected and once the counts are steady (a session's
        // thread closes its fd after its client left): what is left is the process's own.
        func sample(_ i: Int, _ role: String, _ p: FerryProcess) {
            churn.hold()
            var u = processUsage(p.pid)
            for _ in 0..<20 {
                usleep(50_000)
                let again = processUsage(p.pid)
                if again.fds == u.fds && again.threads == u.threads { break }
                u = again
            }
            samples.append(SoakSample(migration: i, role: role, pid: p.pid, fds: u.fds, threads: u.threads, rssKiB: u.rssKiB))
        }
        for i in 0..<migrations {
            let plan = SoakPlan.draw(&g)
            let destination = try newProcess(incoming: true)
            sample(i, "source", source)
            churn.point(at: [source.qmpPath, destination.qmpPath])
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
            _ = waitFor(seconds: 30) { statusOf(dst) == "completed" }
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
}

import FerryQMP
import FerrySys
import Foundation
import Glibc

/// What the soak watches in the processes (from /proc) and the QMP load it puts on them.

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
    /// Connections the two threads hold now (guarded by lock): `hold` waits for none.
    private var connected = 0
    private var threads: [KernelThread] = []

    func point(at paths: [String]) { lock.withLock { targets = paths } }
    var counts: (sessions: Int, floods: Int) { lock.withLock { (sessions, floods) } }

    /// No target, and back once no client holds a connection: a process's fds counted then
    /// are its own, not the clients' of the moment.
    func hold() {
        lock.withLock {
            targets = []
            while connected > 0 { _ = lock.wait(timeoutNanos: 10_000_000) }
        }
    }

    /// Counts a connection about to open, if the targets still say so: checked and counted
    /// under the lock `hold` waits on, so it cannot miss one being opened.
    private func claimConnection(if stillWanted: ([String]) -> Bool) -> Bool {
        lock.withLock {
            guard stillWanted(targets) else { return false }
            connected += 1
            return true
        }
    }

    private func connectionClosed() { lock.withLock { connected -= 1; lock.broadcast() } }

    func start(seed: UInt64) throws {
        threads.append(try KernelThread(name: "soak/clients") { [self] in
            var g = SplitMix(state: seed ^ 0xC11E)
            while let paths = lock.withLock({ stopped ? nil : targets }) {
                usleep(UInt32(50_000 + g.below(200_000)))
                guard !paths.isEmpty, claimConnection(if: { $0 == paths }) else { continue }
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
                connectionClosed()
                lock.withLock { sessions += 1 }
            }
        })
        threads.append(try KernelThread(name: "soak/flood") { [self] in
            var client: QMPClient?
            var current = ""
            func drop() { if client != nil { client = nil; connectionClosed() } }
            while let paths = lock.withLock({ stopped ? nil : targets }) {
                guard let path = paths.first else {
                    drop()
                    current = ""
                    usleep(10_000)
                    continue
                }
                if path != current || client == nil {
                    drop()
                    guard claimConnection(if: { $0.first == path }) else { continue }
                    client = try? QMPClient(path: path, timeoutSeconds: 2)
                    current = path
                    if client == nil { connectionClosed() }
                }
                if let c = client {
                    if (try? c.execute("query-migrate")) == nil { drop(); usleep(20_000) } else { lock.withLock { floods += 1 } }
                } else {
                    usleep(20_000)
                }
            }
            drop()
        })
    }

    func stop() {
        lock.withLock { stopped = true }
        for t in threads { t.join() }
    }
}

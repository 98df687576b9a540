import ArgumentParser
import FerryHarness
import FerryQMP
import FerrySys
import Foundation
import Glibc

func mib(_ v: Any?) -> String { MigrationProgress.mib(qmpNumber(v)) }
func num(_ v: Any?) -> UInt64 { qmpNumber(v) }

/// What `ferry migrate` exits with (also in `ferry migrate --help` and the README).
enum MigrateExit: Int32 {
    case completed = 0, failed = 1, cancelled = 2, timedOut = 3, paused = 4
    /// A second Ctrl-C in postcopy: this command leaves, the migration goes on.
    case left = 130

    static let help = "Exit codes: 0 completed, 1 failed (or an error), 2 cancelled, 3 timed out (--timeout-action cancel), 4 left paused (--timeout-action pause), 64 bad usage, 130 left by a second Ctrl-C in postcopy (the migration goes on)."
}

enum TimeoutAction: String, ExpressibleByArgument, CaseIterable {
    case cancel, postcopy, pause
}

/// One query-migrate's numbers as operators read them: the live line and `status` (text and
/// `--json`) both come from here, so they never disagree with query-migrate.
struct MigrationProgress {
    let status: String
    let elapsedMs: UInt64
    let transferred, remaining, total: UInt64
    let mbps: Double
    let dirtyPagesRate, pageSize, passes, pageRequests: UInt64
    let downtimeMs, expectedDowntimeMs, blocktimeMs: UInt64?
    let pauses, recoveries: UInt64
    /// Postcopy: bytes/s of the pages the destination asked for and of the background stream.
    let requestedRate, backgroundRate: Double?
    let error: String?

    init(_ info: [String: Any]) {
        let ram = info["ram"] as? [String: Any] ?? [:]
        status = info["status"] as? String ?? "none"
        elapsedMs = num(info["total-time"])
        transferred = num(ram["transferred"]); remaining = num(ram["remaining"]); total = num(ram["total"])
        mbps = (ram["mbps"] as? NSNumber)?.doubleValue ?? 0
        dirtyPagesRate = num(ram["dirty-pages-rate"]); pageSize = max(1, num(ram["page-size"]))
        passes = num(ram["dirty-sync-count"]); pageRequests = num(ram["postcopy-requests"])
        downtimeMs = info["downtime"].map(num); expectedDowntimeMs = info["expected-downtime"].map(num)
        blocktimeMs = info["postcopy-blocktime"].map(num)
        let rec = info["x-postcopy-recovery"] as? [String: Any] ?? [:]
        pauses = num(rec["pauses"]); recoveries = num(rec["recoveries"])
        requestedRate = (ram["x-postcopy-requested-bytes-per-second"] as? NSNumber)?.doubleValue
        backgroundRate = (ram["x-postcopy-background-bytes-per-second"] as? NSNumber)?.doubleValue
        error = info["error-desc"] as? String
    }

    var isFinished: Bool { ["completed", "failed", "cancelled"].contains(status) }
    /// The guest runs on the destination: cancelling would lose it.
    var isPostcopy: Bool { status.hasPrefix("postcopy") }
    /// RAM not left to send, of all of it (nil before the first numbers).
    var percentDone: Double? { total > 0 ? 100 * Double(total - min(remaining, total)) / Double(total) : nil }
    var bytesPerSecond: Double { mbps * 1e6 / 8 }
    var dirtyBytesPerSecond: Double { Double(dirtyPagesRate * pageSize) }
    /// At the measured rate, the time to send what remains (nil without a rate).
    var etaMs: UInt64? { bytesPerSecond > 0 && total > 0 ? UInt64(Double(remaining) / bytesPerSecond * 1000) : nil }

    var line: String {
        var l = status
        guard total > 0 else { return l }
        if let p = percentDone { l += String(format: "  %.0f%%", p) }
        l += String(format: "  pass %llu  sent %.1f MiB  %.0f Mbit/s  remaining %.1f MiB  dirty %llu pages/s",
                    passes, Double(transferred) / 1048576, mbps, Double(remaining) / 1048576, dirtyPagesRate)
        if let e = etaMs, !isPostcopy || remaining > 0 { l += "  ETA \(Self.duration(e))" }
        if let e = expectedDowntimeMs { l += "  expected downtime \(e) ms" }
        if pageRequests > 0 { l += "  page requests \(pageRequests)" }
        if let r = requestedRate, let b = backgroundRate { l += "  requested \(Self.rate(r))  background \(Self.rate(b))" }
        return l
    }

    /// `ferry migrate status`, laid out as `virsh domjobinfo`.
    var report: String {
        var rows: [(String, String)] = [("Phase", status), ("Time elapsed", "\(elapsedMs) ms")]
        if total > 0 {
            rows += [("Data processed", Self.mib(transferred)), ("Data remaining", Self.mib(remaining)), ("Data total", Self.mib(total))]
            if let p = percentDone { rows.append(("Done", String(format: "%.1f %%", p))) }
            rows += [("Memory bandwidth", String(format: "%.0f Mbit/s", mbps)), ("Dirty rate", "\(dirtyPagesRate) pages/s"), ("Iteration", "\(passes)")]
            if let e = etaMs, !isFinished { rows.append(("Time remaining (ETA)", Self.duration(e))) }
        }
        if let d = expectedDowntimeMs { rows.append(("Expected downtime", "\(d) ms")) }
        if let d = downtimeMs { rows.append(("Total downtime", "\(d) ms")) }
        if let b = blocktimeMs { rows.append(("vCPU blocked time", "\(b) ms")) }
        if pageRequests > 0 { rows.append(("Page requests", "\(pageRequests)")) }
        if let r = requestedRate, let b = backgroundRate { rows += [("Requested pages", Self.rate(r)), ("Background pages", Self.rate(b))] }
        if pauses > 0 || recoveries > 0 { rows.append(("Postcopy pauses", "\(pauses), recovered \(recoveries)")) }
        if let e = error { rows.append(("Error", e)) }
        let w = rows.map(\.0.count).max() ?? 0
        return rows.map { $0.0 + ":" + String(repeating: " ", count: w + 2 - $0.0.count) + $0.1 }.joined(separator: "\n")
    }

    var json: [String: Any] {
        var j: [String: Any] = ["status": status, "elapsed-ms": elapsedMs, "transferred-bytes": transferred, "remaining-bytes": remaining,
                                "total-bytes": total, "mbps": mbps, "dirty-pages-rate": dirtyPagesRate, "passes": passes,
                                "page-requests": pageRequests, "postcopy-pauses": pauses, "postcopy-recoveries": recoveries]
        j["percent-done"] = percentDone ?? NSNull()
        j["eta-ms"] = etaMs ?? NSNull()
        j["downtime-ms"] = downtimeMs ?? NSNull()
        j["expected-downtime-ms"] = expectedDowntimeMs ?? NSNull()
        j["blocktime-ms"] = blocktimeMs ?? NSNull()
        j["postcopy-requested-bytes-per-second"] = requestedRate ?? NSNull()
        j["postcopy-background-bytes-per-second"] = backgroundRate ?? NSNull()
        j["error"] = error ?? NSNull()
        return j
    }

    static func mib(_ b: UInt64) -> String { String(format: "%.1f MiB", Double(b) / 1048576) }
    static func rate(_ bytesPerSecond: Double) -> String { String(format: "%.1f MiB/s", bytesPerSecond / 1048576) }
    static func duration(_ ms: UInt64) -> String { ms < 10_000 ? String(format: "%.1f s", Double(ms) / 1000) : "\(ms / 1000) s" }
}

func printSummary(_ info: [String: Any]) {
    let ram = info["ram"] as? [String: Any] ?? [:]
    print("status:        \(info["status"] ?? "?")")
    if let e = info["error-desc"] { print("error:         \(e)") }
    print("total time:    \(num(info["total-time"])) ms")
    print("setup time:    \(num(info["setup-time"])) ms")
    if let d = info["downtime"] { print("downtime:      \(num(d)) ms") }
    if let r = info["x-postcopy-recovery"] as? [String: Any] {
        print("postcopy:      paused \(num(r["pauses"]))×, recovered \(num(r["recoveries"]))× (\(num(r["attempts"])) attempts), \(num(r["paused-ms"])) ms paused, last resume → active \(String(format: "%.2f", (r["last-recovery-ms"] as? NSNumber)?.doubleValue ?? 0)) ms, bitmap \(num(r["bitmap-bytes"])) B, \(num(r["pages-resent"])) pages re-sent")
    }
    if !ram.isEmpty {
        if num(ram["postcopy-requests"]) > 0 { print("page requests: \(num(ram["postcopy-requests"]))\((ram["x-auto-postcopy"] as? Bool) == true ? " (switched to postcopy by itself)" : "")") }
        print("transferred:   \(mib(ram["transferred"])) in \(num(ram["dirty-sync-count"])) passes (\(num(ram["normal"])) pages, \(num(ram["duplicate"])) zero pages)")
    }
}

/// Follows a running migration with a live progress line; returns the final query-migrate.
/// (`ferry demo`'s follower; `ferry migrate` has its own, with timeout and Ctrl-C.)
func followMigration(_ client: QMPClient, timeout: Double = 3600) throws -> [String: Any] {
    let start = Sys.monotonicNanos()
    let live = ProgressPrinter()
    while true {
        let info = try client.execute("query-migrate") as? [String: Any] ?? [:]
        let p = MigrationProgress(info)
        live.show(p)
        if p.isFinished { live.end(); return info }
        if Double(Sys.monotonicNanos() - start) / 1e9 > timeout { throw QMPError("timed out waiting for the migration") }
        usleep(100_000)
    }
}

/// The live line: rewritten in place on a terminal, once a second otherwise.
final class ProgressPrinter {
    private let tty = isatty(1) != 0
    private var lastPrinted: UInt64 = 0
    func show(_ p: MigrationProgress) {
        let now = Sys.monotonicNanos()
        if tty { print("\r\u{1b}[K" + p.line, terminator: ""); fflush(nil) }
        else if now - lastPrinted > 1_000_000_000 || p.isFinished { print(p.line); fflush(nil); lastPrinted = now }
    }
    func end() { if tty { print("") } }
}

/// SIGINT and SIGTERM, counted on a thread of their own (`ferry-signals`) so the follower
/// decides what an interrupt means: cancel a precopy, refuse to lose a postcopy guest.
/// Ownership: `count` is guarded by `lock`.
final class InterruptCounter: @unchecked Sendable {
    private let lock = Monitor()
    private var count = 0
    init() {
        let wait = blockTerminationSignals()
        try? KernelThread.detached(name: "ferry-signals") { [self] in
            while true {
                _ = wait()
                lock.withLock { count += 1 }
            }
        }
    }
    var interrupts: Int { lock.withLock { count } }
}

/// The source's (and optionally the destination's) QMP socket.
struct MigrationSockets: ParsableArguments {
    @Option(help: "The source VM's QMP socket.")
    var qmp: String

    func source() -> QMPClient { Self.connect(qmp, "source") }

    static func connect(_ path: String, _ side: String) -> QMPClient {
        do { return try QMPClient(path: path, timeoutSeconds: 0) } catch {
            fail("cannot reach the \(side) VM's QMP socket \(path): \(error)")
        }
    }
}

struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Migrate a running VM over QMP with live progress, or act on a running migration.",
        discussion: "`ferry migrate --qmp SOCK URI` starts one (the `start` subcommand). " + MigrateExit.help,
        subcommands: [MigrateStart.self, MigrateStatus.self, MigrateCancel.self, MigratePause.self, MigrateRecover.self, MigrateStartPostcopy.self],
        defaultSubcommand: MigrateStart.self)
}

struct MigrateStart: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "start", abstract: "Start a migration and follow it to the end.", discussion: MigrateExit.help)

    @OptionGroup var sockets: MigrationSockets

    @Option(help: "The destination VM's QMP socket: the capabilities and parameters given here are set on both sides.")
    var destQmp: String?

    @Argument(help: "Destination URI: tcp:HOST:PORT, unix:PATH, exec:COMMAND or file:PATH.")
    var uri: String

    @Option(help: "Bandwidth limit in bytes/s (0 = unlimited; K/M/G suffixes).")
    var maxBandwidth: ByteSize?

    @Option(help: "Downtime limit in ms.")
    var downtimeLimit: UInt64?

    @Flag(help: "Enable postcopy (capability postcopy-ram; the destination needs it too, or --dest-qmp).")
    var postcopy = false

    @Option(help: "With --postcopy: migrate-start-postcopy after this many ms of precopy.")
    var postcopyAfter: UInt64?

    @Option(help: "With --postcopy: switch by itself after N passes that do not shrink the rest.")
    var autoSwitchPasses: UInt64?

    @Flag(help: "Resume a paused postcopy migration on a new connection (migrate resume=true).")
    var resume = false

    @Option(help: "TLS: id of the source's tls-creds-x509/-psk object (ferry run --object ...); the destination needs its own.")
    var tlsCreds: String?

    @Option(help: "TLS: the name the destination's certificate must carry (default: the URI's host).")
    var tlsHostname: String?

    @Option(help: "Give up waiting after this many seconds and take --timeout-action.")
    var timeout: Double?

    @Option(help: "What to do at --timeout: \(TimeoutAction.allCases.map(\.rawValue).joined(separator: ", ")) (pause: postcopy only; still in precopy it cancels).")
    var timeoutAction: TimeoutAction = .cancel

    @OptionGroup(title: "Migration settings")
    var settings: MigrationSettingOptions

    func validate() throws {
        if let timeout, !(timeout > 0) { throw ValidationError("--timeout must be a positive number of seconds") }
        let caps = try settings.capabilities()
        let canPostcopy = postcopy || caps.contains(.postcopyRAM)
        if timeoutAction != .cancel && timeout == nil { throw ValidationError("--timeout-action \(timeoutAction.rawValue) needs --timeout") }
        if [.postcopy, .pause].contains(timeoutAction) && !canPostcopy {
            throw ValidationError("--timeout-action \(timeoutAction.rawValue) needs --postcopy (or --migrate-capability postcopy-ram)")
        }
        if postcopyAfter != nil && !canPostcopy { throw ValidationError("--postcopy-after needs --postcopy") }
    }

    func run() throws {
        let interrupts = InterruptCounter()
        let c = sockets.source()
        let dest = destQmp.map { MigrationSockets.connect($0, "destination") }
        do {
            var caps = try settings.capabilities().map(\.rawValue)
            if postcopy && !caps.contains("postcopy-ram") { caps.append("postcopy-ram") }
            var shared = try settings.parameters()
            if let autoSwitchPasses { shared["postcopy-auto-switch-passes"] = autoSwitchPasses }
            var sourceOnly: [String: Any] = [:]
            if let maxBandwidth { sourceOnly["max-bandwidth"] = UInt64(maxBandwidth.bytes) }
            if let downtimeLimit { sourceOnly["downtime-limit"] = downtimeLimit }
            if let tlsCreds { sourceOnly["tls-creds"] = tlsCreds }
            if let tlsHostname { sourceOnly["tls-hostname"] = tlsHostname }
            // Both sides the same capabilities and shared parameters (a mismatch fails the
            // migration later, with less to go on); a resume keeps what is set.
            for (side, q) in [("source", c)] + (dest.map { [("destination", $0)] } ?? []) where !resume {
                do {
                    if !caps.isEmpty { try q.execute("migrate-set-capabilities", ["capabilities": caps.map { ["capability": $0, "state": true] }]) }
                    if !shared.isEmpty { try q.execute("migrate-set-parameters", shared) }
                } catch let e as QMPError { fail("\(side): \(e.desc)") }
            }
            if !sourceOnly.isEmpty { try c.execute("migrate-set-parameters", sourceOnly) }
            try c.execute("migrate", resume ? ["uri": uri, "resume": true] : ["uri": uri])
            let (info, code) = try follow(c, interrupts)
            printSummary(info)
            if code != .completed { throw ExitCode(code.rawValue) }
        } catch let e as QMPError {
            fail(e.desc)
        }
    }

    /// Follows the migration to its end, taking the timeout action and Ctrl-C as they come.
    private func follow(_ c: QMPClient, _ interrupts: InterruptCounter) throws -> ([String: Any], MigrateExit) {
        let start = Sys.monotonicNanos()
        let live = ProgressPrinter()
        var handled = 0, timedOut = false, postcopyStarted = false, pausing = false
        var lastPass: UInt64 = 0, passesOverBandwidth = 0, warned = false
        func say(_ s: String) { live.end(); FileHandleStderr.write("ferry: \(s)\n") }
        while true {
            let info = try c.execute("query-migrate") as? [String: Any] ?? [:]
            let p = MigrationProgress(info)
            live.show(p)
            switch p.status {
            case "completed": live.end(); return (info, .completed)
            case "failed": live.end(); return (info, .failed)
            case "cancelled": live.end(); return (info, timedOut ? .timedOut : .cancelled)
            case "postcopy-paused" where pausing: live.end(); return (info, .paused)
            default: break
            }
            let elapsedMs = (Sys.monotonicNanos() - start) / 1_000_000
            if let after = postcopyAfter, !postcopyStarted, elapsedMs >= after, p.status == "active" {
                try c.execute("migrate-start-postcopy")
                postcopyStarted = true
            }
            // A pass ended: a guest that dirties faster than the link carries never converges.
            if p.passes > lastPass {
                lastPass = p.passes
                passesOverBandwidth = p.status == "active" && p.bytesPerSecond > 0 && p.dirtyBytesPerSecond > p.bytesPerSecond ? passesOverBandwidth + 1 : 0
                if passesOverBandwidth >= 2 && !warned {
                    warned = true
                    say(String(format: "warning: the guest dirties %.0f MB/s and the link carries %.0f MB/s: precopy will not converge. Consider --postcopy (or --timeout-action postcopy), --migrate-capability auto-converge, or a higher --max-bandwidth.",
                               p.dirtyBytesPerSecond / 1e6, p.bytesPerSecond / 1e6))
                }
            }
            let n = interrupts.interrupts
            if n > handled {
                handled = n
                if p.isPostcopy {
                    if n == 1 {
                        say("not cancelling: the guest runs on the destination and its pages are still here, so a cancel would lose it. Pause instead (ferry migrate pause --qmp \(sockets.qmp)), or press Ctrl-C again to leave this command while the migration goes on.")
                    } else {
                        say("leaving; the migration goes on (ferry migrate status --qmp \(sockets.qmp))")
                        return (info, .left)
                    }
                } else {
                    say("cancelling the migration (Ctrl-C); the source guest runs on")
                    _ = try? c.execute("migrate_cancel")
                }
            }
            if let t = timeout, !timedOut, Double(elapsedMs) / 1000 >= t {
                timedOut = true
                try takeTimeoutAction(c, p, say: say, pausing: &pausing)
            }
            usleep(100_000)
        }
    }

    private func takeTimeoutAction(_ c: QMPClient, _ p: MigrationProgress, say: (String) -> Void, pausing: inout Bool) throws {
        let t = String(format: "%g", timeout ?? 0)
        switch (timeoutAction, p.isPostcopy) {
        case (.cancel, false), (.pause, false):
            say("timed out after \(t) s (\(p.status)): cancelling; the source guest runs on")
            _ = try? c.execute("migrate_cancel")
        case (.cancel, true), (.postcopy, true):
            say("timed out after \(t) s, but in \(p.status) the guest runs on the destination: waiting for the end (a cancel would lose it)")
        case (.postcopy, false):
            say("timed out after \(t) s in precopy: switching to postcopy")
            try c.execute("migrate-start-postcopy")
        case (.pause, true):
            say("timed out after \(t) s: pausing the postcopy migration (resume with ferry migrate recover)")
            try c.execute("migrate-pause")
            pausing = true
        }
    }
}

struct MigrateStatus: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "status", abstract: "The migration's phase and numbers, as virsh domjobinfo shows them.")

    @OptionGroup var sockets: MigrationSockets

    @Flag(help: "As JSON (the same numbers, from query-migrate).")
    var json = false

    func run() throws {
        let info: [String: Any]
        do { info = try sockets.source().execute("query-migrate") as? [String: Any] ?? [:] } catch let e as QMPError { fail(e.desc) }
        let p = MigrationProgress(info)
        if json {
            let data = try JSONSerialization.data(withJSONObject: p.json, options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(p.report)
        }
    }
}

/// One QMP command on the VM behind `--qmp`, its error printed and exit 1.
private func runOne(_ sockets: MigrationSockets, _ command: String, _ args: [String: Any]? = nil, done: String) {
    do {
        try sockets.source().execute(command, args)
        print(done)
    } catch let e as QMPError {
        fail(e.desc)
    } catch {
        fail("\(error)")
    }
}

struct MigrateCancel: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "cancel", abstract: "Cancel a precopy migration (migrate_cancel); the source guest runs on.")
    @OptionGroup var sockets: MigrationSockets
    func run() throws { runOne(sockets, "migrate_cancel", done: "cancel requested") }
}

struct MigratePause: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "pause", abstract: "Pause a postcopy migration (migrate-pause), on either side: the guest's pages stay where they are until a recover.")
    @OptionGroup var sockets: MigrationSockets
    func run() throws { runOne(sockets, "migrate-pause", done: "paused") }
}

struct MigrateStartPostcopy: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "start-postcopy", abstract: "Switch a running precopy to postcopy now (migrate-start-postcopy).")
    @OptionGroup var sockets: MigrationSockets
    func run() throws { runOne(sockets, "migrate-start-postcopy", done: "switching to postcopy") }
}

struct MigrateRecover: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "recover",
        abstract: "Recover a paused postcopy migration on a new address: migrate-recover URI on the destination (--dest-qmp), then migrate URI resume=true on the source; follows it to the end.",
        discussion: MigrateExit.help)

    @OptionGroup var sockets: MigrationSockets

    @Option(help: "The destination VM's QMP socket (omit when the destination already listens, e.g. with auto-recover or after its own migrate-recover).")
    var destQmp: String?

    @Argument(help: "The new address: tcp:HOST:PORT or unix:PATH.")
    var uri: String

    func run() throws {
        do {
            if let destQmp { try MigrationSockets.connect(destQmp, "destination").execute("migrate-recover", ["uri": uri]) }
            let c = sockets.source()
            try c.execute("migrate", ["uri": uri, "resume": true])
            // Ctrl-C only ends this client: the migration is the VMs' business.
            let info = try followMigration(c)
            printSummary(info)
            let p = MigrationProgress(info)
            if p.status != "completed" { throw ExitCode(p.status == "cancelled" ? MigrateExit.cancelled.rawValue : MigrateExit.failed.rawValue) }
        } catch let e as QMPError {
            fail(e.desc)
        }
    }
}

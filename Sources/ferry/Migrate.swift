import ArgumentParser
import FerryHarness
import FerryQMP
import FerrySys
import Foundation
import Glibc

func mib(_ v: Any?) -> String { String(format: "%.1f MiB", Double(qmpNumber(v)) / 1048576) }
func num(_ v: Any?) -> UInt64 { qmpNumber(v) }

/// Follows a running migration with a live progress line; returns the final query-migrate.
func followMigration(_ client: QMPClient, timeout: Double = 3600) throws -> [String: Any] {
    let start = Sys.monotonicNanos()
    let tty = isatty(1) != 0
    var lastPrinted: UInt64 = 0
    while true {
        let info = try client.execute("query-migrate") as? [String: Any] ?? [:]
        let status = info["status"] as? String ?? "none"
        let line = progressLine(info)
        let now = Sys.monotonicNanos()
        if tty { print("\r\u{1b}[K" + line, terminator: ""); fflush(nil) }
        else if now - lastPrinted > 1_000_000_000 { print(line); fflush(nil); lastPrinted = now }
        if ["completed", "failed", "cancelled"].contains(status) {
            if tty { print("") }
            return info
        }
        if Double(now - start) / 1e9 > timeout { throw QMPError("timed out waiting for the migration") }
        usleep(100_000)
    }
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

struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Migrate a running VM over QMP, with live progress.")

    @Option(help: "The source VM's QMP socket.")
    var qmp: String

    @Argument(help: "Destination URI: tcp:HOST:PORT, unix:PATH, exec:COMMAND or file:PATH.")
    var uri: String

    @Option(help: "Bandwidth limit in bytes/s (0 = unlimited).")
    var maxBandwidth: UInt64?

    @Option(help: "Downtime limit in ms.")
    var downtimeLimit: UInt64?

    @Flag(help: "Enable postcopy (capability postcopy-ram; the destination needs it too).")
    var postcopy = false

    @Option(help: "With --postcopy: migrate-start-postcopy after this many ms of precopy.")
    var postcopyAfter: Int?

    @Option(help: "With --postcopy: switch by itself after N passes that do not shrink the rest.")
    var autoSwitchPasses: UInt64?

    @Flag(help: "Resume a paused postcopy migration on a new connection (migrate resume=true).")
    var resume = false

    @Option(help: "TLS: id of the source's tls-creds-x509/-psk object (ferry run --object ...); the destination needs its own.")
    var tlsCreds: String?

    @Option(help: "TLS: the name the destination's certificate must carry (default: the URI's host).")
    var tlsHostname: String?

    func run() throws {
        let c: QMPClient
        do { c = try QMPClient(path: qmp, timeoutSeconds: 0) } catch {
            fail("cannot reach the source VM's QMP socket \(qmp): \(error)")
        }
        do {
            var params: [String: Any] = [:]
            if let maxBandwidth { params["max-bandwidth"] = maxBandwidth }
            if let downtimeLimit { params["downtime-limit"] = downtimeLimit }
            if let tlsCreds { params["tls-creds"] = tlsCreds }
            if let tlsHostname { params["tls-hostname"] = tlsHostname }
            if !params.isEmpty { try c.execute("migrate-set-parameters", params) }
            if postcopy {
                try c.execute("migrate-set-capabilities", ["capabilities": [["capability": "postcopy-ram", "state": true]]])
                if let autoSwitchPasses { try c.execute("migrate-set-parameters", ["postcopy-auto-switch-passes": autoSwitchPasses]) }
            }
            try c.execute("migrate", resume ? ["uri": uri, "resume": true] : ["uri": uri])
            if let after = postcopyAfter {
                usleep(UInt32(after) * 1000)
                try c.execute("migrate-start-postcopy")
            }
            let info = try followMigration(c)
            printSummary(info)
            if info["status"] as? String != "completed" { throw ExitCode(1) }
        } catch let e as QMPError {
            fail(e.desc)
        }
    }
}

import Foundation
import FerryMigration

/// `human-monitor-command`: the HMP commands people (and `virsh qemu-monitor-command
/// --hmp`, `qmp-shell -H`) use around a migration, printed in QEMU 7.2's human format from
/// the same values QMP returns. Unknown commands answer as QEMU's HMP does, in the text.
enum HumanMonitor {
    static func run(_ commandLine: String, host: VMHost) throws -> String {
        let words = commandLine.split(separator: " ").map(String.init)
        switch words.first {
        case "info" where words.count == 2:
            switch words[1] {
            case "status": return status(host.runState)
            case "migrate": return migrate(QMPCommands.queryMigrate(host))
            case "migrate_capabilities":
                let on = host.capabilities
                return MigrationCapability.allCases.map { "\($0.rawValue): \(on.contains($0) ? "on" : "off")\n" }.joined()
            case "migrate_parameters": return parameters(host.parameters)
            case "version": return "7.2.0 (\(FerryIdentity.package))\n"
            default: return "unknown command: 'info \(words[1])'\n"
            }
        case nil: return ""
        default: return "unknown command: '\(commandLine)'\n"
        }
    }

    static func status(_ s: RunState) -> String {
        s == .running ? "VM status: running\n" : s == .paused ? "VM status: paused\n" : "VM status: paused (\(s.rawValue))\n"
    }

    /// QEMU 7.2's `hmp_info_migrate`: the globals, then what `query-migrate` has.
    static func migrate(_ info: [String: Any]) -> String {
        var out = "globals:\nstore-global-state: on\nonly-migratable: off\nsend-configuration: on\nsend-section-footer: on\n"
        out += "decompress-error-check: on\nclear-bitmap-shift: 18\n"
        func n(_ d: [String: Any], _ k: String) -> UInt64? { (d[k] as? NSNumber)?.uint64Value ?? (d[k] as? UInt64) ?? (d[k] as? Int).map(UInt64.init) }
        if let status = info["status"] as? String {
            out += "Migration status: \(status)"
            out += status == "failed" ? (info["error-desc"] as? String).map { " (\($0))\n" } ?? "\n" : "\n"
            out += "total time: \(n(info, "total-time") ?? 0) ms\n"
            if let v = n(info, "expected-downtime") { out += "expected downtime: \(v) ms\n" }
            if let v = n(info, "downtime") { out += "downtime: \(v) ms\n" }
            if let v = n(info, "setup-time") { out += "setup: \(v) ms\n" }
        }
        if let ram = info["ram"] as? [String: Any] {
            func kb(_ k: String) -> UInt64 { (n(ram, k) ?? 0) >> 10 }
            out += "transferred ram: \(kb("transferred")) kbytes\n"
            out += "throughput: \(String(format: "%0.2f", (ram["mbps"] as? Double) ?? 0)) mbps\n"
            out += "remaining ram: \(kb("remaining")) kbytes\ntotal ram: \(kb("total")) kbytes\n"
            out += "duplicate: \(n(ram, "duplicate") ?? 0) pages\nskipped: 0 pages\nnormal: \(n(ram, "normal") ?? 0) pages\n"
            out += "normal bytes: \(kb("normal-bytes")) kbytes\ndirty sync count: \(n(ram, "dirty-sync-count") ?? 0)\n"
            out += "page size: \(kb("page-size")) kbytes\nmultifd bytes: \(kb("multifd-bytes")) kbytes\n"
            out += "pages-per-second: \(n(ram, "pages-per-second") ?? 0)\n"
            if let v = n(ram, "dirty-pages-rate"), v > 0 { out += "dirty pages rate: \(v) pages\n" }
            if let v = n(ram, "postcopy-requests"), v > 0 { out += "postcopy request count: \(v)\n" }
            if kb("precopy-bytes") > 0 || n(ram, "precopy-bytes") ?? 0 > 0 { out += "precopy ram: \(kb("precopy-bytes")) kbytes\n" }
            if n(ram, "downtime-bytes") ?? 0 > 0 { out += "downtime ram: \(kb("downtime-bytes")) kbytes\n" }
            if n(ram, "postcopy-bytes") ?? 0 > 0 { out += "postcopy ram: \(kb("postcopy-bytes")) kbytes\n" }
        }
        if let x = info["xbzrle-cache"] as? [String: Any] {
            out += "cache size: \(n(x, "cache-size") ?? 0) bytes\nxbzrle transferred: \((n(x, "bytes") ?? 0) >> 10) kbytes\n"
            out += "xbzrle pages: \(n(x, "pages") ?? 0) pages\nxbzrle cache miss: \(n(x, "cache-miss") ?? 0) pages\n"
            out += "xbzrle cache miss rate: \(String(format: "%0.2f", (x["cache-miss-rate"] as? Double) ?? 0))\n"
            out += "xbzrle encoding rate: \(String(format: "%0.2f", (x["encoding-rate"] as? Double) ?? 0))\n"
            out += "xbzrle overflow: \(n(x, "overflow") ?? 0)\n"
        }
        if let v = n(info, "cpu-throttle-percentage") { out += "cpu throttle percentage: \(v)\n" }
        if let v = n(info, "postcopy-blocktime") { out += "postcopy blocktime: \(v)\n" }
        if let addresses = info["socket-address"] as? [[String: Any]] {
            out += "socket address: [\n"
            for a in addresses {
                if let h = a["host"] as? String, let p = a["port"] as? String { out += "\ttcp:\(h):\(p)\n" }
                if let p = a["path"] as? String { out += "\tunix:\(p)\n" }
            }
            out += "]\n"
        }
        return out
    }

    /// QEMU's `hmp_info_migrate_parameters` lines for the parameters Ferry has, with QEMU's
    /// units, then Ferry's own.
    static func parameters(_ p: MigrationParameters) -> String {
        func quoted(_ s: String) -> String { "'\(s)'" }
        return "throttle-trigger-threshold: \(p.throttleTriggerThreshold)\ncpu-throttle-initial: \(p.cpuThrottleInitial)\n"
            + "cpu-throttle-increment: \(p.cpuThrottleIncrement)\ncpu-throttle-tailslow: \(p.cpuThrottleTailslow ? "on" : "off")\n"
            + "max-cpu-throttle: \(p.maxCPUThrottle)\n"
            + "tls-creds: \(quoted(p.tlsCreds))\ntls-hostname: \(quoted(p.tlsHostname))\n"
            + "max-bandwidth: \(p.maxBandwidth) bytes/second\ndowntime-limit: \(p.downtimeLimit) ms\n"
            + "multifd-channels: \(p.multifdChannels)\nmultifd-compression: \(p.multifdCompression.rawValue)\n"
            + "xbzrle-cache-size: \(p.xbzrleCacheSize) bytes\n"
            + "max-postcopy-bandwidth: \(p.maxPostcopyBandwidth)\ntls-authz: ''\n"
            + "heartbeat-timeout: \(p.heartbeatTimeout) ms\nauto-recover-timeout: \(p.autoRecoverTimeout) ms\n"
            + "postcopy-device-timeout: \(p.postcopyDeviceTimeout) ms\npostcopy-auto-switch-passes: \(p.postcopyAutoSwitchPasses)\n"
    }
}

/// What Ferry says it is: QEMU 7.2's version numbers for clients that gate features on
/// them (Ferry speaks 7.2's migration protocol), and Ferry's own name and version as the
/// `package`, where QEMU puts the distribution's build.
public enum FerryIdentity {
    public static let version = "0.15.0"
    public static let package = "ferry \(version)"
    static var qmpVersion: [String: Any] { ["qemu": ["major": 7, "minor": 2, "micro": 0], "package": package] }
}

import Foundation
import FerryMachine
import FerryMemory
import FerryMigration
import FerrySys
import FerryWire
import Glibc

/// The QMP commands Ferry implements, with QEMU's names, arguments and result shapes.
enum QMPCommands {
    static let names = [
        "qmp_capabilities", "query-version", "query-commands", "query-status", "stop", "cont", "quit", "pmemsave",
        "migrate", "migrate-incoming", "migrate_cancel", "migrate-start-postcopy", "migrate-pause", "migrate-recover", "query-migrate",
        "migrate-set-capabilities", "query-migrate-capabilities", "migrate-set-parameters", "query-migrate-parameters",
        "object-add", "object-del", "qom-list-types", "query-machines", "query-target", "query-cpus-fast",
        "human-monitor-command",
    ]

    static func run(_ name: String, _ args: [String: Any], host: VMHost) throws -> Any {
        switch name {
        case "query-version":
            return FerryIdentity.qmpVersion
        case "query-machines":
            return [["name": Wire.machineType, "is-default": true, "cpu-max": Machine.maxVCPUs, "hotpluggable-cpus": false,
                     "numa-mem-supported": false, "deprecated": false, "default-cpu-type": "host-x86_64-cpu", "default-ram-id": "pc.ram"]]
        case "query-target":
            return ["arch": "x86_64"]
        case "query-cpus-fast":
            return host.machine.vcpuThreadIDs.enumerated().map { i, tid in
                ["cpu-index": i, "qom-path": "/machine/unattached/device[\(i)]", "thread-id": Int(tid), "target": "x86_64",
                 "props": ["core-id": i, "thread-id": 0, "socket-id": 0]] as [String: Any]
            }
        case "human-monitor-command":
            return try HumanMonitor.run(try string(args, "command-line"), host: host)
        case "query-commands":
            return names.map { ["name": $0] }
        case "query-status":
            let s = host.runState
            return ["running": s == .running, "singlestep": false, "status": s.rawValue]
        case "stop":
            if host.stop() == .pending {
                throw QMPError("the vCPU waits in the kernel for a page the source has not sent yet (migration \(host.queryMigrate().status.rawValue)); it stops as soon as that page arrives, with a STOP event. 'cont' cancels the stop")
            }
            return [String: Any]()
        case "cont":
            try host.cont(force: try optionalBool(args, "x-force") ?? false)
            return [String: Any]()
        case "quit":
            // Ferry's x-force: exit even while postcopy splits the guest between two hosts.
            if !(try optionalBool(args, "x-force") ?? false), let why = host.exitRefusal {
                throw QMPError("refusing to quit: \(why). Recover the migration first, or quit with x-force=true")
            }
            return [String: Any]()
        case "pmemsave":
            try pmemsave(args, host.machine.memory)
            return [String: Any]()
        case "migrate":
            let resume = try optionalBool(args, "resume") ?? false
            try host.migrate(uri: try string(args, "uri"), resume: resume)
            return [String: Any]()
        case "migrate-incoming":
            try host.migrateIncoming(uri: try string(args, "uri"))
            return [String: Any]()
        case "migrate-start-postcopy":
            try host.startPostcopy()
            return [String: Any]()
        case "migrate-pause":
            try host.migratePause()
            return [String: Any]()
        case "migrate-recover":
            try host.migrateRecover(uri: try string(args, "uri"))
            return [String: Any]()
        case "migrate_cancel":
            try host.cancel()
            return [String: Any]()
        case "query-migrate":
            return queryMigrate(host)
        case "object-add":
            try host.addObject(try QOMObjects.create(args))
            return [String: Any]()
        case "object-del":
            try host.deleteObject(id: try string(args, "id"))
            return [String: Any]()
        case "qom-list-types":
            return ["tls-creds-x509", "tls-creds-psk"].map { ["name": $0, "parent": "tls-creds"] }
        case "migrate-set-capabilities":
            guard let list = args["capabilities"] as? [[String: Any]] else {
                throw QMPError("Parameter 'capabilities' is missing or not a list")
            }
            var caps: [(MigrationCapability, Bool)] = []
            for item in list {
                guard let n = item["capability"] as? String, let c = MigrationCapability(rawValue: n) else {
                    throw QMPError("Invalid parameter '\(item["capability"] ?? "")'")
                }
                guard let state = item["state"] as? Bool else { throw QMPError("Parameter 'state' is missing or not a bool") }
                caps.append((c, state))
            }
            try host.setCapabilities(caps)
            return [String: Any]()
        case "query-migrate-capabilities":
            let on = host.capabilities
            return MigrationCapability.allCases.map { ["capability": $0.rawValue, "state": on.contains($0)] }
        case "migrate-set-parameters":
            try host.setParameters { p in
                for (k, v) in args {
                    switch k {
                    case "max-bandwidth": p.maxBandwidth = try uint(v, k)
                    case "downtime-limit":
                        let d = try uint(v, k)
                        guard d <= 2_000_000 else { throw QMPError("Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 milliseconds") }
                        p.downtimeLimit = d
                    case "max-postcopy-bandwidth": p.maxPostcopyBandwidth = try uint(v, k)
                    case "heartbeat-timeout": p.heartbeatTimeout = try uint(v, k)
                    case "auto-recover-timeout": p.autoRecoverTimeout = try uint(v, k)
                    case "postcopy-device-timeout": p.postcopyDeviceTimeout = try uint(v, k)
                    case "postcopy-auto-switch-passes": p.postcopyAutoSwitchPasses = try uint(v, k)
                    case "xbzrle-cache-size":
                        let size = try uint(v, k)
                        guard size >= UInt64(Wire.pageSize), size & (size - 1) == 0 else {
                            throw QMPError("Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size")
                        }
                        p.xbzrleCacheSize = size
                    case "multifd-channels":
                        let n = try uint(v, k)
                        guard n <= 255 else { throw QMPError("Parameter 'multifd-channels' expects uint8_t") }
                        guard n >= 1 else { throw QMPError("Parameter 'multifd_channels' expects a value between 1 and 255") }
                        p.multifdChannels = n
                    case "multifd-compression":
                        guard let name = v as? String, let c = MultiFD.Compression(rawValue: name) else {
                            throw QMPError("Parameter 'multifd-compression' does not accept value '\(v)'")
                        }
                        guard c != .zlib else { throw QMPError("Parameter 'multifd-compression' value 'zlib' is not supported by Ferry (use 'none' or 'zstd')") }
                        p.multifdCompression = c
                    case "multifd-zstd-level": p.multifdZstdLevel = try uint(v, k, in: 0...20, "multifd_zstd_level", "0 to 20")
                    case "multifd-zlib-level": p.multifdZlibLevel = try uint(v, k, in: 0...9, "multifd_zlib_level", "0 to 9")
                    case "cpu-throttle-initial": p.cpuThrottleInitial = try uint(v, k, in: 1...99, "cpu_throttle_initial", "1 to 99")
                    case "cpu-throttle-increment": p.cpuThrottleIncrement = try uint(v, k, in: 1...99, "cpu_throttle_increment", "1 to 99")
                    case "throttle-trigger-threshold": p.throttleTriggerThreshold = try uint(v, k, in: 1...100, "throttle_trigger_threshold", "1 to 100")
                    case "max-cpu-throttle":
                        p.maxCPUThrottle = try uint(v, k, in: p.cpuThrottleInitial...99, "max_cpu_throttle", "cpu_throttle_initial to 99")
                    case "cpu-throttle-tailslow":
                        guard let b = v as? Bool else { throw QMPError("Invalid parameter type for '\(k)', expected: boolean") }
                        p.cpuThrottleTailslow = b
                    // QEMU takes a string here ("" = off); a null also turns TLS off.
                    case "tls-creds": p.tlsCreds = v is NSNull ? "" : try string(args, k)
                    case "tls-hostname": p.tlsHostname = v is NSNull ? "" : try string(args, k)
                    case "tls-authz":
                        guard v is NSNull || (v as? String) == "" else { throw QMPError("Parameter 'tls-authz' is not supported by Ferry (authorize clients by certificate: verify-peer)") }
                    default: throw QMPError("Parameter '\(k)' is unexpected")
                    }
                }
            }
            return [String: Any]()
        case "query-migrate-parameters":
            let p = host.parameters
            return ["max-bandwidth": p.maxBandwidth, "downtime-limit": p.downtimeLimit, "max-postcopy-bandwidth": p.maxPostcopyBandwidth,
                    "heartbeat-timeout": p.heartbeatTimeout, "auto-recover-timeout": p.autoRecoverTimeout,
                    "postcopy-device-timeout": p.postcopyDeviceTimeout,
                    "postcopy-auto-switch-passes": p.postcopyAutoSwitchPasses, "xbzrle-cache-size": p.xbzrleCacheSize,
                    "multifd-channels": p.multifdChannels, "multifd-compression": p.multifdCompression.rawValue,
                    "multifd-zstd-level": p.multifdZstdLevel, "multifd-zlib-level": p.multifdZlibLevel,
                    "cpu-throttle-initial": p.cpuThrottleInitial, "cpu-throttle-increment": p.cpuThrottleIncrement, "cpu-throttle-tailslow": p.cpuThrottleTailslow,
                    "max-cpu-throttle": p.maxCPUThrottle, "throttle-trigger-threshold": p.throttleTriggerThreshold, "tls-creds": p.tlsCreds, "tls-hostname": p.tlsHostname, "tls-authz": ""]
        default:
            throw QMPError("The command \(name) has not been found", class: "CommandNotFound")
        }
    }

    static func queryMigrate(_ host: VMHost) -> [String: Any] {
        let s = host.queryMigrate()
        guard s.status != .none else { return [:] }
        var r: [String: Any] = ["status": s.status.rawValue]
        if let e = s.errorDescription, s.status.carriesError { r["error-desc"] = e }
        if let f = s.faults {
            r["postcopy-blocktime"] = f.blocktimeMs
            r["postcopy-vcpu-blocktime"] = f.vcpuBlocktimeMs
            r["postcopy-latency"] = f.latencyNs
            r["postcopy-latency-dist"] = f.distribution
            r["x-postcopy-fault-latency"] = ["faults": f.faults, "vcpu-faults": f.vcpuFaults, "p50-us": f.p50Us, "p99-us": f.p99Us, "max-us": f.maxUs,
                                             "requests-repeated": f.requestsRepeated] as [String: Any]
        }
        if let g = s.guestClockGapUs { r["x-guest-clock-gap-us"] = g }
        if let t = s.switchover {
            r["x-switchover-us"] = Dictionary(t.steps.map { ($0.name, $0.micros) }, uniquingKeysWith: +).merging(["total": t.totalMicros]) { a, _ in a }
        }
        if s.postcopyPauses > 0 || s.recoveryAttempts > 0 {
            var rec: [String: Any] = ["pauses": s.postcopyPauses, "recoveries": s.recoveries, "attempts": s.recoveryAttempts,
                                      "paused-ms": s.pausedMs, "bitmap-bytes": s.bitmapBytes, "pages-resent": s.pagesResent]
            if let v = s.lastRecoveryMs { rec["last-recovery-ms"] = v }
            if let v = s.lastOutageMs { rec["last-outage-ms"] = v }
            r["x-postcopy-recovery"] = rec
        }
        if let t = s.tls { r["x-tls"] = t }
        if let a = s.socketAddress {
            switch a {
            case let .tcp(h, p): r["socket-address"] = [["type": "inet", "host": h, "port": String(p)]]
            case let .unix(path): r["socket-address"] = [["type": "unix", "path": path]]
            default: break
            }
        }
        // As QEMU: the destination, and a source in setup, failed or cancelled, report the
        // status only; downtime once completed, expected-downtime before.
        guard s.total > 0, ![.setup, .failed, .cancelled].contains(s.status) else { return r }
        r["total-time"] = s.totalTimeMs
        r["setup-time"] = s.setupTimeMs
        if let t = s.cpuThrottlePercentage { r["cpu-throttle-percentage"] = t }
        if s.status == .completed {
            if let d = s.downtimeMs { r["downtime"] = d }
        } else {
            r["expected-downtime"] = s.expectedDowntimeMs ?? 0
        }
        var ram: [String: Any] = [
            "transferred": s.transferred, "remaining": s.remaining, "total": s.total,
            "duplicate": s.duplicate, "normal": s.normal, "normal-bytes": s.normal * UInt64(Wire.pageSize),
            "dirty-sync-count": s.dirtySyncCount, "mbps": s.mbps, "pages-per-second": s.pagesPerSecond,
            "dirty-pages-rate": s.dirtyPagesRate, "page-size": Wire.pageSize, "precopy-bytes": s.precopyBytes,
            "downtime-bytes": s.downtimeBytes, "postcopy-bytes": s.postcopyBytes, "postcopy-requests": s.postcopyRequests, "multifd-bytes": s.multifdBytes,
            "skipped": 0, "dirty-sync-missed-zero-copy": 0,
            "x-auto-postcopy": s.autoSwitched,
            "x-postcopy-requested-bytes": s.postcopyRequestedBytes, "x-postcopy-background-bytes": s.postcopyBackgroundBytes,
        ]
        // Bytes/s over the last second, while postcopy runs.
        if let v = s.postcopyRequestedRate { ram["x-postcopy-requested-bytes-per-second"] = v }
        if let v = s.postcopyBackgroundRate { ram["x-postcopy-background-bytes-per-second"] = v }
        r["ram"] = ram
        if let x = s.xbzrle {
            r["xbzrle-cache"] = ["cache-size": x.cacheSize, "bytes": x.bytes, "pages": x.pages, "cache-miss": x.cacheMiss,
                                 "cache-miss-rate": x.cacheMissRate, "encoding-rate": x.encodingRate, "overflow": x.overflow] as [String: Any]
        }
        return r
    }

    static func pmemsave(_ args: [String: Any], _ memory: GuestMemory) throws {
        let val = try uint(args["val"] as Any, "val"), size = try uint(args["size"] as Any, "size")
        let file = try string(args, "filename")
        guard size <= Int.max, let (block, offset) = memory.resolve(gpa: val, count: Int(size)) else {
            throw QMPError("Invalid parameter 'val': 0x\(String(val, radix: 16)) + \(size) is not guest RAM")
        }
        let fd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw QMPError("Could not open '\(file)': \(String(cString: strerror(errno)))") }
        defer { Glibc.close(fd) }
        do { try Sys.writeAll(fd, UnsafeRawBufferPointer(start: block.host + offset, count: Int(size))) }
        catch { throw QMPError("writing memory to '\(file)' failed: \(error)") }
    }

    static func string(_ args: [String: Any], _ key: String) throws -> String {
        guard let v = args[key] else { throw QMPError("Parameter '\(key)' is missing") }
        guard let s = v as? String else { throw QMPError("Invalid parameter type for '\(key)', expected: string") }
        return s
    }

    static func optionalBool(_ args: [String: Any], _ key: String) throws -> Bool? {
        guard let v = args[key] else { return nil }
        guard let b = v as? Bool else {
            throw QMPError("Invalid parameter type for '\(key)', expected: boolean")
        }
        return b
    }

    /// An integer parameter QEMU checks against a range, with QEMU's message.
    static func uint(_ v: Any, _ key: String, in range: ClosedRange<UInt64>, _ qemuName: String, _ rangeText: String) throws -> UInt64 {
        let n = try uint(v, key)
        guard range.contains(n) else { throw QMPError("Parameter '\(qemuName)' expects an integer in the range of \(rangeText)") }
        return n
    }

    static func uint(_ v: Any, _ key: String) throws -> UInt64 {
        if let n = v as? NSNumber {
            let d = n.doubleValue
            if d >= 0 && d == d.rounded() && d < 1.8e19 { return n.uint64Value }
        }
        throw QMPError("Invalid parameter type for '\(key)', expected: integer")
    }
}

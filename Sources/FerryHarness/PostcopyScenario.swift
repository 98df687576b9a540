import FerrySys
import Foundation
import FerryMachine
import Glibc

/// A postcopy migration between two `ferry run` processes, optionally with a link failure
/// in the middle of postcopy, on loopback (through a `FaultProxy` when a failure needs one)
/// or across two network namespaces.
public struct PostcopyScenario: Sendable {
    public enum Failure: String, Codable, Sendable, CaseIterable { case reset, blackhole, linkDown = "link-down" }
    public var engine: Engine = .ferry
    public var name: String
    public var memory: Int
    public var vcpus = 1
    /// The test guest walks this much RAM (all by default), holding `contents`.
    public var touched: Int?
    public var contents: TestGuestContents = .zero
    public var guest: TestGuestLayout { TestGuestLayout(memory: memory, vcpus: vcpus, touched: touched, contents: contents) }
    /// max-bandwidth and max-postcopy-bandwidth, bytes/s (0 = unlimited).
    public var bandwidth: UInt64 = 125_000_000
    public var preempt = false
    /// `migrate-start-postcopy` after this much precopy; nil = only the auto-switch.
    public var postcopyAfterMs: Int? = 1000
    public var autoSwitchPasses: UInt64 = 0
    public var failure: Failure?
    /// When the failure strikes, counted from postcopy-active.
    public var failureAfterMs = 500
    /// How long a blackhole or link-down lasts at least.
    public var outageMs = 1000
    public var autoRecover = true
    public var netns = false
    /// `tc tbf` rate on the veth pair (netns only), e.g. "1gbit".
    public var tcRate: String?
    /// One-way delay in each direction (netns only), added by a `FaultProxy` in the
    /// destination's namespace (this kernel has no netem).
    public var delayMs: Double?
    public var heartbeatMs: UInt64 = 1500
    public var timeoutSeconds: Double = 300
    /// TLS credentials directory (scripts/tls-creds.sh layout); nil = plain.
    public var tlsDirectory: String?
    public init(name: String, memory: Int) { self.name = name; self.memory = memory }
}

/// One sample of the source's query-migrate while a migration runs.
public struct TimelineSample: Codable, Sendable {
    public var t: Double // ms since migrate
    public var bytes: UInt64
    public var status: String
    /// The guest's dirty rate as last measured by the source (bytes/s; precopy only).
    public var dirtyBytesPerSecond: UInt64? = nil
}

public struct PostcopyRun: Codable, Sendable {
    public var timeline: [TimelineSample] = []
    public var engine: Engine = .ferry
    public var scenario: String
    public var memoryBytes: Int
    public var bandwidth: UInt64
    public var link: String
    public var preempt: Bool
    public var failure: String?
    public var status: String
    public var totalTimeMs: UInt64
    /// RAM bytes / bandwidth.
    public var wireLimitMs: Double?
    public var totalOverWireLimit: Double?
    public var downtimeMs: UInt64?
    public var autoSwitched: Bool
    public var requests: UInt64
    public var blocktimeMs: UInt64?
    public var faults: Int?
    public var latencyP50Us: Double?
    public var latencyP99Us: Double?
    public var latencyMaxUs: Double?
    public var latencyMeanUs: Double?
    public var latencyDistribution: [UInt64]?
    public var roundTripUs: Double?
    /// Round trip + one page's wire time at the bandwidth: the physical floor of a fault.
    public var faultFloorUs: Double?
    public var p50OverFloor: Double?
    public var p99OverFloor: Double?
    public var pauses: UInt64 = 0
    public var sourceDetectionMs: Double?
    public var destinationDetectionMs: Double?
    /// Resume (the attempt that succeeded) → postcopy-active, measured by the source.
    public var resumeToActiveMs: Double?
    /// Failure detected → postcopy-active again.
    public var outageMs: Double?
    public var timePausedMs: UInt64?
    public var bitmapBytes: UInt64?
    public var pagesResent: UInt64?
    public var memoryCheckPassed: Bool?
    public var memoryCheck: String?
    public var guestClockGapUs: Double?
    /// Per vCPU: time it waited for pages (postcopy-vcpu-blocktime), ms.
    public var vcpuBlocktimeMs: [UInt64]?
    /// Page requests sent twice for one page (0 when concurrent faults are de-duplicated).
    public var requestsRepeated: Int?
    public var error: String?
    /// The source's STOP event to the destination's RESUME; Ferry's steps (`switchoverPause`).
    public var switchoverPauseMs: Double?
    public var switchoverSteps: [String: UInt64]?
}

public func runPostcopy(_ sc: PostcopyScenario, directory: String, executable: String = ferryExecutable(),
                        progress: (_ source: [String: Any], _ note: String?) -> Void = { _, _ in }) throws -> PostcopyRun {
    mkdir(directory, 0o700)
    let link = sc.netns ? try VethLink(rate: sc.tcRate) : nil
    defer { link?.teardown() }
    let mem = ["--memory", String(sc.memory), "--smp", String(sc.vcpus)]
    let qemu = sc.engine == .qemu
    let guest = sc.guest
    let src = qemu ? try FerryProcess(qemuDirectory: directory, name: "src", guest: guest, image: nil, incoming: false, namespace: link?.sourceNamespace)
                   : try FerryProcess(executable: executable, directory: directory, name: "src", arguments: ferryGuestArguments(guest, touched: sc.touched),
                                      namespace: link?.sourceNamespace)
    defer { src.terminate() }
    let dst = qemu ? try FerryProcess(qemuDirectory: directory, name: "dst", guest: guest, image: nil, incoming: true, namespace: link?.destinationNamespace)
                   : try FerryProcess(executable: executable, directory: directory, name: "dst", arguments: mem + ["--incoming", "defer"],
                                      namespace: link?.destinationNamespace)
    defer { dst.terminate() }
    src.waitForSerial(3, seconds: 120)

    var caps = ["postcopy-ram", "postcopy-blocktime"]
    if sc.preempt { caps.append("postcopy-preempt") }
    if sc.autoRecover && !qemu { caps.append("auto-recover") } // Ferry's own; QEMU recovers by hand
    for p in [src, dst] {
        try p.qmp.execute("migrate-set-capabilities", ["capabilities": caps.map { ["capability": $0, "state": true] }])
        if !qemu { try p.qmp.execute("migrate-set-parameters", ["heartbeat-timeout": sc.heartbeatMs]) }
    }
    if let tls = sc.tlsDirectory, !qemu {
        try src.enableTLS(credentials: tls, server: false)
        try dst.enableTLS(credentials: tls, server: true)
    }
    var params: [String: Any] = ["max-bandwidth": sc.bandwidth, "max-postcopy-bandwidth": sc.bandwidth, "downtime-limit": 300]
    if !qemu { params["postcopy-auto-switch-passes"] = sc.autoSwitchPasses }
    try src.qmp.execute("migrate-set-parameters", params)
    let delayed = link != nil && (sc.delayMs ?? 0) > 0
    let incoming = link.map { delayed ? "tcp:0.0.0.0:4444" : "tcp:\($0.destinationAddress):4444" } ?? "tcp:127.0.0.1:0"
    try dst.qmp.execute("migrate-incoming", ["uri": incoming])
    var target = incoming
    if let q = try dst.qmp.execute("query-migrate") as? [String: Any],
       let addr = (q["socket-address"] as? [[String: Any]])?.first, addr["type"] as? String == "inet" {
        target = "tcp:\(addr["host"]!):\(addr["port"]!)"
    }
    let destinationAddress = target // where migrate-recover listens (the proxy sits in front)
    var proxy: FaultProxy?
    var rtt: Double?
    if let link, delayed {
        let delay = UInt64((sc.delayMs ?? 0) * 1e6)
        proxy = try FaultProxy(upstream: 4444, port: 4445, host: link.destinationAddress, delayNanos: delay, namespace: link.destinationNamespace)
        target = proxy!.uri
        let echoProxy = try FaultProxy(upstream: 7790, port: 7791, host: link.destinationAddress, delayNanos: delay, namespace: link.destinationNamespace)
        rtt = try? measureRoundTrip(host: link.destinationAddress, port: 7791, namespace: link.sourceNamespace)
        echoProxy.close()
    } else {
        rtt = try? measureRoundTrip(host: link?.destinationAddress ?? "127.0.0.1", namespace: link?.sourceNamespace)
    }
    if proxy == nil, let f = sc.failure, f != .linkDown, link == nil, case let .tcp(_, port) = try parseTCP(target) {
        proxy = try FaultProxy(upstream: port)
        target = proxy!.uri
    }
    defer { proxy?.close() }

    try src.qmp.execute("migrate", ["uri": target])
    let start = Sys.monotonicNanos()
    func ms(_ t: UInt64) -> Double { Double(t - start) / 1e6 }
    var info: [String: Any] = [:]
    var started = false
    var activeAt: UInt64?
    var injectedAt: UInt64?
    var srcDetect: Double?, dstDetect: Double?
    var healed = false
    var injectedWall: Double = 0
    var timeline: [TimelineSample] = []
    while true {
        info = try src.qmp.execute("query-migrate") as? [String: Any] ?? [:]
        let status = info["status"] as? String ?? ""
        progress(info, nil)
        let tNow = ms(Sys.monotonicNanos())
        if timeline.isEmpty || tNow - timeline.last!.t >= 50 || timeline.last!.status != status {
            let r = info["ram"] as? [String: Any]
            timeline.append(TimelineSample(t: tNow, bytes: qmpNumber(r?["transferred"]), status: status,
                                           dirtyBytesPerSecond: r?["dirty-pages-rate"].map { qmpNumber($0) * 4096 }))
        }
        if ["completed", "failed", "cancelled"].contains(status) { info = try settledCompletion(src, info); break }
        let now = Sys.monotonicNanos()
        if Double(now - start) / 1e9 > sc.timeoutSeconds { throw HarnessError("\(sc.name): still \(status) after \(Int(sc.timeoutSeconds)) s") }
        if !started, let after = sc.postcopyAfterMs, ms(now) >= Double(after), status == "active" {
            try src.qmp.execute("migrate-start-postcopy")
            started = true
            progress(info, "migrate-start-postcopy")
        }
        if activeAt == nil && status == "postcopy-active" { activeAt = now }
        if let f = sc.failure, injectedAt == nil, let a = activeAt, now - a >= UInt64(sc.failureAfterMs) * 1_000_000 {
            injectedWall = Date().timeIntervalSince1970
            switch f {
            case .reset: proxy?.reset()
            case .blackhole: proxy?.set(.blackhole)
            case .linkDown: try link?.down()
            }
            injectedAt = Sys.monotonicNanos()
            progress(info, "link failure injected: \(f.rawValue)")
        }
        if let t = injectedAt, !healed {
            if srcDetect == nil && status == "postcopy-paused" { srcDetect = Double(Sys.monotonicNanos() - t) / 1e6; progress(info, "source paused") }
            if dstDetect == nil, (try dst.qmp.execute("query-migrate") as? [String: Any])?["status"] as? String == "postcopy-paused" {
                dstDetect = Double(Sys.monotonicNanos() - t) / 1e6
                progress(info, "destination paused")
            }
            let outageOver = Sys.monotonicNanos() - t >= UInt64(sc.outageMs) * 1_000_000
            if srcDetect != nil && dstDetect != nil && (outageOver || sc.failure == .reset) {
                switch sc.failure! {
                case .reset: break
                case .blackhole: proxy?.set(.pass)
                case .linkDown: try link?.up()
                }
                if !sc.autoRecover || qemu {
                    try dst.qmp.execute("migrate-recover", ["uri": destinationAddress])
                    try src.qmp.execute("migrate", ["uri": target, "resume": true])
                }
                healed = true
                progress(info, sc.autoRecover ? "link back; automatic recovery" : "link back; migrate-recover + migrate resume=true")
            }
        }
        usleep(5_000)
    }
    let dinfo = try dst.qmp.execute("query-migrate") as? [String: Any] ?? [:]
    let ram = info["ram"] as? [String: Any] ?? [:]
    let total = qmpNumber(info["total-time"])
    let wire = sc.bandwidth > 0 ? Double(sc.memory) / Double(sc.bandwidth) * 1000 : nil
    var run = PostcopyRun(engine: sc.engine, scenario: sc.name, memoryBytes: sc.memory, bandwidth: sc.bandwidth, link: sc.netns ? "veth" + (sc.tcRate.map { " tbf \($0)" } ?? "") + (delayed ? String(format: " + %.1f ms delay each way", sc.delayMs!) : "") : "loopback",
                          preempt: sc.preempt, failure: sc.failure?.rawValue, status: info["status"] as? String ?? "?",
                          totalTimeMs: total, wireLimitMs: wire, totalOverWireLimit: wire.map { Double(total) / $0 },
                          downtimeMs: info["downtime"].map { qmpNumber($0) }, autoSwitched: (ram["x-auto-postcopy"] as? Bool) ?? false,
                          requests: qmpNumber(ram["postcopy-requests"]), error: info["error-desc"] as? String)
    if let b = dinfo["postcopy-blocktime"] { run.blocktimeMs = qmpNumber(b) } // QEMU reports it too
    run.vcpuBlocktimeMs = (dinfo["postcopy-vcpu-blocktime"] as? [Any])?.map { qmpNumber($0) }
    run.guestClockGapUs = (dinfo["x-guest-clock-gap-us"] as? NSNumber)?.doubleValue
    run.latencyDistribution = (dinfo["postcopy-latency-dist"] as? [Any])?.map { qmpNumber($0) }
    if let lat = dinfo["x-postcopy-fault-latency"] as? [String: Any] {
        run.faults = Int(qmpNumber(lat["faults"]))
        run.latencyP50Us = (lat["p50-us"] as? NSNumber)?.doubleValue
        run.latencyP99Us = (lat["p99-us"] as? NSNumber)?.doubleValue
        run.latencyMaxUs = (lat["max-us"] as? NSNumber)?.doubleValue
        run.requestsRepeated = (lat["requests-repeated"] as? NSNumber)?.intValue
        run.latencyMeanUs = Double(qmpNumber(dinfo["postcopy-latency"])) / 1000
        run.latencyDistribution = (dinfo["postcopy-latency-dist"] as? [Any])?.map { qmpNumber($0) }
    }
    if let rtt {
        run.roundTripUs = rtt
        let pageUs = sc.bandwidth > 0 ? 4096.0 * 1e6 / Double(sc.bandwidth) : 0
        run.faultFloorUs = rtt + pageUs
        if let p = run.latencyP50Us { run.p50OverFloor = p / (rtt + pageUs) }
        if let p = run.latencyP99Us { run.p99OverFloor = p / (rtt + pageUs) }
    }
    if let r = info["x-postcopy-recovery"] as? [String: Any] {
        run.pauses = qmpNumber(r["pauses"])
        run.resumeToActiveMs = (r["last-recovery-ms"] as? NSNumber)?.doubleValue
        run.outageMs = (r["last-outage-ms"] as? NSNumber)?.doubleValue
        run.timePausedMs = qmpNumber(r["paused-ms"])
        run.bitmapBytes = qmpNumber(r["bitmap-bytes"])
        run.pagesResent = qmpNumber(r["pages-resent"])
    }
    // Detection from the MIGRATION events' own timestamps (the polling above can miss a
    // pause that recovery ends within one poll).
    _ = try? src.qmp.execute("query-status")
    _ = try? dst.qmp.execute("query-status")
    func pausedAt(_ p: FerryProcess) -> Double? {
        for e in p.qmp.events where e["event"] as? String == "MIGRATION" {
            guard (e["data"] as? [String: Any])?["status"] as? String == "postcopy-paused",
                  let ts = e["timestamp"] as? [String: Any] else { continue }
            let t = Double(qmpNumber(ts["seconds"])) + Double(qmpNumber(ts["microseconds"])) / 1e6
            // Clocks of two processes: a pause stamped a hair before the injection is "at once".
            if t >= injectedWall - 0.001 { return max(0, (t - injectedWall) * 1000) }
        }
        return nil
    }
    timeline.append(TimelineSample(t: Double(total), bytes: qmpNumber(ram["transferred"]), status: run.status))
    run.timeline = timeline
    (run.switchoverPauseMs, run.switchoverSteps) = switchoverPause(source: src, destination: dst)
    run.sourceDetectionMs = injectedAt == nil ? nil : pausedAt(src) ?? srcDetect
    run.destinationDetectionMs = injectedAt == nil ? nil : pausedAt(dst) ?? dstDetect
    if run.status == "completed" {
        let before = dst.serialBytes
        dst.waitForSerial(before + 2, seconds: 60)
        let unfilled = try src.pagesWithoutFill(guest, scratch: "\(directory)/src-ram.bin")
        let report = try dst.checkMemory(guest, scratch: "\(directory)/dst-ram.bin", unfilled: unfilled)
        run.memoryCheckPassed = report.passed
        run.memoryCheck = report.description
    }
    return run
}

private enum ParsedTCP { case tcp(String, UInt16), other }
private func parseTCP(_ uri: String) throws -> ParsedTCP {
    let parts = uri.split(separator: ":")
    guard parts.count == 3, parts[0] == "tcp", let port = UInt16(parts[2]) else { return .other }
    return .tcp(String(parts[1]), port)
}

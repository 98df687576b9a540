import FerrySys

/// What the destination measured about remote page faults (QEMU's blocktime fields plus the
/// fault → installed latency distribution).
public struct PostcopyFaultReport: Sendable {
    /// Faults that needed a page from the source and were resolved.
    public var faults: Int = 0
    /// Of those, faults taken by the vCPU thread (KVM's accesses included).
    public var vcpuFaults: Int = 0
    /// Time all vCPUs were blocked at once (one vCPU: its blocked time), ms.
    public var blocktimeMs: UInt64 = 0
    public var vcpuBlocktimeMs: [UInt64] = []
    /// Mean fault latency, ns (QEMU's postcopy-latency).
    public var latencyNs: UInt64 = 0
    public var p50Us: Double = 0
    public var p99Us: Double = 0
    public var maxUs: Double = 0
    /// QEMU's postcopy-latency-dist: counter N = faults resolved in [2^N, 2^(N+1)) µs.
    public var distribution: [UInt64] = Array(repeating: 0, count: 24)
    /// Every latency in µs, for histograms (bench); empty in QMP answers.
    public var samplesUs: [Double] = []
}

/// Destination-side accounting: the fault thread records when a missing page was first
/// touched and by which thread; whichever thread installs the page resolves it.
///
/// Every clock read that is compared with a recorded fault happens under `lock`, the lock
/// that orders the records: a time read before taking it could predate a fault recorded
/// by another thread meanwhile, and the difference would underflow (it crashed a
/// destination polled by query-migrate). Differences are also clamped at zero.
/// Ownership: every mutable field is guarded by `lock`.
final class PostcopyFaultTracker: @unchecked Sendable {
    private let lock = Monitor()
    private var pending: [Int: (start: UInt64, vcpu: Bool)] = [:]
    private var latenciesNs: [UInt64] = []
    private var vcpuFaults = 0
    private var vcpuBlockedNs: UInt64 = 0
    private var distribution = Array(repeating: UInt64(0), count: 24)

    init() { latenciesNs.reserveCapacity(1 << 16) }

    func faulted(page: Int, vcpu: Bool) {
        lock.withLock { if pending[page] == nil { pending[page] = (Sys.monotonicNanos(), vcpu) } }
    }

    /// Cheap when nothing waits on `page` (the common case for background pages).
    func installed(page: Int) {
        lock.withLock {
            guard let f = pending.removeValue(forKey: page) else { return }
            let ns = Sys.nanosSince(f.start)
            latenciesNs.append(ns)
            let us = ns / 1000
            let bucket = us == 0 ? 0 : min(23, 63 - us.leadingZeroBitCount)
            distribution[bucket] += 1
            if f.vcpu { vcpuFaults += 1; vcpuBlockedNs += ns }
        }
    }

    var hasPending: Bool { lock.withLock { !pending.isEmpty } }

    func report(samples: Bool = false) -> PostcopyFaultReport {
        let (lat, vf, blocked, dist, waiting) = lock.withLock {
            (latenciesNs, vcpuFaults, vcpuBlockedNs, distribution, pending.values.filter(\.vcpu).map { Sys.nanosSince($0.start) }.reduce(0, +))
        }
        var r = PostcopyFaultReport()
        r.faults = lat.count
        r.vcpuFaults = vf
        let blockedMs = (blocked + waiting) / 1_000_000
        r.blocktimeMs = blockedMs
        r.vcpuBlocktimeMs = [blockedMs]
        r.distribution = dist
        guard !lat.isEmpty else { return r }
        let sorted = lat.sorted()
        r.latencyNs = lat.reduce(0, +) / UInt64(lat.count)
        func pct(_ q: Double) -> Double { Double(sorted[min(sorted.count - 1, Int(Double(sorted.count) * q))]) / 1000 }
        r.p50Us = pct(0.5)
        r.p99Us = pct(0.99)
        r.maxUs = Double(sorted.last!) / 1000
        if samples { r.samplesUs = lat.map { Double($0) / 1000 } }
        return r
    }
}

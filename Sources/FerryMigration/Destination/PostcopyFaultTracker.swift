import Histogram
import FerrySys

/// What the destination measured about remote page faults (QEMU's blocktime fields plus the
/// fault → installed latency distribution).
public struct PostcopyFaultReport: Sendable {
    /// Faults that needed a page from the source and were resolved.
    public var faults: Int = 0
    /// vCPU waits on a missing page (one per vCPU per page; KVM's accesses included).
    public var vcpuFaults: Int = 0
    /// Time all vCPUs were blocked at once (one vCPU: its blocked time), ms.
    public var blocktimeMs: UInt64 = 0
    /// Per vCPU, by index: time it waited for pages, ms.
    public var vcpuBlocktimeMs: [UInt64] = []
    /// Page requests sent for a page already requested (de-duplication keeps it 0;
    /// re-sends after a recovery count here).
    public var requestsRepeated: Int = 0
    /// Mean fault latency, ns (QEMU's postcopy-latency).
    public var latencyNs: UInt64 = 0
    public var p50Us: Double = 0
    public var p99Us: Double = 0
    public var maxUs: Double = 0
    /// QEMU's postcopy-latency-dist: counter N = faults resolved in [2^N, 2^(N+1)) µs.
    public var distribution: [UInt64] = Array(repeating: 0, count: 24)
}

/// Destination-side accounting: the fault thread records when a missing page was first
/// touched and which vCPU waits on it (a vCPU thread waits on one page at a time; several
/// vCPUs may wait on the same page); whichever thread installs the page resolves it for
/// every waiter.
///
/// Every clock read that is compared with a recorded fault happens under `lock`, the lock
/// that orders the records: a time read before taking it could predate a fault recorded
/// by another thread meanwhile, and the difference would underflow (it crashed a
/// destination polled by query-migrate). Differences are also clamped at zero.
/// Ownership: every mutable field is guarded by `lock`.
final class PostcopyFaultTracker: @unchecked Sendable {
    private let lock = Monitor()
    /// Missing pages touched and not yet installed: when first touched.
    private var pending: [Int: UInt64] = [:]
    /// Per vCPU: the page it waits on and since when.
    private var waiting: [Int: (page: Int, start: UInt64)] = [:]
    private var vcpuCount = 1
    private var blockedNs: [UInt64] = [0]
    /// Since when every vCPU waits (QEMU's postcopy-blocktime counts those stretches).
    private var allBlockedSince: UInt64?
    private var allBlockedNs: UInt64 = 0
    /// Fault → installed, ns: an HdrHistogram (3 significant digits, up to 10 minutes), so a
    /// query-migrate costs the same after a million faults as after ten.
    private var latencies = Histogram<UInt64>(highestTrackableValue: 600_000_000_000, numberOfSignificantValueDigits: .three)
    private var vcpuFaults = 0
    private var requestsSent = 0
    private var pagesRequested = Set<Int>()
    private var distribution = Array(repeating: UInt64(0), count: 24)

    init() { latencies.autoResize = true }

    /// The machine's vCPU count (before the guest runs).
    func setVCPUCount(_ n: Int) {
        lock.withLock { vcpuCount = max(1, n); blockedNs = Array(repeating: 0, count: vcpuCount) }
    }

    /// A fault on missing `page`, by vCPU `vcpu` (nil: another thread).
    func faulted(page: Int, vcpu: Int?) {
        lock.withLock {
            let now = Sys.monotonicNanos()
            if pending[page] == nil { pending[page] = now }
            guard let v = vcpu, v < vcpuCount, waiting[v] == nil else { return }
            waiting[v] = (page, now)
            vcpuFaults += 1
            if waiting.count == vcpuCount { allBlockedSince = now }
        }
    }

    /// A page request went to the source (a repeat means de-duplication failed).
    func requested(page: Int) {
        lock.withLock { requestsSent += 1; pagesRequested.insert(page) }
    }

    /// Cheap when nothing waits on `page` (the common case for background pages).
    func installed(page: Int) {
        lock.withLock {
            guard let start = pending.removeValue(forKey: page) else { return }
            let now = Sys.monotonicNanos()
            let ns = now > start ? now - start : 0
            _ = latencies.record(ns)
            let us = ns / 1000
            let bucket = us == 0 ? 0 : min(23, 63 - us.leadingZeroBitCount)
            distribution[bucket] += 1
            for (v, w) in waiting where w.page == page {
                blockedNs[v] += now > w.start ? now - w.start : 0
                waiting[v] = nil
            }
            if let since = allBlockedSince, waiting.count < vcpuCount {
                allBlockedNs += now > since ? now - since : 0
                allBlockedSince = nil
            }
        }
    }

    var hasPending: Bool { lock.withLock { !pending.isEmpty } }

    /// The vCPUs waiting on a missing page right now.
    var waitingVCPUs: Set<Int> { lock.withLock { Set(waiting.keys) } }

    func report() -> PostcopyFaultReport {
        let (lat, vf, perVCPU, all, dist, sent, distinct) = lock.withLock {
            let now = Sys.monotonicNanos()
            var per = blockedNs
            for (v, w) in waiting { per[v] += now > w.start ? now - w.start : 0 }
            let all = allBlockedNs + (allBlockedSince.map { now > $0 ? now - $0 : 0 } ?? 0)
            return (latencies, vcpuFaults, per, all, distribution, requestsSent, pagesRequested.count)
        }
        var r = PostcopyFaultReport()
        r.faults = Int(lat.totalCount)
        r.vcpuFaults = vf
        r.blocktimeMs = all / 1_000_000
        r.vcpuBlocktimeMs = perVCPU.map { $0 / 1_000_000 }
        r.distribution = dist
        r.requestsRepeated = sent - distinct
        guard lat.totalCount > 0 else { return r }
        r.latencyNs = UInt64(lat.mean)
        r.p50Us = Double(lat.valueAtPercentile(50)) / 1000
        r.p99Us = Double(lat.valueAtPercentile(99)) / 1000
        r.maxUs = Double(lat.max) / 1000
        return r
    }
}

import CFerry
import FerryMemory

/// What the pages the test guest walks hold besides the byte it increments on each pass.
public enum TestGuestContents: Sendable, Equatable, CustomStringConvertible {
    /// Zero but for that byte: the easy case, every page a run of zeros.
    case zero
    /// Bytes 8-4095 of every walked page pseudo-random (a stream seeded by `seed` and the
    /// page's guest-physical page number), written from the host before the guest starts
    /// (the guest itself would take ~20 minutes for 512 MiB here). Never zero and
    /// incompressible, while the guest still changes one byte per page per pass; the memory
    /// check verifies the filled bytes too.
    case random(seed: UInt64)

    public static let defaultSeed: UInt64 = 0x4645_5252_5952_4e44 // "FERRYRND"

    /// `zero`, `random` or `random:SEED`.
    public init?(argument: String) {
        if argument == "zero" { self = .zero; return }
        if argument == "random" { self = .random(seed: Self.defaultSeed); return }
        guard argument.hasPrefix("random:"), let s = UInt64(argument.dropFirst(7)) else { return nil }
        self = .random(seed: s)
    }

    public var description: String {
        switch self {
        case .zero: "zero"
        case .random(let s): s == Self.defaultSeed ? "random" : "random:\(s)"
        }
    }
}

/// Where the test guest (guest/testguest.asm) keeps its counters and walks its pages, for
/// a machine of `memory` bytes and `vcpus` vCPUs. The image's configuration block and
/// the memory check both come from here.
public struct TestGuestLayout: Sendable, Equatable {
    /// The first page the guest walks; below it sit the image, page tables, stacks and counters.
    public static let walkStart: UInt64 = 0x10_0000
    static let dataPage: UInt64 = 0x8_0000
    static let total = dataPage, cpusUp = dataPage + 0x08, rxCount = dataPage + 0x10, rxLast = dataPage + 0x18
    static let exception = dataPage + 0x38, pitTicks = dataPage + 0x40, pitFirstTSC = dataPage + 0x48, pitLastTSC = dataPage + 0x50
    static func perVCPU(_ i: Int) -> UInt64 { dataPage + 0x100 + UInt64(i) * 64 }
    /// The configuration block's image offset (after the tag "FERRYSMP").
    static let configOffset = 0x210
    static let configTag = Array("FERRYSMP".utf8)
    /// LAPIC timer period (KVM counts the APIC bus at 1 GHz).
    public static let tickNanos: UInt32 = 10_000_000
    /// The PIT runs at 1193182 Hz / 11932: 100 Hz.
    public static let pitHz = 1_193_182.0 / 11_932.0

    public let memory: Int
    public let vcpus: Int
    /// What the walked pages hold (the memory check verifies it).
    public let contents: TestGuestContents
    /// The RAM's guest mappings (the hole below 4 GiB from 3.5 GiB of RAM on).
    public let mappings: [GuestMapping]
    /// Each vCPU's stripe: guest-physical [start, end); it skips from the end of low RAM to 4 GiB.
    public let stripes: [Range<UInt64>]

    /// `touched`: how much RAM (from address 0 in RAM order) the guest walks; all of it by default.
    public init(memory: Int, vcpus: Int, touched: Int? = nil, contents: TestGuestContents = .zero) {
        self.memory = memory
        self.vcpus = vcpus
        self.contents = contents
        self.mappings = GuestMemory.pcMappings(size: memory)
        let walked = max(0, min(touched ?? memory, memory) - Int(Self.walkStart)) / targetPageSize
        let maps = mappings
        func gpa(ofPage k: Int) -> UInt64 {
            var off = Int(Self.walkStart) + k * targetPageSize
            for m in maps {
                if off < m.length { return m.guestAddress + UInt64(off) }
                off -= m.length
            }
            return maps.last!.guestEnd
        }
        var s: [Range<UInt64>] = []
        for i in 0..<vcpus {
            let first = walked * i / vcpus, end = walked * (i + 1) / vcpus
            let lo = gpa(ofPage: first)
            s.append(first == end ? lo..<lo : lo..<(gpa(ofPage: end - 1) + UInt64(targetPageSize)))
        }
        stripes = s
    }

    /// End of RAM below 4 GiB: where a stripe jumps to 4 GiB.
    var lowTop: UInt64 { mappings[0].guestEnd }
    /// GiB the guest's page tables map (at least the 4 GiB holding the APICs).
    var mappedGiB: Int { max(4, Int((mappings.last!.guestEnd + (1 << 30) - 1) >> 30)) }

    /// The pages of stripe `i` in the order the guest walks them.
    func pages(ofStripe i: Int) -> [UInt64] {
        var out: [UInt64] = []
        var a = stripes[i].lowerBound
        while a < stripes[i].upperBound {
            out.append(a)
            a += UInt64(targetPageSize)
            if a == lowTop, mappings.count > 1 { a = mappings[1].guestAddress }
        }
        return out
    }

    /// Writes `contents` into every walked page of `pc.ram` (block offset 0 at `base`,
    /// `size` bytes): before the guest starts, on the host side.
    public func fill(base: UnsafeMutableRawPointer, size: Int) {
        guard case .random(let seed) = contents else { return }
        for i in 0..<vcpus {
            for a in pages(ofStripe: i) {
                guard let o = offset(of: a), o + targetPageSize <= size else { continue }
                ferry_fill_page_random(base + o, seed, a >> 12)
            }
        }
    }

    /// Bytes of `pc.ram` (from offset 0) the memory check reads: the counters and every
    /// walked page; a dump need not hold more.
    public var checkedBytes: Int {
        let ends = stripes.compactMap { $0.isEmpty ? nil : offset(of: $0.upperBound - 1).map { $0 + 1 } }
        return min(memory, max(Int(Self.walkStart), ends.max() ?? 0))
    }

    /// The walked pages (guest-physical) of `pc.ram` at `base` that do not hold the fill.
    public func pagesWithoutFill(base: UnsafeRawPointer, size: Int) -> Set<UInt64> {
        guard case .random(let seed) = contents else { return [] }
        var out: Set<UInt64> = []
        for i in 0..<vcpus {
            for a in pages(ofStripe: i) {
                if let o = offset(of: a), o + targetPageSize <= size, ferry_check_page_random(base + o, seed, a >> 12) >= 0 { out.insert(a) }
            }
        }
        return out
    }

    /// The block offset of guest-physical `gpa` in `pc.ram`.
    func offset(of gpa: UInt64) -> Int? {
        for m in mappings where gpa >= m.guestAddress && gpa < m.guestEnd { return m.offset + Int(gpa - m.guestAddress) }
        return nil
    }
}

/// The built-in test guest image.
public enum TestGuest {
    /// The image configured for `layout`.
    public static func image(_ layout: TestGuestLayout) -> [UInt8] {
        var img = testGuestImage
        let o = TestGuestLayout.configOffset
        precondition(Array(img[o - 8..<o]) == TestGuestLayout.configTag, "test guest image lacks its configuration tag")
        func put32(_ at: Int, _ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { for i in 0..<4 { img[at + i] = $0[i] } } }
        func put64(_ at: Int, _ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { for i in 0..<8 { img[at + i] = $0[i] } } }
        put32(o, UInt32(layout.vcpus))
        put32(o + 4, TestGuestLayout.tickNanos)
        put64(o + 8, layout.lowTop)
        put32(o + 16, UInt32(layout.mappedGiB))
        for (i, s) in layout.stripes.enumerated() {
            put64(o + 24 + i * 16, s.lowerBound)
            put64(o + 32 + i * 16, s.upperBound)
        }
        return img
    }

    public static func image(memory: Int, vcpus: Int = 1) -> [UInt8] { image(TestGuestLayout(memory: memory, vcpus: vcpus)) }
}

/// The test guest's memory rule, checked on its RAM (QEMU's `check_guests_ram`, per vCPU):
/// - each vCPU's stripe: the first byte of every page equal, except one step down where
///   the vCPU was when it stopped (8-bit wrap-around);
/// - the stripe's value is the vCPU's own pass count, or one more while a pass is under way;
/// - the shared total (incremented with `lock inc`) is the sum of the per-vCPU counts, less
///   at most one per vCPU (counted in its own counter, not yet in the total);
/// - with `random` contents, bytes 8-4095 of every walked page are the fill's;
/// - no exception was taken; the PIT ticks never run ahead of the guest's TSC (`tscKHz`),
///   and the TSC never goes back.
/// Any other difference is a lost, stale or duplicated page.
public struct TestGuestChecker: Sendable {
    public let layout: TestGuestLayout
    public let tscKHz: UInt64?
    public let maxReported: Int
    /// Guest-physical pages whose fill is not checked (another VMM's firmware took them).
    public let unfilled: Set<UInt64>

    public init(layout: TestGuestLayout, tscKHz: UInt64? = nil, maxReported: Int = 10, unfilled: Set<UInt64> = []) {
        self.layout = layout; self.tscKHz = tscKHz; self.maxReported = maxReported; self.unfilled = unfilled
    }

    public struct Report: Sendable, CustomStringConvertible {
        public var pagesChecked = 0
        public var problems: [String] = []
        public var problemCount = 0
        public var passes: [UInt64] = []
        public var total: UInt64 = 0
        public var cpusUp: UInt64 = 0
        public var pitTicks: UInt64 = 0
        /// PIT ticks the guest's TSC says are due between the PIT's start and its latest tick.
        public var pitTicksExpected: Double?
        public var lapicTicks: [UInt64] = []
        public var halts: [UInt64] = []
        public var received: UInt64 = 0
        public var lastReceived: UInt8 = 0
        public var passed: Bool { problemCount == 0 && pagesChecked > 0 }
        public var description: String {
            let head = passed ? "memory check passed: \(pagesChecked) pages" : "memory check FAILED: \(problemCount) problems in \(pagesChecked) pages; first: " + problems.joined(separator: "; ")
            let ticks = ", PIT ticks \(pitTicks)" + (pitTicksExpected.map { " (TSC says \(Int($0.rounded())))" } ?? "")
            return head + "; \(passes.count) vCPUs, passes \(passes), total \(total)" + ticks
        }
        mutating func problem(_ s: String, limit: Int) {
            problemCount += 1
            if problems.count < limit { problems.append(s) }
        }
    }

    /// Checks `pc.ram` whose block offset 0 is at `base`.
    public func check(base: UnsafeRawPointer, size: Int) -> Report {
        var r = Report()
        let l = layout
        func byte(_ gpa: UInt64) -> UInt8? {
            guard let o = l.offset(of: gpa), o < size else { return nil }
            return base.load(fromByteOffset: o, as: UInt8.self)
        }
        func qword(_ gpa: UInt64) -> UInt64 {
            guard let o = l.offset(of: gpa), o + 8 <= size else { return 0 }
            return base.loadUnaligned(fromByteOffset: o, as: UInt64.self)
        }
        for i in 0..<l.vcpus {
            let p = TestGuestLayout.perVCPU(i)
            r.passes.append(qword(p)); r.lapicTicks.append(qword(p + 8)); r.halts.append(qword(p + 16))
        }
        r.total = qword(TestGuestLayout.total)
        r.cpusUp = qword(TestGuestLayout.cpusUp)
        r.pitTicks = qword(TestGuestLayout.pitTicks)
        r.received = qword(TestGuestLayout.rxCount)
        r.lastReceived = byte(TestGuestLayout.rxLast) ?? 0
        for i in 0..<l.vcpus {
            let pages = l.pages(ofStripe: i)
            guard let first = pages.first, var last = byte(first) else { continue }
            let stripeStart = last
            var step = false
            for a in pages {
                guard let b = byte(a) else { r.problem("0x\(String(a, radix: 16)) is outside RAM", limit: maxReported); continue }
                r.pagesChecked += 1
                if case .random(let seed) = l.contents, !unfilled.contains(a), let o = l.offset(of: a), o + targetPageSize <= size {
                    let at = ferry_check_page_random(base + o, seed, a >> 12)
                    if at >= 0 { r.problem("0x\(String(a, radix: 16)): byte \(at) differs from the random fill", limit: maxReported) }
                }
                if b == last { continue }
                if b &+ 1 == last && !step { step = true; last = b; continue }
                r.problem("vCPU \(i) stripe: 0x\(String(a, radix: 16)) expected \(last) (or \(last &- 1) once), found \(b)", limit: maxReported)
            }
            let own = UInt8(truncatingIfNeeded: r.passes[i])
            if stripeStart != own && stripeStart != own &+ 1 || step && stripeStart != own &+ 1 {
                r.problem("vCPU \(i): stripe at pass \(stripeStart)\(step ? " (mid-pass)" : "") but its counter says \(r.passes[i])", limit: maxReported)
            }
        }
        let sum = r.passes.reduce(0, +)
        if r.total > sum || r.total + UInt64(l.vcpus) < sum {
            r.problem("shared total \(r.total) is not the sum of the vCPUs' passes \(sum) (less at most \(l.vcpus))", limit: maxReported)
        }
        if r.cpusUp > UInt64(l.vcpus) { r.problem("\(r.cpusUp) vCPUs came up in a machine of \(l.vcpus)", limit: maxReported) }
        if qword(TestGuestLayout.exception) != 0 { r.problem("the guest took an exception", limit: maxReported) }
        if let khz = tscKHz, khz > 0, r.pitTicks >= 2 {
            let first = qword(TestGuestLayout.pitFirstTSC), last = qword(TestGuestLayout.pitLastTSC)
            if last < first {
                r.problem("the guest's TSC went backwards: the PIT started at TSC \(first), its latest tick saw \(last)", limit: maxReported)
            } else {
                let expected = Double(last - first) / (Double(khz) * 1000) * TestGuestLayout.pitHz
                r.pitTicksExpected = expected
                // More ticks than time passed means a timer ran twice or the TSC stood still
                // while the PIT ran. Fewer is no error: on a busy host ticks coalesce (KVM's
                // PIT delivers a late tick once), so the count lags the clock.
                let seen = Double(r.pitTicks)
                if seen > expected * 1.05 + 2 {
                    r.problem("PIT ticks \(Int(seen)) disagree with the guest's TSC (\(Int(expected.rounded())) ticks of time)", limit: maxReported)
                }
            }
        }
        return r
    }
}

extension Machine {
    /// The memory check for the test guest on this machine (walking `touched` bytes, all by
    /// default, holding `contents`).
    public func checkTestGuest(touched: Int? = nil, contents: TestGuestContents = .zero) -> TestGuestChecker.Report {
        TestGuestChecker(layout: TestGuestLayout(memory: ram.length, vcpus: vcpuCount, touched: touched, contents: contents), tscKHz: tscKHz)
            .check(base: ram.host, size: ram.length)
    }
}

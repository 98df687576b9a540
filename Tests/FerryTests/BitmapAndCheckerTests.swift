import FerryMachine
import FerryMemory
import Testing

@Suite("page bitmap")
struct PageBitmapTests {
    @Test("set, test, clear, popcount and iteration agree", arguments: [1, 63, 64, 65, 1000, 131072])
    func basics(bits: Int) {
        let b = PageBitmap(bitCount: bits)
        let picks = Set([0, bits / 3, bits / 2, bits - 1].filter { $0 >= 0 && $0 < bits })
        for p in picks { b.set(p) }
        #expect(b.popcount() == picks.count)
        var seen: [Int] = []
        b.forEachSet { seen.append($0) }
        #expect(seen == picks.sorted())
        var viaNext: [Int] = []
        var i = b.nextSet(from: 0)
        while let x = i { viaNext.append(x); i = b.nextSet(from: x + 1) }
        #expect(viaNext == picks.sorted())
        for p in picks { #expect(b.testAndClear(p)) }
        #expect(b.popcount() == 0)
        #expect(b.nextSet(from: 0) == nil)
    }

    @Test("complement flips exactly the bits inside the bitmap")
    func complement() {
        let b = PageBitmap(bitCount: 100)
        b.set(3); b.set(99)
        b.complement()
        #expect(b.popcount() == 98)
        #expect(!b.test(3) && !b.test(99) && b.test(0) && b.test(98))
        b.setAll()
        #expect(b.popcount() == 100)
    }

    @Test("wire form is little-endian 64-bit words and round-trips", arguments: [1, 64, 70, 4096, 131072])
    func serialization(bits: Int) throws {
        let b = PageBitmap(bitCount: bits)
        for p in stride(from: 0, to: bits, by: 7) { b.set(p) }
        let bytes = b.serialized()
        #expect(bytes.count == ((bits + 63) / 64) * 8)
        #expect(bytes[0] & 1 == 1) // page 0 is bit 0 of byte 0
        if bits > 7 { #expect(bytes[0] & 0x80 == 0x80) } // page 7 is bit 7 of byte 0
        let back = try #require(PageBitmap.deserialize(bytes, bitCount: bits))
        #expect(back == b)
        #expect(PageBitmap.deserialize(bytes.dropLast(), bitCount: bits) == nil)
    }

    @Test("takeRun clears the run of set bits from a start, up to a clear bit or the limit")
    func takeRun() {
        let b = PageBitmap(bitCount: 300)
        for i in 10..<200 { b.set(i) }
        b.set(250)
        #expect(b.takeRun(from: 10, limit: 5) == 5)
        #expect(!b.test(14) && b.test(15))
        #expect(b.takeRun(from: 15, limit: 1000) == 185)
        #expect(b.takeRun(from: 200, limit: 1000) == 0)
        #expect(b.popcount() == 1 && b.test(250))
        #expect(b.takeRun(from: 250, limit: 1000) == 1)
    }

    @Test("knownZeroRun counts never-touched pages up to the first touched one or the limit, also across whole words")
    func knownZeroRun() throws {
        let b = try RAMBlock(name: "pc.ram", guestAddress: 0, length: 16 << 20)
        for p in [3, 100, 1000] { (b.host + p * 4096).storeBytes(of: 1, as: UInt8.self) }
        let z = PopulatedPages(b)
        #expect(try z.knownZeroRun(from: 0, limit: 10_000) == 3)
        #expect(try z.knownZeroRun(from: 3, limit: 10_000) == 0)
        #expect(try z.knownZeroRun(from: 4, limit: 10_000) == 96)
        #expect(try z.knownZeroRun(from: 101, limit: 50) == 50)
        #expect(try z.knownZeroRun(from: 101, limit: 10_000) == 899)
        #expect(try z.knownZeroRun(from: 1001, limit: 1 << 20) == b.pageCount - 1001)
    }

    @Test("drain moves bits and leaves the source empty")
    func drain() {
        let a = PageBitmap(bitCount: 200), b = PageBitmap(bitCount: 200)
        a.set(5); a.set(150); b.set(7)
        a.drain(into: b)
        #expect(a.popcount() == 0)
        #expect(b.popcount() == 3)
    }
}

@Suite("memory checker")
struct TestGuestCheckerTests {
    /// A guest-physical image where page i (from 1 MiB) has first byte `value(i)`, and the
    /// counters say `passes` (default: page 0's value) for one vCPU, or per vCPU.
    func memory(pages: Int, passes: [UInt64]? = nil, total: UInt64? = nil, _ value: (Int) -> UInt8) -> [UInt8] {
        var m = [UInt8](repeating: 0, count: 0x10_0000 + pages * 4096)
        for i in 0..<pages { m[0x10_0000 + i * 4096] = value(i) }
        let p = passes ?? [UInt64(value(0))]
        func put(_ at: Int, _ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { for k in 0..<8 { m[at + k] = $0[k] } } }
        for (k, v) in p.enumerated() { put(0x80100 + k * 64, v) }
        put(0x80000, total ?? p.reduce(0, +))
        return m
    }

    func check(_ m: [UInt8], vcpus: Int = 1) -> TestGuestChecker.Report {
        m.withUnsafeBytes { TestGuestChecker(layout: TestGuestLayout(memory: m.count, vcpus: vcpus)).check(base: $0.baseAddress!, size: $0.count) }
    }

    @Test("all pages equal passes")
    func uniform() {
        let r = check(memory(pages: 64) { _ in 7 })
        #expect(r.passed, "\(r)")
        #expect(r.pagesChecked == 64)
    }

    @Test("one step down (the guest's position), with wrap-around, passes when the counter is one behind")
    func oneStep() {
        let m = memory(pages: 64, passes: [255]) { $0 < 20 ? 0 : 255 }
        #expect(check(m).passed, "\(check(m))")
        // The same memory with the counter already at the new pass is a stale page set.
        #expect(!check(memory(pages: 64, passes: [0]) { $0 < 20 ? 0 : 255 }).passed)
    }

    @Test("a lost update is found with its address")
    func lostUpdate() {
        let r = check(memory(pages: 64) { $0 == 30 ? 4 : 5 })
        #expect(!r.passed)
        #expect(r.problems.first?.contains("0x\(String(0x10_0000 + 31 * 4096, radix: 16))") == true, "\(r)")
    }

    @Test("two steps and a jump of two are both inconsistencies")
    func twoSteps() {
        #expect(!check(memory(pages: 64, passes: [8]) { $0 < 10 ? 9 : ($0 < 40 ? 8 : 7) }).passed)
        let r = check(memory(pages: 64, passes: [8]) { $0 < 10 ? 9 : 7 })
        #expect(r.problemCount > 0)
        #expect(r.problems.first?.contains("0x\(String(0x10_0000 + 10 * 4096, radix: 16))") == true, "\(r)")
    }

    @Test("a step up is an inconsistency")
    func stepUp() {
        #expect(!check(memory(pages: 64, passes: [3]) { $0 < 10 ? 3 : 4 }).passed)
    }

    @Test("per-vCPU stripes: each checked on its own; the shared total must add up")
    func stripes() {
        // 4 vCPUs, 16 pages each: stripes at passes 3, 5 (mid-pass), 7, 9.
        let value: (Int) -> UInt8 = { i in [3, i % 16 < 4 ? 6 : 5, 7, 9][i / 16] }
        #expect(check(memory(pages: 64, passes: [3, 5, 7, 9]) { value($0) }, vcpus: 4).passed)
        #expect(check(memory(pages: 64, passes: [3, 5, 7, 9], total: 21) { value($0) }, vcpus: 4).passed, "one increment per vCPU may be in flight")
        #expect(!check(memory(pages: 64, passes: [3, 5, 7, 9], total: 19) { value($0) }, vcpus: 4).passed, "a lost shared increment")
        #expect(!check(memory(pages: 64, passes: [3, 5, 7, 9], total: 25) { value($0) }, vcpus: 4).passed, "an extra shared increment")
        #expect(!check(memory(pages: 64, passes: [3, 4, 7, 9]) { value($0) }, vcpus: 4).passed, "a stripe two passes ahead of its counter")
    }
}

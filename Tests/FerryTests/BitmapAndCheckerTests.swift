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
struct MemoryCheckerTests {
    /// A guest-physical image where page i (from 1 MiB) has first byte `value(i)`.
    func memory(pages: Int, _ value: (Int) -> UInt8) -> [UInt8] {
        var m = [UInt8](repeating: 0xaa, count: 0x10_0000 + pages * 4096)
        for i in 0..<pages { m[0x10_0000 + i * 4096] = value(i) }
        return m
    }

    @Test("all pages equal passes")
    func uniform() {
        let m = memory(pages: 64) { _ in 7 }
        let r = m.withUnsafeBytes { MemoryChecker(top: UInt64(m.count)).check($0) }
        #expect(r.passed)
        #expect(r.pagesChecked == 64)
        #expect(r.stepAddress == nil)
    }

    @Test("one step down (the guest's position), with wrap-around, passes")
    func oneStep() {
        let m = memory(pages: 64) { $0 < 20 ? 0 : 255 }
        let r = m.withUnsafeBytes { MemoryChecker(top: UInt64(m.count)).check($0) }
        #expect(r.passed, "\(r)")
        #expect(r.stepAddress == 0x10_0000 + 20 * 4096)
    }

    @Test("a lost update is found with its address")
    func lostUpdate() {
        let m = memory(pages: 64) { $0 == 30 ? 4 : 5 }
        let r = m.withUnsafeBytes { MemoryChecker(top: UInt64(m.count)).check($0) }
        #expect(!r.passed)
        #expect(r.inconsistencies.first?.address == 0x10_0000 + 31 * 4096)
    }

    @Test("two steps and a jump of two are both inconsistencies")
    func twoSteps() {
        let two = memory(pages: 64) { $0 < 10 ? 9 : ($0 < 40 ? 8 : 7) }
        #expect(!two.withUnsafeBytes { MemoryChecker(top: UInt64(two.count)).check($0) }.passed)
        let jump = memory(pages: 64) { $0 < 10 ? 9 : 7 }
        let r = jump.withUnsafeBytes { MemoryChecker(top: UInt64(jump.count)).check($0) }
        #expect(r.inconsistencyCount > 0)
        #expect(r.inconsistencies.first?.address == 0x10_0000 + 10 * 4096)
    }

    @Test("a step up is an inconsistency")
    func stepUp() {
        let m = memory(pages: 64) { $0 < 10 ? 3 : 4 }
        #expect(!m.withUnsafeBytes { MemoryChecker(top: UInt64(m.count)).check($0) }.passed)
    }
}

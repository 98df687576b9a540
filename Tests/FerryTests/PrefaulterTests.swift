import FerryMemory
import FerrySys
import Glibc
import Testing

@Suite("prefaulter")
struct PrefaulterTests {
    /// Pages with memory behind them now (a fresh read of the page tables).
    func populated(_ b: RAMBlock) throws -> Int { try PopulatedPages(b).count() }

    /// Polls until `body` holds or 5 s pass.
    func eventually(_ body: () throws -> Bool) rethrows -> Bool {
        for _ in 0..<500 { if try body() { return true }; usleep(10_000) }
        return try body()
    }

    @Test("a sequential run is faulted in ahead by as many chunks as it is long (at most 4); scattered writes get nothing ahead")
    func aheadOfRuns() throws {
        let chunk = Prefaulter.chunkBytes, chunkPages = chunk / 4096
        let b = try RAMBlock(name: "pc.ram", guestAddress: 0, length: 64 << 20)
        let p = try Prefaulter(b)
        defer { p.stop() }
        var cursor = Prefaulter.Cursor()
        // Chunks 0, 1, 2 written whole: chunk 2 was queued ahead by the run of two, 3 and 4 by the run of three.
        for c in 0..<3 {
            cursor.wrote(c * chunk, p)
            (b.host + c * chunk).initializeMemory(as: UInt8.self, repeating: 1, count: chunk)
        }
        #expect(try eventually { try populated(b) >= 5 * chunkPages })
        usleep(50_000)
        let ahead = try populated(b)
        #expect(ahead == 5 * chunkPages, "nothing beyond the lookahead: \(ahead) pages")
        // One page in chunks 10, 20, 30 (never two chunks in a row): nothing ahead of them.
        for c in [10, 20, 30] {
            cursor.wrote(c * chunk, p)
            (b.host + c * chunk).storeBytes(of: 7, as: UInt8.self)
        }
        usleep(100_000)
        let scattered = try populated(b)
        #expect(scattered == 5 * chunkPages + 3, "\(scattered) pages")
        // What was written is intact: populating never changes a page.
        #expect(b.host.load(fromByteOffset: 2 * chunk + 5, as: UInt8.self) == 1)
        #expect((b.host + 3 * chunk).load(as: UInt64.self) == 0)
        #expect(b.host.load(fromByteOffset: 20 * chunk, as: UInt8.self) == 7)
    }

    @Test("PrefaultAhead: starts at the first page, keeps each block's run apart, and stops")
    func perBlock() throws {
        let chunk = Prefaulter.chunkBytes, chunkPages = chunk / 4096
        let low = try RAMBlock(name: "pc.ram", guestAddress: 0, length: 16 << 20)
        let high = try RAMBlock(name: "pc.ram.high", guestAddress: 1 << 32, length: 16 << 20)
        let ahead = PrefaultAhead([low, high])
        defer { ahead.stop() }
        for c in 0..<2 {
            ahead.wrote(block: 1, c * chunk)
            (high.host + c * chunk).initializeMemory(as: UInt8.self, repeating: 3, count: chunk)
        }
        #expect(try eventually { try populated(high) >= 3 * chunkPages })
        let (l, h) = (try populated(low), try populated(high))
        #expect(l == 0 && h == 3 * chunkPages, "low \(l), high \(h) pages")
    }
}

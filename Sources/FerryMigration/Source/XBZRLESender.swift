import CFerry
import FerryMemory
import FerrySys
import FerryWire
import Glibc

/// QEMU's XBZRLE page cache (`migration/page_cache.c`'s rules): direct-mapped by page
/// number over a power-of-two number of slots; a slot holding another page is taken only
/// when that page was last used `lifetime` bitmap syncs ago or more. The slots' memory is
/// an anonymous mapping of huge pages where the kernel has them: a slot costs nothing until
/// a page lands in it, and filling the cache costs one fault per 2 MiB, not per page.
/// Ownership: `mig/src/main` only.
final class XBZRLECache {
    /// `CACHED_PAGE_LIFETIME`.
    static let lifetime: UInt64 = 2
    let size: UInt64
    private let slotMask: Int
    private let data: UnsafeMutableRawPointer
    private var pages: [Int]
    private var ages: [UInt64]

    /// `size`: bytes, a power of two of at least a page (checked by `migrate-set-parameters`).
    init(size: UInt64) throws {
        precondition(size >= UInt64(Wire.pageSize) && size & (size - 1) == 0)
        let slots = Int(size) / Wire.pageSize
        let p: UnsafeMutableRawPointer
        do { p = try Sys.mmapAnonymous(size: Int(size), hugePages: true) } catch {
            throw MigrationError(.resource, "cannot map the \(size)-byte XBZRLE cache", cause: error)
        }
        self.size = size
        data = p
        slotMask = slots - 1
        pages = [Int](repeating: -1, count: slots)
        ages = [UInt64](repeating: 0, count: slots)
    }

    deinit { munmap(data, Int(size)) }

    private func slotData(_ s: Int) -> UnsafeMutableRawPointer { data + s * Wire.pageSize }

    /// The cached copy of `page`, its age refreshed, or nil on a miss.
    func lookup(_ page: Int, generation: UInt64) -> UnsafeMutableRawPointer? {
        let s = page & slotMask
        guard pages[s] == page else { return nil }
        ages[s] = generation
        return slotData(s)
    }

    /// Copies `contents` (nil: zeros) in as `page`'s; nil when the slot holds another page
    /// still fresh.
    @discardableResult
    func insert(_ page: Int, _ contents: UnsafeRawPointer?, generation: UInt64) -> UnsafeMutableRawPointer? {
        let s = page & slotMask
        if pages[s] != -1 && pages[s] != page && ages[s] + Self.lifetime > generation { return nil }
        let d = slotData(s)
        if let contents { d.copyMemory(from: contents, byteCount: Wire.pageSize) } else { d.initializeMemory(as: UInt8.self, repeating: 0, count: Wire.pageSize) }
        pages[s] = page
        ages[s] = generation
        return d
    }
}

/// XBZRLE on the source's precopy passes: for each dirty page a delta against the cached
/// copy of what was last sent. Unlike QEMU 7.2, which leaves the cache empty through the
/// first pass and so sends every page whole twice, the first pass already fills it (the
/// pages it sends go from their cached copies): deltas start with the second pass. A page not in the cache goes whole, from the copy
/// just cached, so the cache always holds exactly what the destination has; an unchanged
/// page is not sent; a delta longer than a page ("overflow") goes whole. In the last
/// stage (the guest stopped) deltas are still sent but the cache is no longer updated.
/// Ownership: `mig/src/main` only.
final class XBZRLESender {
    private(set) var cache: XBZRLECache
    private let encoded = UnsafeMutableRawPointer.allocate(byteCount: Wire.pageSize, alignment: 8)
    /// Deltas are sent from the second pass on; the first only fills the cache (`prime`).
    var started = false
    private(set) var counters = XBZRLECounters()

    init(cacheSize: UInt64) throws { cache = try XBZRLECache(size: cacheSize) }

    deinit { encoded.deallocate() }

    /// A new, empty cache of `size` bytes (`xbzrle-cache-size` changed mid-migration).
    func resize(_ size: UInt64) throws {
        guard size != cache.size else { return }
        cache = try XBZRLECache(size: size)
    }

    enum Outcome {
        /// Nothing to send: the destination's copy is already this.
        case unchanged
        /// A delta of this many bytes, at `encodedBytes`.
        case delta(Int)
        /// Send this copy of the page whole (cached just now, or an overflow; in the last
        /// stage, the stopped guest's page itself).
        case whole(UnsafeRawPointer)
        /// Not cached and not cacheable now: send the page as usual.
        case uncached
    }

    var encodedBytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: encoded, count: Wire.pageSize) }

    /// A non-zero dirty page about to go.
    func prepare(_ i: Int, _ page: UnsafeRawPointer, generation: UInt64, lastStage: Bool) -> Outcome {
        counters.iterated += 1
        guard let cached = cache.lookup(i, generation: generation) else {
            counters.cacheMiss += 1
            if !lastStage, let copy = cache.insert(i, page, generation: generation) { return .whole(copy) }
            return .uncached
        }
        // A running guest may write the page while it is encoded: the encoder reads each
        // byte it sends once and updates the cache from its output, so no copy of the page
        // is needed. In the last stage (guest stopped) the cache is no longer updated.
        let n = lastStage
            ? XBZRLE.encode(old: cached, new: page, count: Wire.pageSize, into: encoded, capacity: Wire.pageSize)
            : XBZRLE.encode(updating: cached, new: page, count: Wire.pageSize, into: encoded, capacity: Wire.pageSize)
        guard let n else {
            counters.overflow += 1
            counters.bytes += UInt64(Wire.pageSize)
            if lastStage { return .whole(page) }
            // The cache must hold exactly what goes: one copy, sent from the cache.
            cached.copyMemory(from: page, byteCount: Wire.pageSize)
            return .whole(cached)
        }
        if n == 0 { return .unchanged }
        counters.pages += 1
        return .delta(n)
    }

    /// The first pass: a non-zero page goes whole from its copy just cached (or, its slot
    /// taken, as usual). Not counted: QEMU's counters start with the deltas.
    func prime(_ i: Int, _ page: UnsafeRawPointer, generation: UInt64) -> Outcome {
        cache.insert(i, page, generation: generation).map { .whole($0) } ?? .uncached
    }

    /// A zero page went: the cache learns it (a later delta is against zeros).
    func sentZero(_ i: Int, generation: UInt64, lastStage: Bool) {
        counters.iterated += 1
        if !lastStage { cache.insert(i, nil, generation: generation) }
    }

    /// What a delta record cost on the wire (header included), for `bytes`.
    func sentDelta(wireBytes: Int) { counters.bytes += UInt64(wireBytes) }

    /// `xbzrle-cache` for `query-migrate`, the rates over the pages since the last call
    /// (QEMU updates them at each bitmap sync).
    func report(previous: inout XBZRLECounters) -> XBZRLEReport {
        let c = counters
        defer { previous = c }
        let iterated = c.iterated - previous.iterated
        let encodedBytes = c.bytes - previous.bytes, deltaPages = c.pages - previous.pages
        return XBZRLEReport(cacheSize: cache.size, bytes: c.bytes, pages: c.pages, cacheMiss: c.cacheMiss,
                            cacheMissRate: iterated > 0 ? Double(c.cacheMiss - previous.cacheMiss) / Double(iterated) : 0,
                            encodingRate: deltaPages > 0 && encodedBytes > 0 ? Double(deltaPages * UInt64(Wire.pageSize)) / Double(encodedBytes) : 0,
                            overflow: c.overflow)
    }
}

/// Running totals of one migration's XBZRLE work.
struct XBZRLECounters {
    var iterated: UInt64 = 0
    var cacheMiss: UInt64 = 0
    var pages: UInt64 = 0
    var bytes: UInt64 = 0
    var overflow: UInt64 = 0
}

/// The test guest's memory rule (QEMU's `check_guests_ram`): the first byte of every
/// 4 KiB page from 1 MiB to `top` is the same value, except for one step where a page
/// is one less than the page before it (where the guest was when it stopped), with
/// 8-bit wrap-around. Any other difference is a lost, stale or duplicated page update.
public struct MemoryChecker: Sendable {
    public struct Inconsistency: Sendable, CustomStringConvertible {
        public let address: UInt64
        public let expected: UInt8
        public let found: UInt8
        public var description: String {
            "0x\(String(address, radix: 16)): expected \(expected) (or \(expected &- 1) once), found \(found)"
        }
    }

    public struct Report: Sendable, CustomStringConvertible {
        public let pagesChecked: Int
        public let inconsistencyCount: Int
        /// The first few, with addresses.
        public let inconsistencies: [Inconsistency]
        /// Where the guest's pass stopped (first page of the lower value), if seen.
        public let stepAddress: UInt64?
        public var passed: Bool { inconsistencyCount == 0 && pagesChecked > 0 }
        public var description: String {
            if passed {
                return "memory check passed: \(pagesChecked) pages" + (stepAddress.map { ", step at 0x\(String($0, radix: 16))" } ?? ", no step")
            }
            return "memory check FAILED: \(inconsistencyCount) inconsistencies in \(pagesChecked) pages; first: "
                + inconsistencies.map(\.description).joined(separator: "; ")
        }
    }

    public static let start: UInt64 = 0x10_0000
    public let top: UInt64
    public let maxReported: Int

    public init(top: UInt64, maxReported: Int = 10) {
        self.top = top
        self.maxReported = maxReported
    }

    /// Checks memory whose guest-physical address 0 is at `base`, `size` bytes long.
    public func check(base: UnsafeRawPointer, size: Int) -> Report {
        let end = min(top, UInt64(size))
        var addr = Self.start
        guard addr < end else { return Report(pagesChecked: 0, inconsistencyCount: 0, inconsistencies: [], stepAddress: nil) }
        var last = base.load(fromByteOffset: Int(addr), as: UInt8.self)
        var pages = 1
        var stepSeen: UInt64?
        var bad = 0
        var reported: [Inconsistency] = []
        addr += 4096
        while addr < end {
            let b = base.load(fromByteOffset: Int(addr), as: UInt8.self)
            if b != last {
                if b &+ 1 == last && stepSeen == nil {
                    stepSeen = addr
                    last = b
                } else {
                    bad += 1
                    if reported.count < maxReported { reported.append(Inconsistency(address: addr, expected: last, found: b)) }
                }
            }
            pages += 1
            addr += 4096
        }
        return Report(pagesChecked: pages, inconsistencyCount: bad, inconsistencies: reported, stepAddress: stepSeen)
    }

    public func check(_ bytes: UnsafeRawBufferPointer) -> Report {
        check(base: bytes.baseAddress!, size: bytes.count)
    }
}

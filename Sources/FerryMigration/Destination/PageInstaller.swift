import FerryMemory
import FerrySys
import FerryWire

/// Installing postcopy pages: each page is read into a bounce buffer and placed whole and
/// atomically with UFFDIO_COPY (or UFFDIO_ZEROPAGE), waking whoever faulted on it; only
/// then does it count as received (the recovery contract). The main channel installs on
/// `mig/dst/main`; postcopy-preempt's urgent channel on its own thread, `mig/dst/preempt`.
/// Each thread has its own `PageInstaller` (its own bounce page), so they share nothing
/// but the atomic bitmaps and the fault tracker.
/// Ownership: every field is immutable; the bounce page belongs to the installer's thread.
final class PageInstaller: @unchecked Sendable {
    let uffd: Userfaultfd
    let memory: GuestMemory
    let received: PageBitmap
    let requested: PageBitmap
    let faults: PostcopyFaultTracker
    /// Owned by the one thread that uses this installer.
    private let bounce = UnsafeMutableRawPointer.allocate(byteCount: Wire.pageSize, alignment: Wire.pageSize)

    init(uffd: Userfaultfd, memory: GuestMemory, received: PageBitmap, requested: PageBitmap, faults: PostcopyFaultTracker) {
        self.uffd = uffd; self.memory = memory; self.received = received; self.requested = requested; self.faults = faults
    }

    deinit { bounce.deallocate() }

    func page(_ b: Int, _ offset: UInt64, from ch: MigrationChannel) throws {
        try ch.readExactly(UnsafeMutableRawBufferPointer(start: bounce, count: Wire.pageSize))
        try uffd.copy(to: memory.blocks[b].host + Int(offset), from: bounce, length: Wire.pageSize)
        installed(Int(offset >> UInt64(Wire.pageShift)))
    }

    func zero(_ b: Int, _ offset: UInt64) throws {
        try uffd.zeroPage(at: memory.blocks[b].host + Int(offset), length: Wire.pageSize)
        installed(Int(offset >> UInt64(Wire.pageShift)))
    }

    /// A postcopy page is placed whole (UFFDIO_COPY); QEMU sends no delta then either.
    static let deltaInPostcopy = MigrationError(.protocolError, "an XBZRLE page in postcopy: postcopy pages are sent whole")
    static let flushInPostcopy = MigrationError(.protocolError, "a multifd flush in postcopy: multifd carries precopy pages only")

    @inline(__always) private func installed(_ page: Int) {
        received.set(page)
        if requested.test(page) { faults.installed(page: page) }
    }

    /// RAM records up to the section's EOS.
    func loadSection(_ decoder: StreamDecoder, _ ch: MigrationChannel) throws {
        while true {
            switch try decoder.nextRAMRecord() {
            case .eos: return
            case .memSize: throw MigrationError(.protocolError, "RAM setup during postcopy")
            case let .page(b, offset): try page(b, offset, from: ch)
            case let .zero(b, offset): try zero(b, offset)
            case .xbzrle: throw Self.deltaInPostcopy
            case .multifdFlush: throw Self.flushInPostcopy
            }
        }
    }
}

extension IncomingMigration {
    func pageInstaller(_ uffd: Userfaultfd) -> PageInstaller {
        PageInstaller(uffd: uffd, memory: machine.memory, received: received, requested: requested, faults: faults)
    }

    /// Accepts postcopy-preempt's urgent channel and starts its reader.
    func acceptUrgentChannel(on l: MigrationListener, uffd: Userfaultfd) throws {
        try startUrgentReader(try ChannelSetup.accept(on: l, role: .urgent, heartbeatTimeoutMs: host.parameters.heartbeatTimeout), uffd: uffd)
    }

    /// The urgent channel's reader: RAM records only, installed as they come. A broken
    /// urgent channel is a broken link: the main thread is made to pause.
    func startUrgentReader(_ pc: MigrationChannel, uffd: Userfaultfd) throws {
        let installer = pageInstaller(uffd)
        lock.withLock { urgentChannel = pc }
        let t = try KernelThread(name: "mig/dst/preempt") { [self] in
            let decoder = StreamDecoder(source: pc, layout: layout)
            do {
                while true {
                    switch try decoder.nextRAMRecord() {
                    case .eos: continue
                    case .memSize: throw MigrationError(.protocolError, "RAM setup on the urgent channel")
                    case let .page(b, offset): try installer.page(b, offset, from: pc)
                    case let .zero(b, offset): try installer.zero(b, offset)
                    case .xbzrle: throw PageInstaller.deltaInPostcopy
                    case .multifdFlush: throw PageInstaller.flushInPostcopy
                    }
                }
            } catch {
                let main: MigrationChannel? = lock.withLock { urgentChannel === pc ? channel : nil }
                main?.shutdown()
            }
        }
        lock.withLock { urgentThread = t }
    }
}

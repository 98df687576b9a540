import CFerry
import FerryMachine
import FerryMemory
@testable import FerryMigration
import FerrySys
import Glibc
import Testing

@Suite("userfaultfd", .serialized)
struct UserfaultfdTests {
    @Test("the destination stops catching faults once, however many threads ask at once (SIGTERM racing the end of postcopy): one wake, one join, one unregister; every caller returns after it, and a thread waiting on a missing page is released")
    func faultServiceStopsOnce() throws {
        let block = try RAMBlock(name: "pc.ram", guestAddress: 0, length: 16 * 4096)
        let service = try FaultService(block: block)
        let wakeups = Recorder<Int>()
        try service.start {
            var n = 0
            while service.waitForFaults() { n += 1; _ = try? service.uffd.readEvent() }
            wakeups.append(n)
        }
        let seen = Recorder<UInt8>()
        let waiter = try KernelThread(name: "waiter") { seen.append(block.host.load(fromByteOffset: 2 * 4096, as: UInt8.self)) }
        #expect(waitUntil(seconds: 5) { (wakeups.values.isEmpty) }, "the fault loop ended early")
        usleep(100_000)
        #expect(seen.values.isEmpty, "the page was not missing")
        let returned = Recorder<Int>()
        let stoppers = try (0..<4).map { i in try KernelThread(name: "stop\(i)") { service.stop(); returned.append(i) } }
        for t in stoppers { t.join() }
        #expect(returned.values.count == 4)
        #expect(wakeups.values.count == 1, "the fault loop ran on or ended twice")
        waiter.join()
        #expect(seen.values == [0], "the waiting thread was not released by the unregister")
        service.stop() // once more: nothing left to do
        #expect(wakeups.values.count == 1)
    }

    @Test("a thread touching a missing page blocks until UFFDIO_COPY installs it; EEXIST is success")
    func demandPage() throws {
        let block = try RAMBlock(name: "pc.ram", guestAddress: 0, length: 16 * 4096)
        let uffd = try Userfaultfd()
        try uffd.register(block.host, length: block.length)
        let seen = Recorder<UInt8>()
        let reader = try KernelThread(name: "reader") { seen.append(block.host.load(fromByteOffset: 3 * 4096 + 17, as: UInt8.self)) }
        #expect(uffd.waitReadable(timeoutMs: 5000))
        let event = try uffd.readEvent()
        guard case let .pageFault(address, write, _)? = event else { Issue.record("no fault event: \(String(describing: event))"); return }
        #expect(address & ~4095 == UInt64(UInt(bitPattern: block.page(3))))
        #expect(!write)
        #expect(seen.values.isEmpty, "the reader ran before the page was installed")
        let page = [UInt8](repeating: 0x42, count: 4096)
        #expect(try page.withUnsafeBytes { try uffd.copy(to: block.page(3), from: $0.baseAddress!, length: 4096) })
        reader.join()
        #expect(seen.values == [0x42])
        #expect(try page.withUnsafeBytes { try uffd.copy(to: block.page(3), from: $0.baseAddress!, length: 4096) } == false)
        #expect(try uffd.zeroPage(at: block.page(5), length: 4096))
        #expect(block.page(5).load(as: UInt8.self) == 0)
        #expect(try uffd.readEvent() == nil)
    }

    @Test("KVM faults on registered guest RAM reach the handler (not user-mode-only); the guest runs on installed pages")
    func kvmFaults() throws {
        let m = try Machine(memorySize: 8 << 20)
        try m.loadTestGuest()
        let uffd = try Userfaultfd()
        let low = 0x10_0000
        try uffd.register(m.ram.host + low, length: m.ram.length - low)
        let faults = PageBitmap(bitCount: m.ram.pageCount)
        let duplicates = Recorder<Int>()
        let stop = try Sys.eventfd()
        defer { Sys.close(stop) }
        let handler = try KernelThread(name: "uffd-test") {
            while true {
                var p = pollfd(fd: stop, events: Int16(POLLIN), revents: 0)
                if poll(&p, 1, 0) > 0 { return }
                guard uffd.waitReadable(timeoutMs: 50, wakeFd: stop) else { continue }
                while let e = try? uffd.readEvent() {
                    guard case let .pageFault(address, _, _) = e else { continue }
                    let page = Int((address - UInt64(UInt(bitPattern: m.ram.host))) >> 12)
                    if faults.testAndSet(page) { duplicates.append(page) }
                    _ = try? uffd.zeroPage(at: m.ram.page(page), length: 4096)
                }
            }
        }
        try m.start()
        #expect(waitForPasses(m, 3), "the guest did not run on demand-installed pages")
        m.pause()
        var one: UInt64 = 1
        _ = write(stop, &one, 8)
        handler.join()
        #expect(faults.popcount() == (m.ram.length - low) / 4096, "every guest page faulted once")
        #expect(duplicates.values.isEmpty)
        #expect(checkMemory(m).passed)
        m.stop()
    }
}

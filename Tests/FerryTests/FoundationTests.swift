import CFerry
import FerryKVM
import FerryMachine
import FerryMemory
import FerrySys
import Glibc
import Testing

@Suite("KVM machine", .serialized)
struct MachineTests {
    @Test("the test guest prints A then B per pass, and its memory stays consistent")
    func testGuestRuns() throws {
        let m = try Machine(memorySize: 32 << 20)
        try m.loadTestGuest()
        try m.start()
        #expect(waitForPasses(m, 4))
        m.pause()
        let out = m.serial.recentOutput
        #expect(out.first == UInt8(ascii: "A"))
        #expect(out.dropFirst().allSatisfy { $0 == UInt8(ascii: "B") })
        let report = checkMemory(m)
        #expect(report.passed, "\(report)")
        m.stop()
    }

    @Test("random contents: filled from the host, kept while the guest counts, a changed byte of the fill is caught")
    func randomContents() throws {
        let contents = TestGuestContents.random(seed: 7)
        let m = try runningTestGuest(memory: 16 << 20, vcpus: 2, passes: 2, contents: contents)
        defer { m.stop() }
        m.pause()
        let page = m.ram.host + 0x20_0000
        #expect(page.load(fromByteOffset: 104, as: UInt64.self) != 0, "the fill left a zero word")
        #expect(ferry_page_is_zero(page) == 0)
        let good = checkMemory(m, contents: contents)
        #expect(good.passed, "\(good)")
        #expect(!checkMemory(m, contents: .random(seed: 8)).passed, "another seed's fill passed the check")
        page.storeBytes(of: page.load(fromByteOffset: 4095, as: UInt8.self) ^ 1, toByteOffset: 4095, as: UInt8.self)
        let bad = checkMemory(m, contents: contents)
        #expect(bad.problemCount == 1 && bad.problems.first?.contains("0x200000: byte 4095") == true, "\(bad)")
        #expect(TestGuestContents(argument: "random:7") == contents && TestGuestContents(argument: "random") != nil
                && TestGuestContents(argument: "zero") == .zero && TestGuestContents(argument: "rand") == nil)
    }

    @Test("pause stops the guest completely; resume lets it continue")
    func pauseResume() throws {
        let m = try Machine(memorySize: 16 << 20)
        try m.loadTestGuest()
        try m.start()
        #expect(waitForPasses(m, 2))
        for _ in 0..<20 {
            m.pause()
            #expect(m.isPaused)
            let rip = try m.vcpus[0].getRegs().rip
            let bytes = m.serial.bytesWritten
            let snapshot = pageBytes(m)
            usleep(20_000)
            #expect(try m.vcpus[0].getRegs().rip == rip)
            #expect(m.serial.bytesWritten == bytes)
            #expect(snapshot == pageBytes(m), "guest memory changed while paused")
            m.resume()
            usleep(5_000)
        }
        #expect(waitForPasses(m, 2), "the guest did not continue after resume")
        m.stop()
    }

    @Test("pausing right after serial output loses no I/O exit: every pass prints exactly one B")
    func pauseDuringIO() throws {
        let m = try Machine(memorySize: 2 << 20 + 4 << 12) // tiny guest: a pass is 4 pages, mostly I/O exits
        try m.loadTestGuest()
        try m.start()
        #expect(waitForPasses(m, 10))
        for _ in 0..<200 { m.pause(); m.resume() }
        #expect(waitForPasses(m, 10))
        m.pause()
        // The guest's own pass count against the 'B's printed (queued per pass, sent on
        // interrupts): a lost or repeated I/O exit shows as a difference beyond the bytes
        // still queued.
        let report = checkMemory(m)
        #expect(report.passed, "\(report)")
        let printed = m.serial.bytesWritten - 1
        #expect(Int(report.passes[0]) - printed >= 0 && Int(report.passes[0]) - printed <= 2, "guest counted \(report.passes[0]) passes, printed \(printed) B")
        m.stop()
    }

    @Test("the machine's state (vCPUs, APICs, PICs, IOAPIC, PIT, UART, clock) saved in one VM and restored into a fresh VM continues the guest")
    func saveRestore() throws {
        let a = try Machine(memorySize: 32 << 20)
        try a.loadTestGuest()
        try a.start()
        #expect(waitForPasses(a, 3))
        a.pause()
        let state = try a.vcpus[0].saveState()
        #expect(!state.msrs.isEmpty)
        #expect(state.xsave.count >= 4096)
        let decoded = try VCPUState(decoding: state.encoded())
        #expect(decoded == state)

        let devices = try a.saveDevices()
        #expect(Set(devices.map(\.name)) == ["cpu", "apic", "i8259", "ioapic", "i8254", "serial", "kvmclock"])
        let b = try Machine(memorySize: 32 << 20, kvm: a.kvm)
        b.ram.host.copyMemory(from: a.ram.host, byteCount: a.ram.length)
        try b.restoreDevices(devices)
        #expect(try b.vcpus[0].getRegs().rip == state.rip)
        #expect(try b.vm.irqchipState(.ioapic) == (try a.vm.irqchipState(.ioapic)))
        #expect(try b.vcpus[0].lapicState()[0x320..<0x324] == (try a.vcpus[0].lapicState())[0x320..<0x324], "LVT timer")
        let before = b.ram.host.load(fromByteOffset: 0x10_0000, as: UInt8.self)
        try b.start()
        #expect(waitForPasses(b, 3), "the restored guest did not keep counting")
        b.pause()
        #expect(b.ram.host.load(fromByteOffset: 0x10_0000, as: UInt8.self) != before)
        let report = checkMemory(b)
        #expect(report.passed, "\(report)")
        #expect(checkMemory(a).passed)
        a.stop(); b.stop()
    }

    @Test("a boot sector that is not a boot sector is refused with a clear error")
    func badBootSector() throws {
        let m = try Machine(memorySize: 4 << 20)
        #expect(throws: MachineError.self) { try m.loadBootSector([UInt8](repeating: 0, count: 512)) }
        #expect(throws: MachineError.self) { try m.loadBootSector([0x55, 0xaa]) }
    }

    @Test("unmodelled port I/O is ignored and counted; reads return 0xff")
    func unknownPorts() throws {
        // in al, 0x60 ; mov [0x600], al ; out 0x80, al ; hlt
        var code: [UInt8] = [0xe4, 0x60, 0xa2, 0x00, 0x06, 0xe6, 0x80, 0xf4, 0xeb, 0xfd]
        code += [UInt8](repeating: 0, count: 510 - code.count) + [0x55, 0xaa]
        let m = try Machine(memorySize: 4 << 20)
        try m.loadBootSector(code)
        try m.start()
        #expect(waitUntilHalted(m))
        #expect(m.unhandledIOCount == 2)
        #expect(m.ram.host.load(fromByteOffset: 0x600, as: UInt8.self) == 0xff)
        m.stop()
    }
}

@Suite("dirty log")
struct DirtyLogTests {
    @Test("KVM's dirty log reports exactly the pages the guest wrote, plus pages Ferry wrote")
    func knownPages() throws {
        // Real mode: write one byte each into pages 0x10, 0x23 and 0x50, then halt.
        let code: [UInt8] = [
            0xb8, 0x00, 0x10, 0x8e, 0xc0, 0x26, 0xc6, 0x06, 0x00, 0x00, 0x01, // es=0x1000; [es:0]=1      -> 0x10000
            0xb8, 0x00, 0x23, 0x8e, 0xc0, 0x26, 0xc6, 0x06, 0x10, 0x00, 0x07, // es=0x2300; [es:0x10]=7   -> 0x23010
            0xb8, 0x00, 0x50, 0x8e, 0xc0, 0x26, 0xc6, 0x06, 0xff, 0x0f, 0x09, // es=0x5000; [es:0xfff]=9  -> 0x50fff
            0xf4, 0xeb, 0xfd,
        ]
        let image = code + [UInt8](repeating: 0, count: 510 - code.count) + [0x55, 0xaa]
        let m = try Machine(memorySize: 4 << 20)
        try m.vm.setDirtyLogging(m.ram, true)
        try m.loadBootSector(image) // Ferry writes page 7 (0x7c00) itself
        try m.start()
        #expect(waitUntilHalted(m))
        let dirty = PageBitmap(bitCount: m.ram.pageCount)
        try m.vm.collectDirtyLog(m.ram, into: dirty)
        var pages: [Int] = []
        dirty.forEachSet { pages.append($0) }
        #expect(pages == [0x7, 0x10, 0x23, 0x50])
        #expect(m.ram.host.load(fromByteOffset: 0x50fff, as: UInt8.self) == 9)

        let again = PageBitmap(bitCount: m.ram.pageCount)
        try m.vm.collectDirtyLog(m.ram, into: again)
        #expect(again.popcount() == 0, "collecting the log must clear it")

        try [1, 2, 3].withUnsafeBytes { try m.memory.write(gpa: 0x3_0ffe, $0) } // spans pages 0x30 and 0x31
        try m.vm.collectDirtyLog(m.ram, into: again)
        var vmmPages: [Int] = []
        again.forEachSet { vmmPages.append($0) }
        #expect(vmmPages == [0x30, 0x31])
        m.stop()
    }

    @Test("the running test guest dirties every page it walks")
    func runningGuestDirtiesAll() throws {
        let m = try Machine(memorySize: 8 << 20)
        try m.vm.setDirtyLogging(m.ram, true)
        try m.loadTestGuest()
        try m.start()
        #expect(waitForPasses(m, 2))
        let dirty = PageBitmap(bitCount: m.ram.pageCount)
        try m.vm.collectDirtyLog(m.ram, into: dirty)
        #expect(waitForPasses(m, 2))
        try m.vm.collectDirtyLog(m.ram, into: dirty)
        for p in 256..<m.ram.pageCount { #expect(dirty.test(p), "page \(p) not reported dirty"); if !dirty.test(p) { break } }
        m.stop()
    }
}

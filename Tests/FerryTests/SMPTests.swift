import FerryKVM
import FerryMachine
import FerryMemory
@testable import FerryMigration
import Glibc
import Testing

/// The real machine: several vCPUs faulting at once, halted vCPUs, interrupts and clocks
/// across the move, device state, RAM above 4 GiB. Real KVM, real sockets.
@Suite("SMP machine", .serialized)
struct SMPTests {
    @Test("precopy of a 4-vCPU guest: every stripe, the shared counter and the ticks check out; the guest clock moves on from where it stopped")
    func precopy() throws {
        let pair = try Pair(memory: 64 << 20, vcpus: 4)
        let target = try pair.listen()
        pair.source.setParameters { $0.maxBandwidth = 0; $0.downtimeLimit = 2000 }
        try pair.source.migrate(uri: target)
        #expect(pair.source.waitForMigration(seconds: scaled(120)) == .completed, "\(pair.source.queryMigrate().errorDescription ?? "")")
        #expect(pair.destination.waitForMigration(seconds: scaled(10)) == .completed)
        let gap = try #require(pair.destination.queryMigrate().guestClockGapUs)
        // The clock stands still through the downtime and continues here: it moves only by
        // the moment between restoring it and starting the vCPUs.
        #expect(gap >= 0 && gap < 100_000, "guest clock moved \(gap) µs across the switch-over")
        let m = pair.destination.machine
        let before = checkMemory(m)
        pair.expectDestinationRunsCorrectly()
        let after = checkMemory(m)
        #expect(after.passes.count == 4)
        for i in 0..<4 { #expect(after.passes[i] >= before.passes[i], "vCPU \(i)") }
        #expect(after.lapicTicks.allSatisfy { $0 > 0 } && after.pitTicks > 0, "\(after)")
    }

    @Test("postcopy of a 4-vCPU guest: one request per page however many vCPUs fault on it, a blocked time per vCPU, memory whole",
          arguments: [false, true])
    func postcopy(preempt: Bool) throws {
        let pair = try Pair(memory: 64 << 20, vcpus: 4)
        var caps: [(MigrationCapability, Bool)] = [(.postcopyRAM, true), (.postcopyBlocktime, true)]
        if preempt { caps.append((.postcopyPreempt, true)) }
        for h in [pair.source, pair.destination] { try h.setCapabilities(caps) }
        let target = try pair.listen()
        pair.source.setParameters { $0.maxBandwidth = 5_000_000; $0.maxPostcopyBandwidth = 20_000_000 }
        try pair.source.migrate(uri: target)
        #expect(waitUntil { pair.source.queryMigrate().status == .active })
        try pair.source.startPostcopy()
        #expect(pair.source.waitForMigration(seconds: scaled(120)) == .completed, "\(pair.source.queryMigrate().errorDescription ?? "")")
        #expect(pair.destination.waitForMigration(seconds: scaled(20)) == .completed)
        let f = try #require(pair.destination.queryMigrate().faults)
        #expect(f.vcpuBlocktimeMs.count == 4)
        #expect(f.vcpuFaults > 0 && f.faults > 0)
        #expect(f.requestsRepeated == 0, "a page was requested twice")
        // Every vCPU ran into missing pages (each walks its own stripe, all share the counters).
        #expect(f.vcpuBlocktimeMs.filter { $0 > 0 }.count >= 2, "\(f.vcpuBlocktimeMs)")
        pair.expectDestinationRunsCorrectly()
    }

    @Test("postcopy recovery with a 4-vCPU guest: a link reset in postcopy pauses both sides, auto-recover heals it, memory whole")
    func recovery() throws {
        let p = try ProxiedPair(vcpus: 4)
        try p.startPostcopy()
        #expect(p.bothActive())
        p.proxy.reset()
        #expect(waitUntil { p.source.queryMigrate().postcopyPauses >= 1 && p.destination.queryMigrate().postcopyPauses >= 1 })
        p.expectCompleted()
        #expect(p.destination.queryMigrate().faults?.vcpuBlocktimeMs.count == 4)
    }

    @Test("a vCPU halted at the switch-over stays halted in the new VM and its timer wakes it there")
    func haltedVCPU() throws {
        // Small stripes: each vCPU spends most of its time halted, waiting for its timer.
        let a = try runningTestGuest(memory: 4 << 20, vcpus: 4, passes: 5)
        var devices: [DeviceSection] = []
        var halted: [Int] = []
        // Stop until at least one vCPU is caught in HLT.
        #expect(waitUntil {
            a.pause()
            halted = a.vcpus.indices.filter { (try? a.vcpus[$0].mpState()) == 3 }
            if halted.isEmpty { a.resume(); return false }
            devices = (try? a.saveDevices()) ?? []
            return true
        })
        let before = checkMemory(a)
        let b = try Machine(memorySize: 4 << 20, vcpus: 4, kvm: a.kvm)
        b.ram.host.copyMemory(from: a.ram.host, byteCount: a.ram.length)
        try b.restoreDevices(devices)
        for i in halted { #expect(try b.vcpus[i].mpState() == 3, "vCPU \(i) was halted on the source") }
        try b.start()
        #expect(waitUntil { let r = checkMemory(b); return zip(r.halts, before.halts).allSatisfy { $0 > $1 } })
        b.pause()
        let after = checkMemory(b)
        #expect(after.passed, "\(after)")
        for i in halted {
            #expect(after.lapicTicks[i] > before.lapicTicks[i], "vCPU \(i) was not woken by its timer")
            #expect(after.passes[i] > before.passes[i])
        }
        a.stop(); b.stop()
    }

    @Test("a byte typed on the serial line reaches the guest by interrupt; it counts it and echoes it")
    func serialReceive() throws {
        let m = try runningTestGuest(memory: 8 << 20, vcpus: 2, passes: 2)
        m.serial.receive(Array("xy".utf8))
        #expect(waitUntil { checkMemory(m).received == 2 })
        #expect(checkMemory(m).lastReceived == UInt8(ascii: "y"))
        #expect(waitUntil { m.serial.recentOutput.contains(UInt8(ascii: "x")) && m.serial.recentOutput.contains(UInt8(ascii: "y")) }, "no echo")
        m.stop()
    }

    @Test("a destination with another vCPU count refuses the stream before any RAM; the source keeps running")
    func mismatchedShape() throws {
        let src = try VMHost.forTest(memory: 16 << 20, vcpus: 2, incoming: false)
        defer { stopInBackground([src]) }
        try src.boot(image: nil)
        let dst = try VMHost.forTest(memory: 16 << 20, vcpus: 4, incoming: true)
        defer { stopInBackground([dst]) }
        try dst.migrateIncoming(uri: "tcp:127.0.0.1:0")
        try src.migrate(uri: dst.queryMigrate().socketAddress!.description)
        #expect(dst.waitForMigration(seconds: scaled(20)) == .failed)
        let why = dst.queryMigrate().errorDescription ?? ""
        #expect(why.contains("machine mismatch") && why.contains("2 vCPUs") && why.contains("4 vCPUs"), "\(why)")
        #expect(src.waitForMigration(seconds: scaled(20)) == .failed)
        #expect(src.runState == .running)
        #expect(waitForPasses(src.machine, 2))
        src.machine.pause()
        #expect(checkMemory(src.machine).passed)
    }

    @Test("a running 64 GiB guest that touched 1 GiB migrates (precopy) on this 24 GiB host, costing what it touched; runs on and passes the check")
    func bigSparseGuest() throws {
        let size = 64 << 30, touched = 1 << 30
        let src = try VMHost.forTest(memory: size, vcpus: 2, incoming: false)
        defer { stopInBackground([src]) }
        #expect(src.machine.ram.mappings.count == 2 && src.machine.ram.mappings[1].guestAddress == 1 << 32)
        try src.machine.loadTestGuest(touching: touched)
        try src.cont()
        #expect(waitForPasses(src.machine, 2, seconds: 120))
        let dst = try VMHost.forTest(memory: size, vcpus: 2, incoming: true)
        defer { stopInBackground([dst]) }
        try dst.migrateIncoming(uri: "tcp:127.0.0.1:0")
        // Untouched pages go as zero records without being read, on either side: neither
        // process ever holds much more than the touched 1 GiB.
        // About size, not convergence: a 1 GiB working set dirtied by two vCPUs converges or
        // not by how busy the host is, so any downtime is accepted after the first pass.
        src.setParameters { $0.maxBandwidth = 0; $0.downtimeLimit = 60_000 }
        try src.migrate(uri: dst.queryMigrate().socketAddress!.description)
        #expect(src.waitForMigration(seconds: scaled(600)) == .completed, "\(src.queryMigrate().errorDescription ?? "")")
        #expect(dst.waitForMigration(seconds: scaled(30)) == .completed)
        // Neither side read (faulted in) a page the guest never touched.
        let slack = 16 << 20
        for (side, host) in [("source", src), ("destination", dst)] {
            let populated = try PopulatedPages(host.machine.ram).count() * 4096
            #expect(populated <= touched + slack, "\(side): \(populated >> 20) MiB of RAM populated for \(touched >> 20) MiB touched")
        }
        #expect(waitForPasses(dst.machine, 2, seconds: 120))
        dst.machine.pause()
        let r = checkMemory(dst.machine, touched: touched)
        #expect(r.passed, "\(r)")
        #expect(r.pagesChecked == (touched - 0x10_0000) / 4096)
    }
}

@Suite("machine shape and CPUID")
struct MachineShapeTests {
    @Test("the shape round-trips and a different vCPU count, RAM size or CPUID is refused with the reason")
    func shape() throws {
        let s = MachineShape(vcpus: 4, memory: 8 << 30, cpuidDigest: 0x1234)
        #expect(try MachineShape(decoding: s.encoded()) == s)
        #expect(s.refusal(of: s) == nil)
        #expect(s.refusal(of: MachineShape(vcpus: 2, memory: 8 << 30, cpuidDigest: 0x1234))?.contains("--smp") == true)
        #expect(s.refusal(of: MachineShape(vcpus: 4, memory: 4 << 30, cpuidDigest: 0x1234)) != nil)
        #expect(s.refusal(of: MachineShape(vcpus: 4, memory: 8 << 30, cpuidDigest: 0x9999))?.contains("CPUID") == true)
        #expect(throws: MachineError.self) { try MachineShape(decoding: [1, 2, 3]) }
        #expect(s.description.contains("0x100000000"), "RAM above 4 GiB is described: \(s)")
    }

    @Test("each vCPU sees its own APIC id and the same topology; the digest ignores the APIC id")
    func cpuid() throws {
        let supported = try Kvm().supportedCPUID()
        for i in 0..<4 {
            let t = CPUIDModel.table(supported: supported, vcpu: i, of: 4)
            let leaf1 = try #require(t.first { $0.function == 1 })
            #expect(leaf1.ebx >> 24 == UInt32(i))
            #expect(leaf1.ebx >> 16 & 0xff == 4)
            for e in t where e.function == 0xb { #expect(e.edx == UInt32(i)) }
            if let core = t.first(where: { $0.function == 0xb && $0.index == 1 }) { #expect(core.ebx == 4) }
        }
        #expect(CPUIDModel.digest(supported: supported, count: 4) == CPUIDModel.digest(supported: supported, count: 4))
        #expect(CPUIDModel.digest(supported: supported, count: 4) != CPUIDModel.digest(supported: supported, count: 2))
    }

    @Test("guest memory above 3.5 GiB splits like QEMU's pc: 3 GiB low, the rest from 4 GiB; addresses resolve on both sides of the hole")
    func layout() throws {
        let m = try GuestMemory.pc(size: 8 << 30)
        #expect(m.blocks[0].mappings == [GuestMapping(guestAddress: 0, offset: 0, length: 3 << 30),
                                         GuestMapping(guestAddress: 1 << 32, offset: 3 << 30, length: 5 << 30)])
        #expect(m.resolve(gpa: 0xc000_0000, count: 1) == nil, "the hole is not RAM")
        #expect(m.resolve(gpa: 1 << 32, count: 8)?.1 == 3 << 30)
        #expect(GuestMemory.pcMappings(size: 512 << 20).count == 1)
        let l = TestGuestLayout(memory: 8 << 30, vcpus: 3)
        #expect(l.stripes[0].lowerBound == 0x10_0000 && l.stripes[2].upperBound == 9 << 30)
    }

    @Test("concurrent faults of several vCPUs on one page: each is blocked until the one install, then all are released")
    func sharedFault() {
        let t = PostcopyFaultTracker()
        t.setVCPUCount(3)
        t.faulted(page: 7, vcpu: 0)
        t.faulted(page: 7, vcpu: 1)
        t.faulted(page: 9, vcpu: 2)
        t.requested(page: 7); t.requested(page: 9)
        usleep(20_000)
        t.installed(page: 7)
        usleep(20_000)
        t.installed(page: 9)
        let r = t.report()
        #expect(r.faults == 2)
        #expect(r.vcpuFaults == 3)
        #expect(r.vcpuBlocktimeMs[0] >= 15 && r.vcpuBlocktimeMs[1] >= 15 && r.vcpuBlocktimeMs[2] >= 35, "\(r.vcpuBlocktimeMs)")
        #expect(r.blocktimeMs >= 15, "all three were blocked together for ~20 ms")
        #expect(r.requestsRepeated == 0)
        #expect(!t.hasPending)
    }
}

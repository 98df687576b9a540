import FerryKVM
import FerryMemory

/// Linux's x86 64-bit boot protocol (Documentation/arch/x86/boot.rst): the bzImage's
/// protected-mode kernel at 1 MiB, the zero page (`boot_params`: the setup header, the
/// e820 map, command line and initrd), identity-mapped page tables, a GDT with __BOOT_CS /
/// __BOOT_DS, ACPI tables and an MP table for the vCPUs, and the boot vCPU in long mode at
/// the 64-bit entry.
public enum LinuxBoot {
    static let zeroPage: UInt64 = 0x7000
    static let commandLine: UInt64 = 0x2_0000
    static let gdt: UInt64 = 0x500
    static let pml4: UInt64 = 0x9000
    static let kernelBase: UInt64 = 0x10_0000
    static let mpTable: UInt64 = 0xf_0000
    static let acpiTables: UInt64 = 0xe_0000
    static let biosEnd: UInt64 = 0x9_fc00

    /// The e820 map for a machine's RAM: low memory to the EBDA, the BIOS area reserved, the
    /// rest of RAM below the hole, and RAM above 4 GiB.
    public static func e820(_ mappings: [GuestMapping]) -> [(start: UInt64, length: UInt64, type: UInt32)] {
        var m: [(UInt64, UInt64, UInt32)] = [(0, biosEnd, 1), (biosEnd, 0xa_0000 - biosEnd, 2), (acpiTables, kernelBase - acpiTables, 2)]
        m.append((kernelBase, mappings[0].guestEnd - kernelBase, 1))
        for h in mappings.dropFirst() { m.append((h.guestAddress, UInt64(h.length), 1)) }
        return m
    }

    public static func load(_ machine: Machine, kernel: [UInt8], initrd: [UInt8]?, commandLine cmdline: String) throws(MachineError) {
        func bad(_ s: String) -> MachineError { MachineError(.guestImage, "not a bootable bzImage: \(s)") }
        guard kernel.count > 0x1000 else { throw bad("\(kernel.count) bytes") }
        func u8(_ o: Int) -> UInt8 { kernel[o] }
        func u16(_ o: Int) -> UInt16 { UInt16(kernel[o]) | UInt16(kernel[o + 1]) << 8 }
        func u32(_ o: Int) -> UInt32 { UInt32(u16(o)) | UInt32(u16(o + 2)) << 16 }
        guard u16(0x1fe) == 0xaa55, u32(0x202) == 0x5372_6448 /* "HdrS" */ else { throw bad("no setup header") }
        let version = u16(0x206)
        guard version >= 0x020c else { throw bad("boot protocol \(version >> 8).\(version & 0xff) (need 2.12 for the 64-bit entry)") }
        guard u16(0x236) & 1 != 0 else { throw bad("the kernel has no 64-bit entry point (XLF_KERNEL_64)") }
        let setupSectors = Int(u8(0x1f1) == 0 ? 4 : u8(0x1f1))
        let kernelOffset = (setupSectors + 1) * 512
        guard kernelOffset < kernel.count else { throw bad("setup of \(setupSectors) sectors is longer than the file") }
        let cmd = Array(cmdline.utf8) + [0]
        guard cmd.count <= Int(u32(0x238)) + 1 else { throw MachineError(.config, "kernel command line of \(cmd.count - 1) bytes; this kernel takes \(u32(0x238))") }
        let mem = machine.memory
        let lowTop = machine.ram.mappings[0].guestEnd
        let initSize = UInt64(u32(0x260))
        guard kernelBase + max(initSize, UInt64(kernel.count - kernelOffset)) < lowTop else {
            throw MachineError(.config, "the kernel needs \(initSize >> 20) MiB above 1 MiB; the guest has \(lowTop >> 20) MiB below 4 GiB")
        }
        do {
            func write(_ gpa: UInt64, _ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try mem.write(gpa: gpa, $0) } }
            try write(kernelBase, Array(kernel[kernelOffset...]))
            // The zero page: the setup header as the kernel has it, then what a loader fills in.
            var zp = [UInt8](repeating: 0, count: 4096)
            let headerEnd = 0x202 + Int(u8(0x201))
            zp[0x1f1..<headerEnd] = kernel[0x1f1..<headerEnd]
            func put(_ o: Int, _ v: UInt64, _ n: Int) { for i in 0..<n { zp[o + i] = UInt8(v >> UInt64(8 * i) & 0xff) } }
            put(0x210, 0xff, 1)                               // type_of_loader: undefined
            put(0x211, UInt64(zp[0x211] | 0x80), 1)            // loadflags: CAN_USE_HEAP
            put(0x224, 0xfe00, 2)                              // heap_end_ptr
            put(0x228, commandLine, 4)                         // cmd_line_ptr
            put(0x070, acpiTables, 8)                          // acpi_rsdp_addr
            if let initrd, !initrd.isEmpty {
                let maxAddr = min(UInt64(u32(0x22c)), lowTop - 1)
                let at = (maxAddr + 1 - UInt64(initrd.count)) & ~0xfff
                guard at > kernelBase + initSize else { throw MachineError(.config, "no room below \(maxAddr >> 20) MiB for a \(initrd.count >> 20) MiB initrd") }
                try write(at, initrd)
                put(0x218, at, 4); put(0x21c, UInt64(initrd.count), 4)
            }
            let map = e820(machine.ram.mappings)
            put(0x1e8, UInt64(map.count), 1)
            for (i, e) in map.enumerated() { put(0x2d0 + i * 20, e.start, 8); put(0x2d8 + i * 20, e.length, 8); put(0x2e0 + i * 20, UInt64(e.type), 4) }
            try write(zeroPage, zp)
            try write(commandLine, cmd)
            // GDT: 0x10 __BOOT_CS (64-bit code), 0x18 __BOOT_DS.
            var g = [UInt8](repeating: 0, count: 32)
            for (slot, d) in [(2, UInt64(0x00af_9b00_0000_ffff)), (3, UInt64(0x00cf_9300_0000_ffff))] { for i in 0..<8 { g[slot * 8 + i] = UInt8(d >> UInt64(8 * i) & 0xff) } }
            try write(gdt, g)
            // Identity map of the first 4 GiB (2 MiB pages): kernel, zero page, command line, initrd.
            var pt = [UInt8](repeating: 0, count: 6 * 4096)
            func put64(_ o: Int, _ v: UInt64) { for i in 0..<8 { pt[o + i] = UInt8(v >> UInt64(8 * i) & 0xff) } }
            put64(0, (pml4 + 0x1000) | 3)
            for gib in 0..<4 { put64(0x1000 + gib * 8, (pml4 + 0x2000 + UInt64(gib) * 0x1000) | 3) }
            for k in 0..<2048 { put64(0x2000 + k * 8, UInt64(k) << 21 | 0x83) }
            try write(pml4, pt)
            try write(mpTable, mpTableBytes(vcpus: machine.vcpuCount))
            try write(acpiTables, ACPITables.bytes(vcpus: machine.vcpuCount, at: acpiTables))
        } catch let e as MachineError {
            throw e
        } catch {
            throw MachineError(.guestImage, "cannot load the kernel into guest memory", cause: error)
        }
        do {
            try machine.vcpus[0].enterLongMode(rip: kernelBase + 0x200, rsi: zeroPage, cr3: pml4, gdt: gdt, gdtLimit: 31, code: 0x10, data: 0x18)
        } catch {
            throw MachineError(.kvm, "cannot set the boot vCPU up for the kernel", cause: error)
        }
    }

    /// An Intel MP table (spec 1.4): the floating pointer and a configuration table naming
    /// every vCPU, the ISA bus, the IOAPIC and the ISA interrupts (KVM routes IRQ n to pin n).
    static func mpTableBytes(vcpus: Int) -> [UInt8] {
        var cfg: [UInt8] = []
        var entries: [UInt8] = []
        for i in 0..<vcpus {
            entries += [0, UInt8(i), 0x14, i == 0 ? 3 : 1] + le(0x600, 4) + le(0x201, 4) + [UInt8](repeating: 0, count: 8)
        }
        entries += [1, 0] + Array("ISA   ".utf8)
        let ioapicID = UInt8(vcpus)
        entries += [2, ioapicID, 0x11, 1] + le(0xfec0_0000, 4)
        for irq in 0..<16 where irq != 2 { entries += [3, 0, 0, 0, 0, UInt8(irq), ioapicID, UInt8(irq)] }
        entries += [4, 3, 0, 0, 0, 0, 0xff, 0]  // ExtINT -> LINT0 of every local APIC
        entries += [4, 1, 0, 0, 0, 0, 0xff, 1]  // NMI -> LINT1
        let count = vcpus + 1 + 1 + 15 + 2
        cfg += Array("PCMP".utf8) + le(UInt64(44 + entries.count), 2) + [4, 0] + Array("FERRY   ".utf8) + Array("FERRY-PC    ".utf8)
        cfg += le(0, 4) + le(0, 2) + le(UInt64(count), 2) + le(0xfee0_0000, 4) + le(0, 2) + [0, 0]
        cfg += entries
        cfg[7] = 0 &- cfg.reduce(0, &+)
        // Floating pointer first (16 bytes, 16-aligned), the table right after it.
        var fp: [UInt8] = Array("_MP_".utf8) + le(mpTable + 16, 4) + [1, 4, 0, 0, 0, 0, 0, 0]
        fp[10] = 0 &- fp.reduce(0, &+)
        return fp + cfg
    }
}

extension Machine {
    /// Loads a Linux bzImage (64-bit boot protocol) to boot on start.
    public func loadLinux(kernel: [UInt8], initrd: [UInt8]? = nil, commandLine: String) throws(MachineError) {
        try LinuxBoot.load(self, kernel: kernel, initrd: initrd, commandLine: commandLine)
    }
}

/// The ACPI tables a kernel without MP-table parsing (Debian's cloud kernel has
/// `# CONFIG_X86_MPPARSE is not set`) needs to find the vCPUs: RSDP → XSDT → FADT (with its
/// DSDT) and MADT. The FADT says hardware-reduced ACPI (as Firecracker and Cloud Hypervisor
/// do): the machine has no PM timer, SCI or sleep registers to describe. The MADT names every
/// local APIC (APIC id = vCPU index, as the CPUID topology says), the IOAPIC at 0xfec00000
/// taking GSIs 0-23 (KVM's default routing sends ISA IRQ n to pin n, so no source overrides),
/// and LINT1 as NMI. All tables sit in one block, 16-byte aligned, the RSDP first so the
/// kernel's scan of 0xe0000-0xfffff finds it even without `acpi_rsdp_addr`.
public enum ACPITables {
    static let oem = Array("FERRY ".utf8)
    static let oemTable = Array("FERRYPC ".utf8)

    public static func bytes(vcpus: Int, at base: UInt64) -> [UInt8] {
        let rsdpLength = 36
        let dsdt = table("DSDT", revision: 2, body: [])
        var madtBody = le(0xfee0_0000, 4) + le(1, 4)   // local APIC address; PCAT_COMPAT (dual 8259s)
        for i in 0..<vcpus { madtBody += [0, 8, UInt8(i), UInt8(i)] + le(1, 4) }   // processor local APIC, enabled
        madtBody += [1, 12, UInt8(vcpus), 0] + le(0xfec0_0000, 4) + le(0, 4)   // IOAPIC, GSI base 0
        madtBody += [4, 6, 0xff] + le(0, 2) + [1]                               // local APIC NMI: all, LINT1
        let madt = table("APIC", revision: 4, body: madtBody)
        // Offsets in the block: RSDP, XSDT (two entries), FADT, DSDT, MADT.
        let xsdtAt = align(rsdpLength)
        let xsdtLength = 36 + 16
        let fadtAt = align(xsdtAt + xsdtLength)
        let fadtLength = 276
        let dsdtAt = align(fadtAt + fadtLength)
        let madtAt = align(dsdtAt + dsdt.count)
        var fadtBody = [UInt8](repeating: 0, count: fadtLength - 36)
        func setFADT(_ offset: Int, _ v: UInt64, _ n: Int) { fadtBody.replaceSubrange(offset - 36..<offset - 36 + n, with: le(v, n)) }
        setFADT(40, base + UInt64(dsdtAt), 4)      // DSDT
        setFADT(109, 0, 2)                         // IAPC_BOOT_ARCH: no legacy devices to enumerate, no 8042
        setFADT(112, 1 << 20 | 1 << 4, 4)          // flags: HW_REDUCED_ACPI, PWR_BUTTON (none)
        setFADT(131, 3, 1)                         // FADT minor version (6.3)
        setFADT(140, base + UInt64(dsdtAt), 8)     // X_DSDT
        setFADT(268, 0x5952_5245_46, 8)            // hypervisor vendor identity: "FERRY"
        let fadt = table("FACP", revision: 6, body: fadtBody)
        let xsdt = table("XSDT", revision: 1, body: le(base + UInt64(fadtAt), 8) + le(base + UInt64(madtAt), 8))
        var rsdp = Array("RSD PTR ".utf8) + [0] + oem + [2] + le(0, 4) + le(UInt64(rsdpLength), 4) + le(base + UInt64(xsdtAt), 8) + [0, 0, 0, 0]
        rsdp[8] = checksum(rsdp[0..<20])
        rsdp[32] = checksum(rsdp[0..<36])
        var block = [UInt8](repeating: 0, count: madtAt + madt.count)
        for (at, t) in [(0, rsdp), (xsdtAt, xsdt), (fadtAt, fadt), (dsdtAt, dsdt), (madtAt, madt)] {
            block.replaceSubrange(at..<at + t.count, with: t)
        }
        return block
    }

    /// A system description table: the 36-byte header, then the body, checksummed to zero.
    static func table(_ signature: String, revision: UInt8, body: [UInt8]) -> [UInt8] {
        var t = Array(signature.utf8) + le(UInt64(36 + body.count), 4) + [revision, 0] + oem + oemTable
        t += le(1, 4) + Array("FRRY".utf8) + le(1, 4) + body
        t[9] = checksum(t[...])
        return t
    }

    static func checksum(_ bytes: ArraySlice<UInt8>) -> UInt8 { 0 &- bytes.reduce(0, &+) }
    static func align(_ n: Int) -> Int { (n + 15) & ~15 }
}

/// `v` as `n` little-endian bytes, as firmware tables store their fields.
func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(v >> UInt64(8 * $0) & 0xff) } }

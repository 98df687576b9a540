import CFerry
import FerrySys
import Glibc

/// The in-kernel interrupt controllers and timers (KVM_CREATE_IRQCHIP: two 8259 PICs,
/// the IOAPIC and a local APIC per vCPU; KVM_CREATE_PIT2: the 8254), and the VM clock
/// (kvmclock). Their state is read and restored as the kernel's own structs.
extension VirtualMachine {
    /// KVM_GET/SET_IRQCHIP's chip ids.
    public enum Chip: UInt32, Sendable, CaseIterable { case picMaster = 0, picSlave = 1, ioapic = 2 }

    /// Creates the PICs, IOAPIC and local APICs (before any vCPU) and the PIT.
    public func createInterruptControllers() throws(KVMError) {
        _ = try kvmCall("KVM_CREATE_IRQCHIP") { () throws(SysError) in try Sys.ioctl(fd, ferry_KVM_CREATE_IRQCHIP, "KVM_CREATE_IRQCHIP", value: 0) }
        // flags 0: the PIT's speaker port 0x61 is not emulated by KVM (Ferry answers it).
        var pit = kvm_pit_config()
        _ = try kvmCall("KVM_CREATE_PIT2") { () throws(SysError) in try Sys.ioctl(fd, ferry_KVM_CREATE_PIT2, "KVM_CREATE_PIT2", &pit) }
    }

    /// Drives interrupt line `gsi` (ISA IRQs 0-15 reach both the PIC and the IOAPIC).
    public func setIRQLine(_ gsi: UInt32, high: Bool) {
        var l = kvm_irq_level()
        l.irq = gsi
        l.level = high ? 1 : 0
        // Fails only for a GSI outside the routing table; Ferry drives ISA lines only.
        _ = ferry_ioctl_ptr(fd, ferry_KVM_IRQ_LINE, &l)
    }

    public func irqchipState(_ chip: Chip) throws(KVMError) -> [UInt8] {
        var c = kvm_irqchip()
        c.chip_id = chip.rawValue
        return try readRaw(fd, ferry_KVM_GET_IRQCHIP, "KVM_GET_IRQCHIP(\(chip))", c)
    }

    public func restoreIrqchip(_ chip: Chip, _ bytes: [UInt8]) throws(KVMError) {
        guard bytes.count >= 4, UInt32(bytes[0]) | UInt32(bytes[1]) << 8 | UInt32(bytes[2]) << 16 | UInt32(bytes[3]) << 24 == chip.rawValue else {
            throw KVMError(.state, "irqchip state is not for chip \(chip)")
        }
        try writeRaw(fd, ferry_KVM_SET_IRQCHIP, "KVM_SET_IRQCHIP(\(chip))", bytes, as: kvm_irqchip.self)
    }

    public func pitState() throws(KVMError) -> [UInt8] {
        try readRaw(fd, ferry_KVM_GET_PIT2, "KVM_GET_PIT2", kvm_pit_state2())
    }

    public func restorePIT(_ bytes: [UInt8]) throws(KVMError) {
        try writeRaw(fd, ferry_KVM_SET_PIT2, "KVM_SET_PIT2", bytes, as: kvm_pit_state2.self)
    }

    /// The guest's kvmclock, in nanoseconds since the VM's clock began.
    public func clockNanos() throws(KVMError) -> UInt64 {
        let b = try readRaw(fd, ferry_KVM_GET_CLOCK, "KVM_GET_CLOCK", kvm_clock_data())
        return b.withUnsafeBytes { $0.loadUnaligned(as: kvm_clock_data.self).clock }
    }

    /// Sets the kvmclock (the guest sees it continue from `nanos`).
    public func setClock(nanos: UInt64) throws(KVMError) {
        var d = kvm_clock_data()
        d.clock = nanos
        try writeRaw(fd, ferry_KVM_SET_CLOCK, "KVM_SET_CLOCK", withUnsafeBytes(of: d) { Array($0) }, as: kvm_clock_data.self)
    }
}

extension VCPU {
    /// The local APIC's register page (KVM_GET_LAPIC).
    public func lapicState() throws(KVMError) -> [UInt8] {
        try readRaw(fd, ferry_KVM_GET_LAPIC, "KVM_GET_LAPIC", kvm_lapic_state())
    }

    /// The guest TSC's frequency in kHz (KVM_GET_TSC_KHZ); nil where KVM cannot say.
    public func tscKHz() -> UInt64? {
        let r = ferry_ioctl_int(fd, ferry_KVM_GET_TSC_KHZ, 0)
        return r > 0 ? UInt64(r) : nil
    }

    public func restoreLAPIC(_ bytes: [UInt8]) throws(KVMError) {
        try writeRaw(fd, ferry_KVM_SET_LAPIC, "KVM_SET_LAPIC", bytes, as: kvm_lapic_state.self)
    }
}

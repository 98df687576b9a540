import CFerry
import FerrySys
import Glibc

/// Why `KVM_RUN` returned.
public enum VCPUExit {
    /// Port I/O; for `in`, write the answer into `data` before the next run.
    case io(port: UInt16, isOut: Bool, size: Int, count: Int, data: UnsafeMutableRawPointer)
    case mmio(address: UInt64, isWrite: Bool, length: Int, data: UnsafeMutableRawPointer)
    case hlt
    case shutdown
    /// KVM_RUN returned EINTR: a kick (pause request or immediate_exit).
    case interrupted
    case failEntry(reason: UInt64)
    /// For an emulation failure, the bytes of the instruction KVM could not emulate when it
    /// says them.
    case internalError(suberror: UInt32, instruction: [UInt8])
    case other(reason: UInt32)
}

/// One virtual CPU. Owns its fd and the mapped `kvm_run` area.
/// Ownership: `vm`, `fd`, `id`, `run` are immutable; `msrIndices` is set once when the
/// vCPU is created, before its thread starts; `kvm_run` is the vCPU thread's, except the
/// `immediate_exit` byte, written from other threads as KVM documents.
public final class VCPU: @unchecked Sendable {
    public let vm: VirtualMachine
    public let fd: Int32
    public let id: Int32
    let run: UnsafeMutablePointer<kvm_run>
    var msrIndices: [UInt32] = []

    init(vm: VirtualMachine, fd: Int32, run: UnsafeMutableRawPointer, id: Int32) {
        self.vm = vm
        self.fd = fd
        self.id = id
        self.run = run.assumingMemoryBound(to: kvm_run.self)
    }

    deinit {
        Sys.munmap(UnsafeMutableRawPointer(run), size: vm.kvm.vcpuMmapSize)
        Sys.close(fd)
    }

    /// When set, the next KVM_RUN completes any pending I/O and returns EINTR at once,
    /// without running further guest instructions. Written from other threads.
    public var immediateExit: Bool {
        get { run.pointee.immediate_exit != 0 }
        set {
            withUnsafeMutablePointer(to: &run.pointee.immediate_exit) { ferry_atomic_store8($0, newValue ? 1 : 0) }
        }
    }

    /// Enters the guest once. Call only from the vCPU's own thread.
    public func runOnce() throws(KVMError) -> VCPUExit {
        let r = ferry_ioctl_int(fd, ferry_KVM_RUN, 0)
        if r < 0 {
            if -r == EINTR || -r == EAGAIN { return .interrupted }
            throw KVMError(.ioctl, "KVM_RUN", cause: SysError(errno: -r, call: "KVM_RUN"))
        }
        let p = run.pointee
        switch Int32(p.exit_reason) {
        case KVM_EXIT_IO:
            let io = p.io
            return .io(port: io.port, isOut: io.direction == UInt8(KVM_EXIT_IO_OUT), size: Int(io.size), count: Int(io.count),
                       data: UnsafeMutableRawPointer(run) + Int(io.data_offset))
        case KVM_EXIT_MMIO:
            let m = p.mmio
            let data = UnsafeMutableRawPointer(run) + Int(ferry_kvm_run_mmio_data_offset())
            return .mmio(address: m.phys_addr, isWrite: m.is_write != 0, length: Int(m.len), data: data)
        case KVM_EXIT_HLT: return .hlt
        case KVM_EXIT_SHUTDOWN: return .shutdown
        case KVM_EXIT_INTR: return .interrupted
        case KVM_EXIT_FAIL_ENTRY: return .failEntry(reason: p.fail_entry.hardware_entry_failure_reason)
        case KVM_EXIT_INTERNAL_ERROR:
            let f = p.emulation_failure
            guard p.internal.suberror == UInt32(KVM_INTERNAL_ERROR_EMULATION),
                  f.flags & UInt64(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0 else {
                return .internalError(suberror: p.internal.suberror, instruction: [])
            }
            let bytes = withUnsafeBytes(of: f.insn_bytes) { Array($0.prefix(Int(min(f.insn_size, 15)))) }
            return .internalError(suberror: p.internal.suberror, instruction: bytes)
        default: return .other(reason: p.exit_reason)
        }
    }

    // MARK: registers

    public func getRegs() throws(KVMError) -> kvm_regs {
        var v = kvm_regs()
        _ = try kvmCall("KVM_GET_REGS") { () throws(SysError) in try Sys.ioctl(fd, ferry_KVM_GET_REGS, "KVM_GET_REGS", &v) }
        return v
    }

    public func setRegs(_ regs: kvm_regs) throws(KVMError) {
        var v = regs
        _ = try kvmCall("KVM_SET_REGS") { () throws(SysError) in try Sys.ioctl(fd, ferry_KVM_SET_REGS, "KVM_SET_REGS", &v) }
    }

    public func getSregs() throws(KVMError) -> kvm_sregs {
        var v = kvm_sregs()
        _ = try kvmCall("KVM_GET_SREGS") { () throws(SysError) in try Sys.ioctl(fd, ferry_KVM_GET_SREGS, "KVM_GET_SREGS", &v) }
        return v
    }

    public func setSregs(_ sregs: kvm_sregs) throws(KVMError) {
        var v = sregs
        _ = try kvmCall("KVM_SET_SREGS") { () throws(SysError) in try Sys.ioctl(fd, ferry_KVM_SET_SREGS, "KVM_SET_SREGS", &v) }
    }

    /// Real mode at 0000:`ip`, as a BIOS hands over to a boot sector (DL = boot drive).
    public func resetToRealMode(ip: UInt64, dl: UInt64 = 0x80, sp: UInt64 = 0x7c00) throws(KVMError) {
        var s = try getSregs()
        for keyPath in [\kvm_sregs.cs, \kvm_sregs.ds, \kvm_sregs.es, \kvm_sregs.fs, \kvm_sregs.gs, \kvm_sregs.ss] {
            s[keyPath: keyPath].base = 0
            s[keyPath: keyPath].selector = 0
        }
        try setSregs(s)
        var r = kvm_regs()
        r.rip = ip
        r.rdx = dl
        r.rsp = sp
        r.rflags = 2
        try setRegs(r)
    }
}

extension VCPU {
    /// 64-bit mode with paging at `cr3`, flat segments `code`/`data` of the GDT at `gdt`,
    /// interrupts off: where a 64-bit boot protocol hands over (Linux: rsi = boot_params).
    public func enterLongMode(rip: UInt64, rsi: UInt64, cr3: UInt64, gdt: UInt64, gdtLimit: UInt16, code: UInt16, data: UInt16) throws(KVMError) {
        var s = try getSregs()
        var cs = kvm_segment()
        cs.base = 0; cs.limit = 0xffff_ffff; cs.selector = code; cs.type = 0xb; cs.present = 1; cs.dpl = 0; cs.db = 0; cs.s = 1; cs.l = 1; cs.g = 1
        var ds = cs
        ds.selector = data; ds.type = 0x3; ds.l = 0; ds.db = 1
        s.cs = cs
        s.ds = ds; s.es = ds; s.fs = ds; s.gs = ds; s.ss = ds
        s.gdt.base = gdt; s.gdt.limit = gdtLimit
        s.cr3 = cr3
        s.cr4 |= 0x20                  // PAE
        s.cr0 |= 0x8000_0001           // PG, PE
        s.efer |= 0x500                // LME, LMA
        try setSregs(s)
        var r = kvm_regs()
        r.rip = rip
        r.rsi = rsi
        r.rflags = 2
        try setRegs(r)
    }
}

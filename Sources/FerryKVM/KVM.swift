import CFerry
import FerryMemory
import FerrySys
import Glibc

/// The hypervisor layer's error: a code, a message and the system error behind it.
public struct KVMError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable { case unavailable, apiVersion, ioctl, state, unsupported }
    public let code: Code
    public let message: String
    public let cause: SysError?
    public init(_ code: Code, _ message: String, cause: SysError? = nil) {
        self.code = code; self.message = message; self.cause = cause
    }
    public var description: String { message + (cause.map { " (\($0))" } ?? "") }
}

@inline(__always)
func kvmCall<T>(_ what: @autoclosure () -> String, _ body: () throws(SysError) -> T) throws(KVMError) -> T {
    do { return try body() } catch { throw KVMError(.ioctl, what(), cause: error) }
}

/// The `/dev/kvm` system handle. Creates VMs; owns its fd.
/// Ownership: `fd` and `vcpuMmapSize` are immutable; `savedMSRs` and `supported` are filled
/// once while the first machine is built (one thread) and only read afterwards.
public final class Kvm: @unchecked Sendable {
    public let fd: Int32
    public let vcpuMmapSize: Int
    /// MSRs KVM lists as saved, filtered to those this host can actually read.
    public private(set) var savedMSRs: [UInt32] = []
    private var supported: [CPUIDEntry]?

    public init(path: String = "/dev/kvm") throws(KVMError) {
        let r = ferry_open_rw_cloexec(path)
        guard r >= 0 else {
            throw KVMError(.unavailable, "cannot open \(path): KVM is required (load kvm_intel/kvm_amd, or run with access to \(path))",
                           cause: SysError(errno: -r, call: "open(\(path))"))
        }
        fd = r
        let v = ferry_ioctl_int(r, ferry_KVM_GET_API_VERSION, 0)
        let size = ferry_ioctl_int(r, ferry_KVM_GET_VCPU_MMAP_SIZE, 0)
        guard v == 12, size > 0 else {
            Sys.close(r)
            throw KVMError(.apiVersion, "KVM API version \(v) (expected 12), vCPU mmap size \(size)")
        }
        vcpuMmapSize = Int(size)
    }

    deinit { Sys.close(fd) }

    public func checkExtension(_ cap: Int32) -> Int32 {
        max(0, ferry_ioctl_int(fd, ferry_KVM_CHECK_EXTENSION, UInt(cap)))
    }

    public func createVM() throws(KVMError) -> VirtualMachine {
        let vmfd = try kvmCall("KVM_CREATE_VM") { () throws(SysError) in try Sys.ioctl(fd, ferry_KVM_CREATE_VM, "KVM_CREATE_VM", value: 0) }
        return VirtualMachine(kvm: self, fd: vmfd)
    }

    /// KVM_GET_SUPPORTED_CPUID, asked once. Called while a machine is built.
    public func cpuid() throws(KVMError) -> [CPUIDEntry] {
        if let supported { return supported }
        let s = try supportedCPUID()
        supported = s
        return s
    }

    /// Builds the MSR list once, using `vcpu` to probe which entries can be read.
    func msrList(probe vcpu: VCPU) -> [UInt32] {
        if !savedMSRs.isEmpty { return savedMSRs }
        var idx = [UInt32](repeating: 0, count: 1024)
        let n = ferry_kvm_msr_index_list(fd, &idx, 1024)
        guard n > 0 else { return [] }
        var candidates = Array(idx[0..<Int(n)])
        var good: [UInt32] = []
        // KVM_GET_MSRS stops at the first MSR it cannot read; drop that one and go on.
        while !candidates.isEmpty {
            var vals = [UInt64](repeating: 0, count: candidates.count)
            let r = Int(ferry_kvm_get_msrs(vcpu.fd, candidates, &vals, Int32(candidates.count)))
            if r < 0 { break }
            good += candidates[0..<r]
            candidates.removeFirst(min(r + 1, candidates.count))
        }
        savedMSRs = good
        return good
    }
}

/// A KVM virtual machine: memory slots, dirty logging, vCPUs. Owns its fd.
/// Ownership: `kvm` and `fd` are immutable; `manualDirtyProtect` and `slots` are set while
/// the machine is built (one thread, before any vCPU or migration thread starts) and only
/// read afterwards; a slot's scratch bitmap is used by the one migration thread at a time.
public final class VirtualMachine: @unchecked Sendable {
    public let kvm: Kvm
    public let fd: Int32
    public private(set) var manualDirtyProtect = false
    private var slots: [UInt32: Slot] = [:]

    /// A memory slot: the part of a block it maps and its scratch dirty bitmap.
    private struct Slot { let block: RAMBlock; let mapping: GuestMapping; let scratch: PageBitmap }

    init(kvm: Kvm, fd: Int32) {
        self.kvm = kvm
        self.fd = fd
        // Real mode on VMX without unrestricted guest needs these; harmless elsewhere.
        _ = ferry_ioctl_int(fd, ferry_KVM_SET_TSS_ADDR, 0xfffb_d000)
        var ident: UInt64 = 0xfffb_c000
        _ = ferry_ioctl_ptr(fd, ferry_KVM_SET_IDENTITY_MAP_ADDR, &ident)
        // Prefer KVM_CLEAR_DIRTY_LOG: fetching the log then no longer write-protects everything at once.
        if kvm.checkExtension(ferry_KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) > 0,
           ferry_kvm_enable_cap(fd, UInt32(ferry_KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), UInt64(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)) == 0 {
            manualDirtyProtect = true
        }
    }

    deinit { Sys.close(fd) }

    /// Maps `block` into the guest, one memory slot per guest mapping, from slot `firstSlot`.
    public func map(_ block: RAMBlock, firstSlot: UInt32 = 0) throws(KVMError) {
        for (k, m) in block.mappings.enumerated() {
            let slot = firstSlot + UInt32(k)
            try setRegion(slot: slot, m, host: block.host + m.offset, logDirty: false)
            slots[slot] = Slot(block: block, mapping: m, scratch: PageBitmap(bitCount: m.length / targetPageSize))
        }
    }

    private func setRegion(slot: UInt32, _ m: GuestMapping, host: UnsafeMutableRawPointer, logDirty: Bool) throws(KVMError) {
        var region = kvm_userspace_memory_region(
            slot: slot, flags: logDirty ? UInt32(KVM_MEM_LOG_DIRTY_PAGES) : 0,
            guest_phys_addr: m.guestAddress, memory_size: UInt64(m.length),
            userspace_addr: UInt64(UInt(bitPattern: host)))
        _ = try kvmCall("KVM_SET_USER_MEMORY_REGION slot \(slot)") { () throws(SysError) in
            try Sys.ioctl(fd, ferry_KVM_SET_USER_MEMORY_REGION, "KVM_SET_USER_MEMORY_REGION", &region)
        }
    }

    private func slots(of block: RAMBlock) -> [(UInt32, Slot)] {
        slots.filter { $0.value.block === block }.sorted { $0.key < $1.key }
    }

    /// Turns KVM dirty logging on or off for every slot of `block`.
    public func setDirtyLogging(_ block: RAMBlock, _ on: Bool) throws(KVMError) {
        let mine = slots(of: block)
        guard !mine.isEmpty else { throw KVMError(.state, "RAM block \(block.name) is not mapped") }
        for (slot, s) in mine { try setRegion(slot: slot, s.mapping, host: block.host + s.mapping.offset, logDirty: on) }
    }

    /// Moves the pages the guest dirtied in `block` since the last call into `into` (OR;
    /// one bit per page of the block) and re-arms tracking for them. Pages Ferry itself
    /// wrote (`RAMBlock.vmmDirty`) are moved too.
    public func collectDirtyLog(_ block: RAMBlock, into: PageBitmap) throws(KVMError) {
        precondition(into.bitCount == block.pageCount)
        for (slot, s) in slots(of: block) {
            let pages = s.mapping.length / targetPageSize
            let r = ferry_kvm_get_dirty_log(fd, slot, s.scratch.words)
            guard r >= 0 else { throw KVMError(.ioctl, "KVM_GET_DIRTY_LOG slot \(slot)", cause: SysError(errno: -r, call: "KVM_GET_DIRTY_LOG")) }
            if manualDirtyProtect && s.scratch.nextSet(from: 0) != nil {
                let c = ferry_kvm_clear_dirty_log(fd, slot, 0, UInt32(pages), s.scratch.words)
                guard c >= 0 else { throw KVMError(.ioctl, "KVM_CLEAR_DIRTY_LOG slot \(slot)", cause: SysError(errno: -c, call: "KVM_CLEAR_DIRTY_LOG")) }
            }
            s.scratch.drain(into: into, atBit: s.mapping.offset / targetPageSize)
        }
        block.vmmDirty.drain(into: into)
    }

    /// Creates vCPU `id` (its APIC id too) of a machine with `count` vCPUs.
    public func createVCPU(id: Int32 = 0, of count: Int = 1) throws(KVMError) -> VCPU {
        let vfd = try kvmCall("KVM_CREATE_VCPU") { () throws(SysError) in try Sys.ioctl(fd, ferry_KVM_CREATE_VCPU, "KVM_CREATE_VCPU", value: UInt(id)) }
        let run: UnsafeMutableRawPointer
        do { run = try Sys.mmapShared(fd: vfd, size: kvm.vcpuMmapSize) } catch {
            Sys.close(vfd)
            throw KVMError(.ioctl, "mmap of kvm_run for vCPU \(id)", cause: error)
        }
        let v = VCPU(vm: self, fd: vfd, run: run, id: id)
        try v.setCPUID(CPUIDModel.table(supported: try kvm.cpuid(), vcpu: Int(id), of: count))
        v.msrIndices = kvm.msrList(probe: v)
        return v
    }
}

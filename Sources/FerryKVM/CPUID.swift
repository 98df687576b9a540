import CFerry
import FerrySys

/// One CPUID leaf as the guest sees it.
public struct CPUIDEntry: Sendable, Equatable, Hashable {
    public var function: UInt32
    public var index: UInt32
    public var flags: UInt32
    public var eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32

    public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0, eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) {
        self.function = function; self.index = index; self.flags = flags
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }

    init(_ e: kvm_cpuid_entry2) {
        self.init(function: e.function, index: e.index, flags: e.flags, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx)
    }

    var kernel: kvm_cpuid_entry2 {
        var e = kvm_cpuid_entry2()
        e.function = function; e.index = index; e.flags = flags
        e.eax = eax; e.ebx = ebx; e.ecx = ecx; e.edx = edx
        return e
    }
}

/// The CPUID a Ferry vCPU sees: what KVM supports on this host, with the topology made
/// consistent for `count` vCPUs (one core each, one package) and this vCPU's APIC id,
/// and the performance-monitoring leaf emptied (Ferry migrates no PMU state). Pure.
public enum CPUIDModel {
    static let kvmFlagSignificantIndex: UInt32 = 1

    /// Bits needed to number `count` APIC ids.
    static func idBits(_ count: Int) -> UInt32 {
        count <= 1 ? 0 : UInt32(Int.bitWidth - (count - 1).leadingZeroBitCount)
    }

    public static func table(supported: [CPUIDEntry], vcpu index: Int, of count: Int) -> [CPUIDEntry] {
        let apic = UInt32(index), n = UInt32(count), bits = idBits(count)
        var out: [CPUIDEntry] = []
        for var e in supported {
            switch e.function {
            case 0x1:
                e.ebx = (e.ebx & 0x0000_ffff) | apic << 24 | min(n, 255) << 16
                if count > 1 { e.edx |= 1 << 28 } else { e.edx &= ~(1 << 28) } // HTT: more than one logical CPU
                e.ecx |= 1 << 31 // running under a hypervisor
            case 0x4:
                // Deterministic cache parameters: one core per vCPU, caches not shared.
                e.eax = (e.eax & 0x3ff) | (n - 1) << 26
            case 0xa:
                e.eax = 0; e.ebx = 0; e.ecx = 0; e.edx = 0
            case 0xb, 0x1f:
                continue // rebuilt below
            case 0x8000_0001:
                e.ecx &= ~(1 << 1) // CmpLegacy: not a legacy multi-core layout
            case 0x8000_0008:
                e.ecx = (e.ecx & ~0xf0ff) | bits << 12 | (n - 1)
            case 0x8000_001e:
                e.eax = apic; e.ebx = (e.ebx & ~0xff) | apic; e.ecx = 0
            default:
                break
            }
            out.append(e)
        }
        // Extended topology: level 0 = SMT (one thread per core), level 1 = core.
        let hasB = supported.contains { $0.function == 0xb }
        if hasB {
            out.append(CPUIDEntry(function: 0xb, index: 0, flags: kvmFlagSignificantIndex, eax: 0, ebx: 1, ecx: 1 << 8 | 0, edx: apic))
            out.append(CPUIDEntry(function: 0xb, index: 1, flags: kvmFlagSignificantIndex, eax: bits, ebx: n, ecx: 2 << 8 | 1, edx: apic))
            out.append(CPUIDEntry(function: 0xb, index: 2, flags: kvmFlagSignificantIndex, eax: 0, ebx: 0, ecx: 2, edx: apic))
        }
        return out
    }

    /// A digest of what every vCPU of a machine sees apart from its own APIC id: equal on
    /// source and destination or the guest would find another CPU after the move.
    public static func digest(supported: [CPUIDEntry], count: Int) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        func mix(_ v: UInt32) { for s in stride(from: 0, to: 32, by: 8) { h = (h ^ UInt64(v >> UInt32(s) & 0xff)) &* 0x100_0000_01b3 } }
        for e in table(supported: supported, vcpu: 0, of: count).sorted(by: { ($0.function, $0.index) < ($1.function, $1.index) }) {
            // OSXSAVE/OSPKE mirror guest CR4 and differ by moment, not by host.
            mix(e.function); mix(e.index); mix(e.eax); mix(e.ebx); mix(e.function == 1 || e.function == 7 ? 0 : e.ecx); mix(e.edx)
        }
        return h
    }
}

extension Kvm {
    /// KVM_GET_SUPPORTED_CPUID.
    public func supportedCPUID() throws(KVMError) -> [CPUIDEntry] {
        var buf = [kvm_cpuid_entry2](repeating: kvm_cpuid_entry2(), count: 256)
        let n = ferry_kvm_supported_cpuid(fd, &buf, 256)
        if n < 0 { throw KVMError(.ioctl, "KVM_GET_SUPPORTED_CPUID", cause: SysError(errno: -n, call: "KVM_GET_SUPPORTED_CPUID")) }
        return buf[0..<Int(n)].map(CPUIDEntry.init)
    }
}

extension VCPU {
    /// KVM_SET_CPUID2.
    public func setCPUID(_ entries: [CPUIDEntry]) throws(KVMError) {
        let k = entries.map(\.kernel)
        let r = ferry_kvm_set_cpuid(fd, k, Int32(k.count))
        if r < 0 { throw KVMError(.ioctl, "KVM_SET_CPUID2", cause: SysError(errno: -r, call: "KVM_SET_CPUID2")) }
    }
}

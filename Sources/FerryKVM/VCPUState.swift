import CFerry
import FerrySys
import Glibc

/// Everything a vCPU needs to continue in another VM exactly where it stopped:
/// general and special registers, FPU/XSAVE, XCRs, the MSRs KVM saves, pending events,
/// debug registers and the MP state. Kernel structs are carried as raw bytes: source
/// and destination are both Ferry on x86_64 KVM, and each record is length-checked.
public struct VCPUState: Sendable, Equatable {
    public var regs: [UInt8]
    public var sregs: [UInt8]
    public var fpu: [UInt8]
    public var xsave: [UInt8]
    public var xcrs: [UInt8]
    public var msrs: [MSR]
    public var events: [UInt8]
    public var debugregs: [UInt8]
    public var mpState: [UInt8]

    public struct MSR: Sendable, Equatable {
        public var index: UInt32
        public var value: UInt64
    }

    public var rip: UInt64 { Self.load(regs, as: kvm_regs.self)?.rip ?? 0 }

    static func bytes<T>(of value: T) -> [UInt8] {
        withUnsafeBytes(of: value) { Array($0) }
    }

    static func load<T>(_ bytes: [UInt8], as: T.Type) -> T? {
        guard bytes.count == MemoryLayout<T>.size else { return nil }
        return bytes.withUnsafeBytes { $0.loadUnaligned(as: T.self) }
    }

    // MARK: wire form (version 1)

    public static let version: UInt32 = 1
    private enum Tag: UInt8 { case regs = 1, sregs, fpu, xsave, xcrs, msrs, events, debugregs, mpState }

    public func encoded() -> [UInt8] {
        var out: [UInt8] = []
        func put32(_ v: UInt32) { out += [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)] }
        func put64(_ v: UInt64) { put32(UInt32(v >> 32)); put32(UInt32(v & 0xffff_ffff)) }
        func rec(_ t: Tag, _ b: [UInt8]) { out.append(t.rawValue); put32(UInt32(b.count)); out += b }
        rec(.regs, regs); rec(.sregs, sregs); rec(.fpu, fpu); rec(.xsave, xsave); rec(.xcrs, xcrs)
        var m: [UInt8] = []
        swap(&m, &out)
        put32(UInt32(msrs.count))
        for e in msrs { put32(e.index); put64(e.value) }
        swap(&m, &out)
        rec(.msrs, m)
        rec(.events, events); rec(.debugregs, debugregs); rec(.mpState, mpState)
        return out
    }

    public enum DecodeError: Error, CustomStringConvertible, Sendable {
        case truncated, badRecord(UInt8, Int), missing(String)
        public var description: String {
            switch self {
            case .truncated: "vCPU state truncated"
            case let .badRecord(t, n): "vCPU state record \(t) has bad length \(n)"
            case let .missing(s): "vCPU state lacks \(s)"
            }
        }
    }

    public init(decoding bytes: [UInt8]) throws(DecodeError) {
        var i = 0
        func get32() throws(DecodeError) -> UInt32 {
            guard i + 4 <= bytes.count else { throw .truncated }
            defer { i += 4 }
            return UInt32(bytes[i]) << 24 | UInt32(bytes[i + 1]) << 16 | UInt32(bytes[i + 2]) << 8 | UInt32(bytes[i + 3])
        }
        var recs: [UInt8: [UInt8]] = [:]
        while i < bytes.count {
            let t = bytes[i]; i += 1
            let n = Int(try get32())
            guard n <= bytes.count - i else { throw .truncated }
            recs[t] = Array(bytes[i..<i + n]); i += n
        }
        func need(_ t: Tag, _ size: Int?) throws(DecodeError) -> [UInt8] {
            guard let b = recs[t.rawValue] else { throw .missing("\(t)") }
            if let s = size, b.count != s { throw .badRecord(t.rawValue, b.count) }
            return b
        }
        regs = try need(.regs, MemoryLayout<kvm_regs>.size)
        sregs = try need(.sregs, MemoryLayout<kvm_sregs>.size)
        fpu = try need(.fpu, MemoryLayout<kvm_fpu>.size)
        xsave = try need(.xsave, nil)
        xcrs = try need(.xcrs, MemoryLayout<kvm_xcrs>.size)
        events = try need(.events, MemoryLayout<kvm_vcpu_events>.size)
        debugregs = try need(.debugregs, MemoryLayout<kvm_debugregs>.size)
        mpState = try need(.mpState, MemoryLayout<kvm_mp_state>.size)
        let m = try need(.msrs, nil)
        guard m.count >= 4 else { throw .badRecord(Tag.msrs.rawValue, m.count) }
        let count = Int(UInt32(m[0]) << 24 | UInt32(m[1]) << 16 | UInt32(m[2]) << 8 | UInt32(m[3]))
        guard m.count == 4 + count * 12 else { throw .badRecord(Tag.msrs.rawValue, m.count) }
        msrs = (0..<count).map { k in
            let o = 4 + k * 12
            let idx = m[o..<o + 4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            let val = m[o + 4..<o + 12].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            return MSR(index: idx, value: val)
        }
    }

    public init(regs: [UInt8], sregs: [UInt8], fpu: [UInt8], xsave: [UInt8], xcrs: [UInt8], msrs: [MSR],
                events: [UInt8], debugregs: [UInt8], mpState: [UInt8]) {
        self.regs = regs; self.sregs = sregs; self.fpu = fpu; self.xsave = xsave; self.xcrs = xcrs
        self.msrs = msrs; self.events = events; self.debugregs = debugregs; self.mpState = mpState
    }
}

extension VCPU {
    private func get<T>(_ request: UInt, _ name: String, _ value: T) throws(KVMError) -> [UInt8] {
        try readRaw(fd, request, name, value)
    }

    /// Sets a record whose size the decoder checked (XSAVE's is the host's).
    private func set(_ request: UInt, _ name: String, _ bytes: [UInt8]) throws(KVMError) {
        var b = bytes
        let r = b.withUnsafeMutableBytes { ferry_ioctl_ptr(fd, request, $0.baseAddress) }
        if r < 0 { throw KVMError(.ioctl, name, cause: SysError(errno: -r, call: name)) }
    }

    private var xsaveSize: Int { max(4096, Int(vm.kvm.checkExtension(ferry_KVM_CAP_XSAVE2))) }

    /// IA32_TSC_DEADLINE: written after the local APIC, whose timer mode decides its meaning.
    static let tscDeadlineMSR: UInt32 = 0x6e0

    /// Captures the state. The vCPU must not be running (its thread parked after an EINTR
    /// return, so any pending I/O has completed).
    public func saveState() throws(KVMError) -> VCPUState {
        let regs = try get(ferry_KVM_GET_REGS, "KVM_GET_REGS", kvm_regs())
        let sregs = try get(ferry_KVM_GET_SREGS, "KVM_GET_SREGS", kvm_sregs())
        let fpu = try get(ferry_KVM_GET_FPU, "KVM_GET_FPU", kvm_fpu())
        var xsave = [UInt8](repeating: 0, count: xsaveSize)
        let useXsave2 = vm.kvm.checkExtension(ferry_KVM_CAP_XSAVE2) > 0
        let xr = xsave.withUnsafeMutableBytes { ferry_ioctl_ptr(fd, useXsave2 ? ferry_KVM_GET_XSAVE2 : ferry_KVM_GET_XSAVE, $0.baseAddress) }
        if xr < 0 { throw KVMError(.ioctl, "KVM_GET_XSAVE", cause: SysError(errno: -xr, call: "KVM_GET_XSAVE")) }
        let xcrs = try get(ferry_KVM_GET_XCRS, "KVM_GET_XCRS", kvm_xcrs())
        var values = [UInt64](repeating: 0, count: msrIndices.count)
        var msrs: [VCPUState.MSR] = []
        if !msrIndices.isEmpty {
            let n = ferry_kvm_get_msrs(fd, msrIndices, &values, Int32(msrIndices.count))
            if n < 0 { throw KVMError(.ioctl, "KVM_GET_MSRS", cause: SysError(errno: -n, call: "KVM_GET_MSRS")) }
            msrs = (0..<Int(n)).map { VCPUState.MSR(index: msrIndices[$0], value: values[$0]) }
        }
        let events = try get(ferry_KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", kvm_vcpu_events())
        let debugregs = try get(ferry_KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS", kvm_debugregs())
        let mp = try get(ferry_KVM_GET_MP_STATE, "KVM_GET_MP_STATE", kvm_mp_state())
        return VCPUState(regs: regs, sregs: sregs, fpu: fpu, xsave: xsave, xcrs: xcrs, msrs: msrs,
                         events: events, debugregs: debugregs, mpState: mp)
    }

    private func setMSRs(_ list: [VCPUState.MSR]) throws(KVMError) {
        guard !list.isEmpty else { return }
        let idx = list.map(\.index), vals = list.map(\.value)
        var done = 0
        // Skip an MSR this host refuses rather than lose the rest.
        while done < idx.count {
            let n = Int(ferry_kvm_set_msrs(fd, Array(idx[done...]), Array(vals[done...]), Int32(idx.count - done)))
            if n < 0 { throw KVMError(.ioctl, "KVM_SET_MSRS", cause: SysError(errno: Int32(-n), call: "KVM_SET_MSRS")) }
            done += n + 1
        }
    }

    /// Restores a state captured by `saveState()` on this or another VM, with the local
    /// APIC's (`lapicState()`) where the machine has in-kernel APICs. The order is KVM's
    /// and QEMU's: the APIC base (sregs) before the APIC page, the APIC before the TSC
    /// deadline, the MP state and the pending events last.
    public func restoreState(_ s: VCPUState, lapic: [UInt8]? = nil) throws(KVMError) {
        try set(ferry_KVM_SET_SREGS, "KVM_SET_SREGS", s.sregs)
        try set(ferry_KVM_SET_REGS, "KVM_SET_REGS", s.regs)
        // XCR0 decides which XSAVE components are valid, so it goes first.
        try set(ferry_KVM_SET_XCRS, "KVM_SET_XCRS", s.xcrs)
        try set(ferry_KVM_SET_FPU, "KVM_SET_FPU", s.fpu)
        var xs = s.xsave
        if xs.count < 4096 { xs += [UInt8](repeating: 0, count: 4096 - xs.count) }
        try set(ferry_KVM_SET_XSAVE, "KVM_SET_XSAVE", xs)
        try setMSRs(s.msrs.filter { $0.index != Self.tscDeadlineMSR })
        if let lapic { try restoreLAPIC(lapic) }
        try setMSRs(s.msrs.filter { $0.index == Self.tscDeadlineMSR })
        try set(ferry_KVM_SET_MP_STATE, "KVM_SET_MP_STATE", s.mpState)
        try set(ferry_KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", s.events)
        try set(ferry_KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS", s.debugregs)
    }

    /// KVM's MP state: 0 runnable, 1 waiting for INIT/SIPI, 2 INIT received, 3 halted, 4 SIPI received.
    public func mpState() throws(KVMError) -> UInt32 {
        let b = try get(ferry_KVM_GET_MP_STATE, "KVM_GET_MP_STATE", kvm_mp_state())
        return b.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
    }
}

import FerryMemory

/// What the two ends of a migration must agree on before any state moves: the vCPU
/// count, the RAM size (and so its layout around the hole below 4 GiB) and the CPUID
/// the vCPUs see. Sent first in a stream (section `ferry-machine`); a destination whose
/// shape differs refuses the stream at once.
public struct MachineShape: Sendable, Equatable, CustomStringConvertible {
    public static let maxMemory = 64 << 30
    public static let sectionName = "ferry-machine"
    public static let version: UInt32 = 1

    public let vcpus: Int
    public let memory: Int
    public let cpuidDigest: UInt64

    public init(vcpus: Int, memory: Int, cpuidDigest: UInt64) {
        self.vcpus = vcpus; self.memory = memory; self.cpuidDigest = cpuidDigest
    }

    public var description: String {
        let mappings = GuestMemory.pcMappings(size: memory)
            .map { "0x\(String($0.guestAddress, radix: 16))+\($0.length >> 20) MiB" }.joined(separator: ", ")
        return "\(vcpus) vCPU\(vcpus == 1 ? "" : "s"), \(memory >> 20) MiB RAM (\(mappings))"
    }

    public func encoded() -> [UInt8] {
        var out: [UInt8] = []
        func put64(_ v: UInt64) { for s in stride(from: 56, through: 0, by: -8) { out.append(UInt8(v >> UInt64(s) & 0xff)) } }
        put64(UInt64(vcpus)); put64(UInt64(memory)); put64(cpuidDigest)
        return out
    }

    public init(decoding b: [UInt8]) throws(MachineError) {
        guard b.count == 24 else { throw MachineError(.state, "machine shape of \(b.count) bytes (expected 24)") }
        func get64(_ o: Int) -> UInt64 { b[o..<o + 8].reduce(0) { $0 << 8 | UInt64($1) } }
        let v = get64(0), m = get64(8)
        guard v >= 1, v <= UInt64(Machine.maxVCPUs), m <= UInt64(Self.maxMemory) else {
            throw MachineError(.state, "machine shape out of range: \(v) vCPUs, \(m) bytes")
        }
        self.init(vcpus: Int(v), memory: Int(m), cpuidDigest: get64(16))
    }

    /// Why a stream from a machine shaped `source` cannot load into this one, or nil.
    public func refusal(of source: MachineShape) -> String? {
        if source.vcpus != vcpus || source.memory != memory {
            return "the source machine has \(source), this destination \(self): start the destination with the same --smp and --memory"
        }
        if source.cpuidDigest != cpuidDigest {
            return "the source's vCPUs see a different CPUID (digest \(String(source.cpuidDigest, radix: 16)), here \(String(cpuidDigest, radix: 16))): the guest would find another CPU after the move"
        }
        return nil
    }
}

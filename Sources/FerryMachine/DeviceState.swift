import FerryKVM

/// One device's migrated state: a section of the stream, named as QEMU names the same
/// device (`cpu` and `apic` per vCPU, `i8259` master and slave, `ioapic`, `i8254`,
/// `kvmclock`, `serial`). The blob is the kernel's or the device model's own record.
public struct DeviceSection: Sendable, Equatable {
    public let name: String
    public let instance: UInt32
    public let version: UInt32
    public let blob: [UInt8]
    public init(name: String, instance: UInt32, version: UInt32, blob: [UInt8]) {
        self.name = name; self.instance = instance; self.version = version; self.blob = blob
    }
}

extension Machine {
    /// Every device section a Ferry stream may carry, with its current version.
    public static let deviceSectionVersions: [String: UInt32] = [
        "cpu": VCPUState.version, "apic": 1, "i8259": 1, "ioapic": 1, "i8254": 1, "kvmclock": 1,
        "serial": SerialPort.stateVersion, MachineShape.sectionName: MachineShape.version,
    ]

    /// The whole machine's device state, in stream order. The machine must be paused
    /// (every vCPU parked): the kvmclock is read here, so the guest's clock stops at this
    /// moment and continues from it on the destination.
    public func saveDevices() throws(MachineError) -> [DeviceSection] {
        do {
            var out: [DeviceSection] = []
            for (i, v) in vcpus.enumerated() {
                out.append(DeviceSection(name: "cpu", instance: UInt32(i), version: VCPUState.version, blob: try v.saveState().encoded()))
                out.append(DeviceSection(name: "apic", instance: UInt32(i), version: 1, blob: try v.lapicState()))
            }
            out.append(DeviceSection(name: "i8259", instance: 0, version: 1, blob: try vm.irqchipState(.picMaster)))
            out.append(DeviceSection(name: "i8259", instance: 1, version: 1, blob: try vm.irqchipState(.picSlave)))
            out.append(DeviceSection(name: "ioapic", instance: 0, version: 1, blob: try vm.irqchipState(.ioapic)))
            out.append(DeviceSection(name: "i8254", instance: 0, version: 1, blob: try vm.pitState()))
            out.append(DeviceSection(name: "serial", instance: 0, version: SerialPort.stateVersion, blob: serial.saveState()))
            out.append(DeviceSection(name: "kvmclock", instance: 0, version: 1, blob: Self.be64(try vm.clockNanos())))
            return out
        } catch let e as KVMError {
            throw MachineError(.state, "cannot save the device state", cause: e)
        } catch {
            throw MachineError(.state, "cannot save the device state", cause: error)
        }
    }

    /// Restores what `saveDevices` saved on a machine of the same shape. Call before the
    /// vCPUs start; every device must be present exactly once. The clock is set last.
    public func restoreDevices(_ sections: [DeviceSection]) throws(MachineError) {
        var byKey: [String: DeviceSection] = [:]
        for s in sections {
            let key = "\(s.name)/\(s.instance)"
            guard byKey[key] == nil else { throw MachineError(.state, "device state \(s.name) instance \(s.instance) appears twice") }
            byKey[key] = s
        }
        func take(_ name: String, _ instance: Int = 0) throws(MachineError) -> [UInt8] {
            guard let s = byKey.removeValue(forKey: "\(name)/\(instance)") else {
                throw MachineError(.state, "the stream lacks the state of \(name) instance \(instance)")
            }
            return s.blob
        }
        do {
            let masterPIC = try take("i8259", 0), slavePIC = try take("i8259", 1), ioapic = try take("ioapic")
            let pit = try take("i8254"), serialState = try take("serial"), clock = try take("kvmclock")
            var cpus: [(VCPUState, [UInt8])] = []
            for i in vcpus.indices { cpus.append((try VCPUState(decoding: try take("cpu", i)), try take("apic", i))) }
            if let extra = byKey.values.first {
                throw MachineError(.state, "device state \(extra.name) instance \(extra.instance) has no device here (this machine: \(shape))")
            }
            guard clock.count == 8 else { throw MachineError(.state, "kvmclock state of \(clock.count) bytes") }
            try vm.restoreIrqchip(.picMaster, masterPIC)
            try vm.restoreIrqchip(.picSlave, slavePIC)
            try vm.restoreIrqchip(.ioapic, ioapic)
            try vm.restorePIT(pit)
            for (v, (cpu, lapic)) in zip(vcpus, cpus) { try v.restoreState(cpu, lapic: lapic) }
            try serial.restoreState(serialState)
            let nanos = clock.reduce(0) { $0 << 8 | UInt64($1) }
            try vm.setClock(nanos: nanos)
            core.restoredClock(nanos)
        } catch let e as MachineError {
            throw e
        } catch {
            throw MachineError(.state, "cannot restore the device state", cause: error)
        }
    }

    /// After `restoreDevices` and `start`: how far the guest clock moved past the value the
    /// source stopped it at, in µs (nil if no state was restored).
    public func guestClockGapUs() -> Double? {
        guard let from = core.restoredClockNanos, let now = try? vm.clockNanos() else { return nil }
        return (Double(now) - Double(from)) / 1000
    }

    static func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(v >> UInt64(56 - 8 * $0) & 0xff) } }
}

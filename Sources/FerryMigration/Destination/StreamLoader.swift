import CFerry
import FerryKVM
import FerryMachine
import FerryMemory
import FerrySys
import FerryWire
import Glibc

/// Loading the source's stream on the destination's main thread: precopy RAM straight into
/// guest RAM, the device state, the commands, and the postcopy package (LISTEN, device
/// state, RUN). Which item is legal when is the phase's legality table
/// (`DestinationPhase.acceptedItems`); this file only says what each item does.
extension IncomingMigration {
    enum LoadResult { case precopy([DeviceSection], SwitchoverTimeline), postcopy(StreamDecoder) }

    /// Loads a stream up to its end (precopy: the device state found before EOF) or up to
    /// the postcopy RUN (the guest runs here from then on; the decoder carries on).
    func load(_ ch: MigrationChannel) throws -> LoadResult {
        let decoder = StreamDecoder(source: ch, layout: layout, devices: Machine.deviceSectionVersions)
        try decoder.readFileHeader()
        // Until a POSTCOPY_ADVISE says otherwise (it comes before any page).
        for b in machine.memory.blocks { b.useHugePages(true) }
        // Pages with nothing behind them read as zero: a ZERO record for one needs no write
        // (and no read, which would fault it in).
        let populated = machine.memory.blocks.map { PopulatedPages($0) }
        // Fresh RAM faulted in ahead of the pages written (precopy only: see Prefaulter).
        let prefault = PrefaultAhead(machine.memory.blocks)
        defer { prefault.stop() }
        var devices: [DeviceSection] = []
        var sawRAMSetup = false
        // From the RAM END section (the source has stopped the guest) to the guest running.
        var timeline: SwitchoverTimeline?
        while true {
            let item = try decoder.nextItem()
            try currentPhase.check(item)
            switch item {
            case .configuration(let machineType):
                guard machineType == Wire.machineType else {
                    // QEMU's machines are pc-*, q35, microvm, ...: their device sections are not Ferry's.
                    throw WireError(.badMachine, "source machine type \"\(machineType)\" differs from ours (\"\(Wire.machineType)\"): "
                                    + "Ferry loads streams from Ferry only; a QEMU stream (same framing) carries QEMU's devices")
                }
            case .section(let h) where h.name == Wire.ramSectionName:
                if h.type == .start { sawRAMSetup = true }
                guard sawRAMSetup else { throw WireError(.badSectionID, "RAM pages before the RAM setup section") }
                if h.type == .end { timeline = SwitchoverTimeline(start: Sys.monotonicNanos()) }
                try loadRAM(decoder, ch, populated: populated, prefault: prefault)
                try decoder.readFooter(expecting: h.id)
                if h.type == .end { timeline?.mark("ram", now: Sys.monotonicNanos()) }
            case .section(let h):
                // validated by the decoder: a device section this machine has
                if let d = try readDevice(h, decoder) { devices.append(d) }
            case .command(.packaged(let length)):
                guard postcopyAdvised else { throw MigrationError(.protocolError, "PACKAGED without POSTCOPY_ADVISE") }
                guard length <= 16_777_216 else { throw WireError(.badLength, "postcopy package of \(length) bytes") }
                var t = switchoverTimeline ?? SwitchoverTimeline(start: Sys.monotonicNanos())
                if switchoverTimeline != nil { t.mark("final-discards", now: Sys.monotonicNanos()) }
                let blob = try ch.bytes(Int(length))
                t.mark("read", now: Sys.monotonicNanos())
                try advance(.packageOpened)
                try loadPackage(blob, timeline: t)
                return .postcopy(decoder)
            case .command(let c):
                try handleCommand(c, ch)
            case .eof:
                guard !devices.isEmpty else { throw WireError(.truncated, "the stream ended without the device state") }
                try checkVMDescription(decoder, devices)
                var t = timeline ?? SwitchoverTimeline(start: Sys.monotonicNanos())
                t.mark("device-state", now: Sys.monotonicNanos())
                return .precopy(devices, t)
            }
        }
    }

    /// Reads the VM description after EOF (as QEMU's destination does, so the source's last
    /// bytes are consumed) and checks it describes exactly the whole sections received.
    private func checkVMDescription(_ decoder: StreamDecoder, _ devices: [DeviceSection]) throws {
        guard let json = try decoder.readVMDescription() else { return }
        let shape = machine.shape.encoded()
        let expected = VMDescription(sections: [VMDescription.Section(name: MachineShape.sectionName, instance: 0, version: MachineShape.version, blobSize: shape.count)]
            + devices.map { VMDescription.Section(name: $0.name, instance: $0.instance, version: $0.version, blobSize: $0.blob.count) })
        guard json == expected.json else {
            throw MigrationError(.protocolError, "the VM description after EOF does not describe the sections received (\(json.count) bytes)")
        }
    }

    /// Reads one device section. The machine's shape is checked at once (nil returned): a
    /// stream from a machine shaped otherwise is refused before any of its RAM is loaded.
    private func readDevice(_ h: SectionHeader, _ decoder: StreamDecoder) throws -> DeviceSection? {
        let blob = try decoder.readDeviceBlob()
        try decoder.readFooter(expecting: h.id)
        guard h.name == MachineShape.sectionName else {
            return DeviceSection(name: h.name, instance: h.instance, version: h.version, blob: blob)
        }
        if let why = machine.shape.refusal(of: try MachineShape(decoding: blob)) {
            throw MigrationError(.config, "machine mismatch: \(why)")
        }
        return nil
    }

    private func handleCommand(_ c: Command, _ ch: MigrationChannel) throws {
        switch c {
        case .openReturnPath:
            guard ch.isSocket else { throw MigrationError(.protocolError, "return path requested on a one-way channel") }
            if !returnPath.isOpen { returnPath.attach(ch) }
        case .ping(let v):
            guard returnPath.isOpen else { throw MigrationError(.protocolError, "PING without a return path") }
            returnPath.send { $0.rpPong(v) }
            if v == Wire.pingEarlyDiscards { switchoverTimeline = SwitchoverTimeline(start: Sys.monotonicNanos()) }
        case .switchoverStart:
            break
        case let .postcopyAdvise(summary, target):
            guard capabilities.contains(.postcopyRAM) else {
                throw MigrationError(.config, "the source wants postcopy but capability postcopy-ram is off on the destination")
            }
            guard summary == UInt64(Wire.pageSize), target == UInt64(Wire.pageSize) else {
                throw MigrationError(.protocolError, "postcopy page sizes \(summary)/\(target) differ from ours (\(Wire.pageSize))")
            }
            postcopyAdvised = true
            for b in machine.memory.blocks { b.useHugePages(false) }
        case let .ramDiscard(b, ranges):
            guard postcopyAdvised else { throw MigrationError(.protocolError, "RAM_DISCARD outside the postcopy switchover") }
            let block = machine.memory.blocks[b]
            for r in ranges {
                // Stale pages go back to "missing", so the guest faults and asks for the new copy.
                let start = Int(r.lowerBound), count = Int(r.upperBound - r.lowerBound)
                madvise(block.host + start, count, MADV_DONTNEED)
                for p in (start >> Wire.pageShift)..<((start + count) >> Wire.pageShift) { received.clear(p) }
            }
        default:
            // The legality table let it through: a phase accepts only what this handles.
            throw MigrationError(.protocolError, "command \(c) is not valid in a precopy stream")
        }
    }

    private func loadRAM(_ decoder: StreamDecoder, _ ch: MigrationChannel, populated: [PopulatedPages], prefault: PrefaultAhead) throws {
        let blocks = machine.memory.blocks
        while true {
            switch try decoder.nextRAMRecord() {
            case .eos: return
            case .memSize: continue // validated against our layout by the decoder
            case let .page(b, offset):
                if !postcopyAdvised { prefault.wrote(block: b, Int(offset)) }
                // Straight into guest RAM; the decoder checked the offset is inside the block.
                try ch.readExactly(UnsafeMutableRawBufferPointer(start: blocks[b].host + Int(offset), count: Wire.pageSize))
                received.set(Int(offset >> UInt64(Wire.pageShift)))
            case let .zero(b, offset):
                let p = blocks[b].host + Int(offset)
                let page = Int(offset >> UInt64(Wire.pageShift))
                // With postcopy ahead, a zero page must be populated: a page marked received
                // but missing would fault later and never be asked for (QEMU 10.1's fix).
                if postcopyAdvised {
                    p.initializeMemory(as: UInt8.self, repeating: 0, count: Wire.pageSize)
                } else if try received.test(page) || populated[b].mayHoldData(page), ferry_page_is_zero(p) == 0 {
                    p.initializeMemory(as: UInt8.self, repeating: 0, count: Wire.pageSize)
                }
                received.set(page)
            case let .xbzrle(b, offset, length):
                // The delta applies to the page as it is here (what the source sent before).
                try withUnsafeTemporaryAllocation(byteCount: Wire.pageSize, alignment: 8) { encoded in
                    let data = UnsafeMutableRawBufferPointer(rebasing: encoded[0..<length])
                    try ch.readExactly(data)
                    try XBZRLE.decode(UnsafeRawBufferPointer(data), into: blocks[b].host + Int(offset), count: Wire.pageSize)
                }
                received.set(Int(offset >> UInt64(Wire.pageShift)))
            case .multifdFlush:
                guard let multifd else { throw MigrationError(.protocolError, "a multifd flush in the stream, but capability multifd is off here") }
                try multifd.flush()
            }
        }
    }

    /// The package: LISTEN, device state, RUN, as one nested stream.
    private func loadPackage(_ blob: [UInt8], timeline: SwitchoverTimeline) throws {
        var timeline = timeline
        let decoder = StreamDecoder(source: ByteArraySource(blob), layout: layout, devices: Machine.deviceSectionVersions)
        var devices: [DeviceSection] = []
        var pongWhenRunning = false
        while true {
            let item: StreamItem
            do { item = try decoder.nextItem() } catch let e as WireError where e.code == .truncated {
                throw MigrationError(.protocolError, "postcopy package ended without RUN", cause: e)
            }
            try currentPhase.check(item)
            switch item {
            case .command(.postcopyListen):
                try listen()
                timeline.mark("listen", now: Sys.monotonicNanos())
            case .command(.ping(let v)):
                // PING 0x42 is answered once the guest runs (below): until then the source may
                // still run it there.
                if v == Wire.pingPackagedLoaded { pongWhenRunning = true } else { returnPath.send { $0.rpPong(v) } }
            case .command(.postcopyRun):
                guard !devices.isEmpty else { throw MigrationError(.protocolError, "POSTCOPY_RUN before the device state") }
                timeline.mark("device-state", now: Sys.monotonicNanos())
                try machine.restoreDevices(devices)
                timeline.mark("restore", now: Sys.monotonicNanos())
                try machine.start()
                timeline.mark("start", now: Sys.monotonicNanos())
                let gap = machine.guestClockGapUs()
                updateStats { $0.guestClockGapUs = gap; $0.switchover = timeline }
                host.setRunState(.running)
                host.emit(.resume)
                // The guest runs here now: tell the source (its downtime ends; it may no
                // longer resume the guest there). Page requests flow from here on.
                guard pongWhenRunning else { throw MigrationError(.protocolError, "postcopy package without PING 0x42 before RUN") }
                returnPath.send { $0.rpPong(Wire.pingPackagedLoaded) }
                try advance(.run)
                // Faults between the start and here were recorded but not yet asked for.
                for p in returnPath.sendDeferred(block: machine.ram.name) { faults.requested(page: p) }
                return
            case .section(let h):
                if let d = try readDevice(h, decoder) { devices.append(d) }
            default:
                throw MigrationError(.protocolError, "unexpected item in the postcopy package")
            }
        }
    }

    /// Arms userfaultfd on all guest RAM, starts the fault thread and, with
    /// postcopy-preempt, accepts the urgent-page channel.
    private func listen() throws {
        let service = try FaultService(block: machine.ram)
        lock.withLock { faultService = service }
        try advance(.listen)
        try service.start { [self] in faultLoop(service) }
        if capabilities.contains(.postcopyPreempt) { try acceptUrgentChannel(on: listener, uffd: service.uffd) }
    }
}

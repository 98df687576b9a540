// Fuzz target (libFuzzer, built by Fuzz/run.sh with -D FUZZING) and regression replay
// (the test suite runs every seed and regression input through `run`): the destination's
// stream decoder on arbitrary bytes. It loads like the destination does (header,
// sections, RAM records, commands, packaged sub-streams) and checks the decoder's
// contract: every page or zero record and every discard range lies inside the RAM
// layout; nothing but WireError escapes. A violation is a crash.
#if !FUZZING
import FerryWire
#endif

enum StreamFuzzTarget {
    static let layout = RAMLayout(blocks: [.init(name: "pc.ram", length: 1 << 20), .init(name: "vga.vram", length: 64 << 10)])

    static func checkInside(_ block: Int, _ offset: UInt64) {
        precondition(block >= 0 && block < layout.blocks.count, "block index \(block) outside the layout")
        precondition(offset % 4096 == 0 && offset + 4096 <= layout.blocks[block].length, "page \(offset) outside \(layout.blocks[block].name)")
    }

    static func load(_ source: ByteArraySource, depth: Int, header: Bool) throws {
        let d = StreamDecoder(source: source, layout: layout)
        if header { try d.readFileHeader() }
        var items = 0
        while items < 10_000 {
            items += 1
            switch try d.nextItem() {
            case .eof: return
            case .configuration: continue
            case .section(let h) where h.name == Wire.ramSectionName:
                var records = 0
                loop: while records < 100_000 {
                    records += 1
                    switch try d.nextRAMRecord() {
                    case .eos: break loop
                    case .memSize(let blocks): precondition(blocks.count <= layout.blocks.count)
                    case let .page(b, off):
                        checkInside(b, off)
                        _ = try source.bytes(4096)
                    case let .zero(b, off): checkInside(b, off)
                    case .multifdFlush: continue
                    case let .xbzrle(b, off, length):
                        checkInside(b, off)
                        precondition(length <= 4096)
                        var page = [UInt8](repeating: 0, count: 4096)
                        let delta = try source.bytes(length)
                        let covered = try delta.withUnsafeBytes { d in try page.withUnsafeMutableBytes { try XBZRLE.decode(d, into: $0.baseAddress!, count: 4096) } }
                        precondition(covered <= 4096)
                    }
                }
                try d.readFooter(expecting: h.id)
            case .section(let h):
                let blob = try d.readDeviceBlob()
                precondition(blob.count <= StreamDecoder.maxDeviceBlob)
                try d.readFooter(expecting: h.id)
            case .command(let c):
                switch c {
                case let .ramDiscard(b, ranges):
                    for r in ranges { precondition(b < layout.blocks.count && r.upperBound <= layout.blocks[b].length) }
                case .packaged(let length):
                    guard depth < 2, length <= 1 << 20 else { throw WireError(.badLength, "package") }
                    try load(ByteArraySource(try source.bytes(Int(length))), depth: depth + 1, header: false)
                case .recvBitmap(let name): precondition(layout.index(of: name) != nil)
                default: continue
                }
            }
        }
    }

    static func run(_ bytes: [UInt8]) {
        do { try load(ByteArraySource(bytes), depth: 0, header: true) } catch is WireError {} catch {
            preconditionFailure("the decoder threw a non-WireError: \(error)")
        }
    }
}

#if FUZZING
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    StreamFuzzTarget.run(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}
#endif

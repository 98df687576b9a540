// Writes the seed corpus (Fuzz/seeds/) from the real encoder: valid streams, return-path
// messages and QMP commands, so fuzzing starts deep in each format.
// Build and run: swiftc -parse-as-library Sources/FerryWire/*.swift Fuzz/MakeSeeds.swift -o /tmp/seeds && /tmp/seeds Fuzz/seeds
import Foundation

@main
struct MakeSeeds {
    static func write(_ dir: String, _ name: String, _ bytes: [UInt8]) {
        FileManager.default.createFile(atPath: "\(dir)/\(name)", contents: Data(bytes))
    }

    static func main() {
        let root = CommandLine.arguments.count > 1 ? CommandLine.arguments[1] : "Fuzz/seeds"
        // Precopy stream: header, configuration, RAM setup, pages, CPU section, EOF.
        func precopy(package: Bool) -> [UInt8] {
            var w = WireBuffer()
            w.fileHeader(); w.configuration(); w.command(.openReturnPath); w.ping(1)
            w.sectionHeader(.start, id: 0, name: Wire.ramSectionName, version: 4)
            w.ramMemSize(blocks: [("pc.ram", 1 << 20), ("vga.vram", 64 << 10)])
            w.ramEOS(); w.footer(id: 0)
            w.sectionShort(.part, id: 0)
            w.ramRecord(offset: 0, flags: .page, block: "pc.ram"); w.append([UInt8](repeating: 0x5a, count: 4096))
            w.ramRecord(offset: 4096, flags: .zero, block: nil); w.u8(0)
            w.ramRecord(offset: 0, flags: .zero, block: "vga.vram"); w.u8(0)
            w.ramEOS(); w.footer(id: 0)
            if package {
                w.postcopyAdvise()
                var p = WireBuffer()
                p.command(.postcopyListen)
                p.sectionHeader(.full, id: 1, name: Wire.cpuSectionName, version: 1)
                p.be32(4); p.append([1, 2, 3, 4]); p.footer(id: 1)
                p.command(.postcopyRun)
                w.ramDiscard(block: "pc.ram", ranges: [(0, 8192)])
                w.packaged(length: UInt32(p.bytes.count)); w.append(p.bytes)
                w.sectionShort(.part, id: 0)
                w.ramRecord(offset: 8192, flags: .page, block: "pc.ram"); w.append([UInt8](repeating: 1, count: 4096))
                w.ramEOS(); w.footer(id: 0)
                w.recvBitmapRequest(block: "pc.ram")
                w.command(.postcopyResume)
            } else {
                w.sectionShort(.end, id: 0); w.ramEOS(); w.footer(id: 0)
                w.sectionHeader(.full, id: 1, name: Wire.cpuSectionName, version: 1)
                w.be32(4); w.append([1, 2, 3, 4]); w.footer(id: 1)
            }
            w.eof()
            return w.bytes
        }
        write("\(root)/stream", "precopy.bin", precopy(package: false))
        write("\(root)/stream", "postcopy.bin", precopy(package: true))

        var rp = WireBuffer()
        rp.rpPong(1); rp.rpRequestPages(block: "pc.ram", offset: 4096, length: 4096); rp.rpRequestPages(block: nil, offset: 8192, length: 8192)
        rp.rpReceivedBitmap(block: "pc.ram", bitmap: [UInt8](repeating: 0xf0, count: 32))
        rp.rpResumeAck(); rp.rpShut(0)
        write("\(root)/return-path", "session.bin", rp.bytes)
        var one = WireBuffer(); one.rpRequestPages(block: "pc.ram", offset: 1 << 20, length: 4096)
        write("\(root)/return-path", "out-of-range.bin", one.bytes)

        let qmp = [
            #"{"execute":"qmp_capabilities"}"#,
            #"{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:4444"},"id":1}"#,
            #"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":125000000,"tls-creds":"tls0"}}"#,
            #"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"postcopy-ram","state":true}]}}"#,
            #"{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"tls0","dir":"/tmp","endpoint":"server"}}"#,
            #"{"exec-oob":"migrate-pause","id":"x"} {"execute":"query-migrate"}"#,
            #"{"execute":"query-status","arguments":[1,2,{"a":"\"}\\"}]}"#,
        ]
        for (i, q) in qmp.enumerated() { write("\(root)/qmp", "cmd\(i).json", Array(q.utf8)) }
    }
}

import Foundation
import Glibc
import Testing
@testable import FerryMachine
@testable import FerryMigration
@testable import FerryWire

/// A Ferry `file:` stream read the way QEMU's `scripts/analyze-migration.py` reads one: the
/// VM description found from the end of the file, every whole section walked with the
/// description's fields, the RAM records decoded, `pc.ram` extracted. Our own reader of the
/// same rules, so a stream the script would stop on fails here.
@Suite("VM description (analyze-migration.py's view)")
struct VMDescriptionTests {
    struct Reader {
        let data: [UInt8]
        var at = 0
        mutating func u8() throws -> UInt8 { guard at < data.count else { throw WireError(.truncated, "end at \(at)") }; at += 1; return data[at - 1] }
        mutating func be(_ n: Int) throws -> UInt64 { var v: UInt64 = 0; for _ in 0..<n { v = v << 8 | UInt64(try u8()) }; return v }
        mutating func bytes(_ n: Int) throws -> ArraySlice<UInt8> {
            guard at + n <= data.count else { throw WireError(.truncated, "\(n) bytes at \(at)") }
            at += n; return data[(at - n)..<at]
        }
        mutating func str() throws -> String { String(decoding: try bytes(Int(try u8())), as: UTF8.self) }
    }

    /// The script's search: the last NUL of the last 10 MB, the first '{' after it, 0x06 and
    /// a be32 length five bytes before.
    static func findDescription(_ d: [UInt8]) throws -> [String: Any] {
        let tail = max(0, d.count - 10 << 20)
        let nul = try #require(d[tail...].lastIndex(of: 0))
        let brace = try #require(d[nul...].firstIndex(of: UInt8(ascii: "{")))
        #expect(d[brace - 5] == 0x06, "no QEMU_VM_VMDESCRIPTION before the JSON")
        let n = Int(d[brace - 4]) << 24 | Int(d[brace - 3]) << 16 | Int(d[brace - 2]) << 8 | Int(d[brace - 1])
        #expect(brace + n == d.count, "the description is the end of the stream")
        return try #require(try JSONSerialization.jsonObject(with: Data(d[brace..<(brace + n)])) as? [String: Any])
    }

    /// A 64 MiB 2-vCPU test guest saved to `path` while stopped (the RAM stays as saved).
    static func save(to path: String) throws -> VMHost {
        let src = try VMHost.forTest(memory: 64 << 20, vcpus: 2, incoming: false)
        defer { stopInBackground([src]) }
        try src.machine.loadTestGuest()
        try src.cont()
        #expect(waitForPasses(src.machine, 2))
        src.setParameters { $0.maxBandwidth = 0 }
        src.stop()
        try src.migrate(uri: "file:\(path)")
        #expect(src.waitForMigration(seconds: scaled(60)) == .completed, "\(src.queryMigrate().errorDescription ?? "")")
        return src
    }

    @Test("a file: stream carries a VM description after EOF; walking it by the description extracts pc.ram equal to the guest's memory")
    func fileStreamWalk() throws {
        let path = "/tmp/ferry-test-vmdesc-\(getpid()).mig"
        defer { unlink(path) }
        let src = try Self.save(to: path)
        let data = Array(try Data(contentsOf: URL(fileURLWithPath: path)))

        let desc = try Self.findDescription(data)
        #expect(desc["page_size"] as? Int == 4096)
        let devices = try #require(desc["devices"] as? [[String: Any]])
        let names = devices.compactMap { $0["name"] as? String }
        #expect(names.first == MachineShape.sectionName)
        for n in ["cpu", "apic", "i8259", "ioapic", "i8254", "serial", "kvmclock"] { #expect(names.contains(n), "\(n) is described: \(names)") }
        #expect(names.filter { $0 == "cpu" }.count == 2 && names.filter { $0 == "apic" }.count == 2, "one cpu and apic per vCPU")
        var byKey: [String: [String: Any]] = [:]
        for d in devices { byKey["\(d["name"]!)/\(d["instance_id"]!)"] = d; #expect(d["fields"] is [[String: Any]]) }

        // The walk, as the script's MigrationDump.read with write_memory.
        var r = Reader(data: data)
        #expect(try r.be(4) == 0x5145_564d && r.be(4) == 3)
        var ram = [UInt8](repeating: 0xee, count: src.machine.ram.length)
        var ramID: UInt32?
        var lastID: UInt32 = 0
        var walked: [String] = []
        func readRAM(_ r: inout Reader) throws {
            while true {
                let v = try r.be(8)
                var flags = v & 0xfff
                let addr = Int(v & ~0xfff)
                if flags & 0x04 != 0 {
                    var total = addr
                    while total > 0 { _ = try r.str(); total -= Int(try r.be(8)) }
                    flags &= ~0x04
                }
                if flags & 0x02 != 0 {
                    if flags & 0x20 == 0 { #expect(try r.str() == "pc.ram") }
                    #expect(try r.u8() == 0)
                    ram.withUnsafeMutableBufferPointer { p in for i in addr..<(addr + 4096) { p[i] = 0 } }
                    flags &= ~0x22
                } else if flags & 0x08 != 0 {
                    if flags & 0x20 == 0 { #expect(try r.str() == "pc.ram") }
                    let page = try r.bytes(4096)
                    ram.replaceSubrange(addr..<(addr + 4096), with: page)
                    flags &= ~0x28
                }
                if flags & 0x10 != 0 { return }
                #expect(flags == 0, "unknown RAM flags \(flags)")
                if flags != 0 { throw WireError(.badFlags, "\(flags)") }
            }
        }
        loop: while true {
            let t = try r.u8()
            switch t {
            case 0x00: break loop
            case 0x07: _ = try r.bytes(Int(try r.be(4)))
            case 0x01, 0x04:
                lastID = UInt32(try r.be(4))
                let name = try r.str()
                let instance = try r.be(4)
                let version = try r.be(4)
                if name == "ram" {
                    #expect(instance == 0 && version == 4)
                    ramID = lastID
                    try readRAM(&r)
                } else {
                    let d = try #require(byKey["\(name)/\(instance)"], "section \(name) (\(instance)) is in the description")
                    #expect(d["version"] as? Int == Int(version))
                    for f in try #require(d["fields"] as? [[String: Any]]) {
                        let size = try #require(f["size"] as? Int)
                        let value = try r.bytes(size)
                        if f["name"] as? String == "length" {
                            let blob = (d["fields"] as! [[String: Any]]).last!["size"] as! Int
                            #expect(value.reduce(0) { $0 << 8 | Int($1) } == blob)
                        }
                    }
                    walked.append(name)
                }
            case 0x02, 0x03:
                lastID = UInt32(try r.be(4))
                #expect(lastID == ramID)
                try readRAM(&r)
            case 0x7e: #expect(UInt32(try r.be(4)) == lastID, "section footer")
            default: Issue.record("section type \(t) at \(r.at - 1): the script stops here"); return
            }
        }
        #expect(walked == names, "every whole section, in the order described")
        #expect(try r.u8() == 0x06)

        // pc.ram as extracted equals the guest's memory (the source stays stopped).
        let same = ram.withUnsafeBytes { memcmp($0.baseAddress!, src.machine.ram.host, ram.count) == 0 }
        #expect(same, "the extracted pc.ram equals the source guest's RAM")

        // And Ferry's own destination reads and checks it.
        let dst = try VMHost.forTest(memory: 64 << 20, vcpus: 2, incoming: true)
        defer { stopInBackground([dst]) }
        try dst.migrateIncoming(uri: "exec:cat \(path)")
        #expect(dst.waitForMigration(seconds: scaled(30)) == .completed, "\(dst.queryMigrate().errorDescription ?? "")")
    }

    @Test("a description that does not match the sections, or bytes after EOF that are none, fail the load with the reason; a stream without one loads")
    func destinationChecks() throws {
        let path = "/tmp/ferry-test-vmdesc-bad-\(getpid()).mig"
        defer { unlink(path) }
        _ = try Self.save(to: path)
        let good = Array(try Data(contentsOf: URL(fileURLWithPath: path)))
        let brace = try #require(good.lastIndex(of: 0).flatMap { n in good[n...].firstIndex(of: UInt8(ascii: "{")) })
        let eof = brace - 6
        #expect(good[eof] == 0 && good[eof + 1] == 0x06)
        var tampered = good
        if let k = tampered[brace...].firstIndex(of: UInt8(ascii: "1")) { tampered[k] = UInt8(ascii: "2") }
        let cases: [(String, [UInt8], String?)] = [
            ("tampered", tampered, "VM description"),
            ("garbage after EOF", Array(good[...eof]) + [0x42], "after EOF"),
            ("no description", Array(good[...eof]), nil),
        ]
        for (label, bytes, error) in cases {
            #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
            let dst = try VMHost.forTest(memory: 64 << 20, vcpus: 2, incoming: true)
            defer { stopInBackground([dst]) }
            try dst.migrateIncoming(uri: "exec:cat \(path)")
            let status = dst.waitForMigration(seconds: scaled(30))
            if let error {
                #expect(status == .failed, "\(label)")
                #expect(dst.queryMigrate().errorDescription?.contains(error) == true, "\(label): \(dst.queryMigrate().errorDescription ?? "")")
            } else {
                #expect(status == .completed, "\(label): \(dst.queryMigrate().errorDescription ?? "")")
            }
        }
    }
}

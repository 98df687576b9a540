/// QEMU's `QEMU_VM_VMDESCRIPTION`, written after `QEMU_VM_EOF` when a precopy stream ends:
/// 0x06, be32 length, JSON describing every whole (FULL) section and its fields, so tools
/// such as QEMU's `scripts/analyze-migration.py` can walk a stream without knowing the
/// devices. Ferry's device sections are `uint32` length + `buffer`, described as such.
public struct VMDescription: Sendable, Equatable {
    public struct Section: Sendable, Equatable {
        public let name: String
        public let instance: UInt32
        public let version: UInt32
        public let blobSize: Int
        public init(name: String, instance: UInt32, version: UInt32, blobSize: Int) {
            self.name = name; self.instance = instance; self.version = version; self.blobSize = blobSize
        }
    }

    public let pageSize: Int
    public let sections: [Section]
    public init(pageSize: Int = Wire.pageSize, sections: [Section]) { self.pageSize = pageSize; self.sections = sections }

    /// Largest description a destination reads.
    public static let maxLength = 1 << 24

    /// The JSON text, in QEMU's shape (`page_size`, `devices` with `name`, `instance_id`,
    /// `vmsd_name`, `version`, `fields` of `name` / `type` / `size`).
    public var json: [UInt8] {
        func str(_ s: String) -> String {
            var o = "\""
            for u in s.unicodeScalars {
                switch u {
                case "\"": o += "\\\""
                case "\\": o += "\\\\"
                case _ where u.value < 0x20: o += "\\u" + String(repeating: "0", count: 4 - String(u.value, radix: 16).count) + String(u.value, radix: 16)
                default: o.unicodeScalars.append(u)
                }
            }
            return o + "\""
        }
        let devices = sections.map { s in
            "{\"name\": \(str(s.name)), \"instance_id\": \(s.instance), \"vmsd_name\": \(str(s.name)), \"version\": \(s.version), "
                + "\"fields\": [{\"name\": \"length\", \"type\": \"uint32\", \"size\": 4}, {\"name\": \"state\", \"type\": \"buffer\", \"size\": \(s.blobSize)}]}"
        }
        var text = "{\"page_size\": \(pageSize), \"devices\": [\(devices.joined(separator: ", "))]}"
        // The script finds the JSON as the first '{' after the last NUL near the end of the
        // file: a length byte that is '{' would mislead it, so pad the text past it.
        while Self.lengthBytes(text.utf8.count).contains(UInt8(ascii: "{")) { text += " " }
        return Array(text.utf8)
    }

    static func lengthBytes(_ n: Int) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: n >> (24 - 8 * $0)) } }
}

extension WireBuffer {
    /// 0x06, be32 length, the JSON.
    public mutating func vmDescription(_ d: VMDescription) {
        let j = d.json
        u8(SectionType.vmDescription.rawValue)
        be32(UInt32(j.count))
        append(j)
    }
}

extension StreamDecoder {
    /// What follows `QEMU_VM_EOF`: the VM description's JSON, or nil when the stream ends
    /// there (a source that suppresses it). Anything else after EOF is an error.
    public func readVMDescription() throws -> [UInt8]? {
        let t: UInt8
        // The stream may end here however its transport says so (EOF, a closed pipe): all
        // state has arrived, so, as QEMU, a missing description does not fail the load.
        do { t = try source.u8() } catch { return nil }
        guard t == SectionType.vmDescription.rawValue else {
            throw WireError(.unknownSection, "section type 0x\(String(t, radix: 16)) after EOF (only a VM description may follow)")
        }
        let n = Int(try source.be32())
        guard n <= VMDescription.maxLength else { throw WireError(.badLength, "VM description of \(n) bytes (limit \(VMDescription.maxLength))") }
        return try source.bytes(n)
    }
}

// libFuzzer target: the QMP input path (FerryQMP's JSONStreamSplitter + QMPRequest) on
// arbitrary bytes, fed in two chunks split where the input says. Checks: no value longer
// than the limit comes out; every request parses or fails with a QMPError; a value the
// splitter emits starts with { or [ and ends with } or ].

import Foundation

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    var splitter = JSONStreamSplitter(maxLength: 4096)
    let cut = bytes.isEmpty ? 0 : Int(bytes[0]) % (bytes.count + 1)
    for chunk in [bytes[..<cut], bytes[cut...]] {
        for out in splitter.feed(chunk) {
            guard case .value(let v) = out else { continue }
            precondition(v.count <= 4096, "a value of \(v.count) bytes passed a 4096-byte limit")
            precondition((v.first == UInt8(ascii: "{") || v.first == UInt8(ascii: "[")) && (v.last == UInt8(ascii: "}") || v.last == UInt8(ascii: "]")))
            switch QMPRequest.parse(v) {
            case .success(let r): precondition(!r.name.isEmpty || r.name.isEmpty)
            case .failure(let f): precondition(!f.error.desc.isEmpty)
            }
        }
    }
    return 0
}

// Fuzz target (libFuzzer, built by Fuzz/run.sh with -D FUZZING) and regression replay:
// the QMP input path (JSONStreamSplitter + QMPRequest) on arbitrary bytes, fed in two
// chunks split where the input's first byte says. Checks: no value longer than the limit
// comes out; every emitted value starts with { or [ and ends with } or ]; every request
// parses or fails with a described QMPError.
import Foundation
#if !FUZZING
@testable import FerryQMP
#endif

enum QMPFuzzTarget {
    static func run(_ bytes: [UInt8]) {
        var splitter = JSONStreamSplitter(maxLength: 4096)
        let cut = bytes.isEmpty ? 0 : Int(bytes[0]) % (bytes.count + 1)
        for chunk in [bytes[..<cut], bytes[cut...]] {
            for out in splitter.feed(chunk) {
                guard case .value(let v) = out else { continue }
                precondition(v.count <= 4096, "a value of \(v.count) bytes passed a 4096-byte limit")
                precondition((v.first == UInt8(ascii: "{") || v.first == UInt8(ascii: "[")) && (v.last == UInt8(ascii: "}") || v.last == UInt8(ascii: "]")))
                if case .failure(let f) = QMPRequest.parse(v) { precondition(!f.error.desc.isEmpty) }
            }
        }
    }
}

#if FUZZING
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    QMPFuzzTarget.run(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}
#endif

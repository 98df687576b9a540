// Fuzz target (libFuzzer, built by Fuzz/run.sh with -D FUZZING) and regression replay:
// the source's return-path decoder on arbitrary bytes, with the received-bitmap reader
// sized as the source sizes it and every page request checked by PageRequest as the
// source checks it. Nothing but WireError escapes; accepted requests lie inside the block;
// bitmaps have exactly the expected size.
#if !FUZZING
import FerryWire
#endif

enum ReturnPathFuzzTarget {
    static let pages = 256 // a 1 MiB block

    static func run(_ bytes: [UInt8]) {
        let source = ByteArraySource(bytes)
        do {
            for _ in 0..<10_000 {
                switch try ReturnPathDecoder.next(source) {
                case .receivedBitmap(let name):
                    precondition(name.utf8.count <= 255)
                    let bits = try ReturnPathDecoder.readReceivedBitmap(source, expectedBytes: pages / 8)
                    precondition(bits.count == pages / 8)
                case let .requestPages(block, offset, length):
                    if let range = try? PageRequest(block: block, offset: offset, length: length).pages(blockLength: UInt64(pages) * 4096) {
                        precondition(range.lowerBound >= 0 && range.upperBound <= pages && !range.isEmpty)
                    }
                default: continue
                }
            }
        } catch is WireError {} catch {
            preconditionFailure("the decoder threw a non-WireError: \(error)")
        }
    }
}

#if FUZZING
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    ReturnPathFuzzTarget.run(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}
#endif

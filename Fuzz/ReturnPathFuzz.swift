// libFuzzer target: the source's return-path decoder (FerryWire) on arbitrary bytes, with
// the received-bitmap reader sized as the source sizes it. Checks: page requests are handed
// out as decoded (the engine validates them against the layout; see PageRequest), bitmaps
// have exactly the expected size, nothing but WireError escapes.

let pages = 256 // a 1 MiB block

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let source = ByteArraySource(Array(UnsafeBufferPointer(start: data, count: size)))
    do {
        for _ in 0..<10_000 {
            switch try ReturnPathDecoder.next(source) {
            case .receivedBitmap(let name):
                precondition(name.utf8.count <= 255)
                let bits = try ReturnPathDecoder.readReceivedBitmap(source, expectedBytes: pages / 8)
                precondition(bits.count == pages / 8)
            case let .requestPages(block, offset, length):
                let r = PageRequest(block: block, offset: offset, length: length)
                if let range = try? r.pages(blockLength: UInt64(pages) * 4096) {
                    precondition(range.lowerBound >= 0 && range.upperBound <= pages && !range.isEmpty)
                }
            default: continue
            }
        }
    } catch is WireError {} catch {
        preconditionFailure("the decoder threw a non-WireError: \(error)")
    }
    return 0
}

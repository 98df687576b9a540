/// Splits a byte stream into top-level JSON values (QMP does not require newlines between
/// them). Bounded: a value longer than `maxLength` is an error, so a client sending an
/// endless line cannot grow our memory.
struct JSONStreamSplitter {
    let maxLength: Int
    private var buffer: [UInt8] = []
    private var depth = 0
    private var inString = false
    private var escaped = false

    init(maxLength: Int = 1 << 20) { self.maxLength = maxLength }

    enum Output { case value([UInt8]), tooLong, stray(UInt8) }

    /// Feeds bytes; returns complete values (and errors) in order.
    mutating func feed(_ bytes: some Sequence<UInt8>) -> [Output] {
        var out: [Output] = []
        for b in bytes {
            if depth == 0 && !inString {
                switch b {
                case UInt8(ascii: " "), UInt8(ascii: "\n"), UInt8(ascii: "\r"), UInt8(ascii: "\t"): continue
                case UInt8(ascii: "{"), UInt8(ascii: "["): break
                default: out.append(.stray(b)); continue
                }
            }
            buffer.append(b)
            if buffer.count > maxLength {
                out.append(.tooLong)
                buffer.removeAll(); depth = 0; inString = false; escaped = false
                continue
            }
            if inString {
                if escaped { escaped = false } else if b == UInt8(ascii: "\\") { escaped = true } else if b == UInt8(ascii: "\"") { inString = false }
                continue
            }
            switch b {
            case UInt8(ascii: "\""): inString = true
            case UInt8(ascii: "{"), UInt8(ascii: "["): depth += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                depth -= 1
                if depth == 0 { out.append(.value(buffer)); buffer.removeAll(keepingCapacity: true) }
            default: break
            }
        }
        return out
    }
}

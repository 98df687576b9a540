import Foundation

/// A QMP error: its class (GenericError, CommandNotFound, ...) and description.
public struct QMPError: Error, Sendable {
    public let errorClass: String
    public let desc: String
    public init(_ desc: String, class errorClass: String = "GenericError") { self.errorClass = errorClass; self.desc = desc }
}

/// One parsed QMP input: `{"execute"|"exec-oob": NAME, "arguments": {...}, "id": ANY}`.
/// Pure (Foundation's JSON parser only), so the fuzzer drives it without a VM.
struct QMPRequest {
    let id: Any?
    let name: String
    let arguments: [String: Any]

    /// Unchecked because `id` is `Any` (a JSON value): it is immutable and only read.
    struct Failure: Error, @unchecked Sendable {
        let error: QMPError
        /// The request's id when it could be read, so the error answers it.
        let id: Any?
    }

    /// Deepest nesting accepted: QMP commands are shallow, and a deeply nested value
    /// would otherwise recurse in the parser.
    static let maxDepth = 64

    static func parse(_ bytes: [UInt8]) -> Result<QMPRequest, Failure> {
        guard nestingDepth(bytes) <= maxDepth else {
            return .failure(Failure(error: QMPError("JSON parse error, nesting deeper than \(maxDepth)"), id: nil))
        }
        guard let obj = (try? JSONSerialization.jsonObject(with: Data(bytes))) as? [String: Any] else {
            return .failure(Failure(error: QMPError("JSON parse error, expected an object"), id: nil))
        }
        let id = obj["id"]
        let known: Set<String> = ["execute", "exec-oob", "arguments", "id", "control"]
        if let extra = obj.keys.sorted().first(where: { !known.contains($0) }) {
            return .failure(Failure(error: QMPError("QMP input member '\(extra)' is unexpected"), id: id))
        }
        guard let name = (obj["execute"] ?? obj["exec-oob"]) as? String else {
            return .failure(Failure(error: QMPError("QMP input lacks member 'execute'"), id: id))
        }
        if obj["execute"] != nil && obj["exec-oob"] != nil {
            return .failure(Failure(error: QMPError("QMP input must not have both 'execute' and 'exec-oob'"), id: id))
        }
        if let a = obj["arguments"], !(a is [String: Any]) {
            return .failure(Failure(error: QMPError("QMP input member 'arguments' must be an object"), id: id))
        }
        return .success(QMPRequest(id: id, name: name, arguments: obj["arguments"] as? [String: Any] ?? [:]))
    }

    /// Deepest bracket nesting outside strings.
    static func nestingDepth(_ bytes: [UInt8]) -> Int {
        var depth = 0, deepest = 0, inString = false, escaped = false
        for b in bytes {
            if inString {
                if escaped { escaped = false } else if b == UInt8(ascii: "\\") { escaped = true } else if b == UInt8(ascii: "\"") { inString = false }
                continue
            }
            switch b {
            case UInt8(ascii: "\""): inString = true
            case UInt8(ascii: "{"), UInt8(ascii: "["): depth += 1; deepest = max(deepest, depth)
            case UInt8(ascii: "}"), UInt8(ascii: "]"): depth -= 1
            default: break
            }
        }
        return deepest
    }
}

import FerrySys
import FerryWire

/// The migration layer's one error type.
public struct MigrationError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        case badURI, connect, io, closed, protocolError, state, cancelled, config, unsupported, timeout, tls
    }
    public let code: Code
    public let message: String
    public let cause: (any Error)?
    public init(_ code: Code, _ message: String, cause: (any Error)? = nil) {
        self.code = code; self.message = message; self.cause = cause
    }
    public var description: String {
        guard let cause else { return message }
        return "\(message): \(cause)"
    }
}

import FerrySys
import FerryWire

/// The migration layer's one error type: a code callers decide on, a message people read,
/// and the lower layer's error that caused it.
public struct MigrationError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        case badURI, connect, io, closed, protocolError, state, cancelled, config, unsupported, timeout, tls, resource
        /// The operator paused postcopy (`migrate-pause`): not a link failure.
        case paused
        /// The peer reported its own failure (the destination's error message or SHUT).
        case peerFailed
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

    static let cancelledByUser = MigrationError(.cancelled, "migration cancelled")
    static let pausedByUser = MigrationError(.paused, "Postcopy migration is paused by the user")
    /// QEMU's words: multifd needs a socket transport on both sides.
    static let multifdNeedsSocket = MigrationError(.config, "multifd is not supported by current protocol (use a tcp: or unix: URI)")
}

/// The codec's one error type: what was wrong with the stream, and where.
public struct WireError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Code: String, Sendable {
        case truncated, badMagic, badVersion, badMachine, unknownSection, unknownCommand,
             badLength, unknownBlock, badOffset, badFlags, badSectionID, badFooter, badPayload,
             badBlockLayout, badBitmap
    }
    public let code: Code
    public let message: String
    public init(_ code: Code, _ message: String) { self.code = code; self.message = message }
    public var description: String { "\(message) [\(code.rawValue)]" }
}

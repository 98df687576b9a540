import ArgumentParser
import FerrySys
import Glibc
import Logging

extension Logger.Level: @retroactive ExpressibleByArgument {}

enum LogFormat: String, ExpressibleByArgument, CaseIterable { case text, json }

/// `ferry run`'s log options.
struct LogOptions: ParsableArguments {
    @Option(help: "Least severe log level written: \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")).")
    var logLevel: Logger.Level = .info

    @Option(help: "Log lines as text or as JSON objects, one per line.")
    var logFormat: LogFormat = .text

    @Option(help: "Append the log to this file (default: stderr).")
    var logFile: String?

    /// Sends every Logger in the process (the engine's included) to the chosen output.
    func bootstrap() throws {
        var fd: Int32 = 2
        if let logFile {
            fd = open(logFile, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o640)
            guard fd >= 0 else { throw ValidationError("--log-file \(logFile): \(SysError(errno: errno, call: "open"))") }
        }
        let (out, format, level) = (fd, logFormat, logLevel)
        LoggingSystem.bootstrap { label in FerryLogHandler(label: label, fd: out, format: format, logLevel: level) }
    }
}

/// One line per message, written with a single write(2) (lines from several threads never
/// interleave) to stderr or the log file: `2026-12-07T07:40:00.123Z info ferry.migration:
/// message key=value`, or the same as a JSON object.
struct FerryLogHandler: LogHandler {
    let label: String
    let fd: Int32
    let format: LogFormat
    var logLevel: Logger.Level
    var metadata: Logger.Metadata = [:]

    init(label: String, fd: Int32, format: LogFormat, logLevel: Logger.Level) {
        self.label = label; self.fd = fd; self.format = format; self.logLevel = logLevel
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var all = metadata
        if let m = event.metadata { all.merge(m) { _, new in new } }
        let time = Self.timestamp()
        var line: String
        switch format {
        case .text:
            line = "\(time) \(event.level.rawValue) \(label): \(event.message)"
            for (k, v) in all.sorted(by: { $0.key < $1.key }) { line += " \(k)=\(v)" }
        case .json:
            line = "{\"time\":\(Self.quote(time)),\"level\":\(Self.quote(event.level.rawValue)),\"label\":\(Self.quote(label)),\"message\":\(Self.quote("\(event.message)"))"
            for (k, v) in all.sorted(by: { $0.key < $1.key }) { line += ",\(Self.quote(k)):\(Self.quote("\(v)"))" }
            line += "}"
        }
        line += "\n"
        line.withUTF8 { _ = try? Sys.writeAll(fd, UnsafeRawBufferPointer($0)) }
    }

    /// UTC, milliseconds, ISO 8601.
    static func timestamp() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = ts.tv_sec, tm = Glibc.tm()
        gmtime_r(&t, &tm)
        func d(_ v: Int32, _ w: Int) -> String { let s = String(v); return String(repeating: "0", count: max(0, w - s.count)) + s }
        return "\(d(tm.tm_year + 1900, 4))-\(d(tm.tm_mon + 1, 2))-\(d(tm.tm_mday, 2))T\(d(tm.tm_hour, 2)):\(d(tm.tm_min, 2)):\(d(tm.tm_sec, 2)).\(d(Int32(ts.tv_nsec / 1_000_000), 3))Z"
    }

    /// A JSON string literal.
    static func quote(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if u.value < 0x20 { out += "\\u" + String(repeating: "0", count: 4 - String(u.value, radix: 16).count) + String(u.value, radix: 16) } else { out.unicodeScalars.append(u) }
            }
        }
        return out + "\""
    }
}

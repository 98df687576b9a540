/// QEMU's migration stream constants (wire ABI; never renumber).
public enum Wire {
    public static let fileMagic: UInt32 = 0x5145_564d // "QEVM"
    public static let fileVersion: UInt32 = 3
    public static let fileVersionCompat: UInt32 = 2
    /// Ferry's machine type, sent in the configuration section and checked by the destination.
    public static let machineType = "ferry-pc"
    /// RAM section: idstr "ram", instance 0, version 4 (as QEMU).
    public static let ramSectionName = "ram"
    public static let ramSectionVersion: UInt32 = 4
    /// The vCPU state device section (QEMU's name; one instance per vCPU, Ferry's record).
    public static let cpuSectionName = "cpu"
    public static let cpuSectionVersion: UInt32 = 1
    /// Ferry's one page size (the target page size of the stream); every page index and
    /// byte offset converts through these.
    public static let pageSize = 4096
    public static let pageShift = 12
    public static let pageMask: UInt64 = ~UInt64(4095)
    /// Largest payload of one command (be16 length).
    public static let maxCommandLength = 65535
    /// Largest return-path message Ferry accepts (QEMU: 512).
    public static let maxReturnPathLength = 512
    /// End marker of a received bitmap.
    public static let recvBitmapEnding: UInt64 = 0x0123_4567_89ab_cdef
    public static let resumeAckValue: UInt32 = 1
    /// The PING values QEMU's source sends at fixed points (only 0x42 has a meaning; the rest
    /// line traces up): after OPEN_RETURN_PATH, after the discards, inside the postcopy
    /// package after the device state, just before RUN, and after the package.
    public static let pingReturnPathOpen: UInt32 = 1
    public static let pingDiscardsSent: UInt32 = 2
    public static let pingDeviceStateSent: UInt32 = 3
    /// Inside the package just before RUN. Ferry's destination answers PONG 0x42 once the
    /// guest runs (QEMU's answers when it reads it, a moment earlier): the source's
    /// postcopy-device ends there, and it may never resume the guest from then on.
    public static let pingPackagedLoaded: UInt32 = 0x42
    public static let pingPackageSent: UInt32 = 4
    /// Ferry's own: after the discards sent before the postcopy stop; its PONG says the
    /// destination has read (and applied) everything before it. A QEMU destination echoes it.
    public static let pingEarlyDiscards: UInt32 = 0x4644_4953 // "FDIS"
    /// Ferry's own: the last thing before the precopy stop; its PONG says the destination has
    /// read everything before it, so the pause carries only the last dirty pages and not a
    /// backlog (a QEMU destination echoes it).
    public static let pingCaughtUp: UInt32 = 0x4643_5550 // "FCUP"
    /// Ferry's own: the destination's unsolicited keep-alive PONG (every 250 ms from its own
    /// thread), so the source hears a live peer even while the destination works through a
    /// backlog of stream data. A source that does not know it ignores it (QEMU only traces
    /// PONG values).
    public static let pongKeepalive: UInt32 = 0x4b41_4c56 // "KALV"
}

public enum SectionType: UInt8, Sendable {
    case eof = 0x00
    case start = 0x01
    case part = 0x02
    case end = 0x03
    case full = 0x04
    case subsection = 0x05
    case vmDescription = 0x06
    case configuration = 0x07
    case command = 0x08
    case footer = 0x7e
}

/// Flags in the low bits of a RAM record's be64 (offset | flags) word.
public struct RAMFlags: OptionSet, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let zero = RAMFlags(rawValue: 0x02)
    public static let memSize = RAMFlags(rawValue: 0x04)
    public static let page = RAMFlags(rawValue: 0x08)
    public static let eos = RAMFlags(rawValue: 0x10)
    public static let `continue` = RAMFlags(rawValue: 0x20)
    public static let xbzrle = RAMFlags(rawValue: 0x40)
    public static let hook = RAMFlags(rawValue: 0x80)
    public static let multifdFlush = RAMFlags(rawValue: 0x200)
    public static let known: RAMFlags = [.zero, .memSize, .page, .eos, .continue, .xbzrle]
}

/// `QEMU_VM_COMMAND` numbers.
public enum CommandType: UInt16, Sendable {
    case openReturnPath = 1
    case ping = 2
    case postcopyAdvise = 3
    case postcopyListen = 4
    case postcopyRun = 5
    case postcopyRAMDiscard = 6
    case packaged = 7
    case enableCOLO = 8
    case postcopyResume = 9
    case recvBitmap = 10
    case switchoverStart = 11

    /// Fixed payload lengths (nil = variable), as QEMU's table.
    public var fixedLength: Int? {
        switch self {
        case .openReturnPath, .postcopyListen, .postcopyRun, .enableCOLO, .postcopyResume, .switchoverStart: 0
        case .ping, .packaged: 4
        case .postcopyAdvise, .postcopyRAMDiscard, .recvBitmap: nil
        }
    }
}

/// Return-path message types (destination -> source).
public enum ReturnPathType: UInt16, Sendable {
    case shut = 1
    case pong = 2
    case reqPagesID = 3
    case reqPages = 4
    case recvBitmap = 5
    case resumeAck = 6
    case switchoverAck = 7
    /// Ferry's own: the destination's error text (UTF-8), sent just before SHUT(1), so the
    /// source reports the reason rather than the broken pipe that follows. A QEMU source
    /// fails on it as on the SHUT.
    case xError = 0x7f01
}

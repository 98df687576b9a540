/// Byte patterns the fault proxy watches for, to fail a plain (non-TLS) link at a chosen
/// protocol point: QEMU's framing, as Ferry's wire codec writes it.
public enum WirePoint {
    /// PONG 0x42: the destination's guest has just started (switchover).
    public static let guestStarted: [UInt8] = [0, 2, 0, 4, 0, 0, 0, 0x42]
    /// Any PONG on the return path (the heartbeat's answers, in every phase).
    public static let anyPong: [UInt8] = [0, 2, 0, 4]
    /// Any PING command on the main channel (the heartbeat, in every phase).
    public static let anyPing: [UInt8] = [8, 0, 2, 0, 4]
    /// The PACKAGED command: the postcopy switch-over's package.
    public static let packaged: [UInt8] = [8, 0, 7, 0, 4]
    /// Section "cpu" instance 0 (full): the device state at a precopy switch-over.
    public static let cpuSection: [UInt8] = [3] + Array("cpu".utf8) + [0, 0, 0, 0]
    /// The return-path RECV_BITMAP header for pc.ram (bitmap sync).
    public static let bitmapReply: [UInt8] = [0, 5, 0, 7, 6] + Array("pc.ram".utf8)
    /// The POSTCOPY_RESUME command (resume handshake).
    public static let resumeCommand: [UInt8] = [8, 0, 9, 0, 0]
    /// RESUME_ACK(1): the destination is active again, the source does not know yet.
    public static let resumeAck: [UInt8] = [0, 6, 0, 4, 0, 0, 0, 1]
}

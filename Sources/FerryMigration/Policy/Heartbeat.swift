/// How often the destination sends its keep-alive PONG on the return path.
enum DestinationKeepalive {
    static let intervalNanos: UInt64 = 250_000_000
}

/// The source's heartbeat: a PING at most every 250 ms on socket migrations, so the
/// destination's read timeout (`heartbeat-timeout`) hears from the source while the stream
/// is quiet, and its PONGs are the return path's heartbeat. Pure: fed the time, it says
/// whether a PING is due and with which value. A clock that goes backwards restarts the
/// interval instead of sending a burst.
struct PingSchedule: Sendable, Equatable {
    static let intervalNanos: UInt64 = 250_000_000
    private var last: UInt64?
    private var counter: UInt32

    /// PING values start above the handshake's fixed ones (1, 2, 0x42).
    init(firstValue: UInt32 = 0x1001) { counter = firstValue &- 1 }

    /// The value of the PING to send now, or nil if the last one is recent.
    mutating func due(now: UInt64) -> UInt32? {
        if let last {
            if now < last { self.last = now; return nil }
            if now - last < Self.intervalNanos { return nil }
        }
        last = now
        counter &+= 1
        return counter
    }
}

import FerryHarness

/// What each soak migration does, drawn from the seed (`Soak.swift` runs it).
struct SoakFault: Codable, Sendable {
    /// reset, blackhole, stall, corrupt, pause (`migrate-pause`), dead-address (a recovery by
    /// hand first sent to tcp:127.0.0.1:1).
    var kind: String
    /// precopy, switchover, postcopy, recovery.
    var at: String
    /// On a plain link, the protocol point (a `SoakFault.points` name) whose bytes trigger
    /// it; nil: by time (TLS hides the framing).
    var point: String?
    /// For a corruption by time: which way the flipped byte goes.
    var toSource: Bool
    /// precopy: after `migrate`; switchover: after `migrate-start-postcopy`; postcopy: after
    /// the guest last became active on the destination; recovery: after the link is healed.
    var afterMs: Int
    /// How long the link stays down after both sides paused (CPU time is measured meanwhile).
    var holdMs: Int

    /// Plain-link trigger points: the pattern and its direction.
    static let points: [String: ([UInt8], FaultProxy.Direction)] = [
        "pong": (WirePoint.anyPong, .toSource), "ping": (WirePoint.anyPing, .toDestination),
        "cpu-section": (WirePoint.cpuSection, .toDestination), "packaged": (WirePoint.packaged, .toDestination),
        "guest-started": (WirePoint.guestStarted, .toSource), "bitmap-reply": (WirePoint.bitmapReply, .toSource),
        "resume-command": (WirePoint.resumeCommand, .toDestination), "resume-ack": (WirePoint.resumeAck, .toSource),
    ]

    var label: String { "\(kind)@\(at)" + (point.map { "/\($0)" } ?? "") }
}

struct SoakPlan: Codable, Sendable {
    var mode: String // precopy, postcopy, postcopy-preempt
    var tls: Bool
    var faults: [SoakFault]
    var autoRecover: Bool

    static func draw(_ g: inout SplitMix) -> SoakPlan {
        let mode = ["precopy", "postcopy", "postcopy-preempt"][g.below(3)]
        let tls = g.below(3) == 0
        let autoRecover = g.below(2) == 0
        func pick(_ xs: [String]) -> String { xs[g.below(xs.count)] }
        func fault(_ kinds: [String], at: String, points: [String]) -> SoakFault {
            let kind = pick(kinds)
            // Framing bytes only carry a fault on a plain link; a corruption always needs one
            // there (a flipped page byte would be silent damage, as in QEMU's stream).
            let byPattern = !tls && (at == "switchover" || at == "recovery" || kind == "corrupt") && kind != "pause" && kind != "dead-address"
            let point = byPattern ? pick(kind == "corrupt" && at != "switchover" && at != "recovery" ? ["pong", "ping"] : points) : nil
            return SoakFault(kind: kind, at: at, point: point, toSource: g.below(2) == 0,
                             afterMs: at == "switchover" || at == "recovery" ? g.below(20) : 100 + g.below(500), holdMs: g.below(1000))
        }
        let link = ["reset", "blackhole", "stall", "corrupt"]
        var faults: [SoakFault] = []
        if mode == "precopy" {
            switch g.below(3) {
            case 0: break
            case 1: faults = [fault(link, at: "precopy", points: [])]
            // A precopy switch-over has no moment to aim at by time: TLS links fault in precopy.
            default: faults = [tls ? fault(link, at: "precopy", points: []) : fault(["reset", "blackhole", "corrupt"], at: "switchover", points: ["cpu-section"])]
            }
        } else {
            switch g.below(6) {
            case 0: break
            case 1: faults = [fault(link, at: "precopy", points: [])]
            default:
                faults = [g.below(3) == 0 ? fault(["reset", "blackhole", "corrupt"], at: "switchover", points: ["packaged", "guest-started"])
                                          : fault(link + ["pause"], at: "postcopy", points: [])]
                for _ in 0..<g.below(3) {
                    faults.append(g.below(2) == 0 ? fault(link + ["pause"], at: "postcopy", points: [])
                                  : fault(["reset", "blackhole", "corrupt"] + (autoRecover ? [] : ["dead-address"]), at: "recovery",
                                          points: ["bitmap-reply", "resume-command", "resume-ack"]))
                }
            }
        }
        return SoakPlan(mode: mode, tls: tls, faults: faults, autoRecover: autoRecover)
    }
}

/// A small seeded generator (SplitMix64): a seed reproduces a run's plan.
struct SplitMix: Sendable {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
}

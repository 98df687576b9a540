import FerryHarness
import Foundation
import Testing

/// A short chaos soak in CI (`ferry-bench --suites soak`, the long run is in the README):
/// one guest migrated back and forth with seeded modes, faults and recoveries, QMP clients
/// coming and going. No guest lost or damaged; the processes' fds and threads do not grow.
@Suite("chaos soak", .serialized)
struct SoakTests {
    @Test("ferry-bench --suites soak --migrations 12 (2 vCPUs, up to three faults each): every migration completed or failed before postcopy ran with the source intact; memory checked after each; fds and threads flat; little CPU while paused")
    func shortSoak() throws {
        let bench = "\(Paths.root)/.build/debug/ferry-bench"
        #expect(FileManager.default.isExecutableFile(atPath: bench), "build it first (swift build): \(bench)")
        let out = NSTemporaryDirectory() + "ferry-soak-test-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: out) }
        let (status, text) = try runProcess(bench, ["--suites", "soak", "--migrations", "12", "--seed", "7", "--output", out])
        #expect(status == 0, "\(text.suffix(3000))")
        let data = try Data(contentsOf: URL(fileURLWithPath: "\(out)/soak.json"))
        let report = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let migrations = report["migrations"] as? [[String: Any]] ?? []
        #expect(migrations.count == 12)
        var holdMs = 0, ferryCPUMs = 0
        for m in migrations {
            let outcome = m["outcome"] as? String ?? "?"
            let faults = (m["plan"] as? [String: Any])?["faults"] as? [[String: Any]] ?? []
            #expect(["completed", "precopy-failed-source-intact", "switchover-failed-source-intact"].contains(outcome), "migration \(m["index"] ?? "?"): \(m)")
            #expect(m["memoryCheck"] as? String == "passed", "\(m)")
            // A fault once the guest ran on the destination never fails the migration: it pauses and recovers.
            if faults.first?["at"] as? String == "postcopy" { #expect(outcome == "completed", "\(m)") }
            for p in m["paused"] as? [[String: Any]] ?? [] {
                holdMs += p["holdMs"] as? Int ?? 0
                ferryCPUMs += (p["sourceCPUMs"] as? Int ?? 0) + (p["destinationCPUMs"] as? Int ?? 0)
            }
        }
        #expect(migrations.contains { ($0["proxyFired"] as? [Any])?.isEmpty == false }, "no fault fired in 12 migrations")
        // Paused, Ferry waits: no busy loop (a spinning thread would use about the hold's time).
        #expect(ferryCPUMs * 4 <= holdMs + 40, "Ferry used \(ferryCPUMs) ms of CPU in \(holdMs) ms paused")
        // Each role is sampled at the same point of every migration: a leak would grow it.
        let samples = report["samples"] as? [[String: Any]] ?? []
        for role in ["source", "destination"] {
            let s = samples.filter { $0["role"] as? String == role }
            let fds = s.compactMap { $0["fds"] as? Int }, threads = s.compactMap { $0["threads"] as? Int }
            #expect(!fds.isEmpty && fds.max()! - fds.min()! <= 4, "\(role) fds \(fds)")
            #expect(!threads.isEmpty && threads.max()! - threads.min()! <= 4, "\(role) threads \(threads)")
        }
    }
}

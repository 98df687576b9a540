import FerryHarness
import Foundation
import Testing

/// A short chaos soak in CI (`ferry-bench --suites soak`, the long run is in the README):
/// one guest migrated back and forth with seeded modes, faults and recoveries, QMP clients
/// coming and going. No guest lost or damaged; the processes' fds and threads do not grow.
@Suite("chaos soak", .serialized)
struct SoakTests {
    @Test("ferry-bench --suites soak --migrations 12: every migration completed or failed in precopy with the source intact; memory checked after each; fds and threads flat")
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
        for m in migrations {
            let outcome = m["outcome"] as? String ?? "?"
            let plan = m["plan"] as? [String: Any] ?? [:]
            #expect(outcome == "completed" || outcome == "precopy-failed-source-intact", "migration \(m["index"] ?? "?"): \(m)")
            #expect(m["memoryCheck"] as? String == "passed", "\(m)")
            // A postcopy fault never fails the migration: it pauses and recovers.
            if (plan["fault"] as? String)?.hasSuffix("postcopy") == true || plan["fault"] as? String == "pause" {
                #expect(outcome == "completed", "\(m)")
            }
        }
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

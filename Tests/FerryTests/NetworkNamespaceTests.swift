import FerryHarness
import Foundation
import Glibc
import Testing

/// Source and destination as separate `ferry run` processes in two network namespaces
/// joined by a veth pair; the link goes down in the middle of postcopy (a silent
/// partition: no RST) and comes back.
@Suite("network namespaces", .serialized)
struct NetworkNamespaceTests {
    @Test("link down mid-postcopy: both sides pause within the heartbeat timeout; link up: auto-recover completes, memory verified")
    func linkDownAndUp() throws {
        #expect(getuid() == 0, "network namespaces need root (CI runs as root)")
        #expect(FileManager.default.isExecutableFile(atPath: Paths.ferry), "build ferry first (swift build): \(Paths.ferry)")
        var sc = PostcopyScenario(name: "netns-link-down", memory: 128 << 20)
        sc.netns = true
        sc.vcpus = testVCPUs // the SMP guest: several vCPUs fault while the link is down
        sc.bandwidth = 20_000_000
        sc.postcopyAfterMs = 300
        sc.failure = .linkDown
        sc.failureAfterMs = 300
        sc.outageMs = 2500
        sc.heartbeatMs = 1000
        sc.timeoutSeconds = 120
        var notes: [String] = []
        let run = try runPostcopy(sc, directory: "/tmp/ferry-test-netns-\(getpid())", executable: Paths.ferry) { _, note in
            if let note { notes.append(note) }
        }
        #expect(run.status == "completed", "\(run.error ?? "") \(notes)")
        #expect(run.memoryCheckPassed == true)
        #expect(run.pauses == 1)
        let src = try #require(run.sourceDetectionMs), dst = try #require(run.destinationDetectionMs)
        // Detection within the heartbeat timeout, plus the harness's polling slack.
        #expect(src < 1000 + 500 && dst < 1000 + 500, "detection took \(src) / \(dst) ms")
        #expect(notes.contains("link back; automatic recovery"))
        #expect((run.resumeToActiveMs ?? 0) > 0)
    }
}

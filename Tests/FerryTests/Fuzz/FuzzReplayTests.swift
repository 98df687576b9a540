import Foundation
import Testing

/// Replays the committed fuzzing inputs (the seed corpus, the corpus the fuzz runs grew, and
/// every crash input ever found, in Fuzz/regressions) through the same checks the fuzzers
/// run. A regression crashes this test process: loud, never skipped.
@Suite("fuzz corpus replay")
struct FuzzReplayTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fuzz").path

    static func inputs(_ target: String) -> [[UInt8]] {
        var out: [[UInt8]] = []
        for dir in ["seeds", "corpus", "regressions"] {
            let d = "\(root)/\(dir)/\(target)"
            for name in ((try? FileManager.default.contentsOfDirectory(atPath: d)) ?? []).sorted() {
                if let data = FileManager.default.contents(atPath: "\(d)/\(name)") { out.append([UInt8](data)) }
            }
        }
        return out
    }

    @Test("every committed stream-decoder input decodes or fails cleanly")
    func stream() {
        let all = Self.inputs("stream")
        #expect(all.count >= 2, "no stream seeds found under \(Self.root)")
        for bytes in all { StreamFuzzTarget.run(bytes) }
    }

    @Test("every committed return-path input decodes or fails cleanly")
    func returnPath() {
        let all = Self.inputs("return-path")
        #expect(all.count >= 2)
        for bytes in all { ReturnPathFuzzTarget.run(bytes) }
    }

    @Test("every committed QMP input parses or fails with an error")
    func qmp() {
        let all = Self.inputs("qmp")
        #expect(all.count >= 5)
        for bytes in all { QMPFuzzTarget.run(bytes) }
    }
}

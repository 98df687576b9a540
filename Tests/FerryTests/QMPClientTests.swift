import FerryHarness
import Foundation
import Testing

/// Paths of the package and of the built `ferry` binary (`swift build` puts it there).
enum Paths {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    static var ferry: String {
        for c in ["\(root)/.build/debug/ferry", "\(root)/.build/release/ferry"] where FileManager.default.isExecutableFile(atPath: c) { return c }
        return "\(root)/.build/debug/ferry"
    }
}

@Suite("QMP with the standard client", .serialized)
struct QMPClientTests {
    @Test("qemu.qmp negotiates, runs every command against two ferry processes and receives the events")
    func standardClient() throws {
        #expect(FileManager.default.isExecutableFile(atPath: Paths.ferry), "build ferry first (swift build): \(Paths.ferry)")
        let (status, text) = try runProcess("/usr/bin/env", ["python3", "\(Paths.root)/Tests/qmp/qmp_client_check.py", Paths.ferry])
        #expect(status == 0, "\(text)")
        #expect(text.contains("qemu.qmp check passed"), "\(text)")
    }
}

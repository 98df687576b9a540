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

/// The same scenarios run by QEMU 7.2 (Debian's qemu-system-x86, installed by .ci/run) and
/// by Ferry, compared as a client sees them (Tests/qmp/qemu_differential.py): any
/// difference not listed as deliberate fails. QEMU missing is a broken set-up: fail.
@Suite("QEMU 7.2 differential", .serialized)
struct QEMUDifferentialTests {
    @Test("precopy, postcopy after the first pass, and postcopy pause/recovery look the same to a QMP client under QEMU 7.2 and Ferry")
    func againstQEMU() throws {
        #expect(FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64"), "install qemu-system-x86 (.ci/run does)")
        let table = NSTemporaryDirectory() + "ferry-differential-\(getpid()).md"
        defer { try? FileManager.default.removeItem(atPath: table) }
        let (status, text) = try runProcess("/usr/bin/env", ["python3", "\(Paths.root)/Tests/qmp/qemu_differential.py",
                                                              "/usr/bin/qemu-system-x86_64", Paths.ferry, table])
        #expect(status == 0, "\(text.suffix(4000))")
        #expect(text.contains("no undocumented difference"), "\(text.suffix(4000))")
    }
}

import FerryHarness
import Foundation
import Testing

/// The installable binary (`scripts/build-static.sh`, run by the test script before the
/// suite): it must run where no Swift toolchain is. The test hides the toolchain's runtime
/// directory behind an empty tmpfs in a mount namespace of its own (`unshare --mount`),
/// checks that the hiding works (the debug build no longer starts there), then runs a whole
/// postcopy migration with the static binary alone, and checks the man page and completions.
@Suite("the static binary", .serialized)
struct StaticBinaryTests {
    static let binary = "\(Paths.root)/dist/ferry"

    /// The directory the debug build loads libswiftCore.so from: the toolchain's runtime.
    static func toolchainRuntime() throws -> String {
        let (_, text) = try runProcess("/usr/bin/ldd", ["\(Paths.root)/.build/debug/ferry"])
        let line = try #require(text.split(separator: "\n").first { $0.contains("libswiftCore.so") }, "\(text)")
        let path = try #require(line.split(separator: " ").first { $0.hasPrefix("/") && $0.hasSuffix("libswiftCore.so") }, "\(line)")
        return URL(fileURLWithPath: String(path)).deletingLastPathComponent().path
    }

    @Test("dist/ferry links no Swift runtime and migrates (postcopy, verified) with the toolchain's libraries hidden; man page and completions built")
    func runsWithoutToolchain() throws {
        #expect(FileManager.default.isExecutableFile(atPath: Self.binary), "\(Self.binary) missing: scripts/build-static.sh builds it (scripts/test.sh runs it first)")
        let (_, libs) = try runProcess("/usr/bin/ldd", [Self.binary])
        #expect(!libs.contains("libswift") && !libs.contains("libFoundation") && !libs.contains("libdispatch"), "\(libs)")

        let runtime = try Self.toolchainRuntime()
        let script = """
            set -u
            mount -t tmpfs -o size=1M ferry-hidden '\(runtime)' || { echo 'MOUNT FAILED'; exit 99; }
            '\(Paths.root)/.build/debug/ferry' --version >/dev/null 2>&1; echo "debug build exit $?"
            '\(Self.binary)' --version || exit 98
            exec '\(Self.binary)' demo --memory 32M --postcopy --max-bandwidth 8000000
            """
        let (status, out) = try runProcess("/usr/bin/unshare", ["--mount", "--propagation", "private", "/bin/sh", "-c", script])
        // Hidden indeed: the dynamically linked build cannot start (ld.so exits 127).
        #expect(out.contains("debug build exit 127"), "\(out)")
        #expect(status == 0, "\(out)")
        #expect(out.contains("memory check passed"), "\(out)")
        #expect(out.contains("postcopy-active"), "the demo never reached postcopy: \(out)")

        let man = (try? String(contentsOfFile: "\(Paths.root)/dist/man/ferry.1", encoding: .utf8)) ?? ""
        #expect(man.contains(".Nm") && man.contains("migrate"), "man page: \(man.prefix(300))")
        for f in ["ferry.bash", "_ferry", "ferry.fish"] {
            let c = (try? String(contentsOfFile: "\(Paths.root)/dist/completions/\(f)", encoding: .utf8)) ?? ""
            #expect(c.contains("migrate") && c.contains("incoming") && c.contains("max-bandwidth"), "completion \(f): \(c.prefix(200))")
        }
    }
}

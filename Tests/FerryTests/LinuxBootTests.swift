import Foundation
import Testing
@testable import FerryMachine

/// Debian's cloud kernel booted through Ferry's 64-bit boot protocol. On this host (nested
/// KVM without hardware virtualisation) the kernel decompresses itself for minutes, and QEMU
/// 7.2 cannot boot it to a shell here either; what the test asserts is what it prints early
/// through Ferry's UART: its banner, our command line, the e820 map we built (RAM above 4 GiB
/// included) and that it found KVM.
@Suite("Linux boot protocol")
struct LinuxBootTests {
    /// The kernel `.ci/run` installs (linux-image-cloud-amd64). Missing means a broken set-up:
    /// fail, never skip.
    static func debianKernel() throws -> String {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/boot")) ?? []
        guard let name = names.filter({ $0.hasPrefix("vmlinuz-") && $0.hasSuffix("-cloud-amd64") }).sorted().last else {
            throw MachineError(.config, "no /boot/vmlinuz-*-cloud-amd64: install linux-image-cloud-amd64 (.ci/run does)")
        }
        return "/boot/" + name
    }

    @Test("Debian's kernel prints its banner, our command line, the e820 map (RAM above 4 GiB) and KVM detected through Ferry's serial port")
    func debianKernelBanner() throws {
        let kernel = try Self.debianKernel()
        let log = NSTemporaryDirectory() + "ferry-linux-\(getpid()).log"
        defer { try? FileManager.default.removeItem(atPath: log) }
        let machine = try Machine(memorySize: 5 << 30, vcpus: 2, serial: .file(log))
        defer { machine.stop() }
        let cmdline = "console=ttyS0 earlyprintk=ttyS0 ferry-test=1"
        try machine.loadLinux(kernel: Array(try Data(contentsOf: URL(fileURLWithPath: kernel))), commandLine: cmdline)
        try machine.start()
        let wanted = [
            "Linux version ",
            "Command line: \(cmdline)",
            "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
            "BIOS-e820: [mem 0x0000000100000000-0x000000017fffffff] usable",
            "Hypervisor detected: KVM",
        ]
        // Decompression alone takes minutes here (~1.5 M guest instructions a second).
        let deadline = Date().addingTimeInterval(600)
        var text = ""
        while Date() < deadline {
            text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            if wanted.allSatisfy(text.contains) { break }
            if machine.state != .running && machine.state != .created { break }
            Thread.sleep(forTimeInterval: 1)
        }
        for w in wanted {
            #expect(text.contains(w), "serial output lacks \"\(w)\"; guest \(machine.state) \(machine.lastError ?? ""); last output: \(text.suffix(600))")
        }
    }

    @Test("a file that is not a bzImage is refused with the reason")
    func notABzImage() throws {
        let machine = try Machine(memorySize: 64 << 20, vcpus: 1)
        defer { machine.stop() }
        #expect(throws: MachineError.self) { try machine.loadLinux(kernel: [UInt8](repeating: 0x90, count: 8192), commandLine: "") }
        do { try machine.loadLinux(kernel: [UInt8](repeating: 0, count: 100), commandLine: "") } catch {
            #expect("\(error)".contains("not a bootable bzImage"))
        }
    }
}

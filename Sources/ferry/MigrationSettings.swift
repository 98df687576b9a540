import ArgumentParser
import FerryMigration

/// `--migrate-capability` and `--migrate-parameter`, in QEMU's names, for `ferry run` (a
/// destination needs no QMP client) and `ferry migrate` (set on the source, and with
/// `--dest-qmp` on the destination too). Checked here for form (known capability names,
/// `NAME=VALUE`); QMP's own checks give the range errors, with QEMU's messages.
struct MigrationSettingOptions: ParsableArguments {
    @Option(name: .customLong("migrate-capability"), parsing: .singleValue,
            help: ArgumentHelp("Migration capabilities to enable, comma-separated (repeatable), e.g. postcopy-ram,postcopy-preempt,auto-recover.",
                               valueName: "CAP[,CAP...]"))
    var capabilityLists: [String] = []

    @Option(name: .customLong("migrate-parameter"), parsing: .singleValue,
            help: ArgumentHelp("A migration parameter as migrate-set-parameters takes it (repeatable), e.g. heartbeat-timeout=1000, max-bandwidth=100M, multifd-compression=zstd.",
                               valueName: "NAME=VALUE"))
    var parameterSettings: [String] = []

    /// The enabled capabilities, in order, without repeats.
    func capabilities() throws -> [MigrationCapability] {
        var out: [MigrationCapability] = []
        for list in capabilityLists {
            for name in list.split(separator: ",", omittingEmptySubsequences: false).map(String.init) {
                guard let c = MigrationCapability(rawValue: name) else {
                    throw ValidationError("--migrate-capability: unknown capability '\(name)'; one of \(MigrationCapability.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                if !out.contains(c) { out.append(c) }
            }
        }
        return out
    }

    /// The parameters as migrate-set-parameters arguments: numbers where the value is one
    /// (sizes and bandwidths take K/M/G suffixes, powers of 1024 as QEMU's), else strings.
    func parameters() throws -> [String: Any] {
        var out: [String: Any] = [:]
        for setting in parameterSettings {
            guard let eq = setting.firstIndex(of: "="), eq != setting.startIndex else {
                throw ValidationError("--migrate-parameter '\(setting)': expected NAME=VALUE, e.g. downtime-limit=300")
            }
            let name = String(setting[..<eq]), value = String(setting[setting.index(after: eq)...])
            if let n = UInt64(value) {
                out[name] = n
            } else if name.hasSuffix("-size") || name.hasSuffix("bandwidth"), let n = ByteSize.parse(value) {
                out[name] = UInt64(n)
            } else {
                out[name] = value
            }
        }
        return out
    }

    var isEmpty: Bool { capabilityLists.isEmpty && parameterSettings.isEmpty }

    func validate() throws {
        _ = try capabilities()
        _ = try parameters()
    }
}

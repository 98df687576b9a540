import FerryMigration

/// QMP commands run inside the process, for the CLI's `ferry run --migrate-capability` /
/// `--migrate-parameter`: the same checks and messages as over the socket, no client needed.
public enum LocalQMP {
    public static func execute(_ name: String, _ arguments: [String: Any], host: VMHost) throws -> Any {
        try QMPCommands.run(name, arguments, host: host)
    }
}

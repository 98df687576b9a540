import Logging

/// The engine's log: every status change (with the cause of a pause or failure), every
/// recovery attempt and its outcome, every connection or stream refused. Never on the
/// per-page path. Where it goes is the program's choice (`LoggingSystem.bootstrap`; `ferry
/// run --log-level/--log-format/--log-file`); created on first use, after that.
public enum MigrationLog {
    public static let logger = Logger(label: "ferry.migration")
}

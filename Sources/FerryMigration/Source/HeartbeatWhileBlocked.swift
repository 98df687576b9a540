import FerrySys

extension OutgoingMigration {
    /// Runs `body` on a helper thread (`mig/src/sync`) while this thread, the main channel's
    /// only writer, keeps the heartbeat: a PING every `PingSchedule.intervalNanos` until
    /// `body` returns. Enabling and collecting a big guest's dirty log is one kernel call
    /// per memory slot that took 5.8 s on this host under load (64 GiB, two vCPUs writing,
    /// ThreadSanitizer): a destination that hears nothing for `heartbeat-timeout` takes the
    /// link for dead. Without a channel (the switch-over: the guest is stopped) or a return
    /// path (exec:, file:: no heartbeat), `body` runs here. Call between records only (a
    /// PING is a top-level command).
    func keepingHeartbeat(_ ch: MigrationChannel?, _ body: @escaping @Sendable () throws -> Void) throws {
        guard let ch, uri.isBidirectional else { return try body() }
        let job = BlockingJob()
        let worker = try KernelThread(name: "mig/src/sync") {
            let r = Result { try body() }
            job.monitor.withLock { job.result = r; job.monitor.broadcast() }
        }
        defer { worker.join() } // also when a PING fails: `body` owns the VM's log until it ends
        while true {
            let r = job.monitor.withLock {
                if job.result == nil { job.monitor.wait(timeoutNanos: PingSchedule.intervalNanos) }
                return job.result
            }
            if let r { return try r.get() }
            header.removeAll()
            pingIfDue()
            if header.count > 0 {
                try ch.write(header)
                try ch.flush()
            }
        }
    }
}

/// The outcome of `keepingHeartbeat`'s body. `result` is guarded by `monitor`.
private final class BlockingJob: @unchecked Sendable {
    let monitor = Monitor()
    var result: Result<Void, any Error>?
}

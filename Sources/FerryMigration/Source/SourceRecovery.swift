import FerryMachine
import FerryMemory
import FerrySys
import FerryWire

/// Postcopy pause and recovery on the source's main thread: postcopy-paused keeps every
/// page and queued request, waits for `migrate resume=true` (or, with auto-recover,
/// reconnects by itself as `RecoveryBackoff` says), and runs the recovery handshake. A
/// failed attempt returns to paused; this never gives up on the guest.
extension OutgoingMigration {
    func pauseAndRecover(after error: any Error, old: MigrationChannel) throws -> MigrationChannel {
        let pausedAt = Sys.monotonicNanos()
        closeChannels(old)
        try advance(.linkLost) {
            // A forced pause also breaks the channels; report the cause, not the symptom.
            $0.errorDescription = self.asked.pause ? MigrationError.pausedByUser.message : "\(error)"
            $0.postcopyPauses += 1
            self.inbox.newChannel()
            self.asked.pause = false
            self.channel = nil
        }
        let auto = capabilities.contains(.autoRecover)
        var backoff = RecoveryBackoff(pausedAt: pausedAt, timeoutMs: parameters.autoRecoverTimeout)
        while true {
            let (target, attemptStart) = nextRecoveryTarget(auto: auto, backoff: backoff)
            let attempt = updateStats { $0.recoveryAttempts += 1; return $0.recoveryAttempts }
            MigrationLog.logger.info("postcopy recovery attempt \(attempt) to \(target)\(auto ? " (auto-recover)" : "")",
                                     metadata: ["side": "source", "attempt": "\(attempt)", "uri": "\(target)"])
            try advance(.recoveryAttempt)
            var newChannel: MigrationChannel?
            do {
                let ch = try ChannelSetup.connect(target, role: .main, tls: tls, heartbeatTimeoutMs: parameters.heartbeatTimeout)
                newChannel = ch
                try advance(.recoveryConnected) {
                    if let t = ch.tlsDescription { $0.tls = t }
                    self.channel = ch
                    self.inbox.newChannel()
                }
                try resumeHandshake(ch, target)
                try advance(.resumed) {
                    self.recoveryURI = target
                    $0.recoveries += 1
                    $0.lastRecoveryMs = Double(Sys.nanosSince(attemptStart)) / 1e6
                    $0.lastOutageMs = Double(Sys.nanosSince(pausedAt)) / 1e6
                    $0.pausedMs += Sys.nanosSince(pausedAt) / 1_000_000
                    $0.errorDescription = nil
                }
                MigrationLog.logger.info("postcopy recovered on attempt \(attempt): resume → active \(Sys.nanosSince(attemptStart) / 1000) µs, \(Sys.nanosSince(pausedAt) / 1_000_000) ms paused",
                                         metadata: ["side": "source", "attempt": "\(attempt)", "uri": "\(target)"])
                return ch
            } catch let never as DestinationNeverRan {
                closeChannels(newChannel)
                lock.withLock { channel = nil }
                try? machine.vm.setDirtyLogging(machine.ram, false) // the migration ends here; the log is not needed
                throw never
            } catch {
                closeChannels(newChannel)
                MigrationLog.logger.warning("postcopy recovery attempt \(attempt) failed: \(error)",
                                            metadata: ["side": "source", "attempt": "\(attempt)", "uri": "\(target)"])
                try advance(.linkLost) {
                    $0.errorDescription = "recovery failed: \(error)"
                    self.inbox.newChannel()
                    self.asked.pause = false
                    self.channel = nil
                }
                backoff.attemptFailed(now: Sys.monotonicNanos())
            }
        }
    }

    /// Waits in postcopy-paused for the operator's `migrate resume=true` or, with
    /// auto-recover, for the next automatic attempt. Returns the address and the attempt's
    /// start (for resume → active).
    private func nextRecoveryTarget(auto: Bool, backoff: RecoveryBackoff) -> (MigrationURI, UInt64) {
        lock.withLock {
            while true {
                if let r = asked.resume { asked.resume = nil; return (r.uri, r.at) }
                let now = Sys.monotonicNanos()
                switch auto ? backoff.decide(now: now) : .wait(RecoveryBackoff.idleRecheckNanos) {
                case .attempt: return (recoveryURI, now)
                case .wait(let nanos): lock.wait(timeoutNanos: nanos)
                }
            }
        }
    }

    /// The source half of recovery on a new channel (which starts with commands, no header):
    /// RECV_BITMAP and POSTCOPY_RESUME → the destination's received bitmap ("still to send"
    /// is its complement) → a new urgent channel → RESUME_ACK.
    private func resumeHandshake(_ ch: MigrationChannel, _ target: MigrationURI) throws {
        // With preempt, the new urgent channel is opened (its TLS handshake too) while the
        // bitmap goes back and forth; the destination accepts it from the main channel on.
        let urgent = capabilities.contains(.postcopyPreempt) ? try ChannelInFlight(name: "mig/src/urgent") { [self] _ in
            try connectUrgentChannel(target)
        } : nil
        var taken = false
        defer { if !taken { urgent?.abandon() } }
        try startReturnPath(ch)
        // POSTCOPY_RESUME right behind RECV_BITMAP: the destination answers them in order
        // (bitmap, then RESUME_ACK), and nothing here depends on the bitmap until the
        // background stream goes on: one round trip saved, not waited for as QEMU does.
        header.removeAll()
        header.recvBitmapRequest(block: block.name)
        header.command(.postcopyResume)
        try ch.write(header)
        try ch.flush()
        let bits = try waitForDestination(seconds: 30, during: "recovery") { inbox.receivedBitmap }
        guard let received = PageBitmap.deserialize(bits, bitCount: block.pageCount) else {
            throw MigrationError(.protocolError, "received bitmap of \(bits.count) bytes does not fit \(block.pageCount) pages")
        }
        let before = toSend.popcount()
        received.complement()
        toSend.clearAll()
        toSend.formUnion(received)
        let after = toSend.popcount()
        updateStats {
            $0.bitmapBytes += UInt64(bits.count + 16 + 5 + block.name.utf8.count)
            $0.pagesResent += UInt64(max(0, after - before))
            $0.remaining = UInt64(after) << Wire.pageShift
        }
        cursor = 0
        // The destination acks once it has the urgent channel too.
        if let urgent {
            taken = true
            useUrgentChannel(try urgent.take())
        }
        _ = try waitForDestination(seconds: 30, during: "recovery") { inbox.resumeAcked ? true : nil }
    }

    /// Waits (lock held) for `value` from the return-path thread, or its error, a forced
    /// pause, or the deadline. A SHUT with an error from a destination that never ran the
    /// guest means the guest may continue here (`DestinationNeverRan`).
    func waitForDestination<T>(seconds: Double, during what: String, _ value: () -> T?) throws -> T {
        let deadline = Sys.monotonicNanos() + UInt64(seconds * 1e9)
        let v: T? = try lock.withLock {
            try lock.wait(until: deadline) { () throws -> T? in
                if let v = value() { return v }
                if let s = inbox.shut, s != 0 {
                    if !inbox.destinationRunning {
                        throw DestinationNeverRan(error: MigrationError(.peerFailed, "the destination failed before it ran the guest (SHUT \(s) during \(what)); the guest continues here"))
                    }
                    throw MigrationError(.peerFailed, "the destination refused \(what) (SHUT \(s))")
                }
                if let e = inbox.failure { throw MigrationError(.io, "return path failed during \(what)", cause: e) }
                if asked.pause { throw MigrationError.pausedByUser }
                return nil
            }
        }
        guard let v else { throw MigrationError(.timeout, "the destination did not answer within \(Int(seconds * 1000)) ms during \(what)") }
        return v
    }
}

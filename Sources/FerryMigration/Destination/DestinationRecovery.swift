import FerryMemory
import FerrySys
import FerryWire
import Glibc

/// Postcopy on the destination's main thread, from RUN to the end: read the main channel;
/// any failure pauses (never fails) and waits for a recovery channel, on which the same
/// loop carries on. While paused the guest keeps running (blocking only on pages it
/// lacks), faults are recorded, nothing received is dropped.
extension IncomingMigration {
    func postcopyMain(_ first: StreamDecoder, _ firstChannel: MigrationChannel) {
        var decoder = first
        var ch = firstChannel
        guard let uffd = lock.withLock({ faultService?.uffd }) else { return } // RUN comes after LISTEN (the table)
        // The multifd channels carried precopy only, flushed before the discards: done.
        multifd?.close()
        let installer = pageInstaller(uffd)
        while true {
            do {
                try postcopyLoad(decoder, ch, installer)
                try waitForEveryPage()
                stopCatchingFaults()
                returnPath.send { $0.rpShut(0) }
                try advance(.finished) { $0.endNanos = Sys.monotonicNanos() }
                closeChannels()
                listener.close()
                lock.withLock { recoveryListener }?.close()
                return
            } catch {
                (decoder, ch) = pauseAndWaitForRecovery(after: error, decoder: decoder)
            }
        }
    }

    /// One channel's worth of postcopy stream: RAM sections, pings, and the recovery
    /// commands. Returns at EOF.
    private func postcopyLoad(_ decoder: StreamDecoder, _ ch: MigrationChannel, _ installer: PageInstaller) throws {
        while true {
            let item = try decoder.nextItem()
            try currentPhase.check(item)
            switch item {
            case .section(let h):
                try installer.loadSection(decoder, ch)
                try decoder.readFooter(expecting: h.id)
            case .command(.ping(let v)):
                returnPath.send { $0.rpPong(v) }
            case .command(.recvBitmap(let name)):
                guard name == machine.ram.name else { throw MigrationError(.protocolError, "RECV_BITMAP for unknown RAM block \(name)") }
                let bits = received.serialized()
                returnPath.send { $0.rpReceivedBitmap(block: name, bitmap: bits) }
                updateStats { $0.bitmapBytes += UInt64(bits.count + 16) }
            case .command(.postcopyResume):
                if capabilities.contains(.postcopyPreempt) {
                    // Accepted since the main channel came (see pauseAndWaitForRecovery).
                    let inFlight: ChannelInFlight? = lock.withLock { defer { urgentInFlight = nil }; return urgentInFlight }
                    let pc = try inFlight?.take() ?? ChannelSetup.accept(on: lock.withLock { recoveryListener } ?? listener, role: .urgent,
                                                                        heartbeatTimeoutMs: host.parameters.heartbeatTimeout)
                    try startUrgentReader(pc, uffd: installer.uffd)
                }
                returnPath.send { $0.rpResumeAck() }
                try advance(.resumed)
                resendOutstandingRequests()
            case .eof:
                return
            default:
                throw MigrationError(.protocolError, "unexpected item during postcopy") // the table refused it already
            }
        }
    }

    /// After RESUME: every page the guest asked for and does not have is asked again (the
    /// old connection may have lost the requests or their answers).
    func resendOutstandingRequests() {
        returnPath.dropDeferred()
        var outstanding: [Int] = []
        requested.forEachSet { p in if !received.test(p) { outstanding.append(p) } }
        for p in outstanding { requestPage(p) }
    }

    /// At EOF every page must be here; with postcopy-preempt the last urgent pages may
    /// still be on their way.
    private func waitForEveryPage() throws {
        let deadline = Sys.monotonicNanos() + 30_000_000_000
        while received.popcount() < received.bitCount {
            if Sys.monotonicNanos() > deadline {
                throw MigrationError(.timeout, "\(received.bitCount - received.popcount()) pages still missing after the end of the stream")
            }
            usleep(500)
        }
    }

    /// Shuts and closes the main and urgent channels and joins the urgent reader.
    func closeChannels() {
        let (ch, pc, t): (MigrationChannel?, MigrationChannel?, KernelThread?) = lock.withLock {
            defer { channel = nil; urgentChannel = nil; urgentThread = nil; urgentInFlight?.abandon(); urgentInFlight = nil }
            // `transferred` stays cumulative across recoveries.
            retiredBytes += (channel?.bytesRead ?? 0) + (urgentChannel?.bytesRead ?? 0)
            return (channel, urgentChannel, urgentThread)
        }
        // Shut down first: a return-path writer blocked on a peer that does not read holds
        // the writer's lock until its send fails, and detaching waits for that lock.
        ch?.shutdown()
        pc?.shutdown()
        returnPath.attach(nil)
        t?.join()
        ch?.close()
        pc?.close()
    }

    /// postcopy-paused until a recovery channel connects: on the `migrate-recover` address,
    /// or (auto-recover) on the original one.
    private func pauseAndWaitForRecovery(after error: any Error, decoder old: StreamDecoder) -> (StreamDecoder, MigrationChannel) {
        closeChannels()
        _ = try? advance(.linkLost) { // legal: postcopy-active and -recover are the only phases here
            $0.postcopyPauses += 1
            $0.errorDescription = self.pauseRequested ? MigrationError.pausedByUser.message : "\(error)"
            self.pauseRequested = false
            self.recoverTriggered = false // a new migrate-recover may replace the address now
        }
        let auto = capabilities.contains(.autoRecover)
        while true {
            let l: MigrationListener = lock.withLock {
                // Woken by migrate-recover; re-checked every 100 ms.
                lock.wait(recheckNanos: 100_000_000) { recoveryListener ?? (auto ? listener : nil) }!
            }
            guard l.waitForConnection(timeoutMs: 100) else { continue }
            let ch: MigrationChannel
            do { ch = try ChannelSetup.accept(on: l, role: .main, heartbeatTimeoutMs: host.parameters.heartbeatTimeout) } catch {
                // A peer that fails the TLS handshake does not end the pause; say why it was refused.
                updateStats { $0.errorDescription = "\(error)" }
                MigrationLog.logger.warning("refused a recovery connection: \(error)", metadata: ["side": "destination"])
                continue
            }
            returnPath.attach(ch)
            // With preempt, the source opens the new urgent channel now too: accept it (and
            // run its TLS handshake) while the main channel exchanges the bitmap.
            let urgent = capabilities.contains(.postcopyPreempt) ? try? ChannelInFlight(name: "mig/dst/urgent") { [self] abandoned in
                try ChannelSetup.accept(on: l, role: .urgent, heartbeatTimeoutMs: host.parameters.heartbeatTimeout, isAbandoned: abandoned)
            } : nil
            _ = try? advance(.recoveryConnected) { // legal: paused is the only phase here
                self.urgentInFlight = urgent
                if let t = ch.tlsDescription { $0.tls = t }
                $0.recoveryAttempts += 1
                self.channel = ch
            }
            MigrationLog.logger.info("postcopy recovery: the source reconnected (\(ch.peerDescription))", metadata: ["side": "destination"])
            // The recovery channel carries no header: it starts with RECV_BITMAP.
            return (old.continuing(on: ch), ch)
        }
    }

    /// QMP `migrate-recover`.
    func recover(_ uri: MigrationURI) throws {
        guard status == .postcopyPaused else { throw MigrationError(.state, "Migrate recover can only be run when postcopy is paused.") }
        if let pending = lock.withLock({ recoverTriggered ? recoveryListener?.boundURI : nil }) {
            throw MigrationError(.state, "Migrate recovery is triggered already (listening on \(pending)); it ends when the source connects, or when that attempt fails")
        }
        // The original address (the old port) is still ours: reuse its listener.
        let same = uri == listener.boundURI || uri == listener.uri
        let l = same ? listener : try MigrationListener(uri, tls: tls)
        let old: MigrationListener? = lock.withLock {
            defer { recoveryListener = l; recoverTriggered = true; lock.broadcast() }
            return recoveryListener
        }
        if let old, old !== listener, old !== l { old.close() }
    }
}

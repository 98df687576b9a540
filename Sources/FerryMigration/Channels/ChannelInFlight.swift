import FerrySys

/// A channel being opened on its own thread (connect or accept, with its TLS handshake)
/// while the caller goes on with something else: a recovery's urgent channel, opened on
/// both sides while the main channel's bitmap exchange runs, so its handshake is not in
/// series after POSTCOPY_RESUME.
///
/// `take` waits for the channel or the opener's error; `abandon` lets the opener finish
/// on its own and closes whatever channel it produces. Either is called once.
/// Ownership: `result` and `abandoned` are guarded by `lock`; the thread is detached.
final class ChannelInFlight: @unchecked Sendable {
    private let lock = Monitor()
    private var result: Result<MigrationChannel, any Error>?
    private var abandoned = false

    /// Runs `open` on a thread named `name`; `open` may poll its argument (abandoned?) while
    /// it waits, so an abandoned accept stops waiting for a peer.
    init(name: String, _ open: @escaping @Sendable (_ isAbandoned: () -> Bool) throws -> MigrationChannel) throws {
        try KernelThread.detached(name: name) { [self] in
            let r = Result { try open { self.lock.withLock { self.abandoned } } }
            let orphan: MigrationChannel? = lock.withLock {
                result = r
                lock.broadcast()
                return abandoned ? try? r.get() : nil
            }
            orphan?.close()
        }
    }

    /// The opened channel, or the opener's error.
    func take() throws -> MigrationChannel {
        try lock.withLock { lock.wait { result }! }.get()
    }

    /// Nobody will take the channel: closed now if it is here, else when it comes.
    func abandon() {
        let ch: MigrationChannel? = lock.withLock {
            abandoned = true
            return try? result?.get()
        }
        ch?.close()
    }
}

import CFerry
import Glibc

/// A dedicated pthread for a blocking kernel wait (KVM_RUN, userfaultfd reads, bulk sends),
/// kept off Swift's cooperative pool. The pthread_t is kept so the thread can be kicked.
///
/// Every thread is either joined (once: `join` is idempotent) or detached: dropping the last
/// reference to a thread nobody joined detaches it, so its stack is freed when it ends (a
/// per-connection thread that is never joined used to leak 8 MiB of address space).
/// Ownership: `handle` and `name` are immutable; `state` is guarded by `stateLock`.
public final class KernelThread: @unchecked Sendable {
    private final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }
    private enum LifeState { case running, joined, detached }
    public let handle: pthread_t
    public let name: String
    private let stateLock = Monitor()
    private var state = LifeState.running

    public init(name: String, _ body: @escaping @Sendable () -> Void) throws(SysError) {
        self.name = name
        let threadName = String(name.prefix(15))
        let box = Unmanaged.passRetained(Box({ ferry_set_thread_name(threadName); body() })).toOpaque()
        var t = pthread_t()
        let r = pthread_create(&t, nil, { arg in
            let b = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            b.body()
            return nil
        }, box)
        if r != 0 {
            Unmanaged<Box>.fromOpaque(box).release()
            throw SysError(errno: r, call: "pthread_create(\(name))")
        }
        handle = t
    }

    /// Starts a thread nobody will join: it frees its own resources when `body` returns.
    public static func detached(name: String, _ body: @escaping @Sendable () -> Void) throws(SysError) {
        try KernelThread(name: name, body).detach()
    }

    deinit { detach() }

    /// Waits for the thread to end. Calling it again (or after `detach`) does nothing; a
    /// thread must not join itself.
    public func join() {
        let mine: Bool = stateLock.withLock {
            guard state == .running else { return false }
            state = .joined
            return true
        }
        if mine && pthread_equal(handle, pthread_self()) == 0 { _ = pthread_join(handle, nil) }
    }

    /// Lets the thread end on its own; nobody may join it afterwards.
    public func detach() {
        let mine: Bool = stateLock.withLock {
            guard state == .running else { return false }
            state = .detached
            return true
        }
        if mine { _ = pthread_detach(handle) }
    }

    /// Sends `signal` to the thread (a kick that interrupts its blocking call). Only while
    /// the thread may still run: a joined thread's id may belong to another thread by now.
    public func kick(_ signal: Int32) {
        stateLock.withLock { if state != .joined { _ = pthread_kill(handle, signal) } }
    }
}

/// A mutex plus condition variable, for threads that park and are woken.
///
/// The pthread objects live in memory this object allocates, never in a stored property:
/// passing `&property` of a class to C is not guaranteed to pass its stable address, and a
/// mutex that moves is no mutex. Ownership: both pointers are immutable; what they point
/// to is pthread's.
public final class Monitor: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        cond = .allocate(capacity: 1)
        cond.initialize(to: pthread_cond_t())
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    @inline(__always) public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Waits (lock held by caller via withLock) until signalled or `timeoutNanos` passes.
    /// Returns false on timeout.
    @discardableResult
    public func wait(timeoutNanos: UInt64? = nil) -> Bool {
        guard let t = timeoutNanos else {
            pthread_cond_wait(cond, mutex)
            return true
        }
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        let total = UInt64(ts.tv_nsec) + t
        ts.tv_sec += Int(total / 1_000_000_000)
        ts.tv_nsec = Int(total % 1_000_000_000)
        return pthread_cond_timedwait(cond, mutex, &ts) == 0
    }

    /// The one wait-for-condition loop (lock held by the caller, inside `withLock`): asks
    /// `check` until it returns a value or throws, sleeping on the condition in between,
    /// and re-asking at least every `recheckNanos` (for conditions nobody signals).
    /// Returns nil once `deadline` (monotonic ns) has passed.
    public func wait<T>(until deadline: UInt64? = nil, recheckNanos: UInt64 = 10_000_000, _ check: () throws -> T?) rethrows -> T? {
        while true {
            if let v = try check() { return v }
            let now = Sys.monotonicNanos()
            if let deadline, now >= deadline { return nil }
            let left = deadline.map { $0 - now } ?? recheckNanos
            wait(timeoutNanos: min(left, recheckNanos))
        }
    }

    public func broadcast() { pthread_cond_broadcast(cond) }
}

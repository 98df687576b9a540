import CFerry
import Glibc

/// A dedicated pthread for a blocking kernel wait (KVM_RUN, userfaultfd reads, bulk sends),
/// kept off Swift's cooperative pool. The pthread_t is kept so the thread can be kicked.
public final class KernelThread: @unchecked Sendable {
    private final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }
    public private(set) var handle: pthread_t
    public let name: String

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

    public func join() { _ = pthread_join(handle, nil) }

    /// Sends `signal` to the thread (a kick that interrupts its blocking call).
    public func kick(_ signal: Int32) { _ = pthread_kill(handle, signal) }
}

/// A mutex plus condition variable, for threads that park and are woken.
public final class Monitor: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var cond = pthread_cond_t()

    public init() {
        pthread_mutex_init(&mutex, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(&cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(&cond)
        pthread_mutex_destroy(&mutex)
    }

    @inline(__always) public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body()
    }

    /// Waits (lock held by caller via withLock) until signalled or `timeoutNanos` passes.
    /// Returns false on timeout.
    @discardableResult
    public func wait(timeoutNanos: UInt64? = nil) -> Bool {
        guard let t = timeoutNanos else {
            pthread_cond_wait(&cond, &mutex)
            return true
        }
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        let total = UInt64(ts.tv_nsec) + t
        ts.tv_sec += Int(total / 1_000_000_000)
        ts.tv_nsec = Int(total % 1_000_000_000)
        return pthread_cond_timedwait(&cond, &mutex, &ts) == 0
    }

    public func broadcast() { pthread_cond_broadcast(&cond) }
}

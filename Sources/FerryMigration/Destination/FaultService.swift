import FerryMachine
import FerryMemory
import FerrySys
import FerryWire
import Glibc

/// Userfaultfd over guest RAM and the thread that reads it (`mig/dst/fault`), from
/// POSTCOPY_LISTEN until every page is here or the process goes away. `stop` is
/// idempotent and safe from any thread (the main thread at the end, QMP or a signal
/// handler's thread at exit): one wake, one join, one unregister, one close.
/// Ownership: `uffd`, `stopFd` and `block` are immutable; `thread`, `stopped` and
/// `finished` are guarded by `lock`.
final class FaultService: @unchecked Sendable {
    let uffd: Userfaultfd
    let block: RAMBlock
    private let stopFd: Int32
    private let lock = Monitor()
    private var thread: KernelThread?
    private var stopped = false
    private var finished = false

    init(block: RAMBlock) throws {
        let u = try Userfaultfd()
        try u.register(block.host, length: block.length)
        uffd = u
        self.block = block
        stopFd = try Sys.eventfd()
    }

    deinit { Sys.close(stopFd) }

    func start(_ loop: @escaping @Sendable () -> Void) throws {
        let t = try KernelThread(name: "mig/dst/fault", loop)
        lock.withLock { thread = t }
    }

    /// Waits for the next batch of events; false once stopped.
    func waitForFaults() -> Bool {
        let pollIn = Int16(POLLIN)
        var fds: [pollfd] = [pollfd(fd: uffd.fd, events: pollIn, revents: 0), pollfd(fd: stopFd, events: pollIn, revents: 0)]
        while poll(&fds, 2, -1) < 0 {
            if errno != EINTR { return false }
        }
        return fds[1].revents == 0
    }

    /// Wakes and joins the fault thread and unregisters guest RAM (which wakes every thread
    /// waiting on a missing page). A second caller waits until the first is done.
    func stop() {
        let mine: Bool = lock.withLock { defer { stopped = true }; return !stopped }
        guard mine else {
            lock.withLock { _ = lock.wait { finished ? true : nil } }
            return
        }
        var one: UInt64 = 1
        _ = write(stopFd, &one, 8)
        lock.withLock { thread }?.join()
        uffd.unregister(block.host, length: block.length)
        lock.withLock { finished = true; lock.broadcast() }
    }
}

extension IncomingMigration {
    /// Turns each fault into a page request, once per page, straight onto the return path.
    /// While paused the requests are only recorded; RESUME re-sends them.
    func faultLoop(_ service: FaultService) {
        let block = service.block
        let base = UInt64(UInt(bitPattern: block.host))
        // The vCPU threads start at RUN, after this thread: learn their ids as they fault.
        var vcpuOfThread: [UInt32: Int] = [:]
        while service.waitForFaults() {
            while true {
                let event: Userfaultfd.Event?
                do { event = try service.uffd.readEvent() } catch { event = nil } // EAGAIN or a closed fd: back to poll
                guard let event else { break }
                guard case let .pageFault(address, _, tid) = event, address >= base else { continue }
                let page = Int((address - base) >> UInt64(Wire.pageShift))
                guard page < block.pageCount, !received.test(page) else { continue }
                if vcpuOfThread[tid] == nil {
                    for (i, t) in machine.vcpuThreadIDs.enumerated() where t != 0 { vcpuOfThread[t] = i }
                }
                faults.faulted(page: page, vcpu: vcpuOfThread[tid])
                if !requested.testAndSet(page) { requestPage(page) }
                // Installed between our check and the record: resolve it now.
                if received.test(page) { faults.installed(page: page) }
            }
        }
    }

    /// Asks the source for one page, if requests flow now (not while paused).
    func requestPage(_ page: Int) {
        if returnPath.requestPage(page, block: machine.ram.name, allowed: { lock.withLock { phase.requestsFlow } }) {
            faults.requested(page: page)
        }
    }
}

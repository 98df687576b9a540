import Glibc

extension Sys {
    /// Starts `executable` with `arguments` (argv[1...]): the one process spawner, for
    /// exec: migration commands and for the harness's ferry and QEMU children.
    /// `fdMap` duplicates our fds onto the child's (e.g. a socketpair end as its stdin);
    /// `ownProcessGroup` puts it in a new group, so one kill ends it and what it started.
    /// The child's signal mask is cleared: a parent that blocks SIGINT/SIGTERM for sigwait
    /// must not hand that on.
    public static func spawn(_ executable: String, _ arguments: [String], fdMap: [(from: Int32, to: Int32)] = [],
                             ownProcessGroup: Bool = false) throws(SysError) -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for m in fdMap { posix_spawn_file_actions_adddup2(&actions, m.from, m.to) }
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var flags = Int32(POSIX_SPAWN_SETSIGMASK)
        if ownProcessGroup {
            flags |= Int32(POSIX_SPAWN_SETPGROUP)
            posix_spawnattr_setpgroup(&attr, 0)
        }
        posix_spawnattr_setflags(&attr, Int16(flags))
        var pid: pid_t = 0
        var cargs = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        let r = posix_spawn(&pid, executable, &actions, &attr, &cargs, environ)
        guard r == 0 else { throw SysError(errno: r, call: "posix_spawn(\(executable))") }
        return pid
    }
}

#!/usr/bin/env python3
"""Drives two `ferry run` processes with the standard QMP client (qemu.qmp from PyPI),
exactly as QEMU management tools do, and checks every command and event Ferry claims.
Usage: qmp_client_check.py FERRY_BINARY. Exits non-zero with a message on any mismatch."""
import asyncio, os, subprocess, sys, tempfile, time
from qemu.qmp import QMPClient, ExecuteError

FERRY = sys.argv[1]
MEM = 64 << 20

def check(cond, what):
    if not cond:
        print("FAIL:", what)
        sys.exit(1)
    print("ok:", what)

async def connect(path):
    c = QMPClient("ferry")
    for _ in range(200):
        try:
            await c.connect(path)
            return c
        except Exception:
            await asyncio.sleep(0.05)
    raise SystemExit(f"cannot connect to {path}")

async def main():
    d = tempfile.mkdtemp(prefix="ferry-qmp-")
    src = subprocess.Popen([FERRY, "run", "--memory", str(MEM), "--qmp", f"{d}/src.qmp", "--serial", f"{d}/src.log"])
    dst = subprocess.Popen([FERRY, "run", "--memory", str(MEM), "--qmp", f"{d}/dst.qmp", "--serial", f"{d}/dst.log", "--incoming", "defer"])
    extra = []
    try:
        s = await connect(f"{d}/src.qmp")
        t = await connect(f"{d}/dst.qmp")
        check(oct(os.stat(f"{d}/src.qmp").st_mode & 0o777) == "0o600", "QMP socket has mode 0600")
        st = await s.execute("query-status")
        check(st["status"] == "running" and st["running"], f"source query-status running: {st}")
        st = await t.execute("query-status")
        check(st["status"] == "inmigrate", f"destination query-status inmigrate: {st}")

        with s.listener() as events:
            await s.execute("stop")
            ev = await asyncio.wait_for(events.get(), 5)
            check(ev["event"] == "STOP" and "seconds" in ev["timestamp"], f"STOP event with timestamp: {ev}")
            check((await s.execute("query-status"))["status"] == "paused", "paused after stop")
            await s.execute("cont")
            ev = await asyncio.wait_for(events.get(), 5)
            check(ev["event"] == "RESUME", f"RESUME event: {ev}")

        try:
            await s.execute("no-such-command")
            check(False, "unknown command refused")
        except ExecuteError as e:
            check(e.error_class == "CommandNotFound", f"unknown command gives CommandNotFound ({e.error_class})")
        try:
            await s.execute("migrate", {"uri": "bogus:thing"})
            check(False, "bad URI refused")
        except ExecuteError as e:
            check(e.error_class == "GenericError" and "URI" in str(e), f"bad URI gives GenericError: {e}")

        for c in (s, t):
            await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        caps = await s.execute("query-migrate-capabilities")
        check({"capability": "events", "state": True} in caps, "events capability reported on")
        await s.execute("migrate-set-parameters", {"max-bandwidth": 0, "downtime-limit": 250})
        p = await s.execute("query-migrate-parameters")
        check(p["max-bandwidth"] == 0 and p["downtime-limit"] == 250, f"parameters round-trip: {p}")

        # a migration that is cancelled, then one that completes
        await t.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        addr = (await t.execute("query-migrate"))["socket-address"][0]
        uri = f"tcp:{addr['host']}:{addr['port']}"
        # The guest must be walking its memory (two passes printed) so the migration cannot
        # converge within 1 ms of downtime, however loaded the machine is.
        deadline = time.time() + 60
        while time.time() < deadline and open(f"{d}/src.log", "rb").read().count(b"B") < 2:
            await asyncio.sleep(0.05)
        with s.listener() as events:
            await s.execute("migrate-set-parameters", {"max-bandwidth": 30_000_000, "downtime-limit": 1})
            await s.execute("migrate", {"uri": uri})
            seen = []
            deadline = time.time() + 20
            # As QEMU: MIGRATION_PASS 1 is the sync at setup, 2 the end of the first pass.
            while time.time() < deadline and not any(e["event"] == "MIGRATION_PASS" and e["data"]["pass"] >= 2 for e in seen):
                seen.append(await asyncio.wait_for(events.get(), 20))
            q = await s.execute("query-migrate")
            check(q["status"] == "active" and q["ram"]["transferred"] > 0 and "expected-downtime" in q, f"query-migrate while active: {q['status']}")
            await s.execute("migrate_cancel")
            while True:
                e = await asyncio.wait_for(events.get(), 10)
                seen.append(e)
                if e["event"] == "MIGRATION" and e["data"]["status"] == "cancelled":
                    break
            statuses = [e["data"]["status"] for e in seen if e["event"] == "MIGRATION"]
            check(statuses == ["setup", "active", "cancelling", "cancelled"], f"MIGRATION events for a cancelled migration: {statuses}")
        check((await s.execute("query-status"))["status"] == "running", "source running after cancel")

        # the destination failed when its source went away; start a new one
        dst.terminate(); dst.wait()
        dst = subprocess.Popen([FERRY, "run", "--memory", str(MEM), "--qmp", f"{d}/dst2.qmp", "--serial", f"{d}/dst2.log", "--incoming", "defer"])
        t = await connect(f"{d}/dst2.qmp")
        await t.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        await t.execute("migrate-incoming", {"uri": f"unix:{d}/mig.sock"})
        with s.listener() as events, t.listener() as devents:
            await s.execute("migrate-set-parameters", {"max-bandwidth": 0, "downtime-limit": 300})
            await s.execute("migrate", {"uri": f"unix:{d}/mig.sock"})
            names = []
            while True:
                e = await asyncio.wait_for(events.get(), 60)
                names.append(e["event"] + ("/" + e["data"]["status"] if e["event"] == "MIGRATION" else ""))
                if e["event"] == "MIGRATION" and e["data"]["status"] in ("completed", "failed"):
                    break
            check(names[-1] == "MIGRATION/completed" and "STOP" in names and "MIGRATION_PASS" in names, f"source events: {names}")
            dn = []
            while True:
                e = await asyncio.wait_for(devents.get(), 20)
                dn.append(e["event"] + ("/" + e["data"]["status"] if e["event"] == "MIGRATION" else ""))
                if e["event"] == "MIGRATION" and e["data"]["status"] in ("completed", "failed"):
                    break
            check("RESUME" in dn and dn[-1] == "MIGRATION/completed", f"destination events: {dn}")
        q = await s.execute("query-migrate")
        check(q["status"] == "completed" and q["downtime"] >= 0 and q["total-time"] > 0, f"completed query-migrate: downtime {q.get('downtime')} ms, total {q.get('total-time')} ms")
        check((await s.execute("query-status"))["status"] == "postmigrate", "source postmigrate")
        time.sleep(1.0)
        await t.execute("stop")
        await t.execute("pmemsave", {"val": 0, "size": MEM, "filename": f"{d}/ram.bin"})
        r = subprocess.run([FERRY, "check-memory", f"{d}/ram.bin", "--memory", str(MEM)], capture_output=True, text=True)
        check(r.returncode == 0, f"destination memory: {r.stdout.strip()} {r.stderr.strip()}")
        try:
            await t.execute("pmemsave", {"val": MEM, "size": 4096, "filename": f"{d}/x.bin"})
            check(False, "pmemsave outside RAM refused")
        except ExecuteError as e:
            check("not guest RAM" in str(e), "pmemsave outside RAM refused")

        # postcopy with a forced pause and a recovery, driven only by qemu.qmp:
        # the destination above is the source now, a third process the destination
        await t.execute("cont")
        dst3 = subprocess.Popen([FERRY, "run", "--memory", str(MEM), "--qmp", f"{d}/dst3.qmp", "--serial", f"{d}/dst3.log", "--incoming", "defer"])
        extra.append(dst3)
        u = await connect(f"{d}/dst3.qmp")
        for c in (t, u):
            await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}, {"capability": "postcopy-ram", "state": True}]})
        await u.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        a3 = (await u.execute("query-migrate"))["socket-address"][0]
        uri3 = f"tcp:{a3['host']}:{a3['port']}"
        await t.execute("migrate-set-parameters", {"max-bandwidth": 5_000_000, "max-postcopy-bandwidth": 1_000_000})
        async def until(listener, status, seen):
            while True:
                e = await asyncio.wait_for(listener.get(), 30)
                if e["event"] == "MIGRATION":
                    seen.append(e["data"]["status"])
                    if e["data"]["status"] == status:
                        return
        with t.listener() as te, u.listener() as ue:
            ts, us = [], []
            await t.execute("migrate", {"uri": uri3})
            await t.execute("migrate-start-postcopy")
            await until(te, "postcopy-active", ts)
            try:
                await t.execute("migrate_cancel")
                check(False, "migrate_cancel refused in postcopy")
            except ExecuteError as e:
                check("cannot cancel" in str(e), f"migrate_cancel refused in postcopy: {e}")
            await t.execute("migrate-pause")
            await until(te, "postcopy-paused", ts)
            await until(ue, "postcopy-paused", us)
            q = await t.execute("query-migrate")
            check(q["status"] == "postcopy-paused" and "error-desc" in q, f"paused source reports why: {q.get('error-desc')}")
            await u.execute("migrate-recover", {"uri": uri3})
            await t.execute("migrate", {"uri": uri3, "resume": True})
            await until(te, "postcopy-active", ts)
            await t.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 0})
            await until(te, "completed", ts)
            await until(ue, "completed", us)
            check(ts[-5:] == ["postcopy-paused", "postcopy-recover-setup", "postcopy-recover", "postcopy-active", "completed"], f"source recovery events: {ts}")
            check(us[-4:] == ["postcopy-paused", "postcopy-recover", "postcopy-active", "completed"], f"destination recovery events: {us}")
        q = await t.execute("query-migrate")
        check(q["x-postcopy-recovery"]["recoveries"] == 1 and q["x-postcopy-recovery"]["bitmap-bytes"] > 0, f"recovery stats: {q['x-postcopy-recovery']}")
        time.sleep(0.5)
        await u.execute("stop")
        await u.execute("pmemsave", {"val": 0, "size": MEM, "filename": f"{d}/ram3.bin"})
        r = subprocess.run([FERRY, "check-memory", f"{d}/ram3.bin", "--memory", str(MEM)], capture_output=True, text=True)
        check(r.returncode == 0, f"memory after postcopy recovery: {r.stdout.strip()}")
        await u.disconnect()

        await s.execute("quit")
        src.wait(timeout=5)
        check(src.returncode == 0, "quit ends the source process")
        await t.disconnect()
        try:
            await s.disconnect()  # the server has quit; the client may report EOF
        except Exception:
            pass
    finally:
        for p in [src, dst] + extra:
            if p.poll() is None:
                p.kill()
    print("qemu.qmp check passed")

asyncio.run(main())

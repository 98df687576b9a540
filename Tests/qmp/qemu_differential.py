#!/usr/bin/env python3
"""The same migration scenarios run by QEMU and by Ferry, driven by this one script through
the standard QMP client (qemu.qmp), comparing what a client sees:

  precopy   the client waits for the second pass, then raises downtime-limit so it converges
  postcopy  the client switches to postcopy when dirty-sync-count reaches 2
  recovery  postcopy at once (most of RAM left for postcopy), migrate-pause on the source,
            migrate-recover + migrate resume=true

Compared: the MIGRATION statuses on both sides, the MIGRATION_PASS numbers,
dirty-sync-count when the second pass starts, query-migrate's keys and their JSON types in
each state, the capability and parameter names both have, the error classes of the same
bad commands, and HMP's `info migrate` line labels. A difference is a failure unless it is
in DELIBERATE (each listed in the README with its reason).

Usage: qemu_differential.py QEMU FERRY [TABLE.md]  (exit 1 on an undocumented difference)
"""
import asyncio, json, os, shutil, socket, subprocess, sys, tempfile, time
from qemu.qmp import QMPClient, ExecuteError

QEMU, FERRY = sys.argv[1], sys.argv[2]
TABLE = sys.argv[3] if len(sys.argv) > 3 else None
MEM = 64 << 20
# Deliberate differences: observable -> why (the README lists the same).
DELIBERATE = {
    "capabilities only in ferry": "Ferry has auto-recover (its own) and QEMU 8+'s switchover-ack, dirty-limit, mapped-ram names",
    "capabilities only in qemu": "block, compress and zero-blocks: QEMU 9.1 removed them; Ferry lists master's capabilities",
    "parameters only in ferry": "Ferry's own tunables: heartbeat-timeout, auto-recover-timeout, postcopy-device-timeout, postcopy-auto-switch-passes",
    "parameters only in qemu": "QEMU's compression, multifd, announce and block parameters: Ferry does not have those features (yet: multifd)",
    "query-migrate keys only in ferry": "Ferry's x- fields (x-guest-clock-gap-us, x-postcopy-recovery, x-postcopy-fault-latency, x-auto-postcopy, x-tls) and QEMU 8+'s postcopy-latency fields",
    "query-migrate keys only in qemu": "none expected",
    "statuses": "Ferry reports QEMU master's states, which 7.2 does not have: device (the guest is stopped for the "
                "switch-over), postcopy-device (until the destination runs the guest, 10.1+) and postcopy-recover-setup "
                "(9.1+); 7.2's destination also reports setup when migrate-recover starts listening, Ferry's stays "
                "postcopy-paused",
}
# QEMU's names 7.2 lacks (Ferry's sequences compare equal without them).
MASTER_ONLY_STATUSES = {"device", "postcopy-device", "postcopy-recover-setup"}


def normalised(statuses, engine):
    if engine == "ferry":
        return dedupe([s for s in statuses if s not in MASTER_ONLY_STATUSES])
    # 7.2's destination: postcopy-paused, setup, postcopy-recover
    return [s for i, s in enumerate(statuses) if not (s == "setup" and i > 0 and statuses[i - 1] == "postcopy-paused")]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class VM:
    """One QEMU or Ferry process with the same test guest, QMP on a unix socket."""

    def __init__(self, engine, work, name, incoming):
        self.engine, self.name = engine, name
        self.qmp_path = f"{work}/{engine}-{name}.qmp"
        serial = f"{work}/{engine}-{name}.log"
        if engine == "qemu":
            img = f"{work}/guest.img"
            if not os.path.exists(img):
                subprocess.run([FERRY, "guest-image", "--memory", str(MEM), "--output", img], check=True, stdout=subprocess.DEVNULL)
            argv = [QEMU, "-machine", "pc,accel=kvm", "-m", f"{MEM >> 20}M", "-drive", f"file={img},format=raw,if=ide",
                    "-display", "none", "-vga", "none", "-nodefaults", "-serial", f"file:{serial}",
                    "-qmp", f"unix:{self.qmp_path},server=on,wait=off"] + (["-incoming", "defer"] if incoming else [])
        else:
            argv = [FERRY, "run", "--memory", str(MEM), "--qmp", self.qmp_path, "--serial", serial] + (["--incoming", "defer"] if incoming else [])
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(f"{work}/{engine}-{name}.err", "w"))
        self.events = []

    async def connect(self):
        self.c = QMPClient(self.name)
        for _ in range(400):
            try:
                await self.c.connect(self.qmp_path)
                break
            except Exception:
                await asyncio.sleep(0.05)
        else:
            raise SystemExit(f"{self.engine} {self.name}: no QMP socket")
        self.t0 = time.time()
        asyncio.get_running_loop().create_task(self._collect())
        await self.c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})

    async def _collect(self):
        async for e in self.c.events:
            self.events.append((time.time(), e))

    async def run(self, cmd, args=None):
        return await self.c.execute(cmd, args)

    async def error_class(self, cmd, args=None):
        try:
            await self.c.execute(cmd, args)
            return "(accepted)"
        except ExecuteError as e:
            return e.error_class

    async def error_text(self, cmd, args=None):
        try:
            await self.c.execute(cmd, args)
            return "(accepted)"
        except ExecuteError as e:
            return f"{e.error_class}: {e}"

    async def wait_guest_walking(self, work, seconds=120):
        """Until the guest's RAM changes between two looks (pmemsave of 4 MiB at 1 MiB):
        QEMU boots SeaBIOS first, at this host's ~1.5 M instructions a second."""
        path, last = f"{work}/{self.engine}-{self.name}.peek", None
        deadline = time.time() + seconds
        while time.time() < deadline:
            await self.c.execute("pmemsave", {"val": 0x100000, "size": 0x400000, "filename": path})
            now = open(path, "rb").read()
            if last is not None and now != last:
                return
            last = now
            await asyncio.sleep(0.2)
        raise SystemExit(f"{self.engine} {self.name}: the guest never started walking its RAM")

    def statuses(self):
        return [e["data"]["status"] for _, e in self.events if e["event"] == "MIGRATION"]

    def passes(self):
        return [e["data"]["pass"] for _, e in self.events if e["event"] == "MIGRATION_PASS"]

    async def wait_status(self, wanted, seconds=60):
        deadline = time.time() + seconds
        while time.time() < deadline:
            if any(s in wanted for s in self.statuses()):
                return True
            await asyncio.sleep(0.02)
        return False

    async def close(self):
        try:
            await self.c.execute("quit", {"x-force": True} if self.engine == "ferry" else None)
        except Exception:
            pass
        try:
            await self.c.disconnect()
        except Exception:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def shape(v):
    """JSON type names of a query-migrate result: key -> type, nested dicts flattened."""
    out = {}
    for k, x in v.items():
        if isinstance(x, dict):
            for k2, t in shape(x).items():
                out[f"{k}.{k2}"] = t
        else:
            out[k] = "bool" if isinstance(x, bool) else "number" if isinstance(x, (int, float)) else type(x).__name__
    return out


async def poll_shapes(vm, shapes, stop):
    """query-migrate every 50 ms: key/type sets by status."""
    while not stop.is_set():
        try:
            q = await vm.run("query-migrate")
            if "status" in q:
                shapes.setdefault(q["status"], {}).update(shape(q))
        except Exception:
            pass
        await asyncio.sleep(0.05)


async def scenario(engine, kind, work):
    src, dst = VM(engine, work, f"{kind}-src", False), VM(engine, work, f"{kind}-dst", True)
    result = {}
    try:
        await src.connect()
        await dst.connect()
        await src.wait_guest_walking(work)
        post = kind in ("postcopy", "recovery")
        if post:
            for vm in (src, dst):
                await vm.run("migrate-set-capabilities", {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
        await src.run("migrate-set-parameters", {"max-bandwidth": 32_000_000, "downtime-limit": 50,
                                                 **({"max-postcopy-bandwidth": 8_000_000} if post else {})})
        port = free_port()
        await dst.run("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        shapes, stop = {}, asyncio.Event()
        poller = asyncio.get_running_loop().create_task(poll_shapes(src, shapes, stop))
        t_start = time.time()
        await src.run("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        if kind == "recovery":
            await src.wait_status(["active"], 30)
            await src.run("migrate-start-postcopy")
        # The client acts when the second pass starts, on the event.
        deadline = time.time() + 60
        while time.time() < deadline and 2 not in src.passes():
            await asyncio.sleep(0.01)
        result["switch at (s)"] = round(time.time() - t_start, 2)
        q = await src.run("query-migrate")
        result["dirty-sync-count at pass 2"] = q.get("ram", {}).get("dirty-sync-count")
        result["hmp info migrate labels"] = sorted({l.split(":")[0] for l in (await src.run("human-monitor-command", {"command-line": "info migrate"})).splitlines() if ":" in l})
        if kind == "precopy":
            await src.run("migrate-set-parameters", {"downtime-limit": 60_000})
        elif kind == "postcopy":
            await src.run("migrate-start-postcopy")
        if kind == "recovery":
            ok = await src.wait_status(["postcopy-active"], 30) and await dst.wait_status(["postcopy-active"], 30)
            await asyncio.sleep(0.3)  # both sides well inside postcopy
            await src.run("migrate-pause")
            ok = ok and await src.wait_status(["postcopy-paused"], 30) and await dst.wait_status(["postcopy-paused"], 30)
            result["paused both sides"] = ok
            port2 = free_port()
            await dst.run("migrate-recover", {"uri": f"tcp:127.0.0.1:{port2}"})
            await src.run("migrate", {"uri": f"tcp:127.0.0.1:{port2}", "resume": True})
        done = await src.wait_status(["completed", "failed"], 120) and await dst.wait_status(["completed", "failed"], 30)
        await asyncio.sleep(0.3)
        stop.set()
        await poller
        result["source statuses"] = dedupe(src.statuses())
        result["destination statuses"] = dedupe(dst.statuses())
        p = src.passes()
        result["passes consecutive from 1"] = p[:1] == [1] and p == list(range(1, len(p) + 1))
        result["passes"] = len(p)
        result["completed"] = done and src.statuses()[-1] == "completed"
        result["shapes"] = shapes
        result["total (s)"] = round(time.time() - t_start, 2)
        if kind == "precopy":
            result["capabilities"] = sorted(c["capability"] for c in await src.run("query-migrate-capabilities"))
            result["parameters"] = sorted((await src.run("query-migrate-parameters")).keys())
            bad = {
                "unknown command": ("no-such-command", None),
                "migrate without uri": ("migrate", {}),
                "unknown capability": ("migrate-set-capabilities", {"capabilities": [{"capability": "warp-drive", "state": True}]}),
                "downtime-limit wrong type": ("migrate-set-parameters", {"downtime-limit": "soon"}),
                "unknown parameter": ("migrate-set-parameters", {"warp-factor": 9}),
                "start-postcopy without postcopy-ram": ("migrate-start-postcopy", None),
                "migrate-pause outside postcopy": ("migrate-pause", None),
                "migrate-recover on a source": ("migrate-recover", {"uri": "tcp:127.0.0.1:1"}),
                "migrate to a bad URI": ("migrate", {"uri": "bogus:thing"}),
                "migrate resume with nothing paused": ("migrate", {"uri": "tcp:127.0.0.1:1", "resume": True}),
            }
            result["errors"] = {k: await src.error_class(c, a) for k, (c, a) in bad.items()}
            # Values out of QEMU's ranges: the same class and the same words.
            out_of_range = {"xbzrle-cache-size 12288": {"xbzrle-cache-size": 12288}, "cpu-throttle-initial 0": {"cpu-throttle-initial": 0},
                            "cpu-throttle-increment 100": {"cpu-throttle-increment": 100}, "max-cpu-throttle 100": {"max-cpu-throttle": 100},
                            "throttle-trigger-threshold 0": {"throttle-trigger-threshold": 0}}
            result["range errors"] = {k: await src.error_text("migrate-set-parameters", a) for k, a in out_of_range.items()}
    finally:
        await src.close()
        await dst.close()
    return result


def dedupe(xs):
    out = []
    for x in xs:
        if not out or out[-1] != x:
            out.append(x)
    return out


async def main():
    work = tempfile.mkdtemp(prefix="ferry-diff-")
    rows, failures = [], []

    def compare(what, q, f, deliberate=None):
        same = q == f
        note = "same" if same else ("deliberate: " + DELIBERATE[deliberate] if deliberate in DELIBERATE and DELIBERATE[deliberate] != "none expected" else "DIFFERENT")
        if note == "DIFFERENT":
            failures.append(f"{what}: QEMU {q} vs Ferry {f}")
        rows.append((what, q, f, note))

    try:
        res = {}
        qemu_failures = []
        for kind in ("precopy", "postcopy", "recovery"):
            for engine in ("qemu", "ferry"):
                # QEMU 7.2 itself sometimes loses a destination in the recovery scenario (the
                # races Ferry's recovery tests are about): try it again, and say so. Ferry
                # gets one try.
                for attempt in range(3 if engine == "qemu" else 1):
                    try:
                        res[(engine, kind)] = await scenario(engine, kind, work)
                        break
                    except Exception as e:
                        if engine == "ferry" or attempt == 2:
                            raise
                        qemu_failures.append(f"{kind}: {type(e).__name__} {e}")
                print(f"{engine} {kind}: {json.dumps({k: v for k, v in res[(engine, kind)].items() if k != 'shapes'})}", flush=True)
        for kind in ("precopy", "postcopy", "recovery"):
            q, f = res[("qemu", kind)], res[("ferry", kind)]
            compare(f"{kind}: completed", q["completed"], f["completed"])
            for side in ("source", "destination"):
                qs, fs = q[f"{side} statuses"], f[f"{side} statuses"]
                if qs != fs and normalised(qs, "qemu") == normalised(fs, "ferry"):
                    rows.append((f"{kind}: {side} MIGRATION statuses", qs, fs, "deliberate: " + DELIBERATE["statuses"]))
                else:
                    compare(f"{kind}: {side} MIGRATION statuses", qs, fs)
            compare(f"{kind}: MIGRATION_PASS numbered 1, 2, 3, ...", q["passes consecutive from 1"], f["passes consecutive from 1"])
            if kind == "recovery":
                # Postcopy at once: Ferry syncs twice at the switch-over (before the early
                # discards, after the stop), so a read right after MIGRATION_PASS 2 may see 3.
                rows.append((f"{kind}: dirty-sync-count read after MIGRATION_PASS 2", q["dirty-sync-count at pass 2"], f["dirty-sync-count at pass 2"], "measured, not compared"))
            else:
                compare(f"{kind}: dirty-sync-count when pass 2 starts", q["dirty-sync-count at pass 2"], f["dirty-sync-count at pass 2"])
            rows.append((f"{kind}: pass 2 starts at (s) / passes / total (s)", f"{q['switch at (s)']} / {q['passes']} / {q['total (s)']}",
                         f"{f['switch at (s)']} / {f['passes']} / {f['total (s)']}", "measured, not compared"))
            if kind == "recovery":
                compare("recovery: both sides postcopy-paused after migrate-pause", q["paused both sides"], f["paused both sides"])
            for status in sorted(set(q["shapes"]) | set(f["shapes"])):
                qs, fs = q["shapes"].get(status, {}), f["shapes"].get(status, {})
                if not qs or not fs:
                    continue  # a state one engine passed through between two polls
                compare(f"{kind}: query-migrate keys only in QEMU ({status})", sorted(set(qs) - set(fs)), [], "query-migrate keys only in qemu")
                extra = sorted(set(fs) - set(qs))
                if extra:
                    rows.append((f"{kind}: query-migrate keys only in Ferry ({status})", "", ", ".join(extra), "deliberate: " + DELIBERATE["query-migrate keys only in ferry"]))
                types = sorted(k for k in set(qs) & set(fs) if qs[k] != fs[k])
                compare(f"{kind}: query-migrate key types differ ({status})", [], [f"{k}: {qs[k]} vs {fs[k]}" for k in types])
        q, f = res[("qemu", "precopy")], res[("ferry", "precopy")]
        compare("HMP info migrate labels", q["hmp info migrate labels"], f["hmp info migrate labels"])
        qc, fc = set(q["capabilities"]), set(f["capabilities"])
        compare("capabilities only in QEMU", sorted(qc - fc), [], "capabilities only in qemu")
        rows.append(("capabilities only in Ferry", "", ", ".join(sorted(fc - qc)), "deliberate: " + DELIBERATE["capabilities only in ferry"]))
        qp, fp = set(q["parameters"]), set(f["parameters"])
        rows.append(("parameters only in QEMU", ", ".join(sorted(qp - fp)), "", "deliberate: " + DELIBERATE["parameters only in qemu"]))
        rows.append(("parameters only in Ferry", "", ", ".join(sorted(fp - qp)), "deliberate: " + DELIBERATE["parameters only in ferry"]))
        for k in q["errors"]:
            compare(f"error class: {k}", q["errors"][k], f["errors"][k])
        for k in q["range errors"]:
            compare(f"error: {k}", q["range errors"][k], f["range errors"][k])
        rows.append(("scenario runs that failed and were run again", "; ".join(qemu_failures) or "none", "none (one try)", "QEMU's own failures"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if TABLE:
        with open(TABLE, "w") as out:
            out.write("# QEMU 7.2 vs Ferry: what a QMP client sees\n\n")
            out.write("Written by `python3 Tests/qmp/qemu_differential.py /usr/bin/qemu-system-x86_64 .build/debug/ferry docs/qemu-differential.md` "
                      f"(run in CI by QEMUDifferentialTests) on {time.strftime('%Y-%m-%d')}. 64 MiB test guest walking its RAM, max-bandwidth "
                      "32 MB/s, max-postcopy-bandwidth 8 MB/s, loopback TCP. Times are one run's, on a 2-core machine.\n\n")
            out.write("| observable | QEMU 7.2 | Ferry | |\n|---|---|---|---|\n")
            for what, qv, fv, note in rows:
                cell = lambda v: str(v).replace("|", "/")
                out.write(f"| {what} | {cell(qv)} | {cell(fv)} | {note} |\n")
    for what, qv, fv, note in rows:
        print(f"{note:>10.10}  {what}: QEMU {qv} | Ferry {fv}")
    if failures:
        print("\nUNDOCUMENTED DIFFERENCES:\n" + "\n".join(failures))
        sys.exit(1)
    print("\nno undocumented difference")


asyncio.run(main())

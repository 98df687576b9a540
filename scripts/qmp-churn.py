#!/usr/bin/env python3
"""QMP connect/disconnect churn against a running ferry VM (issue 12's leak check).

Starts `ferry run` with the test guest, then opens and closes CYCLES QMP connections: half
send qmp_capabilities + query-migrate-capabilities and close before reading the replies
(mid-reply), half connect and close at once. Prints the process's RSS and number of memory
mappings before, during and after, checks it still answers, then stops the guest, dumps its
RAM and runs `ferry check-memory` on it.

    python3 scripts/qmp-churn.py [CYCLES] [FERRY]     (default 100000, .build/release/ferry)
"""
import json, os, socket, subprocess, sys, tempfile, time

cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
ferry = sys.argv[2] if len(sys.argv) > 2 else ".build/release/ferry"
memory = 64 << 20
work = tempfile.mkdtemp(prefix="ferry-churn-")
sock = os.path.join(work, "vm.qmp")


def footprint(pid):
    rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
    maps = sum(1 for _ in open(f"/proc/{pid}/maps"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return rss, maps, threads


def command(name, args=None):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock)
    f = s.makefile("rwb")
    f.readline()
    for n, a in (("qmp_capabilities", None), (name, args)):
        msg = {"execute": n}
        if a:
            msg["arguments"] = a
        f.write(json.dumps(msg).encode() + b"\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "event" not in r:
                break
    s.close()
    if "error" in r:
        raise RuntimeError(r["error"])
    return r["return"]


vm = subprocess.Popen([ferry, "run", "--memory", str(memory), "--serial", "none", "--qmp", sock])
for _ in range(500):
    if os.path.exists(sock):
        break
    time.sleep(0.01)
time.sleep(1.0)
print(f"cycles: {cycles}, ferry pid {vm.pid}")
rows = [("boot", 0) + footprint(vm.pid)]
mid = (b'{"execute":"qmp_capabilities"}\n{"execute":"query-migrate-capabilities"}\n'
       b'{"execute":"query-commands"}\n')
# Warm-up: glibc creates its per-thread malloc arenas (a few mappings each, bounded by
# 8 x cores) the first time many threads allocate at once; measured growth starts after.
for i in range(5000):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    if i % 2 == 0:
        s.sendall(b'{"execute":"qmp_capabilities"}\n')
    s.close()
time.sleep(1.0)
rows.append(("after warm-up", 0) + footprint(vm.pid))
t0 = time.monotonic()
for i in range(cycles):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sock)
        if i % 2 == 0:
            s.sendall(mid)
    except OSError as e:
        print(f"cycle {i}: {e}")
    s.close()
    if (i + 1) % (cycles // 5) == 0:
        rows.append((f"after {i + 1}", time.monotonic() - t0) + footprint(vm.pid))
time.sleep(1.0)
rows.append(("settled", time.monotonic() - t0) + footprint(vm.pid))
print(f"{'point':>14} {'s':>7} {'RSS KiB':>9} {'mappings':>9} {'threads':>8}")
for r in rows:
    print(f"{r[0]:>14} {r[1]:7.1f} {r[2]:9d} {r[3]:9d} {r[4]:8d}")
alive = vm.poll() is None
status = command("query-status")["status"]
print(f"alive: {alive}, query-status: {status}")
command("stop")
dump = os.path.join(work, "ram.bin")
command("pmemsave", {"val": 0, "size": memory, "filename": dump})
check = subprocess.run([ferry, "check-memory", dump, "--memory", str(memory)], capture_output=True, text=True)
print("memory check:", check.stdout.strip().splitlines()[0] if check.stdout else check.stderr.strip())
command("quit")
vm.wait(10)
ok = alive and check.returncode == 0 and rows[-1][3] <= rows[1][3] + 16
sys.exit(0 if ok else 1)

#!/usr/bin/env python3
"""The guest's clock against the host's while the guest is throttled at LEVEL %, by one of the
two mechanisms livemig uses (issue 14 item 10; BENCHMARKS.md "Throttling"):

  stun   QMP stop/cont, a fraction of every 100 ms, as the shared engine does
  qemu   QEMU's own CPU throttle (auto-converge), as the stream engine does: a migration to
         `exec:cat > /dev/null` that cannot converge (downtime-limit 1 ms, 4 MiB/s), its
         throttle pinned at LEVEL %

Usage: python3 bench/clock/throttle-clock.py stun|qemu [LEVEL=50] [SECONDS=20]
Boots the test guest (~/.cache/livemig/guest, built by guest/build.sh) under TCG rewriting
32 MiB at 8 MiB/s and writing a fsynced file every 50 ms on a writable ext4 data disk (raw, in
RUN_DIR), and over a baseline, the throttled span and a span after it compares its
CLOCK_BOOTTIME (the uptime_ms of its heartbeat lines) with the host's monotonic clock, and gives
the latency of its file writes (create, write, fsync, directory fsync; by the guest's clock) and
how many it completed."""
import json, os, re, socket, subprocess, sys, time

mech = sys.argv[1] if len(sys.argv) > 1 else "stun"
assert mech in ("stun", "qemu"), __doc__
level = int(sys.argv[2]) if len(sys.argv) > 2 else 50
secs = float(sys.argv[3]) if len(sys.argv) > 3 else 20
G = os.path.expanduser("~/.cache/livemig/guest")
d = os.environ.get("RUN_DIR", f"/tmp/livemig-clock-{mech}")
os.makedirs(d, exist_ok=True)
con, qmp_path = f"{d}/console.log", f"{d}/qmp.sock"
for p in (con, qmp_path):
    if os.path.exists(p):
        os.remove(p)
data = f"{d}/data.raw"
with open(data, "wb") as img:
    img.truncate(256 << 20)
subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "livemig-data", "-b", "4096", data], check=True)
q = subprocess.Popen(["qemu-system-x86_64", "-name", f"clock-{mech}", "-accel", "tcg", "-machine", "q35", "-m", "256M",
    "-cpu", "max", "-nodefaults", "-display", "none", "-smp", "1", "-chardev", f"file,id=c,path={con}", "-serial",
    "chardev:c", "-qmp", f"unix:{qmp_path},server=on,wait=off", "-kernel", f"{G}/vmlinuz", "-initrd",
    f"{G}/initramfs.img", "-drive", f"file={G}/root.raw,format=raw,if=virtio,readonly=on",
    "-drive", f"file={data},format=raw,if=none,id=data0", "-device", "virtio-blk-pci,drive=data0,serial=livemig-data,addr=0x10",
    "-append", "console=ttyS0 quiet panic=-1 lm.mode=disk lm.mib=32 lm.rate=8 lm.pattern=uniform lm.file-ms=50 lm.verify-secs=3600"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
seen, samples, writes = 0, [], []  # (host s, guest uptime ms); write latencies (µs)

def poll():
    global seen
    try:
        ls = open(con, errors="replace").read().splitlines()
    except FileNotFoundError:
        return
    for l in ls[seen:]:
        m = re.search(r"uptime_ms=(\d+)", l)
        if m:
            samples.append((time.monotonic(), int(m.group(1))))
        m = re.search(r"LIVEMIG-DISKWRITE .* us=(\d+)", l)
        if m:
            writes.append(int(m.group(1)))
        if "LIVEMIG-DISKERROR" in l or "LIVEMIG-DISKBAD" in l:
            raise SystemExit(l)
    seen = len(ls)

deadline = time.monotonic() + 180
while len(samples) < 3:
    poll()
    time.sleep(0.01)
    assert time.monotonic() < deadline, "the guest printed no heartbeat"
s = socket.socket(socket.AF_UNIX)
s.connect(qmp_path)
f = s.makefile("rw")
f.readline()

def cmd(c, args=None):
    m = {"execute": c} | ({"arguments": args} if args is not None else {})
    f.write(json.dumps(m) + "\n")
    f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            return r

cmd("qmp_capabilities")

def span(name, dur, stun=0.0):
    a, w, end, stopped = len(samples), len(writes), time.monotonic() + dur, 0.0
    while time.monotonic() < end:
        if stun > 0:
            t0 = time.monotonic()
            cmd("stop")
            time.sleep(0.1 * stun)
            cmd("cont")
            stopped += time.monotonic() - t0
            time.sleep(0.1 * (1 - stun))
        else:
            time.sleep(0.05)
        poll()
    poll()
    seg = samples[a:]
    host, guest = seg[-1][0] - seg[0][0], (seg[-1][1] - seg[0][1]) / 1000
    extra = f"; stopped {stopped:.2f} s" if stun > 0 else ""
    lat = sorted(writes[w:])
    q = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))] / 1000 if lat else float("nan")
    print(f"{name}: host {host:.2f} s, guest {guest:.2f} s, guest clock behind by {host - guest:+.2f} s{extra}; "
          f"file writes {len(lat)} ({len(lat) / host:.1f}/s of host time), latency median {q(0.5):.1f} ms, p99 {q(0.99):.1f} ms, max {q(1.0):.1f} ms")

span("baseline", secs)
if mech == "stun":
    span(f"stun {level}%", secs, level / 100)
else:
    cmd("migrate-set-capabilities", {"capabilities": [{"capability": "auto-converge", "state": True}]})
    cmd("migrate-set-parameters", {"cpu-throttle-initial": level, "cpu-throttle-increment": 1, "max-cpu-throttle": level,
        "throttle-trigger-threshold": 1, "downtime-limit": 1, "max-bandwidth": 4 << 20})
    cmd("migrate", {"uri": "exec:cat > /dev/null"})
    t0 = time.monotonic()
    while cmd("query-migrate")["return"].get("cpu-throttle-percentage", 0) < level:
        time.sleep(0.25)
        poll()
        assert time.monotonic() - t0 < 240, f"the throttle never reached {level} %"
    span(f"QEMU throttle {level}%", secs)
    cmd("migrate_cancel")
    time.sleep(1)
span("after", secs)
q.kill()

#!/usr/bin/env python3
"""Runs the benchmark cases for scripts/bench.sh and writes the report.

Usage: bench.py IMAGE CORO_LINE. Environment: ROUNDS (3), RUNTIME (5 s), CASES (all).
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

IMAGE, CORO_LINE = sys.argv[1], sys.argv[2]
ROUNDS = int(os.environ.get("ROUNDS", "3"))
RUNTIME = float(os.environ.get("RUNTIME", "5"))
NULL_SIZE = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")

# name: (backend, direct, queues, bench args, daemon extras)
CASES = {
    "null-qd1": ("null", False, 1, ["--rw", "randread", "--bs", "4K", "--iodepth", "1"], {}),
    "null-qd32": ("null", False, 1, ["--rw", "randread", "--bs", "4K", "--iodepth", "32"], {}),
    "null-2q-qd32": ("null", False, 2, ["--rw", "randread", "--bs", "4K", "--iodepth", "32", "--queues", "2"], {}),
    "file-randread-buffered": ("file", False, 1, ["--rw", "randread", "--bs", "4K", "--iodepth", "32"], {}),
    "file-randwrite-buffered": ("file", False, 1, ["--rw", "randwrite", "--bs", "4K", "--iodepth", "32"], {}),
    "file-randread-direct": ("file", True, 1, ["--rw", "randread", "--bs", "4K", "--iodepth", "32"], {}),
    "file-randwrite-direct": ("file", True, 1, ["--rw", "randwrite", "--bs", "4K", "--iodepth", "32"], {}),
    "file-seqread-128k": ("file", False, 1, ["--rw", "read", "--bs", "128K", "--iodepth", "8"], {}),
    "file-seqwrite-128k": ("file", False, 1, ["--rw", "write", "--bs", "128K", "--iodepth", "8"], {}),
    # 1024 requests held in flight by a 1 ms null latency: what do they cost in memory?
    "rss-1024-inflight": ("null", False, 1, ["--rw", "randread", "--bs", "4K", "--iodepth", "1024", "--queue-size", "1024"], {"latency_us": 1000}),
}
selected = os.environ.get("CASES", " ".join(CASES)).split()


def daemon_cmd(kind, case, sock):
    backend, direct, queues, _, extra = CASES[case]
    lat = extra.get("latency_us", 0)
    if kind == "corodev":
        cmd = ["target/release/corodev", "--socket", sock, "--num-queues", str(queues), "--queue-size", "1024"]
        if backend == "null":
            cmd += ["--backend", "null", "--size", str(NULL_SIZE), "--null-latency-us", str(lat)]
        else:
            cmd += ["--disk", IMAGE] + (["--direct"] if direct else [])
        return cmd
    if backend == "null":
        dev = f"driver=null-co,node-name=f,size={NULL_SIZE},read-zeroes=on,latency-ns={lat * 1000}"
    else:
        dev = f"driver=file,node-name=f,filename={IMAGE},aio=io_uring,cache.direct={'on' if direct else 'off'}"
    return ["qemu-storage-daemon", "--blockdev", dev, "--export",
            f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},writable=on,num-queues={queues}"]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def run_once(kind, case):
    d = tempfile.mkdtemp(prefix="bench-")
    sock = os.path.join(d, "s.sock")
    log = open(os.path.join(d, "daemon.log"), "w")
    proc = subprocess.Popen(daemon_cmd(kind, case, sock), stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.time() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{kind} did not start: {open(log.name).read()}")
            time.sleep(0.02)
        time.sleep(0.2)
        cpu0 = cpu_seconds(proc.pid)
        out = subprocess.run(["target/release/corodev-bench", "--socket", sock, "--json",
                              "--runtime", str(RUNTIME)] + CASES[case][3],
                             capture_output=True, text=True, timeout=RUNTIME + 60)
        cpu = cpu_seconds(proc.pid) - cpu0
        rss = peak_rss_kib(proc.pid)
        if out.returncode != 0:
            raise RuntimeError(f"bench failed on {kind}/{case}: {out.stderr.strip()}")
        r = json.loads(out.stdout)
        r["cpu_s_per_mio"] = cpu / max(r["ios"], 1) * 1e6
        r["rss_mib"] = rss / 1024
        return r
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def med(rs, key, sub=None):
    return statistics.median((r[key][sub] if sub else r[key]) for r in rs)


rows = []
for case in selected:
    results = {"corodev": [], "qsd": []}
    for rnd in range(ROUNDS):
        for kind in ("corodev", "qsd"):
            r = run_once(kind, case)
            results[kind].append(r)
            print(f"{case} round {rnd + 1} {kind}: {r['iops']:.0f} IOPS p50 {r['lat_us']['p50']:.1f} us "
                  f"cpu {r['cpu_s_per_mio']:.2f} s/Mio rss {r['rss_mib']:.1f} MiB", file=sys.stderr)
    a, b = results["corodev"], results["qsd"]
    rows.append((case, med(a, "iops"), med(b, "iops"), med(a, "lat_us", "p50"), med(b, "lat_us", "p50"),
                 med(a, "lat_us", "p99"), med(b, "lat_us", "p99"), med(a, "cpu_s_per_mio"), med(b, "cpu_s_per_mio"),
                 med(a, "rss_mib"), med(b, "rss_mib")))

lines = [
    f"corodev vs qemu-storage-daemon: median of {ROUNDS} alternating rounds, {RUNTIME:g} s each; "
    "load: corodev-bench (libblkio virtio-blk-vhost-user)",
    "",
    "| case | IOPS corodev | IOPS qsd | ratio | p50 us corodev | p50 us qsd | ratio | p99 us corodev | p99 us qsd "
    "| CPU-s/Mio corodev | CPU-s/Mio qsd | qsd/corodev | peak RSS MiB corodev | qsd |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]
for (c, ia, ib, pa, pb, qa, qb, ca, cb, ra, rb) in rows:
    lines.append(f"| {c} | {ia:.0f} | {ib:.0f} | **{ia / ib:.2f}x** | {pa:.1f} | {pb:.1f} | {pa / pb:.2f} | {qa:.1f} | {qb:.1f} "
                 f"| {ca:.2f} | {cb:.2f} | **{cb / ca:.2f}x** | {ra:.1f} | {rb:.1f} |")
lines += ["", f"coro microbenchmark (cargo bench -p coro): {CORO_LINE}"]
report = "\n".join(lines) + "\n"
with open("target/bench/report.md", "w") as f:
    f.write(report)
print(report)

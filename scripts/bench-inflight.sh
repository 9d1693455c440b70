#!/usr/bin/env bash
# What inflight I/O tracking costs: the same corodev binary on its null backend, QD32 4 KiB
# reads from `tracked-load` (the test frontend), with an inflight region (tracked) and
# without (untracked), alternated round by round so machine drift hits both alike.
#
#   scripts/bench-inflight.sh                 # 5 rounds of 5 s per side
#   ROUNDS=9 RUNTIME=10 IODEPTH=32 scripts/bench-inflight.sh
#
# Prints per-run IOPS, the daemon's CPU time per million I/Os (utime+stime from
# /proc/PID/stat) and its peak resident memory, then the medians and tracked / untracked.
# libblkio (scripts/bench.sh) never asks for an inflight region, so it cannot measure this.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
RUNTIME=${RUNTIME:-5}
IODEPTH=${IODEPTH:-32}
CORODEV=target/release/corodev
LOAD=target/release/tracked-load
TICK=$(getconf CLK_TCK)
WORK=$(mktemp -d)
trap 'kill "${PID:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

cargo build --release -q -p corodev -p integration --bin corodev --bin tracked-load

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

run() { # run MODE -> "iops cpu_s_per_million_ios rss_kib"
    local mode=$1 sock=$WORK/blk.sock flag=
    [[ $mode == tracked ]] && flag=--tracked
    taskset -c 1 "$CORODEV" --socket "$sock" --backend null --size 1G --queue-size 256 2>"$WORK/daemon.log" &
    PID=$!
    for _ in $(seq 200); do [[ -S $sock ]] && break; sleep 0.05; done
    [[ -S $sock ]] || { cat "$WORK/daemon.log" >&2; echo "bench-inflight: corodev did not listen" >&2; exit 1; }
    local before rss=0 out
    before=$(cpu_ticks "$PID")
    taskset -c 0 "$LOAD" "$sock" $flag --iodepth "$IODEPTH" --seconds "$RUNTIME" >"$WORK/out" &
    local load=$!
    while kill -0 "$load" 2>/dev/null; do
        rss=$(awk -v r="$rss" '/^VmRSS/ { print ($2 > r ? $2 : r) }' "/proc/$PID/status")
        sleep 0.2
    done
    wait "$load"
    local after ios
    after=$(cpu_ticks "$PID")
    out=$(cat "$WORK/out")
    ios=$(sed -n 's/.*ios=\([0-9]*\) .*/\1/p' <<<"$out")
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
    rm -f "$sock"
    awk -v o="$out" -v ios="$ios" -v t=$((after - before)) -v hz="$TICK" -v rss="$rss" \
        'BEGIN { split(o, f, "iops="); printf "%d %.3f %d\n", f[2], t / hz / ios * 1e6, rss }'
}

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

echo "# inflight tracking cost: null backend, QD$IODEPTH 4 KiB reads, $ROUNDS x ${RUNTIME}s per side"
echo "# $(nproc) CPUs, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
printf '%-6s %-10s %10s %14s %10s\n' round side iops cpu_s_per_M rss_kib
: >"$WORK/untracked"
: >"$WORK/tracked"
for r in $(seq "$ROUNDS"); do
    for side in untracked tracked; do
        line=$(run "$side")
        echo "$line" >>"$WORK/$side"
        # shellcheck disable=SC2086
        printf '%-6s %-10s %10s %14s %10s\n' "$r" "$side" $line
    done
done
for col in 1 2 3; do
    u=$(cut -d' ' -f$col "$WORK/untracked" | median)
    t=$(cut -d' ' -f$col "$WORK/tracked" | median)
    name=$(echo "iops cpu_s_per_M rss_kib" | cut -d' ' -f$col)
    awk -v n="$name" -v u="$u" -v t="$t" 'BEGIN { printf "median %-12s untracked %10s tracked %10s tracked/untracked %.3f\n", n, u, t, t / u }'
done

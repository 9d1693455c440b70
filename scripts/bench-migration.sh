#!/usr/bin/env bash
# Live migration, corodev against qemu-storage-daemon in one run: a TCG guest doing steady
# fio 4 KiB random reads and writes (guest test `iobench`) on a disk served by one server
# per QEMU (source and destination on the same image), the two servers alternated round by
# round (and which goes first, too) so that machine drift hits both alike. Each run
# (target/release/migration-bench, see integration/src/bin/migration-bench.rs) measures:
#
#   total_ms, downtime_ms  one migration at QEMU's defaults (max-bandwidth 128 MiB/s,
#                          downtime-limit 300 ms), from QMP query-migrate
#   iops_off, iops_on      guest IOPS (median of fio windows) with no migration, and while
#                          a migration runs with dirty-page logging on (held far from
#                          completion by a low max-bandwidth, then cancelled)
#   cpu_us_per_io_off/_on  the server's CPU time per guest I/O in the same windows. Under
#                          TCG the guest is the bottleneck (a few thousand IOPS) and QEMU's
#                          own tracking of guest RAM writes slows it while migrating, for
#                          either server, and the server's CPU goes mostly to polling: these
#                          show whether logging hurts a real guest, not its cost per request.
#
# Then, the cost per request, where the server is the bottleneck (corodev only): corodev on
# its null backend pinned to CPU 1, QD32 4 KiB reads from the test frontend (tracked-load)
# pinned to CPU 0, with dirty-page logging off and on (--logged: a log handed over with
# SET_LOG_BASE and VHOST_F_LOG_ALL set, as QEMU does while it migrates), alternated round
# by round: IOPS and the server's CPU seconds per million I/Os. (qemu-storage-daemon cannot
# be measured so: the vhost crate's frontend hangs at its SET_LOG_BASE reply.)
#
#   scripts/bench-migration.sh                    # 3 rounds, 1 queue
#   ROUNDS=5 QUEUES=2 WINDOW=3 PHASES=3 PHASE_WINDOWS=3 SLOW_BPS=1048576 scripts/bench-migration.sh
#   SERVERS=qsd scripts/bench-migration.sh        # one server only
#   LOAD_ROUNDS=5 LOAD_SECONDS=5 scripts/bench-migration.sh  # the per-request part (0: skip)
#   ROUNDS=0 scripts/bench-migration.sh           # the per-request part only
#
# corodev must support dirty-page logging (VHOST_USER_PROTOCOL_F_LOG_SHMFD); without it
# QEMU refuses to migrate and the corodev runs fail with QEMU's reason.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
QUEUES=${QUEUES:-1}
WINDOW=${WINDOW:-3}
PHASES=${PHASES:-3}
PHASE_WINDOWS=${PHASE_WINDOWS:-3}
SLOW_BPS=${SLOW_BPS:-1048576}
SERVERS=${SERVERS:-corodev qsd}
LOAD_ROUNDS=${LOAD_ROUNDS:-5}
LOAD_SECONDS=${LOAD_SECONDS:-5}
TICK=$(getconf CLK_TCK)
WORK=$(mktemp -d)
trap 'kill "${PID:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

cargo build --release -q -p corodev -p integration --bin corodev --bin migration-bench \
    --bin tracked-load
bash scripts/build-guest.sh >/dev/null

echo "# live migration: TCG guest, fio randrw 4k QD16, $QUEUES queue(s), $ROUNDS round(s) per server"
echo "# $(nproc) CPUs, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "# $(qemu-system-x86_64 --version | head -n 1); logging phases: max-bandwidth $SLOW_BPS B/s"
printf '%-5s %-8s %9s %11s %9s %9s %9s %12s %12s\n' round server total_ms downtime_ms ram_mib \
    iops_off iops_on cpu_us/io_off cpu_us/io_on

for round in $(seq "$ROUNDS"); do
    # shellcheck disable=SC2086 # a list of words
    set -- $SERVERS
    order="$*"
    [ $((round % 2)) = 0 ] && order=$(printf '%s\n' "$@" | tac | tr '\n' ' ')
    for server in $order; do
        if ! target/release/migration-bench --server "$server" --queues "$QUEUES" \
            --window "$WINDOW" --phases "$PHASES" --phase-windows "$PHASE_WINDOWS" \
            --slow-bps "$SLOW_BPS" >"$WORK/out" 2>"$WORK/err"; then
            echo "bench-migration: round $round, $server failed; its output:" >&2
            tail -n 40 "$WORK/err" >&2
            exit 1
        fi
        line=$(grep '^RESULT ' "$WORK/out")
        echo "$round $line" >>"$WORK/results"
        field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$line"; }
        printf '%-5s %-8s %9s %11s %9s %9s %9s %12s %12s\n' "$round" "$server" \
            "$(field total_ms)" "$(field downtime_ms)" "$(field ram_mib)" "$(field iops_off)" \
            "$(field iops_on)" "$(field cpu_us_per_io_off)" "$(field cpu_us_per_io_on)"
    done
done

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
med() { # med SERVER FIELD
    grep " server=$1 " "$WORK/results" | sed -n "s/.* $2=\([^ ]*\).*/\1/p" | median
}
if [ "$ROUNDS" -gt 0 ]; then
echo
echo "# medians over $ROUNDS round(s)"
printf '%-22s %10s %10s %14s\n' metric corodev qsd corodev/qsd
for f in total_ms downtime_ms ram_mib iops_off iops_on cpu_us_per_io_off cpu_us_per_io_on; do
    c=$(med corodev "$f") q=$(med qsd "$f")
    printf '%-22s %10s %10s %14s\n' "$f" "$c" "$q" \
        "$(awk -v c="$c" -v q="$q" 'BEGIN { printf (q > 0 ? "%.2f" : "-"), c / q }')"
done
for s in $SERVERS; do
    off=$(med "$s" iops_off) on=$(med "$s" iops_on)
    coff=$(med "$s" cpu_us_per_io_off) con=$(med "$s" cpu_us_per_io_on)
    awk -v s="$s" -v off="$off" -v on="$on" -v coff="$coff" -v con="$con" 'BEGIN {
        printf "# %s: while logging, guest IOPS %+.1f%%, server CPU per I/O %+.1f%%\n", s,
            (off > 0 ? (on / off - 1) * 100 : 0), (coff > 0 ? (con / coff - 1) * 100 : 0)
    }'
done
fi

[ "$LOAD_ROUNDS" -gt 0 ] || exit 0
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
load() { # load MODE -> "iops cpu_s_per_million_ios"
    local mode=$1 sock=$WORK/null.sock flag=
    [[ $mode == on ]] && flag=--logged
    taskset -c 1 target/release/corodev --socket "$sock" --backend null --size 1G \
        --queue-size 256 2>"$WORK/daemon.log" &
    PID=$!
    for _ in $(seq 200); do [[ -S $sock ]] && break; sleep 0.05; done
    [[ -S $sock ]] || { cat "$WORK/daemon.log" >&2; echo "bench-migration: corodev did not listen" >&2; exit 1; }
    local before after out ios
    before=$(cpu_ticks "$PID")
    # shellcheck disable=SC2086 # no flag: no word
    out=$(taskset -c 0 target/release/tracked-load "$sock" $flag --iodepth 32 --seconds "$LOAD_SECONDS")
    after=$(cpu_ticks "$PID")
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
    rm -f "$sock"
    ios=$(sed -n 's/.*ios=\([0-9]*\) .*/\1/p' <<<"$out")
    awk -v o="$out" -v ios="$ios" -v t=$((after - before)) -v hz="$TICK" \
        'BEGIN { split(o, f, "iops="); printf "%d %.3f\n", f[2], t / hz / ios * 1e6 }'
}
echo
echo "# dirty logging per request: corodev null backend, QD32 4 KiB reads (tracked-load), $LOAD_ROUNDS x ${LOAD_SECONDS}s per side"
printf '%-6s %-8s %10s %14s\n' round logging iops cpu_s_per_M
for round in $(seq "$LOAD_ROUNDS"); do
    order="off on"
    [ $((round % 2)) = 0 ] && order="on off"
    for mode in $order; do
        read -r iops cpu <<<"$(load "$mode")"
        printf '%-6s %-8s %10s %14s\n' "$round" "$mode" "$iops" "$cpu"
        echo "$mode $iops $cpu" >>"$WORK/load"
    done
done
lmed() { awk -v m="$1" -v c="$2" '$1 == m { print $c }' "$WORK/load" | median; }
ioff=$(lmed off 2) ion=$(lmed on 2) coff=$(lmed off 3) con=$(lmed on 3)
echo "# medians: iops off $ioff, on $ion ($(awk -v a="$ion" -v b="$ioff" 'BEGIN { printf "%+.1f%%", (a / b - 1) * 100 }')); cpu_s per million I/Os off $coff, on $con ($(awk -v a="$con" -v b="$coff" 'BEGIN { printf "%+.1f%%", (a / b - 1) * 100 }'))"

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
#   cpu_us_per_io_off/_on  the server's CPU time per guest I/O in the same windows: what
#                          logging costs the server itself. Under TCG, QEMU's own tracking
#                          of guest RAM writes also slows the guest while migrating, for
#                          either server: compare the drops between the servers.
#
#   scripts/bench-migration.sh                    # 3 rounds, 1 queue
#   ROUNDS=5 QUEUES=2 WINDOW=3 PHASES=3 PHASE_WINDOWS=3 SLOW_BPS=1048576 scripts/bench-migration.sh
#   SERVERS=qsd scripts/bench-migration.sh        # one server only
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
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

cargo build --release -q -p corodev -p integration --bin corodev --bin migration-bench
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

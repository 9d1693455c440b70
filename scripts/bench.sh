#!/usr/bin/env bash
# corodev vs qemu-storage-daemon, side by side, with the same libblkio load generator.
#
#   scripts/bench.sh                      # every case, 3 alternating rounds of 5 s
#   ROUNDS=5 RUNTIME=10 scripts/bench.sh
#   CASES="null-qd1 null-qd32" scripts/bench.sh
#
# Each run starts a fresh daemon (A = corodev, B = qemu-storage-daemon) with equivalent
# settings, runs corodev-bench against it, and records IOPS, latency, the daemon's CPU
# time (utime+stime from /proc) and peak RSS. Runs alternate A/B/A/B so drift on a shared
# machine hits both. Writes target/bench/report.md and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v qemu-storage-daemon >/dev/null || { echo "bench: qemu-storage-daemon missing; run scripts/install-deps.sh" >&2; exit 1; }
cargo build --release --bin corodev --bin corodev-bench >&2
mkdir -p target/bench
image=target/bench/disk.img
if [ ! -f "$image" ] || [ "$(stat -c %s "$image")" != 1073741824 ]; then
    echo "bench: creating and filling a 1 GiB image" >&2
    dd if=/dev/urandom of="$image" bs=1M count=1024 status=none
fi
coro_line=$(cargo bench -q -p coro 2>/dev/null | grep -E "roundtrip|speedup" | tr -s ' ' | paste -sd ';' -)
exec python3 scripts/bench.py "$image" "$coro_line"

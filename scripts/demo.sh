#!/usr/bin/env bash
# The main job, end to end: install dependencies, build corodev, start it on a fresh
# 256 MiB image, boot a real Linux guest against it that writes a random pattern through
# the virtio_blk driver and reads it back, then check on the host that the image holds
# exactly the guest's bytes. Prints a short result.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo build --release --bin corodev
bash scripts/build-guest.sh >/dev/null

work=$(mktemp -d -p "$PWD/target")
image=$work/disk.img socket=$work/corodev.sock
truncate -s 256M "$image"
target/release/corodev --socket "$socket" --disk "$image" --num-queues 2 --serial DEMO 2>"$work/corodev.log" &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.05; done

start=$(date +%s.%N)
bash scripts/run-vm.sh --socket "$socket" --test pattern --queues 2 --smp 2 >"$work/console.log" || true
elapsed=$(echo "$(date +%s.%N) - $start" | bc 2>/dev/null || echo "?")

line=$(grep -ao "CORODEV-RESULT.*" "$work/console.log" | tr -d "\r" || true)
md5=$(sed -n 's/.* md5=\([0-9a-f]*\).*/\1/p' <<<"$line")
host=$(dd if="$image" bs=1M skip=1 count=4 2>/dev/null | md5sum | cut -d' ' -f1)

echo "guest:  ${line:-no result (console in $work/console.log)}"
echo "host:   md5 of the image at 1 MiB..5 MiB = $host"
if [[ "$line" == *status=PASS* && "$md5" == "$host" ]]; then
    echo "corodev demo: PASS (guest wrote and verified 4 MiB through vhost-user-blk; host image matches; ${elapsed}s)"
else
    echo "corodev demo: FAIL"; cat "$work/corodev.log"; exit 1
fi

#!/usr/bin/env bash
# corodev's NVMe backend (issue 16) vs corodev's file backend on the same NVMe namespace
# through the guest kernel's nvme driver, inside the NVMe test guest (scripts/nvme-guest.sh:
# TCG, intel-iommu, QEMU's emulated controller on a host file). Same daemon, same load:
#   nvme    corodev --backend nvme --pci $NVME_BDF        (controller on vfio-pci)
#   kernel  corodev --disk /dev/nvme0n1 --direct           (controller on the nvme driver)
# The load is `nvme-load bench` (integration/src/bin/nvme-load.rs) in the same guest:
# random 4 KiB reads, then random 4 KiB writes, at queue depth DEPTH for SECONDS each,
# one guest boot per run. It prints IOPS and the daemon's CPU time per I/O (utime+stime
# from /proc/PID/stat inside the guest, before and after the run).
#
#   scripts/bench-nvme.sh                      # 3 rounds x (2 loads x 2 sides) x 10 s
#   ROUNDS=5 SECONDS_PER_RUN=20 DEPTH=16 scripts/bench-nvme.sh
#
# TCG emulates every guest instruction and QEMU's controller runs in the same emulator, so
# both sides are slow and the absolute numbers say little about real hardware; the ratio
# and the CPU per I/O (the daemon's own path: no syscall and no kernel block layer per
# request for the NVMe backend) are the point. Rounds alternate the sides (nvme, kernel,
# nvme, ...) so that drift on a shared machine hits both. The report (medians over
# rounds) goes to stdout and target/bench/nvme-report.md; per-run lines to
# target/bench/nvme-runs.tsv, each guest's console to target/bench/nvme-console-*.log.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
DEPTH=${DEPTH:-32}
musl=target/x86_64-unknown-linux-musl/release

cargo build --release --target x86_64-unknown-linux-musl --bin corodev \
    --no-default-features --features nvme
cargo build --release --target x86_64-unknown-linux-musl -p integration --bin nvme-load

mkdir -p target/bench
runs=target/bench/nvme-runs.tsv
printf 'round\tside\trw\tiops\tcpu_us_per_io\tios\tdaemon_cpu_s\n' >"$runs"
disk=$(mktemp --suffix=.raw)
trap 'rm -f "$disk"' EXIT

# run SIDE RW ROUND: one guest boot, one line appended to $runs. A run whose load stalls
# (no completion for 10 s) is run again, up to 3 tries, and counted: the kernel side's random writes
# sometimes stall in this guest (the nvme driver's requests complete only at poweroff, as
# I/O errors), which no corodev code is on the path of; see BENCHMARKS.md.
retries=0
run() {
    local side=$1 rw=$2 round=$3 daemon bind line try
    case "$side" in
        nvme) bind=vfio daemon='corodev --socket $SOCK --backend nvme --pci $NVME_BDF' ;;
        kernel) bind=kernel daemon='corodev --socket $SOCK --disk $NVME_BLK --direct' ;;
    esac
    local console=target/bench/nvme-console-$side-$rw-$round.log
    for try in 1 2 3; do
        # A fresh 256 MiB file each time, filled so reads are not of holes.
        head -c $((256 << 20)) /dev/urandom >"$disk"
        bash scripts/nvme-guest.sh --disk "$disk" --bind "$bind" --timeout 300 \
            --bin "$musl/corodev" --bin "$musl/nvme-load" --daemon "$daemon" \
            --frontend "nvme-load bench \$SOCK --rw $rw --seconds $SECONDS_PER_RUN --depth $DEPTH" \
            >"$console" 2>&1 || true
        line=$(grep -a 'CORODEV-RESULT' "$console" | tr -d '\r') || true
        case "$line" in
            *status=PASS*) break ;;
            *no_completion_in_10_s*)
                if [ "$try" != 3 ]; then
                    cp "$console" "$console.stalled$try"
                    retries=$((retries + 1))
                    echo "bench-nvme: $side $rw stalled (console: $console.stalled$try); again" >&2
                    continue
                fi
                ;;
        esac
        echo "bench-nvme: $side $rw failed: ${line:-no result line} (console: $console)" >&2
        exit 1
    done
    field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$line"; }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$side" "$rw" "$(field iops)" \
        "$(field cpu_us_per_io)" "$(field ios)" "$(field daemon_cpu_s)" >>"$runs"
    echo "bench-nvme: round $round $side $rw: $(field iops) IOPS, $(field cpu_us_per_io) us CPU/IO" >&2
}

for round in $(seq 1 "$ROUNDS"); do
    for rw in randread randwrite; do
        for side in nvme kernel; do run "$side" "$rw" "$round"; done
    done
done

# Medians per (side, rw), then the nvme / kernel ratios.
report=target/bench/nvme-report.md
awk -F'\t' -v depth="$DEPTH" -v secs="$SECONDS_PER_RUN" -v rounds="$ROUNDS" '
    NR > 1 { k = $2 SUBSEP $3; n[k]++; iops[k, n[k]] = $4; cpu[k, n[k]] = $5 }
    function median(arr, k, m,   i, j, t, v) {
        for (i = 1; i <= m; i++) v[i] = arr[k, i]
        for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
        return m % 2 ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
    }
    END {
        printf "| load (4 KiB, QD %d, %d s, median of %d) | IOPS nvme | IOPS kernel | ratio | CPU us/IO nvme | CPU us/IO kernel | ratio |\n", depth, secs, rounds
        print "|---|---:|---:|---:|---:|---:|---:|"
        split("randread randwrite", rws, " ")
        for (r = 1; r <= 2; r++) {
            a = "nvme" SUBSEP rws[r]; b = "kernel" SUBSEP rws[r]
            ia = median(iops, a, n[a]); ib = median(iops, b, n[b])
            ca = median(cpu, a, n[a]); cb = median(cpu, b, n[b])
            printf "| %s | %d | %d | **%.2f** | %.1f | %.1f | **%.2f** |\n", rws[r], ia, ib, ia / ib, ca, cb, ca / cb
        }
    }' "$runs" | tee "$report"
echo "runs stalled and run again: $retries" | tee -a "$report"

#!/usr/bin/env bash
# corodev (A) vs qemu-storage-daemon (B) under the same libblkio load (corodev-bench).
#
#   scripts/bench.sh                          # every case, 3 rounds of 5 s per daemon
#   ROUNDS=5 RUNTIME=10 scripts/bench.sh
#   CASES="null-qd1 null-qd32" scripts/bench.sh
#   CASES="rbd-randread-qd1 rbd-randwrite-qd32" scripts/bench.sh   # RBD: brings a Ceph cluster up
#   ONLY=qsd RUNTIME=2 ROUNDS=1 CASES=null-qd1 scripts/bench.sh   # B side only
#
# Environment:
#   ROUNDS      rounds per case (default 3); each round runs A then B, so drift on a shared
#               machine hits both sides alike (A/B/A/B...)
#   RUNTIME     seconds per run (default 5)
#   CASES       space-separated case names (default: all; see case_def below)
#   ONLY        "qsd" or "corodev": run one side only (ratios become "-"). Without it a
#               missing or unbuildable corodev is an error, never a silent skip.
#   CORO_BENCH  0 skips `cargo bench -p coro` (the report says so)
#   BASELINE    path to another corodev binary (e.g. one built from the previous commit):
#               it runs as a third side in every round (corodev, baseline, qsd) and the
#               report adds corodev / baseline ratios, so a change is judged against the
#               code before it in the same minutes, not against numbers from another day
#
# Every run starts a fresh daemon, waits for its socket, runs corodev-bench --json against
# it, and records IOPS, p50/p99 latency, the daemon's CPU time per million I/Os
# (utime+stime from /proc/PID/stat, read before and after the run) and its resident memory
# (the highest VmRSS from /proc/PID/status, sampled every 0.2 s during the run). The report
# holds the median over rounds and the ratio corodev / qsd for each metric. It goes to
# target/bench/report.md and stdout; per-run numbers go to target/bench/runs.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5}
ONLY=${ONLY:-}
CORO_BENCH=${CORO_BENCH:-1}
BASELINE=${BASELINE:-}
ALL_CASES="null-qd1 null-qd32 null-2q-qd32 file-randread-buffered file-randwrite-buffered
file-randread-direct file-randwrite-direct file-seqread-128k file-seqwrite-128k rss-1024-inflight
rbd-randread-qd1 rbd-randread-qd32 rbd-randwrite-qd1 rbd-randwrite-qd32
rbd-randread-qd1-direct rbd-randread-qd32-direct rbd-randwrite-qd1-direct rbd-randwrite-qd32-direct"
CASES=${CASES:-$ALL_CASES}

OUT=target/bench
IMAGE=$OUT/disk.img
IMAGE_SIZE=$((1 << 30)) # also the null devices' size, so both backends span the same range
CORODEV=target/release/corodev
BENCH=target/release/corodev-bench
QSD=qemu-storage-daemon
TICK=$(getconf CLK_TCK)

die() {
    echo "bench: $*" >&2
    exit 1
}

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS=$ROUNDS is not a positive integer"
if ! [[ $RUNTIME =~ ^[0-9]+([.][0-9]+)?$ ]] || ! awk -v r="$RUNTIME" 'BEGIN { exit !(r > 0) }'; then
    die "RUNTIME=$RUNTIME is not a positive number of seconds"
fi
case $ONLY in
"") SIDES="corodev qsd" ;;
qsd | corodev) SIDES=$ONLY ;;
*) die "ONLY=$ONLY: use ONLY=qsd or ONLY=corodev (or leave it unset for both)" ;;
esac
if [ -n "$BASELINE" ]; then
    [ -x "$BASELINE" ] || die "BASELINE=$BASELINE is not an executable corodev binary"
    [[ $SIDES == *corodev* ]] || die "BASELINE needs the corodev side: drop ONLY=qsd"
    SIDES=${SIDES/corodev/corodev baseline}
fi

# case_def NAME: sets BACKEND (null|file|rbd), DIRECT (0|1), NQ (queues), QSIZE (virtqueue
# size), LAT_US (null-backend latency) and LOAD (corodev-bench options).
case_def() {
    BACKEND=null DIRECT=0 NQ=1 QSIZE=256 LAT_US=0
    case $1 in
    null-qd1) LOAD=(--rw randread --bs 4K --iodepth 1) ;;
    null-qd32) LOAD=(--rw randread --bs 4K --iodepth 32) ;;
    null-2q-qd32) NQ=2 LOAD=(--rw randread --bs 4K --iodepth 32 --queues 2) ;;
    file-randread-buffered) BACKEND=file LOAD=(--rw randread --bs 4K --iodepth 32) ;;
    file-randwrite-buffered) BACKEND=file LOAD=(--rw randwrite --bs 4K --iodepth 32) ;;
    file-randread-direct) BACKEND=file DIRECT=1 LOAD=(--rw randread --bs 4K --iodepth 32) ;;
    file-randwrite-direct) BACKEND=file DIRECT=1 LOAD=(--rw randwrite --bs 4K --iodepth 32) ;;
    file-seqread-128k) BACKEND=file LOAD=(--rw read --bs 128K --iodepth 8) ;;
    file-seqwrite-128k) BACKEND=file LOAD=(--rw write --bs 128K --iodepth 8) ;;
    # 1024 requests held in the daemon at once: 4 queues x 256, each request parked for
    # 10 ms by the null backend, so nearly all of them sit in the daemon at any instant.
    # libblkio needs 3 descriptors per request, hence queue size 1024 for 256 in flight
    # (1024 is also the most QEMU's vhost-user-blk-pci offers a real guest).
    rss-1024-inflight) NQ=4 QSIZE=1024 LAT_US=10000 LOAD=(--rw randread --bs 4K --iodepth 256 --queues 4) ;;
    # An RBD image on a single-node Ceph cluster on this machine (scripts/ceph-cluster.sh),
    # the same image for both daemons. Without -direct both use librbd's cache as each
    # configures it (corodev: write-back; qemu-storage-daemon: librbd's default,
    # write-around after the first flush); -direct turns it off on both (corodev --direct,
    # qsd cache.direct=on), so both do the same work per request.
    rbd-*)
        BACKEND=rbd
        [[ $1 != *-direct ]] || DIRECT=1
        local spec=${1#rbd-}
        spec=${spec%-direct}
        LOAD=(--rw "${spec%-qd*}" --bs 4K --iodepth "${spec##*-qd}")
        [[ ${LOAD[1]} =~ ^rand(read|write)$ && ${LOAD[5]} =~ ^(1|32)$ ]] || die "unknown case '$1'"
        ;;
    *) die "unknown case '$1'; cases: ${ALL_CASES//$'\n'/ }" ;;
    esac
    LOAD+=(--queue-size "$QSIZE")
}

# daemon_cmd SIDE SOCKET: sets CMD to the daemon command line for the current case.
daemon_cmd() {
    if [ "$1" = corodev ] || [ "$1" = baseline ]; then
        local bin=$CORODEV
        [ "$1" = corodev ] || bin=$BASELINE
        CMD=("$bin" --socket "$2" --num-queues "$NQ" --queue-size "$QSIZE")
        if [ "$BACKEND" = null ]; then
            CMD+=(--backend null --size "$IMAGE_SIZE")
            [ "$LAT_US" = 0 ] || CMD+=(--null-latency-us "$LAT_US")
        elif [ "$BACKEND" = rbd ]; then
            CMD+=(--backend rbd --ceph-conf "$CEPH_CONF" --rbd-pool rbd --rbd-image bench)
            [ "$DIRECT" = 0 ] || CMD+=(--direct)
        else
            CMD+=(--disk "$IMAGE")
            [ "$DIRECT" = 0 ] || CMD+=(--direct)
        fi
    else
        local dev
        if [ "$BACKEND" = null ]; then
            dev="driver=null-co,node-name=f,size=$IMAGE_SIZE,read-zeroes=on"
            [ "$LAT_US" = 0 ] || dev+=",latency-ns=$((LAT_US * 1000))"
        elif [ "$BACKEND" = rbd ]; then
            dev="driver=rbd,node-name=f,pool=rbd,image=bench,conf=$CEPH_CONF,cache.direct=$([ "$DIRECT" = 1 ] && echo on || echo off)"
        else
            dev="driver=file,node-name=f,filename=$IMAGE,aio=io_uring,cache.direct=$([ "$DIRECT" = 1 ] && echo on || echo off)"
        fi
        CMD=("$QSD" --blockdev "$dev" --export
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$2,writable=on,num-queues=$NQ")
    fi
}

for c in $CASES; do case_def "$c"; done # reject unknown names before building anything

# --- build and tools --------------------------------------------------------------------
if [[ $SIDES == *qsd* ]]; then
    command -v "$QSD" >/dev/null || die "$QSD not found; run scripts/install-deps.sh (or ONLY=corodev)"
fi
echo "bench: building corodev-bench" >&2
cargo build --release -p corodev-bench >&2 || die "building corodev-bench failed"
if [[ $SIDES == *corodev* ]]; then
    echo "bench: building corodev" >&2
    cargo build --release -p corodev --bin corodev >&2 ||
        die "building corodev failed; ONLY=qsd benchmarks qemu-storage-daemon alone"
    [ -x "$CORODEV" ] || die "$CORODEV missing after the build; ONLY=qsd benchmarks qemu-storage-daemon alone"
fi
[ -x "$BENCH" ] || die "$BENCH missing after the build"
mkdir -p "$OUT"

CORO_LINE="skipped (CORO_BENCH=0)"
if [ "$CORO_BENCH" != 0 ]; then
    echo "bench: cargo bench -p coro" >&2
    coro_out=$(cargo bench -q -p coro 2>&1) || die "cargo bench -p coro failed (CORO_BENCH=0 skips it): $(tail -5 <<<"$coro_out")"
    CORO_LINE=$(awk '
        $1 == "fast-roundtrip" { fast = $2 }
        $1 == "ucontext-roundtrip" { uc = $2 }
        $1 == "raw-swapcontext-roundtrip" { raw = $2 }
        END {
            if (fast == "" || uc == "") exit 1
            printf "fast backend %.2f ns, ucontext backend %.1f ns per resume+yield round trip (fast is %.0fx quicker)", fast, uc, uc / fast
            if (raw != "") printf "; bare swapcontext pair %.1f ns", raw
        }' <<<"$coro_out") || die "cargo bench -p coro printed no fast-/ucontext-roundtrip lines: $(head -5 <<<"$coro_out")"
fi

# --- the image ---------------------------------------------------------------------------
if [[ " $CASES " == *" file-"* ]]; then
    read -r isize iblocks iblksz < <(stat -c '%s %b %B' "$IMAGE" 2>/dev/null || echo "0 0 0")
    # Random data written once, so every read hits an allocated block (no holes, which
    # both daemons would serve without I/O) and compression cannot help either side.
    if [ "$isize" != "$IMAGE_SIZE" ] || ((iblocks * iblksz < IMAGE_SIZE)); then
        echo "bench: creating $IMAGE (1 GiB of random data)" >&2
        dd if=/dev/urandom of="$IMAGE" bs=1M count=$((IMAGE_SIZE >> 20)) conv=fsync status=none
    fi
    cat "$IMAGE" >/dev/null # warm the page cache, so A's first buffered run is not the cold one
fi

# --- running -----------------------------------------------------------------------------
TMP=$(mktemp -d /tmp/corodev-bench.XXXXXX)
DAEMON_PID=
BENCH_PID=
CEPH_DIR=
cleanup() {
    [ -z "$BENCH_PID" ] || kill "$BENCH_PID" 2>/dev/null || true
    [ -z "$DAEMON_PID" ] || kill "$DAEMON_PID" 2>/dev/null || true
    [ -z "$CEPH_DIR" ] || bash scripts/ceph-cluster.sh down "$CEPH_DIR" >/dev/null 2>&1 || true
    rm -rf "$TMP"
}
trap cleanup EXIT

# --- the RBD image -----------------------------------------------------------------------
if [[ " $CASES " == *" rbd-"* ]]; then
    CEPH_DIR=$TMP/ceph
    echo "bench: bringing up a single-node Ceph cluster in $CEPH_DIR" >&2
    CEPH_CONF=$(CEPH_MON_PORT=${CEPH_MON_PORT:-16790} bash scripts/ceph-cluster.sh up "$CEPH_DIR") ||
        die "scripts/ceph-cluster.sh up failed (see $CEPH_DIR/log; scripts/install-deps.sh installs Ceph)"
    # Written once in full, so every read reaches an object (librbd's object map answers
    # reads of never-written objects without asking the OSD).
    echo "bench: creating and filling the RBD image rbd/bench (1 GiB)" >&2
    rbd -c "$CEPH_CONF" create --size 1G rbd/bench || die "rbd create failed"
    rbd -c "$CEPH_CONF" bench --io-type write --io-pattern seq --io-size 4M --io-total 1G rbd/bench >/dev/null ||
        die "filling rbd/bench failed"
fi

cpu_ticks() { # utime + stime of PID, in clock ticks (fields 14 and 15 of /proc/PID/stat)
    local s f
    s=$(<"/proc/$1/stat")
    read -ra f <<<"${s##*) }" # the command name may contain spaces; skip past it
    echo $((f[11] + f[12]))
}

RSS_KIB=0
sample_rss() { # raises RSS_KIB to PID's current VmRSS (no fork: called 5 times a second)
    local k v _
    while read -r k v _; do
        if [ "$k" = VmRSS: ]; then
            if ((v > RSS_KIB)); then RSS_KIB=$v; fi
            return 0
        fi
    done <"/proc/$1/status" 2>/dev/null || true
}

jnum() { # jnum KEY FILE: a number from corodev-bench's flat JSON object
    local re="\"$1\":(-?[0-9.eE+-]+)"
    [[ $(<"$2") =~ $re ]] || die "no \"$1\" in corodev-bench output: $(<"$2")"
    echo "${BASH_REMATCH[1]}"
}

stop_daemon() {
    local pid=$DAEMON_PID i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    DAEMON_PID=
}

RUNS=$OUT/runs.tsv
printf 'case\tside\tround\tiops\tp50_us\tp99_us\tcpu_s_per_mio\trss_mib\tios\tcpu_s\n' >"$RUNS"

# run_one CASE SIDE ROUND: one daemon start, one load run, one line in $RUNS.
run_one() {
    local name=$1 side=$2 round=$3 sock=$TMP/$2.sock log=$TMP/$2.log out=$TMP/out.json err=$TMP/err.txt
    local i ticks0 ticks1
    rm -f "$sock"
    daemon_cmd "$side" "$sock"
    "${CMD[@]}" >"$log" 2>&1 &
    DAEMON_PID=$!
    for ((i = 0; ; i++)); do
        [ -S "$sock" ] && break
        kill -0 "$DAEMON_PID" 2>/dev/null || die "$side exited at startup ($name): ${CMD[*]}: $(tail -5 "$log")"
        ((i < 200)) || die "$side created no socket within 10 s ($name): ${CMD[*]}"
        sleep 0.05
    done
    ticks0=$(cpu_ticks "$DAEMON_PID")
    RSS_KIB=0
    "$BENCH" --socket "$sock" --json --runtime "$RUNTIME" "${LOAD[@]}" >"$out" 2>"$err" &
    BENCH_PID=$!
    while kill -0 "$BENCH_PID" 2>/dev/null; do
        sample_rss "$DAEMON_PID"
        sleep 0.2
    done
    if ! wait "$BENCH_PID"; then
        BENCH_PID=
        die "corodev-bench failed against $side ($name): $(cat "$err") -- daemon log: $(tail -5 "$log")"
    fi
    BENCH_PID=
    kill -0 "$DAEMON_PID" 2>/dev/null || die "$side died during the run ($name): $(tail -5 "$log")"
    ticks1=$(cpu_ticks "$DAEMON_PID")
    stop_daemon
    # Flush the dirty pages of a buffered write run now, not during the other side's run.
    [ "$BACKEND" != file ] || sync "$IMAGE"
    local iops p50 p99 ios
    iops=$(jnum iops "$out") p50=$(jnum lat_p50_us "$out") p99=$(jnum lat_p99_us "$out") ios=$(jnum ios "$out")
    awk -v c="$name" -v s="$side" -v r="$round" -v iops="$iops" -v p50="$p50" -v p99="$p99" \
        -v t=$((ticks1 - ticks0)) -v hz="$TICK" -v rss="$RSS_KIB" -v ios="$ios" 'BEGIN {
            cpu = t / hz
            printf "%s\t%s\t%d\t%.0f\t%.1f\t%.1f\t%.3f\t%.1f\t%d\t%.2f\n", c, s, r, iops, p50, p99,
                (ios > 0 ? cpu / ios * 1e6 : 0), rss / 1024, ios, cpu
        }' >>"$RUNS"
    tail -1 "$RUNS" | awk -F'\t' '{ printf "bench: %s round %s %-7s %8s IOPS  p50 %7s us  p99 %8s us  %7s CPU-s/Mio  RSS %6s MiB\n", $1, $3, $2, $4, $5, $6, $7, $8 }' >&2
}

for c in $CASES; do
    case_def "$c"
    for ((r = 1; r <= ROUNDS; r++)); do
        for side in $SIDES; do run_one "$c" "$side" "$r"; done
    done
done

# --- report ------------------------------------------------------------------------------
# median(side, col): the median of column `col` over the rows of `side` (awk arrays S: side
# per row, V[row, col]: values, rows: row count), shared by the report's tables.
AWK_MEDIAN='
function median(side, col,   n, i, j, t, v) {
    n = 0
    for (i = 1; i <= rows; i++) if (S[i] == side) v[++n] = V[i, col]
    if (n == 0) return ""
    for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] > v[j]; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
'
REPORT=$OUT/report.md
{
    echo "# corodev vs qemu-storage-daemon"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, Linux $(uname -r), $($QSD --version 2>/dev/null | head -1 || echo "$QSD")."
    echo "Median of $ROUNDS round(s) of ${RUNTIME} s per daemon, alternating corodev/qsd; load: corodev-bench"
    echo "(libblkio virtio-blk-vhost-user, one client thread per queue) over a 1 GiB null device, raw image"
    echo "or RBD image (a single-node Ceph $(ceph --version 2>/dev/null | awk '{print $3}') cluster on this machine: one bluestore OSD on a sparse file)."
    [ -z "$ONLY" ] || echo "**ONLY=$ONLY: the other side was not run.**"
    echo
    echo "Ratio = corodev / qsd: above 1 is better for IOPS; below 1 is better for latency, CPU and RSS."
    echo "CPU-s/Mio: daemon utime+stime per million I/Os. RSS: the daemon's highest VmRSS during the run."
    echo
    echo "IOPS ratio per round: the lowest and highest corodev/qsd ratio over the rounds (each round runs"
    echo "both daemons back to back), which shows how much of a difference the machine's noise can make."
    echo
    echo "| case | IOPS corodev | IOPS qsd | ratio | ratio per round | p50 us corodev | p50 us qsd | ratio | p99 us corodev | p99 us qsd | ratio | CPU-s/Mio corodev | CPU-s/Mio qsd | ratio | RSS MiB corodev | RSS MiB qsd | ratio |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for c in $CASES; do
        awk -F'\t' -v c="$c" "$AWK_MEDIAN"'
            function cell(x, fmt) { return x == "" ? "-" : sprintf(fmt, x) }
            function ratio(a, b) { return (a == "" || b == "" || b == 0) ? "-" : sprintf("**%.2f**", a / b) }
            # The range of per-round IOPS ratios (rounds where both sides ran).
            function spread(   r, x, lo, hi) {
                for (r in IOPS_A) if ((r in IOPS_B) && IOPS_B[r] > 0) {
                    x = IOPS_A[r] / IOPS_B[r]
                    if (lo == "" || x < lo) lo = x
                    if (hi == "" || x > hi) hi = x
                }
                return lo == "" ? "-" : sprintf("%.2f-%.2f", lo, hi)
            }
            NR > 1 && $1 == c {
                rows++; S[rows] = $2; for (k = 4; k <= 8; k++) V[rows, k] = $k
                if ($2 == "corodev") IOPS_A[$3] = $4; else if ($2 == "qsd") IOPS_B[$3] = $4
            }
            END {
                line = "| " c
                split("4 5 6 7 8", cols, " ")
                split("%.0f %.1f %.1f %.2f %.1f", fmts, " ")
                for (k = 1; k <= 5; k++) {
                    a = median("corodev", cols[k]); b = median("qsd", cols[k])
                    line = line " | " cell(a, fmts[k]) " | " cell(b, fmts[k]) " | " ratio(a, b)
                    if (k == 1) line = line " | " spread()
                }
                print line " |"
            }' "$RUNS"
    done
    if [ -n "$BASELINE" ]; then
        echo
        echo "## corodev vs baseline ($BASELINE), same rounds"
        echo
        echo "Ratio = corodev / baseline (medians); per round: the range of per-round IOPS ratios."
        echo
        echo "| case | IOPS corodev | IOPS baseline | ratio | ratio per round | CPU-s/Mio corodev | CPU-s/Mio baseline | ratio | corodev/qsd | baseline/qsd |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for c in $CASES; do
            awk -F'\t' -v c="$c" "$AWK_MEDIAN"'
                function ratio(a, b) { return (a == "" || b == "" || b == 0) ? "-" : sprintf("%.2f", a / b) }
                NR > 1 && $1 == c {
                    rows++; S[rows] = $2; V[rows, 4] = $4; V[rows, 7] = $7
                    I[$2, $3] = $4; R[$3] = 1
                }
                END {
                    for (r in R) if (I["baseline", r] > 0) {
                        x = I["corodev", r] / I["baseline", r]
                        if (lo == "" || x < lo) lo = x
                        if (hi == "" || x > hi) hi = x
                    }
                    a = median("corodev", 4); b = median("baseline", 4); q = median("qsd", 4)
                    ca = median("corodev", 7); cb = median("baseline", 7)
                    printf "| %s | %.0f | %.0f | **%s** | %s | %.2f | %.2f | %s | %s | %s |\n", c, a, b, ratio(a, b),
                        (lo == "" ? "-" : sprintf("%.2f-%.2f", lo, hi)), ca, cb, ratio(ca, cb), ratio(a, q), ratio(b, q)
                }' "$RUNS"
        done
    fi
    echo
    echo "coro microbenchmark (\`cargo bench -p coro\`): $CORO_LINE."
    echo
    echo "## Commands"
    echo
    for c in $CASES; do
        case_def "$c"
        echo "- **$c**: \`corodev-bench --socket S --json --runtime $RUNTIME ${LOAD[*]}\`"
        for side in $SIDES; do
            daemon_cmd "$side" S
            echo "  - $side: \`${CMD[*]}\`"
        done
    done
} >"$REPORT"
cat "$REPORT"

#!/usr/bin/env bash
# corodev (A) vs qemu-storage-daemon (B) under the same libblkio load (corodev-bench).
#
#   scripts/bench.sh                          # every case, 3 rounds of 5 s per daemon
#   ROUNDS=5 RUNTIME=10 scripts/bench.sh
#   CASES="null-qd1 null-qd32" scripts/bench.sh
#   CASES="rbd-randread-qd1 rbd-randwrite-qd32" scripts/bench.sh   # RBD: brings a Ceph cluster up
#   ONLY=qsd RUNTIME=2 ROUNDS=1 CASES=null-qd1 scripts/bench.sh   # B side only
#   CASES=scale SCALE="1 2 4 8" DAEMON_CPUS=0-7 CLIENT_CPUS=8-15 scripts/bench.sh
#   bash scripts/bench-bundle.sh   # the same bench, self-contained, for a machine without cargo
#
# Environment:
#   ROUNDS      rounds per case (default 3); each round runs A then B, so drift on a shared
#               machine hits both sides alike (A/B/A/B...)
#   RUNTIME     seconds per run (default 5)
#   CASES       space-separated case names (default: all; see case_def below); "scale"
#               stands for scale-N for each N in SCALE
#   SCALE       queue counts of the scaling case (default "2"): scale-N runs, for each side,
#               ONE daemon with N queues (corodev --threads N) under one N-queue client
#               (side NAME-1p) and N one-queue daemons under N concurrent one-queue clients
#               (NAME-np); 4K randread at QD 32 per queue, null backend. The report's
#               scaling table holds 1p/np IOPS (target >= 0.85) and 1p's p50 at N over
#               scale-1's (target <= 1.3)
#   DAEMON_CPUS, CLIENT_CPUS
#               CPU lists as taskset -c takes them (0-7, 8-15, 0,2,4): every daemon runs
#               under taskset -c $DAEMON_CPUS and every corodev-bench under taskset -c
#               $CLIENT_CPUS (both shapes of a scaling case get the same sets; the kernel
#               places the threads within them). Each run checks the Cpus_allowed_list of
#               every thread of every pinned process. Unset: unpinned
#   ONLY        "qsd" or "corodev": run one side only (ratios become "-"). Without it a
#               missing or unbuildable corodev is an error, never a silent skip.
#   CORO_BENCH  0 skips `cargo bench -p coro` (the report says so)
#   BASELINE    path to another corodev binary (e.g. one built from the previous commit):
#               it runs as a third side in every round (corodev, baseline, qsd) and the
#               report adds corodev / baseline ratios, so a change is judged against the
#               code before it in the same minutes, not against numbers from another day
#   CORODEV, BENCH, QSD
#               the command (a prefix, split at spaces) that starts corodev, corodev-bench
#               and qemu-storage-daemon (default target/release/corodev,
#               target/release/corodev-bench, qemu-storage-daemon); the bundle's run.sh
#               sets them to "LIB/ld-linux-x86-64.so.2 --library-path LIB BIN"
#   PREBUILT    1: the binaries are given (CORODEV, BENCH, QSD): no cargo build and no coro
#               microbenchmark (the bundle's run.sh sets it)
#   BENCH_OUT   where the report and runs go (default target/bench)
#   BENCH_NOTE  a line the report prints under the machine (run.sh: the bundle's build)
#
# Every run starts fresh daemons, waits for their sockets, runs corodev-bench --json against
# them, and records IOPS, p50/p99 latency, the daemons' CPU time per million I/Os
# (utime+stime from /proc/PID/stat, read before and after the run) and their resident memory
# (the highest VmRSS from /proc/PID/status, sampled every 0.2 s during the run). The report
# holds the machine (CPUs, model, kernel, memory, pinning), the median over rounds and the
# ratio corodev / qsd for each metric. It goes to target/bench/report.md and stdout; per-run
# numbers go to target/bench/runs.tsv (a scaling case's rows have sides NAME-1p and NAME-np;
# an np row sums IOPS, I/Os, CPU and RSS over its N daemons and clients, and its p50/p99 are
# the highest of its clients').
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5}
ONLY=${ONLY:-}
CORO_BENCH=${CORO_BENCH:-1}
BASELINE=${BASELINE:-}
SCALE=${SCALE:-2}
DAEMON_CPUS=${DAEMON_CPUS:-}
CLIENT_CPUS=${CLIENT_CPUS:-}
PREBUILT=${PREBUILT:-0}
ALL_CASES="null-qd1 null-qd32 null-2q-qd32 null-qd256 file-randread-buffered file-randwrite-buffered
file-randread-direct file-randwrite-direct file-seqread-128k file-seqwrite-128k rss-1024-inflight
rbd-randread-qd1 rbd-randread-qd32 rbd-randwrite-qd1 rbd-randwrite-qd32
rbd-randread-qd1-direct rbd-randread-qd32-direct rbd-randwrite-qd1-direct rbd-randwrite-qd32-direct
scale"
CASES=${CASES:-$ALL_CASES}

OUT=${BENCH_OUT:-target/bench}
IMAGE=$OUT/disk.img
IMAGE_SIZE=$((1 << 30)) # also the null devices' size, so both backends span the same range
# Command prefixes, so the bundle can start each binary through its own dynamic loader.
read -ra CORODEV_CMD <<<"${CORODEV:-target/release/corodev}"
read -ra BENCH_CMD <<<"${BENCH:-target/release/corodev-bench}"
read -ra QSD_CMD <<<"${QSD:-qemu-storage-daemon}"
# getconf is not among busybox's applets (the bundle's tools); 100 is Linux's USER_HZ.
TICK=$(getconf CLK_TCK 2>/dev/null || echo 100)

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
[[ $PREBUILT =~ ^[01]$ ]] || die "PREBUILT=$PREBUILT: use 1 (binaries given, no cargo) or 0"

# cpu_set LIST: the CPUs of a taskset -c list (N, N-M, N-M:STEP, comma-separated), sorted
# and space-separated, in CPU_SET; fails on a malformed list. Also reads the kernel's
# Cpus_allowed_list, so the check below compares sets, not spellings.
cpu_set() {
    local item a b step i
    local -a items on=()
    [[ $1 =~ ^[0-9][0-9,:-]*$ && $1 != *, ]] || return 1
    IFS=, read -ra items <<<"$1"
    ((${#items[@]})) || return 1
    for item in "${items[@]}"; do
        [[ $item =~ ^([0-9]{1,4})(-([0-9]{1,4})(:([0-9]{1,4}))?)?$ ]] || return 1
        a=$((10#${BASH_REMATCH[1]})) b=$((10#${BASH_REMATCH[3]:-${BASH_REMATCH[1]}})) step=$((10#${BASH_REMATCH[5]:-1}))
        ((a <= b && step > 0)) || return 1
        for ((i = a; i <= b; i += step)); do on[i]=1; done
    done
    CPU_SET="${!on[*]}"
}

# The CPUs this process may use (a cgroup cpuset can hide some of the online ones);
# taskset fails, or silently drops CPUs, outside them.
read -r _ USABLE_CPUS < <(grep '^Cpus_allowed_list:' /proc/self/status)
cpu_set "$USABLE_CPUS" || die "cannot read this process's Cpus_allowed_list ($USABLE_CPUS)"
USABLE_SET=" $CPU_SET "
DAEMON_PIN=() CLIENT_PIN=() DAEMON_SET='' CLIENT_SET=''
for var in DAEMON_CPUS CLIENT_CPUS; do
    list=${!var}
    [ -n "$list" ] || continue
    cpu_set "$list" || die "$var=$list is not a CPU list; write it as taskset -c takes it (e.g. $var=0-3 or $var=0,2,4), or unset it for no pinning"
    for cpu in $CPU_SET; do
        [[ $USABLE_SET == *" $cpu "* ]] ||
            die "$var=$list names CPU $cpu, which this machine does not have or does not let this process use (usable: $USABLE_CPUS); pick CPUs from $USABLE_CPUS, or unset $var for no pinning"
    done
    command -v taskset >/dev/null || die "$var is set but there is no taskset on PATH (util-linux or busybox)"
    if [ "$var" = DAEMON_CPUS ]; then
        DAEMON_PIN=(taskset -c "$list") DAEMON_SET=$CPU_SET
    else
        CLIENT_PIN=(taskset -c "$list") CLIENT_SET=$CPU_SET
    fi
done

# "scale" stands for scale-N for each N in SCALE.
cases=()
for c in $CASES; do
    if [ "$c" = scale ]; then
        for n in $SCALE; do cases+=("scale-$n"); done
    else
        cases+=("$c")
    fi
done
CASES=${cases[*]}

# case_def NAME: sets BACKEND (null|file|rbd), DIRECT (0|1), NQ (queues), QSIZE (virtqueue
# size), LAT_US (null-backend latency), LOAD (corodev-bench options) and, for a scaling case,
# LOAD_NP (the options of each one-queue client of the np shape; empty otherwise).
case_def() {
    BACKEND=null DIRECT=0 NQ=1 QSIZE=256 LAT_US=0 LOAD_NP=()
    case $1 in
    # N queues in one daemon vs N one-queue daemons: run_one runs both shapes.
    scale-*)
        NQ=${1#scale-}
        if ! [[ $NQ =~ ^[1-9][0-9]*$ ]] || ((NQ > 64)); then
            die "case '$1': the queue count must be 1 to 64 (corodev's --threads limit); check SCALE"
        fi
        LOAD=(--rw randread --bs 4K --iodepth 32 --queues "$NQ")
        LOAD_NP=(--rw randread --bs 4K --iodepth 32 --queues 1 --queue-size "$QSIZE")
        ;;
    null-qd1) LOAD=(--rw randread --bs 4K --iodepth 1) ;;
    null-qd32) LOAD=(--rw randread --bs 4K --iodepth 32) ;;
    null-2q-qd32) NQ=2 LOAD=(--rw randread --bs 4K --iodepth 32 --queues 2) ;;
    # 256 reads in flight on one queue: the client rarely waits for the daemon, so with the
    # two pinned apart (DAEMON_CPUS, CLIENT_CPUS) the daemon's own cost per I/O sets the
    # pace; the case to judge a change to the request path by (with BASELINE).
    null-qd256) QSIZE=1024 LOAD=(--rw randread --bs 4K --iodepth 256) ;;
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

# daemon_cmd SIDE SOCKET [QUEUES]: sets CMD to the daemon command line for the current case,
# with QUEUES queues (default NQ); in a scaling case corodev gets one worker thread per queue.
daemon_cmd() {
    local nq=${3:-$NQ}
    if [ "$1" = corodev ] || [ "$1" = baseline ]; then
        CMD=("${CORODEV_CMD[@]}")
        [ "$1" = corodev ] || CMD=("$BASELINE")
        CMD+=(--socket "$2" --num-queues "$nq" --queue-size "$QSIZE")
        [ ${#LOAD_NP[@]} = 0 ] || CMD+=(--threads "$nq")
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
        CMD=("${QSD_CMD[@]}" --blockdev "$dev" --export
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$2,writable=on,num-queues=$nq")
    fi
}

for c in $CASES; do case_def "$c"; done # reject unknown names before building anything

# --- build and tools --------------------------------------------------------------------
if [[ $SIDES == *qsd* ]]; then
    command -v "${QSD_CMD[0]}" >/dev/null || die "${QSD_CMD[0]} not found; run scripts/install-deps.sh (or ONLY=corodev)"
fi
if [ "$PREBUILT" = 0 ]; then
    echo "bench: building corodev-bench" >&2
    cargo build --release -p corodev-bench >&2 || die "building corodev-bench failed"
    if [[ $SIDES == *corodev* ]]; then
        echo "bench: building corodev" >&2
        cargo build --release -p corodev --bin corodev >&2 ||
            die "building corodev failed; ONLY=qsd benchmarks qemu-storage-daemon alone"
    fi
fi
if [[ $SIDES == *corodev* ]]; then
    command -v "${CORODEV_CMD[0]}" >/dev/null ||
        die "${CORODEV_CMD[0]} missing$([ "$PREBUILT" = 1 ] || echo " after the build"); ONLY=qsd benchmarks qemu-storage-daemon alone"
fi
command -v "${BENCH_CMD[0]}" >/dev/null || die "${BENCH_CMD[0]} missing$([ "$PREBUILT" = 1 ] || echo " after the build")"
mkdir -p "$OUT"

CORO_LINE="skipped (CORO_BENCH=0)"
[ "$PREBUILT" = 0 ] || CORO_LINE="skipped (PREBUILT=1: no cargo)"
if [ "$CORO_BENCH" != 0 ] && [ "$PREBUILT" = 0 ]; then
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
fi

# reset_image: puts the image's page cache into the same state before every file-backend
# run: written back, dropped, read back in. What one run leaves behind otherwise lands on
# the next, whichever side that is: dirty pages to write back, or a cache cut into single
# pages by O_DIRECT writes, after which buffered 128 KiB writes ran at under half their
# speed for both daemons (measured on the 2-vCPU machine).
reset_image() {
    sync "$IMAGE"
    dd if="$IMAGE" iflag=nocache count=0 status=none
    cat "$IMAGE" >/dev/null
}

# --- running -----------------------------------------------------------------------------
TMP=$(mktemp -d /tmp/corodev-bench.XXXXXX)
DAEMON_PIDS=()
BENCH_PIDS=()
CEPH_DIR=
cleanup() {
    local pid
    for pid in "${BENCH_PIDS[@]}" "${DAEMON_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
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

sample_rss() { # sample_rss PID I: raises RSS_KIB[I] to PID's current VmRSS (no fork: called 5 times a second)
    local k v _
    while read -r k v _; do
        if [ "$k" = VmRSS: ]; then
            if ((v > RSS_KIB[$2])); then RSS_KIB[$2]=$v; fi
            return 0
        fi
    done 2>/dev/null <"/proc/$1/status" || true
}

# pin_check PID CPUS: true when every thread of PID may run on exactly CPUS (a cpu_set) and
# no other CPU; PIN_SEEN says what the kernel reports (no fork: called during the run).
pin_check() {
    local st k v seen=" " n=0 ok=0
    for st in /proc/"$1"/task/*/status; do
        while read -r k v; do
            if [ "$k" = Cpus_allowed_list: ]; then
                n=$((n + 1))
                [[ $seen == *" $v "* ]] || seen+="$v "
                break
            fi
        done 2>/dev/null <"$st" || true
    done
    seen=${seen# } seen=${seen% }
    PIN_SEEN="$n thread(s), Cpus_allowed_list $seen"
    ((n > 0)) || return 1
    for v in $seen; do
        cpu_set "$v" && [ "$CPU_SET" = "$2" ] || ok=1
    done
    return $ok
}

jnum() { # jnum KEY FILE: a number from corodev-bench's flat JSON object
    local re="\"$1\":(-?[0-9.eE+-]+)"
    [[ $(<"$2") =~ $re ]] || die "no \"$1\" in corodev-bench output: $(<"$2")"
    echo "${BASH_REMATCH[1]}"
}

stop_daemons() {
    local pid i
    for pid in "${DAEMON_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${DAEMON_PIDS[@]}"; do
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    DAEMON_PIDS=()
}

RUNS=$OUT/runs.tsv
printf 'case\tside\tround\tiops\tp50_us\tp99_us\tcpu_s_per_mio\trss_mib\tios\tcpu_s\n' >"$RUNS"

# run_one CASE SIDE ROUND: one load run against fresh daemons, one line in $RUNS. SIDE is
# corodev, baseline or qsd; in a scaling case it ends in -1p (one daemon with NQ queues under
# one NQ-queue client) or -np (NQ one-queue daemons, each under its own one-queue client, the
# clients running at once): IOPS, I/Os, CPU and RSS are summed over them, p50/p99 are the
# highest of the clients'.
run_one() {
    local name=$1 side=$2 round=$3 base=${2%-[1n]p} nd=1 dq=$NQ i ticks0=0 ticks1=0 pid
    local -a load=("${LOAD[@]}") socks=() dseen=() cseen=() dok=() cok=()
    if [[ $side == *-np ]]; then nd=$NQ dq=1 load=("${LOAD_NP[@]}"); fi
    DAEMON_PIDS=() BENCH_PIDS=() RSS_KIB=()
    [ "$BACKEND" != file ] || reset_image
    for ((i = 0; i < nd; i++)); do
        socks[i]=$TMP/$base.$i.sock
        rm -f "${socks[i]}"
        daemon_cmd "$base" "${socks[i]}" "$dq"
        "${DAEMON_PIN[@]}" "${CMD[@]}" >"$TMP/$base.$i.log" 2>&1 &
        DAEMON_PIDS[i]=$!
        RSS_KIB[i]=0
    done
    for ((i = 0; i < nd; i++)); do
        local j
        for ((j = 0; ; j++)); do
            [ -S "${socks[i]}" ] && break
            kill -0 "${DAEMON_PIDS[i]}" 2>/dev/null || die "$side exited at startup ($name): ${CMD[*]}: $(tail -5 "$TMP/$base.$i.log")"
            ((j < 200)) || die "$side created no socket within 10 s ($name): ${CMD[*]}"
            sleep 0.05
        done
    done
    for pid in "${DAEMON_PIDS[@]}"; do ticks0=$((ticks0 + $(cpu_ticks "$pid"))); done
    for ((i = 0; i < nd; i++)); do
        "${CLIENT_PIN[@]}" "${BENCH_CMD[@]}" --socket "${socks[i]}" --json --runtime "$RUNTIME" "${load[@]}" \
            >"$TMP/out.$i.json" 2>"$TMP/err.$i.txt" &
        BENCH_PIDS[i]=$!
    done
    # Sample until the last client exits. The pinning is read on every pass and the last
    # reading kept: an early one can see a client before taskset's exec, or a daemon
    # before it starts the connection's worker threads.
    local alive=1
    while ((alive)); do
        alive=0
        for ((i = 0; i < nd; i++)); do
            sample_rss "${DAEMON_PIDS[i]}" "$i"
            if [ -n "$DAEMON_SET" ]; then
                dok[i]=0
                pin_check "${DAEMON_PIDS[i]}" "$DAEMON_SET" || dok[i]=1
                dseen[i]=$PIN_SEEN
            fi
            kill -0 "${BENCH_PIDS[i]}" 2>/dev/null || continue
            alive=1
            if [ -n "$CLIENT_SET" ]; then
                cok[i]=0
                pin_check "${BENCH_PIDS[i]}" "$CLIENT_SET" || cok[i]=1
                cseen[i]=$PIN_SEEN
            fi
        done
        ((alive == 0)) || sleep 0.2
    done
    local -a bpids=("${BENCH_PIDS[@]}")
    for ((i = 0; i < nd; i++)); do
        if ! wait "${BENCH_PIDS[i]}"; then
            BENCH_PIDS=()
            die "corodev-bench failed against $side ($name): $(cat "$TMP/err.$i.txt") -- daemon log: $(tail -5 "$TMP/$base.$i.log")"
        fi
    done
    BENCH_PIDS=()
    for ((i = 0; i < nd; i++)); do
        kill -0 "${DAEMON_PIDS[i]}" 2>/dev/null || die "$side died during the run ($name): $(tail -5 "$TMP/$base.$i.log")"
        ticks1=$((ticks1 + $(cpu_ticks "${DAEMON_PIDS[i]}")))
        if [ -n "$DAEMON_SET" ] && [ "${dok[i]:-1}" != 0 ]; then
            die "pinning did not take: $side daemon pid ${DAEMON_PIDS[i]} ($name): ${dseen[i]:-never read}, not DAEMON_CPUS=$DAEMON_CPUS"
        fi
        if [ -n "$CLIENT_SET" ] && [ "${cok[i]:-1}" != 0 ]; then
            die "pinning did not take: corodev-bench pid ${bpids[i]} against $side ($name): ${cseen[i]:-never read}, not CLIENT_CPUS=$CLIENT_CPUS"
        fi
    done
    if ((round == 1)) && [ -n "$DAEMON_SET$CLIENT_SET" ]; then
        echo "bench: $name $side pinning checked during the run: daemon pid ${DAEMON_PIDS[0]}: ${dseen[0]:-unpinned}; corodev-bench pid ${bpids[0]}: ${cseen[0]:-unpinned}$([ "$nd" = 1 ] || echo " (and as much for the other $((nd - 1)) of each)")" >&2
    fi
    stop_daemons
    local iops=() p50=() p99=() ios=() rss=0
    for ((i = 0; i < nd; i++)); do
        iops+=("$(jnum iops "$TMP/out.$i.json")") p50+=("$(jnum lat_p50_us "$TMP/out.$i.json")")
        p99+=("$(jnum lat_p99_us "$TMP/out.$i.json")") ios+=("$(jnum ios "$TMP/out.$i.json")")
        rss=$((rss + RSS_KIB[i]))
    done
    awk -v c="$name" -v s="$side" -v r="$round" -v iops="${iops[*]}" -v p50="${p50[*]}" -v p99="${p99[*]}" \
        -v t=$((ticks1 - ticks0)) -v hz="$TICK" -v rss="$rss" -v ios="${ios[*]}" '
        function sum(l,   a, n, i, x) { n = split(l, a, " "); x = 0; for (i = 1; i <= n; i++) x += a[i]; return x }
        function max(l,   a, n, i, x) { n = split(l, a, " "); x = a[1]; for (i = 2; i <= n; i++) if (a[i] + 0 > x + 0) x = a[i]; return x }
        BEGIN {
            cpu = t / hz; n = sum(ios)
            printf "%s\t%s\t%d\t%.0f\t%.1f\t%.1f\t%.3f\t%.1f\t%d\t%.2f\n", c, s, r, sum(iops), max(p50), max(p99),
                (n > 0 ? cpu / n * 1e6 : 0), rss / 1024, n, cpu
        }' >>"$RUNS"
    tail -1 "$RUNS" | awk -F'\t' '{ printf "bench: %s round %s %-11s %8s IOPS  p50 %7s us  p99 %8s us  %7s CPU-s/Mio  RSS %6s MiB\n", $1, $3, $2, $4, $5, $6, $7, $8 }' >&2
}

# scale_sides: the sides of a scaling case's round, each daemon's two shapes back to back
# (one queue: the two shapes are the same, so np is not run).
scale_sides() {
    local side
    SCALE_SIDES=
    for side in $SIDES; do
        SCALE_SIDES+=" $side-1p"
        [ "$NQ" = 1 ] || SCALE_SIDES+=" $side-np"
    done
}

for c in $CASES; do
    case_def "$c"
    sides=$SIDES
    if ((${#LOAD_NP[@]})); then
        scale_sides
        sides=$SCALE_SIDES
    fi
    for ((r = 1; r <= ROUNDS; r++)); do
        for side in $sides; do run_one "$c" "$side" "$r"; done
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
# machine_line: CPUs, model, topology, kernel and memory, with nothing that names the machine.
machine_line() {
    local smt=1 nodes=0 n
    if [ -r /sys/devices/system/cpu/cpu0/topology/thread_siblings_list ] &&
        cpu_set "$(</sys/devices/system/cpu/cpu0/topology/thread_siblings_list)"; then
        read -ra n <<<"$CPU_SET"
        smt=${#n[@]}
    fi
    for n in /sys/devices/system/node/node[0-9]*; do [ ! -d "$n" ] || nodes=$((nodes + 1)); done
    awk -v kernel="$(uname -r)" -v smt="$smt" -v nodes="$nodes" -v usable="$USABLE_CPUS" '
        FILENAME ~ /cpuinfo/ && /^processor[ \t]*:/ { cpus++ }
        FILENAME ~ /cpuinfo/ && /^model name[ \t]*:/ && model == "" { sub(/^[^:]*:[ \t]*/, ""); gsub(/[ \t]+/, " "); model = $0 }
        FILENAME ~ /cpuinfo/ && /^physical id[ \t]*:/ { sock[$NF] = 1 }
        FILENAME ~ /cpuinfo/ && /^flags[ \t]*:/ && / hypervisor( |$)/ { vm = 1 }
        FILENAME ~ /meminfo/ && $1 == "MemTotal:" { mem = $2 }
        END {
            for (k in sock) nsock++
            printf "%d CPUs (%s%s thread(s) per core%s), %s, Linux %s, %.0f GiB memory%s", cpus,
                (nsock ? nsock " socket(s), " : ""), smt, (nodes ? ", " nodes " NUMA node(s)" : ""),
                (model == "" ? "CPU model unknown" : model), kernel, mem / 1048576,
                (vm ? ", a virtual machine (hypervisor CPU flag)" : "")
            printf "; this process may use CPUs %s", usable
        }' /proc/cpuinfo /proc/meminfo
}

# pin_line: the pinning in words.
pin_line() {
    if [ -z "$DAEMON_SET$CLIENT_SET" ]; then
        echo "no pinning (DAEMON_CPUS and CLIENT_CPUS unset): the kernel places daemons and clients on any CPU."
        return
    fi
    local d="unpinned" c="unpinned" both=
    [ -z "$DAEMON_SET" ] || d="\`taskset -c $DAEMON_CPUS\`"
    [ -z "$CLIENT_SET" ] || c="\`taskset -c $CLIENT_CPUS\`"
    for n in $DAEMON_SET; do [[ " $CLIENT_SET " != *" $n "* ]] || both+=" $n"; done
    echo "daemons $d (DAEMON_CPUS), corodev-bench clients $c (CLIENT_CPUS)$([ -z "$both" ] || echo "; CPUs${both} are in both sets"); every thread's Cpus_allowed_list checked during every run."
}

REPORT=$OUT/report.md
{
    echo "# corodev vs qemu-storage-daemon"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $("${QSD_CMD[@]}" --version 2>/dev/null | head -1 || echo "${QSD_CMD[*]}")."
    echo
    echo "**Machine**: $(machine_line)."
    echo
    echo "**Pinning**: $(pin_line)"
    echo
    [ -z "${BENCH_NOTE:-}" ] || printf '%s\n\n' "$BENCH_NOTE"
    echo "Median of $ROUNDS round(s) of ${RUNTIME} s per daemon, alternating corodev/qsd; load: corodev-bench"
    if [[ " $CASES" == *" rbd-"* ]]; then
        echo "(libblkio virtio-blk-vhost-user, one client thread per queue) over a 1 GiB null device, raw image"
        echo "or RBD image (a single-node Ceph $(ceph --version 2>/dev/null | awk '{print $3}') cluster on this machine: one bluestore OSD on a sparse file)."
    else
        echo "(libblkio virtio-blk-vhost-user, one client thread per queue) over a 1 GiB null device or raw image."
    fi
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
        [[ $c != scale-* ]] || continue
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
            [[ $c != scale-* ]] || continue
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
    if [[ " $CASES" == *" scale-"* ]]; then
        echo
        echo "## Scaling: N queues in one daemon (1p) vs N one-queue daemons (np)"
        echo
        echo "4K randread, QD 32 per queue, null backend, queue size 256. 1p: one daemon with N queues"
        echo "(corodev --num-queues N --threads N; qsd num-queues=N, all served by its one main-loop"
        echo "thread, as qsd is built) under one corodev-bench --queues N. np: N daemons with one queue"
        echo "each, each under its own one-queue corodev-bench, all N at once; IOPS, CPU and RSS summed"
        echo "over the N, p50 the highest of the N clients' p50. Both shapes get the same CPU sets."
        echo "Targets: 1p/np IOPS >= 0.85 for N = 2, 4, 8; 1p p50 at 8 queues <= 1.3x 1p p50 at"
        echo "1 queue (the p50 column needs scale-1 in the run). Per round: the range of 1p/np ratios."
        echo
        echo "| side | N | IOPS 1p | IOPS np | 1p/np | per round | target >= 0.85 | p50 us 1p | p50 us np (max) | 1p p50 / 1 queue | target <= 1.3 | CPU-s/Mio 1p | CPU-s/Mio np | RSS MiB 1p | RSS MiB np (sum) |"
        echo "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"
        for side in $SIDES; do
            for c in $CASES; do
                [[ $c == scale-* ]] || continue
                awk -F'\t' -v c="$c" -v n="${c#scale-}" -v s="$side" "$AWK_MEDIAN"'
                    function cell(x, fmt) { return x == "" ? "-" : sprintf(fmt, x) }
                    NR > 1 && $1 ~ /^scale-/ {
                        rows++; S[rows] = $1 "/" $2; for (k = 4; k <= 8; k++) V[rows, k] = $k
                        if ($1 == c && $2 == s "-1p") I1[$3] = $4
                        if ($1 == c && $2 == s "-np") IN[$3] = $4
                    }
                    END {
                        a = median(c "/" s "-1p", 4); b = median(c "/" s "-np", 4)
                        r = (a != "" && b != "" && b > 0) ? a / b : ""
                        for (k in I1) if ((k in IN) && IN[k] > 0) {
                            x = I1[k] / IN[k]
                            if (lo == "" || x < lo) lo = x
                            if (hi == "" || x > hi) hi = x
                        }
                        p = median(c "/" s "-1p", 5); p1 = median("scale-1/" s "-1p", 5)
                        q = (n > 1 && p != "" && p1 != "" && p1 > 0) ? p / p1 : ""
                        printf "| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", s, n,
                            cell(a, "%.0f"), cell(b, "%.0f"), cell(r, "**%.2f**"),
                            (lo == "" ? "-" : sprintf("%.2f-%.2f", lo, hi)),
                            (r == "" ? "-" : (r >= 0.85 ? "met" : "**missed**")),
                            cell(p, "%.1f"), cell(median(c "/" s "-np", 5), "%.1f"), (n == 1 && p != "" ? "reference" : cell(q, "**%.2f**")),
                            (q == "" ? "-" : (q <= 1.3 ? "met" : "**missed**")),
                            cell(median(c "/" s "-1p", 7), "%.2f"), cell(median(c "/" s "-np", 7), "%.2f"),
                            cell(median(c "/" s "-1p", 8), "%.1f"), cell(median(c "/" s "-np", 8), "%.1f")
                    }' "$RUNS"
            done
        done
    fi
    echo
    echo "coro microbenchmark (\`cargo bench -p coro\`): $CORO_LINE."
    echo
    echo "## Commands"
    echo
    dpin=${DAEMON_PIN[*]} cpin=${CLIENT_PIN[*]}
    for c in $CASES; do
        case_def "$c"
        echo "- **$c**: \`${cpin:+$cpin }${BENCH_CMD[*]} --socket S --json --runtime $RUNTIME ${LOAD[*]}\`"
        for side in $SIDES; do
            daemon_cmd "$side" S
            echo "  - $side: \`${dpin:+$dpin }${CMD[*]}\`"
        done
        if ((${#LOAD_NP[@]})) && [ "$NQ" != 1 ]; then
            echo "- **$c** np: $NQ at once of \`${cpin:+$cpin }${BENCH_CMD[*]} --socket Si --json --runtime $RUNTIME ${LOAD_NP[*]}\`"
            for side in $SIDES; do
                daemon_cmd "$side" Si 1
                echo "  - $side, $NQ of: \`${dpin:+$dpin }${CMD[*]}\`"
            done
        fi
    done
} >"$REPORT"
cat "$REPORT"

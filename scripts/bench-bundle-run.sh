#!/usr/bin/env bash
# The bench bundle's run.sh (scripts/bench-bundle.sh copies it there): runs the bundled
# scripts/bench.sh -- the scaling cases and, for context, null-qd1 and null-qd32 -- with the
# bundle's binaries, each started through the bundle's own dynamic loader, pinned. Needs bash
# and nothing else from the machine: tools it lacks come from the bundled busybox.
#
#   bash run.sh                                   # defaults from this machine's CPUs
#   ROUNDS=5 RUNTIME=10 bash run.sh
#   SCALE="1 2 4 8" DAEMON_CPUS=0-7 CLIENT_CPUS=8-15 bash run.sh
#
# Defaults, each overridable by the variable of the same name (scripts/bench.sh lists them):
#   DAEMON_CPUS, CLIENT_CPUS
#       the CPUs this process may use, from the NUMA node of the first one when there are
#       several nodes and it has 4 or more, ordered so that a core's SMT siblings sit side by
#       side; the daemons get the first half, the clients the second, so daemons and clients
#       never share a core (when the halves split between cores). One CPU: unpinned.
#       Setting either one (even empty) turns the choice off: an unset one stays unpinned.
#   SCALE   1 2 4 ... up to the number of daemon CPUs (at least "1 2": the 2-queue check)
#   CASES   "null-qd1 null-qd32 scale"
#   ROUNDS, RUNTIME  scripts/bench.sh's (3 rounds of 5 s)
# The report goes to results/report.md (BENCH_OUT) and stdout, per-run rows to results/runs.tsv.
set -euo pipefail
case $0 in
*/*) B=${0%/*} ;;
*) B=. ;;
esac
B=$(cd "$B" && pwd)
PATH+=:$B/bb # the machine's own tools first, busybox's for those it lacks

die() {
    echo "run.sh: $*" >&2
    exit 1
}

[[ $B != *[[:space:]]* ]] || die "the bundle's path ($B) has a space: bench.sh splits command prefixes at spaces; move it"

# cpus LIST: the CPUs of a kernel CPU list (0-3,8,10-11), in order.
cpus() {
    local item i
    local -a items
    IFS=, read -ra items <<<"$1"
    for item in "${items[@]}"; do
        for ((i = ${item%-*}; i <= ${item#*-}; i++)); do echo "$i"; done
    done
}

read -r _ usable < <(grep '^Cpus_allowed_list:' /proc/self/status)
mapfile -t pool < <(cpus "$usable")
note="all $((${#pool[@]})) usable CPUs ($usable)"
# Several NUMA nodes: stay on the first one (the client and the daemon share the rings
# and buffers, so crossing nodes would measure the interconnect), if it holds enough CPUs.
nodes=(/sys/devices/system/node/node[0-9]*)
if [ -z "${DAEMON_CPUS+set}${CLIENT_CPUS+set}" ] && ((${#nodes[@]} > 1)); then
    for node in "${nodes[@]}"; do
        mapfile -t in_node < <(cpus "$(<"$node/cpulist")")
        [[ " ${in_node[*]} " == *" ${pool[0]} "* ]] || continue
        mapfile -t local_pool < <(for c in "${pool[@]}"; do [[ " ${in_node[*]} " != *" $c "* ]] || echo "$c"; done)
        if ((${#local_pool[@]} >= 4)); then
            pool=("${local_pool[@]}")
            note="the ${#pool[@]} usable CPUs of NUMA node ${node##*node} (of ${#nodes[@]} nodes)"
        fi
        break
    done
fi
# SMT siblings side by side, so the halves below split between cores.
ordered=()
for c in "${pool[@]}"; do
    [[ " ${ordered[*]} " != *" $c "* ]] || continue
    sib=/sys/devices/system/cpu/cpu$c/topology/thread_siblings_list
    if [ -r "$sib" ]; then
        for s in $(cpus "$(<"$sib")"); do
            [[ " ${pool[*]} " == *" $s "* && " ${ordered[*]} " != *" $s "* ]] && ordered+=("$s")
        done
    fi
    [[ " ${ordered[*]} " == *" $c "* ]] || ordered+=("$c")
done

half=$((${#ordered[@]} / 2))
if [ -z "${DAEMON_CPUS+set}${CLIENT_CPUS+set}" ] && ((half >= 1)); then
    DAEMON_CPUS=$(
        IFS=,
        echo "${ordered[*]:0:half}"
    )
    CLIENT_CPUS=$(
        IFS=,
        echo "${ordered[*]:half:half}"
    )
    echo "run.sh: pinning chosen from $note: DAEMON_CPUS=$DAEMON_CPUS CLIENT_CPUS=$CLIENT_CPUS" >&2
elif [ -z "${DAEMON_CPUS+set}${CLIENT_CPUS+set}" ]; then
    echo "run.sh: one usable CPU ($usable): no pinning" >&2
fi
if [ -z "${SCALE:-}" ]; then
    n_daemon=$half
    [ -z "${DAEMON_CPUS:-}" ] || n_daemon=$(IFS=, && set -f && for item in $DAEMON_CPUS; do cpus "${item%%:*}"; done | wc -l)
    SCALE=1
    for ((n = 2; n <= n_daemon || n == 2; n *= 2)); do SCALE+=" $n"; done
    echo "run.sh: SCALE=\"$SCALE\" (powers of two up to the number of daemon CPUs, $n_daemon, and at least to 2)" >&2
fi

L=$B/lib/ld-linux-x86-64.so.2
export CORODEV="$L --library-path $B/lib $B/bin/corodev"
export BENCH="$L --library-path $B/lib $B/bin/corodev-bench"
export QSD="$L --library-path $B/lib $B/bin/qemu-storage-daemon"
export PREBUILT=1 SCALE DAEMON_CPUS=${DAEMON_CPUS:-} CLIENT_CPUS=${CLIENT_CPUS:-}
export CASES=${CASES:-null-qd1 null-qd32 scale}
export BENCH_OUT=${BENCH_OUT:-$B/results}
BENCH_NOTE="Binaries from the bench bundle ($(<"$B/BUILD")), started through its own loader and libraries."
export BENCH_NOTE
exec "$BASH" "$B/scripts/bench.sh"

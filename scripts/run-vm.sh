#!/usr/bin/env bash
# Boots corodev's test guest (scripts/build-guest.sh) against a vhost-user-blk socket,
# streams its serial console to stdout, and exits with the guest test's verdict.
#
#   scripts/run-vm.sh --socket PATH [options]            # a server is already listening
#   scripts/run-vm.sh --start-daemon --disk IMG [options] # start corodev (or qsd) first
#
# Guest:
#   --test NAME       info, pattern, idle, fio, mq, ext4, readonly, discard, restart, resize
#                     (default pattern); see scripts/guest-init.sh
#   --arg VALUE       passed to the test as corodev.arg=VALUE (fio/mq: number of jobs)
#   --queues N        virtqueues of the vhost-user-blk-pci device (default 1)
#   --smp N           vCPUs (default 1)
#   --mem MiB         guest memory (default 256)
#   --timeout SECONDS whole boot + test limit (default 180; TCG is slow)
#   --accel A         auto (default: KVM if a probe boot under KVM works, else TCG), kvm, tcg
#   --reconnect       QEMU reconnects to the socket by itself (every second) when the server
#                     goes away, e.g. killed and restarted (default: a lost server is final)
#   --kernel-arg ARG  one more word on the guest kernel's command line, repeatable
#                     (e.g. init_on_alloc=0)
#   --print-cmdline   print the guest kernel's command line these options give and exit
#                     (integration/src/libvirt.rs boots the same guest through libvirt)
# Live migration (integration/src/migration.rs drives these through QMP):
#   --qmp PATH        a QMP server on the unix socket PATH (-qmp unix:PATH,server=on,wait=off)
#   --incoming URI    start as a migration destination (-incoming URI, e.g. defer or
#                     tcp:127.0.0.1:PORT): the guest runs once a migration has arrived, and
#                     its console continues here. A source QEMU that migrated away pauses
#                     (QMP `quit` ends it; it then prints no result, so exits 1)
# Server (only with --start-daemon; it is stopped when the guest is done):
#   --disk IMG        image to export
#   --server S        corodev (default) or qsd (QEMU's qemu-storage-daemon, for comparison)
#   --daemon-bin PATH corodev binary (default $CORODEV_BIN, else target/release/corodev)
#   --daemon-arg ARG  extra server argument, repeatable (e.g. --daemon-arg --serial=X)
#   --readonly        export read-only (corodev --readonly, qsd writable=off)
#
# Exit status: 0 the guest printed a PASS result; 1 it printed FAIL or no result; 2 usage
# or setup error; 3 the guest hit --timeout. A one-line summary goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

socket='' test=pattern arg='' queues=1 smp=1 mem=256 timeout=180 accel=auto reconnect=0
start_daemon=0 disk='' server=corodev daemon_bin=${CORODEV_BIN:-target/release/corodev} readonly=0
daemon_args=() kernel_args=() qmp='' incoming='' print_cmdline=0
usage() { sed -n '2,37p' "$0"; }
die() {
    echo "run-vm: $*" >&2
    exit 2
}
need() { [ $# -ge 2 ] || die "$1 needs a value (see --help)"; }
while (($#)); do
    case "$1" in
        --socket) need "$@"; socket=$2; shift 2 ;;
        --test) need "$@"; test=$2; shift 2 ;;
        --arg) need "$@"; arg=$2; shift 2 ;;
        --queues | --num-queues) need "$@"; queues=$2; shift 2 ;;
        --smp) need "$@"; smp=$2; shift 2 ;;
        --mem) need "$@"; mem=$2; shift 2 ;;
        --timeout) need "$@"; timeout=$2; shift 2 ;;
        --accel) need "$@"; accel=$2; shift 2 ;;
        --reconnect) reconnect=1; shift ;;
        --kernel-arg) need "$@"; kernel_args+=("$2"); shift 2 ;;
        --print-cmdline) print_cmdline=1; shift ;;
        --qmp) need "$@"; qmp=$2; shift 2 ;;
        --incoming) need "$@"; incoming=$2; shift 2 ;;
        --start-daemon) start_daemon=1; shift ;;
        --disk) need "$@"; disk=$2; shift 2 ;;
        --server) need "$@"; server=$2; shift 2 ;;
        --daemon-bin) need "$@"; daemon_bin=$2; shift 2 ;;
        --daemon-arg) need "$@"; daemon_args+=("$2"); shift 2 ;;
        --readonly) readonly=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
for n in "$queues" "$smp" "$mem" "$timeout"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "'$n' is not a positive number"
done
case "$accel" in auto | kvm | tcg) ;; *) die "--accel must be auto, kvm or tcg" ;; esac

# The guest's command line: its test (scripts/guest-init.sh reads corodev.test= and
# corodev.arg=) and the extra words.
append="console=ttyS0 panic=-1 quiet corodev.test=$test"
[ -n "$arg" ] && append="$append corodev.arg=$arg"
for k in "${kernel_args[@]}"; do
    [[ "$k" =~ ^[A-Za-z0-9_.,=:/-]+$ ]] || die "--kernel-arg '$k': one word of [A-Za-z0-9_.,=:/-]"
    append="$append $k"
done
if [ "$print_cmdline" = 1 ]; then
    echo "$append"
    exit 0
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing; run scripts/install-deps.sh"

mapfile -t guest < <(bash scripts/build-guest.sh)
[ "${#guest[@]}" = 2 ] || die "scripts/build-guest.sh failed"
kernel=${guest[0]} initrd=${guest[1]}

work=$(mktemp -d)
daemon_pid=''
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    if [ -n "$daemon_pid" ]; then
        kill "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

if [ "$start_daemon" = 1 ]; then
    [ -n "$disk" ] || die "--start-daemon needs --disk IMG"
    [ -e "$disk" ] || die "$disk does not exist (create it, e.g. truncate -s 64M $disk)"
    [ -n "$socket" ] || socket=$work/blk.sock
    case "$server" in
        corodev)
            [ -x "$daemon_bin" ] || die "$daemon_bin missing: cargo build --release --bin corodev (or --daemon-bin)"
            cmd=("$daemon_bin" --socket "$socket" --disk "$disk" --num-queues "$queues")
            [ "$readonly" = 1 ] && cmd+=(--readonly)
            ;;
        qsd)
            command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon missing; run scripts/install-deps.sh"
            ro=off writable=on
            [ "$readonly" = 1 ] && ro=on writable=off
            cmd=(qemu-storage-daemon
                --blockdev "driver=file,node-name=f,filename=$disk,read-only=$ro"
                --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$socket,writable=$writable,num-queues=$queues")
            ;;
        *) die "--server must be corodev or qsd" ;;
    esac
    cmd+=("${daemon_args[@]}")
    "${cmd[@]}" 2>"$work/daemon.log" &
    daemon_pid=$!
    for _ in $(seq 200); do
        [ -S "$socket" ] && break
        kill -0 "$daemon_pid" 2>/dev/null || die "$server exited: $(cat "$work/daemon.log")"
        sleep 0.05
    done
fi
[ -n "$socket" ] || die "--socket PATH is required (or --start-daemon --disk IMG)"
[ -S "$socket" ] || die "$socket is not a socket; start the server first (or use --start-daemon)"

# KVM only if a probe boot works: nested KVM here often fails with "emulation failure".
# The verdict is cached per kernel (target/guest/accel, refreshed when vmlinuz changes).
if [ "$accel" = auto ]; then
    cache=target/guest/accel
    if [ ! -f "$cache" ] || [ "$cache" -ot "$kernel" ]; then
        verdict=tcg
        if [ -w /dev/kvm ] && timeout 30 qemu-system-x86_64 -accel kvm -cpu host -m 256M \
            -nographic -nodefaults -serial stdio -no-reboot -kernel "$kernel" -initrd "$initrd" \
            -append "console=ttyS0 panic=-1 rdinit=/bin/busybox poweroff -f" </dev/null 2>&1 |
            grep -aq "reboot: Power down"; then
            verdict=kvm
        fi
        echo "$verdict" >"$cache"
        echo "run-vm: accelerator probe: $verdict (cached in $cache)" >&2
    fi
    accel=$(cat "$cache")
fi
cpu=max
[ "$accel" = kvm ] && cpu=host

chardev="socket,id=c0,path=$socket"
[ "$reconnect" = 1 ] && chardev="$chardev,reconnect=1"
extra=()
[ -n "$qmp" ] && extra+=(-qmp "unix:$qmp,server=on,wait=off")
[ -n "$incoming" ] && extra+=(-incoming "$incoming")

start=$(date +%s%N)
set +e
# --foreground keeps timeout (and QEMU) in our process group, so whoever started us can
# kill the whole VM by killing that group (the Rust harness does, on drop).
timeout --foreground --kill-after=5 "$timeout" qemu-system-x86_64 -accel "$accel" -cpu "$cpu" \
    -machine q35,memory-backend=mem \
    -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -m "${mem}M" -smp "$smp" \
    -nographic -nodefaults -serial stdio -no-reboot \
    -kernel "$kernel" -initrd "$initrd" -append "$append" \
    -chardev "$chardev" \
    -device "vhost-user-blk-pci,chardev=c0,num-queues=$queues" "${extra[@]}" </dev/null 2>&1 |
    tee "$work/console.log"
qemu_rc=${PIPESTATUS[0]}
set -e
elapsed=$(( ($(date +%s%N) - start) / 1000000 ))
secs=$((elapsed / 1000)).$(printf %03d $((elapsed % 1000)))

line=$(grep -a "CORODEV-RESULT" "$work/console.log" | tr -d '\r' | sed 's/.*CORODEV-RESULT/CORODEV-RESULT/' | head -n 1 || true)
if [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
    echo "run-vm: test=$test TIMEOUT after ${timeout}s accel=$accel" >&2
    rc=3
elif [[ "$line" == *" status=PASS"* ]]; then
    echo "run-vm: test=$test PASS in ${secs}s accel=$accel" >&2
    rc=0
else
    echo "run-vm: test=$test FAIL in ${secs}s accel=$accel qemu_rc=$qemu_rc: ${line:-no CORODEV-RESULT line}" >&2
    rc=1
fi
if [ -n "$daemon_pid" ] && ! kill -0 "$daemon_pid" 2>/dev/null; then
    echo "run-vm: $server exited during the test; its log:" >&2
    cat "$work/daemon.log" >&2
    rc=1
fi
exit "$rc"

#!/usr/bin/env bash
# Boots corodev's test guest against a vhost-user-blk socket and prints its console.
#
#   scripts/run-vm.sh --socket PATH [--test NAME] [--arg VALUE] [--queues N] [--smp N]
#                     [--mem MiB] [--timeout SECONDS]
#
# Tests (see scripts/guest-init.sh): info, pattern, fio, mq, ext4, readonly, discard.
# Uses KVM only when a quick probe boot under KVM succeeds (nested KVM often fails with
# "emulation failure"); TCG otherwise. The probe result is cached in target/guest/accel.
# Exit status: 0 if the guest printed a PASS result, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

socket= test=pattern arg= queues=1 smp=1 mem=512 timeout=180
while (($#)); do
    case "$1" in
        --socket) socket=$2; shift 2 ;;
        --test) test=$2; shift 2 ;;
        --arg) arg=$2; shift 2 ;;
        --queues) queues=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "run-vm: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$socket" ] || { echo "run-vm: --socket PATH is required" >&2; exit 2; }
[ -S "$socket" ] || { echo "run-vm: $socket is not a listening socket; start corodev first" >&2; exit 2; }

mapfile -t guest < <(bash scripts/build-guest.sh)
kernel=${guest[0]} initrd=${guest[1]}

accel_file=target/guest/accel
if [ ! -f "$accel_file" ]; then
    accel=tcg
    if [ -w /dev/kvm ] && timeout 20 qemu-system-x86_64 -accel kvm -m 128 -nographic -no-reboot \
        -kernel "$kernel" -append "console=ttyS0 panic=-1 rdinit=/bin/busybox poweroff -f" \
        -initrd "$initrd" </dev/null 2>&1 | grep -q "reboot: Power down"; then
        accel=kvm
    fi
    echo "$accel" >"$accel_file"
fi
accel=$(cat "$accel_file")
cpu=max
[ "$accel" = kvm ] && cpu=host

append="console=ttyS0 panic=-1 quiet corodev.test=$test"
[ -n "$arg" ] && append="$append corodev.arg=$arg"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
timeout "$timeout" qemu-system-x86_64 -accel "$accel" -cpu "$cpu" \
    -machine q35,memory-backend=mem \
    -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -m "${mem}M" -smp "$smp" \
    -nographic -no-reboot -nodefaults -serial stdio \
    -kernel "$kernel" -initrd "$initrd" -append "$append" \
    -chardev "socket,id=c0,path=$socket" \
    -device "vhost-user-blk-pci,chardev=c0,num-queues=$queues" </dev/null | tee "$log" || true
grep -q "CORODEV-RESULT name=$test status=PASS" "$log"

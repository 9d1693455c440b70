#!/usr/bin/env bash
# Installs what corodev's guest image and end-to-end tests need on Debian 12, as root:
# QEMU (system emulator and qemu-storage-daemon), the Debian cloud kernel the guest boots,
# busybox-static, fio and e2fsprogs (packed into the guest; busybox also into the bench bundle,
# with binutils' strip for its binaries: scripts/bench-bundle.sh), cpio/gzip to pack it (file
# checks that what goes in is static), util-linux's taskset (bench.sh's DAEMON_CPUS/CLIENT_CPUS), and
# valgrind (the coroutine suites run under memcheck); systemd (systemd-analyze and
# systemd-socket-activate, which the unit and socket-activation tests run); libvirt's
# daemon, QEMU driver and virsh (integration/tests/libvirt.rs runs its own libvirtd: no
# libvirt-daemon-system, whose services and default network the tests do not want); for the coro
# crate's aarch64 tests (scripts/test-coro-aarch64.sh), the aarch64 cross gcc and libc,
# qemu-user-static to run them, and rustup's aarch64-unknown-linux-gnu target; rustup's
# x86_64-unknown-linux-musl target for the static build; Ceph 16.2 (monitor, manager, OSD
# and the ceph/rbd tools, which scripts/ceph-cluster.sh runs as a throw-away cluster, and
# uuidgen for its ids) and librbd1/librados2, which corodev loads at run time for
# --backend rbd (building needs no Ceph package); qemu-block-extra (qemu-storage-daemon's
# rbd driver, for scripts/bench.sh) and strace (the RBD instance's system calls are
# checked against the unit's filter).
# Idempotent: when everything is installed it only checks (well under a second) and
# never touches the network.
set -euo pipefail

PKGS=(qemu-system-x86 qemu-system-common qemu-utils linux-image-cloud-amd64 busybox-static
    fio e2fsprogs cpio gzip valgrind systemd gcc-aarch64-linux-gnu libc6-dev-arm64-cross
    qemu-user-static ceph-mon ceph-mgr ceph-osd ceph-common librbd1 librados2 uuid-runtime
    qemu-block-extra strace libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients file binutils util-linux)

missing_pkgs() {
    missing=()
    for p in "${PKGS[@]}"; do
        dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
    done
}

# Two passes: installing Debian's QEMU 7.2 removes a newer qemu-utils (a backport some
# images ship) as conflicting, so a package present at the first check can be gone after
# it; the second pass installs Debian's own version of it.
for pass in 1 2; do
    missing_pkgs
    ((${#missing[@]})) || break
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: missing ${missing[*]}; run this script as root" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]} (pass $pass)" >&2
    export DEBIAN_FRONTEND=noninteractive
    [ "$pass" = 2 ] || apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
done

# The tools themselves, where the scripts and tests look for them.
for tool in qemu-system-x86_64 qemu-storage-daemon qemu-img busybox fio mke2fs e2fsck cpio gzip \
    valgrind systemd-analyze systemd-socket-activate aarch64-linux-gnu-gcc qemu-aarch64-static \
    ceph-mon ceph-mgr ceph-osd ceph ceph-authtool monmaptool rbd uuidgen strace \
    libvirtd virsh unshare file strip taskset; do
    command -v "$tool" >/dev/null || {
        echo "install-deps: $tool is not on PATH ($PATH) after installing" >&2
        exit 1
    }
done
if ! compgen -G '/boot/vmlinuz-*-cloud-amd64' >/dev/null; then
    echo "install-deps: no /boot/vmlinuz-*-cloud-amd64 after installing linux-image-cloud-amd64" >&2
    exit 1
fi
# The names the RBD backend opens with dlopen, as the dynamic loader finds them.
loader_cache=$(ldconfig -p)
for lib in librbd.so.1 librados.so.2; do
    if ! grep -q "^[[:space:]]*$lib " <<<"$loader_cache"; then
        echo "install-deps: the dynamic loader finds no $lib after installing librbd1 and librados2" >&2
        exit 1
    fi
done
if [ ! -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ]; then
    echo "install-deps: no aarch64 dynamic loader (qemu-aarch64-static -L /usr/aarch64-linux-gnu) after installing libc6-dev-arm64-cross" >&2
    exit 1
fi

# The Rust standard library for the other targets the tests build: aarch64 (the coro crate
# under qemu-user) and x86_64 musl (the static build of corodev). `--installed` only reads
# the local toolchain, so installed targets cost no network. (Captured first: `grep -q`
# closing the pipe early would fail rustup under pipefail.)
targets=$(rustup target list --installed)
for target in aarch64-unknown-linux-gnu x86_64-unknown-linux-musl; do
    if ! grep -qx "$target" <<<"$targets"; then
        echo "install-deps: adding the rustup target $target" >&2
        rustup target add "$target"
    fi
done

#!/usr/bin/env bash
# Installs what corodev's guest image and end-to-end tests need on Debian 12, as root:
# QEMU (system emulator and qemu-storage-daemon), the Debian cloud kernel the guest boots,
# busybox-static, fio and e2fsprogs (packed into the guest), cpio/gzip to pack it, and
# valgrind (the coroutine suites run under memcheck).
# Idempotent: when every package is installed it only checks (well under a second) and
# never touches the network.
set -euo pipefail

PKGS=(qemu-system-x86 qemu-system-common qemu-utils linux-image-cloud-amd64 busybox-static
    fio e2fsprogs cpio gzip valgrind)

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
for tool in qemu-system-x86_64 qemu-storage-daemon qemu-img busybox fio mke2fs e2fsck cpio gzip valgrind; do
    command -v "$tool" >/dev/null || {
        echo "install-deps: $tool is not on PATH ($PATH) after installing" >&2
        exit 1
    }
done
if ! compgen -G '/boot/vmlinuz-*-cloud-amd64' >/dev/null; then
    echo "install-deps: no /boot/vmlinuz-*-cloud-amd64 after installing linux-image-cloud-amd64" >&2
    exit 1
fi

# Rust targets the tests build for: the static musl build of corodev.
for target in x86_64-unknown-linux-musl; do
    if ! rustup target list --installed | grep -qx "$target"; then
        echo "install-deps: adding Rust target $target" >&2
        rustup target add "$target"
    fi
done

#!/usr/bin/env bash
# Installs what corodev's build, guest image and tests need on Debian 12 (as root).
# Idempotent and fast when everything is present.
set -euo pipefail

PKGS=(qemu-system-x86 qemu-system-common qemu-utils linux-image-cloud-amd64 busybox-static fio e2fsprogs cpio)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: missing ${missing[*]}; run as root (apt-get install)" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for tool in qemu-system-x86_64 qemu-storage-daemon busybox fio mke2fs cpio; do
    command -v "$tool" >/dev/null || { echo "install-deps: $tool still missing after install" >&2; exit 1; }
done
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || { echo "install-deps: no cloud kernel in /boot" >&2; exit 1; }

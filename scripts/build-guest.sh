#!/usr/bin/env bash
# Builds corodev's test guest: the Debian cloud kernel plus an initramfs with busybox,
# fio, mkfs.ext4/e2fsck (with their shared libraries) and the virtio modules, whose /init
# (scripts/guest-init.sh) runs the test named on the kernel command line.
# Output (cached; rebuilt only when this script, the init or the kernel change):
#   target/guest/vmlinuz  target/guest/initramfs.cpio
# Prints the two paths.
set -euo pipefail
cd "$(dirname "$0")/.."

kernel=$(ls -1 /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n 1)
[ -n "$kernel" ] || { echo "build-guest: no cloud kernel; run scripts/install-deps.sh" >&2; exit 1; }
kver=${kernel#/boot/vmlinuz-}
mods=/lib/modules/$kver
out=target/guest
stamp=$(cat scripts/build-guest.sh scripts/guest-init.sh | sha256sum | cut -c1-16)-$kver

if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/initramfs.cpio" ]; then
    echo "$out/vmlinuz"
    echo "$out/initramfs.cpio"
    exit 0
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc,proc,sys,dev,tmp,mnt,lib/modules}
cp /bin/busybox "$root/bin/busybox"
cp scripts/guest-init.sh "$root/init"
chmod +x "$root/init"

# Userspace tools and every shared library they load (the loader included).
for tool in /usr/bin/fio /usr/sbin/mke2fs /usr/sbin/e2fsck; do
    cp "$tool" "$root/bin/"
    ldd "$tool" | awk '/=>/ {print $3} /^\s*\/lib/ {print $1}' | while read -r lib; do
        [ -e "$lib" ] && cp -Ln "$lib" "$root/lib/"
    done
done
cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
ln -s mke2fs "$root/bin/mkfs.ext4"

# Kernel modules for virtio-blk over PCI, dependencies first (from modules.dep).
want="virtio_blk virtio_pci"
order=()
add_module() {
    local name=$1 path deps dep
    path=$(grep -E "/${name}\.ko(\.[a-z]+)?:" "$mods/modules.dep" | head -n 1 | cut -d: -f1) || true
    [ -n "$path" ] || return 0 # built into the kernel
    deps=$(grep -E "^${path}:" "$mods/modules.dep" | cut -d: -f2)
    for dep in $deps; do
        add_module "$(basename "$dep" | sed -E 's/\.ko(\.[a-z]+)?$//')"
    done
    for m in "${order[@]:-}"; do [ "$m" = "$path" ] && return 0; done
    order+=("$path")
}
for m in $want; do add_module "$m"; done
: >"$root/etc/modules-order"
for path in "${order[@]}"; do
    file=$(basename "$path")
    case "$file" in
        *.ko.xz) xz -dc "$mods/$path" >"$root/lib/modules/${file%.xz}"; file=${file%.xz} ;;
        *.ko.zst) zstd -qdc "$mods/$path" >"$root/lib/modules/${file%.zst}"; file=${file%.zst} ;;
        *) cp "$mods/$path" "$root/lib/modules/$file" ;;
    esac
    echo "$file" >>"$root/etc/modules-order"
done

mkdir -p "$out"
# Uncompressed: under TCG, gunzip in the guest costs more than loading the bigger file.
(cd "$root" && find . | cpio -o -H newc --quiet) >"$out/initramfs.cpio.tmp"
mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
cp "$kernel" "$out/vmlinuz"
echo "$stamp" >"$out/stamp"
echo "$out/vmlinuz"
echo "$out/initramfs.cpio"

#!/usr/bin/env bash
# Builds corodev's test guest: the Debian cloud kernel (linux-image-cloud-amd64) plus a
# gzipped initramfs holding busybox-static, fio, mkfs.ext4/e2fsck (each with the shared
# libraries ldd lists and the dynamic loader) and the virtio-blk kernel modules. Its /init
# (scripts/guest-init.sh) runs the test named by corodev.test= on the kernel command line.
#
#   scripts/build-guest.sh            # build if needed; print the kernel and initramfs paths
#   scripts/build-guest.sh --force    # rebuild even if the cache looks current
#
# Output, cached under target/guest/ and rebuilt only when an input changes (this script,
# guest-init.sh, the kernel version, or the fio/e2fsprogs/busybox package versions):
#   target/guest/vmlinuz             copy of /boot/vmlinuz-<cloud kernel>
#   target/guest/initramfs.cpio.gz
# Prints the two absolute paths, kernel first, one per line (stdout); progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
root_dir=$PWD
out=$root_dir/target/guest

die() {
    echo "build-guest: $*" >&2
    exit 1
}

force=0
case "${1:-}" in
    --force) force=1 ;;
    "") ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
esac

kernel=$(find /boot -maxdepth 1 -name 'vmlinuz-*-cloud-amd64' 2>/dev/null | sort -V | tail -n 1)
[ -n "$kernel" ] || die "no /boot/vmlinuz-*-cloud-amd64; run scripts/install-deps.sh"
kver=${kernel#/boot/vmlinuz-}
mods=/lib/modules/$kver
[ -f "$mods/modules.dep" ] || die "$mods/modules.dep missing; run scripts/install-deps.sh"
for tool in /bin/busybox /usr/bin/fio /usr/sbin/mke2fs /usr/sbin/e2fsck; do
    [ -x "$tool" ] || die "$tool missing; run scripts/install-deps.sh"
done
for tool in cpio gzip ldd; do
    command -v "$tool" >/dev/null || die "$tool missing; run scripts/install-deps.sh"
done

pkg_versions=$(dpkg-query -W -f='${Package}=${Version} ' fio e2fsprogs busybox-static 2>/dev/null || true)
stamp=$({
    cat scripts/build-guest.sh scripts/guest-init.sh
    echo "$kver $pkg_versions"
} | sha256sum | cut -c1-16)-$kver

mkdir -p "$out"
# Serialise concurrent callers (run-vm.sh calls this on every boot).
exec 9>"$out/.lock"
flock 9

if [ "$force" = 0 ] && [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] &&
    [ -f "$out/initramfs.cpio.gz" ] && [ -f "$out/vmlinuz" ]; then
    echo "$out/vmlinuz"
    echo "$out/initramfs.cpio.gz"
    exit 0
fi

echo "build-guest: building the guest for kernel $kver" >&2
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc,proc,sys,dev,tmp,mnt,lib/modules}
cp /bin/busybox "$root/bin/busybox"
cp scripts/guest-init.sh "$root/init"
chmod 755 "$root/init"

# Userspace tools and every shared library they load (ldd resolves the whole closure),
# plus the dynamic loader at the path the binaries ask for.
for tool in /usr/bin/fio /usr/sbin/mke2fs /usr/sbin/e2fsck; do
    cp "$tool" "$root/bin/"
    ldd "$tool" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' |
        while read -r lib; do
            [ -e "$lib" ] && cp -Ln "$lib" "$root/lib/"
        done
done
loader=$(readelf -l /usr/bin/fio | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
[ -n "$loader" ] || die "cannot find fio's program interpreter"
mkdir -p "$root/$(dirname "$loader")"
cp -L "$loader" "$root/$loader"
ln -s mke2fs "$root/bin/mkfs.ext4"

# Kernel modules, dependencies first (modules.dep lists a module's dependencies, which we
# load before it). A module in modules.builtin is part of the kernel and needs nothing.
# virtio-blk over PCI is required; ext4 and its crc32c/crc16 helpers are builtin in the
# Debian cloud kernel, but are packed as modules if a kernel has them as such.
required="virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk"
optional="crc16 crc32c_generic mbcache jbd2 ext4"
order=()
mod_regex() { # module name -> regex on a path in modules.dep / modules.builtin ('-' == '_')
    local re=${1//[-_]/[-_]}
    echo "(^|/)${re}\\.ko(\\.(xz|zst|gz))?"
}
is_builtin() { grep -qE "$(mod_regex "$1")\$" "$mods/modules.builtin"; }
module_path() { grep -oE "^[^:]*$(mod_regex "$1"):" "$mods/modules.dep" | head -n 1 | tr -d :; }
add_module() {
    local name=$1 required=$2 path dep m deps
    if is_builtin "$name"; then
        echo "build-guest: $name is built into the kernel" >&2
        return 0
    fi
    path=$(module_path "$name")
    if [ -z "$path" ]; then
        [ "$required" = 1 ] && die "module $name is neither built in nor in $mods/modules.dep"
        echo "build-guest: $name not available (not needed)" >&2
        return 0
    fi
    for m in "${order[@]}"; do [ "$m" = "$path" ] && return 0; done
    read -ra deps < <(grep -E "^${path}:" "$mods/modules.dep" | cut -d: -f2) || true
    for dep in "${deps[@]}"; do
        add_module "$(basename "$dep" | sed -E 's/\.ko(\.(xz|zst|gz))?$//')" 1
    done
    order+=("$path")
}
for m in $required; do add_module "$m" 1; done
for m in $optional; do add_module "$m" 0; done
: >"$root/etc/modules-order"
for path in "${order[@]}"; do
    file=$(basename "$path")
    # Decompressed here so busybox insmod needs no decompressor.
    case "$file" in
        *.ko.xz) xz -dc "$mods/$path" >"$root/lib/modules/${file%.xz}"; file=${file%.xz} ;;
        *.ko.zst) zstd -qdc "$mods/$path" >"$root/lib/modules/${file%.zst}"; file=${file%.zst} ;;
        *.ko.gz) gzip -dc "$mods/$path" >"$root/lib/modules/${file%.gz}"; file=${file%.gz} ;;
        *) cp "$mods/$path" "$root/lib/modules/$file" ;;
    esac
    echo "$file" >>"$root/etc/modules-order"
done
echo "build-guest: modules (load order): $(tr '\n' ' ' <"$root/etc/modules-order")" >&2

# Compressed: fio's library closure (ceph, icu, ...) is ~90 MB, which a 256 MiB guest could
# not hold twice (the initrd image plus the unpacked rootfs).
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6) >"$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
cp -p "$kernel" "$out/vmlinuz.tmp" # -p: its mtime keys run-vm.sh's KVM probe cache
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
rm -f "$out/initramfs.cpio" # output of older versions of this script
echo "$stamp" >"$out/stamp"
echo "build-guest: $(du -h "$out/initramfs.cpio.gz" | cut -f1) initramfs in $out" >&2
echo "$out/vmlinuz"
echo "$out/initramfs.cpio.gz"

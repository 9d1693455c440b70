#!/usr/bin/env bash
# Boots corodev's NVMe test guest: a q35 machine under TCG with QEMU's intel-iommu (so the
# guest kernel runs an IOMMU and VFIO works inside it) and one emulated NVMe controller
# backed by a host file. Its /init (scripts/nvme-guest-init.sh) moves the controller to
# vfio-pci (or leaves it on the kernel's nvme driver) and runs a daemon and a frontend
# given here, inside the guest; the host can then check the backing file.
#
#   scripts/nvme-guest.sh --disk FILE --frontend CMD [options]
#
#   --disk FILE       the NVMe namespace's backing file (raw; it must exist)
#   --frontend CMD    shell command run in the guest once the daemon listens (its last
#                     stdout line: key=value fields; its exit status: the verdict)
#   --daemon CMD      shell command started in the guest before the frontend, e.g.
#                     'corodev --socket $SOCK --disk $NVME_BLK'; stopped with SIGTERM after it
#   --bin PATH        a static binary to put in the guest's /bin, repeatable
#   --bind B          vfio (default): the controller on vfio-pci; kernel: on the nvme
#                     driver, as /dev/nvme0n1
#   --timeout SECONDS whole boot + test limit (default 300; TCG is slow)
#   --mem MiB         guest memory (default 512)
#   --smp N           vCPUs (default 1)
#   --aw-bits N       intel-iommu address width, 39 or 48 (default 48: the backend maps
#                     memory at IOVA = its virtual address, which needs 47 bits)
#   --trace PATTERN   enable QEMU trace events matching PATTERN (e.g. 'pci_nvme_flush*'),
#                     printed on the console: what the controller was asked; repeatable
# Environment inside the guest: NVME_BDF, NVME_GROUP, NVME_BLK, SOCK (see the init script).
#
# Exit status: 0 the guest printed a PASS result; 1 it printed FAIL or no result; 2 usage
# or setup error; 3 the guest hit --timeout. The serial console goes to stdout.
#
# The guest's base initramfs (busybox-static, the VFIO modules, the init script) is cached
# in target/nvme-guest/ and rebuilt when an input changes; the --bin files and the commands
# are packed per run into a second archive appended to it (the kernel unpacks both).
set -euo pipefail
cd "$(dirname "$0")/.."

disk='' frontend='' daemon='' bind=vfio timeout=300 mem=512 smp=1 aw_bits=48 bins=() traces=()
die() {
    echo "nvme-guest: $*" >&2
    exit 2
}
need() { [ $# -ge 2 ] || die "$1 needs a value (see --help)"; }
while (($#)); do
    case "$1" in
        --disk) need "$@"; disk=$2; shift 2 ;;
        --frontend) need "$@"; frontend=$2; shift 2 ;;
        --daemon) need "$@"; daemon=$2; shift 2 ;;
        --bin) need "$@"; bins+=("$2"); shift 2 ;;
        --bind) need "$@"; bind=$2; shift 2 ;;
        --timeout) need "$@"; timeout=$2; shift 2 ;;
        --mem) need "$@"; mem=$2; shift 2 ;;
        --smp) need "$@"; smp=$2; shift 2 ;;
        --aw-bits) need "$@"; aw_bits=$2; shift 2 ;;
        --trace) need "$@"; traces+=(-trace "enable=$2"); shift 2 ;;
        -h | --help) sed -n '2,32p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[ -n "$disk" ] || die "--disk FILE is required"
[ -f "$disk" ] || die "$disk is not a file (create it, e.g. truncate -s 64M $disk)"
[ -n "$frontend" ] || die "--frontend CMD is required"
case "$bind" in vfio | kernel) ;; *) die "--bind must be vfio or kernel" ;; esac
for n in "$timeout" "$mem" "$smp"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "'$n' is not a positive number"
done
case "$aw_bits" in 39 | 48) ;; *) die "--aw-bits must be 39 or 48 (what QEMU 7.2 accepts)" ;; esac
for b in "${bins[@]}"; do
    [ -f "$b" ] && [ -x "$b" ] || die "--bin $b: not an executable file"
    file -L "$b" | grep -Eq 'statically linked|static-pie linked' ||
        die "--bin $b is not statically linked (the guest has no libc); build it for x86_64-unknown-linux-musl"
done
for tool in qemu-system-x86_64 cpio gzip file; do
    command -v "$tool" >/dev/null || die "$tool missing; run scripts/install-deps.sh"
done
[ -x /bin/busybox ] || die "/bin/busybox missing; run scripts/install-deps.sh"
kernel=$(find /boot -maxdepth 1 -name 'vmlinuz-*-cloud-amd64' 2>/dev/null | sort -V | tail -n 1)
[ -n "$kernel" ] || die "no /boot/vmlinuz-*-cloud-amd64; run scripts/install-deps.sh"
kver=${kernel#/boot/vmlinuz-}
mods=/lib/modules/$kver
[ -f "$mods/modules.dep" ] || die "$mods/modules.dep missing; run scripts/install-deps.sh"

out=target/nvme-guest
mkdir -p "$out"
base=$out/base.cpio.gz
stamp=$({
    cat scripts/nvme-guest.sh scripts/nvme-guest-init.sh
    echo "$kver $(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || true)"
} | sha256sum | cut -c1-16)-$kver
(
    # Serialised: parallel callers would write the same files.
    flock 9
    [ -f "$base" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ] && exit 0
    echo "nvme-guest: building the base initramfs for kernel $kver" >&2
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    cp scripts/nvme-guest-init.sh "$root/init"
    chmod 755 "$root/init"
    # vfio-pci and the type1 IOMMU backend, dependencies first, from modules.dep (6.1:
    # vfio, vfio_iommu_type1, vfio_virqfd, irqbypass, vfio-pci-core, vfio-pci). The
    # Debian cloud kernel has them as modules and not in its initrd.
    order=()
    add() { # add PATH (relative to $mods, as modules.dep names it)
        local m dep deps
        for m in "${order[@]}"; do [ "$m" = "$1" ] && return 0; done
        read -ra deps < <(grep -E "^$1:" "$mods/modules.dep" | cut -d: -f2) || true
        for dep in "${deps[@]}"; do add "$dep"; done
        order+=("$1")
    }
    for name in vfio_iommu_type1 vfio-pci; do
        path=$(grep -oE "^[^:]*/${name}\.ko(\.(xz|zst|gz))?:" "$mods/modules.dep" | tr -d :)
        [ -n "$path" ] || { echo "nvme-guest: module $name not in $mods/modules.dep" >&2; exit 1; }
        add "$path"
    done
    for path in "${order[@]}"; do
        file=$(basename "$path")
        ko=${file%.ko*}.ko
        case "$file" in # decompressed here: busybox insmod needs no decompressor
            *.ko.xz) xz -dc "$mods/$path" ;;
            *.ko.zst) zstd -qdc "$mods/$path" ;;
            *.ko.gz) gzip -dc "$mods/$path" ;;
            *) cat "$mods/$path" ;;
        esac >"$root/lib/modules/$ko"
        echo "$ko" >>"$root/etc/modules-order"
    done
    echo "nvme-guest: modules (load order): $(tr '\n' ' ' <"$root/etc/modules-order")" >&2
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6) >"$base.tmp"
    mv "$base.tmp" "$base"
    echo "$stamp" >"$out/stamp"
) 9>"$out/.lock"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/run/bin" "$work/run/etc/nvme-test"
for b in "${bins[@]}"; do cp "$b" "$work/run/bin/"; done
printf '%s\n' "$frontend" >"$work/run/etc/nvme-test/frontend"
[ -n "$daemon" ] && printf '%s\n' "$daemon" >"$work/run/etc/nvme-test/daemon"
{
    cat "$base"
    (cd "$work/run" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1)
} >"$work/initrd"

start=$(date +%s%N)
set +e
# TCG only: the guest's VFIO needs the emulated IOMMU, and this host has no KVM anyway.
# intel-iommu comes first (QEMU wants it before the devices it translates for).
# intremap=on: without interrupt remapping the guest's vfio_iommu_type1 refuses to attach
# the group ("No interrupt remapping support", EPERM on VFIO_SET_IOMMU) unless loaded with
# allow_unsafe_interrupts=1; with it MSI-X reaches an eventfd. aw-bits: see --aw-bits (39,
# QEMU's default, makes VFIO_IOMMU_MAP_DMA at a user address fail with EINVAL).
# discard=unmap: QEMU's block layer drops discards by default (discard=ignore), so an NVMe
# Deallocate would leave the data; with unmap it punches a hole in the backing file, which
# then reads as zeroes, as the namespace's DLFEAT (0x1, "deallocated blocks read as zeroes")
# promises.
# --foreground keeps QEMU in our process group, so a caller can kill the whole VM.
timeout --foreground --kill-after=5 "$timeout" qemu-system-x86_64 -accel tcg -cpu max \
    -machine q35 -m "${mem}M" -smp "$smp" -nographic -nodefaults -serial stdio -no-reboot \
    -device "intel-iommu,intremap=on,aw-bits=$aw_bits" \
    -drive "file=$disk,if=none,id=nvm,format=raw,discard=unmap" \
    -device nvme,drive=nvm,serial=corodev-nvme \
    -kernel "$kernel" -initrd "$work/initrd" "${traces[@]}" \
    -append "console=ttyS0 panic=-1 quiet intel_iommu=on corodev.bind=$bind" </dev/null 2>&1 |
    tee "$work/console"
rc=${PIPESTATUS[0]}
set -e
secs=$(awk "BEGIN{printf \"%.1f\", ($(date +%s%N) - $start) / 1e9}")
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "nvme-guest: TIMEOUT after ${timeout}s" >&2
    exit 3
elif grep -aq 'CORODEV-RESULT .*status=PASS' "$work/console"; then
    echo "nvme-guest: PASS in ${secs}s" >&2
    exit 0
fi
echo "nvme-guest: FAIL in ${secs}s (qemu exit $rc)" >&2
exit 1

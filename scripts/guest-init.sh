#!/bin/busybox sh
# /init of corodev's test guest (packed by scripts/build-guest.sh). Mounts the pseudo
# filesystems, loads the virtio modules, waits for the vhost-user-blk disk (/dev/vda),
# runs the test named by corodev.test= on the kernel command line (corodev.arg= is its
# optional argument), prints on the serial console
#   CORODEV-BEGIN name=<test> boot_s=<seconds from kernel start to here>
#   CORODEV-INFO key=value ...                     (info, mq, readonly)
#   CORODEV-RESULT name=<test> status=PASS|FAIL [detail=<why>] key=value ... test_s=<s>
#   CORODEV-DONE
# and powers off. Values never contain spaces. Tests:
#   info      device as the guest kernel sees it (size, block sizes, ro, serial, cache, ...)
#   pattern   4 MiB of random data written at 1 MiB with O_DIRECT, read back, compared;
#             prints offset=, length=, md5=, sha256= so the host can check its image
#   fio       fio randwrite, 4k, libaio, iodepth 16, corodev.arg jobs (default 2) of 8 MiB
#             each in disjoint regions, crc32c verify, verify_fatal
#   mq        like fio with one job per vCPU (or corodev.arg), split CPUs; prints the
#             number of blk-mq queues and the completion interrupts of each queue
#   ext4      mkfs.ext4, mount, write files, sync, umount, remount, verify md5s, e2fsck -fn
#   readonly  info, then a write must fail and a read must succeed
#   discard   fio trim of the first 4 MiB
# shellcheck shell=dash
# Word splitting of /proc/cmdline, the module list and $FIO_FIELDS is intended here:
# shellcheck disable=SC2013,SC2086
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin LD_LIBRARY_PATH=/lib:/lib64
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp

uptime_s() { cut -d' ' -f1 /proc/uptime; }
# clean [MAX]: stdin as one word, safe as a value (blanks and '=' become '_').
clean() { tr -s ' \t\r\n=' '_____' | sed 's/^_*//; s/_*$//' | head -c "${1:-200}"; }

TEST=none
ARG=
for w in $(cat /proc/cmdline); do
    case "$w" in
        corodev.test=*) TEST=${w#corodev.test=} ;;
        corodev.arg=*) ARG=${w#corodev.arg=} ;;
    esac
done

finish() {
    sync
    echo "CORODEV-DONE"
    poweroff -f
    sleep 5 # poweroff -f does not return; if it did, exiting init panics (panic=-1)
}
result() { # result PASS|FAIL key=value ...
    st=$1
    shift
    echo "CORODEV-RESULT name=$TEST status=$st $* test_s=$(awk "BEGIN{print $(uptime_s) - $T0}")"
}

T0=$(uptime_s)
echo "CORODEV-BEGIN name=$TEST boot_s=$T0"

for m in $(cat /etc/modules-order); do
    insmod "/lib/modules/$m" 2>/tmp/insmod.err || echo "insmod $m failed: $(cat /tmp/insmod.err)"
done

i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do
    sleep 0.1
    i=$((i + 1))
done
if [ ! -b /dev/vda ]; then
    result FAIL detail=no-/dev/vda-after-20s
    finish
fi

info() {
    b=/sys/block/vda
    echo "CORODEV-INFO size=$(cat $b/size) lbs=$(cat $b/queue/logical_block_size)" \
        "pbs=$(cat $b/queue/physical_block_size) ro=$(cat $b/ro)" \
        "serial=$(clean 40 <$b/serial)" "cache=$(clean <$b/queue/write_cache)" \
        "discard_max=$(cat $b/queue/discard_max_bytes)" \
        "wz_max=$(cat $b/queue/write_zeroes_max_bytes) queues=$(find $b/mq -mindepth 1 -maxdepth 1 | wc -l)"
}

# fio_verify JOBS [extra fio options]: verified random writes, each job in its own 8 MiB.
fio_verify() {
    jobs=$1
    shift
    fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --ioengine=libaio \
        --direct=1 --iodepth=16 --numjobs="$jobs" --size=8m --offset_increment=8m \
        --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting "$@" \
        >/tmp/fio.out 2>&1
    rc=$?
    # The lines that matter: errors, bandwidth and IOPS, verify failures. fio warns that
    # "multiple writers may overwrite blocks" whenever numjobs > 1 share a file and verify;
    # offset_increment keeps the jobs' regions disjoint, so that warning is dropped.
    grep -E "err=|IOPS=|WRITE:|READ:|verify|fio: " /tmp/fio.out | grep -v "multiple writers" |
        sed 's/^/fio| /'
    iops=$(sed -n 's/.*write: IOPS=\([^,]*\),.*/\1/p' /tmp/fio.out | head -n 1)
    if [ $rc -eq 0 ] && grep -q "err= 0" /tmp/fio.out; then
        FIO_OK=1
        FIO_FIELDS="jobs=$jobs write_iops=$iops"
    else
        FIO_OK=0
        FIO_FIELDS="jobs=$jobs rc=$rc detail=$(grep -E 'err=|fio: |verify' /tmp/fio.out | clean 300)"
    fi
}

case "$TEST" in
info)
    info
    result PASS
    ;;
pattern)
    off_mib=1 len_mib=4
    dd if=/dev/urandom of=/tmp/p bs=1M count=$len_mib 2>/dev/null
    md5=$(md5sum /tmp/p | cut -d' ' -f1)
    sha=$(sha256sum /tmp/p | cut -d' ' -f1)
    if ! dd if=/tmp/p of=/dev/vda bs=1M seek=$off_mib oflag=direct conv=fsync 2>/tmp/err; then
        result FAIL "detail=write-failed:$(clean </tmp/err)"
        finish
    fi
    sync
    echo 3 >/proc/sys/vm/drop_caches
    got=$(dd if=/dev/vda bs=1M skip=$off_mib count=$len_mib iflag=direct 2>/tmp/err | md5sum | cut -d' ' -f1)
    if [ "$md5" = "$got" ]; then
        result PASS offset=$((off_mib << 20)) length=$((len_mib << 20)) md5="$md5" sha256="$sha"
    else
        result FAIL detail=readback-mismatch want="$md5" got="$got" "err=$(clean </tmp/err)"
    fi
    ;;
fio)
    fio_verify "${ARG:-2}"
    if [ "$FIO_OK" = 1 ]; then result PASS $FIO_FIELDS; else result FAIL $FIO_FIELDS; fi
    ;;
mq)
    jobs=${ARG:-$(nproc)}
    [ "$jobs" -lt 2 ] && jobs=2
    fio_verify "$jobs" --cpus_allowed_policy=split
    info
    # Completion interrupts per request virtqueue (virtioN-req.Q in /proc/interrupts, all
    # CPUs summed): all non-zero means every queue carried requests.
    per_q=$(awk '/virtio[0-9]+-req\./ {
        n = 0
        for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i
        printf "%s%d", sep, n
        sep = ","
    }' /proc/interrupts)
    queues=$(find /sys/block/vda/mq -mindepth 1 -maxdepth 1 | wc -l)
    if [ "$FIO_OK" = 1 ]; then st=PASS; else st=FAIL; fi
    result $st $FIO_FIELDS queues="$queues" irqs_per_queue="${per_q:-unknown}"
    ;;
ext4)
    ok=1 why=
    if ! mkfs.ext4 -q -F /dev/vda >/tmp/log 2>&1; then
        ok=0 why=mkfs
    elif ! mount -t ext4 /dev/vda /mnt 2>>/tmp/log; then
        ok=0 why=mount
    else
        for i in 1 2 3 4; do
            dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i * 8)) 2>/dev/null || ok=0 why=write
        done
        mkdir -p /mnt/dir && cp /tmp/log /mnt/dir/mkfs.log
        (cd /mnt && md5sum f1 f2 f3 f4 >/tmp/sums)
        sync
        umount /mnt || { ok=0; why=umount; }
        echo 3 >/proc/sys/vm/drop_caches
        if [ $ok = 1 ]; then
            if ! mount -t ext4 /dev/vda /mnt 2>>/tmp/log; then
                ok=0 why=remount
            else
                (cd /mnt && md5sum -c /tmp/sums) >>/tmp/log 2>&1 || { ok=0; why=checksum; }
                umount /mnt || { ok=0; why=umount2; }
            fi
        fi
        if [ $ok = 1 ] && ! e2fsck -fn /dev/vda >>/tmp/log 2>&1; then
            ok=0 why=e2fsck
        fi
    fi
    if [ $ok = 1 ]; then
        result PASS fsck=clean files=4 bytes=$((64 * 1024 * 8 * 10))
    else
        result FAIL "detail=$why:$(tail -c 300 /tmp/log | clean 300)"
    fi
    ;;
readonly)
    info
    if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then
        result FAIL detail=write-succeeded write=ok
    elif dd if=/dev/vda of=/dev/null bs=4096 count=16 iflag=direct 2>/dev/null; then
        result PASS write=refused read=ok
    else
        result FAIL detail=read-failed write=refused
    fi
    ;;
discard)
    if fio --name=trim --filename=/dev/vda --rw=trim --bs=64k --size=4m --ioengine=libaio \
        --direct=1 >/tmp/log 2>&1; then
        result PASS
    else
        result FAIL "detail=$(tail -c 200 /tmp/log | clean)"
    fi
    ;;
*)
    result FAIL "detail=unknown-test:$TEST"
    ;;
esac
finish

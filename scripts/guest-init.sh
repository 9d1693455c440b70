#!/bin/busybox sh
# /init of corodev's test guest. Loads the virtio modules, finds the vhost-user-blk disk
# (/dev/vda), runs the test named by corodev.test= on the kernel command line, prints
#   CORODEV-RESULT name=<test> status=PASS|FAIL <key=value ...>
# on the serial console, and powers off.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/sbin:/usr/sbin LD_LIBRARY_PATH=/lib:/lib64
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /mnt && mount -t tmpfs tmp /tmp

for m in $(cat /etc/modules-order); do insmod "/lib/modules/$m" || echo "insmod $m failed"; done

TEST=none
ARG=
for w in $(cat /proc/cmdline); do
    case "$w" in
        corodev.test=*) TEST=${w#corodev.test=} ;;
        corodev.arg=*) ARG=${w#corodev.arg=} ;;
    esac
done

result() { echo "CORODEV-RESULT name=$TEST $*"; }
finish() { sync; echo "CORODEV-DONE"; poweroff -f; }

i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/vda ]; then
    result status=FAIL detail=no-/dev/vda
    finish
fi

info() {
    q=$(ls /sys/block/vda/mq | wc -l)
    echo "CORODEV-INFO size=$(cat /sys/block/vda/size) lbs=$(cat /sys/block/vda/queue/logical_block_size)" \
        "pbs=$(cat /sys/block/vda/queue/physical_block_size) ro=$(cat /sys/block/vda/ro)" \
        "serial=$(cat /sys/block/vda/serial) cache=$(cat /sys/block/vda/queue/write_cache | tr ' ' _)" \
        "discard_max=$(cat /sys/block/vda/queue/discard_max_bytes)" \
        "wz_max=$(cat /sys/block/vda/queue/write_zeroes_max_bytes) queues=$q"
}

case "$TEST" in
info)
    info
    result status=PASS
    ;;
pattern)
    # 4 MiB of random data at 1 MiB, written and read back with O_DIRECT.
    dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null
    want=$(md5sum /tmp/p | cut -d' ' -f1)
    if ! dd if=/tmp/p of=/dev/vda bs=1M seek=1 oflag=direct conv=fsync 2>/tmp/err; then
        result status=FAIL detail=write-failed "$(tr ' \n' '__' </tmp/err)"
        finish
    fi
    echo 3 >/proc/sys/vm/drop_caches
    got=$(dd if=/dev/vda bs=1M skip=1 count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    if [ "$want" = "$got" ]; then
        result status=PASS offset=1048576 length=4194304 md5=$want
    else
        result status=FAIL want=$want got=$got
    fi
    ;;
readonly)
    info
    if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then
        result status=FAIL detail=write-succeeded
    elif dd if=/dev/vda of=/dev/null bs=4096 count=16 iflag=direct 2>/dev/null; then
        result status=PASS
    else
        result status=FAIL detail=read-failed
    fi
    ;;
fio | mq)
    jobs=${ARG:-2}
    # Each job owns its own 8 MiB region (offset_increment), so verification is exact.
    fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --ioengine=libaio --direct=1 \
        --iodepth=16 --numjobs="$jobs" --size=8m --offset_increment=8m --verify=crc32c \
        --cpus_allowed_policy=split \
        --verify_fatal=1 --do_verify=1 --group_reporting --output-format=terse --terse-version=3 \
        >/tmp/fio.out 2>/tmp/fio.err
    rc=$?
    [ "$TEST" = mq ] && info
    # fio may print warnings before its terse line ("3;fio-version;...").
    terse=$(grep '^3;' /tmp/fio.out | head -1)
    errs=$(echo "$terse" | cut -d';' -f5)
    wiops=$(echo "$terse" | cut -d';' -f49)
    if [ $rc -eq 0 ] && [ "$errs" = 0 ]; then
        result status=PASS jobs=$jobs write_iops=$wiops
    else
        result status=FAIL rc=$rc errors=$errs "$(head -c 300 /tmp/fio.err | tr ' \n' '__')"
    fi
    ;;
ext4)
    ok=1
    mkfs.ext4 -q -F /dev/vda >/tmp/log 2>&1 || ok=0
    if [ $ok = 1 ] && mount -t ext4 /dev/vda /mnt; then
        for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i * 8)) 2>/dev/null; done
        (cd /mnt && md5sum f1 f2 f3 f4 >/tmp/sums)
        sync
        umount /mnt
        echo 3 >/proc/sys/vm/drop_caches
        mount -t ext4 /dev/vda /mnt && (cd /mnt && md5sum -c /tmp/sums >/tmp/log 2>&1) || ok=0
        umount /mnt || ok=0
        e2fsck -fn /dev/vda >>/tmp/log 2>&1 || ok=0
    else
        ok=0
    fi
    if [ $ok = 1 ]; then
        result status=PASS fsck=clean
    else
        result status=FAIL "$(tail -c 300 /tmp/log | tr ' \n' '__')"
    fi
    ;;
discard)
    # Write data, discard it with blkdiscard-equivalent (fstrim needs a fs): use fio trim.
    fio --name=trim --filename=/dev/vda --rw=trim --bs=64k --size=4m --ioengine=libaio \
        --direct=1 >/tmp/log 2>&1 && result status=PASS || result status=FAIL "$(tail -c 200 /tmp/log | tr ' \n' '__')"
    ;;
*)
    result status=FAIL detail=unknown-test
    ;;
esac
finish

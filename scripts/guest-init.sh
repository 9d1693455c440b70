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
#   idle      the pattern test's I/O, then CORODEV-PROGRESS name=idle phase=idle and
#             corodev.arg seconds (default 20) without touching the disk, for the host to
#             measure what an idle guest costs the server; prints what pattern prints and
#             idle_s=
#   fio       fio randwrite, 4k, libaio, iodepth 16, corodev.arg jobs (default 2) of 8 MiB
#             each in disjoint regions, crc32c verify, verify_fatal
#   mq        like fio with one job per vCPU (or corodev.arg), split CPUs; prints the
#             number of blk-mq queues and the completion interrupts of each queue
#   ext4      mkfs.ext4, mount, write files, sync, umount, remount, verify md5s, e2fsck -fn
#   readonly  info, then a write must fail and a read must succeed
#   discard   fio trim of the first 4 MiB
#   restart   crash-restart workload (integration/tests/restart.rs): 8 writers, each in its
#             own 8 MiB region from offset 0 (one per vCPU in turn), do O_DIRECT writes of
#             1-4 MiB of fresh random data (a first pass covers the region, then random
#             4 KiB-aligned offsets), each read back with O_DIRECT and compared; until the
#             host writes CORODEV-STOP into the disk's last 4 KiB, or corodev.arg seconds
#             (default 300). Prints CORODEV-PROGRESS writes= errors= while it runs. Then
#             every region is read back and compared with what was last written to it, and
#             the kernel log must hold no virtio_blk or I/O error line. Prints writes=,
#             bytes=, errors=, dmesg=, and offset=, length=, md5= of the regions (what the
#             guest wrote) so the host can check its image
#   migrate   live-migration workload (integration/tests/migration.rs): the restart test's
#             verified writers (4, each in its own 4 MiB region from offset 0, writes of
#             64-512 KiB), plus a reader of data the device writes into guest memory. The
#             reader loops: fresh random data into the 1 MiB at 32 MiB (O_DIRECT), the disk's
#             page cache dropped, the region read through it (the device writes the data into
#             freshly allocated page-cache pages: a fill), then its md5 checked from that
#             cache READ_CHECKS (4) times, 0.1 s apart. A page the server wrote while guest RAM
#             was being copied but did not mark dirty keeps its old content on the
#             destination, and the next check there fails (stale=). The disk is held open for
#             the whole test (Linux drops a block device's cache at its last close), and a
#             self-test first proves that a fill reads the device and a check does not.
#             Boot with init_on_alloc=0, so that a page's old content is not the zeroes the
#             CPU writes (and so marks dirty) when it is allocated. Until the stop word, or
#             corodev.arg seconds (default 300); CORODEV-PROGRESS carries fills= checks=, a
#             stale read is a CORODEV-ERROR line at once. Prints what restart prints plus
#             fills=, checks=, stale=, init_on_alloc=, and read_offset=, read_length=,
#             read_md5= of the reader's region
#   iobench   steady load for scripts/bench-migration.sh: fio 4 KiB random reads and writes
#             (50/50, libaio, O_DIRECT, iodepth 16, one job per vCPU, no verify) on the
#             first 32 MiB, in windows of corodev.arg seconds (default 3) one after another,
#             until the host's stop word (or 900 s). After each window:
#             CORODEV-PROGRESS name=iobench window=N ios=<reads+writes> ms=<fio runtime>
#             iops=<ios per second> errors=<failed windows>
# shellcheck shell=dash
# Word splitting of /proc/cmdline, the module list, $FIO_FIELDS and $PATTERN_FIELDS is
# intended here:
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

# verified_writer N: writer N of the restart and migrate tests (see the header), in its
# own VIO_REGION bytes at N * VIO_REGION, writes of VIO_PAGES_MIN .. VIO_PAGES_MIN +
# VIO_PAGES_SPAN - 1 pages of 4 KiB, until /tmp/stop exists. Counts verified writes in
# /tmp/n.N and appends one line per error to /tmp/err.N.
verified_writer() {
    w=$1 base=$(($1 * VIO_REGION)) exp=/tmp/exp.$1 n=0 fill=0 bytes=0
    # ash reseeds RANDOM on assignment; each writer (a fork) would otherwise repeat the
    # parent's sequence.
    RANDOM=$(($(od -An -N2 -tu2 /dev/urandom) + w))
    while [ ! -e /tmp/stop ]; do
        size=$(((VIO_PAGES_MIN + RANDOM % VIO_PAGES_SPAN) * 4096))
        if [ $fill -lt $VIO_REGION ]; then
            off=$fill
            [ $((off + size)) -gt $VIO_REGION ] && size=$((VIO_REGION - off))
            fill=$((off + size))
        else
            off=$(((RANDOM % ((VIO_REGION - size) / 4096 + 1)) * 4096))
        fi
        at=$((base + off))
        dd if=/dev/urandom of=/tmp/d.$w bs=$size count=1 iflag=fullblock 2>/dev/null
        if ! dd if=/tmp/d.$w of=/dev/vda bs=$size count=1 seek=$at oflag=direct,seek_bytes \
            2>/tmp/e.$w; then
            echo "write-failed:at=$at:size=$size:$(clean 100 </tmp/e.$w)" >>/tmp/err.$w
            continue
        fi
        if ! dd if=/dev/vda of=/tmp/r.$w bs=$size count=1 skip=$at iflag=direct,skip_bytes \
            2>/tmp/e.$w; then
            echo "read-failed:at=$at:size=$size:$(clean 100 </tmp/e.$w)" >>/tmp/err.$w
            continue
        fi
        if ! cmp /tmp/d.$w /tmp/r.$w >/tmp/e.$w 2>&1; then
            echo "mismatch:at=$at:size=$size:$(clean 100 </tmp/e.$w)" >>/tmp/err.$w
            continue
        fi
        dd if=/tmp/d.$w of=$exp bs=$size count=1 seek=$off oflag=seek_bytes conv=notrunc 2>/dev/null
        n=$((n + 1)) bytes=$((bytes + size))
        echo "$n $bytes" >/tmp/n.$w
    done
}

# vio_sum: "<verified writes> <bytes> <error lines>" over all writers (and the reader) so far.
vio_sum() {
    cat /tmp/n.* 2>/dev/null | awk '{ n += $1; b += $2 } END { printf "%d %d ", n, b }'
    cat /tmp/err.* 2>/dev/null | wc -l
}

# reads_now: the reader's counts into /tmp/reads, replaced whole (the progress loop reads it).
reads_now() {
    echo "$fills $checks $stale" >/tmp/reads.new && mv /tmp/reads.new /tmp/reads
}

# vio_reader: the migrate test's reader (see the header), until /tmp/stop exists, on the
# READ_MIB MiB at READ_AT_MIB MiB. Each cycle writes fresh random data there (O_DIRECT; its
# md5 in /tmp/rmd5), drops the disk's page cache, reads the region through it (a fill) and
# checks it from the cache READ_CHECKS times: fresh data, so no page can hold it by chance
# from an earlier cycle. Counts in /tmp/reads ("<fills> <checks> <stale>"); a failure is an
# error line in /tmp/err.rd (a mismatch says whether the disk itself, read with O_DIRECT,
# has the data).
vio_reader() {
    fills=0 checks=0 stale=0
    reads_now
    while [ ! -e /tmp/stop ]; do
        dd if=/dev/urandom of=/tmp/rdata bs=1M count=$READ_MIB 2>/dev/null
        want=$(md5sum </tmp/rdata | cut -d' ' -f1)
        if ! dd if=/tmp/rdata of=/dev/vda bs=1M seek=$READ_AT_MIB oflag=direct 2>/tmp/e.rd; then
            echo "write-failed:reader:$(clean 100 </tmp/e.rd)" >>/tmp/err.rd
            echo unknown >/tmp/rmd5
            sleep 0.2
            continue
        fi
        echo "$want" >/tmp/rmd5
        # Drop the disk's clean page cache: the fill below then reads from the device into
        # pages allocated now, whatever they held before.
        blockdev --flushbufs /dev/vda 2>/dev/null || echo 1 >/proc/sys/vm/drop_caches
        if ! dd if=/dev/vda of=/dev/null bs=1M skip=$READ_AT_MIB count=$READ_MIB 2>/tmp/e.rd; then
            echo "read-failed:fill:$(clean 100 </tmp/e.rd)" >>/tmp/err.rd
            sleep 0.2
            continue
        fi
        fills=$((fills + 1))
        k=0
        while [ $k -lt $READ_CHECKS ] && [ ! -e /tmp/stop ]; do
            # Served from the page cache the fill populated: no device I/O.
            got=$(dd if=/dev/vda bs=1M skip=$READ_AT_MIB count=$READ_MIB 2>/dev/null |
                md5sum | cut -d' ' -f1)
            if [ "$got" != "$want" ]; then
                disk=$(dd if=/dev/vda bs=1M skip=$READ_AT_MIB count=$READ_MIB iflag=direct \
                    2>/dev/null | md5sum | cut -d' ' -f1)
                [ "$disk" = "$want" ] && disk=ok || disk=differs
                stale=$((stale + 1))
                echo "stale-read:fill=$fills:check=$k:disk=$disk:t=$(uptime_s)" >>/tmp/err.rd
                echo "CORODEV-ERROR stale-read fill=$fills check=$k disk=$disk t=$(uptime_s)"
                break
            fi
            checks=$((checks + 1))
            reads_now
            k=$((k + 1))
            sleep 0.1
        done
        reads_now
    done
}

# reader_selftest: one reader cycle while nothing else does I/O, counting the disk's reads
# (/sys/block/vda/stat): the fill must read the region from the device, a check must not
# (it is served from the page cache). Fails, with why in /tmp/selftest, if not.
reader_selftest() {
    rd() { awk '{ print $3 }' /sys/block/vda/stat; } # sectors read
    dd if=/dev/urandom of=/tmp/rdata bs=1M count=$READ_MIB 2>/dev/null
    dd if=/tmp/rdata of=/dev/vda bs=1M seek=$READ_AT_MIB oflag=direct 2>/tmp/selftest || return 1
    blockdev --flushbufs /dev/vda 2>/dev/null || echo 1 >/proc/sys/vm/drop_caches
    s0=$(rd)
    dd if=/dev/vda of=/dev/null bs=1M skip=$READ_AT_MIB count=$READ_MIB 2>/dev/null
    s1=$(rd)
    got=$(dd if=/dev/vda bs=1M skip=$READ_AT_MIB count=$READ_MIB 2>/dev/null | md5sum | cut -d' ' -f1)
    s2=$(rd)
    want=$(md5sum </tmp/rdata | cut -d' ' -f1)
    echo "fill-read-sectors=$((s1 - s0)) check-read-sectors=$((s2 - s1)) md5-ok=$([ "$got" = "$want" ] && echo 1 || echo 0)" >/tmp/selftest
    [ $((s1 - s0)) -ge $((READ_MIB * 2048)) ] && [ $((s2 - s1)) = 0 ] && [ "$got" = "$want" ]
}

# stop_poller: until /tmp/stop exists, reads the disk's last 4 KiB (O_DIRECT) every 0.25 s;
# when it holds the host's stop word CORODEV-STOP, creates /tmp/stop.host and /tmp/stop.
# A failed read is an error line in /tmp/err.stop.
stop_poller() {
    stop_blk=$(($(cat /sys/block/vda/size) / 8 - 1)) # the last 4 KiB
    while [ ! -e /tmp/stop ]; do
        if ! dd if=/dev/vda of=/tmp/stopblk bs=4096 count=1 skip=$stop_blk iflag=direct \
            2>/tmp/e.stop; then
            echo "read-failed:stop-block:$(clean 100 </tmp/e.stop)" >>/tmp/err.stop
        elif grep -q CORODEV-STOP /tmp/stopblk; then
            touch /tmp/stop.host /tmp/stop
        fi
        sleep 0.25
    done
}

# verified_io: the restart and migrate tests' body (see the header), with VIO_WRITERS
# writers of VIO_REGION bytes each (verified_writer) and, when READ_MIB is set, the reader;
# prints the progress lines and the result.
verified_io() {
    writers=$VIO_WRITERS max_s=${ARG:-300} cpus=$(nproc)
    # Kernel messages before the test (the driver's probe lines name virtio_blk too).
    dmesg >/tmp/dmesg.0
    rfields=
    if [ -n "${READ_MIB:-}" ]; then
        # The disk stays open for the whole test: Linux drops a block device's page cache
        # when its last opener closes it, and the reader's checks must find the fill's
        # pages, not read the region again from the device.
        exec 3</dev/vda
        if ! reader_selftest; then
            result FAIL "detail=reader-selftest:$(clean 200 </tmp/selftest)"
            return
        fi
        vio_reader &
    fi
    w=0
    while [ $w -lt $writers ]; do
        dd if=/dev/zero of=/tmp/exp.$w bs=1M count=$((VIO_REGION >> 20)) 2>/dev/null
        verified_writer $w &
        # Writers take the vCPUs (and so the blk-mq queues) in turn; what they run after
        # this inherits the pinning.
        taskset -p -c $((w % cpus)) $! >/dev/null 2>&1
        w=$((w + 1))
    done
    # The host's stop word, polled apart from the progress lines so that those keep coming
    # (within 0.25 s) while the server is away and this read waits for it.
    stop_poller &
    last= t_end=$(awk "BEGIN{print $(uptime_s) + $max_s}")
    while [ ! -e /tmp/stop ] && awk "BEGIN{exit !($(uptime_s) < $t_end)}"; do
        read -r n b e <<EOF_SUM
$(vio_sum)
EOF_SUM
        reads=
        [ -n "${READ_MIB:-}" ] && read -r f c _ </tmp/reads && reads=" fills=$f checks=$c"
        if [ "$n $e$reads" != "$last" ]; then
            echo "CORODEV-PROGRESS name=$TEST writes=$n bytes=$b errors=$e$reads t=$(uptime_s)"
            last="$n $e$reads"
        fi
        sleep 0.2
    done
    touch /tmp/stop
    wait
    stopped=timeout
    [ -e /tmp/stop.host ] && stopped=host
    # Every block of every region, as the device has it now, against what was written.
    bad=
    w=0
    while [ $w -lt $writers ]; do
        if ! dd if=/dev/vda of=/tmp/final bs=$VIO_REGION count=1 skip=$((w * VIO_REGION)) \
            iflag=direct,skip_bytes 2>/tmp/e.final; then
            bad="$bad,region$w-read-failed:$(clean 80 </tmp/e.final)"
        elif ! cmp /tmp/final /tmp/exp.$w >/tmp/e.final 2>&1; then
            bad="$bad,region$w-differs:$(clean 80 </tmp/e.final)"
        fi
        w=$((w + 1))
    done
    exps= w=0
    while [ $w -lt $writers ]; do exps="$exps /tmp/exp.$w" w=$((w + 1)); done
    md5=$(cat $exps | md5sum | cut -d' ' -f1)
    if [ -n "${READ_MIB:-}" ]; then
        read -r f c st </tmp/reads
        rmd5=$(dd if=/dev/vda bs=1M skip=$READ_AT_MIB count=$READ_MIB iflag=direct \
            2>/dev/null | md5sum | cut -d' ' -f1)
        [ "$rmd5" = "$(cat /tmp/rmd5)" ] || bad="$bad,reader-region-differs"
        ioa=default
        for word in $(cat /proc/cmdline); do
            case "$word" in init_on_alloc=*) ioa=${word#init_on_alloc=} ;; esac
        done
        rfields="fills=$f checks=$c stale=$st init_on_alloc=$ioa"
        rfields="$rfields read_offset=$((READ_AT_MIB << 20)) read_length=$((READ_MIB << 20)) read_md5=$rmd5"
        [ "$f" -gt 0 ] && [ "$c" -gt 0 ] || bad="$bad,reader-made-no-checks"
    fi
    dmesg >/tmp/dmesg.1
    tail -n +$(($(wc -l </tmp/dmesg.0) + 1)) /tmp/dmesg.1 |
        grep -E "virtio_blk|I/O error|is not a head|blk_update_request|Buffer I/O" >/tmp/dmesg.bad
    dmesg_st=clean
    [ -s /tmp/dmesg.bad ] && dmesg_st=$(clean 300 </tmp/dmesg.bad)
    read -r n b e <<EOF_SUM
$(vio_sum)
EOF_SUM
    errs=$(cat /tmp/err.* 2>/dev/null | head -n 5 | clean 300)
    fields="writers=$writers writes=$n bytes=$b errors=$e stopped=$stopped dmesg=$dmesg_st"
    fields="$fields offset=0 length=$((writers * VIO_REGION)) md5=$md5 $rfields"
    if [ "$e" = 0 ] && [ -z "$bad" ] && [ "$dmesg_st" = clean ] && [ "$n" -gt 0 ]; then
        result PASS $fields
    else
        detail=${bad#,}
        [ -n "$errs" ] && detail=${detail:+$detail,}$errs
        result FAIL "detail=$detail" $fields
    fi
}

# pattern_io: 4 MiB of random data written at 1 MiB with O_DIRECT, synced, read back with
# O_DIRECT and compared. On success PATTERN_FIELDS holds offset= length= md5= sha256=;
# otherwise prints the FAIL result and powers off.
pattern_io() {
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
    if [ "$md5" != "$got" ]; then
        result FAIL detail=readback-mismatch want="$md5" got="$got" "err=$(clean </tmp/err)"
        finish
    fi
    PATTERN_FIELDS="offset=$((off_mib << 20)) length=$((len_mib << 20)) md5=$md5 sha256=$sha"
}

case "$TEST" in
info)
    info
    result PASS
    ;;
pattern)
    pattern_io
    result PASS $PATTERN_FIELDS
    ;;
idle)
    idle_s=${ARG:-20}
    pattern_io
    # Nothing touches /dev/vda from here to the result: the pattern went out with O_DIRECT
    # and was synced, no filesystem is mounted on it, and busybox's sleep runs from the
    # initramfs.
    echo "CORODEV-PROGRESS name=idle phase=idle idle_s=$idle_s t=$(uptime_s)"
    sleep "$idle_s"
    result PASS $PATTERN_FIELDS idle_s=$idle_s
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
resize)
    # The host grows the disk while this runs (integration/tests/resize.rs): the new size
    # must show without a reboot, and the blocks past the old end must take a pattern.
    old=$(cat /sys/block/vda/size)
    new=$old
    echo "CORODEV-PROGRESS name=resize size=$old t=$(uptime_s)"
    t_end=$(awk "BEGIN{print $(uptime_s) + ${ARG:-120}}")
    while awk "BEGIN{exit !($(uptime_s) < $t_end)}"; do
        new=$(cat /sys/block/vda/size)
        [ "$new" != "$old" ] && break
        sleep 0.2
    done
    if [ "$new" = "$old" ]; then
        result FAIL detail=size-unchanged old_size=$old new_size=$new
        finish
    fi
    echo "CORODEV-PROGRESS name=resize size=$new t=$(uptime_s)"
    # 1 MiB at the old end: blocks that did not exist when the guest booted.
    off_mib=$((old / 2048)) len_mib=1
    dd if=/dev/urandom of=/tmp/p bs=1M count=$len_mib 2>/dev/null
    md5=$(md5sum /tmp/p | cut -d' ' -f1)
    fields="old_size=$old new_size=$new offset=$((off_mib << 20)) length=$((len_mib << 20))"
    if ! dd if=/tmp/p of=/dev/vda bs=1M seek=$off_mib oflag=direct conv=fsync 2>/tmp/err; then
        result FAIL "detail=write-failed:$(clean </tmp/err)" $fields
        finish
    fi
    echo 3 >/proc/sys/vm/drop_caches
    got=$(dd if=/dev/vda bs=1M skip=$off_mib count=$len_mib iflag=direct 2>/tmp/err | md5sum | cut -d' ' -f1)
    kmsg=$(dmesg | grep -m1 -E "capacity change|new size" | clean 120)
    if [ "$md5" = "$got" ]; then
        result PASS $fields md5="$md5" "kmsg=${kmsg:-none}"
    else
        result FAIL detail=readback-mismatch want="$md5" got="$got" "err=$(clean </tmp/err)" $fields
    fi
    ;;
restart)
    VIO_WRITERS=8 VIO_REGION=$((8 << 20)) VIO_PAGES_MIN=256 VIO_PAGES_SPAN=769 # 1-4 MiB
    verified_io
    ;;
migrate)
    VIO_WRITERS=4 VIO_REGION=$((4 << 20)) VIO_PAGES_MIN=16 VIO_PAGES_SPAN=113 # 64-512 KiB
    READ_AT_MIB=32 READ_MIB=1 READ_CHECKS=4
    verified_io
    ;;
iobench)
    win=${ARG:-3} n=0 failed=0
    stop_poller &
    t_end=$(awk "BEGIN{print $(uptime_s) + 900}")
    while [ ! -e /tmp/stop ] && awk "BEGIN{exit !($(uptime_s) < $t_end)}"; do
        n=$((n + 1))
        # terse v3: 6 read KiB, 9 read runtime ms, 47 write KiB, 50 write runtime ms.
        if fio --name=load --filename=/dev/vda --rw=randrw --rwmixread=50 --bs=4k \
            --ioengine=libaio --direct=1 --iodepth=16 --numjobs="$(nproc)" --size=32m \
            --time_based --runtime="$win" --group_reporting --output-format=terse \
            --terse-version=3 >/tmp/fio.out 2>/tmp/fio.err &&
            line=$(grep -m1 '^3;' /tmp/fio.out) && [ -n "$line" ]; then
            echo "$line" | awk -F';' -v n=$n -v f=$failed -v t="$(uptime_s)" '{
                ios = ($6 + $47) / 4; ms = ($9 > $50 ? $9 : $50)
                printf "CORODEV-PROGRESS name=iobench window=%d ios=%d ms=%d iops=%d errors=%d t=%s\n",
                    n, ios, ms, (ms > 0 ? ios * 1000 / ms : 0), f, t
            }'
        else
            failed=$((failed + 1))
            echo "CORODEV-PROGRESS name=iobench window=$n ios=0 ms=0 iops=0 errors=$failed t=$(uptime_s)"
            echo "fio-failed:window=$n:$(clean 200 </tmp/fio.err)" >>/tmp/err.fio
        fi
    done
    touch /tmp/stop
    wait
    errs=$(cat /tmp/err.* 2>/dev/null | wc -l)
    if [ "$errs" = 0 ] && [ -e /tmp/stop.host ]; then
        result PASS windows=$n
    else
        result FAIL "detail=$(cat /tmp/err.* 2>/dev/null | head -n 3 | clean 300)" windows=$n errors=$errs
    fi
    ;;
*)
    result FAIL "detail=unknown-test:$TEST"
    ;;
esac
finish

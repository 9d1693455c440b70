#!/bin/busybox sh
# /init of corodev's NVMe test guest (scripts/nvme-guest.sh): a small NVMe host behind
# QEMU's intel-iommu on which corodev's NVMe-over-VFIO backend runs. Mounts the pseudo
# filesystems, loads the VFIO modules (/etc/modules-order), finds the one NVMe PCI
# function (class 010802) and, per corodev.bind= on the kernel command line:
#   vfio    (default) unbinds it from the built-in nvme driver, sets driver_override to
#           vfio-pci and binds it there; /dev/vfio/<its IOMMU group> must appear
#   kernel  leaves it on the nvme driver and waits for its first namespace's block device
#           (/dev/nvme0n1), so a daemon can serve it as a plain file
# Then runs the test the host packed into /etc/nvme-test/ (nvme-guest.sh --daemon and
# --frontend): `daemon`, if present, is a shell command started in the background, and
# `frontend` runs once the daemon's vhost-user socket exists (or at once without a daemon).
# Both see NVME_BDF (the function's address), NVME_GROUP (its IOMMU group, vfio only),
# NVME_BLK (/dev/nvme0n1, kernel only) and SOCK (/tmp/vhost.sock). The frontend's last
# stdout line is its key=value fields; its exit status the verdict. The daemon, if still
# running, then gets SIGTERM and 10 s to exit 0. Prints on the serial console
#   CORODEV-BEGIN name=nvme boot_s=<seconds from kernel start to here>
#   CORODEV-INFO bdf= group= driver= modules_s= bind_s=
#   CORODEV-RESULT name=nvme status=PASS|FAIL [detail=<why>] <frontend fields> daemon=<how
#                  it ended> test_s=<s>
#   CORODEV-DONE
# and powers off. Values never contain blanks.
# shellcheck shell=dash
# shellcheck disable=SC2013,SC2086 # word splitting of /proc/cmdline and the fields is intended
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp

uptime_s() { cut -d' ' -f1 /proc/uptime; }
since() { awk "BEGIN{print $(uptime_s) - $1}"; }
# clean [MAX]: stdin as one word, safe as a value (blanks and '=' become '_').
clean() { tr -s ' \t\r\n=' '_____' | sed 's/^_*//; s/_*$//' | head -c "${1:-200}"; }

BIND=vfio
for w in $(cat /proc/cmdline); do
    case "$w" in corodev.bind=*) BIND=${w#corodev.bind=} ;; esac
done

finish() {
    sync
    echo "CORODEV-DONE"
    poweroff -f
    sleep 5 # poweroff -f does not return; if it did, exiting init panics (panic=-1)
}
T0=$(uptime_s)
result() { # result PASS|FAIL key=value ...
    st=$1
    shift
    echo "CORODEV-RESULT name=nvme status=$st $* test_s=$(since $T0)"
    finish
}
echo "CORODEV-BEGIN name=nvme boot_s=$T0"

for m in $(cat /etc/modules-order); do
    insmod "/lib/modules/$m" 2>/tmp/err || result FAIL "detail=insmod-$m:$(clean </tmp/err)"
done
modules_s=$(since $T0)

# The NVMe controller: PCI class 01 (mass storage), 08 (non-volatile memory), 02 (NVMe).
BDF=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/class)" = 0x010802 ] && BDF=${d##*/}
done
[ -n "$BDF" ] || result FAIL detail=no-nvme-pci-function
dev=/sys/bus/pci/devices/$BDF
# Its IOMMU group exists only if the kernel runs the IOMMU (intel_iommu=on).
[ -e $dev/iommu_group ] || result FAIL detail=no-iommu-group:intel_iommu=on-missing?
NVME_GROUP=$(basename "$(readlink $dev/iommu_group)")
NVME_BLK=

t=$(uptime_s)
case "$BIND" in
vfio)
    # The nvme driver is built in and probes asynchronously: wait until it holds the
    # device, so that the unbind below is not overtaken by a late probe.
    i=0
    while [ ! -e $dev/driver ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ -e $dev/driver ] && echo "$BDF" >$dev/driver/unbind
    echo vfio-pci >$dev/driver_override
    echo "$BDF" >/sys/bus/pci/drivers_probe
    [ "$(basename "$(readlink $dev/driver)")" = vfio-pci ] ||
        result FAIL "detail=not-bound-to-vfio-pci:$(readlink $dev/driver | clean)"
    [ -c /dev/vfio/$NVME_GROUP ] || result FAIL detail=no-/dev/vfio/$NVME_GROUP
    ;;
kernel)
    i=0
    while [ ! -b /dev/nvme0n1 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
    [ -b /dev/nvme0n1 ] || result FAIL detail=no-/dev/nvme0n1-after-20s
    NVME_BLK=/dev/nvme0n1
    ;;
*) result FAIL "detail=unknown-corodev.bind:$BIND" ;;
esac
echo "CORODEV-INFO bdf=$BDF group=$NVME_GROUP driver=$(basename "$(readlink $dev/driver)")" \
    "modules_s=$modules_s bind_s=$(since $t)"
export NVME_BDF=$BDF NVME_GROUP NVME_BLK SOCK=/tmp/vhost.sock

daemon_pid=
if [ -f /etc/nvme-test/daemon ]; then
    sh -c "$(cat /etc/nvme-test/daemon)" >/tmp/daemon.log 2>&1 &
    daemon_pid=$!
    i=0
    while [ ! -S "$SOCK" ] && kill -0 $daemon_pid 2>/dev/null && [ $i -lt 300 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    if [ ! -S "$SOCK" ]; then
        sed 's/^/daemon| /' /tmp/daemon.log
        result FAIL "detail=daemon-no-socket:$(tail -c 200 /tmp/daemon.log | clean)"
    fi
fi

sh -c "$(cat /etc/nvme-test/frontend)" >/tmp/fe.out 2>/tmp/fe.err
fe_rc=$?
sed 's/^/frontend| /' /tmp/fe.err
fields=$(tail -n 1 /tmp/fe.out)

daemon=none
if [ -n "$daemon_pid" ]; then
    if kill -TERM $daemon_pid 2>/dev/null; then
        i=0
        while kill -0 $daemon_pid 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        kill -KILL $daemon_pid 2>/dev/null && echo "daemon| killed: no exit 10 s after SIGTERM"
    fi
    wait $daemon_pid
    daemon=exit$?
    sed 's/^/daemon| /' /tmp/daemon.log
fi
if [ $fe_rc = 0 ] && { [ $daemon = none ] || [ $daemon = exit0 ]; }; then
    result PASS $fields daemon=$daemon
else
    result FAIL $fields frontend=exit$fe_rc daemon=$daemon
fi

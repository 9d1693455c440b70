#!/usr/bin/env bash
# A throw-away single-node Ceph cluster for corodev's RBD tests, without systemd.
#
#   scripts/ceph-cluster.sh up DIR     # prints the path of DIR/ceph.conf on stdout
#   scripts/ceph-cluster.sh down DIR   # kills the daemons, removes DIR
#
# One monitor (a), one manager (x) and one OSD (0), all root, daemonized with pid files,
# every path (data, logs, admin sockets, pid files) under DIR, so several clusters on one
# host do not meet as long as each gets its own DIR and CEPH_MON_PORT. The OSD is bluestore
# on a sparse file (DIR/osd/ceph-0/block, CEPH_OSD_SIZE, default 10G), so it survives
# being stopped and started again (the fault tests); CEPH_OSD_STORE=memstore keeps the
# data in RAM instead (faster mkfs, but a killed OSD loses everything). With
# `osd pool default size = 1` the pool is healthy with its one OSD. cephx stays on, as in a
# real cluster: client.admin's key is in DIR/keyring, which the conf names, so
# `rbd -c DIR/ceph.conf ...` and corodev's `--ceph-conf DIR/ceph.conf` just work.
#
# `up` returns once pool `rbd` exists and `rbd pool init` succeeded, which needs an
# active PG, i.e. the OSD serving I/O. The manager is started but not waited for: RBD I/O
# does not need it. Progress and timing go to stderr; on failure the daemons' logs in
# DIR/log tell why, and `down` still cleans up.
set -euo pipefail

usage() {
    echo "usage: $0 up|down DIR" >&2
    exit 2
}
(($# == 2)) || usage
cmd=$1
dir=$2
port=${CEPH_MON_PORT:-6789}
store=${CEPH_OSD_STORE:-bluestore}
osd_size=${CEPH_OSD_SIZE:-10G}

log() { echo "ceph-cluster: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# Kills the daemons whose pid files are in DIR/run with SIGKILL and waits until they are
# gone (ports and files released). No graceful stop: `down` deletes their data anyway, and
# the manager alone takes seconds to stop on SIGTERM.
stop_daemons() {
    local pids=() pidfile pid
    for pidfile in "$dir"/run/*.pid; do
        [ -e "$pidfile" ] || continue
        pid=$(cat "$pidfile" 2>/dev/null || true)
        [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && pids+=("$pid")
    done
    ((${#pids[@]})) || return 0
    kill -KILL "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 100); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        sleep 0.1
    done
    log "daemons ${pids[*]} still there 10 s after SIGKILL"
}

case "$cmd" in
down)
    [ -d "$dir" ] || exit 0
    stop_daemons
    rm -rf "$dir"
    log "cluster in $dir stopped and removed"
    exit 0
    ;;
up) ;;
*) usage ;;
esac

for tool in ceph-mon ceph-mgr ceph-osd ceph ceph-authtool monmaptool rbd uuidgen; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh as root"
done
[ "$(id -u)" -eq 0 ] || die "the daemons run as root here (no ceph user); run as root"
[ ! -e "$dir/ceph.conf" ] || die "$dir already holds a cluster; run '$0 down $dir' first"
case "$store" in bluestore | memstore) ;; *) die "CEPH_OSD_STORE must be bluestore or memstore" ;; esac

start=$(date +%s%N)
elapsed() {
    local ms=$((($(date +%s%N) - start) / 1000000))
    printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

mkdir -p "$dir"/{mon,mgr,osd,run,log}
dir=$(cd "$dir" && pwd)
conf=$dir/ceph.conf
fsid=$(uuidgen)
osd_uuid=$(uuidgen)

# Settings, and why:
# - size 1 / min size 1 and the allow/warn switches: one OSD is the whole cluster.
# - chooseleaf type 0: CRUSH picks OSDs, not hosts (one host anyway, but this never waits
#   for a second host).
# - memory targets and cache sizes small: this shares a CI machine.
# - bluestore_fsck_on_mkfs off: saves seconds on a file that was just created.
# - mon_osd_down_out_interval 0: a stopped OSD is never marked out (an out OSD would leave
#   the pool nowhere to put data; the fault tests stop the OSD on purpose).
cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$port
public addr = 127.0.0.1
mon initial members = a
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/keyring
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
mon data = $dir/mon/ceph-\$id
mgr data = $dir/mgr/ceph-\$id
osd data = $dir/osd/ceph-\$id
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon osd down out interval = 0
osd objectstore = $store
osd memory target = 939524096
bluestore block create = true
bluestore block size = $(numfmt --from=iec "$osd_size")
bluestore fsck on mkfs = false
bluestore cache autotune = false
bluestore cache size = 134217728
memstore device bytes = $(numfmt --from=iec "$osd_size")
osd max object name len = 256
osd max object namespace len = 64
EOF

# Every key in one keyring: the monitor imports all of them into its auth database at
# mkfs, so the manager and the OSD need no `ceph auth` step.
kr=$dir/keyring
ceph-authtool --create-keyring "$kr" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$kr" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
    --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$kr" --gen-key -n mgr.x --cap mon 'allow profile mgr' --cap osd 'allow *' \
    --cap mds 'allow *' >/dev/null
ceph-authtool "$kr" --gen-key -n osd.0 --cap mon 'allow profile osd' \
    --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
# --addv with an explicit v1: monmaptool's --add takes any port but 6789 for msgr2, and the
# conf's `mon host` (what clients dial) says v1.
monmaptool --create --addv a "[v1:127.0.0.1:$port]" --fsid "$fsid" "$dir/monmap" >/dev/null

ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$kr"
ceph-mon -c "$conf" -i a
log "monitor up after $(elapsed) s"

# Short client timeouts: a monitor that did not come up fails the script, not hangs it.
ceph_() { ceph -c "$conf" --connect-timeout 30 "$@"; }

ceph-mgr -c "$conf" -i x

osd_id=$(ceph_ osd new "$osd_uuid")
[ "$osd_id" = 0 ] || die "the monitor gave the OSD id '$osd_id', expected 0"
mkdir -p "$dir/osd/ceph-0"
ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" 2>>"$dir/log/osd-mkfs.log" ||
    die "OSD mkfs failed; see $dir/log/osd-mkfs.log and $dir/log/osd.0.log"
ceph-osd -c "$conf" -i 0
log "OSD started after $(elapsed) s"

ceph_ osd pool create rbd 8 8 >/dev/null 2>>"$dir/log/client.log" ||
    die "creating pool rbd failed; see $dir/log/client.log"
# `rbd pool init` writes to the pool: it returns once a PG is active on the OSD.
timeout 120 rbd -c "$conf" pool init rbd || die "rbd pool init failed or timed out; see $dir/log"
log "pool rbd ready after $(elapsed) s"
echo "$conf"

#!/usr/bin/env bash
# Installs corodev as a systemd service, as root:
#   the binary            -> $DESTDIR/usr/local/bin/corodev
#   the units             -> $DESTDIR/etc/systemd/system/corodev@.service, corodev@.socket
#                            (one instance per disk), corodev.service and
#                            corodev-export@.socket (every export of exports.toml),
#                            corodev-control.socket (its control socket)
#   the user and group    -> corodev (sysusers.d file in $DESTDIR/usr/local/lib/sysusers.d,
#                            applied with systemd-sysusers --root=$DESTDIR)
#   example configs       -> $DESTDIR/etc/corodev/example.env (one instance's flags) and
#                            example.toml (several exports, --config); never overwritten
#   the image directory   -> $DESTDIR/var/lib/corodev/images (corodev:corodev 0750)
#   the README            -> $DESTDIR/usr/local/share/doc/corodev/README.md
#   the RBD drop-in       -> $DESTDIR/usr/local/share/doc/corodev/rbd.conf (copy it to
#                            /etc/systemd/system/corodev@<instance>.service.d/ for an
#                            instance whose export is a Ceph RBD image)
# then, on a running systemd (no DESTDIR), `systemctl daemon-reload`.
#
# Usage: bash scripts/install.sh            (after `cargo build --release`)
#        DESTDIR=/tmp/root bash scripts/install.sh   (a staged install, e.g. for a package)
#        CORODEV_BIN=path/to/corodev ...             (another build, e.g. the static musl one)
# Idempotent: a second run changes nothing (files are replaced only when they differ; an
# existing example config or user is left as it is) and says what it did.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
dest=${DESTDIR:-}
bin=${CORODEV_BIN:-$top/target/release/corodev}

die() { echo "install.sh: $*" >&2; exit 1; }
[ -x "$bin" ] || die "no corodev binary at $bin: run \`cargo build --release\` first (or set CORODEV_BIN)"
[ "$(id -u)" -eq 0 ] || [ -n "$dest" ] || die "run as root (or set DESTDIR for a staged install)"
command -v systemd-sysusers >/dev/null || die "systemd-sysusers is missing: run \`bash scripts/install-deps.sh\`"

changed=0
# put MODE SRC DST: installs SRC at DST unless an identical file is there.
put() {
    local mode=$1 src=$2 dst=$dest$3
    if [ -f "$dst" ] && cmp -s "$src" "$dst" && [ "$(stat -c %a "$dst")" = "${mode#0}" ]; then
        return
    fi
    install -D -m "$mode" "$src" "$dst"
    echo "installed $3"
    changed=1
}

put 0755 "$bin" /usr/local/bin/corodev
put 0644 "$top/daemon/systemd/corodev@.service" /etc/systemd/system/corodev@.service
put 0644 "$top/daemon/systemd/corodev@.socket" /etc/systemd/system/corodev@.socket
put 0644 "$top/daemon/systemd/corodev.service" /etc/systemd/system/corodev.service
put 0644 "$top/daemon/systemd/corodev-export@.socket" /etc/systemd/system/corodev-export@.socket
put 0644 "$top/daemon/systemd/corodev-control.socket" /etc/systemd/system/corodev-control.socket
put 0644 "$top/daemon/systemd/corodev.sysusers" /usr/local/lib/sysusers.d/corodev.conf
put 0644 "$top/README.md" /usr/local/share/doc/corodev/README.md
put 0644 "$top/daemon/systemd/rbd.conf" /usr/local/share/doc/corodev/rbd.conf
for example in example.env example.toml; do
    if [ ! -e "$dest/etc/corodev/$example" ]; then
        put 0644 "$top/daemon/systemd/$example" "/etc/corodev/$example"
    fi
done

# The user and group (systemd-sysusers only adds what is missing).
mkdir -p "$dest/etc"
if ! grep -q '^corodev:' "$dest/etc/passwd" 2>/dev/null; then
    changed=1
fi
systemd-sysusers --root="${dest:-/}" "$dest/usr/local/lib/sysusers.d/corodev.conf"
uid=$(awk -F: '$1 == "corodev" { print $3 }' "$dest/etc/passwd")
gid=$(awk -F: '$1 == "corodev" { print $3 }' "$dest/etc/group")
[ -n "$uid" ] && [ -n "$gid" ] || die "systemd-sysusers did not create the corodev user in $dest/etc/passwd"

# Images live in one directory per instance below this one (corodev@vm1 may write only
# /var/lib/corodev/images/vm1, see the unit).
images=$dest/var/lib/corodev/images
if [ ! -d "$images" ] || [ "$(stat -c %u:%g:%a "$images")" != "$uid:$gid:750" ]; then
    install -d -m 0755 "$dest/var/lib/corodev"
    install -d -o "$uid" -g "$gid" -m 0750 "$images"
    echo "created /var/lib/corodev/images (corodev:corodev 0750)"
    changed=1
fi

if [ -z "$dest" ] && [ -d /run/systemd/system ] && [ "$changed" = 1 ]; then
    systemctl daemon-reload
fi
if [ "$changed" = 0 ]; then
    echo "corodev is installed${dest:+ in $dest}; nothing changed"
else
    echo "corodev installed${dest:+ in $dest}: see /etc/corodev/example.env to add an instance"
fi

#!/usr/bin/env bash
# Builds target/bench-bundle/ and target/bench-bundle.tar.gz: the scaling bench of
# scripts/bench.sh for a machine that has neither cargo nor QEMU, internet nor a package
# manager (only bash is taken from the machine).
#
#   bash scripts/bench-bundle.sh
#   # copy target/bench-bundle.tar.gz over, then there:
#   tar xzf bench-bundle.tar.gz && bash bench-bundle/run.sh   # report: bench-bundle/results/
#
# The bundle holds:
#   bin/      corodev (release; it loads the Ceph libraries only for an RBD export, so the
#             bundle has none), corodev-bench, qemu-storage-daemon (this machine's),
#             busybox (static)
#   lib/      every shared library the three dynamic binaries load (from ldd), and the
#             dynamic loader ld-linux-x86-64.so.2 that starts each of them with
#             --library-path lib, so nothing comes from the other machine's /lib
#   bb/       busybox applets (awk, taskset, nproc, ...), for the tools that machine lacks
#   scripts/bench.sh  this repository's, run with PREBUILT=1 (no cargo, no coro microbench)
#   run.sh    scripts/bench-bundle-run.sh: picks pinning and queue counts from the CPUs
#   BUILD     the commit, rustc and QEMU versions the bundle was built from
#
# The binaries are stripped of debuginfo (their symbol tables stay, so perf can still name
# functions); the bundle must stay well under the 64 MiB a remote machine is sent.
# Note: the corodev build leaves target/release/corodev without the RBD backend until the next
# plain `cargo build` (scripts/bench.sh runs one).
set -euo pipefail
cd "$(dirname "$0")/.."

B=target/bench-bundle
QSD=$(command -v qemu-storage-daemon || true)
BUSYBOX=/bin/busybox

die() {
    echo "bench-bundle: $*" >&2
    exit 1
}

[ -n "$QSD" ] || die "qemu-storage-daemon not found; run scripts/install-deps.sh"
[ -x "$BUSYBOX" ] || die "no $BUSYBOX; run scripts/install-deps.sh (busybox-static)"
# ldd fails on a static executable; a dynamic busybox would need this machine's libc there.
! ldd "$BUSYBOX" >/dev/null 2>&1 || die "$BUSYBOX is dynamically linked; install busybox-static (scripts/install-deps.sh)"
for tool in strip ldd tar gzip; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

echo "bench-bundle: building corodev-bench" >&2
cargo build --release -p corodev-bench >&2 || die "building corodev-bench failed"
echo "bench-bundle: building corodev" >&2
cargo build --release -p corodev --bin corodev >&2 || die "building corodev failed"

rm -rf "$B" "$B.tar.gz"
mkdir -p "$B/bin" "$B/lib" "$B/bb" "$B/scripts"
cp target/release/corodev target/release/corodev-bench "$QSD" "$B/bin/"
strip --strip-debug "$B/bin/corodev" "$B/bin/corodev-bench" "$B/bin/qemu-storage-daemon"
if ldd "$B/bin/corodev" | grep -E 'librbd|librados'; then
    die "corodev links the Ceph libraries (above): they must be loaded only for an RBD export"
fi

# Every library ldd resolves for the three binaries, under the name they ask for; the
# loader (the line without "=>") too.
for bin in corodev corodev-bench qemu-storage-daemon; do
    deps=$(ldd "$B/bin/$bin") || die "ldd $B/bin/$bin failed"
    if grep -q 'not found' <<<"$deps"; then
        die "$bin needs libraries this machine lacks: $(grep 'not found' <<<"$deps" | tr -s ' \t' ' ')"
    fi
    while read -r name arrow path _; do
        if [ "$arrow" = "=>" ]; then
            [ -e "$path" ] || continue # linux-vdso.so.1: the kernel's, no file
            cp -L "$path" "$B/lib/$name"
        elif [[ $name == /*/ld-linux-x86-64.so.2 ]]; then
            cp -L "$name" "$B/lib/ld-linux-x86-64.so.2"
        fi
    done <<<"$deps"
done
[ -e "$B/lib/ld-linux-x86-64.so.2" ] || die "ldd named no ld-linux-x86-64.so.2"

cp "$BUSYBOX" "$B/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    ln -s ../bin/busybox "$B/bb/$applet"
done
cp scripts/bench.sh "$B/scripts/bench.sh"
cp scripts/bench-bundle-run.sh "$B/run.sh"
{
    echo "corodev $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo "+uncommitted")," \
        "$(rustc --version | awk '{ print $1, $2 }'), $("$QSD" --version | head -1), built $(date -u '+%Y-%m-%d %H:%M UTC')"
} >"$B/BUILD"

# Each binary must start through the bundled loader alone (a library ldd found by a path
# that is not in the bundle would show up here, not on the other machine).
for bin in corodev corodev-bench qemu-storage-daemon; do
    env -i "$B/lib/ld-linux-x86-64.so.2" --library-path "$B/lib" "$B/bin/$bin" --help >/dev/null 2>&1 ||
        die "$bin does not start through the bundled loader: $B/lib/ld-linux-x86-64.so.2 --library-path $B/lib $B/bin/$bin --help"
done

tar -C "$(dirname "$B")" -czf "$B.tar.gz" "$(basename "$B")"
echo "bench-bundle: $B ($(du -sh "$B" | cut -f1)), $B.tar.gz ($(du -h "$B.tar.gz" | cut -f1)); $(cat "$B/BUILD")" >&2

#!/usr/bin/env bash
# Runs every check CI runs: dependencies, formatting, lints, and the whole test suite
# (unit tests, coroutine tests on every backend, also under Valgrind, in the static musl
# build and on aarch64 under qemu-user, and real QEMU guests against corodev).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
bash scripts/build-guest.sh >/dev/null

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
# The integration tests start the release binary; build it first so they test this tree.
cargo build --release --bin corodev
# The statically linked musl build, whose coroutines run on the sigaltstack backend (musl
# has no makecontext): the coro suites on it, and the binary that
# integration/tests/coro_backends.rs serves a real guest with. Without the RBD backend:
# it loads librbd with dlopen, which a static binary cannot.
cargo build --release --target x86_64-unknown-linux-musl --bin corodev --no-default-features --features nvme
# The programs integration/tests/nvme.rs runs inside its NVMe guest (which has no libc):
# the vfio-ioctls probe, the verifying vhost-user frontend and the NVMe workloads.
cargo build --release --target x86_64-unknown-linux-musl -p integration --bin nvme-probe --bin verify-load --bin nvme-load
cargo test --release -p coro --target x86_64-unknown-linux-musl
# Valgrind must understand every backend's stacks (registered stacks, the sigaltstack
# bootstrap's parked frames, the thread backend's threads): the coroutine and scheduler
# suites, all four backends, under memcheck; any error fails them.
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="valgrind -q --error-exitcode=9" \
    cargo test --release -p coro --test coroutine --test scheduler
cargo test --workspace --release -- --test-threads=1

# The coro crate (its aarch64 fast switch) on aarch64 under qemu-user; it prints which
# io_uring tests it cannot run there, the bench table and its own wall time.
bash scripts/test-coro-aarch64.sh

# The hostile and lifecycle suites again, against a daemon built with AddressSanitizer
# (stable rustc's sanitizer runtime, unlocked with RUSTC_BOOTSTRAP): any access outside
# guest memory, use after free or overflow in the daemon aborts it and fails the test
# (the harness also fails a test whose daemon logged a sanitizer report).
RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zsanitizer=address" CARGO_TARGET_DIR=target/asan \
    cargo build --target x86_64-unknown-linux-gnu --bin corodev
CORODEV_BIN="$PWD/target/asan/x86_64-unknown-linux-gnu/debug/corodev" \
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    cargo test --release -p integration --test hostile_guest --test hostile_frontend \
    --test ring_faults --test lifecycle --test backend_errors --test inflight --test dirty_log \
    -- --test-threads=1

#!/usr/bin/env bash
# Runs every check CI runs: dependencies, formatting, lints, and the whole test suite
# (unit tests, coroutine tests on both backends, the coro crate on aarch64 under qemu-user,
# and real QEMU guests against corodev).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
bash scripts/build-guest.sh >/dev/null

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
# The integration tests start the release binary; build it first so they test this tree.
cargo build --release --bin corodev
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

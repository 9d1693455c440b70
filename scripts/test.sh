#!/usr/bin/env bash
# Runs every check CI runs: dependencies, formatting, lints, and the whole test suite
# (unit tests, coroutine tests on both backends, and real QEMU guests against corodev).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
bash scripts/build-guest.sh >/dev/null

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
# The integration tests start the release binary; build it first so they test this tree.
cargo build --release --bin corodev
cargo test --workspace --release -- --test-threads=1

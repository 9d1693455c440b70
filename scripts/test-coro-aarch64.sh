#!/usr/bin/env bash
# The coro crate on aarch64, emulated by qemu-user (qemu-aarch64-static): lints, the tests
# on every switch backend, and the switch bench once (emulated times: only the ratio of
# the fast to the ucontext round trip means anything). Needs what install-deps.sh installs
# (the cross gcc and libc, qemu-user-static, the rustup target). Uses the default target
# dir: the aarch64 artifacts live apart under target/aarch64-unknown-linux-gnu/, and the
# host's proc macros are shared with the native build.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
TARGET=aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# The tests that re-run their own binary as a child (overflow, RSS) read this variable too,
# so the child is emulated the same way even without a binfmt_misc entry for qemu.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu"

# qemu-user (Debian's 7.2) does not implement io_uring: io_uring_setup fails with ENOSYS,
# so every test that needs a ring (or `coro::sleep`, an io_uring timeout) cannot run here.
# They are excluded by exact name: they show up as "filtered out", never as passed; they
# run natively on x86_64 in test.sh. A new io_uring test fails here loudly until listed.
IO_URING_TESTS=(
    # tests/cq_overflow.rs
    cq_overflow_flushed_for_eventfd_driver_immediate_completions
    cq_overflow_flushed_for_eventfd_driver_timer_completions
    cq_overflow_flushed_for_poll_driver_immediate_completions
    cq_overflow_flushed_for_poll_driver_timer_completions
    # tests/drop_in_flight.rs
    drop_waits_for_in_flight_read_through_eintr
    drop_cancels_in_flight_io_promptly_and_waits_for_the_cancellation
    drop_waits_for_in_flight_read_through_eintr_shared
    drop_cancels_in_flight_io_promptly_and_waits_for_the_cancellation_shared
    # tests/remote.rs
    kernel_supports_remote_completions
    result_from_another_thread_wakes_the_task
    completion_fires_a_worker_style_eventfd
    a_given_up_slots_late_completion_is_ignored
    dropped_completer_cancels_rather_than_strands
    iovec_copy_outlives_the_callers_array_on_a_shared_stack
    dropping_the_scheduler_waits_for_the_remote_completion
    # tests/scheduler.rs
    dropping_scheduler_unwinds_parked_tasks::fast
    dropping_scheduler_unwinds_parked_tasks::sigaltstack
    dropping_scheduler_unwinds_parked_tasks::ucontext
    dropping_scheduler_unwinds_parked_tasks::thread
    dropping_scheduler_unwinds_parked_tasks::shared
    dropping_scheduler_unwinds_parked_tasks::shared_sigaltstack
    dropping_scheduler_unwinds_parked_tasks::mixed
    io_uring_reads_resume_in_completion_order::fast
    io_uring_reads_resume_in_completion_order::sigaltstack
    io_uring_reads_resume_in_completion_order::ucontext
    io_uring_reads_resume_in_completion_order::thread
    io_uring_reads_resume_in_completion_order::shared
    io_uring_reads_resume_in_completion_order::shared_sigaltstack
    io_uring_reads_resume_in_completion_order::mixed
    io_uring_write_fsync_fallocate_roundtrip::fast
    io_uring_write_fsync_fallocate_roundtrip::sigaltstack
    io_uring_write_fsync_fallocate_roundtrip::ucontext
    io_uring_write_fsync_fallocate_roundtrip::thread
    io_uring_write_fsync_fallocate_roundtrip::shared
    io_uring_write_fsync_fallocate_roundtrip::shared_sigaltstack
    io_uring_write_fsync_fallocate_roundtrip::mixed
    parked_tasks_keep_stack_data_through_sleep_and_file_io::fast
    parked_tasks_keep_stack_data_through_sleep_and_file_io::sigaltstack
    parked_tasks_keep_stack_data_through_sleep_and_file_io::ucontext
    parked_tasks_keep_stack_data_through_sleep_and_file_io::thread
    parked_tasks_keep_stack_data_through_sleep_and_file_io::shared
    parked_tasks_keep_stack_data_through_sleep_and_file_io::shared_sigaltstack
    parked_tasks_keep_stack_data_through_sleep_and_file_io::mixed
    pooled_stack_buffers_are_not_checked
    ring_setup_failure_names_the_call
    shared_stack_buffers_are_refused
    sleep_orders_by_deadline::fast
    sleep_orders_by_deadline::sigaltstack
    sleep_orders_by_deadline::ucontext
    sleep_orders_by_deadline::thread
    sleep_orders_by_deadline::shared
    sleep_orders_by_deadline::shared_sigaltstack
    sleep_orders_by_deadline::mixed
    submit_each_sends_io_before_the_batch_ends
    wait_readable_parks_until_an_eventfd_fires::fast
    wait_readable_parks_until_an_eventfd_fires::sigaltstack
    wait_readable_parks_until_an_eventfd_fires::ucontext
    wait_readable_parks_until_an_eventfd_fires::thread
    wait_readable_parks_until_an_eventfd_fires::shared
    wait_readable_parks_until_an_eventfd_fires::shared_sigaltstack
    wait_readable_parks_until_an_eventfd_fires::mixed
)
skips=()
for t in "${IO_URING_TESTS[@]}"; do
    skips+=(--skip "$t")
done

cargo clippy -p coro --all-targets --target "$TARGET" -- -D warnings
echo "coro aarch64: skipping ${#IO_URING_TESTS[@]} io_uring tests, because qemu-user has no io_uring (io_uring_setup: ENOSYS)"
cargo test -p coro --target "$TARGET" --release -- --exact "${skips[@]}"
cargo bench -p coro --target "$TARGET" --bench switch
echo "coro aarch64: done in $(($(date +%s) - start)) s"

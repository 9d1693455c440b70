//! Completion-queue overflow: more completions outstanding than the CQ holds.
//!
//! The kernel keeps CQEs that find the CQ full on an internal overflow list
//! (`IORING_SQ_CQ_OVERFLOW` in the SQ flags; with `IORING_FEAT_NODROP` none are lost) and
//! moves them to the CQ only during a later `io_uring_enter`. The daemon's worker enters
//! the kernel only to submit, and wakes only on the completion eventfd or on
//! `has_completions` in its poll loop, so the scheduler itself must flush the overflow when
//! it reaps; otherwise those requests hang until some unrelated submission.
//!
//! Each scenario runs with pooled stacks and on the shared stack.
//!
//! Each scenario runs on its own thread and reports back over a channel with a deadline, so
//! a stranded completion fails the test instead of hanging the run.

use std::cell::Cell;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use coro::io::{IoBuf, Ring};
use coro::{Backend, Builder, Scheduler, StackMode};

/// Tasks per scenario: far more than the 8 CQ entries of a 4-entry ring.
const TASKS: usize = 100;

/// How the test stands in for the daemon's worker (daemon/src/worker.rs).
#[derive(Clone, Copy, Debug)]
enum Drive {
    /// Sleep on the completion eventfd (its epoll), then `on_completion_event`.
    EventFd,
    /// The poll loop: `has_completions`, then `run`; never sleeps on the eventfd.
    Poll,
}

/// The operation each task parks on.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// A read of `/dev/zero`: completes inside the submitting `io_uring_enter`.
    ReadZero,
    /// A 2 ms io_uring timeout: completes later, from the timer.
    Sleep,
}

/// Runs `TASKS` tasks, each doing one `op`, on a 4-entry ring driven like the daemon does;
/// returns how many tasks are still unfinished after `budget`.
fn scenario(drive: Drive, op: Op, mode: StackMode, budget: Duration) -> usize {
    let zero = std::fs::File::open("/dev/zero").expect("open /dev/zero");
    let fd: RawFd = zero.as_raw_fd();
    let ring = Ring::new(4).expect("ring");
    let efd = ring.eventfd();
    let s = Scheduler::new(Builder::new().backend(Backend::Fast).stack_mode(mode)).with_ring(ring);
    let done = Rc::new(Cell::new(0usize));
    for _ in 0..TASKS {
        let done = done.clone();
        s.spawn(move || {
            match op {
                Op::ReadZero => {
                    let mut buf = vec![1u8; 64];
                    let n = coro::io::readv(fd, &[IoBuf::from_vec(&mut buf)], 0).expect("readv");
                    assert_eq!(n, 64);
                    assert!(buf.iter().all(|&b| b == 0));
                }
                Op::Sleep => coro::sleep(Duration::from_millis(2)),
            }
            done.set(done.get() + 1);
        })
        .expect("spawn");
    }
    // The kick that spawned the requests ends with a run, as `Worker::on_kick` does.
    s.run().expect("run");
    let deadline = Instant::now() + budget;
    while s.task_count() > 0 && Instant::now() < deadline {
        match drive {
            Drive::EventFd => {
                let mut pfd = libc::pollfd {
                    fd: efd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, for the length given.
                let n = unsafe { libc::poll(&mut pfd, 1, 50) };
                if n > 0 {
                    s.on_completion_event().expect("on_completion_event");
                }
            }
            Drive::Poll => {
                if s.has_completions() {
                    s.run().expect("run");
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }
    let left = s.task_count();
    assert_eq!(done.get() + left, TASKS);
    drop(s);
    drop(zero);
    left
}

/// Runs `scenario` on a thread; fails if it does not report back in time.
fn check(drive: Drive, op: Op) {
    check_mode(drive, op, StackMode::Pooled);
    check_mode(drive, op, StackMode::Shared);
}

fn check_mode(drive: Drive, op: Op, mode: StackMode) {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let left = scenario(drive, op, mode, Duration::from_secs(3));
        let _ = tx.send(left);
    });
    let left = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{drive:?}/{op:?}/{mode:?}: scenario did not finish: {e}"));
    assert_eq!(
        left, 0,
        "{drive:?}/{op:?}/{mode:?}: {left} of {TASKS} tasks never resumed: their completions are stranded \
         in the kernel's CQ overflow list"
    );
}

#[test]
fn cq_overflow_flushed_for_eventfd_driver_immediate_completions() {
    check(Drive::EventFd, Op::ReadZero);
}

#[test]
fn cq_overflow_flushed_for_eventfd_driver_timer_completions() {
    check(Drive::EventFd, Op::Sleep);
}

#[test]
fn cq_overflow_flushed_for_poll_driver_immediate_completions() {
    check(Drive::Poll, Op::ReadZero);
}

#[test]
fn cq_overflow_flushed_for_poll_driver_timer_completions() {
    check(Drive::Poll, Op::Sleep);
}

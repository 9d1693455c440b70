//! Scheduler, sync primitives and io_uring, run against every switch backend and the shared
//! stack mode.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use coro::io::IoBuf;
use coro::sync::{Condvar, Mutex};
use coro::{Backend, Builder, Error, Scheduler, StackMode};

/// Defines `mod name { fn fast(); fn sigaltstack(); fn ucontext(); fn thread(); }` running
/// `body(scheduler)` with pooled stacks on each backend, plus `fn shared();
/// fn shared_sigaltstack();` on the shared stack with the two register switches, and
/// `fn mixed();`: the first task in flight pooled, those beyond it shared.
macro_rules! each_backend {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn fast() {
                ($body)(Scheduler::new(Builder::new().backend(Backend::Fast)))
            }
            #[test]
            fn sigaltstack() {
                ($body)(Scheduler::new(Builder::new().backend(Backend::Sigaltstack)))
            }
            #[cfg(target_env = "gnu")]
            #[test]
            fn ucontext() {
                ($body)(Scheduler::new(Builder::new().backend(Backend::Ucontext)))
            }
            #[test]
            fn thread() {
                ($body)(Scheduler::new(Builder::new().backend(Backend::Thread)))
            }
            #[test]
            fn shared() {
                ($body)(Scheduler::new(shared_builder()))
            }
            #[test]
            fn shared_sigaltstack() {
                ($body)(Scheduler::new(
                    shared_builder().backend(Backend::Sigaltstack),
                ))
            }
            #[test]
            fn mixed() {
                ($body)(
                    Scheduler::new(Builder::new().backend(Backend::Fast)).share_stacks_beyond(1),
                )
            }
        }
    };
}

/// `Fast` on the shared stack.
fn shared_builder() -> Builder {
    Builder::new()
        .backend(Backend::Fast)
        .stack_mode(StackMode::Shared)
}

/// Where task `t`'s frames are: the address of a local, parked and checked after.
fn spawn_recording_frame(s: &Scheduler, t: usize, frames: &Rc<RefCell<Vec<(usize, usize)>>>) {
    let frames = frames.clone();
    s.spawn(move || {
        let local = [t; 64];
        frames
            .borrow_mut()
            .push((t, std::hint::black_box(&local).as_ptr() as usize));
        coro::yield_task();
        // A shared-stack task's bytes were copied out and back in between.
        assert_eq!(std::hint::black_box(&local), &[t; 64]);
    })
    .expect("spawn");
}

/// Runs `tasks` tasks that each record their frame address (see
/// [`spawn_recording_frame`]) to completion; returns the records.
fn frames_of(s: &Scheduler, tasks: usize) -> Vec<(usize, usize)> {
    let frames = Rc::new(RefCell::new(Vec::new()));
    for t in 0..tasks {
        spawn_recording_frame(s, t, &frames);
    }
    s.run().expect("run");
    assert_eq!(s.task_count(), 0);
    frames.take()
}

#[test]
fn tasks_beyond_the_limit_share_one_stack_and_the_first_ones_do_not() {
    let s = Scheduler::new(Builder::new().backend(Backend::Fast)).share_stacks_beyond(2);
    let frames = frames_of(&s, 5);
    let at = |t: usize| frames.iter().find(|f| f.0 == t).expect("task ran").1;
    // Tasks 2-4 were spawned with two or more unfinished: the same frame on one stack.
    assert_eq!(at(2), at(3));
    assert_eq!(at(3), at(4));
    // Tasks 0 and 1 have stacks of their own.
    assert_ne!(at(0), at(1));
    assert!(at(0) != at(2) && at(1) != at(2));
}

#[test]
fn sharing_beyond_a_limit_is_ignored_by_a_backend_that_cannot_share() {
    let s = Scheduler::new(Builder::new().backend(Backend::Thread)).share_stacks_beyond(0);
    let frames = frames_of(&s, 3);
    let mut addrs: Vec<usize> = frames.iter().map(|f| f.1).collect();
    addrs.dedup();
    assert_eq!(addrs.len(), 3, "each task its own stack: {frames:?}");
}

each_backend!(park_and_outside_wake, |s: Scheduler| {
    let log = Rc::new(RefCell::new(Vec::new()));
    let l = log.clone();
    let id = Rc::new(Cell::new(None));
    let idc = id.clone();
    s.spawn(move || {
        idc.set(Some(coro::current_task()));
        l.borrow_mut().push("parked");
        coro::park();
        l.borrow_mut().push("woken");
    })
    .expect("spawn");
    s.run().expect("run");
    assert_eq!(*log.borrow(), vec!["parked"]);
    assert_eq!(s.task_count(), 1);
    // A second run without a wake does nothing.
    assert_eq!(s.run().expect("run"), 0);
    s.wake(id.get().expect("task id"));
    s.run().expect("run");
    assert_eq!(*log.borrow(), vec!["parked", "woken"]);
    assert_eq!(s.task_count(), 0);
    // Waking a finished task (stale id) is harmless.
    s.wake(id.get().expect("task id"));
    assert_eq!(s.run().expect("run"), 0);
});

each_backend!(yield_task_round_robins, |s: Scheduler| {
    let log = Rc::new(RefCell::new(Vec::new()));
    for t in 0..3 {
        let l = log.clone();
        s.spawn(move || {
            for i in 0..3 {
                l.borrow_mut().push(t * 10 + i);
                coro::yield_task();
            }
        })
        .expect("spawn");
    }
    s.run().expect("run");
    assert_eq!(*log.borrow(), vec![0, 10, 20, 1, 11, 21, 2, 12, 22]);
});

each_backend!(mutex_is_fair_fifo, |s: Scheduler| {
    // Each task takes the lock three times, yielding while holding it. With FIFO hand-off
    // the acquisitions alternate strictly; an unfair lock lets one task re-take it at once.
    let m = Rc::new(Mutex::new(Vec::new()));
    for t in 0..3 {
        let m = m.clone();
        s.spawn(move || {
            for _ in 0..3 {
                let mut g = m.lock();
                g.push(t);
                coro::yield_task();
                drop(g);
            }
        })
        .expect("spawn");
    }
    s.run().expect("run");
    assert_eq!(s.task_count(), 0);
    let order = m.try_lock().expect("unlocked at the end").clone();
    assert_eq!(order, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
});

each_backend!(condvar_producer_consumer, |s: Scheduler| {
    let queue = Rc::new((Mutex::new(Vec::<u32>::new()), Condvar::new()));
    let got = Rc::new(RefCell::new(Vec::new()));
    for _ in 0..2 {
        let (q, g) = (queue.clone(), got.clone());
        s.spawn(move || loop {
            let mut items = q.0.lock();
            while items.is_empty() {
                items = q.1.wait(items);
            }
            let v = items.remove(0);
            drop(items);
            if v == u32::MAX {
                return;
            }
            g.borrow_mut().push(v);
        })
        .expect("spawn");
    }
    let q = queue.clone();
    s.spawn(move || {
        for v in (1..=6).chain([u32::MAX, u32::MAX]) {
            q.0.lock().push(v);
            q.1.notify_one();
            coro::yield_task();
        }
    })
    .expect("spawn");
    s.run().expect("run");
    assert_eq!(s.task_count(), 0, "consumers must see both stop markers");
    let mut got = got.borrow().clone();
    got.sort();
    assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
});

each_backend!(sleep_orders_by_deadline, |s: Scheduler| {
    let log = Rc::new(RefCell::new(Vec::new()));
    for (i, ms) in [(0u32, 30u64), (1, 10), (2, 20)] {
        let l = log.clone();
        s.spawn(move || {
            coro::sleep(Duration::from_millis(ms));
            l.borrow_mut().push(i);
        })
        .expect("spawn");
    }
    let t0 = Instant::now();
    assert_eq!(s.run_until_idle().expect("run"), 0);
    assert!(t0.elapsed() >= Duration::from_millis(30));
    assert_eq!(*log.borrow(), vec![1, 2, 0]);
});

each_backend!(io_uring_reads_resume_in_completion_order, |s: Scheduler| {
    // 64 tasks read distinct 4 KiB blocks of a real file. Each first sleeps for a time that
    // decreases with its index, so completions (and thus resumptions) arrive in reverse
    // spawn order; every task must get its own block's bytes.
    const N: usize = 64;
    const BS: usize = 4096;
    let mut file = tempfile::tempfile().expect("temp file");
    let mut content = vec![0u8; N * BS];
    for (i, chunk) in content.chunks_mut(BS).enumerate() {
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (i * 31 + j * 7) as u8;
        }
    }
    file.write_all(&content).expect("write");
    let fd = file.as_raw_fd();
    let content = Rc::new(content);
    let order = Rc::new(RefCell::new(Vec::new()));
    for i in 0..N {
        let (content, order) = (content.clone(), order.clone());
        s.spawn(move || {
            coro::sleep(Duration::from_millis(2 * (N - i) as u64));
            let mut buf = vec![0u8; BS];
            let n =
                coro::io::readv(fd, &[IoBuf::from_vec(&mut buf)], (i * BS) as u64).expect("readv");
            assert_eq!(n, BS);
            assert_eq!(&buf[..], &content[i * BS..(i + 1) * BS], "block {i}");
            order.borrow_mut().push(i);
        })
        .expect("spawn");
    }
    s.run().expect("run");
    assert_eq!(s.io_in_flight(), N, "all tasks parked on their timers");
    assert_eq!(s.run_until_idle().expect("run"), 0);
    let expected: Vec<usize> = (0..N).rev().collect();
    assert_eq!(*order.borrow(), expected);
    drop(file);
});

each_backend!(io_uring_write_fsync_fallocate_roundtrip, |s: Scheduler| {
    let file = tempfile::tempfile().expect("temp file");
    let fd = file.as_raw_fd();
    let ok = Rc::new(Cell::new(false));
    let okc = ok.clone();
    s.spawn(move || {
        let mut data = vec![0xabu8; 8192];
        let iov = [IoBuf::from_vec(&mut data)];
        assert_eq!(coro::io::writev(fd, &iov, 4096).expect("writev"), 8192);
        coro::io::fsync(fd, true).expect("fdatasync");
        // Zero the middle 4 KiB, keeping the size.
        coro::io::fallocate(
            fd,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            8192,
            4096,
        )
        .expect("zero range");
        let mut back = vec![0u8; 12288];
        let iov = [IoBuf::from_vec(&mut back)];
        assert_eq!(coro::io::readv(fd, &iov, 0).expect("readv"), 12288);
        // Reading at EOF returns 0 bytes, not an error.
        assert_eq!(coro::io::readv(fd, &iov, 1 << 20).expect("readv eof"), 0);
        // An invalid descriptor is an error for this request only.
        let err = coro::io::readv(-1, &iov, 0).expect_err("readv of fd -1");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err:?}");
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..8192].iter().all(|&b| b == 0xab));
        assert!(back[8192..].iter().all(|&b| b == 0));
        okc.set(true);
    })
    .expect("spawn");
    assert_eq!(s.run_until_idle().expect("run"), 0);
    assert!(ok.get());
    drop(file);
});

each_backend!(dropping_scheduler_unwinds_parked_tasks, |s: Scheduler| {
    struct Flag(Rc<Cell<bool>>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.set(true);
        }
    }
    let dropped = Rc::new(Cell::new(false));
    let d = dropped.clone();
    s.spawn(move || {
        let _f = Flag(d);
        coro::sleep(Duration::from_millis(5)); // in flight when the scheduler is dropped
        coro::park();
    })
    .expect("spawn");
    s.run().expect("run");
    assert_eq!(s.io_in_flight(), 1);
    drop(s);
    assert!(dropped.get());
});

each_backend!(task_panic_reaches_run, |s: Scheduler| {
    s.spawn(|| panic!("task failed")).expect("spawn");
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.run()))
        .expect_err("panic must propagate");
    assert_eq!(err.downcast_ref::<&str>(), Some(&"task failed"));
    assert_eq!(s.task_count(), 0);
});

/// With `submit_each` an operation reaches the kernel while its task parks, before the
/// scheduler's batch submit: a page-cache read completes, and signals the ring's eventfd,
/// before the next task runs. Without it the read is still queued at that point.
#[test]
fn submit_each_sends_io_before_the_batch_ends() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut file = tempfile::tempfile().expect("temp file");
    file.write_all(&[7u8; 4096]).expect("write");
    let fd = file.as_raw_fd();
    for each in [false, true] {
        // SAFETY: eventfd has no memory preconditions; the result is checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(raw >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        let ring = coro::io::Ring::with_eventfd(8, efd.try_clone().expect("dup"))
            .expect("ring")
            .submit_each(each);
        let s = Scheduler::new(Builder::new()).with_ring(ring);
        s.spawn(move || {
            let mut buf = vec![0u8; 4096];
            let iov = [IoBuf::from_vec(&mut buf)];
            assert_eq!(coro::io::readv(fd, &iov, 0).expect("readv"), 4096);
            assert!(buf.iter().all(|&b| b == 7));
        })
        .expect("spawn reader");
        let signalled = Rc::new(Cell::new(None));
        let seen = signalled.clone();
        let efd_raw = efd.as_raw_fd();
        s.spawn(move || {
            let mut count = 0u64;
            // SAFETY: reads 8 bytes into a live u64 from a descriptor this test owns.
            let n = unsafe { libc::read(efd_raw, (&mut count as *mut u64).cast(), 8) };
            seen.set(Some(n == 8));
        })
        .expect("spawn checker");
        assert_eq!(s.run_until_idle().expect("run"), 0);
        assert_eq!(
            signalled.get(),
            Some(each),
            "submit_each({each}): completion seen before the batch submit"
        );
        drop(efd);
    }
}

/// A failed system call names itself, and keeps its errno.
#[test]
fn ring_setup_failure_names_the_call() {
    // io_uring_setup rejects a ring of zero entries with EINVAL.
    match coro::io::Ring::new(0) {
        Err(Error::Os { call, source }) => {
            assert_eq!(call, "io_uring_setup");
            assert_eq!(source.raw_os_error(), Some(libc::EINVAL));
        }
        Err(other) => panic!("expected Error::Os, got {other:?}"),
        Ok(_) => panic!("a ring of 0 entries must be refused"),
    }
}

/// Callers that return `io::Result` can use `?` on a `coro::Error` without losing it.
#[test]
fn error_converts_to_io_error_losslessly() {
    let io_err = std::io::Error::from(Error::StackTooLarge { requested: 7 });
    assert_eq!(io_err.kind(), std::io::ErrorKind::InvalidInput);
    let inner = io_err
        .get_ref()
        .and_then(|e| e.downcast_ref::<Error>())
        .expect("the coro::Error is kept inside");
    assert!(
        matches!(inner, Error::StackTooLarge { requested: 7 }),
        "{inner:?}"
    );
}

/// A job of the caller's own type: a task that cannot start hands it back unrun, fields
/// intact, so whatever it owns can still be answered for (the daemon answers the request).
#[test]
fn a_refused_task_hands_its_job_back() {
    struct Answer {
        head: u16,
        ran: Rc<Cell<bool>>,
    }
    impl coro::Job for Answer {
        fn run(self) {
            self.ran.set(true);
        }
    }
    let ran = Rc::new(Cell::new(false));
    let s = Scheduler::new(Builder::new().stack_size(usize::MAX - 4096));
    let refused = s
        .spawn(Answer {
            head: 7,
            ran: ran.clone(),
        })
        .expect_err("a stack that does not fit the address space");
    assert!(
        matches!(refused.error, Error::StackTooLarge { .. }),
        "{:?}",
        refused.error
    );
    assert_eq!(refused.job.head, 7, "the job comes back whole");
    assert!(!ran.get(), "and unrun");
    assert_eq!(s.task_count(), 0, "no task slot is left behind");
    // Where stacks can be had, the same job type runs as a task.
    let s = Scheduler::default();
    s.spawn(Answer {
        head: 1,
        ran: ran.clone(),
    })
    .expect("spawn");
    s.run().expect("run");
    assert!(ran.get());
}

// ---- Shared stack mode: what a parked task leaves on its stack ----

/// 1.5 KiB of locals and a pointer into them, as a request handler would keep across its
/// I/O; checked after every park.
struct Frame {
    words: [u64; 192],
    id: u64,
}

impl Frame {
    fn new(id: u64) -> Frame {
        let mut words = [0u64; 192];
        for (i, w) in words.iter_mut().enumerate() {
            *w = id.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ i as u64;
        }
        Frame { words, id }
    }

    fn check(&self, at: &str) {
        let f = std::hint::black_box(self);
        for (i, w) in f.words.iter().enumerate() {
            assert_eq!(
                *w,
                f.id.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ i as u64,
                "task {}: word {i} changed across {at}",
                f.id
            );
        }
    }
}

each_backend!(
    parked_tasks_keep_stack_data_through_sleep_and_file_io,
    |s: Scheduler| {
        // Many tasks interleave sleeps, writes and reads of their own block of a real file;
        // each keeps live data on its stack across every park and checks it, and checks the
        // data read back. Writes use 16 buffers (more than an op slot holds inline) from a
        // local array of `IoBuf`s, which the op slot copies.
        const TASKS: u64 = 200;
        const BS: usize = 4096;
        const PIECES: usize = 16;
        let file = tempfile::tempfile().expect("temp file");
        file.set_len(TASKS * BS as u64).expect("set_len");
        let fd = file.as_raw_fd();
        let done = Rc::new(Cell::new(0u64));
        for id in 0..TASKS {
            let done = done.clone();
            s.spawn(move || {
                let frame = Frame::new(id);
                let me: *const Frame = &frame;
                for round in 0..3u64 {
                    coro::sleep(Duration::from_micros((id * 37 + round * 101) % 900));
                    frame.check("sleep");
                    let fill = (id as u8) ^ (round as u8).wrapping_mul(0x5b);
                    let mut pieces: Vec<Vec<u8>> = (0..PIECES)
                        .map(|p| vec![fill.wrapping_add(p as u8); BS / PIECES])
                        .collect();
                    let bufs: Vec<IoBuf<'_>> = pieces.iter_mut().map(IoBuf::from_vec).collect();
                    let at = id * BS as u64;
                    assert_eq!(coro::io::writev(fd, &bufs, at).expect("writev"), BS);
                    frame.check("writev");
                    let mut back = vec![0u8; BS];
                    let n = coro::io::readv(fd, &[IoBuf::from_vec(&mut back)], at).expect("readv");
                    frame.check("readv");
                    assert_eq!(n, BS);
                    for (p, chunk) in back.chunks(BS / PIECES).enumerate() {
                        assert!(
                            chunk.iter().all(|&b| b == fill.wrapping_add(p as u8)),
                            "task {id}, round {round}, piece {p}: wrong data read back"
                        );
                    }
                    coro::yield_task();
                    frame.check("yield_task");
                    assert_eq!(&frame as *const Frame, me);
                }
                done.set(done.get() + 1);
            })
            .expect("spawn");
        }
        assert_eq!(s.run_until_idle().expect("run"), 0);
        assert_eq!(done.get(), TASKS);
        drop(file);
    }
);

/// The `BufferOnSharedStack` inside an I/O error.
fn on_shared_stack(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::InvalidInput
        && matches!(
            err.get_ref().and_then(|e| e.downcast_ref::<Error>()),
            Some(Error::BufferOnSharedStack { .. })
        )
}

#[test]
fn shared_stack_buffers_are_refused() {
    let file = tempfile::tempfile().expect("temp file");
    file.set_len(4096).expect("set_len");
    let fd = file.as_raw_fd();
    let s = Scheduler::new(shared_builder());
    let checked = Rc::new(Cell::new(false));
    let c = checked.clone();
    s.spawn(move || {
        let mut local = [0u8; 512];
        let mut heap = vec![0u8; 512];
        // SAFETY: deliberately breaking `from_raw`'s rule, which shared mode must catch
        // before anything reaches the kernel: `local` is on this task's stack.
        let on_stack = unsafe { IoBuf::from_raw(local.as_mut_ptr(), local.len()) };
        let bufs = [IoBuf::from_vec(&mut heap), on_stack];
        let err = coro::io::readv(fd, &bufs, 0).expect_err("a buffer on the shared stack");
        assert!(on_shared_stack(&err), "{err:?}");
        let err = coro::io::writev(fd, &bufs[1..], 0).expect_err("and for writes");
        assert!(on_shared_stack(&err), "{err:?}");
        // The same array without the stack buffer goes through.
        assert_eq!(
            coro::io::readv(fd, &bufs[..1], 0).expect("heap buffer"),
            512
        );
        c.set(true);
    })
    .expect("spawn");
    assert_eq!(s.run_until_idle().expect("run"), 0);
    assert!(checked.get());
    drop(file);
}

#[test]
fn pooled_stack_buffers_are_not_checked() {
    // With pooled stacks a parked task's stack stays put, so a local buffer is not wrong
    // there (only `from_raw`'s contract forbids it, for portability to shared mode).
    let file = tempfile::tempfile().expect("temp file");
    file.set_len(4096).expect("set_len");
    let fd = file.as_raw_fd();
    let s = Scheduler::new(Builder::new().backend(Backend::Fast));
    s.spawn(move || {
        let mut local = [1u8; 512];
        // SAFETY: `local` outlives the read (this task is parked, its own stack stays
        // mapped and put in pooled mode) and nothing else touches it meanwhile.
        let on_stack = unsafe { IoBuf::from_raw(local.as_mut_ptr(), local.len()) };
        assert_eq!(coro::io::readv(fd, &[on_stack], 0).expect("readv"), 512);
        assert!(local.iter().all(|&b| b == 0));
    })
    .expect("spawn");
    assert_eq!(s.run_until_idle().expect("run"), 0);
    drop(file);
}

each_backend!(
    wait_readable_parks_until_an_eventfd_fires,
    |s: Scheduler| {
        // SAFETY: eventfd(2) with valid flags; the result is checked and owned below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(raw >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let efd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let fd = efd.as_raw_fd();
        let woke = Rc::new(Cell::new(false));
        let w = woke.clone();
        s.spawn(move || {
            coro::io::wait_readable(fd).expect("poll");
            w.set(true);
        })
        .expect("spawn");
        s.run().expect("run");
        assert!(!woke.get(), "nothing to read yet: the task is parked");
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live array to our eventfd.
        assert_eq!(unsafe { libc::write(fd, one.as_ptr().cast(), 8) }, 8);
        assert_eq!(s.run_until_idle().expect("run"), 0);
        assert!(woke.get(), "the eventfd firing resumed it");
    }
);

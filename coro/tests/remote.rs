//! Remote completions (`coro::io::remote`): a task parks on an op slot that another thread
//! completes through `IORING_OP_MSG_RING`, as librbd's callback threads do for the RBD
//! backend. Each test checks one rule: the result arrives, the eventfd fires, a given-up
//! slot's late completion is ignored, a dropped completer does not strand its task, the
//! iovec copy outlives the caller's array, and dropping the scheduler waits for the
//! completion before unwinding the task.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use coro::io::{self, Completer, IoBuf, Ring};
use coro::{Builder, Scheduler, StackMode};

fn sched() -> Scheduler {
    Scheduler::default().with_ring(Ring::new(8).expect("ring"))
}

/// Completes `c` with `result` from a new thread after `delay`.
fn complete_later(c: Completer, result: i32, delay: Duration) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        thread::sleep(delay);
        c.complete(result).expect("MSG_RING to the task's ring");
    })
}

#[test]
fn kernel_supports_remote_completions() {
    io::check_remote_completions().expect("IORING_OP_MSG_RING (Linux 5.18+)");
}

#[test]
fn result_from_another_thread_wakes_the_task() {
    let s = sched();
    let got = Rc::new(Cell::new(None));
    let g = got.clone();
    s.spawn(move || {
        let r = io::remote(&[], |op| {
            complete_later(op.into_completer(), 42, Duration::from_millis(20));
            Ok(())
        });
        g.set(Some(r.expect("remote op")));
    })
    .expect("spawn");
    s.run().expect("run");
    assert_eq!(got.get(), None, "parked until the completion");
    assert_eq!(s.io_in_flight(), 1, "the reserved slot counts as in flight");
    assert_eq!(s.run_until_idle().expect("run"), 0);
    assert_eq!(got.get(), Some(42));
    assert_eq!(s.io_in_flight(), 0);
}

#[test]
fn completion_fires_a_worker_style_eventfd() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: eventfd has no memory preconditions; checked below.
    let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    let efd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: duplicating our own live descriptor.
    let dup = unsafe { libc::dup(efd.as_raw_fd()) };
    assert!(dup >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    let ring = Ring::with_eventfd(8, unsafe { OwnedFd::from_raw_fd(dup) }).expect("ring");
    let s = Scheduler::default().with_ring(ring);
    let done = Rc::new(Cell::new(0));
    let d = done.clone();
    s.spawn(move || {
        let r = io::remote(&[], |op| {
            complete_later(op.into_completer(), -5, Duration::from_millis(20));
            Ok(())
        });
        d.set(r.expect("remote op"));
    })
    .expect("spawn");
    s.run().expect("run");
    let mut pfd = libc::pollfd {
        fd: efd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a bounded timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(n, 1, "the eventfd fired for the remote completion");
    s.on_completion_event().expect("run");
    assert_eq!(done.get(), -5, "the errno travels in the CQE");
}

#[test]
fn a_given_up_slots_late_completion_is_ignored() {
    let s = sched();
    let stale: Arc<Mutex<Option<Completer>>> = Arc::default();
    let got = Rc::new(Cell::new(None));
    let (st, g) = (stale.clone(), got.clone());
    s.spawn(move || {
        // The start keeps the completer but reports failure (a misbehaving library).
        let first = io::remote(&[], |op| {
            *st.lock().expect("lock") = Some(op.into_completer());
            Err(std::io::Error::from_raw_os_error(libc::EINVAL))
        });
        assert_eq!(
            first.expect_err("start failed").raw_os_error(),
            Some(libc::EINVAL)
        );
        // The next op reuses the slot; the stale completer fires first.
        let second = io::remote(&[], |op| {
            let stale = st.lock().expect("lock").take().expect("kept");
            let c = op.into_completer();
            thread::spawn(move || {
                stale.complete(99).expect("send stale");
                thread::sleep(Duration::from_millis(20));
                c.complete(5).expect("send");
            });
            Ok(())
        });
        g.set(Some(second.expect("second op")));
    })
    .expect("spawn");
    s.run_until_idle().expect("run");
    assert_eq!(
        got.get(),
        Some(5),
        "the stale 99 must not complete the reused slot"
    );
}

#[test]
fn dropped_completer_cancels_rather_than_strands() {
    let s = sched();
    let got = Rc::new(Cell::new(None));
    let g = got.clone();
    s.spawn(move || {
        let r = io::remote(&[], |op| {
            let c = op.into_completer();
            thread::spawn(move || drop(c));
            Ok(())
        });
        g.set(Some(r.expect("remote op")));
    })
    .expect("spawn");
    s.run_until_idle().expect("run");
    assert_eq!(got.get(), Some(-libc::ECANCELED));
}

#[test]
fn iovec_copy_outlives_the_callers_array_on_a_shared_stack() {
    let s = Scheduler::new(Builder::new().stack_mode(StackMode::Shared))
        .with_ring(Ring::new(8).expect("ring"));
    let buf = Rc::new(std::cell::RefCell::new(vec![0u8; 4096]));
    let b = buf.clone();
    s.spawn(move || {
        let mut data = b.borrow_mut();
        // The array lives on this task's (shared) stack; the library reads the slot's copy
        // only after the task parked and another task ran on the same stack.
        let bufs = [IoBuf::from_vec(&mut data)];
        let r = io::remote(&bufs, |op| {
            let (iov, n) = op.iovecs();
            let (iov, n) = (iov as usize, n);
            let c = op.into_completer();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(30));
                // SAFETY: the slot's copy is valid until the completion; the buffer is a
                // live Vec the parked task lends for the op.
                let v = unsafe { &*(iov as *const libc::iovec) };
                assert_eq!((n, v.iov_len), (1, 4096));
                // SAFETY: as above; nothing else touches the buffer meanwhile.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0xab, v.iov_len) };
                c.complete(4096).expect("send");
            });
            Ok(())
        });
        assert_eq!(r.expect("remote op"), 4096);
    })
    .expect("spawn");
    s.spawn(|| {
        // Scribbles over the shared stack while the first task is parked.
        let junk = [0x55u8; 2048];
        std::hint::black_box(&junk);
    })
    .expect("spawn");
    s.run_until_idle().expect("run");
    assert!(buf.borrow().iter().all(|&b| b == 0xab));
}

#[test]
fn dropping_the_scheduler_waits_for_the_remote_completion() {
    let s = sched();
    let completed = Arc::new(AtomicBool::new(false));
    let unwound_after = Rc::new(Cell::new(None));
    let (c2, u2) = (completed.clone(), unwound_after.clone());
    s.spawn(move || {
        struct OnUnwind(Arc<AtomicBool>, Rc<Cell<Option<bool>>>);
        impl Drop for OnUnwind {
            fn drop(&mut self) {
                self.1.set(Some(self.0.load(Ordering::SeqCst)));
            }
        }
        let _guard = OnUnwind(c2.clone(), u2);
        let r = io::remote(&[], |op| {
            let c = op.into_completer();
            let flag = c2.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(100));
                flag.store(true, Ordering::SeqCst);
                c.complete(0).expect("send");
            });
            Ok(())
        });
        let _ = r;
        coro::park(); // parked for good after the op: only the drop ends it
    })
    .expect("spawn");
    s.run().expect("run");
    let t0 = Instant::now();
    drop(s);
    assert!(
        t0.elapsed() >= Duration::from_millis(90),
        "drop waited for the completion"
    );
    assert_eq!(
        unwound_after.get(),
        Some(true),
        "the task was unwound only after its remote op completed"
    );
}

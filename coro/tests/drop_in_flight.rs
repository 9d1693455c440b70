//! Dropping a scheduler while tasks have I/O in flight, with signals arriving meanwhile.
//!
//! `Scheduler::drop` must not unwind (free) a task before the kernel has posted the
//! completion of every operation that writes into the task's buffers. A signal whose handler
//! lacks `SA_RESTART` makes the waiting `io_uring_enter` fail with `EINTR`; that must not end
//! the wait. The daemon has a signal thread, but any thread can still receive signals.
//!
//! The buffers here are leaked on purpose, so that even a broken drop cannot make the kernel
//! write into freed memory of this test process; a guard in the task records what the buffer
//! held when the task was unwound, i.e. when its memory would have been freed.
//!
//! Each scenario runs with pooled stacks and on the shared stack (whose parked tasks' bytes
//! are copied away, so nothing the kernel touches may be on a task's stack).
//!
//! Each scenario runs on its own thread and reports back over a channel with a deadline, so
//! a hang fails the test instead of stalling the run.

use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Once};
use std::thread;
use std::time::{Duration, Instant};

use coro::io::{IoBuf, Ring};
use coro::{Backend, Builder, Scheduler, StackMode};

const BUF: usize = 64;

extern "C" fn on_sigusr1(_: libc::c_int) {}

/// Installs a no-op SIGUSR1 handler *without* `SA_RESTART`, so that a blocking system call
/// of the thread it interrupts fails with `EINTR`. Only threads that the tests target with
/// `pthread_kill` ever receive it.
fn install_sigusr1_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point (no flags, empty mask once
        // sigemptyset ran); the handler is an `extern "C" fn(c_int)` that does nothing, which
        // is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigusr1 as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            assert_eq!(
                libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()),
                0,
                "sigaction: {}",
                std::io::Error::last_os_error()
            );
        }
    });
}

/// Sends SIGUSR1 to one thread every millisecond until dropped.
struct Signaller {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Signaller {
    /// Starts signalling the calling thread.
    fn start() -> Signaller {
        install_sigusr1_handler();
        /// A thread id to signal from another thread (a pointer in musl, so not `Send`).
        struct Target(libc::pthread_t);
        // SAFETY: only used as an id for pthread_kill, never dereferenced.
        unsafe impl Send for Target {}
        // SAFETY: pthread_self has no preconditions.
        let target = Target(unsafe { libc::pthread_self() });
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let (st, se) = (stop.clone(), sent.clone());
        let thread = thread::spawn(move || {
            let target = target; // the whole `Target`, not just its (non-`Send`) field
            while !st.load(Ordering::Relaxed) {
                // SAFETY: `target` is alive: `Signaller::drop`, run on that thread, stops and
                // joins this loop before the target can exit.
                let rc = unsafe { libc::pthread_kill(target.0, libc::SIGUSR1) };
                assert_eq!(rc, 0, "pthread_kill");
                se.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(1));
            }
        });
        Signaller {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Signaller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("signaller thread");
        }
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes; the result is checked.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn write_byte(fd: RawFd, b: u8) {
    // SAFETY: writes one byte from a live local to a descriptor the test owns.
    let n = unsafe { libc::write(fd, (&raw const b).cast(), 1) };
    assert_eq!(n, 1, "write: {}", std::io::Error::last_os_error());
}

/// A buffer that outlives everything (leaked), so the kernel can never write into freed
/// memory even when the code under test is wrong.
fn leaked_buffer() -> *mut u8 {
    Box::leak(Box::new([0u8; BUF])).as_mut_ptr()
}

/// Records, when the task owning `buf` is unwound, the buffer's first byte. With `poke`, it
/// first writes a byte into the pipe the task reads and gives the kernel a moment: if the
/// read were still in flight, the kernel would now complete it into `buf`, which is being
/// freed.
struct UnwindProbe {
    buf: *mut u8,
    poke: Option<RawFd>,
    seen: Rc<Cell<Option<u8>>>,
}

impl Drop for UnwindProbe {
    fn drop(&mut self) {
        if let Some(wfd) = self.poke {
            write_byte(wfd, b'!');
            thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: `buf` points to a leaked, never freed BUF-byte buffer; volatile because
        // the kernel may have written it behind the compiler's back.
        self.seen.set(Some(unsafe { self.buf.read_volatile() }));
    }
}

/// Spawns a task that reads the pipe `rfd` into a leaked buffer, guarded by a probe.
fn spawn_reader(s: &Scheduler, rfd: RawFd, poke: Option<RawFd>) -> Rc<Cell<Option<u8>>> {
    let buf = leaked_buffer();
    let seen = Rc::new(Cell::new(None));
    let probe = UnwindProbe {
        buf,
        poke,
        seen: seen.clone(),
    };
    s.spawn(move || {
        let _probe = probe;
        // SAFETY: `buf` is a leaked heap buffer of BUF bytes: valid for ever, not on a
        // coroutine stack, and only the kernel writes it while the read is in flight.
        let iov = [unsafe { IoBuf::from_raw(buf, BUF) }];
        let _ = coro::io::readv(rfd, &iov, 0);
        coro::park(); // nobody wakes it: only the drop ends this task
    })
    .expect("spawn reader");
    seen
}

/// Runs `f` on a thread of its own and returns its result, failing after `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|e| panic!("scenario did not finish within {limit:?}: {e}"))
}

/// Without cancellation the drop must wait for the read to complete, however many signals
/// interrupt the wait: the byte written after 300 ms must be in the buffer before the task
/// that owns it is unwound.
fn shared() -> Builder {
    Builder::new()
        .backend(Backend::Fast)
        .stack_mode(StackMode::Shared)
}

#[test]
fn drop_waits_for_in_flight_read_through_eintr() {
    drop_waits_for_in_flight_read(Builder::new());
}

#[test]
fn drop_waits_for_in_flight_read_through_eintr_shared() {
    drop_waits_for_in_flight_read(shared());
}

fn drop_waits_for_in_flight_read(b: Builder) {
    const DELAY: Duration = Duration::from_millis(300);
    let (elapsed, seen, signals) = within(Duration::from_secs(30), move || {
        let (rfd, wfd) = pipe();
        let ring = Ring::new(8).expect("ring").cancel_on_drop(false);
        let s = Scheduler::new(b).with_ring(ring);
        let seen = spawn_reader(&s, rfd.as_raw_fd(), None);
        s.run().expect("run");
        assert_eq!(s.io_in_flight(), 1, "the read is in flight");
        let writer = thread::spawn(move || {
            thread::sleep(DELAY);
            write_byte(wfd.as_raw_fd(), b'x');
            wfd
        });
        let signaller = Signaller::start();
        let t0 = Instant::now();
        drop(s);
        let elapsed = t0.elapsed();
        let signals = signaller.sent();
        drop(signaller);
        drop(writer.join().expect("writer"));
        (elapsed, seen.get(), signals)
    });
    eprintln!("drop took {elapsed:?} with {signals} SIGUSR1 sent; buffer at unwind: {seen:?}");
    assert!(signals > 0, "no signal was sent during the drop");
    assert_eq!(
        seen,
        Some(b'x'),
        "the task was unwound (its buffer freed) before its read completed; drop took \
         {elapsed:?} with {signals} signals"
    );
    assert!(elapsed >= DELAY, "drop returned after {elapsed:?}");
}

/// With cancellation (the default) a drop with a long timer and an unanswered pipe read in
/// flight returns promptly, yet only after the kernel has finished with both: once the task
/// is unwound, data arriving on the pipe must not land in its buffer.
#[test]
fn drop_cancels_in_flight_io_promptly_and_waits_for_the_cancellation() {
    drop_cancels_in_flight_io(Builder::new());
}

#[test]
fn drop_cancels_in_flight_io_promptly_and_waits_for_the_cancellation_shared() {
    drop_cancels_in_flight_io(shared());
}

fn drop_cancels_in_flight_io(b: Builder) {
    let (elapsed, seen, timer_unwound, signals) = within(Duration::from_secs(30), move || {
        let (rfd, wfd) = pipe();
        let s = Scheduler::new(b).with_ring(Ring::new(8).expect("ring"));
        let seen = spawn_reader(&s, rfd.as_raw_fd(), Some(wfd.as_raw_fd()));
        let timer_unwound = Rc::new(Cell::new(false));
        let flag = timer_unwound.clone();
        s.spawn(move || {
            struct SetOnDrop(Rc<Cell<bool>>);
            impl Drop for SetOnDrop {
                fn drop(&mut self) {
                    self.0.set(true);
                }
            }
            let _f = SetOnDrop(flag);
            coro::sleep(Duration::from_secs(10));
            coro::park();
        })
        .expect("spawn sleeper");
        s.run().expect("run");
        assert_eq!(s.io_in_flight(), 2, "the read and the timer are in flight");
        let signaller = Signaller::start();
        let t0 = Instant::now();
        drop(s);
        let elapsed = t0.elapsed();
        let signals = signaller.sent();
        drop(signaller);
        drop((rfd, wfd));
        (elapsed, seen.get(), timer_unwound.get(), signals)
    });
    eprintln!("drop took {elapsed:?} with {signals} SIGUSR1 sent; buffer at unwind: {seen:?}");
    assert!(timer_unwound, "the sleeping task was not unwound");
    assert_eq!(
        seen,
        Some(0),
        "the pipe read was still in flight when its task was unwound: the kernel wrote into \
         the buffer being freed (drop took {elapsed:?}, {signals} signals)"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "drop took {elapsed:?}: in-flight operations were not cancelled"
    );
}

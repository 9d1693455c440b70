//! The `thread` backend: every coroutine is an OS thread, and a switch hands a baton.
//!
//! This is QEMU's gthread idea. A fiber's trampoline runs on its own `pthread`, started on
//! the fiber's own guarded [`Stack`] (so an overflow is reported exactly as for the other
//! backends). Exactly one side holds the baton at a time: [`Baton::resume`] hands it to the
//! coroutine thread and sleeps until it comes back, [`Baton::suspend`] is the mirror image.
//! Each switch is two futex wake-ups and two context switches through the kernel, so it is
//! slow on purpose; what it buys is that every tool that understands threads understands the
//! coroutines: a debugger lists each one with its backtrace, and Valgrind's thread tools
//! and sanitizers see ordinary threads synchronised by a pthread mutex and condition
//! variable (hence libc's, which those tools intercept, rather than std's futex-based ones).
//!
//! Thread-locals are per OS thread, so code inside a coroutine sees the coroutine thread's
//! copies. The crate carries its own across each switch (the running scheduler, see
//! `fiber::switch_in`); a program's own thread-locals read inside a coroutine are the
//! coroutine thread's, as with QEMU's gthread backend.

use std::cell::{Cell, UnsafeCell};
use std::io;
use std::mem;
use std::ptr;

use crate::stack::Stack;
use crate::Error;

/// Who may run now.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// The thread that resumed the coroutine.
    Resumer,
    /// The coroutine's thread.
    Coroutine,
    /// The coroutine's thread, to leave its trampoline and exit.
    Exit,
}

/// The baton between a resumer and one coroutine thread. Boxed: the pthread objects must not
/// move once used.
pub(crate) struct Baton {
    mutex: UnsafeCell<libc::pthread_mutex_t>,
    cond: UnsafeCell<libc::pthread_cond_t>,
    /// Only read or written with `mutex` held.
    turn: Cell<Turn>,
}

impl Baton {
    /// A baton held by the coroutine thread, which has yet to reach its first park.
    pub(crate) fn new() -> Box<Baton> {
        Box::new(Baton {
            mutex: UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER),
            cond: UnsafeCell::new(libc::PTHREAD_COND_INITIALIZER),
            turn: Cell::new(Turn::Coroutine),
        })
    }

    /// Gives the baton to `to`, then, unless `wait_for` is `None`, sleeps until the turn is
    /// no longer `wait_for` and returns the turn found.
    fn pass(&self, to: Turn, wait_for: Option<Turn>) -> Turn {
        // SAFETY: the mutex and condition variable were initialised statically and never
        // move (the baton is boxed); `turn` is only touched with the mutex held.
        unsafe {
            libc::pthread_mutex_lock(self.mutex.get());
            self.turn.set(to);
            libc::pthread_cond_signal(self.cond.get());
            let mut now = to;
            if let Some(wait_for) = wait_for {
                while self.turn.get() == wait_for {
                    libc::pthread_cond_wait(self.cond.get(), self.mutex.get());
                }
                now = self.turn.get();
            }
            libc::pthread_mutex_unlock(self.mutex.get());
            now
        }
    }

    /// Resumer side: runs the coroutine until it hands the baton back (for a new thread:
    /// until it first parks).
    pub(crate) fn resume(&self) {
        self.pass(Turn::Coroutine, Some(Turn::Coroutine));
    }

    /// Coroutine side: hands the baton back and sleeps until resumed. Returns false when
    /// woken to exit instead.
    pub(crate) fn suspend(&self) -> bool {
        self.pass(Turn::Resumer, Some(Turn::Resumer)) != Turn::Exit
    }

    /// Resumer side: tells a parked coroutine thread to leave, without waiting for it.
    fn release_to_exit(&self) {
        self.pass(Turn::Exit, None);
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        // SAFETY: nobody waits on or holds them any more (the thread was joined).
        unsafe {
            libc::pthread_cond_destroy(self.cond.get());
            libc::pthread_mutex_destroy(self.mutex.get());
        }
    }
}

/// A running coroutine thread, to be joined when its fiber is destroyed.
pub(crate) struct CoThread {
    id: libc::pthread_t,
}

impl CoThread {
    /// Starts `main(arg)` on a new thread whose stack is `stack`, and waits until it parks
    /// for the first time (it must call [`Baton::suspend`] on `baton`).
    ///
    /// # Safety
    /// `stack` and `baton` must outlive the thread (the caller keeps them until
    /// [`CoThread::exit`] has joined it), and `main(arg)` must be sound to run on another
    /// thread: it may only touch what the baton hands over.
    pub(crate) unsafe fn spawn(
        stack: &Stack,
        baton: &Baton,
        main: extern "C" fn(*mut libc::c_void) -> *mut libc::c_void,
        arg: *mut libc::c_void,
    ) -> Result<CoThread, Error> {
        // SAFETY: the attribute object is initialised before use and destroyed after; the
        // stack range is a mapping the caller keeps alive for the thread's whole life.
        unsafe {
            let mut attr: libc::pthread_attr_t = mem::zeroed();
            let rc = libc::pthread_attr_init(&mut attr);
            if rc != 0 {
                return Err(pthread_error("pthread_attr_init", rc));
            }
            let mut rc =
                libc::pthread_attr_setstack(&mut attr, stack.bottom().cast(), stack.usable());
            let mut id: libc::pthread_t = mem::zeroed();
            if rc == 0 {
                rc = libc::pthread_create(&mut id, &attr, main, arg);
            }
            libc::pthread_attr_destroy(&mut attr);
            if rc != 0 {
                return Err(pthread_error("pthread_create", rc));
            }
            baton.resume();
            Ok(CoThread { id })
        }
    }

    /// Makes the parked coroutine thread leave its trampoline, and joins it.
    pub(crate) fn exit(self, baton: &Baton) {
        baton.release_to_exit();
        // SAFETY: `id` is a joinable thread we created and have not joined.
        unsafe { libc::pthread_join(self.id, ptr::null_mut()) };
    }
}

/// The smallest stack `pthread_create` accepts here (`PTHREAD_STACK_MIN`: 16 KiB on x86_64,
/// 128 KiB on aarch64, whose pages can be 64 KiB); a thread backend fiber's stack is at
/// least this, whatever size was asked for.
pub(crate) fn min_stack() -> usize {
    // SAFETY: sysconf has no preconditions.
    let min = unsafe { libc::sysconf(libc::_SC_THREAD_STACK_MIN) };
    usize::try_from(min).unwrap_or(0)
}

fn pthread_error(call: &'static str, rc: libc::c_int) -> Error {
    Error::Os {
        call,
        source: io::Error::from_raw_os_error(rc),
    }
}

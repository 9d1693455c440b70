//! Getting onto a new stack without `makecontext`: the `sigaltstack` backend's bootstrap.
//!
//! musl has no `makecontext`/`swapcontext`, yet a register switch ([`crate::arch`]) still
//! needs some first way to run code on a fresh stack. POSIX offers one that every libc has,
//! and QEMU's coroutine-sigaltstack.c uses it: make the new stack this thread's alternate
//! signal stack, send the thread a signal whose handler runs `SA_ONSTACK`, and do the work
//! inside that handler, which now runs on the new stack. Here the work is [`arch::bootstrap`]
//! parking the fiber's trampoline; then the handler returns, the kernel switches back to the
//! thread's own stack, and the previous alternate stack and signal mask are put back.
//!
//! The handler's frame and the kernel's signal frame stay at the top of the fiber's stack,
//! dead (a few KiB, more with large vector state); the parked trampoline lives below them and
//! never returns into them. The register switch does not touch the signal mask, so the
//! coroutine later runs with whatever mask its resumer has, not the handler's.
//!
//! The signal is `SIGUSR2`, as in QEMU. The handler is installed once per process and only
//! acts when this thread asked for a bootstrap ([`PENDING`]); a `SIGUSR2` from outside is
//! ignored. A program using this backend therefore gives up `SIGUSR2` for its own use.
//!
//! [`arch::bootstrap`]: crate::arch

use std::cell::Cell;
use std::io;
use std::mem;
use std::ptr;
use std::sync::Once;

use crate::Error;

/// The signal whose handler runs the bootstrap.
const SIGNAL: libc::c_int = libc::SIGUSR2;

/// Work to run on the new stack, and its argument.
type Start = (unsafe fn(*mut u8), *mut u8);

static INSTALL: Once = Once::new();

thread_local! {
    /// Set by [`run_on_stack`] just before it signals its own thread; taken by the handler.
    static PENDING: Cell<Option<Start>> = const { Cell::new(None) };
}

fn install() {
    // SAFETY: sigaction is given a fully initialised action for a signal we own.
    unsafe {
        let mut action: libc::sigaction = mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(SIGNAL, &action, ptr::null_mut());
    }
}

extern "C" fn handler(_sig: libc::c_int) {
    // A thread-local `Cell` with a const initialiser is a plain TLS slot: no lazy
    // initialisation, no lock, so reading it here is async-signal-safe.
    if let Some((start, arg)) = PENDING.take() {
        // SAFETY: `run_on_stack`'s caller vouched for `start(arg)` running on this stack.
        unsafe { start(arg) }
    }
}

/// Runs `start(arg)` on the stack `[bottom, bottom + size)`, inside a signal handler on this
/// thread, and returns once it has returned.
///
/// # Safety
/// `[bottom, bottom + size)` must be writable memory nothing else uses, at least
/// `MINSIGSTKSZ` plus what `start` needs. `start` must return normally (not unwind) and must
/// not rely on anything being left on that stack above its own frame after it returns: what
/// it parks there (a suspended context below its frame) stays valid, the frames above do not.
pub(crate) unsafe fn run_on_stack(
    bottom: *mut u8,
    size: usize,
    start: unsafe fn(*mut u8),
    arg: *mut u8,
) -> Result<(), Error> {
    INSTALL.call_once(install);
    let new = libc::stack_t {
        ss_sp: bottom.cast(),
        ss_flags: 0,
        ss_size: size,
    };
    // SAFETY: all-zero is a valid `stack_t` and `sigset_t`; the calls below only write them.
    let (mut old_stack, mut only_ours, mut old_mask): (
        libc::stack_t,
        libc::sigset_t,
        libc::sigset_t,
    ) = unsafe { mem::zeroed() };
    // SAFETY: the caller hands us the new stack; the old one is saved to be put back.
    if unsafe { libc::sigaltstack(&new, &mut old_stack) } != 0 {
        return Err(Error::last_os("sigaltstack"));
    }
    // The signal must reach this thread now even where the program blocks it (a daemon that
    // reads its signals from a signalfd blocks them all).
    // SAFETY: plain signal-set manipulation on locals.
    unsafe {
        libc::sigemptyset(&mut only_ours);
        libc::sigaddset(&mut only_ours, SIGNAL);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &only_ours, &mut old_mask);
    }
    PENDING.set(Some((start, arg)));
    // A signal a thread sends itself is delivered before the sending call returns.
    // SAFETY: signalling our own thread; the handler is installed.
    let rc = unsafe { libc::pthread_kill(libc::pthread_self(), SIGNAL) };
    let delivered = PENDING.take().is_none();
    // SAFETY: restoring exactly what was saved above (a disabled alternate stack comes back
    // disabled, since `old_stack` carries `SS_DISABLE`).
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, ptr::null_mut());
        libc::sigaltstack(&old_stack, ptr::null_mut());
    }
    if rc != 0 {
        return Err(Error::Os {
            call: "pthread_kill",
            source: io::Error::from_raw_os_error(rc),
        });
    }
    if !delivered {
        return Err(Error::Os {
            call: "pthread_kill",
            source: io::Error::other("SIGUSR2 was not delivered to the bootstrapping thread"),
        });
    }
    Ok(())
}

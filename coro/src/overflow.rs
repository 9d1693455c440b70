//! Reporting coroutine stack overflows.
//!
//! A coroutine that runs off the bottom of its stack hits the `PROT_NONE` guard page and gets
//! SIGSEGV. The faulting stack is unusable, so the handler runs on the thread's alternate
//! signal stack (installed here if the thread has none), checks whether the fault address is
//! the guard page of the coroutine running on this thread, and if so prints
//! "coroutine stack overflow" and aborts. Any other fault is handed back to the handler that
//! was installed before ours (Rust's own, which reports thread stack overflows), by
//! reinstalling it and returning so the faulting instruction runs again under it.

use std::cell::Cell;
use std::mem::{self, MaybeUninit};
use std::ptr;
use std::sync::Once;

use crate::fiber;

static INSTALL: Once = Once::new();
static mut PREVIOUS: MaybeUninit<libc::sigaction> = MaybeUninit::uninit();

/// Size of the alternate signal stack we install on threads that lack one.
const ALT_STACK_SIZE: usize = 64 * 1024;

thread_local! {
    static ALT_STACK: Cell<bool> = const { Cell::new(false) };
}

/// Installs the process-wide handler (once) and this thread's alternate signal stack.
pub(crate) fn ensure_handler() {
    INSTALL.call_once(install);
    if !ALT_STACK.with(Cell::get) {
        ensure_alt_stack();
        ALT_STACK.with(|c| c.set(true));
    }
}

fn install() {
    // SAFETY: sigaction is given a fully initialised action; PREVIOUS is written once,
    // inside `Once`, before the handler that reads it can run.
    unsafe {
        let mut action: libc::sigaction = mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        let prev = &raw mut PREVIOUS;
        libc::sigaction(libc::SIGSEGV, &action, (*prev).as_mut_ptr());
    }
}

fn ensure_alt_stack() {
    // SAFETY: querying the current alternate stack writes only into `old`.
    unsafe {
        let mut old: libc::stack_t = mem::zeroed();
        if libc::sigaltstack(ptr::null(), &mut old) == 0 && old.ss_flags & libc::SS_DISABLE == 0 {
            return; // Rust's runtime (or the embedder) already gave this thread one.
        }
    }
    // Leaked on purpose: a thread's alternate stack must outlive every signal it can take,
    // including during thread-local destructors; 64 KiB per coroutine thread. If it cannot
    // be mapped, an overflow dies with a plain SIGSEGV instead of our message.
    let _ = map_alt_stack();
}

/// Maps an alternate signal stack and installs it for this thread.
fn map_alt_stack() -> Option<*mut libc::c_void> {
    // SAFETY: a fresh anonymous mapping aliases nothing; it becomes the alternate stack only
    // once mapped.
    unsafe {
        let mem = libc::mmap(
            ptr::null_mut(),
            ALT_STACK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if mem == libc::MAP_FAILED {
            return None;
        }
        let st = libc::stack_t {
            ss_sp: mem,
            ss_flags: 0,
            ss_size: ALT_STACK_SIZE,
        };
        libc::sigaltstack(&st, ptr::null_mut());
        Some(mem)
    }
}

/// The alternate signal stack of a thread that ends long before the process does: a
/// coroutine thread of the `thread` backend. Installed with the handler for as long as it
/// lives, then disabled and unmapped, so that creating and finishing many such threads does
/// not leak 64 KiB of address space each.
pub(crate) struct ThreadAltStack(Option<*mut libc::c_void>);

impl ThreadAltStack {
    /// Installs the process-wide handler (once) and a fresh alternate stack on this thread.
    pub(crate) fn install() -> ThreadAltStack {
        INSTALL.call_once(install);
        ALT_STACK.with(|c| c.set(true));
        ThreadAltStack(map_alt_stack())
    }
}

impl Drop for ThreadAltStack {
    fn drop(&mut self) {
        let Some(mem) = self.0 else { return };
        let off = libc::stack_t {
            ss_sp: ptr::null_mut(),
            ss_flags: libc::SS_DISABLE,
            ss_size: 0,
        };
        // SAFETY: the thread is about to exit and runs on its own stack, not this one;
        // after disabling it no signal can use the mapping, which is then ours to unmap.
        unsafe {
            libc::sigaltstack(&off, ptr::null_mut());
            libc::munmap(mem, ALT_STACK_SIZE);
        }
    }
}

/// Writes `msg` to stderr with `write(2)`, the only output that is async-signal-safe.
fn write_stderr(msg: &[u8]) {
    // SAFETY: writing a valid buffer to fd 2.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

fn hex(mut v: usize, out: &mut [u8; 18]) -> &[u8] {
    out[0] = b'0';
    out[1] = b'x';
    for i in (2..18).rev() {
        out[i] = b"0123456789abcdef"[v & 0xf];
        v >>= 4;
    }
    &out[..]
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let cur = fiber::current();
    // SAFETY: a non-null current fiber is alive while it runs on this thread.
    if !cur.is_null() && unsafe { (*cur).stack.guard_contains(addr) } {
        let mut buf = [0u8; 18];
        write_stderr(b"corodev: coroutine stack overflow (fault at ");
        write_stderr(hex(addr, &mut buf));
        write_stderr(
            b" in a guard page); raise the coroutine stack size (--stack-size). Aborting.\n",
        );
        std::process::abort();
    }
    // Not ours: put the previous handler back and return; the fault repeats under it.
    // SAFETY: PREVIOUS was initialised by `install` before this handler was registered.
    unsafe {
        let prev = &raw const PREVIOUS;
        libc::sigaction(sig, (*prev).as_ptr(), ptr::null_mut());
    }
}

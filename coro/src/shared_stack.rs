//! Shared-stack mode: every coroutine of a thread runs on one stack (cloudwu's design).
//!
//! In [`StackMode::Pooled`] each fiber owns an `mmap`'d stack, so a parked coroutine costs
//! at least the pages it touched plus two kernel mappings (the stack and its guard page;
//! `vm.max_map_count` caps a process at about 32K such stacks). In [`StackMode::Shared`] a
//! thread has one guarded stack per stack size, and a fiber owns only a heap *save buffer*
//! holding the bytes it used: from its parked stack pointer up to its outermost live frame
//! (the top of the shared stack, see [`bootstrapped`] for the exception), usually one or
//! two KiB for a request handler.
//!
//! The stack is switched lazily. [`SharedStack`] remembers which fiber's bytes are on it
//! (the *occupant*). Switching into a fiber that is not the occupant first copies the
//! occupant's used bytes out into its buffer (*eviction*), then copies the new fiber's
//! bytes back to the same addresses, so every pointer a coroutine holds into its own stack
//! is valid again when it runs. A coroutine resumed repeatedly with nothing in between
//! costs no copy. A new fiber's bootstrap (its trampoline running up to the first park)
//! happens on the shared stack too, so it evicts the occupant first.
//!
//! What this mode forbids, and how it is enforced:
//! - A coroutine on a shared stack resuming another on the same stack would overwrite its
//!   own live frames: [`enter`] panics instead. Creating one from there would run its
//!   bootstrap over the running frames: `spawn` fails with
//!   [`Error::SharedStackInUse`](crate::Error::SharedStackInUse).
//! - Anything outside a coroutine that points into its stack while it is parked sees
//!   another coroutine's bytes. The I/O API keeps kernel-visible memory off coroutine
//!   stacks by type ([`crate::io::IoBuf`]), copies iovec arrays and timespecs into the
//!   ring's op slots, and refuses buffers inside the current shared stack at run time.
//! - Only register switches (`Fast`, `Sigaltstack`) can share a stack: the switch must
//!   leave the whole parked context below one saved stack pointer
//!   ([`Backend::switches_by_register`]). A `Sigaltstack` bootstrap leaves the dead frame
//!   of the signal handler that ran it (a few KiB, with the FPU state) above the trampoline;
//!   [`bootstrapped`] records where the live frames end, so that frame is never saved.
//!
//! Copies are bounded by checked sizes: a saved stack pointer outside the shared stack,
//! or a save buffer larger than the stack, aborts with a message instead of copying.
//! The boundary: this module moves bytes and tracks occupancy; switching registers stays
//! in [`crate::fiber`], which calls in around a new fiber's bootstrap
//! ([`claim_for_bootstrap`], [`bootstrapped`]), at each switch ([`enter`], [`leave`]) and
//! when a fiber is freed ([`vacate`]).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::fiber::{Backend, Fiber};
use crate::stack::Stack;
use crate::valgrind;
use crate::Error;

/// Where a coroutine's stack lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StackMode {
    /// Each coroutine owns a guarded `mmap`'d stack, kept with its parked fiber in the
    /// per-thread pool. Switches copy nothing; parked coroutines cost their touched pages.
    #[default]
    Pooled,
    /// All coroutines of a thread (per stack size) run on one guarded stack; a parked
    /// coroutine keeps only the bytes it used, copied out to the heap when another one
    /// needs the stack. Needs a register-switch backend (`Fast` or `Sigaltstack`).
    Shared,
}

impl std::str::FromStr for StackMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [StackMode::Pooled, StackMode::Shared]
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::UnknownStackMode { name: s.to_owned() })
    }
}

impl StackMode {
    /// The name `FromStr` accepts and the daemon's `--stack-mode` takes.
    pub fn name(self) -> &'static str {
        match self {
            StackMode::Pooled => "pooled",
            StackMode::Shared => "shared",
        }
    }
}

/// One thread's shared stack for one stack size.
pub(crate) struct SharedStack {
    stack: Stack,
    /// The stack size asked for (the key among this thread's shared stacks).
    requested: usize,
    /// The fiber whose bytes are on the stack now, or null.
    occupant: Cell<*mut Fiber>,
    /// A fiber on this stack is between `enter` and `leave`: its frames are live on the
    /// stack, so nothing may be copied in.
    running: Cell<bool>,
}

thread_local! {
    /// This thread's shared stacks, one per requested size. Fibers hold an `Rc` too, so a
    /// stack outlives the registry during thread-local destruction if a pool still has
    /// fibers on it.
    static SHARED: RefCell<Vec<Rc<SharedStack>>> = const { RefCell::new(Vec::new()) };
}

/// A shared-mode fiber's stack: the thread's shared stack and the fiber's save buffer.
pub(crate) struct SharedSlot {
    stack: Rc<SharedStack>,
    /// The fiber's used bytes while it is not the occupant, `[fiber_sp, live_top)` of the
    /// shared stack; stale while it is the occupant.
    saved: Vec<u8>,
    /// Where the fiber's live frames end: the top of the stack, except after a
    /// `Sigaltstack` bootstrap, which leaves the signal handler's dead frame (with the
    /// kernel's signal frame and FPU state, a few KiB) above the trampoline; saving it
    /// would make every parked coroutine carry it.
    live_top: usize,
}

/// A fiber's stack: its own mapping, or a slot on the thread's shared stack.
pub(crate) enum FiberStack {
    Owned(Stack),
    Shared(SharedSlot),
}

impl FiberStack {
    /// A stack for a new fiber: a fresh mapping, or this thread's shared stack of this size.
    pub(crate) fn new(mode: StackMode, size: usize) -> Result<FiberStack, Error> {
        Ok(match mode {
            StackMode::Pooled => FiberStack::Owned(Stack::new(size)?),
            StackMode::Shared => {
                let stack = thread_stack(size)?;
                let live_top = stack.stack.top() as usize;
                FiberStack::Shared(SharedSlot {
                    stack,
                    saved: Vec::new(),
                    live_top,
                })
            }
        })
    }

    /// The mapping the fiber runs on (for `Thread`, which never shares, its own).
    pub(crate) fn mapping(&self) -> &Stack {
        match self {
            FiberStack::Owned(s) => s,
            FiberStack::Shared(s) => &s.stack.stack,
        }
    }

    pub(crate) fn mode(&self) -> StackMode {
        match self {
            FiberStack::Owned(_) => StackMode::Pooled,
            FiberStack::Shared(_) => StackMode::Shared,
        }
    }

    /// Lowest usable address of the stack the fiber runs on.
    pub(crate) fn bottom(&self) -> *mut u8 {
        self.mapping().bottom()
    }

    /// Highest address (exclusive) of the stack the fiber runs on.
    pub(crate) fn top(&self) -> *mut u8 {
        self.mapping().top()
    }

    /// Usable bytes of the stack the fiber runs on.
    pub(crate) fn usable(&self) -> usize {
        self.mapping().usable()
    }

    /// Whether `addr` is in the guard page of the stack the fiber runs on (async-signal-safe:
    /// the overflow handler calls it).
    pub(crate) fn guard_contains(&self, addr: usize) -> bool {
        self.mapping().guard_contains(addr)
    }
}

/// This thread's shared stack of `size`, mapped on first use.
fn thread_stack(size: usize) -> Result<Rc<SharedStack>, Error> {
    SHARED.with(|reg| {
        let mut reg = reg.borrow_mut();
        if let Some(s) = reg.iter().find(|s| s.requested == size) {
            return Ok(s.clone());
        }
        let s = Rc::new(SharedStack {
            stack: Stack::new(size)?,
            requested: size,
            occupant: Cell::new(std::ptr::null_mut()),
            running: Cell::new(false),
        });
        reg.push(s.clone());
        Ok(s)
    })
}

/// Whether a coroutine of this kind can be created here and now: shared mode needs a
/// register switch, and no coroutine of this thread's shared stack of `size` may be
/// running (the caller would be that coroutine, and a new fiber's bootstrap, or any
/// later resume from it, would overwrite its frames).
pub(crate) fn check_spawn(backend: Backend, mode: StackMode, size: usize) -> Result<(), Error> {
    if mode == StackMode::Pooled {
        return Ok(());
    }
    if !backend.switches_by_register() {
        return Err(Error::StackModeUnsupported { backend, mode });
    }
    let busy = SHARED.with(|reg| {
        reg.borrow()
            .iter()
            .any(|s| s.requested == size && s.running.get())
    });
    if busy {
        return Err(Error::SharedStackInUse { stack_size: size });
    }
    Ok(())
}

/// Before a new fiber's bootstrap runs on its stack: for a shared stack, evicts the
/// occupant and records `f` as the occupant (its bootstrap is about to leave its parked
/// trampoline there).
///
/// # Safety
/// `f` must be a live fiber fresh from `Fiber::new`, not yet bootstrapped, and no fiber on
/// its shared stack may be running (checked by [`check_spawn`]).
pub(crate) unsafe fn claim_for_bootstrap(f: *mut Fiber) {
    // SAFETY: `f` is live per the contract.
    let FiberStack::Shared(slot) = (unsafe { &(*f).stack }) else {
        return;
    };
    let s = slot.stack.clone();
    assert!(
        !s.running.get(),
        "coro: bootstrap on a shared stack that is in use (check_spawn was bypassed)"
    );
    // SAFETY: nothing runs on the stack (checked above), so the occupant is parked.
    unsafe { s.evict() };
    s.occupant.set(f);
}

/// After a new fiber's bootstrap parked its trampoline: for a shared-mode fiber whose
/// bootstrap left a dead frame above the trampoline (`Sigaltstack`: the signal handler that
/// ran it, whose stack pointer the bootstrap saved in `caller_sp`), the live bytes end
/// there. A `Fast` bootstrap saved the creator's stack pointer, outside the shared stack:
/// its trampoline's frames reach the top.
///
/// # Safety
/// `f` must be a live fiber whose bootstrap has just parked it, not yet resumed.
pub(crate) unsafe fn bootstrapped(f: *mut Fiber) {
    // SAFETY: `f` is live and parked per the contract; nothing else touches it.
    let (slot, caller) = unsafe {
        let caller = (*f).caller_sp as usize;
        let FiberStack::Shared(slot) = &mut (*f).stack else {
            return;
        };
        (slot, caller)
    };
    let (bottom, top) = (
        slot.stack.stack.bottom() as usize,
        slot.stack.stack.top() as usize,
    );
    if (bottom..top).contains(&caller) {
        slot.live_top = caller;
    }
}

/// Before switching into `f`: for a shared-mode fiber, makes its bytes resident and marks
/// its stack running until `f` switches out ([`leave`]).
///
/// # Panics
/// When a coroutine running on the same shared stack resumes `f`: restoring `f` would
/// overwrite the resumer's own frames.
///
/// # Safety
/// `f` must be a live parked fiber that is about to be switched into on this thread.
#[inline(always)]
pub(crate) unsafe fn enter(f: *mut Fiber) {
    // SAFETY: `f` is live per the contract.
    let FiberStack::Shared(slot) = (unsafe { &(*f).stack }) else {
        return;
    };
    let s = &*slot.stack;
    if s.running.get() {
        refuse_nested_resume();
    }
    if s.occupant.get() != f {
        // SAFETY: nothing runs on the stack (checked above); `f` is parked.
        unsafe { s.make_resident(f) };
    }
    s.running.set(true);
}

/// As `f` switches out to its resumer (on `f`'s stack, just before the switch): its shared
/// stack, if any, is no longer running. Done on this side so that the resumer carries
/// nothing across the switch (a value live across it costs a spill and a reload).
///
/// # Safety
/// `f` must be the live fiber running this code.
#[inline(always)]
pub(crate) unsafe fn leave(f: *mut Fiber) {
    // SAFETY: `f` is live per the contract.
    if let FiberStack::Shared(slot) = unsafe { &(*f).stack } {
        slot.stack.running.set(false);
    }
}

/// Before `f` is freed: a destroyed occupant leaves nothing to evict.
///
/// # Safety
/// `f` must be a live parked fiber that is about to be freed.
pub(crate) unsafe fn vacate(f: *mut Fiber) {
    // SAFETY: `f` is live per the contract.
    if let FiberStack::Shared(slot) = unsafe { &(*f).stack } {
        if slot.stack.occupant.get() == f {
            slot.stack.occupant.set(std::ptr::null_mut());
        }
    }
}

/// The usable range `[bottom, top)` of the shared stack the current coroutine runs on, or
/// `None` outside a coroutine or on an owned stack; for the I/O buffer checks.
pub(crate) fn current_range() -> Option<(usize, usize)> {
    let f = crate::fiber::current();
    if f.is_null() {
        return None;
    }
    // SAFETY: the current fiber is alive while it runs on this thread.
    match unsafe { &(*f).stack } {
        FiberStack::Owned(_) => None,
        FiberStack::Shared(slot) => {
            let st = &slot.stack.stack;
            Some((st.bottom() as usize, st.top() as usize))
        }
    }
}

#[cold]
#[inline(never)]
fn refuse_nested_resume() -> ! {
    panic!(
        "coro: a coroutine on the shared stack resumed another coroutine on the same shared \
         stack, which would overwrite its own frames; resume it from outside any coroutine \
         (e.g. wake it through the scheduler) or use StackMode::Pooled"
    )
}

/// Stops the process over a copy that would go out of bounds: the fiber's state is
/// corrupt, and copying anyway would overwrite unrelated memory.
#[cold]
#[inline(never)]
fn fatal(what: std::fmt::Arguments<'_>) -> ! {
    eprintln!("corodev: shared coroutine stack: {what}. Aborting.");
    std::process::abort()
}

impl SharedStack {
    /// Copies the occupant's used bytes into its save buffer and clears the occupancy.
    ///
    /// # Safety
    /// No fiber may be running on this stack; the occupant, if any, must be live and
    /// parked (its saved stack pointer current).
    unsafe fn evict(&self) {
        let occ = self.occupant.replace(std::ptr::null_mut());
        if occ.is_null() {
            return;
        }
        let bottom = self.stack.bottom() as usize;
        // SAFETY: the occupant is live and parked per the contract; no one else touches a
        // parked fiber's stack slot.
        let (sp, slot) = unsafe {
            let sp = (*occ).fiber_sp as usize;
            let FiberStack::Shared(slot) = &mut (*occ).stack else {
                fatal(format_args!(
                    "the occupant of a shared stack has a stack of its own"
                ));
            };
            (sp, slot)
        };
        let top = slot.live_top;
        if !(bottom..=top).contains(&sp) || top > self.stack.top() as usize {
            fatal(format_args!(
                "saved stack pointer {sp:#x} of the fiber being evicted lies outside the \
                 shared stack [{bottom:#x}, {top:#x})"
            ));
        }
        let used = top - sp;
        // Sized to the used bytes: reuse the buffer unless it is short or over a quarter
        // too large (a handler that once ran deep must not keep that much once pooled).
        let cap = slot.saved.capacity();
        if cap < used || cap - used > used / 4 {
            slot.saved = Vec::with_capacity(used);
        }
        // SAFETY: `[sp, top)` is inside the mapped, usable stack (checked above) and holds
        // the parked occupant's live frames; the buffer has room for `used` bytes and does not
        // overlap the stack (it is a heap allocation).
        unsafe {
            std::ptr::copy_nonoverlapping(sp as *const u8, slot.saved.as_mut_ptr(), used);
            slot.saved.set_len(used);
        }
    }

    /// Evicts the occupant and copies `f`'s saved bytes back to where they were.
    ///
    /// # Safety
    /// As for [`evict`](Self::evict); `f` must be a live parked fiber on this stack.
    #[inline(never)]
    unsafe fn make_resident(&self, f: *mut Fiber) {
        // SAFETY: per the contract.
        unsafe { self.evict() };
        // SAFETY: `f` is live and parked; only its own slot is read.
        let (saved, sp, top) = unsafe {
            let FiberStack::Shared(slot) = &(*f).stack else {
                fatal(format_args!("a fiber made resident has a stack of its own"));
            };
            (&slot.saved, (*f).fiber_sp as usize, slot.live_top)
        };
        let len = saved.len();
        let bottom = self.stack.bottom() as usize;
        if top > self.stack.top() as usize
            || top
                .checked_sub(len)
                .is_none_or(|at| at < bottom || at != sp)
        {
            fatal(format_args!(
                "save buffer of {len} bytes does not fit the parked stack pointer {sp:#x} \
                 below the top {top:#x} ({} usable bytes)",
                self.stack.usable()
            ));
        }
        // Memcheck took what lies below the last occupant's stack pointer for popped stack
        // (inaccessible); these bytes are live again. The copy then carries the saved
        // bytes' own definedness over.
        valgrind::make_defined(sp as *mut u8, len);
        // SAFETY: `[sp, sp + len) = [top - len, top)` is inside the usable stack (checked
        // above), nothing runs on it, and the buffer is a separate heap allocation of `len`
        // bytes.
        unsafe { std::ptr::copy_nonoverlapping(saved.as_ptr(), sp as *mut u8, len) };
        self.occupant.set(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle fiber (parked in its trampoline, as in the pool) keeps only the trampoline's
    /// frames once evicted: a few hundred bytes, and for `Sigaltstack` without the dead
    /// signal frame its bootstrap left above them (saving that took 5 KiB per coroutine).
    #[test]
    fn evicted_idle_fiber_saves_only_its_trampoline() {
        const SIZE: usize = 64 * 1024;
        for backend in [Backend::Fast, Backend::Sigaltstack] {
            if !backend.switches_by_register() {
                continue;
            }
            let a = Fiber::acquire(backend, StackMode::Shared, SIZE, false).expect("fiber a");
            // Bootstrapping `b` on the same shared stack evicts `a`.
            let b = Fiber::acquire(backend, StackMode::Shared, SIZE, false).expect("fiber b");
            // SAFETY: `a` is a live parked fiber that this test owns.
            let saved = match unsafe { &(*a.as_ptr()).stack } {
                FiberStack::Shared(slot) => slot.saved.len(),
                FiberStack::Owned(_) => unreachable!("acquired in shared mode"),
            };
            assert!(
                saved > 0 && saved <= 1024,
                "{backend:?}: {saved} bytes saved"
            );
            // SAFETY: both are parked in their trampolines with no job, acquired unpooled
            // with this size; neither is used again.
            unsafe {
                Fiber::release(a, false, SIZE);
                Fiber::release(b, false, SIZE);
            }
        }
    }
}

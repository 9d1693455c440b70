//! Fibers: a stack with a parked trampoline that runs one job after another.
//!
//! A [`Coroutine`](crate::Coroutine) is a job running on a fiber. The trampoline
//! ([`fiber_main`]) loops forever: park, run the job it was handed, mark it finished, park
//! again. Because the trampoline never exits, a finished fiber goes back to a per-thread pool
//! still parked, and the next coroutine starts on it with a single switch: no `mmap`, no
//! `makecontext`, no allocation (the closure and its result live in the fiber's
//! [`Payload`]). This is QEMU's coroutine pool idea applied to the trampoline, not only the
//! stack.
//!
//! Switch backends ([`Backend`]) differ only in [`switch_in`]/[`switch_out`] and in how a new
//! fiber first reaches its park point ([`Fiber::new`]).
//!
//! Everything here is raw-pointer code shared by two stacks; the safe surface is
//! [`crate::coroutine`].

use std::cell::{Cell, RefCell};
use std::mem::{self, MaybeUninit};
use std::ptr::{self, NonNull};

use crate::arch;
use crate::overflow;
use crate::stack::Stack;
use crate::Error;

/// How the CPU moves between a coroutine and its resumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `makecontext` once per new stack, then a register-only switch with no syscall.
    /// x86_64 only; elsewhere it behaves as `Ucontext`.
    Fast,
    /// `swapcontext` for every switch: portable to any libc with ucontext, but each switch
    /// costs an `rt_sigprocmask` syscall.
    Ucontext,
}

impl Default for Backend {
    fn default() -> Self {
        if arch::HAS_FAST {
            Backend::Fast
        } else {
            Backend::Ucontext
        }
    }
}

impl Backend {
    /// The backend actually used when this one is asked for on this architecture.
    pub fn effective(self) -> Backend {
        if arch::HAS_FAST {
            self
        } else {
            Backend::Ucontext
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fast" => Ok(Backend::Fast),
            "ucontext" => Ok(Backend::Ucontext),
            other => Err(Error::UnknownBackend {
                name: other.to_owned(),
            }),
        }
    }
}

/// Inline payload size: room for a request closure of a few dozen captured words (the
/// daemon's captures a worker handle, a descriptor chain and guest memory) so that a pooled
/// start allocates nothing; a larger closure or result costs one `Box`.
const PAYLOAD_BYTES: usize = 256;

/// Inline storage for a job's closure and then its result; larger values are boxed.
/// 16-byte alignment covers every type the inline path accepts ([`Payload::fits`]).
#[repr(C, align(16))]
pub(crate) struct Payload([MaybeUninit<u8>; PAYLOAD_BYTES]);

impl Payload {
    const fn fits<V>() -> bool {
        mem::size_of::<V>() <= PAYLOAD_BYTES && mem::align_of::<V>() <= 16
    }

    /// # Safety
    /// `p` must be valid for writes and hold no live value.
    pub(crate) unsafe fn write<V>(p: *mut Payload, v: V) {
        if Self::fits::<V>() {
            // SAFETY: `V` fits in size and alignment (checked above); the caller owns `p`.
            unsafe { p.cast::<V>().write(v) }
        } else {
            // SAFETY: a `Box<V>` is one pointer, which always fits.
            unsafe { p.cast::<Box<V>>().write(Box::new(v)) }
        }
    }

    /// # Safety
    /// `p` must hold a live `V` written by [`Payload::write`]; it is moved out.
    pub(crate) unsafe fn read<V>(p: *mut Payload) -> V {
        if Self::fits::<V>() {
            // SAFETY: the caller guarantees a `V` was written inline here.
            unsafe { p.cast::<V>().read() }
        } else {
            // SAFETY: the caller guarantees a boxed `V` was written here.
            unsafe { *p.cast::<Box<V>>().read() }
        }
    }
}

/// Contexts for the `Ucontext` backend, and for the `Fast` backend's one-time bootstrap.
/// Boxed because glibc's `ucontext_t` points into itself and must not move.
struct UcPair {
    fiber: libc::ucontext_t,
    caller: libc::ucontext_t,
}

/// The shared control block of one fiber. Both stacks reach it through a raw pointer; a
/// field is only touched by the side that is currently running.
pub(crate) struct Fiber {
    /// `Fast`: the parked fiber's stack pointer, written by the switch that parks it.
    fiber_sp: *mut u8,
    /// `Fast`: the resumer's stack pointer while the fiber runs, for `switch_out`.
    caller_sp: *mut u8,
    /// `Ucontext`: both contexts for every switch. `Fast`: only until the bootstrap has
    /// parked the trampoline, then dropped.
    uc: Option<Box<UcPair>>,
    /// Already [`Backend::effective`], so the switch never needs the architecture check.
    backend: Backend,
    /// The job to run next, set by [`Fiber::start`]; runs the closure in the payload.
    job: Option<unsafe fn(*mut Fiber)>,
    /// Drops a job's closure that never ran.
    drop_job: Option<unsafe fn(*mut Fiber)>,
    /// Set by the trampoline when the job has returned (its result is in the payload).
    finished: bool,
    /// Set by the resumer to make the next `yield` unwind (dropping a suspended coroutine).
    pub(crate) cancel: bool,
    pub(crate) stack: Stack,
    pub(crate) payload: Payload,
}

thread_local! {
    /// The fiber running on this thread right now (null on the thread's own stack). Read by
    /// `yield_now` and by the stack-overflow signal handler.
    ///
    /// # Why thread-locals may be cached across a switch here
    /// QEMU's coroutine-ucontext.c marks its TLS accessors `noinline` because a QEMU
    /// coroutine can yield on one thread and be resumed on another: the compiler, not
    /// knowing that a switch can change threads, may compute a thread-local's address
    /// before the switch and use it after, reaching the old thread's variable.
    ///
    /// That cannot happen here, because a fiber only ever runs on the thread that created
    /// it. `switch_in` is reached only from `Coroutine::resume` and `Coroutine`'s `Drop`,
    /// and `Coroutine` is `!Send` and `!Sync` (a `*mut ()` marker, with a `compile_fail`
    /// test), so those run on the thread that made the handle, which is where
    /// `Builder::spawn` took the fiber. `switch_out` returns to that same resumer. The
    /// `Scheduler` that owns tasks holds them behind an `Rc` and is `!Send` too. And a
    /// finished fiber goes back to `POOLS`, which is thread-local, so even its parked
    /// trampoline is only ever picked up again by the same thread. Hence `switch_in` can
    /// stay `#[inline(always)]` with the `CURRENT` accesses around the switch inlined into
    /// it; making `Coroutine` `Send` or sharing the pool between threads would require
    /// QEMU's fix (re-reading every thread-local through a non-inlined call after a switch).
    static CURRENT: Cell<*mut Fiber> = const { Cell::new(ptr::null_mut()) };
    /// This thread's parked fibers, one pool per (backend, stack size). Thread-local because a
    /// fiber never leaves the thread that created it (see `CURRENT`); dropped with the
    /// thread, which unmaps the stacks.
    static POOLS: RefCell<Vec<Pool>> = const { RefCell::new(Vec::new()) };
}

/// Idle parked fibers of one (backend, stack size) kind.
struct Pool {
    backend: Backend,
    stack_size: usize,
    idle: Vec<NonNull<Fiber>>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        for f in self.idle.drain(..) {
            // SAFETY: pooled fibers are parked with no job; nothing on their stacks is live.
            unsafe { Fiber::destroy(f) };
        }
    }
}

/// Idle fibers kept per kind and thread. Enough for a queue's worth of requests in flight
/// (QEMU keeps 64 per thread plus a shared batch); beyond this stacks are unmapped on finish.
pub const POOL_MAX: usize = 1024;

/// The fiber currently running on this thread, or null.
pub(crate) fn current() -> *mut Fiber {
    CURRENT.with(Cell::get)
}

/// Number of idle pooled fibers on this thread (all kinds); for tests and metrics.
pub fn pool_idle_count() -> usize {
    POOLS.with(|p| p.borrow().iter().map(|p| p.idle.len()).sum())
}

/// The `makecontext` entry point: splits the fiber pointer back out of two `int`s (all
/// `makecontext` can pass on 64-bit, as in cloudwu's library) and runs the trampoline.
extern "C" fn fiber_entry(lo: libc::c_uint, hi: libc::c_uint) {
    let addr = ((hi as usize) << 32) | lo as usize;
    fiber_main(addr as *mut Fiber)
}

/// The trampoline: park, run a job, mark it finished, repeat. Never returns, because the
/// `makecontext` frame has no `uc_link` to return to. Jobs catch their own panics; were one
/// to escape, the `extern "C"` boundary above aborts rather than unwinding off the stack.
fn fiber_main(f: *mut Fiber) -> ! {
    loop {
        // SAFETY: `f` stays valid for as long as this trampoline can run: a fiber is only
        // destroyed while parked here with no job.
        unsafe {
            switch_out(f);
            if let Some(job) = (*f).job.take() {
                (*f).drop_job = None;
                job(f);
            }
            (*f).finished = true;
        }
    }
}

/// For the `Fast` backend: leave the creator's stack for the `makecontext`-prepared one.
/// Called by [`arch::bootstrap`] on the creator's stack, below the context it saved.
///
/// # Safety
/// `f` must point to a live [`Fiber`] set up by [`Fiber::new`] and not yet entered: `uc` is
/// `Some` with `uc.fiber` prepared by `makecontext` on the fiber's own stack, and
/// `caller_sp` holds the creator's context saved by the `bootstrap` that calls this, so that
/// the trampoline's first [`switch_out`] has somewhere to return to. Nothing else may use
/// the fiber until that switch.
unsafe extern "C" fn enter_fiber(f: *mut u8) -> ! {
    let f = f.cast::<Fiber>();
    // SAFETY: `uc` was prepared by `makecontext` in `Fiber::new` and lives in a Box.
    unsafe {
        if let Some(uc) = (*f).uc.as_ref() {
            libc::setcontext(&uc.fiber);
        }
    }
    // setcontext only returns on failure, which leaves no sane state to continue from.
    std::process::abort()
}

/// Runs the job (closure `F` in the payload) and stores its outcome, panics included, so
/// that no unwind crosses the trampoline.
///
/// # Safety
/// `f` must be the fiber this runs on, called from its trampoline, and its payload must hold
/// the live `F` written by [`Fiber::start::<F, T>`](Fiber::start) (the same `F` and `T`).
/// On return the payload holds a `std::thread::Result<T>` that the owner must move out with
/// [`Payload::read`] before the fiber is released.
unsafe fn run_job<F, T>(f: *mut Fiber)
where
    F: FnOnce() -> T,
{
    // SAFETY: `start::<F, T>` wrote an `F` into the payload and installed this job.
    let closure: F = unsafe { Payload::read(&raw mut (*f).payload) };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(closure));
    // SAFETY: the closure was moved out above, so the payload is free.
    unsafe { Payload::write::<std::thread::Result<T>>(&raw mut (*f).payload, outcome) };
}

/// Drops the closure of a job that never ran (installed next to [`run_job`] by
/// [`Fiber::start`], used by [`Fiber::discard_job`]).
///
/// # Safety
/// `f` must be a valid fiber that is not running, whose payload holds the live `F` written
/// by `Fiber::start::<F, _>`. The payload is empty afterwards.
unsafe fn drop_job<F>(f: *mut Fiber) {
    // SAFETY: installed only alongside an `F` written into the payload that has not run.
    drop(unsafe { Payload::read::<F>(&raw mut (*f).payload) });
}

impl Fiber {
    /// Takes a parked fiber of this kind from the pool, or makes a new one.
    pub(crate) fn acquire(
        backend: Backend,
        stack_size: usize,
        pooled: bool,
    ) -> Result<NonNull<Fiber>, Error> {
        let backend = backend.effective();
        if pooled {
            let hit = POOLS.with(|p| {
                p.borrow_mut()
                    .iter_mut()
                    .find(|p| p.backend == backend && p.stack_size == stack_size)
                    .and_then(|p| p.idle.pop())
            });
            if let Some(f) = hit {
                return Ok(f);
            }
        }
        Fiber::new(backend, stack_size)
    }

    /// Returns a finished fiber to the pool, or unmaps it when the pool is full.
    ///
    /// # Safety
    /// `f` must be parked in its trampoline with no job and no live payload, on the thread
    /// that created it, and `stack_size` must be the size it was acquired with (the pool is
    /// keyed by it). The caller gives `f` up: it may be reused or unmapped at once.
    pub(crate) unsafe fn release(f: NonNull<Fiber>, pooled: bool, stack_size: usize) {
        // SAFETY: the caller guarantees `f` is a valid parked fiber.
        let backend = unsafe { (*f.as_ptr()).backend };
        let kept = pooled
            && POOLS
                .try_with(|p| {
                    let mut pools = p.borrow_mut();
                    let pos = match pools
                        .iter()
                        .position(|p| p.backend == backend && p.stack_size == stack_size)
                    {
                        Some(pos) => pos,
                        None => {
                            pools.push(Pool {
                                backend,
                                stack_size,
                                idle: Vec::new(),
                            });
                            pools.len() - 1
                        }
                    };
                    let pool = &mut pools[pos];
                    if pool.idle.len() < POOL_MAX {
                        pool.idle.push(f);
                        true
                    } else {
                        false
                    }
                })
                .unwrap_or(false);
        if !kept {
            // SAFETY: as guaranteed by the caller.
            unsafe { Fiber::destroy(f) };
        }
    }

    /// Maps a stack and runs a new trampoline on it up to its first park.
    fn new(backend: Backend, stack_size: usize) -> Result<NonNull<Fiber>, Error> {
        overflow::ensure_handler();
        let stack = Stack::new(stack_size)?;
        let f = Box::into_raw(Box::new(Fiber {
            fiber_sp: ptr::null_mut(),
            caller_sp: ptr::null_mut(),
            uc: None,
            backend,
            job: None,
            drop_job: None,
            finished: false,
            cancel: false,
            stack,
            payload: Payload([MaybeUninit::uninit(); PAYLOAD_BYTES]),
        }));
        // SAFETY: ucontext_t is plain data for which all-zero is a valid (empty) value;
        // getcontext fills it before use.
        let uc = Box::new(unsafe { mem::zeroed::<UcPair>() });
        // SAFETY: `f` came from Box::into_raw and is exclusively ours until parked. `uc`
        // borrows the boxed pair now owned by the fiber: glibc's ucontext_t points into
        // itself, and a Box's contents stay put when the Box moves.
        unsafe {
            let uc: &mut UcPair = (*f).uc.insert(uc);
            if libc::getcontext(&mut uc.fiber) != 0 {
                let err = Error::last_os("getcontext");
                drop(Box::from_raw(f));
                return Err(err);
            }
            uc.fiber.uc_stack.ss_sp = (*f).stack.bottom().cast();
            uc.fiber.uc_stack.ss_size = (*f).stack.usable();
            uc.fiber.uc_link = ptr::null_mut();
            let addr = f as usize;
            // SAFETY: makecontext passes its variadic `int`s to the entry point, whose real
            // signature is (c_uint, c_uint); the transmute only erases the parameter list,
            // as the C API requires.
            let entry = mem::transmute::<extern "C" fn(libc::c_uint, libc::c_uint), extern "C" fn()>(
                fiber_entry,
            );
            libc::makecontext(
                &mut uc.fiber,
                entry,
                2,
                addr as libc::c_uint,
                (addr >> 32) as libc::c_uint,
            );
            match backend {
                Backend::Fast => {
                    arch_bootstrap(f);
                    // The trampoline now parks with the fast switch; the ucontexts are done.
                    (*f).uc = None;
                }
                Backend::Ucontext => {
                    libc::swapcontext(&mut uc.caller, &uc.fiber);
                }
            }
            Ok(NonNull::new_unchecked(f))
        }
    }

    /// Unmaps a parked fiber.
    ///
    /// # Safety
    /// `f` must be parked with no job and no live payload, and never used again.
    unsafe fn destroy(f: NonNull<Fiber>) {
        // SAFETY: per the contract, nothing on the stack is live; dropping unmaps it.
        drop(unsafe { Box::from_raw(f.as_ptr()) });
    }

    /// Hands a parked fiber its next job: the closure `job`, whose result type is `T`.
    ///
    /// # Safety
    /// `f` must be parked with no job and an empty payload.
    pub(crate) unsafe fn start<F, T>(f: *mut Fiber, job: F)
    where
        F: FnOnce() -> T,
    {
        // SAFETY: the caller guarantees the payload is empty and `f` is exclusively ours.
        unsafe {
            Payload::write(&raw mut (*f).payload, job);
            (*f).job = Some(run_job::<F, T>);
            (*f).drop_job = Some(drop_job::<F>);
            (*f).finished = false;
            (*f).cancel = false;
        }
    }

    /// Whether the job handed to this fiber has returned. Read after each switch back.
    ///
    /// # Safety
    /// `f` must be a valid fiber that is parked (not running).
    pub(crate) unsafe fn is_finished(f: *mut Fiber) -> bool {
        // SAFETY: per the contract, nothing writes the flag concurrently.
        unsafe { (*f).finished }
    }

    /// Drops the closure of a job that was started but never resumed.
    ///
    /// # Safety
    /// `f` must be parked with a job installed by [`Fiber::start`] that has not run.
    pub(crate) unsafe fn discard_job(f: *mut Fiber) {
        // SAFETY: per the contract the payload holds the unrun closure.
        unsafe {
            (*f).job = None;
            if let Some(d) = (*f).drop_job.take() {
                d(f);
            }
        }
    }
}

/// Runs a new `Fast` fiber's trampoline up to its first park, through [`enter_fiber`]. On
/// return `fiber_sp` holds the parked trampoline and `uc` is no longer needed.
///
/// # Safety
/// `f` must point to a live fiber fresh from [`Fiber::new`]: `uc.fiber` prepared by
/// `makecontext` for the trampoline on the fiber's stack, never entered, and the `Fast`
/// backend recorded, so the trampoline parks with the register switch that returns here.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
unsafe fn arch_bootstrap(f: *mut Fiber) {
    // SAFETY: `enter_fiber` never returns; the trampoline's first `switch_out` resumes us.
    unsafe { arch::bootstrap(&raw mut (*f).caller_sp, enter_fiber, f.cast()) }
}

/// Stands in where there is no register switch; never reached.
///
/// # Safety
/// None needed; it only panics. It is `unsafe` to match the x86_64 and aarch64 version,
/// whose contract callers must follow. [`Backend::effective`] never yields `Fast` on this
/// architecture.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
unsafe fn arch_bootstrap(_f: *mut Fiber) {
    unreachable!("Backend::effective never yields Fast without an arch switch")
}

/// Resumer -> fiber. Makes `f` the thread's current fiber for the duration and restores the
/// previous one (coroutines may resume coroutines) when the fiber switches back.
///
/// # Safety
/// `f` must be a valid parked fiber that is not already running, and this must be the
/// thread that created it: its stack may hold references into this thread's thread-locals,
/// and `CURRENT` is per thread.
#[inline(always)]
pub(crate) unsafe fn switch_in(f: *mut Fiber) {
    let prev = CURRENT.with(|c| c.replace(f));
    // SAFETY: per the contract; the saved contexts belong to `f`.
    unsafe {
        match (*f).backend {
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            Backend::Fast => arch::switch(&raw mut (*f).caller_sp, (*f).fiber_sp),
            _ => {
                if let Some(uc) = (*f).uc.as_deref_mut() {
                    libc::swapcontext(&mut uc.caller, &uc.fiber);
                }
            }
        }
    }
    CURRENT.with(|c| c.set(prev));
}

/// Fiber -> its resumer.
///
/// # Safety
/// Must run on `f`'s own stack, `f` having been entered by [`switch_in`] or its bootstrap.
#[inline(always)]
pub(crate) unsafe fn switch_out(f: *mut Fiber) {
    // SAFETY: per the contract; the resumer's context was saved when it entered us.
    unsafe {
        match (*f).backend {
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            Backend::Fast => arch::switch(&raw mut (*f).fiber_sp, (*f).caller_sp),
            _ => {
                if let Some(uc) = (*f).uc.as_deref_mut() {
                    libc::swapcontext(&mut uc.fiber, &uc.caller);
                }
            }
        }
    }
}

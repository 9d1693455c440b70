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
//! fiber first reaches its park point ([`Fiber::new`]):
//!
//! | backend | first park | every switch |
//! |---|---|---|
//! | `Fast` | `makecontext` + one `setcontext` | register switch ([`arch`]) |
//! | `Sigaltstack` | a signal handler on the new stack ([`signal_stack`]) | register switch |
//! | `Ucontext` | `makecontext` | `swapcontext` |
//! | `Thread` | `pthread_create` on the fiber's stack | baton hand-off ([`thread_switch`]) |
//!
//! Everything here is raw-pointer code shared by two stacks; the safe surface is
//! [`crate::coroutine`].

use std::cell::{Cell, RefCell};
use std::mem::{self, MaybeUninit};
use std::ptr::{self, NonNull};

use crate::arch;
use crate::overflow;
use crate::sched;
use crate::shared_stack::{self, FiberStack, StackMode};
use crate::signal_stack;
use crate::thread_switch::{self, Baton, CoThread};
use crate::valgrind;
use crate::Error;

/// How the CPU moves between a coroutine and its resumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `makecontext` once per new stack, then a register-only switch with no syscall.
    /// Needs an architecture with a register switch (x86_64, aarch64) and a libc with
    /// `makecontext` (glibc); elsewhere it behaves as [`Backend::effective`] says.
    Fast,
    /// The same register switch as `Fast`, but a new stack is entered the way QEMU's
    /// coroutine-sigaltstack does it, from a signal handler running on it, so no
    /// `makecontext` is needed: the backend for musl. Takes `SIGUSR2` for itself.
    Sigaltstack,
    /// `swapcontext` for every switch: portable to any libc with ucontext (not musl), but
    /// each switch costs an `rt_sigprocmask` syscall.
    Ucontext,
    /// Every coroutine is an OS thread and a switch hands a baton between two threads:
    /// slow on purpose, for debuggers, Valgrind's thread tools and sanitizers, which
    /// understand threads but not stack switching.
    Thread,
}

/// Whether this build's libc has `makecontext`/`swapcontext` (glibc does, musl does not).
const HAS_UCONTEXT: bool = cfg!(target_env = "gnu");

impl Default for Backend {
    fn default() -> Self {
        Backend::Fast.effective()
    }
}

impl Backend {
    /// Every backend, in the order they are documented.
    pub const ALL: [Backend; 4] = [
        Backend::Fast,
        Backend::Sigaltstack,
        Backend::Ucontext,
        Backend::Thread,
    ];

    /// The backend actually used when this one is asked for in this build. Without a
    /// register switch for the architecture, `Fast` and `Sigaltstack` become `Ucontext`
    /// (or `Thread` without ucontext); without `makecontext`, `Fast` becomes `Sigaltstack`.
    /// `Ucontext` without ucontext stays itself and fails to spawn
    /// ([`Error::BackendUnavailable`]): asked for by name, it is not silently replaced.
    pub fn effective(self) -> Backend {
        let no_register_switch = if HAS_UCONTEXT {
            Backend::Ucontext
        } else {
            Backend::Thread
        };
        match self {
            Backend::Fast | Backend::Sigaltstack if !arch::HAS_FAST => no_register_switch,
            Backend::Fast if !HAS_UCONTEXT => Backend::Sigaltstack,
            other => other,
        }
    }

    /// The name `FromStr` accepts and the daemon's `--coroutine-backend` takes.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Fast => "fast",
            Backend::Sigaltstack => "sigaltstack",
            Backend::Ucontext => "ucontext",
            Backend::Thread => "thread",
        }
    }

    /// Whether this build can run the backend (after [`effective`](Self::effective)), and
    /// if not, why.
    pub fn check(self) -> Result<Backend, Error> {
        match self.effective() {
            Backend::Ucontext if !HAS_UCONTEXT => Err(Error::BackendUnavailable {
                backend: self.name(),
                why: "this libc has no makecontext/swapcontext (musl); use sigaltstack or thread",
            }),
            b => Ok(b),
        }
    }

    /// Whether this backend (as [`effective`](Self::effective) on this architecture)
    /// switches by saving registers below one stack pointer, so that a parked context is
    /// exactly the bytes from that pointer to the top of its stack. Only such backends can
    /// run on a shared stack ([`StackMode::Shared`]): `Fast` and `Sigaltstack`. `Ucontext`
    /// keeps its registers in a `ucontext_t` whose saved stack pointer we would have to
    /// parse; `Thread` runs each coroutine on an OS thread of its own, which cannot share.
    pub fn switches_by_register(self) -> bool {
        matches!(self.effective(), Backend::Fast | Backend::Sigaltstack)
    }
}

impl std::str::FromStr for Backend {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| Error::UnknownBackend { name: s.to_owned() })
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
#[cfg(target_env = "gnu")]
struct UcPair {
    fiber: libc::ucontext_t,
    caller: libc::ucontext_t,
}

/// The shared control block of one fiber. Both stacks reach it through a raw pointer; a
/// field is only touched by the side that is currently running.
pub(crate) struct Fiber {
    /// Register switches (`Fast`, `Sigaltstack`): the parked fiber's stack pointer, written
    /// by the switch that parks it. Read by [`shared_stack`] to save a parked fiber's bytes.
    pub(crate) fiber_sp: *mut u8,
    /// Register switches: the resumer's stack pointer while the fiber runs, for `switch_out`.
    /// Right after a `Sigaltstack` bootstrap it still points at the dead signal handler's
    /// frame on the fiber's stack, which [`shared_stack`] leaves out of the saved bytes.
    pub(crate) caller_sp: *mut u8,
    /// `Ucontext`: both contexts for every switch. `Fast`: only until the bootstrap has
    /// parked the trampoline, then dropped.
    #[cfg(target_env = "gnu")]
    uc: Option<Box<UcPair>>,
    /// `Thread`: the baton, set before the coroutine thread starts (which reads it at once).
    baton: Option<Box<Baton>>,
    /// `Thread`: the coroutine thread, set by the creator once it has parked; only the
    /// resumer side touches it (to join it).
    thread: Option<CoThread>,
    /// `Thread`: the scheduler of the resumer, installed on the coroutine's thread at each
    /// switch in (thread-locals are per OS thread; see [`crate::thread_switch`]).
    carried: sched::Carried,
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
    pub(crate) stack: FiberStack,
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
    /// trampoline is only ever picked up again by the same thread. (The `Thread` backend runs
    /// a coroutine on its own OS thread, but always that one: each side of a switch only
    /// ever reads its own thread's `CURRENT`.) Hence `switch_in` can
    /// stay `#[inline(always)]` with the `CURRENT` accesses around the switch inlined into
    /// it; making `Coroutine` `Send` or sharing the pool between threads would require
    /// QEMU's fix (re-reading every thread-local through a non-inlined call after a switch).
    static CURRENT: Cell<*mut Fiber> = const { Cell::new(ptr::null_mut()) };
    /// This thread's parked fibers, one pool per (backend, stack size). Thread-local because a
    /// fiber never leaves the thread that created it (see `CURRENT`); dropped with the
    /// thread, which unmaps the stacks.
    static POOLS: RefCell<Vec<Pool>> = const { RefCell::new(Vec::new()) };
}

/// Idle parked fibers of one (backend, stack mode, stack size) kind.
struct Pool {
    backend: Backend,
    mode: StackMode,
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
#[cfg(target_env = "gnu")]
extern "C" fn fiber_entry(lo: libc::c_uint, hi: libc::c_uint) {
    let addr = ((hi as usize) << 32) | lo as usize;
    fiber_main(addr as *mut Fiber);
    // Only a `Thread` fiber's trampoline returns; returning from here would end the thread.
    std::process::abort()
}

/// The trampoline: park, run a job, mark it finished, repeat. Returns only for the `Thread`
/// backend, when its fiber is destroyed; every other caller aborts if it does, because their
/// stack has nothing to return to. Jobs catch their own panics; were one to escape, the
/// `extern "C"` boundary of the callers aborts rather than unwinding off the stack.
fn fiber_main(f: *mut Fiber) {
    // SAFETY: `f` stays valid for as long as this trampoline can run: a fiber is only
    // destroyed while parked here with no job (a `Thread` fiber after this returns).
    unsafe {
        while park(f) {
            if let Some(job) = (*f).job.take() {
                (*f).drop_job = None;
                job(f);
            }
            (*f).finished = true;
        }
    }
}

/// The trampoline's park: [`switch_out`], then whether to go on (false only for a `Thread`
/// fiber being destroyed).
///
/// # Safety
/// As for [`switch_out`].
unsafe fn park(f: *mut Fiber) -> bool {
    // SAFETY: per the contract.
    unsafe {
        match (*f).baton.as_deref() {
            Some(baton) => suspend_thread(f, baton),
            None => {
                switch_out(f);
                true
            }
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
#[cfg(target_env = "gnu")]
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

/// For the `Sigaltstack` backend: the trampoline, entered by [`arch::bootstrap`] inside the
/// signal handler, on the fiber's stack.
///
/// # Safety
/// As for [`enter_fiber`], except that no `uc` is needed: this already runs on the new stack.
unsafe extern "C" fn enter_on_signal_stack(f: *mut u8) -> ! {
    fiber_main(f.cast());
    std::process::abort()
}

/// For the `Thread` backend: the coroutine thread's body.
extern "C" fn thread_main(f: *mut libc::c_void) -> *mut libc::c_void {
    let f = f.cast::<Fiber>();
    let _alt_stack = overflow::ThreadAltStack::install();
    CURRENT.with(|c| c.set(f));
    fiber_main(f);
    ptr::null_mut()
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
        mode: StackMode,
        stack_size: usize,
        pooled: bool,
    ) -> Result<NonNull<Fiber>, Error> {
        let backend = backend.effective();
        shared_stack::check_spawn(backend, mode, stack_size)?;
        if pooled {
            let hit = POOLS.with(|p| {
                p.borrow_mut()
                    .iter_mut()
                    .find(|p| p.backend == backend && p.mode == mode && p.stack_size == stack_size)
                    .and_then(|p| p.idle.pop())
            });
            if let Some(f) = hit {
                return Ok(f);
            }
        }
        Fiber::new(backend, mode, stack_size)
    }

    /// Returns a finished fiber to the pool, or unmaps it when the pool is full.
    ///
    /// # Safety
    /// `f` must be parked in its trampoline with no job and no live payload, on the thread
    /// that created it, and `stack_size` must be the size it was acquired with (the pool is
    /// keyed by it). The caller gives `f` up: it may be reused or unmapped at once.
    pub(crate) unsafe fn release(f: NonNull<Fiber>, pooled: bool, stack_size: usize) {
        // SAFETY: the caller guarantees `f` is a valid parked fiber.
        let (backend, mode) = unsafe { ((*f.as_ptr()).backend, (*f.as_ptr()).stack.mode()) };
        let kept = pooled
            && POOLS
                .try_with(|p| {
                    let mut pools = p.borrow_mut();
                    let pos = match pools.iter().position(|p| {
                        p.backend == backend && p.mode == mode && p.stack_size == stack_size
                    }) {
                        Some(pos) => pos,
                        None => {
                            pools.push(Pool {
                                backend,
                                mode,
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

    /// Maps a stack (or joins the thread's shared one) and runs a new trampoline on it up
    /// to its first park.
    fn new(backend: Backend, mode: StackMode, stack_size: usize) -> Result<NonNull<Fiber>, Error> {
        let backend = backend.check()?;
        overflow::ensure_handler();
        // A coroutine thread needs at least the platform's pthread minimum.
        let stack_size = match backend {
            Backend::Thread => stack_size.max(thread_switch::min_stack()),
            _ => stack_size,
        };
        let stack = FiberStack::new(mode, stack_size)?;
        let f = Box::into_raw(Box::new(Fiber {
            fiber_sp: ptr::null_mut(),
            caller_sp: ptr::null_mut(),
            #[cfg(target_env = "gnu")]
            uc: None,
            baton: None,
            thread: None,
            carried: sched::Carried::default(),
            backend,
            job: None,
            drop_job: None,
            finished: false,
            cancel: false,
            stack,
            payload: Payload([MaybeUninit::uninit(); PAYLOAD_BYTES]),
        }));
        // SAFETY: `f` came from Box::into_raw and is exclusively ours until parked; each
        // bootstrap leaves it parked in its trampoline or fails having started nothing.
        let started = unsafe {
            // A shared stack holds another fiber's bytes: save them before ours go there.
            shared_stack::claim_for_bootstrap(f);
            match backend {
                Backend::Sigaltstack => signal_stack::run_on_stack(
                    (*f).stack.bottom(),
                    (*f).stack.usable(),
                    bootstrap_in_handler,
                    f.cast(),
                )
                .map(|()| {
                    let parked = (*f).fiber_sp;
                    let above = (*f).stack.top() as usize - parked as usize;
                    valgrind::make_defined(parked, above);
                }),
                Backend::Thread => {
                    let baton = (*f).baton.insert(Baton::new());
                    CoThread::spawn((*f).stack.mapping(), baton, thread_main, f.cast())
                        .map(|t| (*f).thread = Some(t))
                }
                Backend::Fast | Backend::Ucontext => start_with_makecontext(f),
            }
        };
        match started {
            // SAFETY: from Box::into_raw, never null; the trampoline is parked.
            Ok(()) => unsafe {
                shared_stack::bootstrapped(f);
                Ok(NonNull::new_unchecked(f))
            },
            Err(e) => {
                // SAFETY: nothing runs on the stack (no trampoline was started), so a shared
                // stack holds nothing of it either.
                unsafe {
                    shared_stack::vacate(f);
                    drop(Box::from_raw(f));
                }
                Err(e)
            }
        }
    }

    /// Unmaps a parked fiber (for `Thread`, after its thread has left).
    ///
    /// # Safety
    /// `f` must be parked with no job and no live payload, and never used again.
    unsafe fn destroy(f: NonNull<Fiber>) {
        // SAFETY: per the contract, nothing on the stack is live; a coroutine thread is
        // parked in its trampoline and leaves it when told to, and is joined before its
        // stack is unmapped by the drop. A shared-stack fiber stops being the occupant.
        unsafe {
            shared_stack::vacate(f.as_ptr());
            let mut fib = Box::from_raw(f.as_ptr());
            if let (Some(thread), Some(baton)) = (fib.thread.take(), fib.baton.as_deref()) {
                thread.exit(baton);
            }
            drop(fib);
        }
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

/// `Fast` and `Ucontext`: prepares the trampoline with `makecontext` and runs it to its
/// first park, with the register switch (`Fast`, after which the ucontexts are dropped) or
/// with `swapcontext`.
///
/// # Safety
/// `f` must point to a live fiber fresh from [`Fiber::new`], exclusively ours, whose backend
/// is `Fast` or `Ucontext` (already [`Backend::check`]ed, so this build has ucontext).
#[cfg(target_env = "gnu")]
unsafe fn start_with_makecontext(f: *mut Fiber) -> Result<(), Error> {
    // SAFETY: ucontext_t is plain data for which all-zero is a valid (empty) value;
    // getcontext fills it before use.
    let uc = Box::new(unsafe { mem::zeroed::<UcPair>() });
    // SAFETY: per the contract. `uc` borrows the boxed pair now owned by the fiber: glibc's
    // ucontext_t points into itself, and a Box's contents stay put when the Box moves.
    unsafe {
        let uc: &mut UcPair = (*f).uc.insert(uc);
        if libc::getcontext(&mut uc.fiber) != 0 {
            return Err(Error::last_os("getcontext"));
        }
        uc.fiber.uc_stack.ss_sp = (*f).stack.bottom().cast();
        uc.fiber.uc_stack.ss_size = (*f).stack.usable();
        uc.fiber.uc_link = ptr::null_mut();
        let addr = f as usize;
        // SAFETY: makecontext passes its variadic `int`s to the entry point, whose real
        // signature is (c_uint, c_uint); the transmute only erases the parameter list, as
        // the C API requires.
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
        if (*f).backend == Backend::Fast {
            arch_bootstrap(f);
            // The trampoline now parks with the fast switch; the ucontexts are done.
            (*f).uc = None;
        } else {
            libc::swapcontext(&mut uc.caller, &uc.fiber);
        }
    }
    Ok(())
}

/// Without ucontext, [`Backend::check`] never lets `Fast` or `Ucontext` through.
///
/// # Safety
/// None needed; it only panics. It is `unsafe` to match the glibc version.
#[cfg(not(target_env = "gnu"))]
unsafe fn start_with_makecontext(_f: *mut Fiber) -> Result<(), Error> {
    unreachable!("Backend::check refuses makecontext backends without ucontext")
}

/// Runs a new `Fast` fiber's trampoline up to its first park, through [`enter_fiber`]. On
/// return `fiber_sp` holds the parked trampoline and `uc` is no longer needed.
///
/// # Safety
/// `f` must point to a live fiber fresh from [`Fiber::new`]: `uc.fiber` prepared by
/// `makecontext` for the trampoline on the fiber's stack, never entered, and the `Fast`
/// backend recorded, so the trampoline parks with the register switch that returns here.
#[cfg(all(
    any(target_arch = "x86_64", target_arch = "aarch64"),
    target_env = "gnu"
))]
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
#[cfg(all(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    target_env = "gnu"
))]
unsafe fn arch_bootstrap(_f: *mut Fiber) {
    unreachable!("Backend::effective never yields Fast without an arch switch")
}

/// `Sigaltstack`: runs inside the bootstrap signal handler, on the new fiber's stack, and
/// parks the trampoline there with the register switch, exactly as the `Fast` bootstrap
/// does from the `makecontext` frame. Returns (ending the handler) at the trampoline's
/// first park.
///
/// # Safety
/// `f` must point to a live fiber fresh from [`Fiber::new`] with the `Sigaltstack` backend,
/// and this must run on that fiber's stack ([`signal_stack::run_on_stack`]).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
unsafe fn bootstrap_in_handler(f: *mut u8) {
    // SAFETY: `enter_on_signal_stack` never returns; the first `switch_out` resumes us.
    unsafe {
        arch::bootstrap(
            &raw mut (*f.cast::<Fiber>()).caller_sp,
            enter_on_signal_stack,
            f,
        )
    }
}

/// Stands in where there is no register switch; never reached.
///
/// # Safety
/// None needed; it only panics. [`Backend::effective`] never yields `Sigaltstack` here.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
unsafe fn bootstrap_in_handler(_f: *mut u8) {
    unreachable!("Backend::effective never yields Sigaltstack without an arch switch")
}

/// `Thread`, coroutine side: hands the baton back and sleeps; once resumed, installs the
/// resumer's scheduler on this thread. Returns false when woken to exit instead.
///
/// # Safety
/// Must run on `f`'s coroutine thread; `baton` is `f`'s.
unsafe fn suspend_thread(f: *mut Fiber, baton: &Baton) -> bool {
    let go_on = baton.suspend();
    if go_on {
        // SAFETY: the resumer wrote `carried` before handing us the baton, and waits.
        sched::install(unsafe { (*f).carried });
    }
    go_on
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
    // SAFETY: per the contract. A shared-stack fiber's bytes are copied in first (this may
    // panic, before anything changed, if the resumer runs on the same shared stack).
    unsafe { shared_stack::enter(f) };
    let prev = CURRENT.with(|c| c.replace(f));
    // SAFETY: per the contract; the saved contexts belong to `f`.
    unsafe {
        match (*f).backend {
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            Backend::Fast | Backend::Sigaltstack => {
                arch::switch(&raw mut (*f).caller_sp, (*f).fiber_sp)
            }
            Backend::Thread => {
                (*f).carried = sched::carry();
                if let Some(baton) = (*f).baton.as_deref() {
                    baton.resume();
                }
            }
            #[cfg(target_env = "gnu")]
            _ => {
                if let Some(uc) = (*f).uc.as_deref_mut() {
                    libc::swapcontext(&mut uc.caller, &uc.fiber);
                }
            }
            #[cfg(not(target_env = "gnu"))]
            _ => unreachable!("Backend::check refuses ucontext without ucontext"),
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
    // SAFETY: per the contract; the resumer's context was saved when it entered us. Leaving
    // a shared stack marks it free for the resumer's next switch in.
    unsafe {
        shared_stack::leave(f);
        match (*f).backend {
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            Backend::Fast | Backend::Sigaltstack => {
                arch::switch(&raw mut (*f).fiber_sp, (*f).caller_sp)
            }
            Backend::Thread => {
                if let Some(baton) = (*f).baton.as_deref() {
                    // A suspended coroutine is only ever resumed, never told to exit: a
                    // fiber is destroyed while parked in its trampoline ([`park`]).
                    suspend_thread(f, baton);
                }
            }
            #[cfg(target_env = "gnu")]
            _ => {
                if let Some(uc) = (*f).uc.as_deref_mut() {
                    libc::swapcontext(&mut uc.fiber, &uc.caller);
                }
            }
            #[cfg(not(target_env = "gnu"))]
            _ => unreachable!("Backend::check refuses ucontext without ucontext"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What each backend becomes in this build, per the table in [`Backend::effective`].
    #[test]
    fn effective_backend_for_this_build() {
        let fast = Backend::Fast.effective();
        match (arch::HAS_FAST, HAS_UCONTEXT) {
            (true, true) => assert_eq!(fast, Backend::Fast),
            (true, false) => assert_eq!(fast, Backend::Sigaltstack),
            (false, true) => assert_eq!(fast, Backend::Ucontext),
            (false, false) => assert_eq!(fast, Backend::Thread),
        }
        assert_eq!(Backend::default(), fast);
        assert_eq!(Backend::Thread.effective(), Backend::Thread);
        let ucontext = Backend::Ucontext.check();
        if HAS_UCONTEXT {
            assert_eq!(ucontext.expect("glibc has ucontext"), Backend::Ucontext);
        } else {
            assert!(
                matches!(
                    ucontext,
                    Err(Error::BackendUnavailable {
                        backend: "ucontext",
                        ..
                    })
                ),
                "{ucontext:?}"
            );
        }
        for b in Backend::ALL {
            if b != Backend::Ucontext {
                assert!(b.check().is_ok(), "{b:?} must run in every build");
            }
        }
    }
}

//! The safe coroutine API: create, resume, yield, finish, drop.
//!
//! # Dropping a coroutine
//! Dropping a coroutine that never ran drops its closure. Dropping a *suspended* coroutine
//! unwinds it: it is resumed once more, its pending [`yield_now`] panics with a private
//! payload (without invoking the panic hook), the destructors of everything on its stack run,
//! and its stack goes back to the pool. A coroutine that catches that unwind and yields
//! again is unwound again until it returns.
//!
//! # Send
//! A coroutine is `!Send`: its stack may hold thread-local references, and it is resumed by
//! the thread that owns its pool.
//!
//! ```compile_fail
//! fn needs_send<T: Send>(_: T) {}
//! needs_send(coro::Coroutine::new(|| 1));
//! ```

use std::marker::PhantomData;
use std::panic;
use std::ptr::NonNull;
use std::thread;

use crate::fiber::{self, Backend, Fiber, Payload};
use crate::sched::Job;
use crate::shared_stack::StackMode;
use crate::stack::DEFAULT_STACK_SIZE;
use crate::Error;

/// Where a coroutine is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Created, not yet resumed.
    Ready,
    /// Between `resume` switching in and the coroutine switching back. `resume` holds the
    /// handle borrowed for that whole time, so safe code never sees this state.
    Running,
    /// Yielded; `resume` continues it.
    Suspended,
    /// Returned or panicked; its stack is back in the pool.
    Done,
}

/// What one `resume` produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Resumed<T> {
    /// The coroutine called [`yield_now`] and can be resumed again.
    Yielded,
    /// The coroutine returned this value and is done.
    Returned(T),
}

/// The unwind payload that cancels a suspended coroutine being dropped.
struct Cancelled;

/// How to make a coroutine: backend, stack mode and size, and whether to use the per-thread
/// pool.
#[derive(Clone, Copy, Debug)]
pub struct Builder {
    backend: Backend,
    stack_mode: StackMode,
    stack_size: usize,
    pooled: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            backend: Backend::default(),
            stack_mode: StackMode::Pooled,
            stack_size: DEFAULT_STACK_SIZE,
            pooled: true,
        }
    }
}

impl Builder {
    /// The default: `Fast` where available, 256 KiB stacks, pooled.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Chooses the switch backend. `Fast` falls back to `Ucontext` where there is no
    /// register switch ([`Backend::effective`]).
    pub fn backend(mut self, backend: Backend) -> Builder {
        self.backend = backend;
        self
    }

    /// Chooses where coroutine stacks live (default [`StackMode::Pooled`]).
    /// [`StackMode::Shared`] runs every coroutine of the thread (of this stack size) on one
    /// stack and copies a parked coroutine's used bytes out to the heap: far less memory per
    /// parked coroutine, a copy on each switch between different coroutines. It needs a
    /// backend that [switches by register](Backend::switches_by_register), and a coroutine
    /// on the shared stack cannot resume or create another one on the same stack.
    pub fn stack_mode(mut self, mode: StackMode) -> Builder {
        self.stack_mode = mode;
        self
    }

    /// Chooses the usable stack size (rounded up to pages, at least
    /// [`MIN_STACK_SIZE`](crate::MIN_STACK_SIZE)).
    pub fn stack_size(mut self, bytes: usize) -> Builder {
        self.stack_size = bytes;
        self
    }

    /// Whether stacks come from and return to the per-thread pool (default true). Unpooled
    /// coroutines map and unmap a fresh stack each; useful to measure what the pool saves.
    pub fn pooled(mut self, pooled: bool) -> Builder {
        self.pooled = pooled;
        self
    }

    /// Whether this builder's backend can run coroutines on a shared stack.
    pub(crate) fn switches_by_register(&self) -> bool {
        self.backend.switches_by_register()
    }

    /// Creates a coroutine that will run `f` when first resumed.
    ///
    /// Fails when the pool has no parked fiber of this kind and a new stack cannot be
    /// mapped ([`Error::Os`]) or is too large for the address space
    /// ([`Error::StackTooLarge`]); in [`StackMode::Shared`], also when the backend cannot
    /// share a stack ([`Error::StackModeUnsupported`]) or when called from a coroutine
    /// running on that same shared stack ([`Error::SharedStackInUse`]).
    pub fn spawn<F, T>(self, f: F) -> Result<Coroutine<T>, Error>
    where
        F: FnOnce() -> T + 'static,
        T: 'static,
    {
        let fib = Fiber::acquire(self.backend, self.stack_mode, self.stack_size, self.pooled)?;
        // SAFETY: an acquired fiber is parked with no job and an empty payload.
        unsafe { Fiber::start::<F, T>(fib.as_ptr(), f) };
        Ok(Coroutine {
            fiber: Some(fib),
            state: State::Ready,
            builder: self,
            _marker: PhantomData,
        })
    }

    /// Like [`spawn`](Self::spawn) for a scheduler task, handing `job` back unrun (not
    /// wrapped in a closure) when no coroutine can be made for it.
    pub(crate) fn spawn_job<J: Job>(self, job: J) -> Result<Coroutine<()>, (Error, J)> {
        let fib = match Fiber::acquire(self.backend, self.stack_mode, self.stack_size, self.pooled)
        {
            Ok(fib) => fib,
            Err(e) => return Err((e, job)),
        };
        // SAFETY: an acquired fiber is parked with no job and an empty payload.
        unsafe { Fiber::start::<_, ()>(fib.as_ptr(), move || job.run()) };
        Ok(Coroutine {
            fiber: Some(fib),
            state: State::Ready,
            builder: self,
            _marker: PhantomData,
        })
    }
}

/// `*mut ()` makes the handle `!Send` and `!Sync`; `fn() -> T` records the output type
/// without claiming to own a `T`.
type NotSendReturning<T> = (*mut (), fn() -> T);

/// A stackful coroutine returning `T`. See the module docs for drop and `Send` rules.
pub struct Coroutine<T> {
    fiber: Option<NonNull<Fiber>>,
    state: State,
    builder: Builder,
    _marker: PhantomData<NotSendReturning<T>>,
}

impl<T: 'static> Coroutine<T> {
    /// Creates a coroutine with the default [`Builder`].
    ///
    /// # Panics
    /// If no stack can be mapped (address space or memory exhausted), like `thread::spawn`.
    pub fn new<F>(f: F) -> Coroutine<T>
    where
        F: FnOnce() -> T + 'static,
    {
        match Builder::new().spawn(f) {
            Ok(c) => c,
            Err(e) => panic!("failed to map a coroutine stack: {e}"),
        }
    }
}

impl<T> Coroutine<T> {
    /// Where this coroutine is in its life.
    pub fn state(&self) -> State {
        self.state
    }

    /// Runs the coroutine until it yields or returns.
    ///
    /// # Panics
    /// Re-raises a panic from inside the coroutine (which is then done), and panics if the
    /// coroutine is already done.
    pub fn resume(&mut self) -> Resumed<T> {
        let fib = match (self.state, self.fiber) {
            (State::Ready | State::Suspended, Some(f)) => f.as_ptr(),
            _ => panic!("resume of a coroutine that is {:?}", self.state),
        };
        self.state = State::Running;
        // SAFETY: the fiber is parked (Ready or Suspended) and owned by this handle.
        unsafe { fiber::switch_in(fib) };
        // SAFETY: the fiber switched back, so it is parked again.
        if unsafe { Fiber::is_finished(fib) } {
            match self.finish() {
                Ok(v) => Resumed::Returned(v),
                Err(p) => panic::resume_unwind(p),
            }
        } else {
            self.state = State::Suspended;
            Resumed::Yielded
        }
    }

    /// Takes the outcome of a finished job and returns its fiber to the pool.
    fn finish(&mut self) -> thread::Result<T> {
        self.state = State::Done;
        let Some(fib) = self.fiber.take() else {
            unreachable!("finish without a fiber")
        };
        // SAFETY: a finished job left a `thread::Result<T>` in the payload; after reading
        // it the fiber is parked with nothing live, as `release` requires.
        unsafe {
            let outcome = Payload::read::<thread::Result<T>>(&raw mut (*fib.as_ptr()).payload);
            Fiber::release(fib, self.builder.pooled, self.builder.stack_size);
            outcome
        }
    }
}

impl<T> Drop for Coroutine<T> {
    fn drop(&mut self) {
        let Some(fib) = self.fiber else { return };
        let fib_ptr = fib.as_ptr();
        match self.state {
            State::Ready => {
                self.fiber = None;
                // SAFETY: the job was installed and never ran; afterwards the fiber is
                // parked and empty.
                unsafe {
                    Fiber::discard_job(fib_ptr);
                    Fiber::release(fib, self.builder.pooled, self.builder.stack_size);
                }
            }
            State::Suspended => {
                // SAFETY: the fiber is parked mid-job; resuming it with `cancel` set makes
                // its `yield_now` unwind until the job returns.
                unsafe {
                    (*fib_ptr).cancel = true;
                    while !Fiber::is_finished(fib_ptr) {
                        fiber::switch_in(fib_ptr);
                    }
                }
                // The outcome is normally our own `Cancelled`; any value is dropped too.
                drop(self.finish());
            }
            State::Running | State::Done => {}
        }
    }
}

/// Suspends the running coroutine and returns to whoever resumed it.
///
/// # Panics
/// When called outside a coroutine. Inside a coroutine being dropped, it unwinds instead of
/// returning (see the module docs).
pub fn yield_now() {
    let fib = fiber::current();
    assert!(!fib.is_null(), "yield_now called outside a coroutine");
    // SAFETY: `fib` is the fiber we are running on, entered by `switch_in`.
    unsafe { fiber::switch_out(fib) };
    // SAFETY: we were resumed, so `fib` is still alive.
    if unsafe { (*fib).cancel } {
        panic::resume_unwind(Box::new(Cancelled));
    }
}

//! A single-threaded scheduler: spawn tasks (coroutines), run the ready ones, park and wake.
//!
//! The scheduler does not block or own an event loop: [`Scheduler::run`] resumes ready tasks
//! until none is left, submits the io_uring operations they queued in one batch, and returns.
//! The caller's loop (the vhost-user worker's epoll) calls it again when something happens:
//! a guest kick that spawned tasks, or the ring's completion eventfd (the caller hands it to
//! [`Ring::with_eventfd`] and reports it firing with [`Scheduler::on_completion_event`]).
//! [`Scheduler::run_until_idle`] is the blocking variant for tests and tools that have no
//! loop of their own.
//!
//! Inside a task, [`park`] suspends until some [`wake`]; the task id comes from
//! [`current_task`]. Wake-ups are remembered, so a wake that lands before the park is not
//! lost; callers still re-check their condition in a loop, as with condition variables.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::rc::Rc;

use slab::Slab;

use crate::coroutine::{self, Builder, Coroutine, Resumed};
use crate::io::Ring;
use crate::shared_stack::StackMode;
use crate::{Error, SpawnError};

/// Identifies a task within its scheduler. The generation makes a stale id (of a finished
/// task whose slot was reused) harmless: waking it does nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TaskId {
    index: u32,
    gen: u32,
}

struct Task {
    /// `None` while the task is running (its handle is taken out to resume it).
    co: Option<Coroutine<()>>,
    gen: u32,
    /// A wake arrived since the task was last resumed.
    notified: bool,
    /// In the ready queue.
    queued: bool,
}

pub(crate) struct Inner {
    builder: Builder,
    /// Tasks spawned while this many or more are unfinished run on the thread's shared
    /// stack (see [`Scheduler::share_stacks_beyond`]); `usize::MAX`: never.
    shared_beyond: Cell<usize>,
    tasks: RefCell<Slab<Task>>,
    ready: RefCell<VecDeque<TaskId>>,
    current: Cell<Option<TaskId>>,
    next_gen: Cell<u32>,
    ring_entries: u32,
    pub(crate) ring: RefCell<Option<Ring>>,
}

thread_local! {
    static ACTIVE: Cell<*const Inner> = const { Cell::new(ptr::null()) };
}

/// The scheduler a coroutine must see as running, carried across a switch by the `Thread`
/// backend (whose coroutine runs on another OS thread, with its own thread-locals): taken
/// with [`carry`] on the resumer's thread, put in place with [`install`] on the coroutine's.
#[derive(Clone, Copy)]
pub(crate) struct Carried(*const Inner);

impl Default for Carried {
    fn default() -> Self {
        Carried(ptr::null())
    }
}

/// This thread's running scheduler, for [`install`] on a coroutine thread.
pub(crate) fn carry() -> Carried {
    Carried(ACTIVE.with(Cell::get))
}

/// Makes `c` this thread's running scheduler. Sound for the same reason as [`with_active`]'s
/// dereference: the resumer that [`carry`]ed it sits in `Scheduler::run`, holding the
/// scheduler alive, until the coroutine hands the baton back.
pub(crate) fn install(c: Carried) {
    ACTIVE.with(|a| a.set(c.0));
}

/// Calls `f` with the scheduler running the current task.
///
/// # Panics
/// Outside a task of a running scheduler.
pub(crate) fn with_active<R>(f: impl FnOnce(&Inner) -> R) -> R {
    let p = ACTIVE.with(Cell::get);
    assert!(!p.is_null(), "called outside a task of a coro::Scheduler");
    // SAFETY: ACTIVE is set only while `Scheduler::run` holds an `Rc<Inner>` alive on this
    // thread, and reset before it returns.
    f(unsafe { &*p })
}

/// Single-threaded executor of coroutine tasks. `!Send`, like the coroutines it owns: its
/// tasks may only be resumed on the thread that created them.
///
/// ```compile_fail
/// fn needs_send<T: Send>(_: T) {}
/// needs_send(coro::Scheduler::default());
/// ```
pub struct Scheduler {
    inner: Rc<Inner>,
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler::new(Builder::default())
    }
}

impl Scheduler {
    /// A scheduler whose tasks are made by `builder` (backend, stack size, pooling).
    pub fn new(builder: Builder) -> Scheduler {
        Scheduler {
            inner: Rc::new(Inner {
                builder,
                shared_beyond: Cell::new(usize::MAX),
                tasks: RefCell::new(Slab::new()),
                ready: RefCell::new(VecDeque::new()),
                current: Cell::new(None),
                next_gen: Cell::new(0),
                ring_entries: 256,
                ring: RefCell::new(None),
            }),
        }
    }

    /// Installs the io_uring that tasks' I/O goes through. Without one, the first I/O
    /// creates a default ring of 256 entries.
    pub fn with_ring(self, ring: Ring) -> Scheduler {
        *self.inner.ring.borrow_mut() = Some(ring);
        self
    }

    /// Runs the tasks spawned while `n` or more of this scheduler's tasks are unfinished
    /// on the thread's shared stack ([`StackMode::Shared`]), the others as the builder
    /// says. With a [`StackMode::Pooled`] builder, the first `n` tasks in flight switch
    /// without copying and each one beyond costs the bytes it used (1-2 KiB for a request
    /// handler) rather than the pages it touched (4 KiB or more): the cost of a copy is
    /// paid only where many tasks are parked at once, which is where their memory adds
    /// up. Ignored where the builder's backend cannot share a stack
    /// ([`Backend::switches_by_register`](crate::Backend::switches_by_register)).
    pub fn share_stacks_beyond(self, n: usize) -> Scheduler {
        if self.inner.builder.switches_by_register() {
            self.inner.shared_beyond.set(n);
        }
        self
    }

    /// Adds a task that will run `f` on the next [`run`](Self::run).
    ///
    /// Fails as [`Builder::spawn`] does, or with [`Error::TooManyTasks`]; the job comes back
    /// unrun in the [`SpawnError`].
    pub fn spawn<J: Job>(&self, job: J) -> Result<TaskId, SpawnError<J>> {
        self.inner.spawn(job)
    }

    /// Wakes a parked task (from outside any task, e.g. an I/O completion handler).
    pub fn wake(&self, id: TaskId) {
        self.inner.wake(id)
    }

    /// Tasks not yet finished.
    pub fn task_count(&self) -> usize {
        self.inner.tasks.borrow().len()
    }

    /// Operations submitted to the ring and not yet completed.
    pub fn io_in_flight(&self) -> usize {
        self.inner.ring.borrow().as_ref().map_or(0, Ring::in_flight)
    }

    /// Whether I/O completions are ready to be reaped (a userspace check of the ring).
    pub fn has_completions(&self) -> bool {
        self.inner
            .ring
            .borrow_mut()
            .as_mut()
            .is_some_and(Ring::has_completions)
    }

    /// Call after the completion eventfd fired: clears it, then [`run`](Self::run)s.
    pub fn on_completion_event(&self) -> Result<usize, Error> {
        if let Some(ring) = self.inner.ring.borrow().as_ref() {
            ring.clear_eventfd();
        }
        self.run()
    }

    /// Resumes ready tasks (and those woken by completions) until none is ready, then submits
    /// their queued I/O in one batch. Returns how many resumes it did. Never blocks.
    ///
    /// # Panics
    /// Re-raises a panic from a task.
    ///
    /// # Errors
    /// [`Error::Os`] when `io_uring_enter` fails; the queued operations stay queued and the
    /// next call submits them again.
    pub fn run(&self) -> Result<usize, Error> {
        let _enter = Enter::new(&self.inner);
        let mut resumed = 0;
        loop {
            self.inner.reap();
            while let Some(id) = self.inner.pop_ready() {
                self.inner.resume(id);
                resumed += 1;
            }
            if !self.inner.submit()? && self.inner.ready.borrow().is_empty() {
                // Nothing new went to the kernel and nobody is ready: done for now.
                if !self.inner.reap() {
                    return Ok(resumed);
                }
            }
        }
    }

    /// Like [`run`](Self::run), but blocks on the ring until every task has finished, or
    /// until the remaining tasks are all parked with no I/O in flight (they wait for an
    /// outside [`wake`](Self::wake)). Returns the number of tasks still alive.
    pub fn run_until_idle(&self) -> Result<usize, Error> {
        loop {
            self.run()?;
            if self.task_count() == 0 || self.io_in_flight() == 0 {
                return Ok(self.task_count());
            }
            if let Some(ring) = self.inner.ring.borrow().as_ref() {
                ring.wait(1).map_err(Error::os("io_uring_enter"))?;
            }
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // The kernel may still write into buffers on parked tasks' stacks: cancel and wait
        // for every operation in flight before unwinding the tasks that own them.
        let drained = match self.inner.ring.borrow_mut().as_mut() {
            Some(ring) => ring.drain(),
            None => Ok(()),
        };
        let tasks: Vec<Task> = self.inner.tasks.borrow_mut().drain().collect();
        if let Err(e) = drained {
            // Some operation may still be in flight, and unwinding its task would free the
            // buffer the kernel writes to (a use-after-free in kernel context). Leaking the
            // tasks (stacks, closures, everything they own) is the safe choice.
            eprintln!(
                "coro: io_uring_enter failed while waiting for I/O in flight on scheduler drop: \
                 {e}; leaking {} task(s) so that the kernel cannot write into freed memory",
                tasks.len()
            );
            std::mem::forget(tasks);
            return;
        }
        let _enter = Enter::new(&self.inner);
        drop(tasks);
    }
}

/// Marks a scheduler active on this thread for the duration of a run.
struct Enter {
    prev: *const Inner,
}

impl Enter {
    fn new(inner: &Rc<Inner>) -> Enter {
        let prev = ACTIVE.with(|a| a.replace(Rc::as_ptr(inner)));
        Enter { prev }
    }
}

impl Drop for Enter {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(self.prev));
    }
}

/// Work a [`Scheduler`] runs as a task: any `FnOnce()`, or a type of the caller's whose
/// `run` does the work. With a type of its own, a caller whose task cannot start gets the
/// job back from [`SpawnError`] with its fields in reach (a closure's captures are not), so
/// it can still dispose of what the job owns without keeping a copy for every task.
pub trait Job: 'static {
    /// Does the work, inside the task's coroutine.
    fn run(self);
}

impl<F: FnOnce() + 'static> Job for F {
    fn run(self) {
        self()
    }
}

impl Inner {
    fn spawn<J: Job>(&self, job: J) -> Result<TaskId, SpawnError<J>> {
        // Checked before inserting, so that a refused task leaves no slot behind.
        let slot = self.tasks.borrow().vacant_key();
        let Ok(index) = u32::try_from(slot) else {
            let error = Error::TooManyTasks { slot };
            return Err(SpawnError { error, job });
        };
        let builder = if self.tasks.borrow().len() >= self.shared_beyond.get() {
            self.builder.stack_mode(StackMode::Shared)
        } else {
            self.builder
        };
        let co = builder
            .spawn_job(job)
            .map_err(|(error, job)| SpawnError { error, job })?;
        let gen = self.next_gen.get().wrapping_add(1);
        self.next_gen.set(gen);
        let inserted = self.tasks.borrow_mut().insert(Task {
            co: Some(co),
            gen,
            notified: false,
            queued: true,
        });
        debug_assert_eq!(inserted, slot);
        let id = TaskId { index, gen };
        self.ready.borrow_mut().push_back(id);
        Ok(id)
    }

    pub(crate) fn wake(&self, id: TaskId) {
        let mut tasks = self.tasks.borrow_mut();
        let Some(task) = tasks.get_mut(id.index as usize) else {
            return;
        };
        if task.gen != id.gen {
            return;
        }
        task.notified = true;
        if !task.queued && task.co.is_some() {
            task.queued = true;
            self.ready.borrow_mut().push_back(id);
        }
    }

    pub(crate) fn current(&self) -> TaskId {
        match self.current.get() {
            Some(id) => id,
            None => panic!("called outside a task of a coro::Scheduler"),
        }
    }

    /// Consumes a pending wake-up of the current task; true if there was one.
    pub(crate) fn take_notified(&self, id: TaskId) -> bool {
        let mut tasks = self.tasks.borrow_mut();
        match tasks.get_mut(id.index as usize) {
            Some(t) if t.gen == id.gen => std::mem::take(&mut t.notified),
            _ => false,
        }
    }

    fn pop_ready(&self) -> Option<TaskId> {
        self.ready.borrow_mut().pop_front()
    }

    fn resume(&self, id: TaskId) {
        let co = {
            let mut tasks = self.tasks.borrow_mut();
            match tasks.get_mut(id.index as usize) {
                Some(t) if t.gen == id.gen => {
                    t.queued = false;
                    t.notified = false;
                    t.co.take()
                }
                _ => None,
            }
        };
        let Some(mut co) = co else { return };
        let prev = self.current.replace(Some(id));
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| co.resume()));
        self.current.set(prev);
        let outcome = match outcome {
            Ok(o) => o,
            Err(p) => {
                // The task is done (it panicked); forget it before re-raising.
                self.tasks.borrow_mut().remove(id.index as usize);
                panic::resume_unwind(p);
            }
        };
        let mut tasks = self.tasks.borrow_mut();
        match outcome {
            Resumed::Yielded => {
                if let Some(t) = tasks.get_mut(id.index as usize) {
                    let requeue = t.notified && !t.queued;
                    t.co = Some(co);
                    if requeue {
                        t.queued = true;
                        self.ready.borrow_mut().push_back(id);
                    }
                }
            }
            Resumed::Returned(()) => {
                tasks.remove(id.index as usize);
            }
        }
    }

    /// Calls `f` with the ring, creating the default one first if none was installed.
    pub(crate) fn with_ring<R>(&self, f: impl FnOnce(&mut Ring) -> R) -> Result<R, Error> {
        let mut slot = self.ring.borrow_mut();
        let ring = match &mut *slot {
            Some(ring) => ring,
            None => slot.insert(Ring::new(self.ring_entries)?),
        };
        Ok(f(ring))
    }

    /// Posts finished operations' results and wakes their tasks; true if any.
    fn reap(&self) -> bool {
        match self.ring.borrow_mut().as_mut() {
            Some(ring) => ring.reap(|id| self.wake(id)),
            None => false,
        }
    }

    /// Submits queued operations; true if any went to the kernel.
    fn submit(&self) -> Result<bool, Error> {
        match self.ring.borrow_mut().as_mut() {
            Some(ring) => ring.submit().map_err(Error::os("io_uring_enter")),
            None => Ok(false),
        }
    }
}

/// Suspends the current task until it is woken. Returns at once if a wake-up arrived since
/// it was last resumed. Callers re-check what they wait for: wake-ups may be spurious.
pub fn park() {
    let notified = with_active(|s| s.take_notified(s.current()));
    if !notified {
        coroutine::yield_now();
    }
}

/// Wakes a task of the scheduler running the current task.
pub fn wake(id: TaskId) {
    with_active(|s| s.wake(id))
}

/// The id of the running task.
pub fn current_task() -> TaskId {
    with_active(Inner::current)
}

/// Lets the other ready tasks run, then continues.
pub fn yield_task() {
    // The pending wake makes the scheduler requeue us at the back once we yield.
    wake(current_task());
    coroutine::yield_now();
}

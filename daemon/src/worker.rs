//! The per-thread data path: guest kicks become coroutines, completions resume them.
//!
//! Each vhost-user worker thread owns a [`Worker`] (created on the thread's first event,
//! freed when the connection closes, see [`Worker::shut_down`]): a `coro` scheduler with
//! its own io_uring. A kick pops
//! every available descriptor chain and spawns one coroutine per request; the scheduler
//! runs them until each has submitted its I/O and parked, and submits that I/O in one
//! batch. When the ring's eventfd fires, finished requests are resumed, write their status,
//! and add their used element.
//!
//! **Publish at once, signal early or per batch.** A finished request goes to the used ring
//! the moment it completes, so a driver that is still busy finds it without waiting for the
//! rest of the batch (and without asking for an interrupt). Holding used elements back
//! until the end of a batch made the driver and the device take turns: the driver went to
//! sleep on an empty used ring while the device finished the batch, and each of those
//! sleeps cost an interrupt. The guest is signalled only if EVENT_IDX says it is waiting,
//! and when depends on where it runs ([`crate::core_sharing`]): on another core, at the
//! first completion of a batch, so it wakes while the rest is served; on the worker's own
//! core, once at the end of the batch, so it does not preempt the worker at every request.
//!
//! **Polling.** After handling an event the worker keeps checking its queues' avail rings
//! and its io_uring completion queue (userspace reads, no syscalls) for a poll window,
//! with guest notifications disabled. Under load the guest then never has to kick and the
//! worker never sleeps in epoll; when the device stays idle for the window, notifications
//! are re-enabled and the worker returns to epoll. The window adapts between zero and
//! `--poll-us` to how long the worker actually waits for work ([`PollWindow`]), so slow
//! storage does not cost a spinning core, and it stays shut while the worker shares its
//! core ([`crate::core_sharing`]): spinning there takes the time the driver or an io_uring
//! write thread needs. This is QEMU's `poll-max-ns` idea. A worker
//! that stays busy still goes back through epoll every [`POLL_BUDGET`], so it sees a
//! shutdown and the library's exit event however much work keeps arriving.
//!
//! **Ring faults** ([`crate::ring`]) break one queue: it is no longer popped, the
//! frontend's error eventfd is signalled and the device log says why; the queue serves
//! again once the frontend stops and restarts it (a guest reset).
//!
//! The worker is thread-local because coroutines are `!Send`; the vhost-user library gives
//! us `&self` on a shared backend, so per-thread state cannot live in it.

use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coro::io::Ring;
use coro::Scheduler;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;

use corodev_devices::blk::Served;
use corodev_devices::memory::GuestMap;
use corodev_devices::request::{Used, WriteLog};

use crate::connection::Connection;
use crate::core_sharing::CoreSharing;
use crate::inflight::QueueTracker;
use crate::poll_window::PollWindow;
use crate::ring::{self, has_avail, pop_all, Chain, InFlightHeads, RingFault};

/// Submission queue entries per worker ring: enough for a full 1024-deep queue per batch;
/// a fuller queue is flushed to the kernel early rather than failing.
const RING_ENTRIES: u32 = 1024;

/// Longest a worker keeps finding work without passing through epoll: the library's exit
/// event and a connection shutdown are only seen there.
pub const POLL_BUDGET: Duration = Duration::from_millis(2);

/// One worker thread's scheduler and completion bookkeeping.
///
/// The library starts new worker threads for every connection, so the device state, the
/// vrings and the queue mapping are the same for the whole life of the thread (and of
/// this worker), and each request's coroutine needs only a handle to it.
pub struct Worker {
    conn: Arc<Connection>,
    /// This worker's index among the connection's worker threads.
    thread: usize,
    sched: Scheduler,
    /// This thread's vrings, by local index.
    vrings: Vec<VringRwLock>,
    /// Global queue index of each local vring (`None`: not ours, never served).
    queues: Vec<Option<usize>>,
    /// Per local vring: heads whose requests are in flight.
    heads: RefCell<Vec<InFlightHeads>>,
    /// Per local vring: where its requests are recorded in flight (the inflight region),
    /// and the queue's start/stop generation it was read at. A ring's tracker changes
    /// only when it is restarted, which waits until none of its requests is in flight, so
    /// a request is answered in the tracker it was popped into.
    trackers: RefCell<Vec<(u64, Option<Arc<QueueTracker>>)>>,
    /// Per local vring: requests published since the batch began; settled (in-flight
    /// total, guest signal) by [`notify`](Self::notify).
    published: RefCell<Vec<usize>>,
    /// How long to poll after the last work.
    window: PollWindow,
    /// Whether the worker shares its core: decides early or batched signals, and whether
    /// it polls at all.
    core: CoreSharing,
    /// When the worker last went back to epoll, idle, to measure how long it slept.
    idle_since: Cell<Option<Instant>>,
    /// The time shared by every completion of one pass (see [`Worker::pass_clock`]).
    pass_clock: Cell<Option<Instant>>,
    /// This worker's handle on the connection's current memory map, which its requests
    /// clone (see [`GuestMap`]), with the connection's memory generation it was taken at;
    /// dropped when the worker goes idle, so a replaced map is not kept mapped by a
    /// worker with nothing to do.
    map: RefCell<Option<(u64, GuestMap)>>,
}

/// One request's coroutine: serve its chain, then publish the result. A type rather than a
/// closure so that a request whose coroutine cannot start comes back whole (see
/// [`coro::SpawnError`]) and is answered anyway.
struct Request {
    worker: Rc<Worker>,
    local: usize,
    chain: Chain,
    mem: GuestMap,
    /// When its batch was popped: the start of its latency.
    popped: Instant,
}

impl coro::Job for Request {
    fn run(self) {
        let served = self.worker.conn.blk.serve(self.chain, self.mem);
        self.worker.complete(self.local, served, self.popped);
    }
}

thread_local! {
    static WORKER: WorkerSlot = const { WorkerSlot(RefCell::new(None)) };
}

/// The thread-local home of a thread's [`Worker`]. Normally emptied by
/// [`Worker::shut_down`] before the thread exits; if the thread ends another way (the
/// library's loop failed) with requests in flight, nothing can safely finish them at this
/// point (the coroutine machinery's own thread-locals may already be gone), so the state is
/// left where it is, loudly, and counted out so that closing the connection does not wait
/// for it.
struct WorkerSlot(RefCell<Option<Rc<Worker>>>);

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        if let Some(worker) = self.0.get_mut().take() {
            log::error!(
                "worker {} exited without shutting down, {} request(s) in flight: their memory stays allocated",
                worker.thread,
                worker.sched.task_count()
            );
            worker.conn.worker_stopped();
            // Requests hold the worker: dropping this reference frees nothing, and must not
            // try to (see above).
            std::mem::forget(worker);
        }
    }
}

impl Worker {
    /// This thread's worker, created on first use with the thread's `vrings` and an
    /// io_uring that signals the thread's completion eventfd. `None` once the connection is
    /// closing: no new worker state is made then.
    pub fn get(
        conn: &Arc<Connection>,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<Option<Rc<Worker>>> {
        if let Some(w) = WORKER.with(|w| w.0.borrow().clone()) {
            return Ok(Some(w));
        }
        if !conn.worker_started() {
            return Ok(None);
        }
        let created = Worker::create(conn, vrings, thread_id);
        if created.is_err() {
            conn.worker_stopped();
        }
        created.map(Some)
    }

    /// This thread's worker, if it has one (it served a kick on this connection).
    pub fn current() -> Option<Rc<Worker>> {
        WORKER.with(|w| w.0.borrow().clone())
    }

    fn create(
        conn: &Arc<Connection>,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<Rc<Worker>> {
        let efd = conn.completions.ring_fd(thread_id)?;
        let ring =
            Ring::with_eventfd(RING_ENTRIES, efd)?.submit_each(conn.blk.disk().submit_each_io());
        let builder = coro::Builder::new()
            .backend(conn.workers.coroutine_backend)
            .stack_mode(conn.workers.stack_mode.to_coro())
            .stack_size(conn.workers.stack_size);
        let worker = Rc::new(Worker {
            conn: conn.clone(),
            thread: thread_id,
            sched: Scheduler::new(builder)
                .share_stacks_beyond(conn.workers.stack_mode.shared_beyond())
                .with_ring(ring),
            vrings: vrings.to_vec(),
            queues: (0..vrings.len())
                .map(|local| conn.global_queue(thread_id, local))
                .collect(),
            heads: RefCell::new(
                (0..vrings.len())
                    .map(|_| InFlightHeads::default())
                    .collect(),
            ),
            published: RefCell::new(vec![0; vrings.len()]),
            trackers: RefCell::new(vec![(0, None); vrings.len()]),
            window: PollWindow::new(conn.workers.poll),
            core: CoreSharing::default(),
            idle_since: Cell::new(None),
            pass_clock: Cell::new(None),
            map: RefCell::new(None),
        });
        WORKER.with(|w| *w.0.borrow_mut() = Some(worker.clone()));
        log::debug!("worker {thread_id} ready");
        Ok(worker)
    }

    /// Frees this thread's worker once the connection is closing: runs every request in
    /// flight to completion (the kernel may still write into their buffers, so nothing is
    /// freed before), publishes their used elements, then drops the scheduler, its ring,
    /// its stacks and its hold on the guest memory map.
    ///
    /// Each request's coroutine holds an `Rc` of the worker, so the worker cannot simply
    /// be dropped with requests parked: they would keep it, and the memory map, alive for
    /// ever. Only once they have finished is the last reference the thread-local one.
    pub fn shut_down() {
        let Some(worker) = WORKER.with(|w| w.0.borrow_mut().take()) else {
            return;
        };
        worker.pass_clock.set(None);
        match worker.sched.run_until_idle() {
            Ok(0) => {}
            Ok(n) => log::error!(
                "worker {}: {n} requests parked with no I/O in flight at shutdown",
                worker.thread
            ),
            Err(e) => log::error!(
                "worker {}: finishing requests at shutdown: {e}",
                worker.thread
            ),
        }
        worker.notify();
        let (conn, thread) = (worker.conn.clone(), worker.thread);
        let refs = Rc::strong_count(&worker);
        drop(worker);
        if refs > 1 {
            log::error!(
                "worker {thread}: {} requests still hold it at shutdown",
                refs - 1
            );
        }
        conn.worker_stopped();
        log::debug!("worker {thread} shut down");
    }

    /// Called first on every event: if the worker had gone to sleep idle, how long it
    /// slept tunes the poll window.
    pub fn woke(&self) {
        if let Some(t) = self.idle_since.take() {
            self.window.waited(t.elapsed());
        }
    }

    /// Handles a kick on local vring `local`.
    pub fn on_kick(self: &Rc<Self>, local: usize) {
        if !matches!(self.queues.get(local), Some(Some(_))) {
            self.conn
                .blk
                .log()
                .warn(format_args!("event for unknown source {local}"));
        } else if let Some(queue) = self.serving(local) {
            // When polling follows, leave notifications off: the poll loop re-arms them.
            self.start_requests(local, queue, self.conn.workers.poll.is_zero());
            self.run();
        }
        // Otherwise the queue is broken: kicks are ignored until it is restarted.
    }

    /// The global queue behind local vring `local`, unless it is not ours, is broken, or
    /// the daemon is stopping (draining what is in flight).
    fn serving(&self, local: usize) -> Option<usize> {
        let queue = (*self.queues.get(local)?)?;
        (!self.conn.is_broken(queue) && !self.conn.is_draining()).then_some(queue)
    }

    /// Handles the completion eventfd: resumes the requests whose I/O finished.
    pub fn on_completion(&self) {
        self.pass_clock.set(None);
        if let Err(e) = self.sched.on_completion_event() {
            self.submission_failed(&e);
        }
    }

    fn run(&self) {
        self.pass_clock.set(None);
        if let Err(e) = self.sched.run() {
            self.submission_failed(&e);
        }
    }

    fn submission_failed(&self, e: &coro::Error) {
        self.conn.blk.log().log(
            log::Level::Error,
            format_args!("worker {}: io_uring submission failed: {e}", self.thread),
        );
    }

    /// Pops the available chains of one vring and spawns a coroutine for each. With
    /// `rearm`, guest notifications are re-enabled afterwards (re-checking for buffers
    /// added meanwhile); without, they stay off for the poll loop. Returns the count.
    fn start_requests(self: &Rc<Self>, local: usize, queue: usize, rearm: bool) -> usize {
        let conn = &self.conn;
        let Some(state) = conn.queue(queue) else {
            return 0;
        };
        let popped = {
            let mut heads = self.heads.borrow_mut();
            let mut trackers = self.trackers.borrow_mut();
            let (seen, tracker) = &mut trackers[local];
            if let Some(now) = state.tracker_update(seen) {
                *tracker = now;
            }
            pop_all(
                &self.vrings[local],
                || self.map(),
                rearm,
                &mut heads[local],
                state,
                tracker.as_deref(),
            )
        };
        let count = popped.chains.len();
        if let Some(stats) = conn.stats.queue(queue) {
            stats.started(count as u64);
        }
        // One clock read per batch, not per request: its requests were popped together.
        let now = Instant::now();
        let mem = popped.mem;
        for chain in popped.chains {
            let job = Request {
                worker: self.clone(),
                local,
                chain,
                mem: mem.clone(),
                popped: now,
            };
            if let Err(refused) = self.sched.spawn(job) {
                // No stack for it (memory or map count exhausted): answer it with IOERR
                // now rather than leave it, or publish it with a stale status byte.
                let Request {
                    chain, mem, popped, ..
                } = refused.job;
                conn.blk.log().warn(format_args!(
                    "queue {queue}: cannot start a request coroutine for head {}: {}",
                    chain.head_index(),
                    refused.error
                ));
                let served = conn.blk.refuse(chain, mem);
                self.complete(local, served, popped);
            }
        }
        if let Some(fault) = popped.fault {
            self.break_queue(local, queue, &fault);
        }
        count
    }

    /// Stops serving a queue whose ring the guest corrupted, and tells the frontend.
    fn break_queue(&self, local: usize, queue: usize, fault: &RingFault) {
        let newly = self.conn.queue(queue).is_some_and(|q| q.mark_broken());
        if !newly {
            return;
        }
        self.conn.blk.log().log(
            log::Level::Error,
            format_args!(
                "queue {queue}: ring is broken ({fault}); not serving it until the driver resets it"
            ),
        );
        if let Some(vring) = self.vrings.get(local) {
            if let Err(e) = vring.signal_error() {
                log::error!("queue {queue}: cannot signal the frontend's error eventfd: {e}");
            }
        }
    }

    /// Polls this thread's vrings and io_uring while the poll window lasts after the last
    /// work, with guest notifications off; re-arms them before returning to epoll. Returns
    /// early, with the worker's completion eventfd raised so epoll comes straight back,
    /// when it has been finding work for [`POLL_BUDGET`] or the connection is closing.
    pub fn poll(self: &Rc<Self>) {
        let conn = &self.conn;
        let started = Instant::now();
        self.core.update(started);
        if conn.workers.poll.is_zero() {
            // Notifications were re-armed when the chains were popped.
            self.map.borrow_mut().take();
            return;
        }
        let mut idle_start = started;
        let mut idle_spins = 0u32;
        loop {
            let mut work = 0;
            if self.sched.has_completions() {
                self.run();
                work += 1;
            }
            let mem = self.map();
            for (local, vring) in self.vrings.iter().enumerate() {
                if let Some(queue) = self.serving(local) {
                    if has_avail(vring, &mem) {
                        work += self.start_requests(local, queue, false);
                    }
                }
            }
            if work > 0 {
                if idle_spins > 0 {
                    self.window.waited(idle_start.elapsed());
                }
                self.run();
                self.notify();
                idle_spins = 0;
                if conn.is_closing() || started.elapsed() >= POLL_BUDGET {
                    // Busy for a whole budget: back through epoll without sleeping.
                    // Notifications stay off, and the raised eventfd brings the worker
                    // straight back to polling. (An idle worker returns anyway once its
                    // window, at most --poll-us, has passed.)
                    conn.completions.wake(self.thread);
                    return;
                }
                continue;
            }
            idle_spins += 1;
            if idle_spins == 1 {
                idle_start = Instant::now();
            }
            // Reading the clock costs as much as a poll pass: look only every 64 idle
            // passes (at once when the window is closed).
            // A worker sharing its core would spin on time someone else needs.
            let window = if self.core.alone() {
                self.window.get()
            } else {
                Duration::ZERO
            };
            let expired = if window.is_zero() {
                true
            } else {
                idle_spins % 64 == 0 && idle_start.elapsed() >= window
            };
            if expired {
                // Idle: re-arm notifications. A buffer that arrived in between would get no
                // kick, so if re-arming reports one, keep polling.
                // Broken, disabled and stopped queues are skipped: nothing is popped from
                // them, so their avail index never catches up and they would look like a
                // race forever (a spinning core).
                let raced = self.vrings.iter().enumerate().any(|(local, v)| {
                    self.serving(local).is_some()
                        && ring::accepts_requests(v)
                        && ring::rearm(v, &mem)
                });
                if !raced {
                    self.idle_since.set(Some(idle_start));
                    self.map.borrow_mut().take();
                    return;
                }
                idle_spins = 0;
            }
            std::hint::spin_loop();
        }
    }

    /// The one place a request leaves the device: it is counted in the export's
    /// statistics (latency from `popped`), and its used element goes to the used ring
    /// now, bracketed by the inflight region's record of it (see [`crate::inflight`]);
    /// [`notify`](Self::notify) settles the batch.
    fn complete(&self, local: usize, served: Served, popped: Instant) {
        let Used { head, len } = served.used;
        let mut published = self.published.borrow_mut();
        let (Some(vring), Some(Some(queue)), Some(count)) = (
            self.vrings.get(local),
            self.queues.get(local),
            published.get_mut(local),
        ) else {
            log::error!("request {head} completed on unknown vring {local}");
            return;
        };
        if let Some(stats) = self.conn.stats.queue(*queue) {
            stats.completed(&served, self.pass_clock().saturating_duration_since(popped));
        }
        *count += 1;
        if let Some(heads) = self.heads.borrow_mut().get_mut(local) {
            heads.remove(head);
        }
        let trackers = self.trackers.borrow();
        let tracker = trackers.get(local).and_then(|(_, t)| t.as_deref());
        // The queue's own calls with this worker's map: the vring's wrappers load the
        // library's map on every call (an ArcSwap load, and a map maybe not yet guarded:
        // see `Connection::mem`).
        let mem = self.map();
        let mut state = vring.get_mut();
        if let Some(t) = tracker {
            t.completing(head);
        }
        match state.get_queue_mut().add_used(&*mem, head, len) {
            Ok(()) => {
                let ring = state.get_queue();
                let next_used = ring.next_used();
                if let Some(t) = tracker {
                    t.completed(head, next_used);
                }
                let dirty = &self.conn.dirty;
                if dirty.logging() {
                    // The element just written, and the used index.
                    let slot = u64::from(next_used.wrapping_sub(1) % ring.size().max(1));
                    dirty.mark(ring.used_ring() + 4 + 8 * slot, 8);
                    dirty.mark(ring.used_ring() + 2, 2);
                }
                let first = *count == 1;
                if first && self.core.alone() && state.get_queue().event_idx_enabled() {
                    // The batch's first completion: if the driver asked for a signal, give
                    // it now, so it wakes while the rest of the batch is served (see
                    // crate::core_sharing); notify() checks again at the end.
                    if let Ok(true) = state.get_queue_mut().needs_notification(&*mem) {
                        self.signalled(*queue, state.signal_used_queue());
                    }
                }
            }
            Err(e) => {
                self.conn.blk.log().warn(format_args!(
                    "queue {queue}: cannot add used element {head}: {e}"
                ));
            }
        }
    }

    /// Logs a failed signal of `queue`'s call eventfd (the guest then learns of its
    /// completions at its next look at the used ring, or the next signal).
    fn signalled(&self, queue: usize, result: io::Result<()>) {
        if let Err(e) = result {
            self.conn
                .blk
                .log()
                .warn(format_args!("queue {queue}: cannot notify the guest: {e}"));
        }
    }

    /// The clock for a request's completion: read by the first completion after the
    /// coroutines are resumed (every path that resumes them clears it first) and shared by
    /// the rest of that pass, so a batch of completions
    /// costs one clock read, not one each (a latency is at most one pass late, a few
    /// microseconds; reading it per request was 5% of a null-backend worker's time).
    fn pass_clock(&self) -> Instant {
        self.pass_clock.get().unwrap_or_else(|| {
            let now = Instant::now();
            self.pass_clock.set(Some(now));
            now
        })
    }

    /// This worker's handle on the connection's current memory map: the one it holds if
    /// the frontend has not replaced the map since, else a new one.
    fn map(&self) -> GuestMap {
        let generation = self.conn.memory_generation();
        let mut held = self.map.borrow_mut();
        match &*held {
            Some((taken, map)) if *taken == generation => map.clone(),
            _ => {
                let (taken, map) = self.conn.memory_map();
                let map = GuestMap::new(map);
                *held = Some((taken, map.clone()));
                map
            }
        }
    }

    /// Ends a batch: signals the guest once per queue with requests published since the
    /// last batch, if EVENT_IDX says it wants to be, then drops the queue's in-flight
    /// count by them.
    pub fn notify(&self) {
        let mut published = self.published.borrow_mut();
        let queues = self.vrings.iter().zip(&self.queues);
        for ((vring, queue), count) in queues.zip(published.iter_mut()) {
            let (Some(queue), n @ 1..) = (*queue, *count) else {
                continue;
            };
            *count = 0;
            let needed = vring
                .get_mut()
                .get_queue_mut()
                .needs_notification(&*self.map());
            match needed {
                Ok(false) => {}
                Ok(true) | Err(_) => {
                    self.signalled(queue, vring.signal_used_queue());
                }
            }
            // Only now: `stop_vring` may return (and the frontend tear the queue down) as
            // soon as this reaches zero, and the guest must have had its signal by then.
            if let Some(state) = self.conn.queue(queue) {
                state.finished(n);
            }
        }
    }
}

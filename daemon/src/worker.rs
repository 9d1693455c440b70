//! The per-thread data path: guest kicks become coroutines, completions resume them.
//!
//! Each vhost-user worker thread owns a [`Worker`] (created on the thread's first event and
//! dropped when the thread exits): a `coro` scheduler with its own io_uring. A kick pops
//! every available descriptor chain and spawns one coroutine per request; the scheduler
//! runs them until each has submitted its I/O and parked, and submits that I/O in one
//! batch. When the ring's eventfd fires, finished requests are resumed, write their status,
//! and add their used element.
//!
//! **Publish at once, signal per batch.** A finished request goes to the used ring the
//! moment it completes, so a driver that is still busy finds it without waiting for the
//! rest of the batch (and without asking for an interrupt); the guest is signalled once per
//! batch per queue, and only if EVENT_IDX says it is waiting. Holding used elements back
//! until the end of a batch made the driver and the device take turns: the driver went to
//! sleep on an empty used ring while the device finished the batch, and each of those
//! sleeps cost an interrupt.
//!
//! **Polling.** After handling an event the worker keeps checking its queues' avail rings
//! and its io_uring completion queue (userspace reads, no syscalls) for up to `--poll-us`,
//! with guest notifications disabled. Under load the guest then never has to kick and the
//! worker never sleeps in epoll; when the device goes idle for that long, notifications
//! are re-enabled and the worker returns to epoll. This is QEMU's `poll-max-ns` idea.
//!
//! The worker is thread-local because coroutines are `!Send`; the vhost-user library gives
//! us `&self` on a shared backend, so per-thread state cannot live in it.

use std::cell::RefCell;
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use coro::io::Ring;
use coro::Scheduler;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use crate::device::Shared;

/// Submission queue entries per worker ring: enough for a full 1024-deep queue per batch;
/// a fuller queue is flushed to the kernel early rather than failing.
const RING_ENTRIES: u32 = 1024;

/// One worker thread's scheduler and completion bookkeeping.
pub struct Worker {
    sched: Scheduler,
    /// This thread's vrings. The library starts new worker threads for every connection,
    /// so they are the same for the whole life of the thread (and of this worker).
    vrings: Vec<VringRwLock>,
    /// Per local vring: `(global queue, requests published since the last signal)`; the
    /// count is settled (in-flight total, guest signal) at the end of the batch.
    published: RefCell<Vec<(Option<usize>, usize)>>,
}

thread_local! {
    static WORKER: RefCell<Option<Rc<Worker>>> = const { RefCell::new(None) };
}

impl Worker {
    /// This thread's worker, created on first use with the completion eventfd that was
    /// registered for this thread in the epoll loop, and the thread's `vrings`.
    pub fn get(
        shared: &Shared,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<Rc<Worker>> {
        if let Some(w) = WORKER.with(|w| w.borrow().clone()) {
            return Ok(w);
        }
        let efd = shared
            .completion_eventfd(thread_id)
            .ok_or_else(|| io::Error::other(format!("no eventfd for worker {thread_id}")))?;
        let dup = efd.try_clone()?.into_raw_fd();
        // SAFETY: `into_raw_fd` hands us sole ownership of the duplicated descriptor.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        let ring = Ring::with_eventfd(RING_ENTRIES, dup)?.submit_each(shared.disk.submit_each_io());
        let builder = coro::Builder::new()
            .backend(shared.coroutine_backend)
            .stack_size(shared.stack_size);
        let worker = Rc::new(Worker {
            sched: Scheduler::new(builder).with_ring(ring),
            vrings: vrings.to_vec(),
            published: RefCell::new(
                (0..vrings.len())
                    .map(|local| (shared.global_queue(thread_id, local), 0))
                    .collect(),
            ),
        });
        WORKER.with(|w| *w.borrow_mut() = Some(worker.clone()));
        log::debug!(
            "worker {thread_id} ready (completion eventfd {})",
            efd.as_raw_fd()
        );
        Ok(worker)
    }

    /// Handles a kick on local vring `local` (global queue `queue`).
    pub fn on_kick(
        self: &Rc<Self>,
        shared: &Arc<Shared>,
        vring: &VringRwLock,
        local: usize,
        queue: usize,
    ) {
        // When polling follows, leave notifications off: the poll loop re-arms them.
        self.start_requests(shared, vring, local, queue, shared.poll.is_zero());
        self.run();
    }

    /// Handles the completion eventfd: resumes the requests whose I/O finished.
    pub fn on_completion(&self) {
        if let Err(e) = self.sched.on_completion_event() {
            log::error!("io_uring submission failed: {e}");
        }
    }

    fn run(&self) {
        if let Err(e) = self.sched.run() {
            log::error!("io_uring submission failed: {e}");
        }
    }

    /// Pops the available chains of one vring and spawns a coroutine for each. With
    /// `rearm`, guest notifications are re-enabled afterwards (re-checking for buffers
    /// added meanwhile); without, they stay off for the poll loop. Returns the count.
    fn start_requests(
        self: &Rc<Self>,
        shared: &Arc<Shared>,
        vring: &VringRwLock,
        local: usize,
        queue: usize,
        rearm: bool,
    ) -> usize {
        let mem: Arc<GuestMemoryMmap> = shared.mem.memory().into_inner();
        let chains = match pop_all(vring, &mem, rearm) {
            Ok(c) => c,
            Err(e) => {
                shared.queue_broken(queue, &e);
                return 0;
            }
        };
        let count = chains.len();
        // One atomic add per batch; `notify` subtracts as requests complete.
        shared.in_flight[queue].fetch_add(count, Ordering::AcqRel);
        for chain in chains {
            let head = chain.head_index();
            let (shared2, worker, mem) = (shared.clone(), self.clone(), mem.clone());
            let spawned = self.sched.spawn(move || {
                let (head, used) = shared2.serve(chain, mem);
                worker.complete(local, head, used);
            });
            if let Err(e) = spawned {
                // Out of memory for a stack: give the buffer back rather than leak it.
                log::error!("queue {queue}: cannot start a request coroutine: {e}");
                self.complete(local, head, 0);
            }
        }
        count
    }

    /// Polls this thread's vrings and io_uring for up to `shared.poll` of idleness, with
    /// guest notifications off; re-arms them before returning to epoll.
    pub fn poll(self: &Rc<Self>, shared: &Arc<Shared>, vrings: &[VringRwLock], thread_id: usize) {
        if shared.poll.is_zero() {
            return;
        }
        let mut last_work = Instant::now();
        let mut idle_spins = 0u32;
        loop {
            let mut work = 0;
            if self.sched.has_completions() {
                self.run();
                work += 1;
            }
            let mem = shared.mem.memory();
            for (local, vring) in vrings.iter().enumerate() {
                let Some(queue) = shared.global_queue(thread_id, local) else {
                    continue;
                };
                if !shared.is_broken(queue) && has_avail(vring, &mem) {
                    work += self.start_requests(shared, vring, local, queue, false);
                }
            }
            if work > 0 {
                self.run();
                self.notify(shared);
                idle_spins = 0;
                continue;
            }
            // Reading the clock costs as much as a poll pass: look only every 64 idle passes.
            idle_spins += 1;
            if idle_spins == 1 {
                last_work = Instant::now();
            }
            if idle_spins % 64 == 0 && last_work.elapsed() >= shared.poll {
                // Idle: re-arm notifications. A buffer that arrived in between would get no
                // kick, so if re-arming reports one, keep polling.
                // Broken queues are skipped: their avail index never catches up, so they
                // would look like a race forever.
                let raced = vrings.iter().enumerate().any(|(local, v)| {
                    shared
                        .global_queue(thread_id, local)
                        .is_some_and(|q| !shared.is_broken(q))
                        && v.enable_notification().unwrap_or(false)
                });
                if !raced {
                    return;
                }
                idle_spins = 0;
            }
            std::hint::spin_loop();
        }
    }

    /// The one place a request leaves the device: its used element goes to the used ring
    /// now; [`notify`](Self::notify) settles the batch.
    fn complete(&self, local: usize, head: u16, used: u32) {
        let mut published = self.published.borrow_mut();
        let (Some(vring), Some((Some(queue), count))) =
            (self.vrings.get(local), published.get_mut(local))
        else {
            log::error!("request {head} completed on unknown vring {local}");
            return;
        };
        *count += 1;
        if let Err(e) = vring.get_mut().add_used(head, used) {
            corodev_devices::warn_ratelimited!(
                "queue {queue}: cannot add used element {head}: {e}"
            );
        }
    }

    /// Ends a batch: drops each queue's in-flight count by the requests published since
    /// the last batch, and signals the guest once per such queue if EVENT_IDX says it
    /// wants to be.
    pub fn notify(&self, shared: &Shared) {
        let mut published = self.published.borrow_mut();
        for (vring, (queue, count)) in self.vrings.iter().zip(published.iter_mut()) {
            let (Some(queue), n @ 1..) = (*queue, *count) else {
                continue;
            };
            *count = 0;
            shared.in_flight[queue].fetch_sub(n, Ordering::AcqRel);
            match vring.needs_notification() {
                Ok(false) => {}
                Ok(true) | Err(_) => {
                    if let Err(e) = vring.signal_used_queue() {
                        log::warn!("cannot notify the guest: {e}");
                    }
                }
            }
        }
    }
}

/// Whether the driver has published buffers we have not popped (a read of the avail
/// index in guest memory; no lock beyond the uncontended vring read lock).
fn has_avail(vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    if !queue.ready() {
        return false;
    }
    match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(idx) => idx != Wrapping(queue.next_avail()),
        Err(_) => false,
    }
}

/// Pops every available chain. With `rearm`, re-enables notifications and re-checks, so a
/// buffer added in between is not missed (the EVENT_IDX race); without, leaves them off.
fn pop_all(
    vring: &VringRwLock,
    mem: &Arc<GuestMemoryMmap>,
    rearm: bool,
) -> Result<Vec<virtio_queue::DescriptorChain<Arc<GuestMemoryMmap>>>, virtio_queue::Error> {
    let mut chains = Vec::new();
    let mut state = vring.get_mut();
    loop {
        state.disable_notification()?;
        let queue = state.get_queue_mut();
        chains.extend(queue.iter(mem.clone())?);
        if !rearm || !state.enable_notification()? {
            return Ok(chains);
        }
    }
}

//! The per-thread data path: guest kicks become coroutines, completions resume them.
//!
//! Each vhost-user worker thread owns a [`Worker`] (created on the thread's first event and
//! dropped when the thread exits): a `coro` scheduler with its own io_uring. A kick pops
//! every available descriptor chain and spawns one coroutine per request; the scheduler
//! runs them until each has submitted its I/O and parked, and submits that I/O in one
//! batch. When the ring's eventfd fires, finished requests are resumed, write their status,
//! and add their used element. The guest is notified once per batch per queue, and only if
//! EVENT_IDX says it wants to be.
//!
//! The worker is thread-local because coroutines are `!Send`; the vhost-user library gives
//! us `&self` on a shared backend, so per-thread state cannot live in it.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use coro::io::Ring;
use coro::Scheduler;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use crate::device::Shared;

/// Submission queue entries per worker ring: enough for a full 1024-deep queue per batch;
/// a fuller queue is flushed to the kernel early rather than failing.
const RING_ENTRIES: u32 = 1024;

/// One worker thread's scheduler and notification bookkeeping.
pub struct Worker {
    sched: Scheduler,
    /// Bit `i` set: local vring `i` got used elements since the last notification.
    dirty: Cell<u64>,
}

thread_local! {
    static WORKER: RefCell<Option<Rc<Worker>>> = const { RefCell::new(None) };
}

impl Worker {
    /// This thread's worker, created on first use with the completion eventfd that was
    /// registered for this thread in the epoll loop.
    pub fn get(shared: &Shared, thread_id: usize) -> io::Result<Rc<Worker>> {
        if let Some(w) = WORKER.with(|w| w.borrow().clone()) {
            return Ok(w);
        }
        let efd = shared
            .completion_eventfd(thread_id)
            .ok_or_else(|| io::Error::other(format!("no eventfd for worker {thread_id}")))?;
        let dup = efd.try_clone()?.into_raw_fd();
        // SAFETY: `into_raw_fd` hands us sole ownership of the duplicated descriptor.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        let ring = Ring::with_eventfd(RING_ENTRIES, dup)?;
        let builder = coro::Builder::new()
            .backend(shared.coroutine_backend)
            .stack_size(shared.stack_size);
        let worker = Rc::new(Worker {
            sched: Scheduler::new(builder).with_ring(ring),
            dirty: Cell::new(0),
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
        let mem: Arc<GuestMemoryMmap> = shared.mem.memory().into_inner();
        let chains = match pop_all(vring, &mem) {
            Ok(c) => c,
            Err(e) => {
                shared.queue_broken(queue, &e);
                return;
            }
        };
        for chain in chains {
            let head = chain.head_index();
            shared.in_flight[queue].fetch_add(1, Ordering::AcqRel);
            let (shared2, vring2, worker, mem) =
                (shared.clone(), vring.clone(), self.clone(), mem.clone());
            let spawned = self.sched.spawn(move || {
                let (head, used) = shared2.serve(chain, mem);
                worker.complete(&shared2, &vring2, local, queue, head, used);
            });
            if let Err(e) = spawned {
                // Out of memory for a stack: give the buffer back rather than leak it.
                log::error!("queue {queue}: cannot start a request coroutine: {e}");
                self.complete(shared, vring, local, queue, head, 0);
            }
        }
        if let Err(e) = self.sched.run() {
            log::error!("io_uring submission failed: {e}");
        }
    }

    /// Handles the completion eventfd: resumes the requests whose I/O finished.
    pub fn on_completion(&self) {
        if let Err(e) = self.sched.on_completion_event() {
            log::error!("io_uring submission failed: {e}");
        }
    }

    /// The one place a request leaves the device: used element, in-flight count, and a
    /// note that the queue needs a notification at the end of this batch.
    fn complete(
        &self,
        shared: &Shared,
        vring: &VringRwLock,
        local: usize,
        queue: usize,
        head: u16,
        used: u32,
    ) {
        if let Err(e) = vring.add_used(head, used) {
            shared.guest_error(queue, &format!("cannot add used element {head}: {e}"));
        }
        self.dirty.set(self.dirty.get() | 1 << local);
        shared.in_flight[queue].fetch_sub(1, Ordering::AcqRel);
    }

    /// Signals every queue that got used elements in this batch, if the guest wants it.
    pub fn notify(&self, vrings: &[VringRwLock]) {
        let mut dirty = self.dirty.replace(0);
        while dirty != 0 {
            let local = dirty.trailing_zeros() as usize;
            dirty &= dirty - 1;
            let Some(vring) = vrings.get(local) else {
                continue;
            };
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

/// Pops every available chain, re-checking after re-enabling notifications so a buffer
/// added in between is not missed (the EVENT_IDX race).
fn pop_all(
    vring: &VringRwLock,
    mem: &Arc<GuestMemoryMmap>,
) -> Result<Vec<virtio_queue::DescriptorChain<Arc<GuestMemoryMmap>>>, virtio_queue::Error> {
    let mut chains = Vec::new();
    let mut state = vring.get_mut();
    loop {
        state.disable_notification()?;
        let queue = state.get_queue_mut();
        chains.extend(queue.iter(mem.clone())?);
        if !state.enable_notification()? {
            return Ok(chains);
        }
    }
}

//! What one vhost-user connection shares between the frontend thread (configuration
//! messages) and its worker threads (the data path): the device model, guest memory, the
//! queue-to-worker map, per-queue in-flight counts and broken flags, and the completion
//! eventfds. A new connection gets a fresh one; only the disk outlives it.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use corodev_devices::backend::BlockBackend;
use corodev_devices::blk::VirtioBlk;
use corodev_devices::config::DeviceConfig;

use crate::completion_event::CompletionEvents;
use crate::error::Error;

/// How each worker thread runs its requests.
#[derive(Clone, Copy, Debug)]
pub struct WorkerConfig {
    /// Worker threads per connection (at most one per queue).
    pub threads: usize,
    /// Coroutine switch backend for the workers' schedulers.
    pub coroutine_backend: coro::Backend,
    /// Coroutine stack size in bytes.
    pub stack_size: usize,
    /// Longest busy-poll window after the last work (zero: never poll).
    pub poll: Duration,
}

/// Per-connection device state.
pub struct Connection {
    /// The device model: config space, disk, guest-error log.
    pub blk: VirtioBlk,
    /// Guest memory as updated by the frontend's memory table messages.
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// How the workers run.
    pub workers: WorkerConfig,
    /// The eventfds through which each worker's io_uring wakes it.
    pub completions: CompletionEvents,
    /// Requests started and not yet completed, per queue (for `stop_vring`).
    in_flight: Vec<AtomicUsize>,
    /// Queues found broken (bad avail index): ignored until restarted.
    broken: Vec<AtomicBool>,
    /// `queues_per_thread` masks: bit `q` of entry `t` means thread `t` serves queue `q`.
    thread_masks: Vec<u64>,
    /// Exit-event consumer descriptors handed to the library (see [`Drop for Connection`]).
    exit_fds: Mutex<Vec<RawFd>>,
}

/// vhost-user-backend 0.24 registers each worker's exit-event consumer in epoll with
/// `into_raw_fd()` and never closes it: one eventfd leaked per worker per connection, so a
/// daemon that serves many connections (or a fuzzer) runs out of descriptors. We remember
/// those descriptors and close them when the connection's state goes away, which happens
/// only after the library has joined its workers and dropped their epoll.
impl Drop for Connection {
    fn drop(&mut self) {
        let fds = std::mem::take(self.exit_fds.get_mut().unwrap_or_else(|p| p.into_inner()));
        for fd in fds {
            // SAFETY: the library took these descriptors with `into_raw_fd` and never closes
            // them, so nothing else owns them; its workers and epoll are gone by now.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

impl Connection {
    /// Fresh state for one connection to a device exporting `disk` as `config` describes.
    pub fn new(
        disk: Arc<dyn BlockBackend>,
        config: DeviceConfig,
        workers: WorkerConfig,
    ) -> Result<Connection, Error> {
        let nq = config.num_queues();
        let thread_masks = spread_queues(usize::from(nq), workers.threads);
        Ok(Connection {
            completions: CompletionEvents::new(thread_masks.len(), nq)?,
            blk: VirtioBlk::new(config, disk),
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            workers,
            in_flight: (0..nq).map(|_| AtomicUsize::new(0)).collect(),
            broken: (0..nq).map(|_| AtomicBool::new(false)).collect(),
            thread_masks,
            exit_fds: Mutex::new(Vec::new()),
        })
    }

    /// Which queues each worker thread serves, as the library wants them.
    pub fn thread_masks(&self) -> &[u64] {
        &self.thread_masks
    }

    /// Global queue index of local vring `local` of worker `thread`.
    pub fn global_queue(&self, thread: usize, local: usize) -> Option<usize> {
        let mask = *self.thread_masks.get(thread)?;
        (0..64).filter(|q| mask >> q & 1 == 1).nth(local)
    }

    /// Counts `n` requests of `queue` as started.
    pub fn started(&self, queue: usize, n: usize) {
        if let Some(c) = self.in_flight.get(queue) {
            c.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// Counts `n` requests of `queue` as answered (used element published, guest signalled).
    pub fn finished(&self, queue: usize, n: usize) {
        if let Some(c) = self.in_flight.get(queue) {
            c.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Requests of `queue` started and not yet answered (`None`: no such queue).
    pub fn in_flight(&self, queue: usize) -> Option<usize> {
        Some(self.in_flight.get(queue)?.load(Ordering::Acquire))
    }

    /// Marks a queue broken after the guest corrupted its ring; it needs a reset.
    pub fn queue_broken(&self, queue: usize, e: &virtio_queue::Error) {
        if let Some(b) = self.broken.get(queue) {
            if !b.swap(true, Ordering::AcqRel) {
                log::error!("queue {queue}: ring is broken ({e}); device needs reset, ignoring the queue until it is restarted");
            }
        }
    }

    /// Whether a queue was marked broken and is being ignored until restarted.
    pub fn is_broken(&self, queue: usize) -> bool {
        self.broken
            .get(queue)
            .is_some_and(|b| b.load(Ordering::Acquire))
    }

    /// Serves a restarted queue again.
    pub fn clear_broken(&self, queue: usize) {
        if let Some(b) = self.broken.get(queue) {
            b.store(false, Ordering::Release);
        }
    }

    /// Remembers an exit-event descriptor the library will leak (see `Drop`).
    pub fn adopt_exit_fd(&self, fd: RawFd) {
        if let Ok(mut fds) = self.exit_fds.lock() {
            fds.push(fd);
        }
    }
}

/// Splits `nq` queues over `threads` threads as evenly as possible, contiguous ranges.
fn spread_queues(nq: usize, threads: usize) -> Vec<u64> {
    let threads = threads.clamp(1, nq.max(1));
    let mut masks = vec![0u64; threads];
    for q in 0..nq.min(64) {
        masks[q * threads / nq] |= 1 << q;
    }
    masks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_spread_evenly_and_contiguously() {
        assert_eq!(spread_queues(1, 1), vec![0b1]);
        assert_eq!(spread_queues(4, 2), vec![0b0011, 0b1100]);
        assert_eq!(spread_queues(3, 2), vec![0b011, 0b100]);
        assert_eq!(
            spread_queues(2, 4),
            vec![0b01, 0b10],
            "never more threads than queues"
        );
        let masks = spread_queues(7, 3);
        assert_eq!(masks.iter().map(|m| m.count_ones()).sum::<u32>(), 7);
        assert_eq!(masks.iter().fold(0, |a, m| a | m), 0b111_1111);
    }
}

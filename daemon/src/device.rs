//! The vhost-user-blk device: what the frontend negotiates, and the per-connection glue
//! between the vhost-user library's worker threads and our [`Worker`]s.
//!
//! We implement `VhostUserBackend` directly on a cheap `Arc` handle rather than wrapping a
//! `VhostUserBackendMut` in a `Mutex`/`RwLock`, because those wrappers hold their lock
//! across `handle_event` and `stop_vring`: `stop_vring` waits for in-flight requests, which
//! need `handle_event` on the worker thread to complete, so the wrapper would deadlock.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::EventFd;

use corodev_devices::backend::BlockBackend;
use corodev_devices::config::DeviceConfig;
use corodev_devices::ratelimit::RateLimitedLog;

use crate::worker::Worker;

/// How long `stop_vring` waits for in-flight requests before giving up on them.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the device needs that outlives one request; shared by the frontend thread
/// (configuration messages) and the worker threads (data path).
pub struct Shared {
    /// The storage backend; opened once and kept across connections.
    pub disk: Arc<dyn BlockBackend>,
    /// Device parameters and the guest-visible config space (with the WCE byte).
    pub config: DeviceConfig,
    /// Guest memory as updated by the frontend's memory table messages.
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// Requests started and not yet completed, per queue (for `stop_vring`).
    pub in_flight: Vec<AtomicUsize>,
    /// Queues found broken (bad avail index): ignored until restarted.
    broken: Vec<AtomicBool>,
    acked_features: AtomicU64,
    /// `queues_per_thread` masks: bit `q` of entry `t` means thread `t` serves queue `q`.
    thread_masks: Vec<u64>,
    /// One completion eventfd per worker thread, registered in that thread's epoll.
    completion_fds: Vec<EventFd>,
    /// Coroutine switch backend for the workers' schedulers.
    pub coroutine_backend: coro::Backend,
    /// Coroutine stack size.
    pub stack_size: usize,
    /// How long a worker keeps polling after its last work (zero: never poll).
    pub poll: Duration,
    /// Exit-event consumer descriptors handed to the library (see [`Drop for Shared`]).
    exit_fds: Mutex<Vec<RawFd>>,
    log: RateLimitedLog,
}

/// vhost-user-backend 0.24 registers each worker's exit-event consumer in epoll with
/// `into_raw_fd()` and never closes it: one eventfd leaked per worker per connection, so a
/// daemon that serves many connections (or a fuzzer) runs out of descriptors. We remember
/// those descriptors and close them when the connection's device state goes away, which
/// happens only after the library has joined its workers and dropped their epoll.
impl Drop for Shared {
    fn drop(&mut self) {
        let fds = std::mem::take(self.exit_fds.get_mut().unwrap_or_else(|p| p.into_inner()));
        for fd in fds {
            // SAFETY: the library took these descriptors with `into_raw_fd` and never closes
            // them, so nothing else owns them; its workers and epoll are gone by now.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

/// Per-connection device handle given to the vhost-user library.
#[derive(Clone)]
pub struct BlkDevice(pub Arc<Shared>);

/// The epoll data value for a worker's completion eventfd: the first one the library
/// leaves free (0..num_queues are vrings, num_queues is its exit event).
pub fn completion_event_id(num_queues: usize) -> u64 {
    num_queues as u64 + 1
}

impl Shared {
    /// Device state for one connection.
    pub fn new(
        disk: Arc<dyn BlockBackend>,
        config: DeviceConfig,
        threads: usize,
        coroutine_backend: coro::Backend,
        stack_size: usize,
        poll: Duration,
    ) -> io::Result<Shared> {
        let nq = usize::from(config.num_queues());
        let thread_masks = spread_queues(nq, threads);
        let completion_fds = thread_masks
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Shared {
            disk,
            config,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            in_flight: (0..nq).map(|_| AtomicUsize::new(0)).collect(),
            broken: (0..nq).map(|_| AtomicBool::new(false)).collect(),
            acked_features: AtomicU64::new(0),
            thread_masks,
            completion_fds,
            coroutine_backend,
            stack_size,
            poll,
            exit_fds: Mutex::new(Vec::new()),
            log: RateLimitedLog::default(),
        })
    }

    /// The completion eventfd of worker `thread`.
    pub fn completion_eventfd(&self, thread: usize) -> Option<&EventFd> {
        self.completion_fds.get(thread)
    }

    /// Global queue index of local vring `local` of worker `thread`.
    pub fn global_queue(&self, thread: usize, local: usize) -> Option<usize> {
        let mask = *self.thread_masks.get(thread)?;
        (0..64).filter(|q| mask >> q & 1 == 1).nth(local)
    }

    /// Runs inside a request coroutine: parse, validate, execute, write the status.
    /// Returns the head index and used length for the used ring.
    pub fn serve(
        &self,
        chain: virtio_queue::DescriptorChain<Arc<GuestMemoryMmap>>,
        mem: Arc<GuestMemoryMmap>,
    ) -> (u16, u32) {
        corodev_devices::blk::serve(chain, mem, &self.config, &*self.disk, &self.log)
    }

    /// Logs a guest-caused problem, rate-limited so a guest cannot flood the journal.
    pub fn guest_error(&self, queue: usize, msg: &str) {
        self.log.warn(format_args!("queue {queue}: {msg}"));
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

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.0.config.num_queues())
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.config.queue_size())
    }

    fn features(&self) -> u64 {
        self.0.config.virtio_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.0.acked_features.store(features, Ordering::Release);
        self.0.config.ack_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings track EVENT_IDX themselves (set_queue_event_idx); nothing to keep.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.0.config.read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.0
            .config
            .write(offset, buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // The library updates the GuestMemoryAtomic we handed it; requests take an Arc of
        // the current map when they start, so in-flight ones keep the old map alive.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.0.thread_masks.clone()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => {
                if let Ok(mut fds) = self.0.exit_fds.lock() {
                    fds.push(pair.0.as_raw_fd());
                }
                Some(pair)
            }
            Err(e) => {
                log::error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let q = queue_index as usize;
        let Some(count) = self.0.in_flight.get(q) else {
            return Ok(());
        };
        // The worker keeps completing requests (its completion eventfd stays registered);
        // we only wait. Polling keeps the data path free of any lock or condvar signal.
        let start = Instant::now();
        while count.load(Ordering::Acquire) > 0 {
            if start.elapsed() > STOP_TIMEOUT {
                log::error!(
                    "queue {q}: {} requests still in flight after {STOP_TIMEOUT:?}; stopping anyway",
                    count.load(Ordering::Acquire)
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(b) = self.0.broken.get(q) {
            b.store(false, Ordering::Release);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            log::warn!("worker {thread_id}: unexpected events {evset:?} on {device_event}");
        }
        let worker = Worker::get(&self.0, vrings, thread_id)?;
        worker.woke();
        if u64::from(device_event) == completion_event_id(self.num_queues()) {
            worker.on_completion();
        } else {
            worker.on_kick(usize::from(device_event));
        }
        worker.notify();
        worker.poll();
        Ok(())
    }
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

//! What one vhost-user connection shares between the frontend thread (configuration
//! messages) and its worker threads (the data path): the device model, guest memory, the
//! queue-to-worker map, per-queue in-flight counts and broken flags, the inflight region,
//! the completion eventfds, and the backend channel on which the daemon tells the frontend
//! that the config changed. A new connection gets a fresh one; only the disk outlives it
//! (and the inflight region, which the frontend keeps and hands to the next daemon).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{ShutdownHandle, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use corodev_devices::backend::BlockBackend;
use corodev_devices::blk::VirtioBlk;
use corodev_devices::config::DeviceConfig;
use corodev_devices::request::WriteLog;

use crate::completion_event::CompletionEvents;
use crate::dirty_log::DirtyLog;
use crate::error::Error;
use crate::export_config::StackMode;
use crate::guest_fault;
use crate::image_lock::ImageLock;
use crate::inflight::{InflightError, QueueTracker, Region, RingView};
use crate::stats::ExportStats;

/// Connection ids, unique in the process (0 is never used: the fault registry's "free").
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Longest wait for the frontend's answer on the backend channel (with REPLY_ACK). QEMU answers a config change after one GET_CONFIG round trip on
/// the main socket, in milliseconds; a frontend stuck for this long must not hold the
/// caller (a control API request) for ever.
const BACKEND_REQ_TIMEOUT: Duration = Duration::from_secs(10);

/// How each worker thread runs its requests, and how long a ring stop waits for them.
#[derive(Clone, Copy, Debug)]
pub struct WorkerConfig {
    /// Worker threads per connection (at most one per queue).
    pub threads: usize,
    /// Coroutine switch backend for the workers' schedulers.
    pub coroutine_backend: coro::Backend,
    /// Where the workers' coroutines keep their stacks (`--stack-mode`).
    pub stack_mode: StackMode,
    /// Coroutine stack size in bytes.
    pub stack_size: usize,
    /// Longest busy-poll window after the last work (zero: never poll).
    pub poll: Duration,
    /// How long stopping a ring waits for its requests in flight (`--stop-timeout`).
    pub stop_timeout: Duration,
}

/// A memory map registered for SIGBUS recovery, and the address ranges of its regions.
type GuardedMap = (Weak<GuestMemoryMmap>, Vec<(usize, usize)>);

/// Per-connection device state.
pub struct Connection {
    /// Unique in the process; names this connection's guest mappings in [`guest_fault`].
    id: u64,
    /// Ends the connection from the daemon's side (set once it is accepted).
    shutdown: OnceLock<ShutdownHandle>,
    /// The process-wide fault count last looked at, and whether this connection's memory
    /// was found truncated (reported once).
    faults_seen: AtomicU64,
    memory_lost: AtomicBool,
    /// Memory maps registered with [`guest_fault`], and their ranges: a range is released
    /// once no live map (current, or held by a request in flight) contains it, so a
    /// frontend changing its table over and over cannot fill the registry.
    guarded: Mutex<Vec<GuardedMap>>,
    /// The device model: config space, disk, guest-error log.
    pub blk: VirtioBlk,
    /// Live migration's dirty log: where the guest memory the daemon writes is marked.
    pub dirty: Arc<DirtyLog>,
    /// The export's request statistics, which outlive the connection (see
    /// [`with_stats`](Self::with_stats)).
    pub stats: Arc<ExportStats>,
    /// Guest memory as the vhost-user library keeps it. The library swaps a new map in
    /// here *before* it tells us ([`memory_changed`](Self::memory_changed)), so the data
    /// path never reads it: a worker that took the new map in between touched memory not
    /// yet registered with [`guest_fault`], and a frontend truncating its file meanwhile
    /// killed the daemon with SIGBUS. Workers use [`memory_map`](Self::memory_map).
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// The map the data path uses, with its generation: replaced only once the library's
    /// new map is guarded and shared with the disk.
    map: Mutex<(u64, Arc<GuestMemoryMmap>)>,
    /// The generation of `map`: a worker keeps its own handle on the map and compares
    /// this, one plain load, where loading a shared map (about 20 ns) on every poll pass
    /// and pop was 3% of a busy worker's time.
    mem_generation: AtomicU64,
    /// How the workers run.
    pub workers: WorkerConfig,
    /// The eventfds through which each worker's io_uring wakes it.
    pub completions: CompletionEvents,
    /// Per-queue state shared with the frontend thread.
    queues: Vec<QueueState>,
    /// The frontend's inflight region (SET_INFLIGHT_FD), if it gave one: each queue
    /// records its requests in flight there from its next start.
    inflight: Mutex<Option<Arc<Region>>>,
    /// The backend channel (SET_BACKEND_REQ_FD, with `VHOST_USER_PROTOCOL_F_BACKEND_REQ`),
    /// if the frontend gave one. The mutex is held only to store or clone the handle,
    /// never while a message is sent (see [`notify_config_change`](Self::notify_config_change)).
    backend_req: Mutex<Option<Backend>>,
    /// Set once the frontend is gone: each worker finishes what is in flight, frees its
    /// scheduler, ring, stacks and memory map, and counts itself out of `live_workers`.
    closing: AtomicBool,
    /// Set when the daemon is told to stop while the frontend is still connected: no
    /// queue is popped any more, so what is in flight can finish before the hang-up.
    draining: AtomicBool,
    /// Workers holding per-thread state (a scheduler), and a condvar to wait for zero.
    live_workers: (Mutex<usize>, Condvar),
    /// `queues_per_thread` masks: bit `q` of entry `t` means thread `t` serves queue `q`.
    thread_masks: Vec<u64>,
    /// Exit-event consumer descriptors handed to the library (see [`Drop for Connection`]).
    exit_fds: Mutex<Vec<RawFd>>,
    /// The watchdog's challenge round ([`ping_workers`](Self::ping_workers)), and per
    /// worker thread the last round it answered: see [`crate::systemd`].
    watchdog_round: AtomicU64,
    answered: Vec<AtomicU64>,
    /// The image's lock: taken in full when a ring starts, given up when every ring has
    /// stopped during a migration or the frontend left with every ring stopped (see
    /// [`crate::image_lock`]).
    image_lock: Option<Arc<ImageLock>>,
}

/// vhost-user-backend 0.24 registers each worker's exit-event consumer in epoll with
/// `into_raw_fd()` and never closes it: one eventfd leaked per worker per connection, so a
/// daemon that serves many connections (or a fuzzer) runs out of descriptors. We remember
/// those descriptors and close them when the connection's state goes away, which happens
/// only after the library has joined its workers and dropped their epoll.
impl Drop for Connection {
    fn drop(&mut self) {
        guest_fault::unregister(self.id, None);
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
        let dirty = Arc::new(DirtyLog::default());
        Ok(Connection {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shutdown: OnceLock::new(),
            faults_seen: AtomicU64::new(0),
            memory_lost: AtomicBool::new(false),
            guarded: Mutex::new(Vec::new()),
            completions: CompletionEvents::new(thread_masks.len(), nq)?,
            blk: VirtioBlk::new(config, disk).with_write_log(dirty.clone()),
            dirty,
            stats: Arc::new(ExportStats::new(usize::from(nq))),
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            map: Mutex::new((0, Arc::new(GuestMemoryMmap::new()))),
            mem_generation: AtomicU64::new(0),
            workers,
            queues: (0..nq).map(|_| QueueState::default()).collect(),
            inflight: Mutex::new(None),
            backend_req: Mutex::new(None),
            closing: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            live_workers: (Mutex::new(0), Condvar::new()),
            answered: thread_masks.iter().map(|_| AtomicU64::new(0)).collect(),
            thread_masks,
            exit_fds: Mutex::new(Vec::new()),
            watchdog_round: AtomicU64::new(0),
            image_lock: None,
        })
    }

    /// This connection counts its requests in `stats`, the export's, instead of in
    /// counters of its own: the export's statistics go on over reconnects.
    pub fn with_stats(mut self, stats: Arc<ExportStats>) -> Connection {
        self.stats = stats;
        self
    }

    /// This connection's device serves an image locked by `lock`.
    pub fn with_image_lock(mut self, lock: Option<Arc<ImageLock>>) -> Connection {
        self.image_lock = lock;
        self
    }

    /// A ring is about to start: the guest runs on this daemon, which must hold the
    /// image's write lock (the destination of a migration takes it now; a source whose
    /// migration failed takes it back).
    pub fn activate_image(&self) -> Result<(), crate::image_lock::LockError> {
        match &self.image_lock {
            Some(lock) if !lock.is_active() => {
                lock.activate()?;
                log::info!(
                    "disk {}: write lock taken: the guest runs here",
                    lock.path().display()
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A ring stopped: once every ring is stopped while dirty-page logging is on, the
    /// guest is moving to the destination of a migration, whose daemon needs the write
    /// lock: give it up.
    pub fn ring_stopped(&self) {
        if self.dirty.logging() {
            self.release_image("every ring stopped during a migration");
        }
    }

    /// The frontend hung up. If it had stopped every ring (a VM that shut down, or a
    /// paused VM that migrated away: QEMU sends a stopped device nothing at the
    /// switch-over), the guest no longer runs here: the write lock is given up until a
    /// ring starts again. A frontend that vanished with rings running (QEMU killed) keeps
    /// it: it comes back (reconnect=1) to the same guest.
    pub fn frontend_left(&self) {
        self.release_image("the frontend left with every ring stopped");
    }

    /// Gives the image's write lock up if no ring runs.
    fn release_image(&self, why: &str) {
        let Some(lock) = &self.image_lock else {
            return;
        };
        let running = self
            .queues
            .iter()
            .any(|q| q.running.load(Ordering::Acquire));
        if !running && lock.is_active() {
            lock.inactivate();
            log::info!("disk {}: write lock released: {why}", lock.path().display());
        }
    }

    /// Records how to end this connection from the daemon's side.
    pub fn set_shutdown(&self, handle: ShutdownHandle) {
        let _ = self.shutdown.set(handle);
    }

    /// Adopts the map the library has just put in `mem` (after every memory table
    /// change, before the frontend gets its answer): registers its regions for SIGBUS
    /// recovery, tells the disk, and only then hands it to the workers under a new
    /// generation. A frontend publishes requests that use a new region only after that
    /// answer, so a worker that reads the avail index and then the generation sees the
    /// change before it parses them (see `ring::pop_all`). A refusal from the disk fails
    /// the frontend's message; the map is adopted anyway (the library holds it already).
    pub fn memory_changed(&self) -> std::io::Result<()> {
        use vm_memory::GuestAddressSpace;
        let mem = self.mem.memory().into_inner();
        self.guard_memory(&mem);
        let shared = self.share_memory_with_disk(&mem);
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let generation = map.0 + 1;
        *map = (generation, mem);
        self.mem_generation.store(generation, Ordering::Release);
        shared
    }

    /// Which map [`memory_map`](Self::memory_map) holds: changes after every
    /// [`memory_changed`](Self::memory_changed). One atomic load.
    pub fn memory_generation(&self) -> u64 {
        self.mem_generation.load(Ordering::Acquire)
    }

    /// The guest memory map for the data path, with its generation: every region of it is
    /// registered for SIGBUS recovery.
    pub fn memory_map(&self) -> (u64, Arc<GuestMemoryMmap>) {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        (map.0, map.1.clone())
    }

    /// Registers `mem`'s regions for SIGBUS recovery, and releases those of maps no
    /// longer alive.
    fn guard_memory(&self, mem: &Arc<GuestMemoryMmap>) {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mut ranges = Vec::new();
        for region in mem.iter() {
            let page = region
                .file_offset()
                .map_or(0, |f| guest_fault::page_size_of(f.file()));
            // `len` of a mapped region fits the address space.
            let len = region.len() as usize;
            guest_fault::register(self.id, region.as_ptr(), len, page);
            ranges.push((region.as_ptr() as usize, region.as_ptr() as usize + len));
        }
        let mut guarded = self.guarded.lock().unwrap_or_else(PoisonError::into_inner);
        guarded.push((Arc::downgrade(mem), ranges));
        let (live, dead): (Vec<_>, Vec<_>) =
            guarded.drain(..).partition(|(m, _)| m.strong_count() > 0);
        for range in dead.iter().flat_map(|(_, r)| r) {
            if !live.iter().any(|(_, r)| r.contains(range)) {
                guest_fault::unregister(self.id, Some(*range));
            }
        }
        *guarded = live;
    }

    /// Tells the disk what guest memory is now (every region of `mem`), so a backend
    /// whose device reaches guest memory by DMA maps it (see `BlockBackend::guest_memory`).
    fn share_memory_with_disk(&self, mem: &GuestMemoryMmap) -> std::io::Result<()> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.as_ptr() as u64, r.len())).collect();
        self.blk.disk().guest_memory(&regions)
    }

    /// Called on the data path: if the frontend truncated this connection's guest memory
    /// (a SIGBUS was recovered in it), closes the connection once, loudly. Costs one atomic
    /// load while no fault ever happened in the process.
    pub fn check_memory(&self) {
        let total = guest_fault::total_faults();
        if total == self.faults_seen.load(Ordering::Acquire) {
            return;
        }
        let mine = guest_fault::faults(self.id);
        if mine == 0 {
            self.faults_seen.store(total, Ordering::Release);
            return;
        }
        // Until the connection can be shut down (it is being accepted), look again later.
        let Some(h) = self.shutdown.get() else {
            return;
        };
        self.faults_seen.store(total, Ordering::Release);
        if !self.memory_lost.swap(true, Ordering::AcqRel) {
            log::error!(
                "guest memory was truncated by the frontend ({mine} page(s) past the end of its file accessed); closing the connection"
            );
            h.shutdown();
        }
    }

    /// Keeps the frontend's backend channel (SET_BACKEND_REQ_FD), its waits for replies
    /// bounded by [`BACKEND_REQ_TIMEOUT`]. The library has already set its REPLY_ACK flag
    /// if that feature was acked (the frontend negotiates features before it sends the
    /// channel).
    pub fn set_backend_req(&self, channel: Backend) {
        channel.set_reply_timeout(Some(BACKEND_REQ_TIMEOUT));
        *self
            .backend_req
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(channel);
    }

    /// Tells the frontend that the config space changed (the export was resized):
    /// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend channel. `Ok(false)` if the
    /// frontend gave no channel: it sees the new config at its next GET_CONFIG (a reboot,
    /// a reconnect).
    ///
    /// Call it from a thread of its own, holding no lock the frontend thread needs: with
    /// REPLY_ACK, QEMU fetches the new config with GET_CONFIG on the main socket before
    /// it answers, so this waits for the frontend thread to serve that. It takes only
    /// the channel's mutex, to clone the handle, and waits at most
    /// [`BACKEND_REQ_TIMEOUT`]; past it the library gives the channel up (a late answer
    /// would be read as the next one's), and later notices on this connection fail at
    /// once.
    pub fn notify_config_change(&self) -> io::Result<bool> {
        let channel = self
            .backend_req
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(channel) = channel else {
            return Ok(false);
        };
        channel.handle_config_change()?;
        Ok(true)
    }

    /// Tracks requests in flight in `region` from each queue's next start.
    pub fn set_inflight(&self, region: Arc<Region>) {
        *self.inflight.lock().unwrap_or_else(PoisonError::into_inner) = Some(region);
    }

    /// The inflight region, if the frontend gave one.
    pub fn inflight(&self) -> Option<Arc<Region>> {
        self.inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A ring starts: with an inflight region, reconciles the queue's part with the ring,
    /// sets the avail position past every request popped before a restart and queues those
    /// left in flight for resubmission, then raises the ring's kick so its worker serves
    /// them at once. Without one, the queue simply records nothing.
    pub fn start_queue(&self, queue: usize, vring: &VringRwLock) -> Result<(), InflightError> {
        let Some(state) = self.queue(queue) else {
            return Ok(());
        };
        {
            let ring = vring.get_ref();
            let q = ring.get_queue();
            state.set_used_ring(q.used_ring(), 6 + 8 * u64::from(q.size()));
        }
        let Some(region) = self.inflight() else {
            state.start(None, Vec::new());
            return Ok(());
        };
        let tracker = region.queue(queue)?;
        let (_, mem) = self.memory_map();
        let mut vstate = vring.get_mut();
        let q = vstate.get_queue();
        let (size, avail_ring) = (q.size(), q.avail_ring());
        let view = RingView {
            size,
            used_idx: q
                .used_idx(&*mem, Ordering::Acquire)
                .map_err(InflightError::Ring)?
                .0,
            avail_idx: q
                .avail_idx(&*mem, Ordering::Acquire)
                .map_err(InflightError::Ring)?
                .0,
            // The avail ring: flags, idx, then one little-endian u16 per slot.
            avail_head: |pos: u16| {
                let slot = u64::from(pos % size);
                mem.load::<u16>(GuestAddress(avail_ring + 4 + 2 * slot), Ordering::Acquire)
                    .ok()
                    .map(u16::from_le)
            },
        };
        let Some(resume) = tracker.resume(&view)? else {
            state.start(Some(Arc::new(tracker)), Vec::new());
            return Ok(());
        };
        vstate.get_queue_mut().set_next_avail(resume.next_avail);
        let count = resume.heads.len();
        state.start(Some(Arc::new(tracker)), resume.heads);
        if count > 0 {
            log::info!(
                "queue {queue}: resubmitting {count} request(s) left in flight by the previous daemon; {} of them were overtaken (completed out of order)",
                resume.overtaken
            );
            if let Some(kick) = vstate.get_kick() {
                if let Err(e) = raise(kick) {
                    log::error!("queue {queue}: cannot raise the kick to resubmit: {e}");
                }
            }
        }
        Ok(())
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

    /// The shared state of `queue` (`None`: no such queue).
    pub fn queue(&self, queue: usize) -> Option<&QueueState> {
        self.queues.get(queue)
    }

    /// Requests of `queue` started and not yet answered (`None`: no such queue).
    pub fn in_flight(&self, queue: usize) -> Option<usize> {
        Some(self.queues.get(queue)?.in_flight.load(Ordering::Acquire))
    }

    /// Whether a queue was marked broken and is being ignored until restarted.
    pub fn is_broken(&self, queue: usize) -> bool {
        self.queues
            .get(queue)
            .is_some_and(|q| q.broken.load(Ordering::Acquire))
    }

    /// Stops popping every queue and waits up to `timeout` until none has a request in
    /// flight: a stop (SIGTERM) answers everything it took before it hangs up, so the
    /// frontend's idea of the rings (QEMU restarts them at the used index when it cannot
    /// ask) is exact, with or without an inflight region. False if requests were still in
    /// flight at the timeout.
    pub fn drain(&self, timeout: Duration) -> bool {
        self.draining.store(true, Ordering::Release);
        for worker in 0..self.thread_masks.len() {
            self.completions.wake(worker);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let busy = self
                .queues
                .iter()
                .any(|q| q.in_flight.load(Ordering::Acquire) > 0);
            if !busy {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Whether the queues are no longer popped (see [`drain`](Self::drain)).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Whether the frontend is gone and the workers are to wind down.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Counts a worker that now holds per-thread state.
    /// Counts a worker about to create its per-thread state; false once the connection is
    /// closing (then it must create none). Checked and counted under the same lock that
    /// `close_workers` sets `closing` under, so a worker is either counted before the close
    /// starts waiting or sees it.
    pub fn worker_started(&self) -> bool {
        let mut live = self.live_lock();
        if self.closing.load(Ordering::Acquire) {
            return false;
        }
        *live += 1;
        true
    }

    /// Counts a worker that has freed its per-thread state.
    pub fn worker_stopped(&self) {
        let mut live = self.live_lock();
        *live = live.saturating_sub(1);
        self.live_workers.1.notify_all();
    }

    /// After the frontend is gone: tells every worker to finish its requests in flight and
    /// free its state, and waits for them, up to `timeout`. `Err(n)`: `n` workers still
    /// had requests in flight then.
    pub fn close_workers(&self, timeout: Duration) -> Result<(), usize> {
        {
            let _live = self.live_lock();
            self.closing.store(true, Ordering::Release);
        }
        for worker in 0..self.thread_masks.len() {
            self.completions.wake(worker);
        }
        let deadline = Instant::now() + timeout;
        let mut live = self.live_lock();
        while *live > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(*live);
            }
            live = self
                .live_workers
                .1
                .wait_timeout(live, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }

    fn live_lock(&self) -> std::sync::MutexGuard<'_, usize> {
        // A counter stays consistent whatever panicked while holding it.
        self.live_workers
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Worker `thread` is running its event loop: it answers the watchdog's current round.
    /// Called on every event the thread handles, before anything else.
    pub fn beat(&self, thread: usize) {
        if let Some(a) = self.answered.get(thread) {
            a.store(
                self.watchdog_round.load(Ordering::Acquire),
                Ordering::Release,
            );
        }
    }

    /// Starts a new watchdog round: every worker thread is woken (through its completion
    /// eventfd, as if I/O had completed) and answers by [`beat`](Self::beat)ing once its
    /// event loop gets to it.
    pub fn ping_workers(&self) {
        self.watchdog_round.fetch_add(1, Ordering::AcqRel);
        for worker in 0..self.thread_masks.len() {
            self.completions.wake(worker);
        }
    }

    /// The worker threads that have not answered the current round.
    pub fn silent_workers(&self) -> Vec<usize> {
        let round = self.watchdog_round.load(Ordering::Acquire);
        self.answered
            .iter()
            .enumerate()
            .filter(|(_, a)| a.load(Ordering::Acquire) < round)
            .map(|(t, _)| t)
            .collect()
    }

    /// Remembers an exit-event descriptor the library will leak (see `Drop`).
    pub fn adopt_exit_fd(&self, fd: RawFd) {
        if let Ok(mut fds) = self.exit_fds.lock() {
            fds.push(fd);
        }
    }
}

/// What the frontend thread and the queue's worker share about one queue.
///
/// Aligned to 128 bytes (two cache lines: the adjacent-line prefetcher pairs them) so that
/// the queues of one connection, kept side by side in a `Vec` and served by different
/// workers, never share a line: each worker writes its queue's in-flight count on every
/// batch, which would otherwise invalidate its neighbour's flags in the other worker's
/// cache on every batch too.
#[derive(Default)]
#[repr(align(128))]
pub struct QueueState {
    /// Requests popped and not yet answered (used element published and the guest
    /// signalled). Raised under the vring lock as chains are popped, so GET_VRING_BASE,
    /// which stops the ring under that lock and then waits for zero, never misses one.
    pub in_flight: AtomicUsize,
    /// The guest corrupted the ring: nothing more is popped until the ring is set up again.
    broken: AtomicBool,
    /// Where requests are recorded in flight while the ring runs (`None`: the frontend
    /// gave no inflight region). Set when the ring starts.
    tracker: Mutex<Option<Arc<QueueTracker>>>,
    /// Heads a previous daemon left in flight, oldest first: served before any new
    /// request. `resubmit_pending` saves the data path a lock while there are none.
    resubmit: Mutex<Vec<u16>>,
    resubmit_pending: AtomicBool,
    /// The used ring's guest address and length while the ring runs: the whole ring is
    /// marked dirty when it stops during a migration (see [`crate::dirty_log`]).
    used_ring: Mutex<Option<(u64, u64)>>,
    /// Raised by every start and stop: a worker that saw the same value has the current
    /// tracker, and need not take the lock to look.
    generation: AtomicU64,
    /// Between the ring's start and its stop.
    running: AtomicBool,
}

impl QueueState {
    /// Marks the queue broken; true if it was not already.
    pub fn mark_broken(&self) -> bool {
        !self.broken.swap(true, Ordering::AcqRel)
    }

    /// The ring starts: record requests in `tracker`, and serve `resubmit` first.
    pub fn start(&self, tracker: Option<Arc<QueueTracker>>, resubmit: Vec<u16>) {
        self.running.store(true, Ordering::Release);
        *self.tracker.lock().unwrap_or_else(PoisonError::into_inner) = tracker;
        let pending = !resubmit.is_empty();
        *self.resubmit.lock().unwrap_or_else(PoisonError::into_inner) = resubmit;
        self.resubmit_pending.store(pending, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The ring stopped with nothing in flight: it will be set up afresh (and reconciled
    /// with the inflight region again) before it starts again. Returns where its used
    /// ring was.
    pub fn stop(&self) -> Option<(u64, u64)> {
        self.broken.store(false, Ordering::Release);
        self.start(None, Vec::new());
        self.running.store(false, Ordering::Release);
        self.used_ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn set_used_ring(&self, addr: u64, len: u64) {
        *self
            .used_ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((addr, len));
    }

    /// Where this queue records requests in flight, if it changed since `seen` (a value
    /// of the start/stop generation a previous call stored there): one atomic load on the
    /// data path while the ring runs.
    pub fn tracker_update(&self, seen: &mut u64) -> Option<Option<Arc<QueueTracker>>> {
        let now = self.generation.load(Ordering::Acquire);
        if now == *seen {
            return None;
        }
        *seen = now;
        Some(
            self.tracker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }

    /// The heads to resubmit, once (empty after the first call).
    pub fn take_resubmit(&self) -> Vec<u16> {
        if !self.resubmit_pending.load(Ordering::Acquire)
            || !self.resubmit_pending.swap(false, Ordering::AcqRel)
        {
            return Vec::new();
        }
        std::mem::take(&mut *self.resubmit.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Counts `n` requests answered.
    pub fn finished(&self, n: usize) {
        self.in_flight.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Adds one to an eventfd we hold the read end of (a ring's kick), through a duplicate
/// of its descriptor, so its reader wakes up as if the frontend had written it.
fn raise(fd: &impl AsRawFd) -> std::io::Result<()> {
    use std::io::Write;
    // SAFETY: `fd` is open for as long as the borrow, which ends in this statement.
    let owned = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }.try_clone_to_owned()?;
    let file = std::fs::File::from(owned);
    (&file).write_all(&1u64.to_ne_bytes())
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

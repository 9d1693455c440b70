//! The vhost-user-blk device as the vhost-user library sees it: what the frontend
//! negotiates (features, protocol features, config space), ring stops, and the dispatch
//! of each worker-thread event to that thread's [`Worker`].
//!
//! We implement `VhostUserBackend` directly on a cheap `Arc` handle rather than wrapping a
//! `VhostUserBackendMut` in a `Mutex`/`RwLock`, because those wrappers hold their lock
//! across `handle_event` and `stop_vring`: `stop_vring` waits for in-flight requests, which
//! need `handle_event` on the worker thread to complete, so the wrapper would deadlock.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserLog, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringRwLock};

use corodev_devices::request::WriteLog;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::connection::Connection;
use crate::inflight::{self, InflightError, Region};
use crate::worker::Worker;

/// Per-connection device handle given to the vhost-user library.
#[derive(Clone)]
pub struct BlkDevice(pub Arc<Connection>);

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.0.blk.config().num_queues())
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.blk.config().queue_size())
    }

    /// The device's virtio bits plus vhost-user's `VHOST_USER_F_PROTOCOL_FEATURES`, so the
    /// frontend goes on to negotiate protocol features (CONFIG, MQ, ...), and
    /// `VHOST_F_LOG_ALL`: the daemon marks the pages it writes while the VM migrates.
    fn features(&self) -> u64 {
        self.0.blk.config().virtio_features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    /// `VHOST_F_LOG_ALL` switches dirty-page logging on (migration starts) and off (it
    /// ended or was cancelled); the rest are the device's.
    fn acked_features(&self, features: u64) {
        self.0.blk.config().ack_features(features);
        let on = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if self.0.dirty.set_on(on) {
            log::info!(
                "dirty page logging {}",
                if on {
                    "on: migration started"
                } else {
                    "off: migration ended"
                }
            );
        }
    }

    /// `BACKEND_REQ`: the frontend hands over a channel on which the daemon tells it that
    /// the config space changed (a resized export), see [`Connection::notify_config_change`].
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings track EVENT_IDX themselves (set_queue_event_idx); nothing to keep.
    }

    /// Atomics only: a config-change notice may be waiting for this answer (see
    /// [`Connection::notify_config_change`]).
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.0.blk.config().read(offset, size)
    }

    fn set_backend_req_fd(&self, channel: Backend) {
        self.0.set_backend_req(channel);
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let blk = &self.0.blk;
        blk.config()
            .write_config(offset, buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // The guest can toggle the cache as fast as it likes: through the device's limiter.
        blk.log().log(
            log::Level::Info,
            format_args!(
                "guest set the write cache to {}",
                if blk.config().writeback() {
                    "writeback"
                } else {
                    "writethrough"
                }
            ),
        );
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // The library has put the new map in the GuestMemoryAtomic we handed it; requests
        // take an Arc of the map when they start, so in-flight ones keep the old one alive.
        self.0.memory_changed()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.0.thread_masks().to_vec()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => {
                self.0.adopt_exit_fd(pair.0.as_raw_fd());
                Some(pair)
            }
            Err(e) => {
                log::error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    /// GET_VRING_BASE: "stop ring upon receiving VHOST_USER_GET_VRING_BASE" (vhost-user
    /// spec, "Starting and stopping rings"), and the base returned must account for every
    /// request, so this returns only when none of the ring's requests is in flight. The
    /// library has already marked the queue not ready (under the vring lock), so no new
    /// chain is popped; the worker keeps completing the rest (its completion eventfd stays
    /// registered). Past `--stop-timeout` the answer would be a lie: the error closes the
    /// connection instead.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let q = queue_index as usize;
        let Some(state) = self.0.queue(q) else {
            return Ok(());
        };
        // Polling keeps the data path free of any lock or condvar signal.
        let start = Instant::now();
        let timeout = self.0.workers.stop_timeout;
        loop {
            let n = state.in_flight.load(std::sync::atomic::Ordering::Acquire);
            if n == 0 {
                break;
            }
            if start.elapsed() > timeout {
                log::error!(
                    "queue {q}: {n} requests still in flight after {timeout:?}; cannot stop the ring, closing the connection"
                );
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("queue {q}: {n} requests still in flight"),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // The ring will be set up afresh before it is started again. During a migration
        // this is the switch-over: the whole used ring is marked, its notification fields
        // included, which the worker writes without marking.
        if let Some((addr, len)) = state.stop() {
            self.0.dirty.mark(addr, len);
        }
        self.0.ring_stopped();
        Ok(())
    }

    /// Reconciles the ring with the inflight region, if the frontend gave one, and queues
    /// the requests a previous daemon left in flight (see [`crate::inflight`]).
    fn start_vring(&self, queue_index: u32, vring: &VringRwLock) -> io::Result<()> {
        // Nothing may be served before this daemon holds the image's write lock.
        if let Err(e) = self.0.activate_image() {
            self.0.blk.log().log(
                log::Level::Error,
                format_args!("queue {queue_index}: not starting: {e}"),
            );
            return Err(io::Error::new(io::ErrorKind::ResourceBusy, e));
        }
        self.0
            .start_queue(queue_index as usize, vring)
            .map_err(|e| self.refuse_region(&format!("queue {queue_index}"), e))
    }

    /// SET_LOG_BASE: the daemon marks dirty pages itself (see [`crate::dirty_log`]).
    fn set_log_base(&self, log: &VhostUserLog, file: &File) -> io::Result<bool> {
        use vm_memory::GuestMemoryBackend;
        let mem_end = self.0.memory_map().1.last_addr().0.saturating_add(1);
        if let Err(e) = self.0.dirty.set_base(log, file, mem_end) {
            self.0.blk.log().log(log::Level::Error, format_args!("{e}"));
            return Err(e);
        }
        Ok(true)
    }

    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let (reply, file) = inflight::allocate(msg, self.queue_count(), self.max_queue_size16())
            .map_err(|e| self.refuse_region("GET_INFLIGHT_FD", e))?;
        log::info!(
            "inflight region allocated: {} queue(s) of {} descriptors",
            reply.num_queues,
            reply.queue_size
        );
        Ok((reply, file))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        let region = Region::map(msg, file, self.queue_count(), self.max_queue_size16())
            .map_err(|e| self.refuse_region("SET_INFLIGHT_FD", e))?;
        self.0.set_inflight(region);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // Any event proves this thread's loop runs: the watchdog's wake-ups need no more.
        self.0.beat(thread_id);
        if evset != EventSet::IN {
            self.0.blk.log().warn(format_args!(
                "worker {thread_id}: unexpected events {evset:?} on {device_event}"
            ));
        }
        if self.0.is_closing() {
            // The frontend is gone: finish and free this thread's requests and state. The
            // wake-up that brought us here is consumed, or the level-triggered eventfd
            // would spin this thread until the library's exit event.
            self.0.completions.clear(thread_id);
            Worker::shut_down();
            return Ok(());
        }
        if self.0.completions.is_completion(device_event) && Worker::current().is_none() {
            // A wake-up (the watchdog's, or a drain's) of a thread that has served nothing
            // yet: no ring to run, and no reason to create one.
            self.0.completions.clear(thread_id);
            return Ok(());
        }
        let Some(worker) = Worker::get(&self.0, vrings, thread_id)? else {
            self.0.completions.clear(thread_id);
            return Ok(());
        };
        worker.woke();
        if self.0.completions.is_completion(device_event) {
            worker.on_completion();
        } else {
            worker.on_kick(usize::from(device_event));
        }
        worker.notify();
        worker.poll();
        self.0.check_memory();
        Ok(())
    }
}

impl BlkDevice {
    fn queue_count(&self) -> u16 {
        self.0.blk.config().num_queues()
    }

    fn max_queue_size16(&self) -> u16 {
        self.0.blk.config().queue_size()
    }

    /// The frontend's inflight region does not fit: one line (rate-limited: the frontend
    /// can repeat the message), and the message is refused.
    fn refuse_region(&self, what: &str, e: InflightError) -> io::Error {
        self.0.blk.log().log(
            log::Level::Error,
            format_args!("{what}: inflight region refused: {e}"),
        );
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::WorkerConfig;
    use corodev_devices::backend::NullBackend;
    use corodev_devices::config::{DeviceConfig, DeviceParams};

    fn device(readonly: bool) -> BlkDevice {
        let disk = Arc::new(NullBackend::new(1 << 20, Duration::ZERO));
        let config = DeviceConfig::build(DeviceParams {
            num_queues: 3,
            readonly,
            ..DeviceParams::for_backend(&*disk)
        })
        .expect("valid device");
        let workers = WorkerConfig {
            threads: 2,
            coroutine_backend: coro::Backend::Fast,
            stack_mode: crate::export_config::StackMode::Auto,
            stack_size: coro::DEFAULT_STACK_SIZE,
            poll: Duration::ZERO,
            stop_timeout: Duration::from_secs(30),
        };
        BlkDevice(Arc::new(
            Connection::new(disk, config, workers).expect("connection"),
        ))
    }

    #[test]
    fn offers_the_model_features_plus_protocol_features_and_dirty_logging() {
        let dev = device(true);
        let model = dev.0.blk.config().virtio_features();
        let vhost = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        assert_eq!(model & vhost, 0, "the model leaves the transport bits out");
        assert_eq!(dev.features(), model | vhost);
        let pf = dev.protocol_features();
        assert!(pf.contains(
            VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD
                | VhostUserProtocolFeatures::BACKEND_REQ
        ));
        assert_eq!(dev.num_queues(), 3);
        assert_eq!(dev.queues_per_thread(), vec![0b011, 0b100]);
    }

    /// The library puts a frontend's new map in `mem` before it calls `update_memory`. A
    /// worker that took the map from there in between touched memory not yet registered
    /// for SIGBUS recovery, and a frontend truncating its file meanwhile killed the daemon
    /// (the hostile-frontend suite's churn test, once in CI). The data path's map changes
    /// only once the new one is guarded: before, this test died of SIGBUS.
    #[test]
    fn the_data_path_gets_a_new_map_only_once_it_is_guarded() {
        use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
        let dev = device(false);
        let file = tempfile::tempfile().expect("a memory file");
        file.set_len(8192).expect("two pages");
        let region = (
            GuestAddress(0),
            8192,
            Some(FileOffset::new(file.try_clone().expect("fd"), 0)),
        );
        let map = GuestMemoryMmap::from_ranges_with_files([region]).expect("mapped");
        // The frontend truncates its file; the library swaps the map in.
        file.set_len(4096).expect("truncated");
        dev.0.mem.lock().expect("lock").replace(map);
        let read = |dev: &BlkDevice| {
            let mut byte = [0xffu8];
            let (_, mem) = dev.0.memory_map();
            mem.read_slice(&mut byte, GuestAddress(4096))
                .map(|()| byte[0])
        };
        assert!(
            read(&dev).is_err(),
            "until update_memory the data path keeps the old (empty) map"
        );
        let faults = crate::guest_fault::total_faults();
        dev.update_memory(dev.0.mem.clone()).expect("adopted");
        assert_eq!(
            read(&dev).ok(),
            Some(0),
            "the page past the end reads as zeroes"
        );
        assert_eq!(
            crate::guest_fault::total_faults(),
            faults + 1,
            "one recovered fault"
        );
    }

    #[test]
    fn a_config_change_goes_out_on_the_backend_channel() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let dev = device(false);
        assert!(
            !dev.0.notify_config_change().expect("no channel"),
            "no channel: nothing to tell"
        );
        let (ours, mut frontend) = UnixStream::pair().expect("socketpair");
        dev.set_backend_req_fd(Backend::from_stream(ours));
        assert!(dev.0.notify_config_change().expect("sent"));
        let mut hdr = [0u8; 12];
        frontend.read_exact(&mut hdr).expect("the message");
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        assert_eq!(word(0), 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
        assert_eq!(word(4), 1, "version 1, no reply asked without REPLY_ACK");
        assert_eq!(word(8), 0, "no payload");
    }

    #[test]
    fn config_writes_other_than_writeback_are_refused() {
        let dev = device(false);
        let err = dev.set_config(0, &[1]).expect_err("capacity is read-only");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("read-only"), "{err}");
    }
}

//! Fuzzes a whole request's life on untrusted guest memory: the input is a 64 KiB guest
//! memory image holding a split queue (descriptor table at 0, avail ring after it) plus
//! whatever buffers the descriptors point at. We pop one chain, parse it and serve it on
//! the null backend inside a real coroutine, which writes data and the status byte into
//! guest memory. ASan catches any access outside the two guest regions.

#![no_main]

use std::sync::Arc;
use std::time::Duration;

use corodev_devices::backend::NullBackend;
use corodev_devices::blk::VirtioBlk;
use corodev_devices::config::{DeviceConfig, DeviceParams};
use corodev_devices::memory::GuestMap;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const REGION: usize = 32 * 1024;
const QSIZE: u16 = 16;

fuzz_target!(|data: &[u8]| {
    // Two adjacent regions so buffers can straddle a region boundary.
    let mem: Arc<GuestMemoryMmap> = Arc::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), REGION), (GuestAddress(REGION as u64), REGION)])
            .expect("guest memory"),
    );
    let n = data.len().min(2 * REGION);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    let desc = 0u64;
    let avail = 16 * u64::from(QSIZE);
    let used = 0x1000u64;
    let mut q = Queue::new(QSIZE).expect("queue");
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(desc as u32), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_ready(true);
    let disk = Arc::new(NullBackend::new(1 << 20, Duration::ZERO));
    let block_size = if data.first().is_some_and(|b| b & 1 == 1) { 4096 } else { 512 };
    let config = DeviceConfig::build(DeviceParams {
        queue_size: QSIZE,
        block_size,
        serial: b"fuzz".to_vec(),
        ..DeviceParams::for_backend(&*disk)
    })
    .expect("valid device");
    config.ack_features(config.virtio_features());
    let blk = VirtioBlk::new(config, disk);
    let Ok(mut iter) = q.iter(mem.clone()) else { return };
    let Some(chain) = iter.next() else { return };
    let sched = coro::Scheduler::default();
    let m = mem.clone();
    sched
        .spawn(move || {
            // Any outcome is fine; what must not happen is a panic or (under ASan) an access
            // outside the guest regions.
            let _ = blk.serve(chain, GuestMap::new(m));
        })
        .expect("spawn");
    sched.run().expect("run");
});

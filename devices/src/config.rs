//! The virtio-blk configuration space and the features the device offers
//! (virtio 1.2, 5.2.3 "Feature bits" and 5.2.4 "Device configuration layout").
//!
//! The layout is built as little-endian bytes at the spec's offsets instead of through a
//! `#[repr(C)]` struct, so there is one obvious place to check each field against the spec
//! and no padding or endianness to get wrong. The only field a driver may write is
//! `writeback` (when `VIRTIO_BLK_F_CONFIG_WCE` is negotiated).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::backend::BlockBackend;
use crate::SECTOR_SIZE;

/// Offsets of the fields we fill or let the driver write.
mod offset {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    pub const MIN_IO_SIZE: usize = 26;
    pub const OPT_IO_SIZE: usize = 28;
    pub const WRITEBACK: usize = 32;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    /// Size of the layout up to and including the write-zeroes fields.
    pub const END: usize = 60;
}

/// Largest single data segment we advertise (`size_max`): 1 MiB, as QEMU's vhost-user-blk
/// server does; the guest splits larger buffers.
pub const SIZE_MAX: u32 = 1 << 20;
/// Segments per discard / write-zeroes request. QEMU allows one; more lets the guest batch
/// a fragmented `fstrim` into a single request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Sectors per discard / write-zeroes segment: 1 GiB.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;

/// Why a config write was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The driver wrote something other than the `writeback` byte.
    #[error("config write at offset {offset} ({len} bytes) touches read-only fields")]
    ReadOnlyField {
        /// Offset written.
        offset: u32,
        /// Bytes written.
        len: usize,
    },
    /// `writeback` must be 0 or 1.
    #[error("invalid writeback value {0}")]
    BadWriteback(u8),
}

struct Inner {
    num_queues: u16,
    queue_size: u16,
    block_size: u32,
    readonly: bool,
    serial: Vec<u8>,
    capacity_sectors: u64,
    physical_block_exp: u8,
    min_io_blocks: u16,
    opt_io_blocks: u32,
    /// Volatile write cache enabled (writeback); false means every write is flushed.
    writeback: AtomicBool,
    acked: AtomicU64,
}

/// Device parameters plus the mutable `writeback` state; cheap to clone and shared by the
/// vhost-user frontend thread and the workers.
#[derive(Clone)]
pub struct DeviceConfig(Arc<Inner>);

impl DeviceConfig {
    /// Describes a device exporting `disk`.
    pub fn new(
        disk: &dyn BlockBackend,
        num_queues: u16,
        queue_size: u16,
        block_size: u32,
        readonly: bool,
        serial: &str,
    ) -> DeviceConfig {
        let topo = disk.topology();
        let block_size = block_size.max(SECTOR_SIZE as u32);
        let phys = topo.physical_block_size.max(block_size);
        let ratio = phys / block_size;
        let physical_block_exp = if ratio.is_power_of_two() {
            ratio.trailing_zeros() as u8
        } else {
            0
        };
        DeviceConfig(Arc::new(Inner {
            num_queues: num_queues.max(1),
            queue_size,
            block_size,
            readonly: readonly || disk.is_read_only(),
            serial: serial
                .as_bytes()
                .iter()
                .copied()
                .take(VIRTIO_BLK_ID_BYTES as usize)
                .collect(),
            capacity_sectors: disk.size() / SECTOR_SIZE,
            physical_block_exp,
            min_io_blocks: u16::try_from(topo.min_io_size / block_size).unwrap_or(0),
            opt_io_blocks: topo.opt_io_size / block_size,
            // The host page cache (or the disk's cache, with O_DIRECT) is volatile, so the
            // truthful default is writeback; the guest may switch to writethrough.
            writeback: AtomicBool::new(true),
            acked: AtomicU64::new(0),
        }))
    }

    /// The same device in its reset state (writeback on, nothing negotiated), for a new
    /// connection: what one guest set must not leak into the next.
    pub fn reset(&self) -> DeviceConfig {
        let c = &self.0;
        DeviceConfig(Arc::new(Inner {
            num_queues: c.num_queues,
            queue_size: c.queue_size,
            block_size: c.block_size,
            readonly: c.readonly,
            serial: c.serial.clone(),
            capacity_sectors: c.capacity_sectors,
            physical_block_exp: c.physical_block_exp,
            min_io_blocks: c.min_io_blocks,
            opt_io_blocks: c.opt_io_blocks,
            writeback: AtomicBool::new(true),
            acked: AtomicU64::new(0),
        }))
    }

    /// Number of virtqueues.
    pub fn num_queues(&self) -> u16 {
        self.0.num_queues
    }

    /// Maximum virtqueue size.
    pub fn queue_size(&self) -> u16 {
        self.0.queue_size
    }

    /// Logical block size seen by the guest.
    pub fn block_size(&self) -> u32 {
        self.0.block_size
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.0.readonly
    }

    /// The GET_ID answer (at most 20 bytes).
    pub fn serial(&self) -> &[u8] {
        &self.0.serial
    }

    /// Device size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.0.capacity_sectors
    }

    /// Data segments per request: the queue minus header and status descriptors.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.0.queue_size).saturating_sub(2).max(1)
    }

    /// Whether writes may complete before they are durable. The driver's `writeback`
    /// setting counts only if it can flush: without VIRTIO_BLK_F_FLUSH negotiated the
    /// device must write through (virtio 1.2, 5.2.5.1).
    pub fn writeback(&self) -> bool {
        let flush = self.0.acked.load(Ordering::Acquire) & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        flush && self.0.writeback.load(Ordering::Acquire)
    }

    /// The virtio feature bits offered (vhost-user's own bit is added by the daemon).
    pub fn virtio_features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ;
        if self.0.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    /// Records the features the driver accepted (see [`writeback`](Self::writeback)).
    pub fn ack_features(&self, features: u64) {
        self.0.acked.store(features, Ordering::Release);
    }

    /// The config space bytes `[offset, offset + size)`; out-of-range bytes are omitted.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.bytes();
        let start = (offset as usize).min(space.len());
        let end = start.saturating_add(size as usize).min(space.len());
        space[start..end].to_vec()
    }

    /// A driver write to the config space: only the `writeback` byte may change.
    pub fn write(&self, offset: u32, data: &[u8]) -> Result<(), ConfigError> {
        match (offset as usize, data) {
            (offset::WRITEBACK, [v @ (0 | 1)]) => {
                self.0.writeback.store(*v == 1, Ordering::Release);
                log::info!(
                    "guest set the write cache to {}",
                    if *v == 1 { "writeback" } else { "writethrough" }
                );
                Ok(())
            }
            (offset::WRITEBACK, [v]) => Err(ConfigError::BadWriteback(*v)),
            _ => Err(ConfigError::ReadOnlyField {
                offset,
                len: data.len(),
            }),
        }
    }

    /// The whole config space, little-endian at the spec's offsets.
    pub fn bytes(&self) -> [u8; offset::END] {
        let c = &self.0;
        let mut b = [0u8; offset::END];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(offset::CAPACITY, &c.capacity_sectors.to_le_bytes());
        put(offset::SIZE_MAX, &SIZE_MAX.to_le_bytes());
        put(offset::SEG_MAX, &self.seg_max().to_le_bytes());
        put(offset::BLK_SIZE, &c.block_size.to_le_bytes());
        put(offset::PHYSICAL_BLOCK_EXP, &[c.physical_block_exp]);
        put(offset::MIN_IO_SIZE, &c.min_io_blocks.to_le_bytes());
        put(offset::OPT_IO_SIZE, &c.opt_io_blocks.to_le_bytes());
        put(
            offset::WRITEBACK,
            &[u8::from(self.0.writeback.load(Ordering::Acquire))],
        );
        put(offset::NUM_QUEUES, &c.num_queues.to_le_bytes());
        let align = c.block_size / SECTOR_SIZE as u32;
        put(
            offset::MAX_DISCARD_SECTORS,
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(offset::MAX_DISCARD_SEG, &MAX_DISCARD_SEG.to_le_bytes());
        put(offset::DISCARD_SECTOR_ALIGNMENT, &align.to_le_bytes());
        put(
            offset::MAX_WRITE_ZEROES_SECTORS,
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(offset::MAX_WRITE_ZEROES_SEG, &MAX_DISCARD_SEG.to_le_bytes());
        put(offset::WRITE_ZEROES_MAY_UNMAP, &[1]);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::NullBackend;
    use std::time::Duration;

    fn cfg(readonly: bool) -> DeviceConfig {
        let disk = NullBackend::new(1 << 30, Duration::ZERO);
        DeviceConfig::new(&disk, 4, 256, 4096, readonly, "serial-1")
    }

    #[test]
    fn layout_matches_spec_offsets() {
        let b = cfg(false).bytes();
        assert_eq!(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(
            u32::from_le_bytes(b[12..16].try_into().unwrap()),
            254,
            "seg_max"
        );
        assert_eq!(
            u32::from_le_bytes(b[20..24].try_into().unwrap()),
            4096,
            "blk_size"
        );
        assert_eq!(b[32], 1, "writeback by default");
        assert_eq!(
            u16::from_le_bytes(b[34..36].try_into().unwrap()),
            4,
            "num_queues"
        );
        assert_eq!(
            u32::from_le_bytes(b[40..44].try_into().unwrap()),
            MAX_DISCARD_SEG
        );
        assert_eq!(
            u32::from_le_bytes(b[44..48].try_into().unwrap()),
            8,
            "discard alignment in sectors"
        );
    }

    #[test]
    fn read_clamps_to_the_space() {
        let c = cfg(false);
        assert_eq!(c.read(0, 8).len(), 8);
        assert_eq!(c.read(56, 100).len(), 4);
        assert!(c.read(1000, 4).is_empty());
        assert!(c.read(u32::MAX, u32::MAX).is_empty());
    }

    #[test]
    fn only_writeback_is_writable() {
        let c = cfg(false);
        c.ack_features(c.virtio_features());
        assert!(c.writeback());
        assert_eq!(c.write(32, &[0]), Ok(()));
        assert!(!c.writeback());
        assert_eq!(c.read(32, 1), vec![0]);
        assert_eq!(c.write(32, &[1]), Ok(()));
        assert!(c.writeback());
        assert_eq!(c.write(32, &[7]), Err(ConfigError::BadWriteback(7)));
        assert_eq!(
            c.write(0, &[0; 8]),
            Err(ConfigError::ReadOnlyField { offset: 0, len: 8 })
        );
        assert_eq!(
            c.write(32, &[1, 1]),
            Err(ConfigError::ReadOnlyField { offset: 32, len: 2 })
        );
    }

    #[test]
    fn readonly_offers_ro_not_discard() {
        let f = cfg(true).virtio_features();
        assert_ne!(f & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_DISCARD, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
        let f = cfg(false).virtio_features();
        assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(f & 1 << VIRTIO_BLK_F_DISCARD, 0);
    }

    #[test]
    fn no_flush_feature_means_writethrough() {
        let c = cfg(false);
        c.ack_features(c.virtio_features() & !(1 << VIRTIO_BLK_F_FLUSH));
        assert!(!c.writeback());
        assert_eq!(
            c.read(32, 1),
            vec![1],
            "the config byte still shows the setting"
        );
        c.ack_features(c.virtio_features());
        assert!(
            c.writeback(),
            "a later negotiation with FLUSH restores writeback"
        );
    }

    #[test]
    fn reset_forgets_the_guest_setting() {
        let c = cfg(false);
        c.ack_features(c.virtio_features());
        assert_eq!(c.write(32, &[0]), Ok(()));
        let fresh = c.reset();
        assert_eq!(fresh.read(32, 1), vec![1]);
        assert!(!fresh.writeback(), "nothing negotiated yet");
        assert_eq!(fresh.bytes()[..32], c.bytes()[..32], "same geometry");
    }
}

//! The virtio-blk configuration space and the features the device offers
//! (virtio 1.2, 5.2.3 "Feature bits" and 5.2.4 "Device configuration layout").
//!
//! [`VirtioBlkConfig`] is the wire layout: a `#[repr(C)]` struct of little-endian fields whose
//! offsets are checked against the spec at compile time, so it can be handed to the frontend
//! as bytes ([`ByteValued`]). [`DeviceConfig`] is the device's parameters plus two pieces of
//! state: the `writeback` byte, the one field a driver may change (`VIRTIO_BLK_F_CONFIG_WCE`;
//! every other config write is refused), and the capacity, which the host may change while
//! the device runs (a resized export). This module stops at bytes: vhost-user message
//! handling, and telling the driver that the config changed, are the daemon's.

use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{ByteValued, Le16, Le32, Le64};

use crate::backend::{BlockBackend, Topology};
use crate::SECTOR_SIZE;

/// Largest single data segment we advertise (`size_max`): 1 MiB, as QEMU's vhost-user-blk
/// server does; the guest splits larger buffers.
pub const SIZE_MAX: u32 = 1 << 20;
/// Segments per discard / write-zeroes request (`max_discard_seg`, `max_write_zeroes_seg`).
/// QEMU allows one; more lets the guest batch a fragmented `fstrim` into a single request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Sectors per discard / write-zeroes segment (`max_discard_sectors`,
/// `max_write_zeroes_sectors`): 1 GiB.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;
/// Bytes of the serial number GET_ID returns (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Smallest virtqueue size: a request needs a header and a status descriptor.
pub const MIN_QUEUE_SIZE: u16 = 2;
/// Largest virtqueue size the split ring allows (virtio 1.2, 2.7: "Queue Size ... 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Largest logical block size a Linux guest accepts (it refuses `blk_size` above its page).
pub const MAX_BLOCK_SIZE: u32 = 4096;

/// `struct virtio_blk_geometry` (legacy CHS; we do not offer `VIRTIO_BLK_F_GEOMETRY`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioBlkGeometry {
    /// Cylinders.
    pub cylinders: Le16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

/// `struct virtio_blk_topology` (valid with `VIRTIO_BLK_F_TOPOLOGY`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioBlkTopology {
    /// log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: Le16,
    /// Optimal (suggested maximum) I/O size, in logical blocks.
    pub opt_io_size: Le32,
}

/// `struct virtio_blk_config`, the whole virtio 1.2 layout (5.2.4) including the secure
/// erase and zoned fields we leave zero: a frontend may read `sizeof` its own copy of the
/// struct (QEMU reads only up to the last field its features need), and a short answer
/// fails the whole vhost-user GET_CONFIG.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioBlkConfig {
    /// Device size in 512-byte sectors, whatever `blk_size` is.
    pub capacity: Le64,
    /// Largest data segment, bytes (`VIRTIO_BLK_F_SIZE_MAX`).
    pub size_max: Le32,
    /// Most data segments per request (`VIRTIO_BLK_F_SEG_MAX`).
    pub seg_max: Le32,
    /// Legacy geometry.
    pub geometry: VirtioBlkGeometry,
    /// Logical block size, bytes (`VIRTIO_BLK_F_BLK_SIZE`).
    pub blk_size: Le32,
    /// I/O topology hints.
    pub topology: VirtioBlkTopology,
    /// 1: writeback cache, 0: writethrough (`VIRTIO_BLK_F_CONFIG_WCE`). Driver-writable.
    pub writeback: u8,
    /// Padding; the spec says the device MUST set it to 0.
    pub unused0: u8,
    /// Number of request queues (`VIRTIO_BLK_F_MQ`).
    pub num_queues: Le16,
    /// Most sectors per discard segment.
    pub max_discard_sectors: Le32,
    /// Most segments per discard request.
    pub max_discard_seg: Le32,
    /// Discard alignment hint, sectors.
    pub discard_sector_alignment: Le32,
    /// Most sectors per write-zeroes segment.
    pub max_write_zeroes_sectors: Le32,
    /// Most segments per write-zeroes request.
    pub max_write_zeroes_seg: Le32,
    /// 1 if write-zeroes with UNMAP may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Padding, 0.
    pub unused1: [u8; 3],
    /// Secure erase (not offered): 0.
    pub max_secure_erase_sectors: Le32,
    /// Secure erase (not offered): 0.
    pub max_secure_erase_seg: Le32,
    /// Secure erase (not offered): 0.
    pub secure_erase_sector_alignment: Le32,
    /// Zoned characteristics (not offered): `zone_sectors`, `max_open_zones`,
    /// `max_active_zones`, `max_append_sectors`, `write_granularity`, all 0.
    pub zoned: [Le32; 5],
    /// Zoned model (not offered): 0.
    pub zoned_model: u8,
    /// Padding, 0.
    pub unused2: [u8; 3],
}

// The spec's offsets (virtio 1.2, 5.2.4), checked where the compiler can prove them: a
// field moved by padding would silently shift every byte after it on the wire.
const _: () = {
    assert!(offset_of!(VirtioBlkConfig, capacity) == 0);
    assert!(offset_of!(VirtioBlkConfig, size_max) == 8);
    assert!(offset_of!(VirtioBlkConfig, seg_max) == 12);
    assert!(offset_of!(VirtioBlkConfig, geometry) == 16);
    assert!(offset_of!(VirtioBlkConfig, blk_size) == 20);
    assert!(offset_of!(VirtioBlkConfig, topology) == 24);
    assert!(offset_of!(VirtioBlkTopology, min_io_size) == 2);
    assert!(offset_of!(VirtioBlkTopology, opt_io_size) == 4);
    assert!(offset_of!(VirtioBlkConfig, writeback) == 32);
    assert!(offset_of!(VirtioBlkConfig, num_queues) == 34);
    assert!(offset_of!(VirtioBlkConfig, max_discard_sectors) == 36);
    assert!(offset_of!(VirtioBlkConfig, max_discard_seg) == 40);
    assert!(offset_of!(VirtioBlkConfig, discard_sector_alignment) == 44);
    assert!(offset_of!(VirtioBlkConfig, max_write_zeroes_sectors) == 48);
    assert!(offset_of!(VirtioBlkConfig, max_write_zeroes_seg) == 52);
    assert!(offset_of!(VirtioBlkConfig, write_zeroes_may_unmap) == 56);
    assert!(offset_of!(VirtioBlkConfig, max_secure_erase_sectors) == 60);
    assert!(offset_of!(VirtioBlkConfig, zoned) == 72);
    assert!(offset_of!(VirtioBlkConfig, zoned_model) == 92);
    assert!(size_of::<VirtioBlkConfig>() == 96);
};

// SAFETY: `VirtioBlkConfig` is `repr(C)` and made only of integers, `Le*` integers and
// arrays of them, so every bit pattern is valid; the assertions above pin its size to the
// sum of its fields (96 bytes, a multiple of its 8-byte alignment), so it has no padding
// that could leak uninitialised memory when viewed as bytes.
unsafe impl ByteValued for VirtioBlkConfig {}

/// Offset of the only driver-writable byte.
pub const WRITEBACK_OFFSET: usize = offset_of!(VirtioBlkConfig, writeback);
/// Size of the config space.
pub const CONFIG_SIZE: usize = size_of::<VirtioBlkConfig>();

/// Why device parameters or a config space access were refused.
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
    /// A read reaching outside the config space (or whose end overflows).
    #[error("config access at offset {offset} ({len} bytes) is outside the {size}-byte space")]
    OutOfRange {
        /// Offset.
        offset: u32,
        /// Bytes.
        len: usize,
        /// Size of the config space.
        size: usize,
    },
    /// The logical block size must be a power of two in 512..=4096.
    #[error("block size {0} is not a power of two between 512 and {MAX_BLOCK_SIZE}")]
    BlockSize(u32),
    /// The logical block size is below what the backend can address (O_DIRECT on a
    /// 4K-sector disk refuses 512-byte I/O).
    #[error("block size {block_size} is below the backend's logical block size {backend}")]
    BlockSizeBelowBackend {
        /// Requested block size.
        block_size: u32,
        /// The backend's logical block size.
        backend: u32,
    },
    /// The device size is not a whole number of logical blocks.
    #[error("capacity of {capacity} sectors is not a multiple of the {block_size}-byte block")]
    CapacityMisaligned {
        /// Capacity in 512-byte sectors.
        capacity: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// A new size for a running device that is zero or not a whole number of its logical
    /// blocks (the guest could not address the last partial block).
    #[error("size {size} is not a positive multiple of the device's {block_size}-byte block size")]
    SizeMisaligned {
        /// The size asked for, in bytes.
        size: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// The queue size must be a power of two in 2..=32768 (virtio 1.2, 2.7).
    #[error("queue size {0} is not a power of two between {MIN_QUEUE_SIZE} and {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    /// At least one queue.
    #[error("the device needs at least one queue")]
    NoQueues,
    /// The serial number is longer than GET_ID can return.
    #[error("serial number is {0} bytes; virtio-blk allows at most {ID_BYTES}")]
    SerialTooLong(usize),
}

/// What a device is made of: everything in the config space except the driver's
/// `writeback` choice, plus the serial number. Build one with [`DeviceParams::for_backend`]
/// and adjust the fields, then [`DeviceConfig::build`] validates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceParams {
    /// Device size in 512-byte sectors at start ([`DeviceConfig::set_size`] changes it).
    pub capacity_sectors: u64,
    /// Number of request queues.
    pub num_queues: u16,
    /// Maximum virtqueue size.
    pub queue_size: u16,
    /// Logical block size the guest sees.
    pub block_size: u32,
    /// The backend's geometry hints.
    pub topology: Topology,
    /// Refuse writes, discard and write-zeroes; offer `VIRTIO_BLK_F_RO`.
    pub readonly: bool,
    /// Initial `writeback` (and the value after a reset).
    pub writeback: bool,
    /// The GET_ID answer, at most 20 bytes.
    pub serial: Vec<u8>,
}

impl DeviceParams {
    /// Parameters describing `disk`: its size, topology, read-only state and cache, one
    /// queue of 256, 512-byte blocks, no serial.
    pub fn for_backend(disk: &dyn BlockBackend) -> DeviceParams {
        DeviceParams {
            capacity_sectors: disk.size() / SECTOR_SIZE,
            num_queues: 1,
            queue_size: 256,
            block_size: SECTOR_SIZE as u32,
            topology: disk.topology(),
            readonly: disk.is_read_only(),
            writeback: disk.writeback_cache(),
            serial: Vec::new(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(SECTOR_SIZE as u32..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(ConfigError::BlockSize(bs));
        }
        if bs < self.topology.logical_block_size {
            return Err(ConfigError::BlockSizeBelowBackend {
                block_size: bs,
                backend: self.topology.logical_block_size,
            });
        }
        if self.capacity_sectors % (u64::from(bs) / SECTOR_SIZE) != 0 {
            return Err(ConfigError::CapacityMisaligned {
                capacity: self.capacity_sectors,
                block_size: bs,
            });
        }
        if self.queue_size < MIN_QUEUE_SIZE || !self.queue_size.is_power_of_two() {
            return Err(ConfigError::QueueSize(self.queue_size));
        }
        if self.num_queues == 0 {
            return Err(ConfigError::NoQueues);
        }
        if self.serial.len() > ID_BYTES {
            return Err(ConfigError::SerialTooLong(self.serial.len()));
        }
        Ok(())
    }
}

struct Inner {
    params: DeviceParams,
    /// The serial padded to 20 bytes (unused bytes zero), what GET_ID copies from.
    id: [u8; ID_BYTES],
    /// Volatile write cache enabled (writeback); false means every write is flushed.
    writeback: AtomicBool,
    acked: AtomicU64,
    /// Device size in 512-byte sectors, a multiple of the block size: shared with every
    /// [`reset`](DeviceConfig::reset) copy, because it is the disk's, not one
    /// connection's (an export resized while no frontend is connected shows its new size
    /// to the next one; one resized while a connection is being set up cannot be missed).
    capacity: Arc<AtomicU64>,
}

/// Device parameters plus the mutable `writeback` and capacity state; cheap to clone and
/// shared by the vhost-user frontend thread, the workers and whoever resizes the export.
#[derive(Clone)]
pub struct DeviceConfig(Arc<Inner>);

impl DeviceConfig {
    /// Validates `params` and makes the device's config.
    pub fn build(params: DeviceParams) -> Result<DeviceConfig, ConfigError> {
        params.validate()?;
        let mut id = [0u8; ID_BYTES];
        id[..params.serial.len()].copy_from_slice(&params.serial);
        Ok(DeviceConfig(Arc::new(Inner {
            writeback: AtomicBool::new(params.writeback),
            acked: AtomicU64::new(0),
            capacity: Arc::new(AtomicU64::new(params.capacity_sectors)),
            id,
            params,
        })))
    }

    /// The same device in its reset state (initial writeback, nothing negotiated), for a
    /// new connection: what one guest set must not leak into the next. The capacity is
    /// shared, not copied: it is the disk's size.
    pub fn reset(&self) -> DeviceConfig {
        let c = &self.0;
        DeviceConfig(Arc::new(Inner {
            params: c.params.clone(),
            id: c.id,
            writeback: AtomicBool::new(c.params.writeback),
            acked: AtomicU64::new(0),
            capacity: c.capacity.clone(),
        }))
    }

    /// Number of virtqueues.
    pub fn num_queues(&self) -> u16 {
        self.0.params.num_queues
    }

    /// Maximum virtqueue size.
    pub fn queue_size(&self) -> u16 {
        self.0.params.queue_size
    }

    /// Logical block size seen by the guest.
    pub fn block_size(&self) -> u32 {
        self.0.params.block_size
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.0.params.readonly
    }

    /// The GET_ID answer: the serial, at most 20 bytes.
    pub fn serial(&self) -> &[u8] {
        &self.0.params.serial
    }

    /// The serial as GET_ID writes it: 20 bytes, zero-padded (so NUL-terminated unless the
    /// serial is exactly 20 bytes long, as the spec allows).
    pub fn id_bytes(&self) -> [u8; ID_BYTES] {
        self.0.id
    }

    /// Device size in 512-byte sectors, as now.
    pub fn capacity_sectors(&self) -> u64 {
        self.0.capacity.load(Ordering::Acquire)
    }

    /// Device size in bytes, as now.
    pub fn size(&self) -> u64 {
        self.capacity_sectors() * SECTOR_SIZE
    }

    /// Checks that `size` bytes can be this device's size: positive and a whole number of
    /// its logical blocks.
    pub fn check_size(&self, size: u64) -> Result<(), ConfigError> {
        let bs = self.block_size();
        if size == 0 || size % u64::from(bs) != 0 {
            return Err(ConfigError::SizeMisaligned {
                size,
                block_size: bs,
            });
        }
        Ok(())
    }

    /// Makes the device `size` bytes large from the next request parsed and the next
    /// config space read on (this and every [`reset`](Self::reset) copy). The storage must
    /// already have that size; telling the driver is the caller's (vhost-user's
    /// config-change message).
    pub fn set_size(&self, size: u64) -> Result<(), ConfigError> {
        self.check_size(size)?;
        self.0.capacity.store(size / SECTOR_SIZE, Ordering::Release);
        Ok(())
    }

    /// Data segments per request: the queue minus header and status descriptors.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.0.params.queue_size).saturating_sub(2).max(1)
    }

    /// Whether writes may complete before they are durable. The driver's `writeback`
    /// setting counts only if it can flush: without `VIRTIO_BLK_F_FLUSH` negotiated the
    /// device must write through (virtio 1.2, 5.2.5.1).
    pub fn writeback(&self) -> bool {
        let flush = self.0.acked.load(Ordering::Acquire) & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        flush && self.0.writeback.load(Ordering::Acquire)
    }

    /// The virtio feature bits offered: virtio-blk's and the ring's. Transport bits (such
    /// as vhost-user's `VHOST_USER_F_PROTOCOL_FEATURES`) are the daemon's to add.
    ///
    /// A read-only device offers `RO` and neither `DISCARD` nor `WRITE_ZEROES`: the guest
    /// would only get IOERR for them, and without the bits its block layer never sends them.
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
        if self.0.params.readonly {
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

    /// The config space as the driver sees it now.
    pub fn config_space(&self) -> VirtioBlkConfig {
        let p = &self.0.params;
        let bs = p.block_size;
        let topo = p.topology;
        // Physical blocks as a power-of-two number of logical blocks; a non-power-of-two
        // ratio cannot be expressed, so claim nothing (0) rather than something wrong.
        let ratio = topo.physical_block_size.max(bs) / bs;
        let physical_block_exp = if ratio.is_power_of_two() {
            ratio.trailing_zeros() as u8
        } else {
            0
        };
        let discard_sectors = if p.readonly { 0 } else { MAX_DISCARD_SECTORS };
        let discard_seg = if p.readonly { 0 } else { MAX_DISCARD_SEG };
        VirtioBlkConfig {
            capacity: self.capacity_sectors().into(),
            size_max: SIZE_MAX.into(),
            seg_max: self.seg_max().into(),
            blk_size: bs.into(),
            topology: VirtioBlkTopology {
                physical_block_exp,
                alignment_offset: 0,
                min_io_size: u16::try_from(topo.min_io_size / bs).unwrap_or(0).into(),
                opt_io_size: (topo.opt_io_size / bs).into(),
            },
            writeback: u8::from(self.0.writeback.load(Ordering::Acquire)),
            num_queues: p.num_queues.into(),
            max_discard_sectors: discard_sectors.into(),
            max_discard_seg: discard_seg.into(),
            discard_sector_alignment: (bs / SECTOR_SIZE as u32).into(),
            max_write_zeroes_sectors: discard_sectors.into(),
            max_write_zeroes_seg: discard_seg.into(),
            write_zeroes_may_unmap: u8::from(!p.readonly),
            ..VirtioBlkConfig::default()
        }
    }

    /// Copies config space bytes `[offset, offset + buf.len())` into `buf`. A range not
    /// wholly inside the space (including one whose end overflows) is refused and `buf`
    /// left alone.
    pub fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), ConfigError> {
        let space = self.config_space();
        let bytes = space.as_slice();
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buf.len())?))
            .filter(|r| r.end <= bytes.len())
            .ok_or(ConfigError::OutOfRange {
                offset,
                len: buf.len(),
                size: bytes.len(),
            })?;
        buf.copy_from_slice(&bytes[range]);
        Ok(())
    }

    /// A driver write to the config space: only the one-byte `writeback` field, with 0
    /// (writethrough) or 1 (writeback), is accepted.
    pub fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), ConfigError> {
        match (usize::try_from(offset), data) {
            (Ok(WRITEBACK_OFFSET), [v @ (0 | 1)]) => {
                self.0.writeback.store(*v == 1, Ordering::Release);
                Ok(())
            }
            (Ok(WRITEBACK_OFFSET), [v]) => Err(ConfigError::BadWriteback(*v)),
            _ => Err(ConfigError::ReadOnlyField {
                offset,
                len: data.len(),
            }),
        }
    }

    /// [`read_config`](Self::read_config) as vhost-user's GET_CONFIG wants it: exactly
    /// `size` bytes, or an empty vector (which the library turns into the protocol's
    /// error reply) when the range is not inside the space.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let Ok(len) = usize::try_from(size) else {
            return Vec::new();
        };
        if len > CONFIG_SIZE {
            return Vec::new();
        }
        let mut buf = vec![0u8; len];
        match self.read_config(offset, &mut buf) {
            Ok(()) => buf,
            Err(_) => Vec::new(),
        }
    }

    /// The whole config space as bytes.
    pub fn bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b.copy_from_slice(self.config_space().as_slice());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::NullBackend;
    use std::time::Duration;

    fn params() -> DeviceParams {
        let disk = NullBackend::new(1 << 30, Duration::ZERO);
        DeviceParams {
            num_queues: 4,
            block_size: 4096,
            serial: b"serial-1".to_vec(),
            ..DeviceParams::for_backend(&disk)
        }
    }

    fn cfg(readonly: bool) -> DeviceConfig {
        DeviceConfig::build(DeviceParams {
            readonly,
            ..params()
        })
        .expect("valid params")
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    #[test]
    fn layout_matches_spec_offsets() {
        let b = cfg(false).bytes();
        assert_eq!(b.len(), 96);
        let capacity = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        assert_eq!(capacity, (1 << 30) / 512, "capacity");
        assert_eq!(le32(&b, 8), SIZE_MAX, "size_max");
        assert_eq!(le32(&b, 12), 254, "seg_max = queue size - 2");
        assert_eq!(le32(&b, 20), 4096, "blk_size");
        assert_eq!(b[32], 1, "writeback by default for a cached backend");
        assert_eq!(b[33], 0, "unused");
        assert_eq!(u16::from_le_bytes([b[34], b[35]]), 4, "num_queues");
        assert_eq!(le32(&b, 36), MAX_DISCARD_SECTORS, "max_discard_sectors");
        assert_eq!(le32(&b, 40), MAX_DISCARD_SEG, "max_discard_seg");
        assert_eq!(le32(&b, 44), 8, "discard alignment in sectors");
        assert_eq!(
            le32(&b, 48),
            MAX_DISCARD_SECTORS,
            "max_write_zeroes_sectors"
        );
        assert_eq!(le32(&b, 52), MAX_DISCARD_SEG, "max_write_zeroes_seg");
        assert_eq!(b[56], 1, "write_zeroes_may_unmap");
        assert!(
            b[57..].iter().all(|&x| x == 0),
            "unused and unoffered fields"
        );
    }

    #[test]
    fn topology_in_logical_blocks() {
        let c = DeviceConfig::build(DeviceParams {
            block_size: 512,
            topology: Topology {
                logical_block_size: 512,
                physical_block_size: 4096,
                min_io_size: 4096,
                opt_io_size: 1 << 20,
            },
            ..params()
        })
        .expect("valid");
        let t = c.config_space().topology;
        assert_eq!(
            t.physical_block_exp, 3,
            "8 logical blocks per physical block"
        );
        assert_eq!(t.min_io_size.to_native(), 8);
        assert_eq!(t.opt_io_size.to_native(), 2048);
    }

    #[test]
    fn read_config_in_range() {
        let c = cfg(false);
        let mut buf = [0u8; 8];
        assert_eq!(c.read_config(0, &mut buf), Ok(()));
        assert_eq!(u64::from_le_bytes(buf), (1 << 30) / 512);
        let mut all = [0xffu8; CONFIG_SIZE];
        assert_eq!(c.read_config(0, &mut all), Ok(()));
        assert_eq!(all, c.bytes());
        assert_eq!(c.read(0, 57).len(), 57, "what QEMU asks for");
        assert_eq!(c.read(0, 96).len(), 96, "sizeof(struct virtio_blk_config)");
    }

    #[test]
    fn read_config_past_the_end_is_refused() {
        let c = cfg(false);
        let mut buf = [0xaau8; 8];
        assert_eq!(
            c.read_config(92, &mut buf),
            Err(ConfigError::OutOfRange {
                offset: 92,
                len: 8,
                size: 96
            })
        );
        assert_eq!(buf, [0xaa; 8], "untouched");
        assert!(c.read(1000, 4).is_empty());
        assert!(c.read(0, 97).is_empty());
    }

    #[test]
    fn read_config_overflowing_end_is_refused() {
        let c = cfg(false);
        let mut buf = [0u8; 2];
        assert_eq!(
            c.read_config(u32::MAX, &mut buf),
            Err(ConfigError::OutOfRange {
                offset: u32::MAX,
                len: 2,
                size: 96
            })
        );
        assert!(c.read(u32::MAX, u32::MAX).is_empty());
    }

    #[test]
    fn writeback_byte_is_writable() {
        let c = cfg(false);
        c.ack_features(c.virtio_features());
        assert!(c.writeback());
        assert_eq!(c.write_config(32, &[0]), Ok(()));
        assert!(!c.writeback());
        assert_eq!(c.read(32, 1), vec![0]);
        assert_eq!(c.write_config(32, &[1]), Ok(()));
        assert!(c.writeback());
    }

    #[test]
    fn writeback_value_other_than_0_or_1() {
        let c = cfg(false);
        assert_eq!(c.write_config(32, &[7]), Err(ConfigError::BadWriteback(7)));
        assert_eq!(c.read(32, 1), vec![1], "unchanged");
    }

    #[test]
    fn write_to_read_only_field() {
        let c = cfg(false);
        assert_eq!(
            c.write_config(0, &[0; 8]),
            Err(ConfigError::ReadOnlyField { offset: 0, len: 8 })
        );
        assert_eq!(
            c.write_config(32, &[1, 1]),
            Err(ConfigError::ReadOnlyField { offset: 32, len: 2 }),
            "writeback plus the byte after it"
        );
        assert_eq!(
            c.write_config(u32::MAX, &[1]),
            Err(ConfigError::ReadOnlyField {
                offset: u32::MAX,
                len: 1
            })
        );
        assert_eq!(
            c.write_config(32, &[]),
            Err(ConfigError::ReadOnlyField { offset: 32, len: 0 })
        );
    }

    #[test]
    fn offered_features() {
        let f = cfg(false).virtio_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(f & 1 << bit, 0, "bit {bit} offered");
        }
        for bit in [
            VIRTIO_BLK_F_RO,
            VIRTIO_BLK_F_GEOMETRY,
            VIRTIO_BLK_F_SECURE_ERASE,
            VIRTIO_BLK_F_ZONED,
            // VHOST_USER_F_PROTOCOL_FEATURES: a transport bit, the daemon adds it.
            30,
        ] {
            assert_eq!(f & 1 << bit, 0, "bit {bit} not offered");
        }
    }

    #[test]
    fn readonly_offers_ro_not_discard() {
        let c = cfg(true);
        let f = c.virtio_features();
        assert_ne!(f & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_DISCARD, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
        assert_eq!(c.config_space().max_discard_sectors.to_native(), 0);
    }

    #[test]
    fn no_flush_feature_means_writethrough() {
        let c = cfg(false);
        c.ack_features(c.virtio_features() & !(1 << VIRTIO_BLK_F_FLUSH));
        assert!(!c.writeback());
        assert_eq!(c.read(32, 1), vec![1], "the byte still shows the setting");
        c.ack_features(c.virtio_features());
        assert!(c.writeback(), "a later negotiation with FLUSH restores it");
    }

    #[test]
    fn reset_forgets_the_guest_setting() {
        let c = cfg(false);
        c.ack_features(c.virtio_features());
        assert_eq!(c.write_config(32, &[0]), Ok(()));
        let fresh = c.reset();
        assert_eq!(fresh.read(32, 1), vec![1]);
        assert!(!fresh.writeback(), "nothing negotiated yet");
        assert_eq!(fresh.bytes()[..32], c.bytes()[..32], "same geometry");
    }

    #[test]
    fn initial_writeback_follows_params() {
        let c = DeviceConfig::build(DeviceParams {
            writeback: false,
            ..params()
        })
        .expect("valid");
        assert_eq!(c.read(32, 1), vec![0]);
    }

    #[test]
    fn id_bytes_are_zero_padded() {
        let id = cfg(false).id_bytes();
        assert_eq!(&id[..8], b"serial-1");
        assert!(id[8..].iter().all(|&b| b == 0));
    }

    #[test]
    fn build_rejects_bad_block_size() {
        for bs in [0, 256, 1000, 8192] {
            assert_eq!(
                DeviceConfig::build(DeviceParams {
                    block_size: bs,
                    ..params()
                })
                .err(),
                Some(ConfigError::BlockSize(bs))
            );
        }
    }

    #[test]
    fn build_rejects_block_size_below_backend() {
        let mut p = params();
        p.block_size = 512;
        p.topology.logical_block_size = 4096;
        assert_eq!(
            DeviceConfig::build(p).err(),
            Some(ConfigError::BlockSizeBelowBackend {
                block_size: 512,
                backend: 4096
            })
        );
    }

    #[test]
    fn build_rejects_partial_last_block() {
        let p = DeviceParams {
            capacity_sectors: 9,
            ..params()
        };
        assert_eq!(
            DeviceConfig::build(p).err(),
            Some(ConfigError::CapacityMisaligned {
                capacity: 9,
                block_size: 4096
            })
        );
    }

    #[test]
    fn build_rejects_bad_queue_size() {
        for qs in [0, 1, 3, 100] {
            assert_eq!(
                DeviceConfig::build(DeviceParams {
                    queue_size: qs,
                    ..params()
                })
                .err(),
                Some(ConfigError::QueueSize(qs))
            );
        }
    }

    #[test]
    fn build_rejects_no_queues() {
        assert_eq!(
            DeviceConfig::build(DeviceParams {
                num_queues: 0,
                ..params()
            })
            .err(),
            Some(ConfigError::NoQueues)
        );
    }

    #[test]
    fn a_new_size_reaches_the_config_space_and_every_connection() {
        let c = cfg(false);
        let next_connection = c.reset();
        assert_eq!(c.set_size(2 << 30), Ok(()));
        assert_eq!(c.capacity_sectors(), (2 << 30) / 512);
        assert_eq!(c.size(), 2 << 30);
        assert_eq!(c.read(0, 8), ((2u64 << 30) / 512).to_le_bytes());
        assert_eq!(
            next_connection.read(0, 8),
            c.read(0, 8),
            "a reset copy shares the disk's size"
        );
        assert_eq!(c.reset().capacity_sectors(), (2 << 30) / 512);
    }

    #[test]
    fn a_new_size_must_be_whole_blocks() {
        let c = cfg(false);
        for size in [0, 512, (1 << 30) + 512] {
            assert_eq!(
                c.set_size(size),
                Err(ConfigError::SizeMisaligned {
                    size,
                    block_size: 4096
                })
            );
        }
        assert_eq!(c.size(), 1 << 30, "unchanged");
    }

    #[test]
    fn build_rejects_long_serial() {
        assert_eq!(
            DeviceConfig::build(DeviceParams {
                serial: vec![b'x'; 21],
                ..params()
            })
            .err(),
            Some(ConfigError::SerialTooLong(21))
        );
    }
}

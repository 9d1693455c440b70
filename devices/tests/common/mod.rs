//! What the device tests share: the request types and the guest wire formats (request
//! header, discard/write-zeroes segment, split descriptor), so each test file builds
//! chains the same way.

#![allow(dead_code)] // Each test binary uses a different subset.

use virtio_bindings::virtio_blk;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};

pub const T_IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
pub const T_FLUSH: u32 = virtio_blk::VIRTIO_BLK_T_FLUSH;
pub const T_GET_ID: u32 = virtio_blk::VIRTIO_BLK_T_GET_ID;
pub const T_DISCARD: u32 = virtio_blk::VIRTIO_BLK_T_DISCARD;
pub const T_WRITE_ZEROES: u32 = virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES;

/// `struct virtio_blk_outhdr` with the given ioprio.
pub fn header(kind: u32, ioprio: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[4..8].copy_from_slice(&ioprio.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// `struct virtio_blk_discard_write_zeroes`.
pub fn seg(sector: u64, n: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&n.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// A split descriptor; the mock queue fills in NEXT flags and indices.
pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    desc_next(addr, len, flags, 0)
}

/// A split descriptor with an explicit `next`.
pub fn desc_next(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

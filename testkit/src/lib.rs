//! The virtio-blk wire format as a test driver writes it: request type, status and
//! descriptor-flag constants, and byte builders for the request header and the
//! discard/write-zeroes segment (virtio spec 1.2, 5.2.6 "Device Operation").
//!
//! One copy for every test that hand-builds requests: corodev-devices' tests (as a
//! dev-dependency, over `vm-memory` guest memory) and the integration crate's vhost-user
//! frontend and hostile-guest tests (over a shared memfd). Boundary: bytes and constants
//! only. Where the bytes go (guest memory, descriptor tables, rings) belongs to each test
//! harness, and nothing here links corodev's code, so a test of the device never checks
//! the device against its own constants.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use virtio_bindings::{virtio_blk, virtio_ring};

/// `VIRTIO_BLK_T_IN`: read from the device.
pub const T_IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
/// `VIRTIO_BLK_T_OUT`: write to the device.
pub const T_OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
/// `VIRTIO_BLK_T_FLUSH`.
pub const T_FLUSH: u32 = virtio_blk::VIRTIO_BLK_T_FLUSH;
/// `VIRTIO_BLK_T_GET_ID`: the device's serial, up to 20 bytes.
pub const T_GET_ID: u32 = virtio_blk::VIRTIO_BLK_T_GET_ID;
/// `VIRTIO_BLK_T_DISCARD`: data is a list of [`segment`]s.
pub const T_DISCARD: u32 = virtio_blk::VIRTIO_BLK_T_DISCARD;
/// `VIRTIO_BLK_T_WRITE_ZEROES`: data is a list of [`segment`]s.
pub const T_WRITE_ZEROES: u32 = virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES;

/// `VIRTIO_BLK_S_OK`: the status byte of a request that succeeded.
pub const S_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
/// `VIRTIO_BLK_S_IOERR`: the request failed (or was malformed).
pub const S_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
/// `VIRTIO_BLK_S_UNSUPP`: the device does not support the request.
pub const S_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

/// `VIRTQ_DESC_F_NEXT`: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
/// `VIRTQ_DESC_F_WRITE`: the device writes this buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
/// `VIRTQ_DESC_F_INDIRECT`: the buffer is a table of descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// Bytes in a request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: usize = 16;
/// Bytes in one discard/write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
pub const SEGMENT_LEN: usize = 16;

/// `struct virtio_blk_outhdr`: `type`, `ioprio`, `sector`, little-endian.
pub fn header(kind: u32, ioprio: u32, sector: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[4..8].copy_from_slice(&ioprio.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// `struct virtio_blk_discard_write_zeroes`: `sector`, `num_sectors`, `flags` (bit 0 is
/// `unmap`, the rest reserved), little-endian.
pub fn segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; SEGMENT_LEN] {
    let mut s = [0u8; SEGMENT_LEN];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// Segments laid end to end, as a discard or write-zeroes request carries them.
pub fn segments(segs: &[[u8; SEGMENT_LEN]]) -> Vec<u8> {
    segs.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_little_endian_type_ioprio_sector() {
        let h = header(T_WRITE_ZEROES, 0x0102_0304, 0x1122_3344_5566_7788);
        assert_eq!(
            h,
            [13, 0, 0, 0, 4, 3, 2, 1, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
    }

    #[test]
    fn segment_is_little_endian_sector_count_flags() {
        let s = segment(0x0102, 8, 1);
        assert_eq!(s, [2, 1, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(segments(&[s, segment(0, 0, 0)]).len(), 2 * SEGMENT_LEN);
        assert_eq!(segments(&[s, segment(0, 0, 0)])[..SEGMENT_LEN], s);
    }

    #[test]
    fn constants_match_the_spec() {
        assert_eq!((T_IN, T_OUT, T_FLUSH, T_GET_ID), (0, 1, 4, 8));
        assert_eq!((T_DISCARD, T_WRITE_ZEROES), (11, 13));
        assert_eq!((S_OK, S_IOERR, S_UNSUPP), (0, 1, 2));
        assert_eq!(
            (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT),
            (1, 2, 4)
        );
    }
}

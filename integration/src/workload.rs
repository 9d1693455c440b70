//! The fio-style verify workload of the NVMe tests, as data: a seed names a list of writes
//! (random 4 KiB-aligned offsets, sizes from 4 KiB to 1 MiB) and the image they leave.
//! `nvme-load verify` (inside the NVMe guest) runs the list through a vhost-user server
//! with many requests in flight; the host test regenerates the same list from the seed
//! and compares the backing file with [`Workload::image`], byte for byte.
//!
//! Boundary: what is written where, and what the device must then hold. Running the
//! writes is `nvme-load`'s; in-flight writes never overlap (`nvme-load` holds a write back
//! while it overlaps one in flight), so the image does not depend on completion order.

/// One write of the workload: `len` bytes of [`crate::frontend::pattern`]`(seed)` at
/// byte `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    /// Byte offset on the device, a multiple of 4 KiB.
    pub offset: u64,
    /// Bytes, a multiple of 4 KiB, 4 KiB to [`MAX_WRITE`].
    pub len: u64,
    /// The data's pattern seed.
    pub seed: u64,
}

impl Write {
    /// Whether the two writes touch a common byte.
    pub fn overlaps(&self, other: &Write) -> bool {
        self.offset < other.offset + other.len && other.offset < self.offset + self.len
    }

    /// The bytes this write puts on the device.
    pub fn data(&self) -> Vec<u8> {
        crate::frontend::pattern(self.seed, self.len as usize)
    }
}

/// The largest write: 1 MiB, twice QEMU 7.2's NVMe MDTS (7: 512 KiB), so the backend must
/// split it into several commands; also the virtio-blk `size_max` corodev advertises.
pub const MAX_WRITE: u64 = 1 << 20;

/// The writes a seed names, for a device of `capacity` bytes.
#[derive(Debug, Clone)]
pub struct Workload {
    /// In submission order; a later write wins where two overlap.
    pub writes: Vec<Write>,
    /// The device size the offsets were drawn for.
    pub capacity: u64,
}

/// splitmix64: small, seedable, the same on both sides (no rand crate in the guest build).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

impl Workload {
    /// `count` writes for a device of `capacity` bytes (at least [`MAX_WRITE`]). Sizes:
    /// three in four are small (4-32 KiB, so that many fit in flight without overlapping),
    /// one in four large (64 KiB to 1 MiB, every power of two), which crosses MDTS.
    pub fn new(seed: u64, capacity: u64, count: usize) -> Workload {
        assert!(capacity >= MAX_WRITE, "a device of at least 1 MiB");
        let mut rng = Rng(seed);
        let blocks = capacity / 4096;
        let writes = (0..count)
            .map(|i| {
                let len = if rng.below(4) == 0 {
                    (64 << 10) << rng.below(5)
                } else {
                    4096 * (1 + rng.below(8))
                };
                let offset = rng.below(blocks - len / 4096 + 1) * 4096;
                Write {
                    offset,
                    len,
                    seed: seed.wrapping_add(i as u64),
                }
            })
            .collect();
        Workload { writes, capacity }
    }

    /// The device's content after every write, in order, on a zeroed device.
    pub fn image(&self) -> Vec<u8> {
        let mut img = vec![0u8; self.capacity as usize];
        for w in &self.writes {
            img[w.offset as usize..(w.offset + w.len) as usize].copy_from_slice(&w.data());
        }
        img
    }

    /// Which write last wrote byte `offset` (`None`: no write did, it must be zero).
    pub fn last_writer(&self, offset: u64) -> Option<(usize, Write)> {
        self.writes
            .iter()
            .copied()
            .enumerate()
            .rev()
            .find(|(_, w)| (w.offset..w.offset + w.len).contains(&offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_names_one_list_of_aligned_writes_inside_the_device() {
        let a = Workload::new(7, 64 << 20, 500);
        assert_eq!(a.writes, Workload::new(7, 64 << 20, 500).writes);
        assert_ne!(a.writes, Workload::new(8, 64 << 20, 500).writes);
        for w in &a.writes {
            assert_eq!((w.offset % 4096, w.len % 4096), (0, 0), "{w:?}");
            assert!((4096..=MAX_WRITE).contains(&w.len), "{w:?}");
            assert!(w.offset + w.len <= 64 << 20, "{w:?}");
        }
        assert!(
            a.writes.iter().any(|w| w.len > 512 << 10),
            "some writes exceed the controller's 512 KiB MDTS"
        );
    }

    #[test]
    fn the_image_holds_the_last_write_of_each_byte() {
        let w = Workload {
            writes: vec![
                Write {
                    offset: 0,
                    len: 8192,
                    seed: 1,
                },
                Write {
                    offset: 4096,
                    len: 4096,
                    seed: 2,
                },
            ],
            capacity: 16384,
        };
        let img = w.image();
        assert_eq!(img[..4096], w.writes[0].data()[..4096]);
        assert_eq!(img[4096..8192], w.writes[1].data()[..]);
        assert!(img[8192..].iter().all(|&b| b == 0));
        assert_eq!(w.last_writer(5000).map(|(i, _)| i), Some(1));
        assert_eq!(w.last_writer(9000), None);
        assert!(w.writes[0].overlaps(&w.writes[1]));
    }
}

//! The `--verify` data pattern: every 512-byte sector says where it belongs, which write
//! put it there and which run of corodev-bench made that write.
//!
//! Sector layout (little endian):
//!
//! ```text
//! 0        8            12     16                                 512
//! | offset | generation | run  | xorshift stream seeded by all three |
//! ```
//!
//! A stamp per sector, not per block, because a server that splits or reorders segments
//! tears blocks at sector granularity, and the stamp then names what arrived instead of
//! only saying "different". The run id keeps data left by an earlier run from passing for
//! this run's: without it a lost write would go unnoticed whenever the old block happened
//! to carry the same generation. This module only builds and checks bytes; which
//! generation a block should hold is the worker's business.

use std::fmt;

/// The unit that carries a stamp (virtio-blk's sector).
pub const SECTOR: usize = 512;
const HEADER: usize = 16;

/// What a block is expected to hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Device byte offset of the block's first sector.
    pub offset: u64,
    /// Which write (per queue, counting from 1) wrote the block.
    pub generation: u32,
    /// Identifies one corodev-bench run.
    pub run: u32,
}

/// What a mismatching sector held instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// A stamp of this run, but not the expected one: a lost, reordered or misdirected write.
    Stamp { offset: u64, generation: u32 },
    /// The expected stamp, but the bytes after it differ: corruption inside the sector.
    DamagedBody,
    /// Only zero bytes: the server discards writes (a null backend) or never wrote.
    Zeroes,
    /// Data of another run, or no pattern at all (e.g. the image's original contents).
    Foreign { run: u32 },
}

/// The first wrong sector of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Device byte offset of the wrong sector.
    pub sector_offset: u64,
    /// The generation it should have held.
    pub expected_generation: u32,
    /// What it held.
    pub found: Found,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sector at byte {} should hold generation {} ",
            self.sector_offset, self.expected_generation
        )?;
        match self.found {
            Found::Stamp { offset, generation } if offset == self.sector_offset => {
                write!(
                    f,
                    "but holds generation {generation} (lost or reordered write)"
                )
            }
            Found::Stamp { offset, generation } => write!(
                f,
                "but holds the sector for byte {offset}, generation {generation} (misdirected I/O)"
            ),
            Found::DamagedBody => write!(f, "and its stamp does, but the data after it differs"),
            Found::Zeroes => write!(f, "but holds zeroes (does the server discard writes?)"),
            Found::Foreign { run } => {
                write!(
                    f,
                    "but holds data of another run or no pattern (run id {run:#x})"
                )
            }
        }
    }
}

/// splitmix64: turns structured inputs (offset, generation) into an unrelated seed.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The body stream of one sector; never zero-seeded (xorshift would stay at zero).
fn stream(sector_offset: u64, generation: u32, run: u32) -> impl Iterator<Item = u64> {
    let mut x = mix(sector_offset) ^ mix((u64::from(generation) << 32) | u64::from(run)) | 1;
    std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    })
}

fn header(sector_offset: u64, generation: u32, run: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&sector_offset.to_le_bytes());
    h[8..12].copy_from_slice(&generation.to_le_bytes());
    h[12..].copy_from_slice(&run.to_le_bytes());
    h
}

/// Writes the pattern for `stamp` into `buf`, a whole number of sectors.
pub fn fill(buf: &mut [u8], stamp: Stamp) {
    for (i, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
        let off = stamp.offset + (i * SECTOR) as u64;
        let (head, body) = sector.split_at_mut(HEADER);
        head.copy_from_slice(&header(off, stamp.generation, stamp.run));
        for (word, v) in body
            .chunks_exact_mut(8)
            .zip(stream(off, stamp.generation, stamp.run))
        {
            word.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Checks `buf` against the pattern for `stamp`; returns the first wrong sector.
pub fn check(buf: &[u8], stamp: Stamp) -> Option<Mismatch> {
    for (i, sector) in buf.chunks_exact(SECTOR).enumerate() {
        let off = stamp.offset + (i * SECTOR) as u64;
        let (head, body) = sector.split_at(HEADER);
        let head_ok = head == header(off, stamp.generation, stamp.run);
        let body_ok = head_ok
            && body
                .chunks_exact(8)
                .zip(stream(off, stamp.generation, stamp.run))
                .all(|(word, v)| word == v.to_le_bytes());
        if !body_ok {
            return Some(Mismatch {
                sector_offset: off,
                expected_generation: stamp.generation,
                found: classify(sector, stamp.run, head_ok),
            });
        }
    }
    None
}

fn classify(sector: &[u8], run: u32, head_ok: bool) -> Found {
    if head_ok {
        return Found::DamagedBody;
    }
    if sector.iter().all(|&b| b == 0) {
        return Found::Zeroes;
    }
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&sector[r]);
        u64::from_le_bytes(b)
    };
    let (offset, generation, found_run) = (word(0..8), word(8..12) as u32, word(12..16) as u32);
    if found_run == run {
        Found::Stamp { offset, generation }
    } else {
        Found::Foreign { run: found_run }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAMP: Stamp = Stamp {
        offset: 8192,
        generation: 3,
        run: 0xabcd,
    };

    fn block(stamp: Stamp) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        fill(&mut b, stamp);
        b
    }

    #[test]
    fn own_pattern_checks_clean() {
        assert_eq!(check(&block(STAMP), STAMP), None);
    }

    #[test]
    fn older_generation_is_a_lost_write() {
        let old = block(Stamp {
            generation: 2,
            ..STAMP
        });
        let m = check(&old, STAMP).expect("mismatch");
        assert_eq!(m.sector_offset, 8192);
        assert_eq!(
            m.found,
            Found::Stamp {
                offset: 8192,
                generation: 2
            }
        );
    }

    #[test]
    fn other_offset_is_misdirected() {
        let other = block(Stamp { offset: 0, ..STAMP });
        let m = check(&other, STAMP).expect("mismatch");
        assert_eq!(
            m.found,
            Found::Stamp {
                offset: 0,
                generation: 3
            }
        );
    }

    #[test]
    fn flipped_body_byte_names_its_sector() {
        let mut b = block(STAMP);
        b[3 * SECTOR + 100] ^= 1;
        let m = check(&b, STAMP).expect("mismatch");
        assert_eq!(m.sector_offset, 8192 + 3 * SECTOR as u64);
        assert_eq!(m.found, Found::DamagedBody);
    }

    #[test]
    fn zeroes_are_recognised() {
        assert_eq!(
            check(&[0u8; 4096], STAMP).map(|m| m.found),
            Some(Found::Zeroes)
        );
    }

    #[test]
    fn previous_run_is_foreign() {
        let prev = block(Stamp { run: 7, ..STAMP });
        assert_eq!(
            check(&prev, STAMP).map(|m| m.found),
            Some(Found::Foreign { run: 7 })
        );
    }
}

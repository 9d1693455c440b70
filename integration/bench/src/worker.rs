//! One client thread's engine: keeps `iodepth` requests in flight on one libblkio queue over
//! that queue's own slice of the device, and measures what comes back.
//!
//! Every queue owns a disjoint range of blocks. That keeps sequential streams from
//! interleaving and lets `--verify` know what every block holds without any coordination
//! between threads. Buffers (one slot per request in flight) come from the memory region
//! mapped into the server; this module never maps memory itself.

use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use blkio::{Blkioq, Completion, ReqFlags};
use hdrhistogram::Histogram;

use crate::error::Error;
use crate::pattern::{self, Mismatch, Stamp};

/// How long `do_io` may wait without a single completion before the run is declared stalled.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Highest latency the histogram holds exactly (60 s, in ns); longer ones saturate.
const HIST_MAX_NS: u64 = 60_000_000_000;
/// Mismatches described in detail per queue (all are counted).
const MAX_DETAILS: usize = 5;

/// Which block comes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Ascending from the start of the queue's range, wrapping around.
    Sequential,
    /// Uniformly random within the queue's range.
    Random,
}

/// When a phase stops issuing requests.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// Issue until this instant, then drain.
    At(Instant),
    /// Issue exactly this many requests.
    After(u64),
}

/// What one phase does on one queue.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub order: Order,
    /// Percentage of reads (100: only reads, 0: only writes).
    pub read_pct: u8,
    pub stop: Stop,
    /// Visit only blocks whose contents are known (the `--verify` read-back).
    pub known_only: bool,
}

/// A request that failed: the first one of a phase is kept for the error message.
#[derive(Clone, Copy, Debug)]
pub struct IoFailure {
    /// Whether it was a read (else a write).
    pub is_read: bool,
    /// Its byte offset on the device.
    pub offset: u64,
    /// libblkio's result: a negative errno.
    pub ret: i32,
}

/// What one phase measured on one queue.
pub struct PhaseResult {
    pub ios: u64,
    pub io_errors: u64,
    /// First failed request.
    pub first_io_error: Option<IoFailure>,
    /// Latency of every completed request, in ns.
    pub hist: Histogram<u64>,
    pub started: Instant,
    pub finished: Instant,
}

/// One queue's I/O buffers: `slots` windows of `len` bytes in the libblkio-mapped region.
pub struct SlotBufs {
    base: NonNull<u8>,
    len: usize,
    slots: usize,
}

// SAFETY: a SlotBufs is the only handle to its windows (`SlotBufs::new`'s contract), and the
// region stays mapped until the Blkioq that uses them is dropped (libblkio keeps allocated
// regions alive for as long as any of its queues lives), so moving it to the queue's thread
// cannot create a second user or outlive the memory.
unsafe impl Send for SlotBufs {}

impl SlotBufs {
    /// # Safety
    ///
    /// `base` must point to `len * slots` bytes of writable memory that stays mapped while the
    /// returned value lives, and nothing but this value may access those bytes (except the
    /// server, for requests submitted through it).
    pub unsafe fn new(base: NonNull<u8>, len: usize, slots: usize) -> Self {
        Self { base, len, slots }
    }

    fn ptr(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.slots, "slot {slot} of {}", self.slots);
        // In bounds by the assert and `new`'s contract; wrapping_add needs no unsafe.
        self.base.as_ptr().wrapping_add(slot * self.len)
    }

    /// The buffer of `slot`, for filling before a write or checking after a read.
    ///
    /// # Safety
    ///
    /// No request may be in flight on `slot`: the server could be writing into it.
    unsafe fn idle(&mut self, slot: usize) -> &mut [u8] {
        // SAFETY: `ptr` checked the slot is in bounds of the region `new` was given, `&mut self`
        // excludes other borrows of this SlotBufs, and the caller guarantees the server is not
        // accessing the slot.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(slot), self.len) }
    }
}

/// A small fast PRNG (xorshift64*): the offsets must be unpredictable to caches, not secure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; bias is below 2^-40 for our n).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// What `--verify` knows about the queue's blocks.
struct Tracker {
    /// Generation each block holds; 0 means unknown (never written, or a write failed).
    generations: Vec<u32>,
    /// Blocks with a request in flight: never two at once on a block, or the expected
    /// contents of a read would be ambiguous.
    busy: Vec<bool>,
    /// Last generation handed out; unique per write so stale data never passes as new.
    last_generation: u32,
    run: u32,
    checked: u64,
    mismatches: u64,
    details: Vec<Mismatch>,
}

/// A request in flight in one slot.
#[derive(Clone, Copy)]
struct InFlight {
    block: u64,
    is_read: bool,
    generation: u32,
    started: Instant,
}

/// One queue and everything its thread needs.
pub struct Worker {
    pub index: usize,
    queue: Blkioq,
    bufs: SlotBufs,
    /// First block of this queue's range, in units of `bs`.
    first_block: u64,
    blocks: u64,
    bs: u64,
    rng: Rng,
    cursor: u64,
    tracker: Option<Tracker>,
    slots: Vec<Option<InFlight>>,
    completions: Vec<MaybeUninit<Completion>>,
}

/// `--verify` totals of one queue.
pub struct VerifyResult {
    pub checked: u64,
    pub mismatches: u64,
    pub details: Vec<Mismatch>,
}

impl Worker {
    /// A worker for `queue`, owning blocks `first_block..first_block + blocks` of size `bs`,
    /// with one buffer slot per request in flight. `verify_run` enables `--verify`.
    pub fn new(
        index: usize,
        queue: Blkioq,
        bufs: SlotBufs,
        (first_block, blocks): (u64, u64),
        bs: u64,
        verify_run: Option<u32>,
    ) -> Self {
        let depth = bufs.slots;
        let tracker = verify_run.map(|run| Tracker {
            generations: vec![0; blocks as usize],
            busy: vec![false; blocks as usize],
            last_generation: 0,
            run,
            checked: 0,
            mismatches: 0,
            details: Vec::new(),
        });
        Self {
            index,
            queue,
            bufs,
            first_block,
            blocks,
            bs,
            rng: Rng(0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03)),
            cursor: 0,
            tracker,
            slots: vec![None; depth],
            completions: (0..depth).map(|_| MaybeUninit::uninit()).collect(),
        }
    }

    /// Blocks in this queue's range.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Blocks whose contents `--verify` knows (0 without `--verify`).
    pub fn known_blocks(&self) -> u64 {
        self.tracker.as_ref().map_or(0, |t| {
            t.generations.iter().filter(|&&g| g != 0).count() as u64
        })
    }

    /// `--verify` totals so far.
    pub fn verify_result(&self) -> Option<VerifyResult> {
        self.tracker.as_ref().map(|t| VerifyResult {
            checked: t.checked,
            mismatches: t.mismatches,
            details: t.details.clone(),
        })
    }

    /// Runs one phase: fills every slot, then refills each slot as it completes until the
    /// plan says stop, then drains.
    pub fn run(&mut self, plan: &Plan) -> Result<PhaseResult, Error> {
        let mut res = PhaseResult {
            ios: 0,
            io_errors: 0,
            first_io_error: None,
            hist: Histogram::new_with_bounds(1, HIST_MAX_NS, 3)?,
            started: Instant::now(),
            finished: Instant::now(),
        };
        self.cursor = 0;
        let quota = match plan.stop {
            Stop::After(n) => n,
            Stop::At(_) => u64::MAX,
        };
        let (mut issued, mut in_flight) = (0u64, 0usize);
        for slot in 0..self.slots.len() {
            if issued == quota || matches!(plan.stop, Stop::At(t) if Instant::now() >= t) {
                break;
            }
            self.submit(slot, plan);
            issued += 1;
            in_flight += 1;
        }
        while in_flight > 0 {
            let mut timeout = STALL_TIMEOUT;
            let n = self
                .queue
                .do_io(&mut self.completions, 1, Some(&mut timeout), None)
                .map_err(|source| {
                    if source.errno().raw_os_error() == libc::ETIME {
                        Error::Stalled {
                            queue: self.index,
                            in_flight,
                            timeout: STALL_TIMEOUT,
                        }
                    } else {
                        Error::DoIo {
                            queue: self.index,
                            source,
                        }
                    }
                })?;
            // One clock read per batch: the latency error is at most one batch's processing
            // time, and QD1 (batches of one) stays exact.
            let now = Instant::now();
            let more_time = match plan.stop {
                Stop::At(t) => now < t,
                Stop::After(_) => true,
            };
            for i in 0..n {
                // SAFETY: do_io initialised the first `n` entries of `completions`, and
                // Completion is plain data (no Drop), so a bitwise copy is a valid value.
                let c = unsafe { self.completions[i].assume_init_read() };
                let slot = c.user_data;
                self.complete(slot, c.ret, now, &mut res)?;
                in_flight -= 1;
                if more_time && issued < quota {
                    self.submit(slot, plan);
                    issued += 1;
                    in_flight += 1;
                }
            }
        }
        res.finished = Instant::now();
        Ok(res)
    }

    fn next_block(&mut self, plan: &Plan) -> u64 {
        let mut b = match plan.order {
            Order::Sequential => self.cursor,
            Order::Random => self.rng.below(self.blocks),
        };
        if let Some(t) = &self.tracker {
            // Terminates: blocks >= iodepth (checked at startup) and the slot being refilled
            // is idle, so at most iodepth - 1 blocks are busy; a known_only sweep issues at
            // most known_blocks() requests, and every known block ahead of the cursor is idle.
            while t.busy[b as usize] || (plan.known_only && t.generations[b as usize] == 0) {
                b = (b + 1) % self.blocks;
            }
        }
        if plan.order == Order::Sequential {
            self.cursor = (b + 1) % self.blocks;
        }
        b
    }

    fn submit(&mut self, slot: usize, plan: &Plan) {
        let block = self.next_block(plan);
        let is_read = match plan.read_pct {
            100.. => true,
            0 => false,
            pct => self.rng.below(100) < u64::from(pct),
        };
        let offset = (self.first_block + block) * self.bs;
        let mut generation = 0;
        if let Some(t) = &mut self.tracker {
            t.busy[block as usize] = true;
            if !is_read {
                t.last_generation = t.last_generation.wrapping_add(1).max(1);
                generation = t.last_generation;
                let stamp = Stamp {
                    offset,
                    generation,
                    run: t.run,
                };
                // SAFETY: the slot is being (re)submitted, so its previous request completed
                // and nothing is in flight on it.
                pattern::fill(unsafe { self.bufs.idle(slot) }, stamp);
            }
        }
        let buf = self.bufs.ptr(slot);
        let started = Instant::now();
        let len = self.bs as usize;
        if is_read {
            self.queue.read(offset, buf, len, slot, ReqFlags::empty());
        } else {
            self.queue.write(offset, buf, len, slot, ReqFlags::empty());
        }
        self.slots[slot] = Some(InFlight {
            block,
            is_read,
            generation,
            started,
        });
    }

    fn complete(
        &mut self,
        slot: usize,
        ret: i32,
        now: Instant,
        res: &mut PhaseResult,
    ) -> Result<(), Error> {
        let f =
            self.slots
                .get_mut(slot)
                .and_then(Option::take)
                .ok_or(Error::UnknownCompletion {
                    queue: self.index,
                    slot,
                })?;
        let ns = now.saturating_duration_since(f.started).as_nanos();
        res.hist
            .saturating_record(u64::try_from(ns).unwrap_or(u64::MAX).max(1));
        res.ios += 1;
        let offset = (self.first_block + f.block) * self.bs;
        if ret != 0 {
            res.io_errors += 1;
            res.first_io_error.get_or_insert(IoFailure {
                is_read: f.is_read,
                offset,
                ret,
            });
        }
        let Some(t) = &mut self.tracker else {
            return Ok(());
        };
        let b = f.block as usize;
        t.busy[b] = false;
        match (f.is_read, ret == 0) {
            // A failed write leaves the block's contents unknown.
            (false, false) => t.generations[b] = 0,
            (false, true) => t.generations[b] = f.generation,
            (true, true) if t.generations[b] != 0 => {
                let stamp = Stamp {
                    offset,
                    generation: t.generations[b],
                    run: t.run,
                };
                // SAFETY: this slot's request just completed; nothing is in flight on it.
                let data = unsafe { self.bufs.idle(slot) };
                t.checked += 1;
                if let Some(m) = pattern::check(data, stamp) {
                    t.mismatches += 1;
                    if t.details.len() < MAX_DETAILS {
                        t.details.push(m);
                    }
                }
            }
            (true, _) => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = Rng(12345);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            let v = r.below(7);
            assert!(v < 7);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}

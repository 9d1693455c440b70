//! A submission/completion queue pair's rings and indices, shared by the admin queue and
//! the I/O queues: push a command at the tail and ring the doorbell; pop completions by
//! their phase tag and tell the controller the new head. Who waits for what is the
//! caller's (the admin queue polls, an I/O queue parks coroutines).

use std::io;
use std::sync::Arc;

use vfio_ioctls::VfioContainer;

use super::dma::DmaBuf;
use super::pci::Bar;
use super::spec::{Cap, Command, Completion, CQE_BYTES, SQE_BYTES};

/// The rings of queue `qid`, in DMA memory, and where this side is in them.
pub struct Rings {
    /// The queue's identifier (0: admin).
    pub qid: u16,
    entries: u32,
    sq: DmaBuf,
    cq: DmaBuf,
    sq_tail: u32,
    cq_head: u32,
    /// The phase tag a new completion carries (starts at 1, flips at each wrap).
    phase: bool,
    sq_doorbell: usize,
    cq_doorbell: usize,
}

impl Rings {
    /// Zeroed rings of `entries` entries each for queue `qid`.
    pub fn new(
        container: &Arc<VfioContainer>,
        cap: &Cap,
        qid: u16,
        entries: u32,
    ) -> io::Result<Rings> {
        let n = entries as usize;
        Ok(Rings {
            qid,
            entries,
            sq: DmaBuf::new(container, n * SQE_BYTES)?,
            cq: DmaBuf::new(container, n * CQE_BYTES)?,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            sq_doorbell: cap.sq_doorbell(qid),
            cq_doorbell: cap.cq_doorbell(qid),
        })
    }

    /// Entries per ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// The submission ring's IOVA.
    pub fn sq_iova(&self) -> u64 {
        self.sq.iova()
    }

    /// The completion ring's IOVA.
    pub fn cq_iova(&self) -> u64 {
        self.cq.iova()
    }

    /// Writes `cmd` at the tail and rings the submission doorbell. The caller keeps at
    /// most `entries - 1` commands outstanding (a full ring looks empty).
    pub fn submit(&mut self, bar: &Bar, cmd: &Command) {
        let slot = self.sq.ptr().cast::<u32>();
        let at = self.sq_tail as usize * SQE_BYTES / 4;
        for (i, dw) in cmd.0.iter().enumerate() {
            // SAFETY: `sq_tail` < entries, so the 16 dwords lie in the ring; the
            // controller reads the entry only after the doorbell below.
            unsafe { slot.add(at + i).write_volatile(*dw) };
        }
        self.sq_tail = (self.sq_tail + 1) % self.entries;
        // The entry must be in memory before the controller hears of it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        bar.write32(self.sq_doorbell, self.sq_tail);
    }

    /// The next completion, if the controller has posted one (its phase tag is the
    /// current phase). The caller rings [`release`](Self::release) after popping.
    pub fn pop(&mut self) -> Option<Completion> {
        let base = self.cq.ptr().cast::<u32>();
        let at = self.cq_head as usize * CQE_BYTES / 4;
        // SAFETY: `cq_head` < entries: the entry lies in the ring; read volatile because
        // the controller writes it by DMA.
        let dw3 = unsafe { base.add(at + 3).read_volatile() };
        if ((dw3 >> 16) & 1 == 1) != self.phase {
            return None;
        }
        // The rest of the entry is read only after its phase tag said it is new.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        // SAFETY: as above, the entry's first three dwords.
        let dw = unsafe {
            [
                base.add(at).read_volatile(),
                base.add(at + 1).read_volatile(),
                base.add(at + 2).read_volatile(),
                dw3,
            ]
        };
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        Some(Completion::parse(dw))
    }

    /// Whether a completion is waiting to be popped (one read of its phase tag).
    pub fn has_completion(&self) -> bool {
        let base = self.cq.ptr().cast::<u32>();
        let at = self.cq_head as usize * CQE_BYTES / 4;
        // SAFETY: `cq_head` < entries: the entry's last dword lies in the ring; volatile
        // because the controller writes it by DMA.
        let dw3 = unsafe { base.add(at + 3).read_volatile() };
        ((dw3 >> 16) & 1 == 1) == self.phase
    }

    /// Tells the controller the completions popped so far are consumed.
    pub fn release(&self, bar: &Bar) {
        bar.write32(self.cq_doorbell, self.cq_head);
    }
}

//! Taking requests off a guest's avail ring, checking every ring-level rule on the way.
//!
//! The guest writes the avail ring; nothing in it can be trusted. A request-level fault (a
//! bad descriptor, a bad header) fails one request with a status byte. A *ring-level* fault
//! cannot be answered that way — there is no request to answer, or answering would corrupt
//! the used ring — so it breaks the queue: [`Popped::fault`] says why, the caller stops
//! serving the queue, signals the frontend's error eventfd and logs. The rules:
//!
//! - the avail index moves forward by at most the queue size (virtio-queue checks this);
//! - every avail entry names a head below the queue size (virtio 1.2, 2.7.13);
//! - a head is not published again while its request is in flight (2.7.13.1: the driver
//!   must not reuse a buffer before the device returned it) — which also caps the
//!   requests in flight per queue at the queue size;
//! - the three rings lie inside guest memory at the queue's current size (also checked by
//!   the vhost-user library at SET_VRING_ADDR; checked again here because SET_VRING_NUM
//!   may come after it).

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use corodev_devices::memory::GuestMap;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::connection::QueueState;
use crate::inflight::QueueTracker;

/// A chain as popped: it reads guest memory through the map it holds (the worker's
/// handle, see [`GuestMap`]).
pub type Chain = DescriptorChain<GuestMap>;

/// Why a queue is broken.
#[derive(Debug, thiserror::Error)]
pub enum RingFault {
    /// The avail index is more than a queue size ahead of the last one we popped (also
    /// what an index moved backwards looks like).
    #[error("avail index {avail} is more than the queue size {size} ahead of {next}")]
    AvailIndex {
        /// The avail index the driver published.
        avail: u16,
        /// The next index we expected to pop.
        next: u16,
        /// Queue size.
        size: u16,
    },
    /// An avail entry names a descriptor beyond the table.
    #[error("avail entry {head} is not below the queue size {size}")]
    HeadOutOfRange {
        /// The head index published.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// A head was published again while its request is still in flight.
    #[error("head {head} published again while its request is in flight")]
    HeadInFlight {
        /// The head index published twice.
        head: u16,
    },
    /// A ring lies (partly) outside guest memory.
    #[error("{ring} at {addr:#x} ({len} bytes) is not inside guest memory")]
    RingOutsideMemory {
        /// Which ring.
        ring: &'static str,
        /// Its guest address.
        addr: u64,
        /// Its length at the current queue size.
        len: u64,
    },
    /// The avail index or the notification fields could not be accessed.
    #[error("ring not accessible: {0}")]
    Unreadable(#[source] virtio_queue::Error),
}

/// The heads of one queue whose requests are in flight: a bit per descriptor index.
#[derive(Default)]
pub struct InFlightHeads {
    bits: Vec<u64>,
}

impl InFlightHeads {
    /// Marks `head` in flight; false if it already was.
    fn insert(&mut self, head: u16) -> bool {
        let (word, bit) = (usize::from(head / 64), head % 64);
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        let was = self.bits[word] >> bit & 1 == 1;
        self.bits[word] |= 1 << bit;
        !was
    }

    /// Marks `head` in flight if the ring rules allow it: below the queue size, and not
    /// in flight already.
    fn admit(&mut self, head: u16, size: u16) -> Result<(), RingFault> {
        if head >= size {
            return Err(RingFault::HeadOutOfRange { head, size });
        }
        if !self.insert(head) {
            return Err(RingFault::HeadInFlight { head });
        }
        Ok(())
    }

    /// Marks `head` answered.
    pub fn remove(&mut self, head: u16) {
        if let Some(w) = self.bits.get_mut(usize::from(head / 64)) {
            *w &= !(1 << (head % 64));
        }
    }
}

/// What one pop found: the chains to serve, and the fault that stopped it, if any. Chains
/// popped before a fault are well-formed at ring level and are served.
pub struct Popped {
    /// Chains to serve: resubmitted ones first (oldest first), then in avail order.
    pub chains: Vec<Chain>,
    /// The memory map the chains are built on, to serve them with.
    pub mem: GuestMap,
    /// Why the queue must stop, if it must.
    pub fault: Option<RingFault>,
}

/// Pops every available chain of an enabled, ready queue — first the heads a previous
/// daemon left in flight, if the ring just resumed — marking each head in flight (in the
/// inflight region too, through `tracker`, if there is one) and counting it in the queue's in-flight total
/// while the vring lock is held (so GET_VRING_BASE, which takes the lock to stop the
/// queue, never sees a popped chain uncounted). With `rearm`, re-enables notifications
/// and re-checks, so a buffer added in between is not missed (the EVENT_IDX race);
/// without, leaves them off for the poll loop. Never pops more than a queue size from the
/// avail ring, so a guest that keeps publishing cannot hold the lock forever.
///
/// `map` gives the current memory map. It is read again once the chains are popped, and
/// if the frontend changed the map meanwhile, the chains are rebuilt on the new one: a
/// frontend adds a memory region, waits for our answer and only then publishes chains
/// with buffers in it, so a chain popped after the change may need it, and the map read
/// before the pop would refuse its buffers as outside guest memory (seen with libblkio
/// mapping its buffers right after starting the rings).
pub fn pop_all(
    vring: &VringRwLock,
    map: impl Fn() -> GuestMap,
    rearm: bool,
    heads: &mut InFlightHeads,
    queue: &QueueState,
    tracker: Option<&QueueTracker>,
) -> Popped {
    let mem = map();
    let mut popped = Popped {
        chains: Vec::new(),
        mem: mem.clone(),
        fault: None,
    };
    let mem = &mem;
    let mut state = vring.get_mut();
    if !state.is_enabled() || !state.get_queue().ready() {
        return popped;
    }
    let size = state.get_queue().size();
    if let Err(fault) = rings_in_memory(state.get_queue(), mem) {
        popped.fault = Some(fault);
        return popped;
    }
    let resubmitted = resubmit(state.get_queue(), mem, queue, heads, &mut popped);
    queue.in_flight.fetch_add(resubmitted, Ordering::AcqRel);
    let mut avail = 0;
    while popped.fault.is_none() {
        let pass = pop_pass(
            state.get_queue_mut(),
            mem,
            size,
            heads,
            tracker,
            &mut popped,
        );
        queue.in_flight.fetch_add(pass, Ordering::AcqRel);
        avail += pass;
        if popped.fault.is_some() || !rearm || avail >= usize::from(size) {
            break;
        }
        match state.get_queue_mut().enable_notification(&**mem) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => popped.fault = Some(RingFault::Unreadable(e)),
        }
    }
    // Every avail index read above comes before this load, so the map it returns holds
    // every region the frontend had added before publishing those chains.
    let latest = map();
    if !popped.chains.is_empty() && !latest.is(mem) {
        let table = GuestAddress(state.get_queue().desc_table());
        for chain in &mut popped.chains {
            *chain = DescriptorChain::new(latest.clone(), table, size, chain.head_index());
        }
        popped.mem = latest;
    }
    popped
}

/// The chains of the heads a previous daemon left in flight (see [`crate::inflight`]):
/// no longer in the unread part of the avail ring, so rebuilt from their head index.
/// Their region entries already say they are in flight. Returns how many were added.
fn resubmit(
    queue: &virtio_queue::Queue,
    mem: &GuestMap,
    state: &QueueState,
    heads: &mut InFlightHeads,
    popped: &mut Popped,
) -> usize {
    let size = queue.size();
    let mut added = 0;
    for head in state.take_resubmit() {
        if let Err(fault) = heads.admit(head, size) {
            popped.fault = Some(fault);
            break;
        }
        let table = GuestAddress(queue.desc_table());
        popped
            .chains
            .push(DescriptorChain::new(mem.clone(), table, size, head));
        added += 1;
    }
    added
}

/// One pass over the avail ring: pops up to the avail index seen now. Returns the chains
/// added to `popped`.
fn pop_pass(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMap,
    size: u16,
    heads: &mut InFlightHeads,
    tracker: Option<&QueueTracker>,
    popped: &mut Popped,
) -> usize {
    let first = popped.chains.len();
    if let Err(e) = queue.disable_notification(&**mem) {
        popped.fault = Some(RingFault::Unreadable(e));
        return 0;
    }
    let next = queue.next_avail();
    let avail = match queue.avail_idx(&**mem, Ordering::Acquire) {
        Ok(a) => a.0,
        Err(e) => {
            popped.fault = Some(RingFault::Unreadable(e));
            return 0;
        }
    };
    if (Wrapping(avail) - Wrapping(next)).0 > size {
        popped.fault = Some(RingFault::AvailIndex { avail, next, size });
        return 0;
    }
    let iter = match queue.iter(mem.clone()) {
        Ok(it) => it,
        Err(e) => {
            popped.fault = Some(RingFault::Unreadable(e));
            return 0;
        }
    };
    for chain in iter {
        let head = chain.head_index();
        if let Err(fault) = heads.admit(head, size) {
            popped.fault = Some(fault);
            break;
        }
        if let Some(tracker) = tracker {
            tracker.popped(head);
        }
        popped.chains.push(chain);
    }
    // The iterator would also stop, silently, at an unreadable avail entry; it cannot
    // meet one: `rings_in_memory` checked the whole avail ring against this same map.
    prefetch_heads(queue, mem, &popped.chains[first..]);
    popped.chains.len() - first
}

/// Whether all three rings lie inside guest memory at the queue's current size.
fn rings_in_memory(queue: &virtio_queue::Queue, mem: &GuestMemoryMmap) -> Result<(), RingFault> {
    let size = u64::from(queue.size());
    let rings = [
        ("descriptor table", queue.desc_table(), 16 * size),
        ("avail ring", queue.avail_ring(), 6 + 2 * size),
        ("used ring", queue.used_ring(), 6 + 8 * size),
    ];
    for (ring, addr, len) in rings {
        // `len` is at most 6 + 8 * 65535: it fits a usize.
        if !mem.check_range(GuestAddress(addr), len as usize) {
            return Err(RingFault::RingOutsideMemory { ring, addr, len });
        }
    }
    Ok(())
}

/// Whether requests are taken from this ring at all: enabled (SET_VRING_ENABLE) and
/// ready (started, not stopped by GET_VRING_BASE).
pub fn accepts_requests(vring: &VringRwLock) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

/// Re-enables guest notifications on a queue, through `mem` (the library's own call loads
/// its map, which a worker must not touch: see `Connection::mem`). Returns whether the
/// driver published buffers meanwhile; an unreadable ring returns false (the next pop
/// reports it).
pub fn rearm(vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
    let mut state = vring.get_mut();
    state
        .get_queue_mut()
        .enable_notification(mem)
        .unwrap_or(false)
}

/// Whether the driver has published buffers we have not popped on an enabled, ready queue
/// (a read of the avail index in guest memory; no lock beyond the vring read lock).
pub fn has_avail(vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    if !state.is_enabled() || !queue.ready() {
        return false;
    }
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => idx != Wrapping(queue.next_avail()),
        Err(_) => false,
    }
}

/// Starts loading each chain's head descriptor into this core's cache. The driver wrote
/// them on another core; without this each request's coroutine stalls on that transfer
/// in turn, with it the transfers overlap. Only a hint: nothing is dereferenced here.
fn prefetch_heads(queue: &virtio_queue::Queue, mem: &GuestMemoryMmap, chains: &[Chain]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let len = 16 * usize::from(queue.size());
        let Ok(table) = mem.get_slice(GuestAddress(queue.desc_table()), len) else {
            return;
        };
        let base = table.ptr_guard().as_ptr();
        for chain in chains {
            let desc = base.wrapping_add(16 * usize::from(chain.head_index()));
            // SAFETY: a prefetch reads nothing the program can observe and never faults,
            // whatever the address; SSE, its only requirement, is in every x86_64 CPU.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(desc.cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (queue, mem, chains);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_in_flight_once() {
        let mut heads = InFlightHeads::default();
        assert!(heads.insert(0));
        assert!(heads.insert(1023));
        assert!(
            !heads.insert(1023),
            "second publication of an in-flight head"
        );
        heads.remove(1023);
        assert!(heads.insert(1023), "free again once answered");
        heads.remove(40_000); // never inserted: no effect, no panic
        assert!(!heads.insert(0));
    }
}

//! Inflight I/O tracking: how a restarted daemon finishes what its predecessor left in
//! flight (vhost-user spec, "Inflight I/O tracking", split virtqueues).
//!
//! Without it, a frontend that reconnects to a new backend restarts each ring at the used
//! index. Requests complete out of order (io_uring does not keep order), so the avail
//! entries just past the used index may already have been answered while older ones were
//! not: the new backend answers those twice (the guest driver reports "id N is not a
//! head") and the older ones never.
//!
//! With `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` the backend records, in a shared memory
//! region the frontend keeps across backend restarts, which heads are in flight and in
//! what order they were popped:
//! - [`allocate`] answers GET_INFLIGHT_FD with a new, zeroed, sealed memfd;
//! - [`Region::map`] takes the region of SET_INFLIGHT_FD (the one the frontend keeps);
//! - [`QueueTracker::popped`] marks a head in flight with the next counter value;
//! - [`QueueTracker::completing`] and [`QueueTracker::completed`] bracket publishing its
//!   used element (the spec's batch of one: `last_batch_head`, used ring, flag, `used_idx`);
//! - [`QueueTracker::resume`], when the ring starts, finishes a half-recorded last batch,
//!   and returns the heads still in flight (oldest first, for resubmission) and the avail
//!   position after them.
//!
//! Layout, per queue, each queue's part aligned to 64 bytes (as in libvhost-user, so a
//! region outlives a change of backend implementation too):
//! `u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;` then
//! `desc_num` entries of `{ u8 inflight; u8 padding[5]; u16 next; u64 counter }`.
//!
//! The region is memory the frontend can write at any time. Every access is an atomic
//! access at an offset computed from checked indices, and every value read from it is
//! checked before it is used as an index or a count; a region that fails a check is
//! refused (the message that brought it, or the one that would start the ring, fails).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use std::ptr::NonNull;
use vhost::vhost_user::message::VhostUserInflight;

use vm_memory::{FileOffset, MmapRegion};

/// The only region layout version there is.
pub const VERSION: u16 = 1;
/// Each queue's part of the region starts at a multiple of this.
const QUEUE_ALIGN: usize = 64;
/// The spec's `QueueRegionSplit` without its array. Atomics throughout: the frontend maps
/// the same memory and may write any byte of it at any time.
#[repr(C)]
struct QueueHeader {
    features: AtomicU64,
    version: AtomicU16,
    desc_num: AtomicU16,
    last_batch_head: AtomicU16,
    used_idx: AtomicU16,
}

/// The spec's `DescStateSplit`: one descriptor's state.
#[repr(C)]
struct DescState {
    inflight: AtomicU8,
    _padding: [AtomicU8; 5],
    next: AtomicU16,
    counter: AtomicU64,
}

const HEADER: usize = std::mem::size_of::<QueueHeader>();
const DESC: usize = std::mem::size_of::<DescState>();
const _: () = assert!(HEADER == 16 && DESC == 16, "the spec's layout");

/// Why an inflight region, or a request for one, is refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// More queues than the device has.
    #[error("{got} queues asked for, the device has {max}")]
    QueueCount {
        /// Queues in the message.
        got: u16,
        /// Queues of the device.
        max: u16,
    },
    /// A queue size the device cannot have.
    #[error("queue size {got} is not a power of two of at most {max}")]
    QueueSize {
        /// Queue size in the message.
        got: u16,
        /// The device's largest queue size.
        max: u16,
    },
    /// The region is smaller than its queues need.
    #[error("region of {size} bytes is smaller than the {needed} its queues need")]
    TooSmall {
        /// `mmap_size` in the message.
        size: u64,
        /// Bytes needed.
        needed: usize,
    },
    /// The file ends before the region does.
    #[error("file of {len} bytes ends before the region ({end} bytes)")]
    FileTooShort {
        /// File length.
        len: u64,
        /// Offset plus size of the region.
        end: u64,
    },
    /// The region's file could be shrunk under us (a SIGBUS for every access after).
    #[error("region file is not a memfd sealed against shrinking")]
    NotSealed,
    /// Mapping the region failed (e.g. an offset that is not page-aligned).
    #[error("cannot map the region: {0}")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    /// A system call failed.
    #[error("{call}: {source}")]
    Os {
        /// The call.
        call: &'static str,
        /// What it said.
        source: std::io::Error,
    },
    /// The queue has no part in the region.
    #[error("queue {queue} is beyond the region's {num_queues} queues")]
    NoSuchQueue {
        /// The queue started.
        queue: usize,
        /// Queues in the region.
        num_queues: u16,
    },
    /// The ring's indices could not be read from guest memory.
    #[error("ring not accessible: {0}")]
    Ring(#[source] virtio_queue::Error),
    /// An unknown layout version.
    #[error("region version {0} is not {VERSION}")]
    Version(u16),
    /// The region was written for another queue size.
    #[error("region records {desc_num} descriptors, the ring has {size}")]
    DescNum {
        /// `desc_num` in the region.
        desc_num: u16,
        /// The ring's size.
        size: u16,
    },
    /// A descriptor index in the region beyond the ring.
    #[error("{what} {index} is not below the queue size {size}")]
    Index {
        /// Which field.
        what: &'static str,
        /// Its value.
        index: u16,
        /// Queue size.
        size: u16,
    },
    /// The last batch is longer than a ring.
    #[error("last batch of {len} completions is longer than the queue size {size}")]
    Batch {
        /// Used ring index minus the region's.
        len: u16,
        /// Queue size.
        size: u16,
    },
    /// An `inflight` flag that is neither 0 nor 1.
    #[error("descriptor {head} has inflight flag {value}")]
    Flag {
        /// The descriptor.
        head: u16,
        /// Its flag.
        value: u8,
    },
    /// More requests in flight than the driver has published past the used index.
    #[error("{in_flight} requests in flight, but only {published} published past the used index")]
    AheadOfAvail {
        /// Flags set in the region.
        in_flight: u16,
        /// Avail index minus used index.
        published: u16,
    },
}

/// Bytes of one queue's part of a region.
fn queue_stride(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// Checks the queue count and size of a GET/SET_INFLIGHT_FD message against the device.
fn check_shape(
    msg: &VhostUserInflight,
    max_queues: u16,
    max_queue_size: u16,
) -> Result<usize, InflightError> {
    let (num_queues, queue_size) = (msg.num_queues, msg.queue_size);
    if num_queues == 0 || num_queues > max_queues {
        return Err(InflightError::QueueCount {
            got: num_queues,
            max: max_queues,
        });
    }
    if !queue_size.is_power_of_two() || queue_size > max_queue_size {
        return Err(InflightError::QueueSize {
            got: queue_size,
            max: max_queue_size,
        });
    }
    Ok(usize::from(num_queues) * queue_stride(queue_size))
}

fn os(call: &'static str) -> InflightError {
    InflightError::Os {
        call,
        source: std::io::Error::last_os_error(),
    }
}

/// GET_INFLIGHT_FD: a new region for the queues and queue size asked for: a zero-filled
/// memfd, sealed so that nobody can shrink it (or grow it, or change the seals), and its
/// description.
pub fn allocate(
    msg: &VhostUserInflight,
    max_queues: u16,
    max_queue_size: u16,
) -> Result<(VhostUserInflight, File), InflightError> {
    let size = check_shape(msg, max_queues, max_queue_size)?;
    // SAFETY: the name is a NUL-terminated literal; the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"corodev-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(os("memfd_create"));
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)
        .map_err(|source| InflightError::Os {
            call: "ftruncate",
            source,
        })?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor we own, with an int argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(os("fcntl(F_ADD_SEALS)"));
    }
    let reply = VhostUserInflight::new(size as u64, 0, msg.num_queues, msg.queue_size);
    Ok((reply, file))
}

/// A mapped inflight region (SET_INFLIGHT_FD), shared by the queues' trackers.
pub struct Region {
    map: MmapRegion,
    num_queues: u16,
    queue_size: u16,
}

impl Region {
    /// Maps the frontend's region after checking that it fits the device, that the file
    /// holds all of it and that it cannot be shrunk while mapped (an access past the end
    /// of a shrunk file would raise SIGBUS).
    pub fn map(
        msg: &VhostUserInflight,
        file: File,
        max_queues: u16,
        max_queue_size: u16,
    ) -> Result<Arc<Region>, InflightError> {
        let needed = check_shape(msg, max_queues, max_queue_size)?;
        let (size, offset) = (msg.mmap_size, msg.mmap_offset);
        if size < needed as u64 {
            return Err(InflightError::TooSmall { size, needed });
        }
        // SAFETY: F_GET_SEALS on a descriptor we own; no argument.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        let len = file
            .metadata()
            .map_err(|source| InflightError::Os {
                call: "fstat",
                source,
            })?
            .len();
        let end = offset.saturating_add(needed as u64);
        if len < end {
            return Err(InflightError::FileTooShort { len, end });
        }
        let map = MmapRegion::from_file(FileOffset::new(file, offset), needed)
            .map_err(InflightError::Map)?;
        Ok(Arc::new(Region {
            map,
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        }))
    }

    /// The tracker of queue `queue`'s part of the region.
    pub fn queue(self: &Arc<Self>, queue: usize) -> Result<QueueTracker, InflightError> {
        if queue >= usize::from(self.num_queues) {
            return Err(InflightError::NoSuchQueue {
                queue,
                num_queues: self.num_queues,
            });
        }
        // Inside the mapping: it holds `num_queues` parts of this stride.
        let part = self
            .map
            .as_ptr()
            .wrapping_add(queue * queue_stride(self.queue_size));
        let header =
            NonNull::new(part.cast::<QueueHeader>()).ok_or(InflightError::NoSuchQueue {
                queue,
                num_queues: self.num_queues,
            })?;
        let descs = NonNull::new(part.wrapping_add(HEADER).cast::<DescState>()).ok_or(
            InflightError::NoSuchQueue {
                queue,
                num_queues: self.num_queues,
            },
        )?;
        Ok(QueueTracker {
            _region: self.clone(),
            header,
            descs,
            size: self.queue_size,
            counter: AtomicU64::new(0),
        })
    }
}

/// The ring as [`QueueTracker::resume`] needs to see it.
pub struct RingView<F: Fn(u16) -> Option<u16>> {
    /// The queue size (SET_VRING_NUM).
    pub size: u16,
    /// The used index in guest memory: requests the driver has been answered.
    pub used_idx: u16,
    /// The avail index in guest memory: requests the driver has published.
    pub avail_idx: u16,
    /// The head in the avail ring at a (free-running) avail position.
    pub avail_head: F,
}

/// What a queue resumes with.
#[derive(Debug, PartialEq, Eq)]
pub struct Resume {
    /// Heads left in flight, oldest first: to be served again before any new request.
    pub heads: Vec<u16>,
    /// The avail position after every request popped before the restart.
    pub next_avail: u16,
    /// How many of `heads` were overtaken: later requests completed before them, so their
    /// avail slots lie below the used index (restarting at the used index would have
    /// served the wrong requests).
    pub overtaken: usize,
}

/// One queue's part of a region: marks heads in flight and answered.
///
/// Written by the queue's worker thread while the ring runs, and by the frontend thread
/// in [`resume`](Self::resume) before it starts: never by both at once.
pub struct QueueTracker {
    /// Keeps the mapping `header` and `descs` point into.
    _region: Arc<Region>,
    /// This queue's header in the region.
    header: NonNull<QueueHeader>,
    /// Its `size` descriptor states, right after the header.
    descs: NonNull<DescState>,
    /// Descriptors in the region's part (`desc_num` as the frontend asked for it).
    size: u16,
    /// Pop order of the next head marked in flight.
    counter: AtomicU64,
}

// SAFETY: the pointers point into the mapping `_region` keeps alive for as long as the
// tracker exists, and everything there is accessed only through atomics, from any thread.
unsafe impl Send for QueueTracker {}
// SAFETY: as for Send: shared access is atomic access.
unsafe impl Sync for QueueTracker {}

impl QueueTracker {
    fn header(&self) -> &QueueHeader {
        // SAFETY: `Region::queue` pointed `header` at the start of this queue's part,
        // inside the mapping (which `_region` keeps); the mapping is page-aligned and each
        // part starts at a multiple of 64, so it is aligned for the header's u64.
        unsafe { self.header.as_ref() }
    }

    /// `head`'s state, if `head` is below the region's queue size.
    fn desc(&self, head: u16) -> Option<&DescState> {
        if head >= self.size {
            return None;
        }
        // SAFETY: head < size, and the part holds `size` entries after the header, inside
        // the mapping (see `header`); entries are 16 bytes from a 16-byte-aligned start,
        // so each field is aligned.
        Some(unsafe { &*self.descs.as_ptr().add(usize::from(head)) })
    }

    /// Reconciles the region with the ring about to start (spec, "When reconnecting") and
    /// says what to resubmit. `None`: the region was fresh (version 0) and is now
    /// initialised; nothing was in flight, and the ring starts where the frontend's base
    /// says. Nothing is written unless every check passes.
    pub fn resume<F: Fn(u16) -> Option<u16>>(
        &self,
        ring: &RingView<F>,
    ) -> Result<Option<Resume>, InflightError> {
        let size = ring.size;
        if self.size != size {
            return Err(InflightError::DescNum {
                desc_num: self.size,
                size,
            });
        }
        let h = self.header();
        match h.version.load(Ordering::Acquire) {
            0 => {
                self.initialise(ring.used_idx);
                return Ok(None);
            }
            VERSION => {}
            v => return Err(InflightError::Version(v)),
        }
        let desc_num = h.desc_num.load(Ordering::Acquire);
        if desc_num != size {
            return Err(InflightError::DescNum { desc_num, size });
        }
        let mut in_flight = Vec::new();
        for (head, d) in self.descs() {
            match d.inflight.load(Ordering::Acquire) {
                0 => {}
                1 => in_flight.push(head),
                value => return Err(InflightError::Flag { head, value }),
            }
        }
        // Spec step 1: the last batch reached the used ring but not the region.
        let recorded = h.used_idx.load(Ordering::Acquire);
        let batch = ring.used_idx.wrapping_sub(recorded);
        let mut last = Vec::new();
        if batch > size {
            return Err(InflightError::Batch { len: batch, size });
        }
        let mut head = h.last_batch_head.load(Ordering::Acquire);
        for _ in 0..batch {
            let Some(d) = self.desc(head) else {
                return Err(InflightError::Index {
                    what: "last batch entry",
                    index: head,
                    size,
                });
            };
            last.push(head);
            head = d.next.load(Ordering::Acquire);
        }
        // Everything is checked: only now is the region written.
        for &head in &last {
            if let Some(d) = self.desc(head) {
                d.inflight.store(0, Ordering::Release);
            }
        }
        in_flight.retain(|h| !last.contains(h));
        h.used_idx.store(ring.used_idx, Ordering::Release);

        // `in_flight` has at most `size` (<= 32768) entries.
        let count = in_flight.len() as u16;
        let published = ring.avail_idx.wrapping_sub(ring.used_idx);
        if count > published {
            return Err(InflightError::AheadOfAvail {
                in_flight: count,
                published,
            });
        }
        let mut ordered: Vec<(u64, u16)> = in_flight
            .iter()
            .filter_map(|&h| Some((self.desc(h)?.counter.load(Ordering::Acquire), h)))
            .collect();
        ordered.sort_unstable();
        let next = ordered.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        self.counter.store(next, Ordering::Relaxed);
        let heads: Vec<u16> = ordered.into_iter().map(|(_, h)| h).collect();
        let window: Vec<Option<u16>> = (0..count)
            .map(|i| (ring.avail_head)(ring.used_idx.wrapping_add(i)))
            .collect();
        let overtaken = heads
            .iter()
            .filter(|h| !window.contains(&Some(**h)))
            .count();
        Ok(Some(Resume {
            heads,
            next_avail: ring.used_idx.wrapping_add(count),
            overtaken,
        }))
    }

    /// Every descriptor state of the queue, with its head index.
    fn descs(&self) -> impl Iterator<Item = (u16, &DescState)> {
        (0..self.size).filter_map(|head| Some((head, self.desc(head)?)))
    }

    /// A region never used: nothing in flight, the used index where the ring is.
    fn initialise(&self, used_idx: u16) {
        for (_, d) in self.descs() {
            d.inflight.store(0, Ordering::Relaxed);
            d.next.store(0, Ordering::Relaxed);
            d.counter.store(0, Ordering::Relaxed);
        }
        let h = self.header();
        h.features.store(0, Ordering::Relaxed);
        h.desc_num.store(self.size, Ordering::Relaxed);
        h.last_batch_head.store(0, Ordering::Relaxed);
        h.used_idx.store(used_idx, Ordering::Relaxed);
        self.counter.store(0, Ordering::Relaxed);
        // Written last: a region is in use only once the rest is.
        h.version.store(VERSION, Ordering::Release);
    }

    /// Spec, "receiving available buffers": `head` was popped; its counter, then its flag.
    pub fn popped(&self, head: u16) {
        let Some(d) = self.desc(head) else {
            return;
        };
        // Only the queue's worker writes the counter while the ring runs: no RMW needed.
        let counter = self.counter.load(Ordering::Relaxed);
        self.counter
            .store(counter.wrapping_add(1), Ordering::Relaxed);
        d.counter.store(counter, Ordering::Relaxed);
        d.inflight.store(1, Ordering::Release);
    }

    /// Spec, "supplying used buffers", steps 1-3, before the used element is written:
    /// `head` is the last (only) one of the batch.
    pub fn completing(&self, head: u16) {
        let Some(d) = self.desc(head) else {
            return;
        };
        let h = self.header();
        d.next
            .store(h.last_batch_head.load(Ordering::Relaxed), Ordering::Relaxed);
        h.last_batch_head.store(head, Ordering::Relaxed);
        // The batch is recorded before the used ring can show it.
        fence(Ordering::Release);
    }

    /// Steps 5-6, after the used element and index are written: `head` is no longer in
    /// flight, and the region has caught up with the used index.
    pub fn completed(&self, head: u16, used_idx: u16) {
        fence(Ordering::Release);
        if let Some(d) = self.desc(head) {
            d.inflight.store(0, Ordering::Release);
        }
        self.header().used_idx.store(used_idx, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: u16 = 8;

    fn region(num_queues: u16) -> (Arc<Region>, File) {
        let ask = VhostUserInflight::new(0, 0, num_queues, Q);
        let (desc, file) = allocate(&ask, 4, 256).expect("allocate");
        let shared = file.try_clone().expect("dup");
        (Region::map(&desc, file, 4, 256).expect("map"), shared)
    }

    fn ring(
        used_idx: u16,
        avail_idx: u16,
        avail: &[u16],
    ) -> RingView<impl Fn(u16) -> Option<u16> + '_> {
        RingView {
            size: Q,
            used_idx,
            avail_idx,
            avail_head: move |pos| avail.get(usize::from(pos % Q)).copied(),
        }
    }

    /// What a daemon does with a request: pop, then (maybe) answer.
    fn answer(t: &QueueTracker, head: u16, used_idx: &mut u16) {
        t.completing(head);
        *used_idx += 1;
        t.completed(head, *used_idx);
    }

    #[test]
    fn allocated_region_is_sealed_zeroed_and_sized_per_queue() {
        let ask = VhostUserInflight::new(0, 0, 2, 256);
        let (desc, file) = allocate(&ask, 4, 256).expect("allocate");
        let per_queue = (16 + 16 * 256_usize).next_multiple_of(64);
        assert_eq!(desc.mmap_size, 2 * per_queue as u64);
        assert_eq!(file.metadata().unwrap().len(), desc.mmap_size);
        assert!(file.set_len(1).is_err(), "sealed against shrinking");
        assert!(file.set_len(desc.mmap_size * 2).is_err(), "and growing");
    }

    #[test]
    fn out_of_order_completion_resumes_the_older_request_only() {
        let (r, _f) = region(1);
        let t = r.queue(0).unwrap();
        assert_eq!(t.resume(&ring(0, 0, &[])).unwrap(), None, "fresh region");
        // Heads 3, 5, 6 popped in that order; 5 answered first.
        for h in [3, 5, 6] {
            t.popped(h);
        }
        let mut used = 0;
        answer(&t, 5, &mut used);
        // A new daemon: same region.
        let t2 = r.queue(0).unwrap();
        let resume = t2.resume(&ring(used, 3, &[3, 5, 6])).unwrap().unwrap();
        assert_eq!(
            resume.heads,
            vec![3, 6],
            "oldest first, the answered one not again"
        );
        assert_eq!(resume.next_avail, 3);
        assert_eq!(resume.overtaken, 1, "3 sits below the used index");
    }

    #[test]
    fn a_half_recorded_batch_is_finished() {
        let (r, _f) = region(1);
        let t = r.queue(0).unwrap();
        t.resume(&ring(0, 0, &[])).unwrap();
        t.popped(2);
        t.popped(4);
        // The daemon died after writing the used ring, before clearing the flag.
        t.completing(4);
        let resume = r
            .queue(0)
            .unwrap()
            .resume(&ring(1, 2, &[2, 4]))
            .unwrap()
            .unwrap();
        assert_eq!(resume.heads, vec![2], "4 was answered: not again");
        assert_eq!(resume.next_avail, 2);
        assert_eq!(resume.overtaken, 1, "4 overtook 2");
    }

    #[test]
    fn hostile_regions_are_refused_before_anything_is_written() {
        let (r, f) = region(1);
        let t = r.queue(0).unwrap();
        t.resume(&ring(0, 0, &[])).unwrap();
        let poke = |off: u64, bytes: &[u8]| {
            use std::os::unix::fs::FileExt;
            f.write_all_at(bytes, off).unwrap();
        };
        let resume = |used, avail| r.queue(0).unwrap().resume(&ring(used, avail, &[0; 8]));
        poke(8, &2u16.to_le_bytes());
        assert!(matches!(resume(0, 0), Err(InflightError::Version(2))));
        poke(8, &1u16.to_le_bytes());
        poke(10, &16u16.to_le_bytes());
        assert!(matches!(
            resume(0, 0),
            Err(InflightError::DescNum { desc_num: 16, .. })
        ));
        poke(10, &Q.to_le_bytes());
        poke(16, &[7]);
        assert!(matches!(
            resume(0, 0),
            Err(InflightError::Flag { head: 0, value: 7 })
        ));
        poke(16, &[1]);
        assert!(matches!(
            resume(0, 0),
            Err(InflightError::AheadOfAvail {
                in_flight: 1,
                published: 0
            })
        ));
        assert!(matches!(resume(0, 1), Ok(Some(_))));
        poke(12, &40u16.to_le_bytes());
        assert!(matches!(
            resume(1, 1),
            Err(InflightError::Index { index: 40, .. })
        ));
        assert!(matches!(
            resume(100, 100),
            Err(InflightError::Batch { len: 100, .. })
        ));
        // Still in flight: nothing was changed by the refused attempts.
        assert!(matches!(resume(0, 1), Ok(Some(Resume { ref heads, .. })) if heads == &[0]));
    }

    #[test]
    fn regions_that_do_not_fit_are_refused() {
        let ask = VhostUserInflight::new(0, 0, 1, Q);
        let (desc, file) = allocate(&ask, 4, 256).unwrap();
        let map = |d: &VhostUserInflight, f: &File| Region::map(d, f.try_clone().unwrap(), 4, 256);
        let big = VhostUserInflight::new(desc.mmap_size, 0, 4, Q);
        assert!(matches!(
            map(&big, &file),
            Err(InflightError::TooSmall { .. })
        ));
        let shifted = VhostUserInflight::new(desc.mmap_size, 4096, 1, Q);
        assert!(matches!(
            map(&shifted, &file),
            Err(InflightError::FileTooShort { .. })
        ));
        let odd = VhostUserInflight::new(desc.mmap_size, 0, 1, 6);
        assert!(matches!(
            map(&odd, &file),
            Err(InflightError::QueueSize { got: 6, .. })
        ));
        let many = VhostUserInflight::new(desc.mmap_size, 0, 5, Q);
        assert!(matches!(
            map(&many, &file),
            Err(InflightError::QueueCount { got: 5, .. })
        ));
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(desc.mmap_size).unwrap();
        assert!(matches!(map(&desc, &plain), Err(InflightError::NotSealed)));
        assert!(matches!(
            region(1).0.queue(1),
            Err(InflightError::NoSuchQueue {
                queue: 1,
                num_queues: 1
            })
        ));
    }
}

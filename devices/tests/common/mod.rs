//! What the device tests share: the request types and the guest wire formats (request
//! header, discard/write-zeroes segment, from `corodev-testkit`, which the integration
//! tests use too), descriptor flags, and split descriptors for the mock queue, so each test
//! file builds chains the same way; for the backend tests, running a closure as a
//! coroutine on a real scheduler and an iovec over a heap buffer.

#![allow(dead_code, unused_imports)] // Each test binary uses a different subset.

use std::cell::Cell;
use std::rc::Rc;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};

pub use corodev_testkit::{
    header, segment as seg, segments, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};

/// `VIRTQ_DESC_F_NEXT`, short for hand-written chains.
pub const NEXT: u16 = corodev_testkit::VIRTQ_DESC_F_NEXT;
/// `VIRTQ_DESC_F_WRITE`, short for hand-written chains.
pub const W: u16 = corodev_testkit::VIRTQ_DESC_F_WRITE;
/// `VIRTQ_DESC_F_INDIRECT`, short for hand-written chains.
pub const INDIRECT: u16 = corodev_testkit::VIRTQ_DESC_F_INDIRECT;

/// A split descriptor; the mock queue fills in NEXT flags and indices.
pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    desc_next(addr, len, flags, 0)
}

/// A split descriptor with an explicit `next`.
pub fn desc_next(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Runs `f` as the only task of a fresh scheduler until it finishes.
pub fn run_in_task(f: impl FnOnce() + 'static) {
    let sched = coro::Scheduler::default();
    let done = Rc::new(Cell::new(false));
    let d = done.clone();
    sched
        .spawn(move || {
            f();
            d.set(true);
        })
        .expect("spawn");
    assert_eq!(sched.run_until_idle().expect("run"), 0);
    assert!(done.get(), "task must finish");
}

/// An iovec over `buf`.
pub fn iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

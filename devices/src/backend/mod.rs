//! Storage backends: where a virtio-blk request's bytes come from and go to.
//!
//! Backend methods are plain blocking-style calls that run *inside a request coroutine*:
//! an implementation submits its I/O (io_uring through `coro::io`, or any completion source
//! through `coro::park`/`wake`) and the coroutine parks until it completes, while the worker
//! thread serves other requests. A backend that truly blocks the thread (a synchronous
//! ioctl) stalls every queue of that worker, and must say so where it does it.
//!
//! Offsets and lengths reaching a backend have been validated by the request parser
//! against the device's capacity; errors a backend returns become IOERR for that one
//! request. The one exception to "inside a coroutine" is [`BlockBackend::resize`], a
//! control operation called from a control thread.

mod buffers;
mod file;
mod null;
#[cfg(feature = "nvme")]
pub mod nvme;
#[cfg(feature = "rbd")]
pub mod rbd;

use std::io;

pub use buffers::GuestBuffers;
pub use file::{FileBackend, UnsupportedDirectAlign};
pub use null::NullBackend;
#[cfg(feature = "nvme")]
pub use nvme::{NvmeBackend, NvmeError};
#[cfg(feature = "rbd")]
pub use rbd::{RbdBackend, RbdError, RbdOptions};

/// I/O geometry of the storage, in bytes (virtio-blk `blk_size` floor and `topology`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// The smallest unit the backend can address: 512, or the storage's O_DIRECT offset
    /// alignment (the disk's logical sector, 4096 on 4K-native disks) when O_DIRECT makes
    /// the kernel refuse anything smaller. The guest's block size must not be below it.
    pub logical_block_size: u32,
    /// The smallest write the storage can do without read-modify-write.
    pub physical_block_size: u32,
    /// Minimum I/O size the storage prefers (0: no hint).
    pub min_io_size: u32,
    /// Optimal I/O size, e.g. a RAID stripe (0: no hint).
    pub opt_io_size: u32,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            logical_block_size: 512,
            physical_block_size: 512,
            min_io_size: 0,
            opt_io_size: 0,
        }
    }
}

/// Why a backend refused a new size.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// The storage is open read-only.
    #[error("the disk is open read-only")]
    ReadOnly,
    /// A block device's size is the device's: corodev cannot change it.
    #[error("the disk is a block device, whose size is the device's own; grow the device itself (e.g. lvextend), corodev cannot")]
    BlockDevice,
    /// This backend cannot change its size.
    #[error("this backend cannot change its size")]
    Unsupported,
    /// The storage refused the new size (no space, permissions, the cluster's answer).
    #[error("the storage refused the new size: {0}")]
    Storage(#[source] io::Error),
}

/// Storage behind a virtio-blk device. Every method may park the calling coroutine; none
/// may be called outside one unless the implementation says so.
pub trait BlockBackend: Send + Sync {
    /// Size in bytes, as now (see [`resize`](Self::resize)).
    fn size(&self) -> u64;

    /// Makes the storage `new_size` bytes large, growing or shrinking it: whether a
    /// smaller size is allowed, and whether it is a whole number of the guest's blocks,
    /// are the caller's checks. On success [`size`](Self::size) returns `new_size`.
    ///
    /// Called on a control thread, never in a coroutine: it blocks until the storage has
    /// the new size (a file's `ftruncate`, librbd's synchronous resize). Requests keep
    /// running meanwhile; the device's capacity is raised only after this returns, so
    /// none reaches past the old end before the storage is there. The default refuses.
    fn resize(&self, new_size: u64) -> Result<(), ResizeError> {
        let _ = new_size;
        Err(ResizeError::Unsupported)
    }

    /// Geometry hints for the guest.
    fn topology(&self) -> Topology {
        Topology::default()
    }

    /// Whether the storage refuses writes (opened read-only).
    fn is_read_only(&self) -> bool {
        false
    }

    /// Whether this is a block device rather than an image file.
    fn is_block_device(&self) -> bool {
        false
    }

    /// Whether completed writes sit in a volatile cache until [`flush`](Self::flush): the
    /// device's initial `writeback` setting. True for the page cache and for disks with
    /// a write cache, which is nearly all of them.
    fn writeback_cache(&self) -> bool {
        true
    }

    /// Whether the worker should send each I/O to the kernel as soon as its request
    /// queues it rather than once per batch of requests (`coro::io::Ring::submit_each`):
    /// true when I/O reaches a device, where dispatching a batch together makes it
    /// complete together and the driver refill the queue in lockstep.
    fn submit_each_io(&self) -> bool {
        false
    }

    /// Fills `bufs` from `offset`. Bytes past the end of an image file read as zeroes.
    fn read_vectored(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()>;

    /// Writes all of `bufs` at `offset`.
    fn write_vectored(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()>;

    /// Makes completed writes durable. Once a flush has failed, writes may have been lost
    /// for good, so every later flush of the disk fails too (with the same error), rather
    /// than report durable what never got there.
    fn flush(&self) -> io::Result<()>;

    /// Drops the data of a range; later reads return zeroes or the old data (virtio allows
    /// either for discard, and allows ignoring it).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes a range read as zeroes; `may_unmap` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;

    /// The frontend's guest memory is now `regions` (address in this process, length):
    /// what request buffers may point into until the next call. A backend whose device
    /// reads and writes that memory itself (NVMe over VFIO) maps it for DMA here and
    /// unmaps what is gone; `&[]` when the frontend leaves. Called outside coroutines,
    /// with no request of the connection in flight when the memory goes away.
    fn guest_memory(&self, _regions: &[(u64, u64)]) -> io::Result<()> {
        Ok(())
    }
}

//! Storage backends: where a virtio-blk request's bytes come from and go to.
//!
//! Backend methods are plain blocking-style calls that run *inside a request coroutine*:
//! an implementation submits its I/O (io_uring through `coro::io`, or any completion source
//! through `coro::park`/`wake`) and the coroutine parks until it completes. The worker
//! thread serves other requests meanwhile. A backend that truly blocks the thread (a
//! synchronous ioctl) stalls its whole queue group, and must say so.

mod buffers;
mod file;
mod null;

use std::io;

pub use buffers::GuestBuffers;
pub use file::FileBackend;
pub use null::NullBackend;

/// I/O geometry hints for the guest (virtio-blk `topology`), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// The smallest write the storage can do without read-modify-write.
    pub physical_block_size: u32,
    /// Minimum I/O size the storage prefers.
    pub min_io_size: u32,
    /// Optimal I/O size (e.g. a RAID stripe).
    pub opt_io_size: u32,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            physical_block_size: 512,
            min_io_size: 0,
            opt_io_size: 0,
        }
    }
}

/// Storage behind a virtio-blk device. Offsets and lengths are in bytes and have been
/// validated against [`size`](Self::size) by the request parser.
pub trait BlockBackend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Geometry hints for the guest.
    fn topology(&self) -> Topology {
        Topology::default()
    }

    /// Whether the storage refuses writes (opened read-only).
    fn is_read_only(&self) -> bool {
        false
    }

    /// Fills `bufs` from `offset`. Bytes past the end of a file read as zeroes.
    fn read(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()>;

    /// Writes all of `bufs` at `offset`.
    fn write(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()>;

    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;

    /// Drops the data of a range; later reads return zeroes or the old data (virtio allows
    /// either for discard).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes a range read as zeroes; `may_unmap` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;
}

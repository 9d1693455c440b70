//! The null backend: reads return zeroes, writes are discarded, optionally after a fixed
//! latency. For benchmarks that measure the data path rather than storage, and for tests.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{BlockBackend, GuestBuffers, ResizeError};

/// A device of a given size that stores nothing.
pub struct NullBackend {
    size: AtomicU64,
    latency: Duration,
}

impl NullBackend {
    /// A null device of `size` bytes; each operation first sleeps `latency` in its
    /// coroutine (`coro::sleep`), as storage with that service time would. With a zero
    /// latency nothing parks, so the backend also works outside a coroutine.
    pub fn new(size: u64, latency: Duration) -> NullBackend {
        NullBackend {
            size: AtomicU64::new(size),
            latency,
        }
    }

    fn wait(&self) {
        if !self.latency.is_zero() {
            coro::sleep(self.latency);
        }
    }
}

impl BlockBackend for NullBackend {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Any size: there is nothing to keep.
    fn resize(&self, new_size: u64) -> Result<(), ResizeError> {
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// True: it models a disk with a cache, so the guest's flushes reach it (and pay its
    /// latency) as they would on real storage.
    fn writeback_cache(&self) -> bool {
        true
    }

    fn read_vectored(&self, bufs: &GuestBuffers<'_>, _offset: u64) -> io::Result<()> {
        self.wait();
        bufs.zero_from(0);
        Ok(())
    }

    fn write_vectored(&self, _bufs: &GuestBuffers<'_>, _offset: u64) -> io::Result<()> {
        self.wait();
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.wait();
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        self.wait();
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> io::Result<()> {
        self.wait();
        Ok(())
    }
}

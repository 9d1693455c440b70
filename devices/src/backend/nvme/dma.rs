//! Memory the controller reads and writes by DMA: queue rings, Identify pages, PRP lists
//! and bounce buffers, each an anonymous mapping of whole pages mapped in the IOMMU at
//! IOVA = its address (as guest memory is, see [`super::NvmeBackend`]).
//!
//! The device may write such memory at any time it holds a command pointing at it, so it
//! is never borrowed as a Rust reference: reads and writes go through raw pointers,
//! volatile where the device and the CPU hand entries back and forth (rings, lists).

use std::io;
use std::sync::Arc;

use vfio_ioctls::VfioContainer;

use super::spec::PAGE;

/// A page-aligned buffer mapped for the controller's DMA; unmapped and freed on drop.
pub struct DmaBuf {
    ptr: *mut u8,
    len: usize,
    container: Arc<VfioContainer>,
}

// SAFETY: the buffer is plain memory owned by this value; every access goes through raw
// pointers whose users synchronise with the device (and, for rings, with the one worker
// that owns them), so moving or sharing the handle between threads is sound.
unsafe impl Send for DmaBuf {}
// SAFETY: see `Send`: `&DmaBuf` only hands out the raw pointer and the length.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// `len` bytes (rounded up to whole pages) of zeroed memory, mapped for DMA.
    pub fn new(container: &Arc<VfioContainer>, len: usize) -> io::Result<DmaBuf> {
        let len = len.max(1).div_ceil(PAGE) * PAGE;
        // SAFETY: a fresh private anonymous mapping; no address hint, checked result.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = ptr.cast::<u8>();
        // SAFETY: [ptr, ptr + len) is the mapping just made, which this value owns and
        // only accesses through raw pointers until `drop` unmaps it from the IOMMU first.
        let mapped = unsafe { container.vfio_dma_map(ptr as u64, len, ptr) };
        if let Err(e) = mapped {
            // SAFETY: unmapping the mapping made above, which nothing else references.
            unsafe { libc::munmap(ptr.cast(), len) };
            return Err(io::Error::other(format!(
                "mapping {len} bytes for DMA: {e}"
            )));
        }
        Ok(DmaBuf {
            ptr,
            len,
            container: container.clone(),
        })
    }

    /// The buffer's address, which is also its IOVA.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Its IOVA, for the controller.
    pub fn iova(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // The controller must not reach this memory once it is reused: unmapped from the
        // IOMMU before it is returned to the kernel. Should that fail the memory is
        // leaked rather than freed under a device that may still write it.
        match self.container.vfio_dma_unmap(self.ptr as u64, self.len) {
            // SAFETY: the mapping this value owns, no longer reachable by the device.
            Ok(()) => unsafe {
                libc::munmap(self.ptr.cast(), self.len);
            },
            Err(e) => log::error!("NVMe: unmapping a DMA buffer failed ({e}); leaking it"),
        }
    }
}

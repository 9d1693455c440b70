//! The end of a request: writing its status byte (the only code that does) and saying
//! what goes on the used ring. Kept apart from parsing so that every way a request ends,
//! executed or rejected, goes through the same few lines.

use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::spans::{Span, Spans};

/// A used-ring element: which chain finished and how many bytes the device wrote into its
/// device-writable buffers (data plus the status byte). The worker publishes it as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// The descriptor chain's head index.
    pub head: u16,
    /// Bytes written to the chain's device-writable buffers.
    pub len: u32,
}

/// Whether guest memory of bitmap type `B` logs dirty pages. The daemon's map (`()`) does
/// not, so it skips keeping and walking the written spans; decided at compile time.
pub(super) fn logs_dirty_pages<B: Bitmap + 'static>() -> bool {
    std::any::TypeId::of::<B>() != std::any::TypeId::of::<()>()
}

/// A request's status byte: its guest address, and the host address it was found at when
/// the chain was parsed, so completing a request costs one store rather than another
/// walk of the memory map.
#[derive(Clone, Copy)]
pub(super) struct StatusByte {
    pub(super) addr: GuestAddress,
    pub(super) host: *mut u8,
}

/// Where a request's outcome goes: the status byte (if the chain has a usable one) and the
/// used element. Holds the guest memory map alive for the request's lifetime.
pub struct Completion<B: Bitmap + 'static = ()> {
    pub(super) head: u16,
    /// From a one-byte slice of `mem`; `mem` keeps it mapped.
    pub(super) status: Option<StatusByte>,
    pub(super) mem: Arc<GuestMemoryMmap<B>>,
    /// Device-writable data bytes the request may fill (reads and GET_ID; 0 otherwise):
    /// the used length can claim no more than these plus the status byte.
    pub(super) writable_data: u64,
    /// The device-writable data spans, in order, for dirty-page logging: the device writes
    /// them through raw iovecs, which the memory map's bitmap does not see. Kept only when
    /// the map logs dirty pages.
    pub(super) written_spans: Spans,
}

impl<B: Bitmap + 'static> Completion<B> {
    /// The descriptor chain's head index.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Guest address of the status byte, if the chain has a usable one.
    pub fn status_addr(&self) -> Option<GuestAddress> {
        self.status.map(|s| s.addr)
    }

    /// Writes `status` (the only place a status byte is written) and returns the used
    /// element: the head index and the bytes written to device-writable buffers, which is
    /// `written` data bytes (at most the writable data length) plus the status byte, or 0
    /// when there was no status byte to write.
    pub fn complete(self, status: u8, written: u64) -> Used {
        let head = self.head;
        let Some(byte) = self.status else {
            return Used { head, len: 0 };
        };
        let data = written.min(self.writable_data);
        let mut left = data;
        for &Span { addr, len } in &self.written_spans {
            let n = len.min(left);
            if n == 0 {
                break;
            }
            // `n <= len`, which became a host slice at parse time, so it fits a usize.
            for slice in self
                .mem
                .get_slices(GuestAddress(addr), n as usize)
                .flatten()
            {
                slice.bitmap().mark_dirty(0, slice.len());
            }
            left -= n;
        }
        // SAFETY: `byte.host` is the start of a one-byte `VolatileSlice` that `status_byte`
        // took from `self.mem`, which this completion owns, so the byte is still mapped and
        // writable. Volatile, because the guest shares it.
        unsafe { byte.host.write_volatile(status) };
        // Marked after the write: a page marked before could be copied (and its bit
        // cleared) by the frontend between the mark and the write.
        if logs_dirty_pages::<B>() {
            for slice in self.mem.get_slices(byte.addr, 1).flatten() {
                slice.bitmap().mark_dirty(0, slice.len());
            }
        }
        Used {
            head,
            len: u32::try_from(data + 1).unwrap_or(u32::MAX),
        }
    }
}

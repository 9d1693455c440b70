//! The end of a request: writing its status byte (the only code that does) and saying
//! what goes on the used ring. Kept apart from parsing so that every way a request ends,
//! executed or rejected, goes through the same few lines.

use vm_memory::bitmap::Bitmap;
use vm_memory::GuestAddress;

use super::spans::{Span, Spans};
use crate::memory::GuestMap;

/// A used-ring element: which chain finished and how many bytes the device wrote into its
/// device-writable buffers (data plus the status byte). The worker publishes it as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// The descriptor chain's head index.
    pub head: u16,
    /// Bytes written to the chain's device-writable buffers.
    pub len: u32,
}

/// Where the device records the guest memory it writes through raw iovecs and the status
/// byte, for live migration's dirty log: the frontend copies the pages marked there again.
/// (Writes through the memory map, like the used ring's, are the caller's to record.)
pub trait WriteLog: Send + Sync {
    /// Whether writes are recorded now; checked once per completed request.
    fn logging(&self) -> bool;
    /// Records that `len` bytes at guest address `gpa` were written.
    fn mark(&self, gpa: u64, len: u64);
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
    pub(super) mem: GuestMap<B>,
    /// Device-writable data bytes the request may fill (reads and GET_ID; 0 otherwise):
    /// the used length can claim no more than these plus the status byte.
    pub(super) writable_data: u64,
    /// The device-writable data spans, in order, for dirty-page logging: the device writes
    /// them through raw iovecs (see [`WriteLog`]).
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
    /// when there was no status byte to write. While `writes` is logging, records the data
    /// written and the status byte, after they are written (a page recorded before its
    /// write could be copied, and its mark cleared, in between).
    pub fn complete(self, status: u8, written: u64, writes: Option<&dyn WriteLog>) -> Used {
        let head = self.head;
        let Some(byte) = self.status else {
            return Used { head, len: 0 };
        };
        let data = written.min(self.writable_data);
        // SAFETY: `byte.host` is the start of a one-byte `VolatileSlice` that `status_byte`
        // took from `self.mem`, which this completion owns, so the byte is still mapped and
        // writable. Volatile, because the guest shares it.
        unsafe { byte.host.write_volatile(status) };
        if let Some(log) = writes.filter(|w| w.logging()) {
            let mut left = data;
            for &Span { addr, len } in &self.written_spans {
                let n = len.min(left);
                if n == 0 {
                    break;
                }
                log.mark(addr, n);
                left -= n;
            }
            log.mark(byte.addr.0, 1);
        }
        Used {
            head,
            len: u32::try_from(data + 1).unwrap_or(u32::MAX),
        }
    }
}

//! Parsing an untrusted descriptor chain into a validated virtio-blk request
//! (virtio 1.2, 5.2.6 "Device Operation").
//!
//! The chain is read as QEMU reads it (virtio 1.2, 2.6.4 "Message Framing": the device
//! must not assume a particular arrangement of descriptors): device-readable descriptors
//! form one byte stream (the 16-byte header, then write data or discard segments), the
//! device-writable ones another (read data, then the status byte, which is the final byte
//! of the last descriptor). So a header split over two descriptors, or read data sharing a
//! descriptor with the status byte, are legal. Everything is checked before any I/O:
//! descriptor ranges against the guest memory map, directions, lengths, sector arithmetic
//! (checked, never wrapping), segment fields. A failure is an [`Error`] value carrying what
//! was wrong.
//!
//! Lifecycle, one type per stage: [`Request::parse`] gives a [`Request`] (or a
//! [`Rejected`]); the executor ([`crate::blk`]) runs it and calls [`Request::complete`];
//! a rejection is finished by [`Rejected::complete`]. Both end in [`Completion::complete`],
//! the only code that writes a status byte, which returns the [`Used`] element for the
//! used ring. A chain with no usable status byte (no writable last descriptor, or a chain cut
//! short) gets used length 0 and nothing written.
//!
//! Data buffers are never copied: [`Request::buffers`] hands the backend host iovecs into
//! guest memory. Those pointers are valid only while the memory map is mapped, so the
//! request owns a [`GuestMap`](crate::memory::GuestMap) of the map it was parsed against; a
//! memory table update swaps in a new map for new requests while a parked request keeps
//! its old one alive.

use std::fmt;

use virtio_bindings::virtio_blk::*;
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestAddress;

use crate::backend::GuestBuffers;
use crate::config::ID_BYTES;

mod completion;
mod parse;
mod spans;

pub use completion::{Completion, Used, WriteLog};
pub use spans::IoVecs;

/// Status: success (virtio 1.2, 5.2.6).
pub const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Status: the request failed.
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status: the request type or a flag is not supported.
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Size of `struct virtio_blk_outhdr` (type u32, ioprio u32, sector u64).
pub const HEADER_LEN: usize = 16;
/// Size of `struct virtio_blk_discard_write_zeroes` (sector u64, num_sectors u32, flags u32).
pub const SEGMENT_LEN: usize = 16;

/// A request's type as the guest wrote it; unknown values are kept, not refused here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN`: read.
    In,
    /// `VIRTIO_BLK_T_OUT`: write.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: the serial number.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
    /// Anything else (SCSI, zoned, secure erase, garbage): answered with UNSUPP.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> RequestType {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

impl fmt::Display for RequestType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestType::In => f.write_str("read"),
            RequestType::Out => f.write_str("write"),
            RequestType::Flush => f.write_str("flush"),
            RequestType::GetId => f.write_str("get-id"),
            RequestType::Discard => f.write_str("discard"),
            RequestType::WriteZeroes => f.write_str("write-zeroes"),
            RequestType::Unsupported(t) => write!(f, "type {t}"),
        }
    }
}

/// Everything a guest can get wrong in a request, one variant per rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The chain yielded no descriptor: a head index beyond the queue, an unreadable
    /// descriptor table, or an empty indirect table.
    #[error("descriptor chain at head {head} is empty")]
    EmptyChain {
        /// The head index from the available ring.
        head: u16,
    },
    /// The chain stopped on a descriptor with NEXT set: a loop or a chain longer than the
    /// queue (virtio-queue stops after queue-size descriptors), a `next` beyond the queue,
    /// a nested or misaligned indirect table, or more than 4 GiB of buffers. Where it
    /// really ends is unknown, so there is no status byte to trust.
    #[error("descriptor chain cut short after {descriptors} descriptors")]
    ChainTruncated {
        /// Descriptors yielded before the stop.
        descriptors: usize,
    },
    /// A complete chain with more descriptors than the queue size (possible through an
    /// indirect table; virtio 1.2, 2.7.5.3.1 forbids it).
    #[error("descriptor chain of {descriptors} descriptors exceeds the queue size {max}")]
    ChainTooLong {
        /// Descriptors in the chain.
        descriptors: usize,
        /// The queue size.
        max: u16,
    },
    /// The last descriptor is device-readable, so there is no status byte to write.
    #[error("last descriptor {addr:#x}+{len} is not device-writable: no status byte")]
    StatusNotWritable {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The last descriptor is device-writable but empty.
    #[error("last descriptor at {addr:#x} is empty: no status byte")]
    StatusEmpty {
        /// Its guest address.
        addr: u64,
    },
    /// The status byte (the last descriptor's final byte) is outside guest memory.
    #[error("status descriptor {addr:#x}+{len} is outside guest memory")]
    StatusOutsideMemory {
        /// The descriptor's guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one (virtio 1.2, 2.7.4.2).
    #[error("descriptor {position} is device-readable after a device-writable one")]
    ReadableAfterWritable {
        /// Its position in the chain, from 0.
        position: usize,
    },
    /// Fewer than 16 device-readable bytes for the header.
    #[error("request header is {len} bytes, needs {HEADER_LEN}")]
    HeaderTooShort {
        /// Readable bytes found.
        len: u64,
    },
    /// A buffer is not (wholly) in guest memory, or its end wraps around 2^64.
    #[error("buffer {addr:#x}+{len} is outside guest memory")]
    GuestMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Data buffers in the wrong direction for the request type: a read with
    /// device-readable data, a write/discard/write-zeroes with device-writable data.
    #[error("{kind} request has data buffers in the wrong direction")]
    DataDirection {
        /// The request type.
        kind: RequestType,
    },
    /// A read, write, discard or write-zeroes without data.
    #[error("{kind} request has no data")]
    NoData {
        /// The request type.
        kind: RequestType,
    },
    /// Data length or offset not a multiple of the logical block size.
    #[error("{len} bytes at sector {sector} are not aligned to the {block_size}-byte block")]
    Misaligned {
        /// Sector.
        sector: u64,
        /// Data length.
        len: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// `sector * 512 + len` overflows u64.
    #[error("sector {sector} + {len} bytes overflows the byte offset")]
    SectorOverflow {
        /// The sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The request reaches past the end of the device.
    #[error("sector {sector} + {len} bytes is beyond the capacity of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
        /// Device capacity in sectors.
        capacity: u64,
    },
    /// A write, discard or write-zeroes on a read-only device.
    #[error("{kind} on a read-only device")]
    ReadOnly {
        /// The request type.
        kind: RequestType,
    },
    /// An unknown or unsupported request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Discard/write-zeroes payload is not a whole number of 16-byte segments.
    #[error("discard/write-zeroes payload of {len} bytes is not a multiple of {SEGMENT_LEN}")]
    SegmentLength {
        /// Payload length.
        len: u64,
    },
    /// More segments than `max_discard_seg` / `max_write_zeroes_seg`.
    #[error("{count} segments exceed the maximum of {max}")]
    TooManySegments {
        /// Segments sent.
        count: u64,
        /// Maximum advertised.
        max: u32,
    },
    /// A segment covers zero sectors.
    #[error("segment at sector {sector} covers zero sectors")]
    SegmentEmpty {
        /// Its sector.
        sector: u64,
    },
    /// A segment covers more than `max_discard_sectors` / `max_write_zeroes_sectors`.
    #[error("segment at sector {sector} of {sectors} sectors exceeds the maximum of {max}")]
    SegmentTooLarge {
        /// Its sector.
        sector: u64,
        /// Sectors requested.
        sectors: u32,
        /// Maximum advertised.
        max: u32,
    },
    /// Flag bits other than UNMAP (virtio 1.2, 5.2.6.2: the device MUST answer UNSUPP).
    #[error("segment at sector {sector} has reserved flags {flags:#x}")]
    SegmentReservedFlags {
        /// Its sector.
        sector: u64,
        /// The flags field.
        flags: u32,
    },
    /// UNMAP on a discard segment (virtio 1.2, 5.2.6.2: the device MUST answer UNSUPP).
    #[error("discard segment at sector {sector} has the unmap flag")]
    DiscardUnmap {
        /// Its sector.
        sector: u64,
    },
}

impl Error {
    /// The status the guest gets for this error (when the chain has a status byte).
    pub fn status(&self) -> u8 {
        match self {
            Error::Unsupported(_)
            | Error::SegmentReservedFlags { .. }
            | Error::DiscardUnmap { .. } => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

/// One discard / write-zeroes range, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// WRITE_ZEROES may deallocate.
    pub unmap: bool,
}

/// What a validated request does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read into the data buffers from this byte offset.
    Read {
        /// Byte offset.
        offset: u64,
    },
    /// Write the data buffers at this byte offset.
    Write {
        /// Byte offset.
        offset: u64,
    },
    /// Make completed writes durable.
    Flush,
    /// Copy this device ID (the serial, zero-padded to 20 bytes) into the data buffers.
    GetId([u8; ID_BYTES]),
    /// Discard these ranges.
    Discard(Vec<Segment>),
    /// Zero these ranges.
    WriteZeroes(Vec<Segment>),
}

impl Op {
    /// The request type this operation came from.
    pub fn request_type(&self) -> RequestType {
        match self {
            Op::Read { .. } => RequestType::In,
            Op::Write { .. } => RequestType::Out,
            Op::Flush => RequestType::Flush,
            Op::GetId(_) => RequestType::GetId,
            Op::Discard(_) => RequestType::Discard,
            Op::WriteZeroes(_) => RequestType::WriteZeroes,
        }
    }
}

/// A validated request, ready to execute.
pub struct Request<B: Bitmap + 'static = ()> {
    sector: u64,
    op: Op,
    /// Host iovecs into guest memory, built from ranges checked against `completion.mem`.
    data: IoVecs,
    data_len: u64,
    completion: Completion<B>,
}

/// A request that failed validation, with where to report it.
pub struct Rejected<B: Bitmap + 'static = ()> {
    error: Error,
    /// The type from the header, if validation got as far as reading it.
    kind: Option<RequestType>,
    completion: Completion<B>,
}

impl<B: Bitmap + 'static> Rejected<B> {
    /// What was wrong.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The request's type, if its header could be read before the rule it broke.
    pub fn kind(&self) -> Option<RequestType> {
        self.kind
    }

    /// The descriptor chain's head index.
    pub fn head(&self) -> u16 {
        self.completion.head
    }

    /// Where the status would go (`None`: the request ends with used length 0).
    pub fn status_addr(&self) -> Option<GuestAddress> {
        self.completion.status_addr()
    }

    /// Writes the error's status (IOERR or UNSUPP) if there is a status byte (recorded in
    /// `writes` while it logs) and returns the used element.
    pub fn complete(self, writes: Option<&dyn WriteLog>) -> Used {
        let status = self.error.status();
        self.completion.complete(status, 0, writes)
    }
}

impl<B: Bitmap + 'static> Request<B> {
    /// What the request does.
    pub fn op(&self) -> &Op {
        &self.op
    }

    /// The request type.
    pub fn request_type(&self) -> RequestType {
        self.op.request_type()
    }

    /// The sector from the header (meaningful for reads and writes).
    pub fn sector(&self) -> u64 {
        self.sector
    }

    /// The descriptor chain's head index.
    pub fn head(&self) -> u16 {
        self.completion.head
    }

    /// Guest address of the status byte.
    pub fn status_addr(&self) -> Option<GuestAddress> {
        self.completion.status_addr()
    }

    /// The data buffers as host iovecs (one per memory region a buffer touches). The
    /// pointers are valid while `self` lives; use them through [`buffers`](Self::buffers).
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.data
    }

    /// Total data bytes (read, write or GET_ID buffers; 0 for the others).
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// The data buffers, for a backend.
    pub fn buffers(&self) -> GuestBuffers<'_> {
        // SAFETY: `parse` built every iovec from a `VolatileSlice` of `completion.mem`,
        // i.e. a range it checked lies inside one mapped, writable region of that map.
        // `completion` holds a `GuestMap` of the map, so the mappings stay for as long as
        // `self` is borrowed; the fields are private, so nothing else can add iovecs. Guest
        // memory is never on a coroutine stack.
        unsafe { GuestBuffers::new(&self.data) }
    }

    /// Finishes the request with `status`, `written` bytes having been written to its data
    /// buffers (both recorded in `writes` while it logs); returns the used element.
    pub fn complete(self, status: u8, written: u64, writes: Option<&dyn WriteLog>) -> Used {
        self.completion.complete(status, written, writes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_types_convert_in_one_place() {
        assert_eq!(RequestType::from(0), RequestType::In);
        assert_eq!(RequestType::from(1), RequestType::Out);
        assert_eq!(RequestType::from(4), RequestType::Flush);
        assert_eq!(RequestType::from(8), RequestType::GetId);
        assert_eq!(RequestType::from(11), RequestType::Discard);
        assert_eq!(RequestType::from(13), RequestType::WriteZeroes);
        assert_eq!(RequestType::from(2), RequestType::Unsupported(2), "SCSI");
        assert_eq!(
            RequestType::from(u32::MAX),
            RequestType::Unsupported(u32::MAX)
        );
    }

    #[test]
    fn unsupp_statuses() {
        assert_eq!(Error::Unsupported(3).status(), S_UNSUPP);
        assert_eq!(Error::DiscardUnmap { sector: 0 }.status(), S_UNSUPP);
        assert_eq!(
            Error::SegmentReservedFlags {
                sector: 0,
                flags: 2
            }
            .status(),
            S_UNSUPP
        );
        assert_eq!(Error::HeaderTooShort { len: 3 }.status(), S_IOERR);
    }
}

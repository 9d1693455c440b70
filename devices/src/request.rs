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
//! the only code that writes a status byte, which returns `(head, used_len)` for the used
//! ring. A chain with no usable status byte (no writable last descriptor, or a chain cut
//! short) gets used length 0 and nothing written.
//!
//! Data buffers are never copied: [`Request::buffers`] hands the backend host iovecs into
//! guest memory. Those pointers are valid only while the memory map is mapped, so the
//! request owns an `Arc` of the map it was parsed against; a memory table update swaps in
//! a new map for new requests while a parked request keeps its old one alive.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use smallvec::SmallVec;
use virtio_bindings::virtio_blk::*;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::backend::GuestBuffers;
use crate::config::{DeviceConfig, ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use crate::SECTOR_SIZE;

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

/// A contiguous run of guest bytes: (guest address, length).
type Span = (u64, u64);
/// Spans of one direction; inline for the common few-descriptor request (header, data,
/// status), so that neither allocates nor makes a `Request` costly to move.
type Spans = SmallVec<[Span; 4]>;
/// Host iovecs of a request's data; inline up to 4 segments.
pub type IoVecs = SmallVec<[libc::iovec; 4]>;

/// Whether guest memory of bitmap type `B` logs dirty pages. The daemon's map (`()`) does
/// not, so it skips keeping and walking the written spans; decided at compile time.
fn logs_dirty_pages<B: Bitmap + 'static>() -> bool {
    std::any::TypeId::of::<B>() != std::any::TypeId::of::<()>()
}

/// A request's status byte: its guest address, and the host address it was found at when
/// the chain was parsed, so completing a request costs one store rather than another
/// walk of the memory map.
#[derive(Clone, Copy)]
struct StatusByte {
    addr: GuestAddress,
    host: *mut u8,
}

/// Where a request's outcome goes: the status byte (if the chain has a usable one) and the
/// used element. Holds the guest memory map alive for the request's lifetime.
pub struct Completion<B: Bitmap + 'static = ()> {
    head: u16,
    /// From a one-byte slice of `mem`; `mem` keeps it mapped.
    status: Option<StatusByte>,
    mem: Arc<GuestMemoryMmap<B>>,
    /// Device-writable data bytes the request may fill (reads and GET_ID; 0 otherwise):
    /// the used length can claim no more than these plus the status byte.
    writable_data: u64,
    /// The device-writable data spans, in order, for dirty-page logging: the device writes
    /// them through raw iovecs, which the memory map's bitmap does not see. Kept only when
    /// the map logs dirty pages.
    written_spans: Spans,
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
    /// element: head index and bytes written to device-writable buffers, which is
    /// `written` data bytes (at most the writable data length) plus the status byte, or 0
    /// when there was no status byte to write.
    pub fn complete(self, status: u8, written: u64) -> (u16, u32) {
        let Some(byte) = self.status else {
            return (self.head, 0);
        };
        let data = written.min(self.writable_data);
        let mut left = data;
        for &(a, len) in &self.written_spans {
            let n = len.min(left);
            if n == 0 {
                break;
            }
            // `n <= len`, which became a host slice at parse time, so it fits a usize.
            for slice in self.mem.get_slices(GuestAddress(a), n as usize).flatten() {
                slice.bitmap().mark_dirty(0, slice.len());
            }
            left -= n;
        }
        if logs_dirty_pages::<B>() {
            for slice in self.mem.get_slices(byte.addr, 1).flatten() {
                slice.bitmap().mark_dirty(0, slice.len());
            }
        }
        // SAFETY: `byte.host` is the start of a one-byte `VolatileSlice` that `status_byte`
        // took from `self.mem`, which this completion owns, so the byte is still mapped and
        // writable. Volatile, because the guest shares it.
        unsafe { byte.host.write_volatile(status) };
        (self.head, u32::try_from(data + 1).unwrap_or(u32::MAX))
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
    completion: Completion<B>,
}

impl<B: Bitmap + 'static> Rejected<B> {
    /// What was wrong.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The descriptor chain's head index.
    pub fn head(&self) -> u16 {
        self.completion.head
    }

    /// Where the status would go (`None`: the request ends with used length 0).
    pub fn status_addr(&self) -> Option<GuestAddress> {
        self.completion.status_addr()
    }

    /// Writes the error's status (IOERR or UNSUPP) if there is a status byte and returns
    /// the used element.
    pub fn complete(self) -> (u16, u32) {
        let status = self.error.status();
        self.completion.complete(status, 0)
    }
}

/// The chain's shape, collected in one walk.
#[derive(Default)]
struct Shape {
    readable: Spans,
    writable: Spans,
    descriptors: usize,
    /// Position of the first readable descriptor after a writable one.
    misordered: Option<usize>,
    /// The last descriptor: address, length, device-writable, NEXT set.
    last: Option<(u64, u32, bool, bool)>,
}

impl<B: Bitmap + 'static> Request<B> {
    /// Parses and validates `chain` for a device described by `config`. Buffer addresses
    /// are checked against, and iovecs built from, `mem`, which should be the map the
    /// chain was read from (if it is not, requests fail validation; nothing unsafe
    /// happens). Reads only the header and segment payloads; data stays in place.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: Arc<GuestMemoryMmap<B>>,
        config: &DeviceConfig,
    ) -> Result<Request<B>, Box<Rejected<B>>>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let head = chain.head_index();
        let mut shape = Shape::default();
        for desc in chain {
            let span = (desc.addr().0, u64::from(desc.len()));
            if desc.is_write_only() {
                shape.writable.push(span);
            } else {
                if !shape.writable.is_empty() && shape.misordered.is_none() {
                    shape.misordered = Some(shape.descriptors);
                }
                shape.readable.push(span);
            }
            shape.descriptors += 1;
            shape.last = Some((span.0, desc.len(), desc.is_write_only(), desc.has_next()));
        }
        let status = status_byte(&shape, head, &mem);
        let mut completion = Completion {
            head,
            status: status.as_ref().ok().copied(),
            mem,
            writable_data: 0,
            written_spans: Spans::new(),
        };
        let reject = |error, completion| Box::new(Rejected { error, completion });
        if let Err(e) = status {
            return Err(reject(e, completion));
        }
        // The status byte is not data.
        if let Some(last) = shape.writable.last_mut() {
            last.1 -= 1;
        }
        match validate(&completion.mem, &shape, config) {
            Ok(v) => {
                if matches!(v.op, Op::Read { .. } | Op::GetId(_)) {
                    completion.writable_data = total(shape.writable.iter().copied());
                    if logs_dirty_pages::<B>() {
                        completion.written_spans = shape.writable;
                    }
                }
                Ok(Request {
                    sector: v.sector,
                    op: v.op,
                    data: v.data,
                    data_len: v.data_len,
                    completion,
                })
            }
            Err(e) => Err(reject(e, completion)),
        }
    }

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
        // `completion` holds an `Arc` of the map, so the mappings stay for as long as
        // `self` is borrowed; the fields are private, so nothing else can add iovecs.
        unsafe { GuestBuffers::new(&self.data) }
    }

    /// Finishes the request with `status`, `written` bytes having been written to its data
    /// buffers; returns the used element `(head, used_len)`.
    pub fn complete(self, status: u8, written: u64) -> (u16, u32) {
        self.completion.complete(status, written)
    }
}

/// Finds the status byte: the final byte of the last descriptor, which must be complete
/// (no NEXT), device-writable, non-empty and in guest memory.
fn status_byte<B: Bitmap + 'static>(
    shape: &Shape,
    head: u16,
    mem: &GuestMemoryMmap<B>,
) -> Result<StatusByte, Error> {
    let (addr, len, writable, next) = shape.last.ok_or(Error::EmptyChain { head })?;
    if next {
        return Err(Error::ChainTruncated {
            descriptors: shape.descriptors,
        });
    }
    if !writable {
        return Err(Error::StatusNotWritable { addr, len });
    }
    if len == 0 {
        return Err(Error::StatusEmpty { addr });
    }
    let outside = Error::StatusOutsideMemory { addr, len };
    let at = GuestAddress(
        addr.checked_add(u64::from(len) - 1)
            .ok_or(outside.clone())?,
    );
    let slice = mem.get_slice(at, 1).map_err(|_| outside)?;
    Ok(StatusByte {
        addr: at,
        host: slice.ptr_guard_mut().as_ptr(),
    })
}

/// What validation produces.
struct Valid {
    sector: u64,
    op: Op,
    data: IoVecs,
    data_len: u64,
}

/// Validates everything after the status byte: order, length, header, type, data,
/// ranges, segments. `shape.writable` no longer includes the status byte.
fn validate<B: Bitmap + 'static>(
    mem: &GuestMemoryMmap<B>,
    shape: &Shape,
    config: &DeviceConfig,
) -> Result<Valid, Error> {
    if let Some(position) = shape.misordered {
        return Err(Error::ReadableAfterWritable { position });
    }
    let max = config.queue_size();
    if shape.descriptors > usize::from(max) {
        return Err(Error::ChainTooLong {
            descriptors: shape.descriptors,
            max,
        });
    }
    let header = take_bytes::<HEADER_LEN, B>(mem, &shape.readable)?;
    let rest = skip_bytes(&shape.readable, HEADER_LEN as u64);
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = header;
    let kind = RequestType::from(u32::from_le_bytes([t0, t1, t2, t3]));
    let sector = u64::from_le_bytes(s);
    // Writable bytes other than the status descriptor's: a longer status descriptor is
    // fine for every type (its leading bytes are ignored, as QEMU does), but a separate
    // writable buffer is data in the wrong direction for a write.
    let writable = &shape.writable;
    let writable_data = total(writable[..writable.len().saturating_sub(1)].iter().copied());
    let readable_data = total(rest.clone());
    let valid = |op, (data, data_len)| Valid {
        sector,
        op,
        data,
        data_len,
    };
    match kind {
        RequestType::In => {
            if readable_data != 0 {
                return Err(Error::DataDirection { kind });
            }
            let (iov, len) = iovecs(mem, writable.iter().copied())?;
            if len == 0 {
                return Err(Error::NoData { kind });
            }
            let offset = byte_range(sector, len, config)?;
            Ok(valid(Op::Read { offset }, (iov, len)))
        }
        RequestType::Out => {
            if config.readonly() {
                return Err(Error::ReadOnly { kind });
            }
            if writable_data != 0 {
                return Err(Error::DataDirection { kind });
            }
            let (iov, len) = iovecs(mem, rest)?;
            if len == 0 {
                return Err(Error::NoData { kind });
            }
            let offset = byte_range(sector, len, config)?;
            Ok(valid(Op::Write { offset }, (iov, len)))
        }
        // Data and sector are ignored, as QEMU does; the spec asks drivers for neither.
        RequestType::Flush => Ok(valid(Op::Flush, (IoVecs::new(), 0))),
        RequestType::GetId => {
            if readable_data != 0 {
                return Err(Error::DataDirection { kind });
            }
            // Any length, even 0: the device writes what fits of the 20 bytes.
            let data = iovecs(mem, writable.iter().copied())?;
            Ok(valid(Op::GetId(config.id_bytes()), data))
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            if config.readonly() {
                return Err(Error::ReadOnly { kind });
            }
            if writable_data != 0 {
                return Err(Error::DataDirection { kind });
            }
            let discard = kind == RequestType::Discard;
            let segs = segments(mem, rest, kind, config)?;
            let op = if discard {
                Op::Discard(segs)
            } else {
                Op::WriteZeroes(segs)
            };
            Ok(valid(op, (IoVecs::new(), 0)))
        }
        RequestType::Unsupported(t) => Err(Error::Unsupported(t)),
    }
}

fn total(spans: impl Iterator<Item = Span>) -> u64 {
    // At most 2^16 descriptors of at most 2^32 bytes each: no overflow.
    spans.map(|s| s.1).sum()
}

/// Reads the first `N` bytes of a span list (possibly split over several spans).
fn take_bytes<const N: usize, B: Bitmap + 'static>(
    mem: &GuestMemoryMmap<B>,
    spans: &[Span],
) -> Result<[u8; N], Error> {
    let mut out = [0u8; N];
    // Fast path: all of it in the first span (one lookup of the memory map).
    if let Some(&(addr, len)) = spans.first() {
        if len >= N as u64 {
            if let Ok(slice) = mem.get_slice(GuestAddress(addr), N) {
                slice.copy_to(&mut out[..]);
                return Ok(out);
            }
        }
    }
    let got = read_spans(mem, spans.iter().copied(), &mut out)?;
    if got < N {
        return Err(Error::HeaderTooShort { len: got as u64 });
    }
    Ok(out)
}

/// Copies the bytes of `spans`, in order, into `out` until it is full; returns how many
/// it copied (fewer than `out.len()` when the spans hold fewer).
fn read_spans<B: Bitmap + 'static>(
    mem: &GuestMemoryMmap<B>,
    spans: impl Iterator<Item = Span>,
    out: &mut [u8],
) -> Result<usize, Error> {
    let mut got = 0usize;
    for (addr, len) in spans {
        if got == out.len() {
            break;
        }
        let n = (out.len() - got).min(usize::try_from(len).unwrap_or(usize::MAX));
        mem.read_slice(&mut out[got..got + n], GuestAddress(addr))
            .map_err(|_| Error::GuestMemory {
                addr,
                len: n as u64,
            })?;
        got += n;
    }
    Ok(got)
}

/// The non-empty spans that follow the first `skip` bytes of `spans`, without copying
/// them (a parse runs once per request; the header is the only prefix ever skipped).
fn skip_bytes(spans: &[Span], skip: u64) -> impl Iterator<Item = Span> + Clone + '_ {
    spans
        .iter()
        .scan(skip, |skip, &(addr, len)| {
            let n = (*skip).min(len);
            *skip -= n;
            // `addr + n` lies within a span the header was read from, so it does not wrap.
            Some((addr + n, len - n))
        })
        .filter(|s| s.1 > 0)
}

/// Host iovecs for data spans and their total length; empty spans are skipped (they carry
/// no bytes), every other one must lie in guest memory.
fn iovecs<B: Bitmap + 'static>(
    mem: &GuestMemoryMmap<B>,
    spans: impl Iterator<Item = Span>,
) -> Result<(IoVecs, u64), Error> {
    let mut iov = IoVecs::new();
    let mut len = 0u64;
    for (addr, l) in spans.filter(|s| s.1 > 0) {
        let bad = || Error::GuestMemory { addr, len: l };
        let count = usize::try_from(l).map_err(|_| bad())?;
        addr.checked_add(l).ok_or_else(bad)?;
        // Fast path: the span lies in one region (one lookup, one iovec).
        if let Ok(slice) = mem.get_slice(GuestAddress(addr), count) {
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        } else {
            if !mem.check_range(GuestAddress(addr), count) {
                return Err(bad());
            }
            // A span crossing a region boundary becomes one iovec per region.
            for slice in mem.get_slices(GuestAddress(addr), count) {
                let slice = slice.map_err(|_| bad())?;
                iov.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        len += l;
    }
    Ok((iov, len))
}

/// Checks `len` bytes at `sector` against overflow, alignment and capacity; returns the
/// byte offset.
fn byte_range(sector: u64, len: u64, config: &DeviceConfig) -> Result<u64, Error> {
    let overflow = Error::SectorOverflow { sector, len };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(overflow.clone())?;
    let end = offset.checked_add(len).ok_or(overflow)?;
    let bs = u64::from(config.block_size());
    if len % bs != 0 || offset % bs != 0 {
        return Err(Error::Misaligned {
            sector,
            len,
            block_size: config.block_size(),
        });
    }
    let capacity = config.capacity_sectors();
    if end > capacity.saturating_mul(SECTOR_SIZE) {
        return Err(Error::OutOfRange {
            sector,
            len,
            capacity,
        });
    }
    Ok(offset)
}

/// Parses and checks discard / write-zeroes segments (virtio 1.2, 5.2.6.2).
fn segments<B: Bitmap + 'static>(
    mem: &GuestMemoryMmap<B>,
    spans: impl Iterator<Item = Span> + Clone,
    kind: RequestType,
    config: &DeviceConfig,
) -> Result<Vec<Segment>, Error> {
    let len = total(spans.clone());
    if len == 0 {
        return Err(Error::NoData { kind });
    }
    if len % SEGMENT_LEN as u64 != 0 {
        return Err(Error::SegmentLength { len });
    }
    let count = len / SEGMENT_LEN as u64;
    if count > u64::from(MAX_DISCARD_SEG) {
        return Err(Error::TooManySegments {
            count,
            max: MAX_DISCARD_SEG,
        });
    }
    // Bounded by the check above, so the whole payload fits on the stack.
    let mut segs = [[0u8; SEGMENT_LEN]; MAX_DISCARD_SEG as usize];
    // `len <= bytes.len()`, checked above, so this copies all of the segments.
    read_spans(mem, spans, &mut segs.as_flattened_mut()[..len as usize])?;
    segs[..count as usize]
        .iter()
        .map(|&[s @ .., n0, n1, n2, n3, f0, f1, f2, f3]| {
            let sector = u64::from_le_bytes(s);
            let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
            let flags = u32::from_le_bytes([f0, f1, f2, f3]);
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
                return Err(Error::SegmentReservedFlags { sector, flags });
            }
            if unmap && kind == RequestType::Discard {
                return Err(Error::DiscardUnmap { sector });
            }
            if sectors == 0 {
                return Err(Error::SegmentEmpty { sector });
            }
            if sectors > MAX_DISCARD_SECTORS {
                return Err(Error::SegmentTooLarge {
                    sector,
                    sectors,
                    max: MAX_DISCARD_SECTORS,
                });
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let offset = byte_range(sector, len, config)?;
            Ok(Segment { offset, len, unmap })
        })
        .collect()
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

//! Parsing an untrusted descriptor chain into a validated virtio-blk request
//! (virtio 1.2, 5.2.6 "Device Operation").
//!
//! The chain is read as QEMU does: device-readable descriptors form the "out" byte stream
//! (16-byte header, then write data or discard segments), device-writable ones the "in"
//! stream (read data, then the status byte, which is the stream's last byte). Everything
//! is checked before any I/O: descriptor ranges against the guest memory map, directions,
//! lengths, sector arithmetic (checked), segment fields. A failure becomes an [`Error`]
//! value carrying what was wrong; its status (IOERR or UNSUPP) is written by
//! [`Completion::complete`], the one place that writes a status byte.
//!
//! Lifecycle: [`Request::parse`] → [`Request`] (or [`Rejected`]) → executed by
//! [`crate::execute`] → [`Completion::complete`] → `(head, used_len)` for the used ring.

use std::ops::Deref;
use std::sync::Arc;

use smallvec::SmallVec;
use virtio_bindings::virtio_blk::*;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::config::{DeviceConfig, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use crate::SECTOR_SIZE;

/// Status values (virtio 1.2, 5.2.6).
pub const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// The request failed.
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// The request type or a flag is not supported.
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector).
const HEADER_LEN: usize = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const SEGMENT_LEN: u64 = 16;

/// Everything a guest can get wrong in a request, one variant per rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The chain has no descriptors (bad head index or unreadable indirect table).
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain ended on a descriptor with NEXT set: a loop, a `next` beyond the queue,
    /// a chain longer than the queue, or a bad indirect table.
    #[error("descriptor chain is truncated (loop, bad next index or bad indirect table)")]
    ChainTruncated,
    /// The last descriptor is device-readable, so there is no status byte to write.
    #[error("last descriptor is not device-writable: no status byte")]
    NoStatus,
    /// The status byte lies outside guest memory.
    #[error("status byte at {addr:#x} is outside guest memory")]
    StatusOutsideMemory {
        /// Its guest address.
        addr: u64,
    },
    /// A device-readable descriptor follows a device-writable one (virtio 2.7.4.2).
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// Fewer than 16 device-readable bytes for the header.
    #[error("request header is {len} bytes, needs 16")]
    HeaderTooShort {
        /// Readable bytes found.
        len: u64,
    },
    /// A descriptor's range is not in guest memory or wraps around.
    #[error("buffer {addr:#x}+{len} is outside guest memory")]
    GuestMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Data buffers in the wrong direction for the request type.
    #[error("{kind} request has data buffers in the wrong direction")]
    DataDirection {
        /// The request type.
        kind: &'static str,
    },
    /// IN/OUT without data, or an empty descriptor among the data.
    #[error("zero-length data buffer")]
    ZeroLength,
    /// Data length or offset not a multiple of the logical block size.
    #[error("{len} bytes at sector {sector} are not aligned to the {block_size}-byte block size")]
    Misaligned {
        /// Sector.
        sector: u64,
        /// Data length.
        len: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// `sector * 512 + len` overflows u64.
    #[error("sector {sector} overflows the byte offset")]
    SectorOverflow {
        /// The sector from the header.
        sector: u64,
    },
    /// The request reaches past the end of the device.
    #[error("sectors {sector}..+{len} bytes are beyond the capacity of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
        /// Device capacity in sectors.
        capacity: u64,
    },
    /// A write, discard or write-zeroes on a read-only device.
    #[error("write to a read-only device")]
    ReadOnly,
    /// An unknown or unsupported request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Discard/write-zeroes payload is not a whole number of 16-byte segments.
    #[error("discard/write-zeroes payload of {len} bytes is not a multiple of 16")]
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
    /// A segment covers more than `max_discard_sectors` sectors.
    #[error("segment of {sectors} sectors exceeds the maximum of {max}")]
    SegmentTooLarge {
        /// Sectors requested.
        sectors: u32,
        /// Maximum advertised.
        max: u32,
    },
    /// Reserved flag bits, or UNMAP on a discard (virtio 5.2.6.2: status UNSUPP).
    #[error("unsupported segment flags {flags:#x}")]
    SegmentFlags {
        /// The flags field.
        flags: u32,
    },
}

impl Error {
    /// The status the guest gets for this error.
    pub fn status(&self) -> u8 {
        match self {
            Error::Unsupported(_) | Error::SegmentFlags { .. } => S_UNSUPP,
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
    /// Read `data` bytes at this byte offset.
    Read { offset: u64 },
    /// Write `data` at this byte offset.
    Write { offset: u64 },
    /// Make completed writes durable.
    Flush,
    /// Return the serial number into `data`.
    GetId,
    /// Discard these ranges.
    Discard(Vec<Segment>),
    /// Zero these ranges.
    WriteZeroes(Vec<Segment>),
}

/// Where a request's outcome goes: the status byte (if the chain has a usable one) and
/// the used element. Holds the guest memory map alive for the request's lifetime.
pub struct Completion {
    head: u16,
    status: Option<GuestAddress>,
    mem: Arc<GuestMemoryMmap>,
}

impl Completion {
    /// Writes `status` (the only place a status byte is written) and returns the used
    /// element: head index and bytes written to device-writable buffers (`written` data
    /// bytes plus the status byte; 0 when there was no status byte to write).
    pub fn complete(self, status: u8, written: u64) -> (u16, u32) {
        match self.status {
            Some(addr) => match self.mem.write_obj(status, addr) {
                Ok(()) => (self.head, u32::try_from(written + 1).unwrap_or(u32::MAX)),
                Err(_) => (self.head, 0),
            },
            None => (self.head, 0),
        }
    }

    /// The descriptor chain's head index.
    pub fn head(&self) -> u16 {
        self.head
    }
}

/// A validated request, ready to execute.
pub struct Request {
    /// What to do.
    pub op: Op,
    /// Data buffers as host iovecs into guest memory (IN/OUT/GET_ID); valid while
    /// `completion` (which holds the memory map) lives.
    pub data: IoVecs,
    /// Where the outcome goes.
    pub completion: Completion,
}

/// A request that failed validation, with where to report it.
pub struct Rejected {
    /// What was wrong.
    pub error: Error,
    /// Where the IOERR/UNSUPP goes.
    pub completion: Completion,
}

/// A contiguous run of guest bytes: (guest address, length).
type Span = (u64, u64);
/// Spans of one direction; inline for the common few-descriptor request (no allocation).
type Spans = SmallVec<[Span; 8]>;
/// Host iovecs of a request's data; inline up to 8 segments.
pub type IoVecs = SmallVec<[libc::iovec; 8]>;

impl Request {
    /// Parses and validates `chain` (whose memory is `mem`) for a device described by
    /// `config`. Reads only the header and segment payloads; data stays in place.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: Arc<GuestMemoryMmap>,
        config: &DeviceConfig,
    ) -> Result<Request, Box<Rejected>>
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        let head = chain.head_index();
        let (mut readable, mut writable) = (Spans::new(), Spans::new());
        let (mut count, mut last_next, mut last_writable, mut misordered) =
            (0, false, false, false);
        for desc in chain {
            count += 1;
            last_next = desc.has_next();
            last_writable = desc.is_write_only();
            let span = (desc.addr().0, u64::from(desc.len()));
            if last_writable {
                writable.push(span);
            } else {
                misordered |= !writable.is_empty();
                readable.push(span);
            }
        }
        // The status byte: the last byte of the last descriptor, which must be writable.
        let status = match (count, last_next, last_writable, writable.last_mut()) {
            (0, ..) => Err(Error::EmptyChain),
            (_, true, ..) => Err(Error::ChainTruncated),
            (_, _, false, _) | (_, _, _, None) => Err(Error::NoStatus),
            (_, _, true, Some(last)) if last.1 == 0 => Err(Error::NoStatus),
            (_, _, true, Some(last)) => {
                let addr = last.0.checked_add(last.1 - 1);
                last.1 -= 1;
                match addr {
                    Some(a) if mem.check_range(GuestAddress(a), 1) => Ok(GuestAddress(a)),
                    _ => Err(Error::StatusOutsideMemory { addr: last.0 }),
                }
            }
        };
        let (status, status_err) = match status {
            Ok(a) => (Some(a), None),
            Err(e) => (None, Some(e)),
        };
        writable.retain(|s| s.1 > 0);
        let completion = Completion { head, status, mem };
        let reject = |error, completion| Box::new(Rejected { error, completion });
        if let Some(e) = status_err {
            return Err(reject(e, completion));
        }
        if misordered {
            return Err(reject(Error::ReadableAfterWritable, completion));
        }
        match validate(&completion.mem, readable, writable, config) {
            Ok((op, data)) => Ok(Request {
                op,
                data,
                completion,
            }),
            Err(e) => Err(reject(e, completion)),
        }
    }
}

/// Validates everything after the chain's shape: header, type, data, ranges, segments.
fn validate(
    mem: &GuestMemoryMmap,
    readable: Spans,
    writable: Spans,
    config: &DeviceConfig,
) -> Result<(Op, IoVecs), Error> {
    let (header, rest) = take_bytes::<HEADER_LEN>(mem, &readable)?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    match kind {
        VIRTIO_BLK_T_IN => {
            if total(&rest) != 0 {
                return Err(Error::DataDirection { kind: "read" });
            }
            let (iov, len) = iovecs(mem, &writable)?;
            let offset = byte_range(sector, len, config)?;
            Ok((Op::Read { offset }, iov))
        }
        VIRTIO_BLK_T_OUT => {
            if !writable.is_empty() {
                return Err(Error::DataDirection { kind: "write" });
            }
            if config.readonly() {
                return Err(Error::ReadOnly);
            }
            let (iov, len) = iovecs(mem, &rest)?;
            let offset = byte_range(sector, len, config)?;
            Ok((Op::Write { offset }, iov))
        }
        VIRTIO_BLK_T_FLUSH => Ok((Op::Flush, IoVecs::new())),
        VIRTIO_BLK_T_GET_ID => {
            if total(&rest) != 0 {
                return Err(Error::DataDirection { kind: "get-id" });
            }
            let (iov, _) = iovecs_allow_empty(mem, &writable)?;
            Ok((Op::GetId, iov))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            if config.readonly() {
                return Err(Error::ReadOnly);
            }
            if !writable.is_empty() {
                return Err(Error::DataDirection {
                    kind: if discard { "discard" } else { "write-zeroes" },
                });
            }
            let segs = segments(mem, &rest, discard, config)?;
            Ok((
                if discard {
                    Op::Discard(segs)
                } else {
                    Op::WriteZeroes(segs)
                },
                IoVecs::new(),
            ))
        }
        other => Err(Error::Unsupported(other)),
    }
}

fn total(spans: &[Span]) -> u64 {
    spans.iter().map(|s| s.1).sum()
}

/// Reads the first `N` bytes of a span list (possibly split over several spans) and
/// returns them with the remaining spans.
fn take_bytes<const N: usize>(
    mem: &GuestMemoryMmap,
    spans: &[Span],
) -> Result<([u8; N], Spans), Error> {
    let mut out = [0u8; N];
    let mut got = 0usize;
    let mut rest = Spans::new();
    for &(addr, len) in spans {
        if got < N {
            let n = (N - got).min(usize::try_from(len).unwrap_or(usize::MAX));
            mem.read_slice(&mut out[got..got + n], GuestAddress(addr))
                .map_err(|_| Error::GuestMemory {
                    addr,
                    len: n as u64,
                })?;
            got += n;
            if (n as u64) < len {
                rest.push((addr.wrapping_add(n as u64), len - n as u64));
            }
        } else {
            rest.push((addr, len));
        }
    }
    if got < N {
        return Err(Error::HeaderTooShort { len: got as u64 });
    }
    Ok((out, rest))
}

/// Host iovecs for data spans; rejects empty data and any empty span.
fn iovecs(mem: &GuestMemoryMmap, spans: &[Span]) -> Result<(IoVecs, u64), Error> {
    if spans.is_empty() || spans.iter().any(|s| s.1 == 0) {
        return Err(Error::ZeroLength);
    }
    iovecs_allow_empty(mem, spans)
}

fn iovecs_allow_empty(mem: &GuestMemoryMmap, spans: &[Span]) -> Result<(IoVecs, u64), Error> {
    let mut iov = IoVecs::with_capacity(spans.len());
    let mut len = 0u64;
    for &(addr, l) in spans {
        let bad = Error::GuestMemory { addr, len: l };
        let count = usize::try_from(l).map_err(|_| bad.clone())?;
        addr.checked_add(l).ok_or_else(|| bad.clone())?;
        // Fast path: the span lies in one region (one lookup, one iovec).
        if let Ok(slice) = mem.get_slice(GuestAddress(addr), count) {
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        } else {
            if !mem.check_range(GuestAddress(addr), count) {
                return Err(bad);
            }
            // A span crossing a region boundary becomes one iovec per region.
            for slice in mem.get_slices(GuestAddress(addr), count) {
                let slice = slice.map_err(|_| bad.clone())?;
                iov.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        len = len.checked_add(l).ok_or_else(|| bad.clone())?;
    }
    Ok((iov, len))
}

/// Checks `len` bytes at `sector` against alignment and capacity; returns the byte offset.
fn byte_range(sector: u64, len: u64, config: &DeviceConfig) -> Result<u64, Error> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(Error::SectorOverflow { sector })?;
    let end = offset
        .checked_add(len)
        .ok_or(Error::SectorOverflow { sector })?;
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
fn segments(
    mem: &GuestMemoryMmap,
    spans: &[Span],
    discard: bool,
    config: &DeviceConfig,
) -> Result<Vec<Segment>, Error> {
    let len = total(spans);
    if len == 0 {
        return Err(Error::ZeroLength);
    }
    if len % SEGMENT_LEN != 0 {
        return Err(Error::SegmentLength { len });
    }
    let count = len / SEGMENT_LEN;
    if count > u64::from(MAX_DISCARD_SEG) {
        return Err(Error::TooManySegments {
            count,
            max: MAX_DISCARD_SEG,
        });
    }
    // Bounded by MAX_DISCARD_SEG * 16 bytes, so reading it all is cheap.
    let mut bytes = vec![0u8; len as usize];
    let mut at = 0usize;
    for &(addr, l) in spans {
        let l = l as usize;
        mem.read_slice(&mut bytes[at..at + l], GuestAddress(addr))
            .map_err(|_| Error::GuestMemory {
                addr,
                len: l as u64,
            })?;
        at += l;
    }
    let allowed_flags = if discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    bytes
        .chunks_exact(SEGMENT_LEN as usize)
        .map(|c| {
            let sector = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            let sectors = u32::from_le_bytes([c[8], c[9], c[10], c[11]]);
            let flags = u32::from_le_bytes([c[12], c[13], c[14], c[15]]);
            if flags & !allowed_flags != 0 {
                return Err(Error::SegmentFlags { flags });
            }
            if sectors == 0 {
                return Err(Error::SegmentEmpty { sector });
            }
            if sectors > MAX_DISCARD_SECTORS {
                return Err(Error::SegmentTooLarge {
                    sectors,
                    max: MAX_DISCARD_SECTORS,
                });
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let offset = byte_range(sector, len, config)?;
            Ok(Segment {
                offset,
                len,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            })
        })
        .collect()
}

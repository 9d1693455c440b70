//! Parsing: one walk over the descriptor chain collects its [`Shape`], then the status
//! byte is found and everything else is validated, in the order the spec states its rules
//! (virtio 1.2, 2.7.4 and 5.2.6). Nothing here does I/O or writes guest memory.

use std::ops::Deref;

use virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::completion::{Completion, StatusByte};
use super::spans::{iovecs, read_spans, skip_bytes, take_bytes, total, IoVecs, Span, Spans};
use super::{Error, Op, Rejected, Request, RequestType, Segment, HEADER_LEN, SEGMENT_LEN};
use crate::config::{DeviceConfig, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use crate::memory::GuestMap;
use crate::SECTOR_SIZE;

/// The last descriptor of a chain, where the status byte must be.
#[derive(Clone, Copy)]
struct LastDescriptor {
    addr: u64,
    len: u32,
    /// Device-writable.
    writable: bool,
    /// NEXT was set: the chain was cut short, so this is not really the last one.
    has_next: bool,
}

/// The chain's shape, collected in one walk.
#[derive(Default)]
struct Shape {
    readable: Spans,
    writable: Spans,
    descriptors: usize,
    /// Position of the first readable descriptor after a writable one.
    misordered: Option<usize>,
    /// The last descriptor the chain yielded.
    last: Option<LastDescriptor>,
}

impl<B: Bitmap + 'static> Request<B> {
    /// Parses and validates `chain` for a device described by `config`. Buffer addresses
    /// are checked against, and iovecs built from, `mem`, which should be the map the
    /// chain was read from (if it is not, requests fail validation; nothing unsafe
    /// happens). Reads only the header and segment payloads; data stays in place.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: GuestMap<B>,
        config: &DeviceConfig,
    ) -> Result<Request<B>, Box<Rejected<B>>>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let head = chain.head_index();
        let mut shape = Shape::default();
        for desc in chain {
            let span = Span {
                addr: desc.addr().0,
                len: u64::from(desc.len()),
            };
            if desc.is_write_only() {
                shape.writable.push(span);
            } else {
                if !shape.writable.is_empty() && shape.misordered.is_none() {
                    shape.misordered = Some(shape.descriptors);
                }
                shape.readable.push(span);
            }
            shape.descriptors += 1;
            shape.last = Some(LastDescriptor {
                addr: span.addr,
                len: desc.len(),
                writable: desc.is_write_only(),
                has_next: desc.has_next(),
            });
        }
        let status = status_byte(&shape, head, &mem);
        let mut completion = Completion {
            head,
            status: status.as_ref().ok().copied(),
            mem,
            writable_data: 0,
            written_spans: Spans::new(),
        };
        let reject = |error, kind, completion| {
            Box::new(Rejected {
                error,
                kind,
                completion,
            })
        };
        if let Err(e) = status {
            return Err(reject(e, None, completion));
        }
        // The status byte is not data.
        if let Some(last) = shape.writable.last_mut() {
            last.len -= 1;
        }
        let mut kind = None;
        match validate(&completion.mem, &shape, config, &mut kind) {
            Ok(v) => {
                if matches!(v.op, Op::Read { .. } | Op::GetId(_)) {
                    completion.writable_data = total(shape.writable.iter().copied());
                    completion.written_spans = shape.writable;
                }
                Ok(Request {
                    sector: v.sector,
                    op: v.op,
                    data: v.data,
                    data_len: v.data_len,
                    completion,
                })
            }
            Err(e) => Err(reject(e, kind, completion)),
        }
    }
}

/// Finds the status byte: the final byte of the last descriptor, which must be complete
/// (no NEXT), device-writable, non-empty and in guest memory.
fn status_byte<B: Bitmap + 'static>(
    shape: &Shape,
    head: u16,
    mem: &GuestMemoryMmap<B>,
) -> Result<StatusByte, Error> {
    let LastDescriptor {
        addr,
        len,
        writable,
        has_next,
    } = shape.last.ok_or(Error::EmptyChain { head })?;
    if has_next {
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
/// ranges, segments. `shape.writable` no longer includes the status byte. `seen` gets
/// the header's type once it is read, so a refusal can still say what was refused.
fn validate<B: Bitmap + 'static>(
    mem: &GuestMemoryMmap<B>,
    shape: &Shape,
    config: &DeviceConfig,
    seen: &mut Option<RequestType>,
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
    *seen = Some(kind);
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

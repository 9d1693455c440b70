//! Byte streams of a descriptor chain: the guest ranges of one direction, in order, and
//! the few operations the parser needs on them (copy the first bytes out, skip a prefix,
//! turn the rest into host iovecs). Every guest range is checked against the memory map
//! here, before anything reads or points into it.

use smallvec::SmallVec;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::Error;

/// A contiguous run of guest bytes as a descriptor gave it: not yet checked against the
/// memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    /// Guest physical address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Spans of one direction; inline for the common few-descriptor request (header, data,
/// status), so that neither allocates nor makes a `Request` costly to move.
pub(super) type Spans = SmallVec<[Span; 4]>;
/// Host iovecs of a request's data; inline up to 4 segments.
pub type IoVecs = SmallVec<[libc::iovec; 4]>;

/// Total bytes of `spans`.
pub(super) fn total(spans: impl Iterator<Item = Span>) -> u64 {
    // At most 2^16 descriptors of at most 2^32 bytes each: no overflow.
    spans.map(|s| s.len).sum()
}

/// Reads the first `N` bytes of a span list (possibly split over several spans).
pub(super) fn take_bytes<const N: usize, B: Bitmap + 'static>(
    mem: &GuestMemoryMmap<B>,
    spans: &[Span],
) -> Result<[u8; N], Error> {
    let mut out = [0u8; N];
    // Fast path: all of it in the first span (one lookup of the memory map).
    if let Some(&Span { addr, len }) = spans.first() {
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
pub(super) fn read_spans<B: Bitmap + 'static>(
    mem: &GuestMemoryMmap<B>,
    spans: impl Iterator<Item = Span>,
    out: &mut [u8],
) -> Result<usize, Error> {
    let mut got = 0usize;
    for Span { addr, len } in spans {
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
pub(super) fn skip_bytes(spans: &[Span], skip: u64) -> impl Iterator<Item = Span> + Clone + '_ {
    spans
        .iter()
        .scan(skip, |skip, &Span { addr, len }| {
            let n = (*skip).min(len);
            *skip -= n;
            // `addr + n` lies within a span the header was read from, so it does not wrap.
            Some(Span {
                addr: addr + n,
                len: len - n,
            })
        })
        .filter(|s| s.len > 0)
}

/// Host iovecs for data spans and their total length; empty spans are skipped (they carry
/// no bytes), every other one must lie in guest memory.
pub(super) fn iovecs<B: Bitmap + 'static>(
    mem: &GuestMemoryMmap<B>,
    spans: impl Iterator<Item = Span>,
) -> Result<(IoVecs, u64), Error> {
    let mut iov = IoVecs::new();
    let mut len = 0u64;
    for Span { addr, len: l } in spans.filter(|s| s.len > 0) {
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

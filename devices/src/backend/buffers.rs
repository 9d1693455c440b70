//! Guest data buffers as host iovecs.
//!
//! [`GuestBuffers`] is the one type through which backends touch a request's data. Making
//! one is `unsafe` (the iovecs must stay mapped and writable); the request parser does it
//! once, in [`crate::request::Request::buffers`], for iovecs it checked against the guest
//! memory map and whose map it keeps alive. Everything a backend does with it is safe.
//!
//! The guest may write its buffers while we use them (a buggy or hostile driver), so the
//! bytes are only ever copied in and out through raw pointers, never borrowed as `&[u8]`.

use std::marker::PhantomData;

use coro::io::IoBuf;

/// A list of host iovecs covering a request's data buffers in guest memory.
pub struct GuestBuffers<'a> {
    iov: &'a [libc::iovec],
    len: u64,
    _mem: PhantomData<&'a [u8]>,
}

impl<'a> GuestBuffers<'a> {
    /// Wraps iovecs.
    ///
    /// # Safety
    /// Every iovec must describe memory that is mapped, writable, and stays so for `'a`
    /// (for guest memory: a handle on the memory map is held for `'a`), and that is not on
    /// a coroutine stack: backends hand it to the kernel for I/O that runs while the
    /// request's coroutine is parked, when a shared stack holds another coroutine's bytes
    /// (guest memory and heap buffers qualify).
    pub unsafe fn new(iov: &'a [libc::iovec]) -> GuestBuffers<'a> {
        let len = iov.iter().map(|v| v.iov_len as u64).sum();
        GuestBuffers {
            iov,
            len,
            _mem: PhantomData,
        }
    }

    /// The iovecs, to inspect (alignment); I/O goes through [`io_bufs`](Self::io_bufs).
    pub fn iovecs(&self) -> &'a [libc::iovec] {
        self.iov
    }

    /// The buffers as I/O buffers for `coro::io::readv`/`writev`.
    pub fn io_bufs(&self) -> impl Iterator<Item = IoBuf<'a>> + '_ {
        self.iov.iter().map(|v| {
            // SAFETY: per `new`'s contract the memory is mapped and writable for `'a` and
            // not on a coroutine stack; backends run one operation on it at a time.
            unsafe { IoBuf::from_raw(v.iov_base.cast(), v.iov_len) }
        })
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f(ptr, n, done)` for each piece of the buffers from byte `from` on, where
    /// `done` counts the bytes before this piece (from `from`); stops after `max` bytes.
    fn for_each_piece(&self, from: u64, max: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
        let mut skip = from;
        let mut done = 0usize;
        for v in self.iov {
            if done == max {
                break;
            }
            let l = v.iov_len as u64;
            if skip >= l {
                skip -= l;
                continue;
            }
            // `skip < l <= usize::MAX`, so the casts are lossless.
            let n = (v.iov_len - skip as usize).min(max - done);
            // SAFETY: `skip < iov_len`, so the pointer stays inside this iovec, which is
            // valid per `new`'s contract.
            let p = unsafe { v.iov_base.cast::<u8>().add(skip as usize) };
            f(p, n, done);
            done += n;
            skip = 0;
        }
    }

    /// Zeroes every byte from `from` to the end (a read past end of file, a null device).
    pub fn zero_from(&self, from: u64) {
        self.for_each_piece(from, usize::MAX, |p, n, _| {
            // SAFETY: `p..p + n` lies inside one iovec, valid and writable per `new`.
            unsafe { std::ptr::write_bytes(p, 0, n) }
        });
    }

    /// Copies `src` into the buffers starting at byte `pos`; returns the bytes copied
    /// (what fits).
    pub fn copy_from_at(&self, pos: u64, src: &[u8]) -> usize {
        let mut copied = 0;
        self.for_each_piece(pos, src.len(), |p, n, done| {
            // SAFETY: `p..p + n` lies inside one valid, writable iovec, and
            // `done + n <= src.len()`; the two never overlap (`src` is host memory).
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), p, n) };
            copied = done + n;
        });
        copied
    }

    /// Copies `src` into the start of the buffers; returns the bytes copied (what fits).
    pub fn copy_from(&self, src: &[u8]) -> usize {
        self.copy_from_at(0, src)
    }

    /// Copies buffer bytes from `pos` on into `dst`; returns the bytes copied (what the
    /// buffers hold).
    pub fn copy_to_at(&self, pos: u64, dst: &mut [u8]) -> usize {
        let mut copied = 0;
        self.for_each_piece(pos, dst.len(), |p, n, done| {
            // SAFETY: `p..p + n` lies inside one valid iovec, and `done + n <= dst.len()`.
            unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr().add(done), n) };
            copied = done + n;
        });
        copied
    }

    /// Copies the start of the buffers into `dst`; returns the bytes copied.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        self.copy_to_at(0, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iovec(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn zero_copy_in_and_out_across_iovecs() {
        let mut a = [1u8; 3];
        let mut b = [2u8; 5];
        let iov = [iovec(&mut a), iovec(&mut b)];
        // SAFETY: both arrays outlive `bufs`, are only accessed through it meanwhile, and are
        // on the test thread's own stack, not a coroutine's (no I/O is done here).
        let bufs = unsafe { GuestBuffers::new(&iov) };
        assert_eq!(bufs.len(), 8);
        assert_eq!(bufs.copy_from(b"abcdefghij"), 8, "only what fits");
        let mut out = [0u8; 8];
        assert_eq!(bufs.copy_to(&mut out), 8);
        assert_eq!(&out, b"abcdefgh");
        bufs.zero_from(2);
        bufs.copy_to(&mut out);
        assert_eq!(&out, b"ab\0\0\0\0\0\0");
    }

    #[test]
    fn copies_at_an_offset() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let iov = [iovec(&mut a), iovec(&mut b)];
        // SAFETY: both arrays outlive `bufs`, are only accessed through it meanwhile, and are
        // on the test thread's own stack, not a coroutine's (no I/O is done here).
        let bufs = unsafe { GuestBuffers::new(&iov) };
        assert_eq!(bufs.copy_from_at(2, b"xyz"), 3, "straddles the two iovecs");
        assert_eq!(bufs.copy_from_at(7, b"pq"), 1, "only the last byte fits");
        assert_eq!(bufs.copy_from_at(8, b"pq"), 0, "nothing past the end");
        let mut out = [0u8; 4];
        assert_eq!(bufs.copy_to_at(1, &mut out), 4);
        assert_eq!(&out, b"\0xyz");
        let mut tail = [0u8; 4];
        assert_eq!(bufs.copy_to_at(6, &mut tail), 2, "what the buffers hold");
        assert_eq!(&tail[..2], b"\0p");
    }
}

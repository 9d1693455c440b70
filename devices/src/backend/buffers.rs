//! Guest data buffers as host iovecs.
//!
//! [`GuestBuffers`] is the one type through which backends touch guest memory. It can only
//! be made by the request parser (which checked every range against the guest memory map
//! and holds that map alive), so the unsafe promise is made once, at construction.

use std::marker::PhantomData;

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
    /// Every iovec must describe memory that is mapped, writable, and stays valid for `'a`
    /// (for guest memory: an `Arc` of the memory map is held for `'a`). Other threads (the
    /// guest) may access it concurrently, so it is only ever copied in and out, never
    /// borrowed as a Rust slice.
    pub unsafe fn new(iov: &'a [libc::iovec]) -> GuestBuffers<'a> {
        let len = iov.iter().map(|v| v.iov_len as u64).sum();
        GuestBuffers {
            iov,
            len,
            _mem: PhantomData,
        }
    }

    /// The iovecs, for vectored syscalls and io_uring.
    pub fn iovecs(&self) -> &'a [libc::iovec] {
        self.iov
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Zeroes every byte from `from` to the end (a read past end of file, a null device).
    pub fn zero_from(&self, from: u64) {
        let mut skip = from;
        for v in self.iov {
            let l = v.iov_len as u64;
            if skip >= l {
                skip -= l;
                continue;
            }
            // SAFETY: the range lies inside this iovec, which is valid and writable per
            // `new`'s contract. `skip < l <= usize::MAX`, so the casts are lossless.
            unsafe {
                std::ptr::write_bytes(
                    v.iov_base.cast::<u8>().add(skip as usize),
                    0,
                    (l - skip) as usize,
                )
            };
            skip = 0;
        }
    }

    /// Copies `src` into the start of the buffers; returns bytes copied (what fits).
    pub fn copy_from(&self, src: &[u8]) -> usize {
        let mut done = 0;
        for v in self.iov {
            if done == src.len() {
                break;
            }
            let n = v.iov_len.min(src.len() - done);
            // SAFETY: `n` bytes fit in both the source and this valid, writable iovec.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), v.iov_base.cast(), n) };
            done += n;
        }
        done
    }

    /// Copies the buffers' bytes into `dst` (which must be at least [`len`](Self::len)).
    pub fn copy_to(&self, dst: &mut [u8]) {
        let mut done = 0;
        for v in self.iov {
            let n = v.iov_len.min(dst.len() - done);
            // SAFETY: `n` bytes fit in both this valid iovec and the destination.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base.cast::<u8>(),
                    dst.as_mut_ptr().add(done),
                    n,
                )
            };
            done += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_copy_in_and_out_across_iovecs() {
        let mut a = [1u8; 3];
        let mut b = [2u8; 5];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: both arrays outlive `bufs` and are only accessed through it meanwhile.
        let bufs = unsafe { GuestBuffers::new(&iov) };
        assert_eq!(bufs.len(), 8);
        assert_eq!(bufs.copy_from(b"abcdefghij"), 8, "only what fits");
        let mut out = [0u8; 8];
        bufs.copy_to(&mut out);
        assert_eq!(&out, b"abcdefgh");
        bufs.zero_from(2);
        bufs.copy_to(&mut out);
        assert_eq!(&out, b"ab\0\0\0\0\0\0");
    }
}

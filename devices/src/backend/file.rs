//! The file backend: a raw image file or a block device, through io_uring.
//!
//! Reads and writes are vectored io_uring operations straight from/to guest memory (zero
//! copy), continued after short transfers and split at the kernel's 1024-iovec limit. With
//! O_DIRECT, buffers the kernel would refuse go through an aligned bounce buffer, as QEMU
//! does, in bounded chunks so a guest cannot make us allocate its whole 4 GiB request. The
//! alignment is the storage's own (the block device's logical block, or what `statx`
//! reports for a file), not an assumed 512: on a 4K-native disk 512-byte I/O is EINVAL.
//!
//! Discard and write-zeroes go through io_uring as `fallocate`, on files and block devices
//! alike (Linux maps `PUNCH_HOLE`/`ZERO_RANGE` on a block device to an unmapping or plain
//! zero-out). Nothing here is a synchronous ioctl: a block device without WRITE ZEROES
//! refuses `PUNCH_HOLE` but still zeroes with `ZERO_RANGE` (the kernel writes zero pages,
//! in an io_uring worker), and where even that is refused we write zeroes ourselves, one
//! bounded io_uring write at a time. A `BLKZEROOUT` of up to 32 GiB on the worker thread
//! would stall every queue that thread serves.
//!
//! A failed flush is sticky: the kernel reports a writeback error to one `fdatasync` only
//! and drops the data, so later flushes fail with the same error, as QEMU's file-posix does.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use coro::io::IoBuf;
use smallvec::SmallVec;

use super::{BlockBackend, GuestBuffers, ResizeError, Topology};

use libc::{BLKIOMIN, BLKIOOPT, BLKPBSZGET, BLKSSZGET};

/// `_IOR(0x12, 114, size_t)`, which the libc crate lacks. `Ioctl` is the request type of
/// this libc's `ioctl` (`c_ulong` in glibc, `c_int` in musl); the `as` keeps the bits.
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272_u32 as libc::Ioctl;

/// Most iovecs one `readv`/`writev` accepts (`UIO_MAXIOV`); more fail with EINVAL. A
/// request can exceed it: up to queue-size descriptors, more when they cross memory regions.
const MAX_IOVECS: usize = libc::UIO_MAXIOV as usize;
/// O_DIRECT alignment for image files whose file system does not report one (`statx`'s
/// `STATX_DIOALIGN` needs Linux 6.1 and file system support): the historical assumption,
/// right for disks with 512-byte sectors.
const FILE_DIRECT_ALIGN_FALLBACK: u32 = 512;
/// Least alignment of our bounce buffers (a page); more when the storage asks for more.
const BOUNCE_ALIGN: usize = 4096;
/// Largest bounce buffer (and zero-fill chunk): bounds the memory one request can pin.
const BOUNCE_MAX: usize = 1 << 20;

/// An open image file or block device.
pub struct FileBackend {
    file: File,
    /// Changed only by [`BlockBackend::resize`].
    size: AtomicU64,
    block_device: bool,
    /// O_DIRECT's required alignments; `None` when buffered.
    direct_align: Option<DirectAlign>,
    readonly: bool,
    topology: Topology,
    /// The errno of the first failed flush, 0 while none has failed (see [`Self::flush`]).
    flush_errno: AtomicI32,
}

/// What O_DIRECT requires of one open file, in bytes (powers of two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DirectAlign {
    /// Alignment of buffer addresses in memory.
    mem: usize,
    /// Alignment of file offsets and lengths; we hold each iovec's length to it too.
    offset: usize,
}

impl DirectAlign {
    /// The alignment for `file` (opened with O_DIRECT).
    fn of(file: &File, block_device: bool) -> io::Result<DirectAlign> {
        let (mem, offset) = if block_device {
            // The kernel checks offsets and lengths against the logical block size;
            // memory only against the (usually smaller) DMA alignment, which we do not
            // query: bouncing a buffer that was acceptable costs a copy, not an error.
            let logical = ioctl_u32(file, BLKSSZGET)?;
            (logical, logical)
        } else {
            statx_dio_align(file)?
                .unwrap_or((FILE_DIRECT_ALIGN_FALLBACK, FILE_DIRECT_ALIGN_FALLBACK))
        };
        let valid = |a: u32| a.is_power_of_two() && a as usize <= BOUNCE_MAX;
        if !valid(mem) || !valid(offset) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                UnsupportedDirectAlign { mem, offset },
            ));
        }
        Ok(DirectAlign {
            mem: mem as usize,
            // Below 512 the virtio sector would not be addressable; no disk has that.
            offset: offset.max(512) as usize,
        })
    }
}

/// O_DIRECT alignments the backend cannot serve: not powers of two, or beyond its
/// largest bounce buffer (no real storage reports such values).
#[derive(Debug, thiserror::Error)]
#[error("unsupported O_DIRECT alignment: memory {mem}, offset {offset}")]
pub struct UnsupportedDirectAlign {
    /// Required alignment of buffer addresses.
    pub mem: u32,
    /// Required alignment of offsets and lengths.
    pub offset: u32,
}

impl FileBackend {
    /// Opens `path` (a regular file or a block device), read-only or read-write; `direct`
    /// adds O_DIRECT (bypass the host page cache).
    pub fn open(path: &Path, readonly: bool, direct: bool) -> io::Result<FileBackend> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!readonly);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        }
        let direct_align = if direct {
            Some(DirectAlign::of(&file, block_device)?)
        } else {
            None
        };
        // Buffered I/O works at any 512-byte granularity (the page cache does the
        // read-modify-write); O_DIRECT makes the storage's alignment the smallest unit.
        let logical = direct_align.map_or(512, |a| a.offset as u32);
        let (size, mut topology) = if block_device {
            (
                ioctl_u64(&file, BLKGETSIZE64)?,
                Topology {
                    logical_block_size: logical,
                    physical_block_size: ioctl_u32(&file, BLKPBSZGET).unwrap_or(logical),
                    min_io_size: ioctl_u32(&file, BLKIOMIN).unwrap_or(0),
                    opt_io_size: ioctl_u32(&file, BLKIOOPT).unwrap_or(0),
                },
            )
        } else {
            let blksize = u32::try_from(meta.blksize()).unwrap_or(4096);
            (
                meta.len(),
                Topology {
                    logical_block_size: logical,
                    // Below the file system block the page cache does read-modify-write.
                    physical_block_size: blksize.clamp(512, 4096),
                    min_io_size: blksize.clamp(512, 4096),
                    opt_io_size: 0,
                },
            )
        };
        // A physical block smaller than the logical one would be a nonsensical hint.
        topology.physical_block_size = topology.physical_block_size.max(logical);
        Ok(FileBackend {
            file,
            size: AtomicU64::new(size),
            block_device,
            direct_align,
            readonly,
            topology,
            flush_errno: AtomicI32::new(0),
        })
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// The error of the first failed flush, if one failed.
    fn flush_failed(&self) -> Option<io::Error> {
        match self.flush_errno.load(Ordering::Acquire) {
            0 => None,
            errno => Some(io::Error::from_raw_os_error(errno)),
        }
    }

    /// Whether O_DIRECT would refuse these buffers (the parser already aligned offsets and
    /// total length to the guest's block size, which is at least the disk's).
    fn needs_bounce(&self, bufs: &GuestBuffers<'_>) -> bool {
        self.direct_align.is_some_and(|a| {
            bufs.iovecs()
                .iter()
                .any(|v| v.iov_base as usize % a.mem != 0 || v.iov_len % a.offset != 0)
        })
    }

    /// A bounce buffer for `len` bytes, aligned as O_DIRECT requires.
    fn bounce(&self, len: usize) -> io::Result<Bounce> {
        Bounce::new(len, self.direct_align.map_or(0, |a| a.mem))
    }

    /// Reads into `bufs` at `offset`, continuing after short reads, until they are full or
    /// the file ends; returns the bytes read.
    fn read_full<'a>(
        &self,
        bufs: impl IntoIterator<Item = IoBuf<'a>>,
        offset: u64,
    ) -> io::Result<u64> {
        let mut cur = IovCursor::new(bufs);
        let mut done = 0u64;
        while !cur.is_empty() {
            let at = checked_offset(offset, done)?;
            match coro::io::readv(self.fd(), cur.batch(), at) {
                Ok(0) => break,
                Ok(n) => {
                    done += n as u64;
                    cur.advance(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Writes all of `bufs` at `offset`, continuing after short writes.
    fn write_full<'a>(
        &self,
        bufs: impl IntoIterator<Item = IoBuf<'a>>,
        offset: u64,
    ) -> io::Result<()> {
        let mut cur = IovCursor::new(bufs);
        let mut done = 0u64;
        while !cur.is_empty() {
            let at = checked_offset(offset, done)?;
            match coro::io::writev(self.fd(), cur.batch(), at) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "short write")),
                Ok(n) => {
                    done += n as u64;
                    cur.advance(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// O_DIRECT read through an aligned bounce buffer, one bounded chunk at a time.
    fn read_bounced(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        let mut bounce = self.bounce(chunk_len(bufs.len()))?;
        let mut pos = 0u64;
        while pos < bufs.len() {
            let n = chunk_len(bufs.len() - pos);
            let got = self.read_full([bounce.io_buf(n)], checked_offset(offset, pos)?)?;
            bufs.copy_from_at(pos, &bounce.as_mut_slice()[..n]);
            if got < n as u64 {
                bufs.zero_from(pos + got);
                break;
            }
            pos += n as u64;
        }
        Ok(())
    }

    /// O_DIRECT write through an aligned bounce buffer, one bounded chunk at a time.
    fn write_bounced(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        let mut bounce = self.bounce(chunk_len(bufs.len()))?;
        let mut pos = 0u64;
        while pos < bufs.len() {
            let n = chunk_len(bufs.len() - pos);
            bufs.copy_to_at(pos, &mut bounce.as_mut_slice()[..n]);
            self.write_full([bounce.io_buf(n)], checked_offset(offset, pos)?)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Writes zeroes the slow way, for storage without `FALLOC_FL_ZERO_RANGE`: one
    /// bounded io_uring write per chunk, each parking this coroutine, so zeroing 32 GiB
    /// never holds the thread for longer than one chunk's submission.
    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let bounce = self.bounce(chunk_len(len))?;
        let mut done = 0;
        while done < len {
            let n = chunk_len(len - done);
            self.write_full([bounce.io_buf(n)], checked_offset(offset, done)?)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// `ftruncate` of an image file opened read-write. A grown file is sparse: the new
    /// blocks read as zeroes and take space only once written. A block device's size is
    /// the device's (`BLKGETSIZE64`), which no call of ours changes.
    fn resize(&self, new_size: u64) -> Result<(), ResizeError> {
        if self.readonly {
            return Err(ResizeError::ReadOnly);
        }
        if self.block_device {
            return Err(ResizeError::BlockDevice);
        }
        self.file.set_len(new_size).map_err(ResizeError::Storage)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn topology(&self) -> Topology {
        self.topology
    }

    fn is_read_only(&self) -> bool {
        self.readonly
    }

    /// O_DIRECT I/O goes to the device: 4 KiB random reads at queue depth 32 went from
    /// 58k to 84k IOPS on a virtio disk when each was submitted on its own. Page-cache
    /// I/O completes inside the submitting call, so batching it saves calls (buffered
    /// random reads: 290k batched, 220k one by one).
    fn submit_each_io(&self) -> bool {
        self.direct_align.is_some()
    }

    fn is_block_device(&self) -> bool {
        self.block_device
    }

    fn read_vectored(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        if self.needs_bounce(bufs) {
            return self.read_bounced(bufs, offset);
        }
        let got = self.read_full(bufs.io_bufs(), offset)?;
        if got < bufs.len() {
            // The image file ends inside the device (its size is rounded, or it shrank):
            // what lies beyond reads as zeroes, like a sparse tail.
            bufs.zero_from(got);
        }
        Ok(())
    }

    fn write_vectored(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        if self.needs_bounce(bufs) {
            return self.write_bounced(bufs, offset);
        }
        self.write_full(bufs.io_bufs(), offset)
    }

    /// `fdatasync`, failing for good once it has failed. The kernel reports a writeback
    /// error to one `fdatasync` (its errseq), perhaps one a flush on another queue made,
    /// and marks the lost pages clean: a later flush would succeed although the data never
    /// reached the disk. So the first error is kept and returned by every later flush of
    /// this disk, as QEMU's file-posix does (`page_cache_inconsistent`).
    fn flush(&self) -> io::Result<()> {
        if let Some(e) = self.flush_failed() {
            return Err(e);
        }
        match coro::io::fsync(self.fd(), true) {
            Err(e) => {
                // Only the kernel's answer is sticky: an error without an errno (no ring)
                // never reached the file. The first failure wins a race between queues.
                if let Some(errno) = e.raw_os_error() {
                    let _ = self.flush_errno.compare_exchange(
                        0,
                        errno,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                Err(e)
            }
            // A flush that ran alongside the failing one may have had the error reported to
            // the other: once it is known, it covers this flush's writes too.
            Ok(()) => self.flush_failed().map_or(Ok(()), Err),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match coro::io::fallocate(self.fd(), mode, offset, len) {
            // Discard is a hint the device may ignore (virtio 1.2, 5.2.6.2); storage that
            // cannot deallocate leaves the data, as QEMU does, rather than fail the guest.
            // On a block device this is one without WRITE ZEROES: the BLKDISCARD ioctl
            // might still deallocate, but it is synchronous and would stall the thread, and
            // Linux offers no asynchronous discard (fallocate's NO_HIDE_STALE is refused).
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let unsupported = |e: &io::Error| e.raw_os_error() == Some(libc::EOPNOTSUPP);
        if may_unmap {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            match coro::io::fallocate(self.fd(), mode, offset, len) {
                // A block device without WRITE ZEROES, or a file system that cannot punch
                // holes: zero without unmapping, which the guest allowed, not required.
                Err(e) if unsupported(&e) => {}
                r => return r,
            }
        }
        // On a block device the kernel writes zero pages when the device lacks WRITE
        // ZEROES, inside the io_uring worker, so this thread keeps running.
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        match coro::io::fallocate(self.fd(), mode, offset, len) {
            Err(e) if unsupported(&e) => self.write_zero_buffers(offset, len),
            r => r,
        }
    }
}

/// `offset + done`, an error rather than a wrap (the parser bounds both, so this is
/// defence in depth).
fn checked_offset(offset: u64, done: u64) -> io::Result<u64> {
    offset
        .checked_add(done)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
}

/// The next bounce chunk: all of `remaining`, at most [`BOUNCE_MAX`].
fn chunk_len(remaining: u64) -> usize {
    usize::try_from(remaining).map_or(BOUNCE_MAX, |r| r.min(BOUNCE_MAX))
}

/// The not yet transferred part of an iovec list: advances past what a short read or
/// write did, and hands out at most [`MAX_IOVECS`] at a time.
///
/// The list lives on the request coroutine's stack (inline up to 8 buffers); that is
/// fine because `coro::io` copies it into the operation's slot at submission.
struct IovCursor<'a> {
    iov: SmallVec<[IoBuf<'a>; 8]>,
    first: usize,
}

impl<'a> IovCursor<'a> {
    fn new(bufs: impl IntoIterator<Item = IoBuf<'a>>) -> IovCursor<'a> {
        let mut cur = IovCursor {
            iov: bufs.into_iter().filter(|v| !v.is_empty()).collect(),
            first: 0,
        };
        cur.skip_empty();
        cur
    }

    fn is_empty(&self) -> bool {
        self.first == self.iov.len()
    }

    fn batch(&self) -> &[IoBuf<'a>] {
        let rest = &self.iov[self.first..];
        &rest[..rest.len().min(MAX_IOVECS)]
    }

    /// Drops the first `n` bytes (`n` at most what [`batch`](Self::batch) covers).
    fn advance(&mut self, mut n: usize) {
        while n > 0 && self.first < self.iov.len() {
            let v = &mut self.iov[self.first];
            if n >= v.len() {
                n -= v.len();
                self.first += 1;
            } else {
                v.advance(n);
                n = 0;
            }
        }
        self.skip_empty();
    }

    fn skip_empty(&mut self) {
        while self.first < self.iov.len() && self.iov[self.first].is_empty() {
            self.first += 1;
        }
    }
}

fn ioctl_u64(file: &File, request: libc::Ioctl) -> io::Result<u64> {
    let mut v = 0u64;
    // SAFETY: the ioctls used with this helper (BLKGETSIZE64) write one u64 through the
    // pointer, which points at a live u64.
    if unsafe { libc::ioctl(file.as_raw_fd(), request, &mut v) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn ioctl_u32(file: &File, request: libc::Ioctl) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    // SAFETY: the ioctls used with this helper (BLKSSZGET, BLKPBSZGET, BLKIOMIN, BLKIOOPT)
    // write one unsigned int through the pointer, which points at a live c_uint.
    if unsafe { libc::ioctl(file.as_raw_fd(), request, &mut v) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// O_DIRECT's memory and offset alignment of `file` as `statx` reports it (Linux 6.1+);
/// `None` when the kernel or file system does not say, or says the file has no O_DIRECT
/// (an offset alignment of 0) although it opened with the flag.
fn statx_dio_align(file: &File) -> io::Result<Option<(u32, u32)>> {
    // SAFETY: `statx` is plain data for which all-zero bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is an empty NUL-terminated string, which AT_EMPTY_PATH makes mean
    // the descriptor itself, and `stx` is a live, writable `statx` the kernel fills.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        // Kernels before 4.11 have no statx at all.
        return if e.raw_os_error() == Some(libc::ENOSYS) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return Ok(None);
    }
    Ok(Some((
        stx.stx_dio_mem_align.max(1),
        stx.stx_dio_offset_align,
    )))
}

/// A zeroed, aligned heap buffer for O_DIRECT.
struct Bounce {
    ptr: *mut u8,
    len: usize,
    layout: Layout,
}

impl Bounce {
    /// `len` bytes aligned to a page, or to `align` when that is larger (a power of two).
    fn new(len: usize, align: usize) -> io::Result<Bounce> {
        let align = align.max(BOUNCE_ALIGN);
        let layout = Layout::from_size_align(len.max(1).next_multiple_of(align), align)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(Bounce { ptr, len, layout })
    }

    /// The first `n` bytes (at most the buffer's length) as an I/O buffer: exactly the
    /// request's length, so a write never adds padding.
    fn io_buf(&self, n: usize) -> IoBuf<'_> {
        // SAFETY: `ptr` is a live heap allocation of at least `len` bytes (not a coroutine
        // stack), borrowed for the returned buffer's lifetime; the backend runs one
        // operation on it at a time and copies in or out only between operations.
        unsafe { IoBuf::from_raw(self.ptr, n.min(self.len)) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live, initialised (zeroed) allocation of at least `len` bytes,
        // and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(base: usize, len: usize) -> IoBuf<'static> {
        // SAFETY: the cursor only computes with these addresses; no test here reads,
        // writes or submits them.
        unsafe { IoBuf::from_raw(base as *mut u8, len) }
    }

    #[test]
    fn cursor_advances_across_iovecs() {
        let mut c = IovCursor::new([iov(0x1000, 10), iov(0x2000, 0), iov(0x3000, 20)]);
        assert_eq!(c.batch().len(), 2, "empty iovecs are dropped");
        c.advance(4);
        assert_eq!(c.batch()[0].as_ptr() as usize, 0x1004);
        assert_eq!(c.batch()[0].len(), 6);
        c.advance(6);
        assert_eq!(c.batch().len(), 1);
        assert_eq!(c.batch()[0].as_ptr() as usize, 0x3000);
        c.advance(20);
        assert!(c.is_empty());
    }

    #[test]
    fn cursor_batches_at_the_kernel_limit() {
        let mut c = IovCursor::new((0..2500).map(|i| iov(0x1000 * (i + 1), 512)));
        assert_eq!(c.batch().len(), MAX_IOVECS);
        c.advance(MAX_IOVECS * 512);
        assert_eq!(c.batch().len(), MAX_IOVECS);
        c.advance(MAX_IOVECS * 512);
        assert_eq!(c.batch().len(), 2500 - 2 * MAX_IOVECS);
    }

    #[test]
    fn chunks_are_bounded() {
        assert_eq!(chunk_len(10), 10);
        assert_eq!(chunk_len(u64::from(u32::MAX)), BOUNCE_MAX);
    }
}

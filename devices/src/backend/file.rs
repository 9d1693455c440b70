//! The file backend: a raw image file or a block device, through io_uring.
//!
//! Reads and writes are vectored io_uring operations straight from/to guest memory
//! (zero copy). With O_DIRECT, buffers the kernel would refuse (not 512-byte aligned) go
//! through an aligned bounce buffer instead of failing the request, as QEMU does.
//!
//! Discard and write-zeroes go through io_uring as `fallocate`, on files and on block
//! devices alike (Linux maps `PUNCH_HOLE`/`ZERO_RANGE` on a block device to an unmapping or
//! plain zero-out). Only when a block device refuses that (EOPNOTSUPP) do we fall back to
//! the `BLKDISCARD`/`BLKZEROOUT` ioctls, which are synchronous and stall this worker's
//! queues for their duration.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::{BlockBackend, GuestBuffers, Topology};

const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKIOMIN: libc::c_ulong = 0x1278;
const BLKIOOPT: libc::c_ulong = 0x1279;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Alignment O_DIRECT needs for buffers, lengths and offsets on the devices we target.
const DIRECT_ALIGN: usize = 512;
/// Alignment of our bounce buffers (a page, which satisfies any logical block size).
const BOUNCE_ALIGN: usize = 4096;

/// An open image file or block device.
pub struct FileBackend {
    file: File,
    size: u64,
    block_device: bool,
    direct: bool,
    readonly: bool,
    topology: Topology,
}

impl FileBackend {
    /// Opens `path`; `direct` adds O_DIRECT (bypass the host page cache).
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
        let (size, topology) = if block_device {
            (
                ioctl_u64(&file, BLKGETSIZE64)?,
                Topology {
                    physical_block_size: ioctl_u32(&file, BLKPBSZGET)
                        .or_else(|_| ioctl_u32(&file, BLKSSZGET))
                        .unwrap_or(512),
                    min_io_size: ioctl_u32(&file, BLKIOMIN).unwrap_or(0),
                    opt_io_size: ioctl_u32(&file, BLKIOOPT).unwrap_or(0),
                },
            )
        } else {
            use std::os::unix::fs::MetadataExt;
            let blksize = u32::try_from(meta.blksize()).unwrap_or(4096);
            (
                meta.len(),
                Topology {
                    // Below the file system block the page cache does read-modify-write.
                    physical_block_size: blksize.clamp(512, 4096),
                    min_io_size: blksize.clamp(512, 4096),
                    opt_io_size: 0,
                },
            )
        };
        Ok(FileBackend {
            file,
            size,
            block_device,
            direct,
            readonly,
            topology,
        })
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Whether O_DIRECT would refuse these buffers.
    fn needs_bounce(&self, bufs: &GuestBuffers<'_>) -> bool {
        self.direct
            && bufs
                .iovecs()
                .iter()
                .any(|v| v.iov_base as usize % DIRECT_ALIGN != 0 || v.iov_len % DIRECT_ALIGN != 0)
    }

    /// Reads `iov` fully, continuing after short reads; zero-fills past end of file.
    fn read_full(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        let mut iov = bufs.iovecs().to_vec();
        let mut done = 0u64;
        while done < bufs.len() {
            let n = coro::io::readv(self.fd(), &iov, offset + done)? as u64;
            if n == 0 {
                bufs.zero_from(done);
                return Ok(());
            }
            done += n;
            advance(&mut iov, n);
        }
        Ok(())
    }

    fn write_full(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        let mut iov = bufs.iovecs().to_vec();
        let mut done = 0u64;
        while done < bufs.len() {
            let n = coro::io::writev(self.fd(), &iov, offset + done)? as u64;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
            }
            done += n;
            advance(&mut iov, n);
        }
        Ok(())
    }

    fn ioctl_range(&self, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range = [offset, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read a [u64; 2] {start, len} from the pointer.
        let r = unsafe { libc::ioctl(self.fd(), request, range.as_ptr()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Writes zeroes the slow way, for file systems without `FALLOC_FL_ZERO_RANGE`.
    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let bounce = Bounce::new(CHUNK.min(len) as usize)?;
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            let iov = [libc::iovec {
                iov_base: bounce.ptr.cast(),
                iov_len: n,
            }];
            // SAFETY: the bounce buffer is ours, zeroed, and outlives the call.
            let bufs = unsafe { GuestBuffers::new(&iov) };
            self.write_full(&bufs, offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn topology(&self) -> Topology {
        self.topology
    }

    fn is_read_only(&self) -> bool {
        self.readonly
    }

    fn read(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        if !self.needs_bounce(bufs) {
            return self.read_full(bufs, offset);
        }
        let bounce = Bounce::new(bufs.len() as usize)?;
        let iov = [bounce.iovec()];
        // SAFETY: the bounce buffer is ours and outlives `b`.
        let b = unsafe { GuestBuffers::new(&iov) };
        self.read_full(&b, offset)?;
        bufs.copy_from(bounce.as_slice());
        Ok(())
    }

    fn write(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        if !self.needs_bounce(bufs) {
            return self.write_full(bufs, offset);
        }
        let mut bounce = Bounce::new(bufs.len() as usize)?;
        bufs.copy_to(bounce.as_mut_slice());
        let iov = [bounce.iovec()];
        // SAFETY: the bounce buffer is ours and outlives `b`.
        let b = unsafe { GuestBuffers::new(&iov) };
        self.write_full(&b, offset)
    }

    fn flush(&self) -> io::Result<()> {
        coro::io::fsync(self.fd(), true)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match coro::io::fallocate(self.fd(), mode, offset, len) {
            Err(e) if self.block_device && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.ioctl_range(BLKDISCARD, offset, len)
            }
            r => r,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let mode = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match coro::io::fallocate(self.fd(), mode, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                if self.block_device {
                    self.ioctl_range(BLKZEROOUT, offset, len)
                } else {
                    self.write_zero_buffers(offset, len)
                }
            }
            r => r,
        }
    }
}

/// Drops the first `n` bytes from an iovec list (after a short read or write).
fn advance(iov: &mut Vec<libc::iovec>, mut n: u64) {
    let mut drop_count = 0;
    for v in iov.iter_mut() {
        let l = v.iov_len as u64;
        if n >= l {
            n -= l;
            drop_count += 1;
        } else {
            // SAFETY: `n < iov_len`, so the new base stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n as usize) }.cast();
            v.iov_len -= n as usize;
            break;
        }
    }
    iov.drain(..drop_count);
}

fn ioctl_u64(file: &File, request: libc::c_ulong) -> io::Result<u64> {
    let mut v = 0u64;
    // SAFETY: the ioctls used with this helper write one u64 through the pointer.
    if unsafe { libc::ioctl(file.as_raw_fd(), request, &mut v) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn ioctl_u32(file: &File, request: libc::c_ulong) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    // SAFETY: the ioctls used with this helper write one unsigned int through the pointer.
    if unsafe { libc::ioctl(file.as_raw_fd(), request, &mut v) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// A zeroed, page-aligned heap buffer for O_DIRECT.
struct Bounce {
    ptr: *mut u8,
    /// Bytes in use: exactly the request's length, so a write never adds padding.
    len: usize,
    layout: Layout,
}

impl Bounce {
    fn new(len: usize) -> io::Result<Bounce> {
        let layout =
            Layout::from_size_align(len.max(1).next_multiple_of(BOUNCE_ALIGN), BOUNCE_ALIGN)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(Bounce { ptr, len, layout })
    }

    fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: self.len,
        }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live, initialised (zeroed) allocation of at least `len` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) };
    }
}

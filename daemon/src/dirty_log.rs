//! Dirty-page logging for live migration (vhost-user spec, "Migration"): while the
//! frontend migrates the VM, every guest page the daemon writes is marked in a bitmap the
//! frontend shares with it (SET_LOG_BASE), so that QEMU copies it again.
//!
//! [`DirtyLog`] is the bitmap type of the daemon's guest memory map: vm-memory calls
//! `mark_dirty` for every write made through the map (the used ring elements and index,
//! written by virtio-queue); the device marks what it writes through raw iovecs itself,
//! after the write (data of reads, status bytes, GET_ID strings: see
//! `corodev_devices::request::Completion`).
//!
//! Each memory region's bitmap starts empty; the vhost-user library gives it its range of
//! the frontend's log at SET_LOG_BASE ([`LogRange`]), and the device switches marking on
//! and off with `VHOST_F_LOG_ALL` ([`set_logging`]). While it is off, marking costs one
//! relaxed load. Slices borrow their region's state: taking one (vm-memory does for every
//! access) copies a reference, it never touches a reference count.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use vhost_user_backend::bitmap::{BitmapReplace, MemRegionBitmap, MmapLogReg};
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The daemon's guest memory map: every region carries its dirty log.
pub type GuestMap = GuestMemoryMmap<DirtyLog>;

/// The log's page size (`VHOST_LOG_PAGE`), whatever the host's.
const LOG_PAGE: usize = 4096;

/// One memory region's dirty log: off and empty until the frontend sets a log base and
/// turns logging on.
#[derive(Debug, Default, Clone)]
pub struct DirtyLog(Arc<RegionLog>);

#[derive(Debug, Default)]
struct RegionLog {
    /// `VHOST_F_LOG_ALL` is acked: mark what is written.
    on: AtomicBool,
    /// This region's pages in the frontend's log (SET_LOG_BASE).
    range: RwLock<Option<LogRange>>,
}

/// A region's pages in the frontend's log: bit `first_page + n` is the region's page `n`.
#[derive(Debug)]
pub struct LogRange {
    log: Arc<MmapLogReg>,
    first_page: usize,
    pages: usize,
}

impl MemRegionBitmap for LogRange {
    /// The region's range of `log`, which must cover the region's last page (a log too
    /// short for guest memory is refused, not written past).
    fn new<R: GuestMemoryRegion>(region: &R, log: Arc<MmapLogReg>) -> io::Result<Self> {
        let invalid = || io::Error::from(io::ErrorKind::InvalidData);
        let start = usize::try_from(region.start_addr().raw_value()).map_err(|_| invalid())?;
        let len = usize::try_from(region.len()).map_err(|_| invalid())?;
        let last = start
            .checked_add(len.checked_sub(1).ok_or_else(invalid)?)
            .ok_or_else(invalid)?;
        if last / LOG_PAGE / 8 >= log.len() {
            log::error!(
                "dirty log of {} bytes does not cover guest memory up to {last:#x}",
                log.len()
            );
            return Err(invalid());
        }
        Ok(LogRange {
            log,
            first_page: start / LOG_PAGE,
            pages: len.div_ceil(LOG_PAGE),
        })
    }
}

impl LogRange {
    /// Marks the region's bytes `offset..offset + len` dirty (pages past the region are
    /// ignored). Atomic: the frontend reads and clears the log concurrently.
    fn mark(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / LOG_PAGE;
        let last = (offset.saturating_add(len - 1) / LOG_PAGE).min(self.pages.saturating_sub(1));
        for page in first..=last {
            let bit = self.first_page + page;
            // In range: `new` checked the word of the region's last page.
            self.log[bit / 8].fetch_or(1 << (bit % 8), Ordering::Relaxed);
        }
    }
}

impl RegionLog {
    fn mark(&self, offset: usize, len: usize) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        let range = self.range.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(range) = range.as_ref() {
            range.mark(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let range = self.range.read().unwrap_or_else(PoisonError::into_inner);
        range.as_ref().is_some_and(|r| {
            let page = offset / LOG_PAGE;
            let bit = r.first_page + page;
            page < r.pages && r.log[bit / 8].load(Ordering::Relaxed) & (1 << (bit % 8)) != 0
        })
    }
}

/// A slice of a region's dirty log: the region's state and where the slice starts in it.
#[derive(Debug, Clone, Copy)]
pub struct DirtyLogSlice<'a> {
    log: &'a RegionLog,
    base: usize,
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = DirtyLogSlice<'a>;
}

impl Bitmap for DirtyLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.0.mark(offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.0.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> DirtyLogSlice<'_> {
        DirtyLogSlice {
            log: &self.0,
            base: offset,
        }
    }
}

impl NewBitmap for DirtyLog {
    fn with_len(_len: usize) -> Self {
        DirtyLog::default()
    }
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = LogRange;

    /// SET_LOG_BASE: from now on, this region's pages are marked in `range`.
    fn replace(&self, range: LogRange) {
        *self.0.range.write().unwrap_or_else(PoisonError::into_inner) = Some(range);
    }
}

impl<'b> WithBitmapSlice<'b> for DirtyLogSlice<'_> {
    type S = Self;
}

impl BitmapSlice for DirtyLogSlice<'_> {}

impl Bitmap for DirtyLogSlice<'_> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.log.mark(self.base.saturating_add(offset), len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log.dirty_at(self.base.saturating_add(offset))
    }

    fn slice_at(&self, offset: usize) -> Self {
        DirtyLogSlice {
            log: self.log,
            base: self.base.saturating_add(offset),
        }
    }
}

/// Turns marking on or off in every region of `mem` (`VHOST_F_LOG_ALL` acked or not). A
/// memory table set while logging is on starts with it off; the frontend acks the
/// features again after a new table during migration.
pub fn set_logging(mem: &GuestMap, on: bool) {
    for region in mem.iter() {
        region.bitmap().log.on.store(on, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use vm_memory::{Bytes, GuestAddress};

    /// A log of `len` bytes (8 pages each), as the frontend shares it.
    fn log(len: u64) -> Arc<MmapLogReg> {
        let file = tempfile::tempfile().unwrap();
        file.set_len(len).unwrap();
        Arc::new(MmapLogReg::from_file(file.as_fd(), 0, len).unwrap())
    }

    #[test]
    fn writes_through_the_map_are_marked_only_while_logging_is_on() {
        let mem = GuestMap::from_ranges(&[(GuestAddress(0x10000), 0x10000)]).unwrap();
        let logmem = log(64);
        for region in mem.iter() {
            let range = LogRange::new(region, logmem.clone()).unwrap();
            (**region).bitmap().replace(range);
        }
        mem.write_obj(1u32, GuestAddress(0x10000)).unwrap();
        assert_eq!(logmem[2].load(Ordering::Relaxed), 0, "logging is off");
        set_logging(&mem, true);
        // Page 0x11 (byte 2, bit 1) and a write across pages 0x13-0x14.
        mem.write_obj(1u32, GuestAddress(0x11000)).unwrap();
        mem.write_slice(&[1; 8], GuestAddress(0x13ffc)).unwrap();
        assert_eq!(logmem[2].load(Ordering::Relaxed), 0b0001_1010);
        set_logging(&mem, false);
        mem.write_obj(1u32, GuestAddress(0x1f000)).unwrap();
        assert_eq!(logmem[3].load(Ordering::Relaxed), 0, "off again");
    }

    #[test]
    fn a_log_too_short_for_guest_memory_is_refused() {
        let mem = GuestMap::from_ranges(&[(GuestAddress(1 << 30), 0x10000)]).unwrap();
        let logmem = log(64);
        let region = mem.iter().next().unwrap();
        assert!(LogRange::new(region, logmem).is_err());
    }
}

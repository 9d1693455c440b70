//! Dirty-page logging for live migration (vhost-user spec, "Migration"): while the
//! frontend migrates the VM, every guest page the daemon writes is marked in a bitmap the
//! frontend shares with it (SET_LOG_BASE, one bit per 4 KiB of guest physical memory), so
//! that QEMU copies it again. `VHOST_F_LOG_ALL` in SET_FEATURES switches marking on (the
//! migration starts) and off (it ended or was cancelled).
//!
//! One [`DirtyLog`] per connection, and the daemon marks explicitly, by guest address,
//! where it writes guest memory:
//! - the device, through [`WriteLog`]: the data of reads, GET_ID strings and status bytes,
//!   after they are written (`corodev_devices::request::Completion`);
//! - the worker: each used element and the used index, after `add_used`;
//! - a ring stop (GET_VRING_BASE, the migration's switch-over): the whole used ring, which
//!   also covers the notification fields (`avail_event`, flags) the worker writes while
//!   it polls.
//!
//! Marking through the memory map's bitmap type instead (vm-memory calls it for every
//! write) made every guest memory access of the data path slower, logging or not (the
//! descriptor reads of virtio-queue became a third of a request's CPU time). Here, while
//! logging is off, a request costs one relaxed load.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use vhost::vhost_user::message::VhostUserLog;
use vhost_user_backend::bitmap::MmapLogReg;

use corodev_devices::request::WriteLog;

/// The log's page size (`VHOST_LOG_PAGE`), whatever the host's.
const LOG_PAGE: u64 = 4096;

/// A connection's dirty log: off and empty until the frontend sets a log base and turns
/// logging on.
#[derive(Default)]
pub struct DirtyLog {
    /// `VHOST_F_LOG_ALL` is acked: mark what is written.
    on: AtomicBool,
    /// The frontend's bitmap (SET_LOG_BASE).
    log: RwLock<Option<Arc<MmapLogReg>>>,
}

impl DirtyLog {
    /// SET_LOG_BASE: maps the frontend's log (its size already checked against `file`)
    /// and marks in it from now on. A log too short for guest memory up to `mem_end`
    /// (exclusive) is refused: the pages past it could not be marked, and the migrated
    /// guest would find them stale.
    pub fn set_base(&self, msg: &VhostUserLog, file: &File, mem_end: u64) -> std::io::Result<()> {
        let pages = msg.mmap_size.saturating_mul(8);
        if pages < mem_end.div_ceil(LOG_PAGE) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "dirty log of {} bytes does not cover guest memory up to {mem_end:#x}",
                    msg.mmap_size
                ),
            ));
        }
        let log = MmapLogReg::from_file(file.as_fd(), msg.mmap_offset, msg.mmap_size)?;
        *self.log.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(log));
        Ok(())
    }

    /// Switches marking on or off; true if that changed it.
    pub fn set_on(&self, on: bool) -> bool {
        self.on.swap(on, Ordering::AcqRel) != on
    }
}

impl WriteLog for DirtyLog {
    #[inline]
    fn logging(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Marks the pages of `gpa..gpa + len`; pages past the end of the log (a frontend
    /// that gave one too short for its memory) are not marked. Atomic: the frontend reads
    /// and clears the log concurrently.
    fn mark(&self, gpa: u64, len: u64) {
        if len == 0 || !self.logging() {
            return;
        }
        let log = self.log.read().unwrap_or_else(PoisonError::into_inner);
        let Some(log) = log.as_ref() else {
            return;
        };
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let Some(byte) = usize::try_from(page / 8).ok().filter(|&b| b < log.len()) else {
                break;
            };
            log[byte].fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(len: u64) -> (DirtyLog, File) {
        let file = tempfile::tempfile().unwrap();
        file.set_len(len).unwrap();
        let log = DirtyLog::default();
        log.set_base(&VhostUserLog::new(len, 0), &file, 0).unwrap();
        (log, file)
    }

    fn byte(file: &File, at: u64) -> u8 {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8];
        file.read_exact_at(&mut b, at).unwrap();
        b[0]
    }

    #[test]
    fn pages_are_marked_only_while_logging_is_on() {
        let (log, file) = logged(64);
        log.mark(0x11000, 4);
        assert_eq!(byte(&file, 2), 0, "logging is off");
        assert!(log.set_on(true));
        log.mark(0x11000, 4); // page 0x11: byte 2, bit 1
        log.mark(0x13ffc, 8); // pages 0x13 and 0x14: bits 3 and 4
        assert_eq!(byte(&file, 2), 0b0001_1010);
        assert!(!log.set_on(true), "no change");
        assert!(log.set_on(false));
        log.mark(0x1f000, 1);
        assert_eq!(byte(&file, 3), 0, "off again");
    }

    #[test]
    fn a_log_too_short_for_guest_memory_is_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(64).unwrap();
        let log = DirtyLog::default();
        let err = log
            .set_base(&VhostUserLog::new(64, 0), &file, 64 * 8 * 4096 + 1)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("does not cover guest memory up to 0x200001"),
            "{err}"
        );
        assert!(log
            .set_base(&VhostUserLog::new(64, 0), &file, 64 * 8 * 4096)
            .is_ok());
    }

    #[test]
    fn pages_past_the_log_are_not_marked() {
        let (log, file) = logged(1);
        log.set_on(true);
        log.mark(0x7000, 0x2000); // pages 7 (byte 0) and 8 (byte 1: past the log)
        assert_eq!(byte(&file, 0), 0b1000_0000);
        log.mark(u64::MAX - 10, 100); // no overflow, nothing in range
    }
}

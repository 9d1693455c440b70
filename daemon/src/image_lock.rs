//! Image locking: two servers must not write one image at the same time, and corodev must
//! exclude QEMU and qemu-storage-daemon as they exclude each other, so it takes QEMU's
//! locks, byte for byte (QEMU's `block/file-posix.c`, `locking=on`).
//!
//! **QEMU's scheme.** Each block-layer permission has a bit number `p`: consistent read 0,
//! write 1, write-unchanged 2, resize 3. A user holding permission `p` takes a shared OFD
//! read lock on byte `100 + p`; a user that does not let others have `p` takes one on byte
//! `200 + p`. Then it tests: for each `p` it holds, is byte `200 + p` locked by anyone
//! (someone refuses to share it)? For each `p` it refuses to share, is byte `100 + p`
//! locked (someone has it)? Every lock is a read lock, so the only conflicts are the
//! tests; an OFD lock belongs to the open file description and goes away with the process,
//! however it ends.
//!
//! **What corodev takes.** A writable export holds read and write and shares neither write
//! nor resize (it read the size once): what a writable QEMU disk takes. A read-only export
//! holds read and also refuses writers and resizers, so read-only exports of one image
//! coexist and exclude any writer. Locks are on a descriptor of their own, so the data
//! path's descriptors (O_DIRECT or not) are untouched.
//!
//! **Live migration.** Source and destination serve one image at the same time. QEMU opens
//! an incoming VM's images *inactive* (no write lock) and activates them when the guest
//! starts there, after the source inactivated its own at the switch-over. corodev does the
//! same with the events it sees: a daemon started with `--incoming` holds only the read
//! permission until the frontend starts a ring (the guest runs here now); a daemon gives
//! up write and its refusals when the guest leaves it: every ring stopped while dirty-page
//! logging was on (the switch-over of an outgoing migration), or the frontend hung up with
//! every ring stopped (a VM shut down, or a paused VM migrated away, about which QEMU
//! tells a stopped device nothing). It takes them again when a ring starts (the migration
//! failed or was cancelled, or a new VM). A ring start that cannot get the write lock is
//! refused, with the holder in the log, so no I/O is ever served without it; between
//! guests another writer may take the image, and then this daemon's next ring start is
//! the one refused.
//!
//! **Naming the holder.** `F_OFD_GETLK` reports a conflicting lock's pid only for classic
//! POSIX locks; for an OFD lock (what QEMU and corodev take) it reports -1. So the holder
//! is looked up in /proc: every process's `fdinfo` lists the locks held through each of its
//! descriptors. A process this one may not look at (another user, or a sandbox with
//! `ProtectProc=invisible`) stays anonymous, and the message says so.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// QEMU's `RAW_LOCK_PERM_BASE`: byte `100 + p` is locked by holders of permission `p`.
const PERM_BASE: i64 = 100;
/// QEMU's `RAW_LOCK_SHARED_BASE`: byte `200 + p` is locked by users refusing to share `p`.
const SHARED_BASE: i64 = 200;

/// QEMU's block-layer permissions, by bit number (`BLK_PERM_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    /// `BLK_PERM_CONSISTENT_READ`.
    Read = 0,
    /// `BLK_PERM_WRITE`.
    Write = 1,
    /// `BLK_PERM_WRITE_UNCHANGED`.
    WriteUnchanged = 2,
    /// `BLK_PERM_RESIZE`.
    Resize = 3,
}

impl Perm {
    const ALL: [Perm; 4] = [Perm::Read, Perm::Write, Perm::WriteUnchanged, Perm::Resize];

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// How the permission reads in a sentence.
    fn name(self) -> &'static str {
        match self {
            Perm::Read => "read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write-unchanged",
            Perm::Resize => "resize",
        }
    }
}

/// A set of [`Perm`]s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Perms(u8);

impl Perms {
    fn of(perms: &[Perm]) -> Perms {
        Perms(perms.iter().fold(0, |m, p| m | p.bit()))
    }

    fn has(self, p: Perm) -> bool {
        self.0 & p.bit() != 0
    }
}

/// Why an image cannot be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The image cannot be opened for locking.
    #[error("cannot open disk {path} to lock it: {source}; check the path and permissions")]
    Open {
        /// The image.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Another process uses the image in a way this export cannot share.
    #[error("disk {path} is locked: {holder} {conflict}; stop it first, or pass --lock off if something else keeps the writers apart")]
    Conflict {
        /// The image.
        path: PathBuf,
        /// Who holds the conflicting lock, as far as /proc tells.
        holder: String,
        /// What the conflict is, e.g. "has it open for writing".
        conflict: String,
    },
    /// The file system refused the lock operation itself.
    #[error("cannot lock disk {path}: {source}; its file system may not support OFD locks (pass --lock off)")]
    Fcntl {
        /// The image.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

/// The locks held on one image, for the daemon's lifetime.
pub struct ImageLock {
    file: File,
    path: PathBuf,
    readonly: bool,
    /// Whether the write permission (for a writable export) and the refusals are held.
    active: Mutex<bool>,
}

impl ImageLock {
    /// Locks `path` for an export that is `readonly` or not: active at once, or, for the
    /// destination of a migration (`incoming`), with only the read permission until
    /// [`activate`](Self::activate).
    pub fn acquire(path: &Path, readonly: bool, incoming: bool) -> Result<ImageLock, LockError> {
        let file = File::open(path).map_err(|source| LockError::Open {
            path: path.to_owned(),
            source,
        })?;
        let lock = ImageLock {
            file,
            path: path.to_owned(),
            readonly,
            active: Mutex::new(false),
        };
        lock.apply(Perms::default(), Perms::default(), lock.wanted(false))?;
        if !incoming {
            lock.activate()?;
        }
        Ok(lock)
    }

    /// The image this locks.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the full lock (write, refusals) is held.
    pub fn is_active(&self) -> bool {
        *self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The permissions held and the ones refused to others, active or not.
    fn wanted(&self, active: bool) -> (Perms, Perms) {
        match (active, self.readonly) {
            (false, _) => (Perms::of(&[Perm::Read]), Perms::default()),
            (true, false) => (
                Perms::of(&[Perm::Read, Perm::Write]),
                Perms::of(&[Perm::Write, Perm::Resize]),
            ),
            (true, true) => (
                Perms::of(&[Perm::Read]),
                Perms::of(&[Perm::Write, Perm::Resize]),
            ),
        }
    }

    /// Takes the full lock (idempotent). On a conflict nothing more than before is held.
    pub fn activate(&self) -> Result<(), LockError> {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        if *active {
            return Ok(());
        }
        let (held, refused) = self.wanted(false);
        self.apply(held, refused, self.wanted(true))?;
        *active = true;
        Ok(())
    }

    /// Gives up the write permission and the refusals, keeping read (idempotent).
    pub fn inactivate(&self) {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        if !*active {
            return;
        }
        let (held, refused) = self.wanted(true);
        let (keep_held, keep_refused) = self.wanted(false);
        self.release(held, refused, keep_held, keep_refused);
        *active = false;
    }

    /// Moves from holding `(held, refused)` to `want`: locks the new bytes, tests for
    /// conflicts, and on one releases what it added.
    fn apply(&self, held: Perms, refused: Perms, want: (Perms, Perms)) -> Result<(), LockError> {
        let (want_held, want_refused) = want;
        let result = self.lock_and_test(want_held, want_refused);
        if result.is_err() {
            self.release(want_held, want_refused, held, refused);
        }
        result
    }

    fn lock_and_test(&self, held: Perms, refused: Perms) -> Result<(), LockError> {
        for p in Perm::ALL {
            if held.has(p) {
                self.lock_byte(PERM_BASE + p as i64, p)?;
            }
            if refused.has(p) {
                self.lock_byte(SHARED_BASE + p as i64, p)?;
            }
        }
        for p in Perm::ALL {
            if held.has(p) && self.locked_by_other(SHARED_BASE + p as i64)? {
                return Err(self.conflict(
                    SHARED_BASE + p as i64,
                    format!("does not share {} access to it", p.name()),
                ));
            }
            if refused.has(p) && self.locked_by_other(PERM_BASE + p as i64)? {
                let what = match p {
                    Perm::Write => "has it open for writing".to_owned(),
                    other => format!("has {} access to it", other.name()),
                };
                return Err(self.conflict(PERM_BASE + p as i64, what));
            }
        }
        Ok(())
    }

    /// Unlocks what `(held, refused)` has and `(keep_held, keep_refused)` does not.
    fn release(&self, held: Perms, refused: Perms, keep_held: Perms, keep_refused: Perms) {
        for p in Perm::ALL {
            if held.has(p) && !keep_held.has(p) {
                self.unlock_byte(PERM_BASE + p as i64);
            }
            if refused.has(p) && !keep_refused.has(p) {
                self.unlock_byte(SHARED_BASE + p as i64);
            }
        }
    }

    fn lock_byte(&self, byte: i64, p: Perm) -> Result<(), LockError> {
        let mut fl = flock(libc::F_RDLCK, byte);
        match fcntl_lock(&self.file, libc::F_OFD_SETLK, &mut fl) {
            Ok(()) => Ok(()),
            // Only a write lock on the byte conflicts with our read lock; QEMU takes none,
            // so whoever did means to exclude everyone.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => Err(self
                .conflict(
                    byte,
                    format!("holds an exclusive lock on its {} byte", p.name()),
                )),
            Err(source) => Err(LockError::Fcntl {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn unlock_byte(&self, byte: i64) {
        let mut fl = flock(libc::F_UNLCK, byte);
        if let Err(e) = fcntl_lock(&self.file, libc::F_OFD_SETLK, &mut fl) {
            log::warn!("cannot unlock byte {byte} of {}: {e}", self.path.display());
        }
    }

    /// Whether another open file description holds a lock on `byte` (our own read locks
    /// never conflict with a test through the same description).
    fn locked_by_other(&self, byte: i64) -> Result<bool, LockError> {
        let mut fl = flock(libc::F_WRLCK, byte);
        fcntl_lock(&self.file, libc::F_OFD_GETLK, &mut fl).map_err(|source| LockError::Fcntl {
            path: self.path.clone(),
            source,
        })?;
        Ok(i32::from(fl.l_type) != libc::F_UNLCK)
    }

    fn conflict(&self, byte: i64, conflict: String) -> LockError {
        LockError::Conflict {
            path: self.path.clone(),
            holder: holders(&self.file, byte),
            conflict,
        }
    }
}

/// A one-byte lock request of `kind` at `byte`.
fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: `flock` is plain integers, for which all zeroes is a valid value (and what
    // OFD requests need in `l_pid`).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    // The lock types are 0..=2 and fit the C struct's short.
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn fcntl_lock(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: `fl` is a valid, exclusive `struct flock` for the call, which is what the
    // OFD lock commands read and (GETLK) write; the descriptor is open while `file` is.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Who holds a lock on `byte` of `file`'s inode, from every readable
/// `/proc/PID/fdinfo/FD` whose `lock:` lines cover it: "qemu-storage-d (pid 42)", or a
/// sentence saying nobody visible does.
fn holders(file: &File, byte: i64) -> String {
    let Ok(meta) = file.metadata() else {
        return "another process".into();
    };
    let dev = meta.dev();
    // The kernel prints the device as MAJOR:MINOR in hex (at least two digits), then the
    // inode in decimal.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let id = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let me = std::process::id();
    let mut found: Vec<String> = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return anonymous();
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_to_string(fd.path())
                .is_ok_and(|info| info.lines().any(|l| lock_line_covers(l, &id, byte)))
        });
        if holds {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push(format!("{} (pid {pid})", comm.trim()));
        }
    }
    if found.is_empty() {
        anonymous()
    } else {
        found.join(", ")
    }
}

fn anonymous() -> String {
    "another process (OFD locks report no pid, and none visible in /proc holds it)".into()
}

/// Whether an fdinfo line such as `lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:1234 100 100`
/// is a lock on inode `id` covering `byte`.
fn lock_line_covers(line: &str, id: &str, byte: i64) -> bool {
    let Some(rest) = line.strip_prefix("lock:") else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let Some(at) = fields.iter().position(|f| *f == id) else {
        return false;
    };
    let start = fields.get(at + 1).and_then(|s| s.parse::<i64>().ok());
    let end = fields.get(at + 2).map(|s| {
        if *s == "EOF" {
            Some(i64::MAX)
        } else {
            s.parse::<i64>().ok()
        }
    });
    matches!((start, end), (Some(s), Some(Some(e))) if s <= byte && byte <= e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 4096]).expect("write");
        (dir, path)
    }

    // OFD locks of one process conflict with each other when taken through different open
    // file descriptions, so two ImageLocks in this test stand for two processes.

    #[test]
    fn second_writer_refused_and_first_released_on_drop() {
        let (_d, path) = image();
        let first = ImageLock::acquire(&path, false, false).expect("first");
        let err = ImageLock::acquire(&path, false, false)
            .err()
            .expect("second writer refused");
        // The write permission check comes first: the first refuses to share write.
        assert!(
            matches!(&err, LockError::Conflict { conflict, .. } if conflict == "does not share write access to it"),
            "{err}"
        );
        drop(first);
        ImageLock::acquire(&path, false, false).expect("free once the first is gone");
    }

    #[test]
    fn readers_share_and_exclude_a_writer_both_ways() {
        let (_d, path) = image();
        let r1 = ImageLock::acquire(&path, true, false).expect("reader");
        let r2 = ImageLock::acquire(&path, true, false).expect("a second reader shares");
        assert!(ImageLock::acquire(&path, false, false).is_err());
        drop((r1, r2));
        let _w = ImageLock::acquire(&path, false, false).expect("writer");
        let err = ImageLock::acquire(&path, true, false)
            .err()
            .expect("reader refused");
        assert!(
            matches!(&err, LockError::Conflict { conflict, .. } if conflict == "has it open for writing"),
            "{err}"
        );
    }

    #[test]
    fn incoming_waits_for_the_source_to_inactivate() {
        let (_d, path) = image();
        let source = ImageLock::acquire(&path, false, false).expect("source");
        let dest = ImageLock::acquire(&path, false, true).expect("incoming holds read only");
        assert!(!dest.is_active());
        assert!(dest.activate().is_err(), "the source still writes");
        assert!(!dest.is_active());
        source.inactivate();
        dest.activate().expect("the source gave it up");
        assert!(source.activate().is_err(), "and cannot take it back now");
        assert!(dest.is_active() && !source.is_active());
        dest.inactivate();
        source.activate().expect("migrating back");
    }

    #[test]
    fn fdinfo_lock_lines() {
        let id = "fe:00:1234";
        let line = "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:1234 100 100";
        assert!(lock_line_covers(line, id, 100));
        assert!(!lock_line_covers(line, id, 101));
        assert!(!lock_line_covers(line, "fe:00:12345", 100));
        assert!(lock_line_covers(
            "lock:\t2: POSIX  ADVISORY  WRITE 77 fe:00:1234 0 EOF",
            id,
            201
        ));
        assert!(!lock_line_covers("pos:\t0", id, 100));
    }
}

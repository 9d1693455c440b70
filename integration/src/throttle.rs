//! A write-bandwidth limit on a server process: a cgroup v1 blkio cgroup of its own with
//! `blkio.throttle.write_bps_device` set for the block device that holds the image, so that
//! the server's O_DIRECT writes queue in the kernel while its reads pass at once. Tests use
//! it to keep writes in flight and let reads overtake them (restart tests). Boundary: the
//! cgroup's files and the device lookup; which process joins is
//! [`crate::Daemon::join_cgroup`]'s.
//!
//! Only direct I/O is throttled this way (buffered writes reach the disk later, from the
//! kernel's writeback threads, outside the cgroup), so the server must open the image with
//! O_DIRECT (corodev `--direct`), and the image must be on a real block device, not tmpfs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A blkio cgroup with a write limit on one device; removed on drop (its processes moved
/// back to the root cgroup first), also when a test panics.
pub struct WriteThrottle {
    dir: PathBuf,
    root: PathBuf,
    /// `MAJ:MIN` of the whole disk under the image.
    device: String,
    bytes_per_sec: u64,
}

impl WriteThrottle {
    /// A new cgroup limiting writes to the disk that holds `file` to `bytes_per_sec`.
    /// Panics with the reason if that cannot work here: no cgroup v1 blkio hierarchy, not
    /// root, or `file` not on a block device.
    pub fn new(file: &Path, bytes_per_sec: u64) -> WriteThrottle {
        assert!(
            bytes_per_sec > 0,
            "a zero limit means no limit to the kernel"
        );
        let root = blkio_root().unwrap_or_else(|| {
            panic!(
                "no cgroup v1 blkio hierarchy in /proc/self/mountinfo: this test throttles the \
                 server's writes with blkio.throttle.write_bps_device (mount one with \
                 `mount -t cgroup -o blkio cgroup /sys/fs/cgroup/blkio`)"
            )
        });
        let device = whole_disk(file);
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = root.join(format!(
            "corodev-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create the cgroup {} (this test needs root): {e}",
                dir.display()
            )
        });
        let t = WriteThrottle {
            dir,
            root,
            device,
            bytes_per_sec,
        };
        t.apply();
        t
    }

    /// The cgroup's `cgroup.procs` file, for [`crate::Daemon::join_cgroup`].
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// `MAJ:MIN` of the throttled disk.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The limit, bytes per second.
    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Sets the limit (again, after [`lift`](Self::lift)).
    pub fn apply(&self) {
        self.set(self.bytes_per_sec);
    }

    /// Removes the limit: writes already queued by the throttle are sent to the disk at
    /// once (the kernel reschedules the queue when the limit changes).
    pub fn lift(&self) {
        self.set(0);
    }

    fn set(&self, bps: u64) {
        let file = self.dir.join("blkio.throttle.write_bps_device");
        std::fs::write(&file, format!("{} {bps}", self.device)).unwrap_or_else(|e| {
            panic!(
                "cannot write {} {bps} to {}: {e}",
                self.device,
                file.display()
            )
        });
    }

    /// Waits up to `timeout` until the throttled disk has no request in flight
    /// (`/sys/dev/block/MAJ:MIN/inflight`); whether it got there. The disk is shared with
    /// the rest of the machine, so this is only a settle point, not a proof.
    pub fn wait_disk_idle(&self, timeout: Duration) -> bool {
        let file = PathBuf::from(format!("/sys/dev/block/{}/inflight", self.device));
        let deadline = Instant::now() + timeout;
        loop {
            let idle = std::fs::read_to_string(&file)
                .map(|s| s.split_whitespace().all(|n| n == "0"))
                .unwrap_or(true);
            if idle {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for WriteThrottle {
    fn drop(&mut self) {
        // A cgroup with processes in it cannot be removed: move any left (a server still
        // running when a test panicked) back to the root.
        let root_procs = self.root.join("cgroup.procs");
        for _ in 0..50 {
            let left = std::fs::read_to_string(self.procs()).unwrap_or_default();
            for pid in left.split_whitespace() {
                let _ = std::fs::write(&root_procs, pid);
            }
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: cannot remove the cgroup {}", self.dir.display());
    }
}

/// Where the cgroup v1 hierarchy with the blkio controller is mounted, from
/// /proc/self/mountinfo (`... MOUNTPOINT ... - cgroup SOURCE ...,blkio,...`).
fn blkio_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let mut fs = fs.split_whitespace();
        let (fstype, _source, options) = (fs.next()?, fs.next()?, fs.next()?);
        if fstype != "cgroup" || !options.split(',').any(|o| o == "blkio") {
            return None;
        }
        mount.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// `MAJ:MIN` of the whole disk holding `file` (a partition's parent disk: the throttle
/// accepts only whole disks). Panics if `file` is not on a block device (tmpfs, overlay).
fn whole_disk(file: &Path) -> String {
    let dev = std::fs::metadata(file)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", file.display()))
        .dev();
    let id = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{id}"));
    let sys = std::fs::canonicalize(&sys).unwrap_or_else(|e| {
        panic!(
            "{} is on device {id}, which is not a block device ({}: {e}); a write throttle \
             needs the image on a disk-backed file system, not tmpfs",
            file.display(),
            sys.display()
        )
    });
    if !sys.join("partition").exists() {
        return id;
    }
    let parent = sys.parent().map(|p| p.join("dev"));
    parent
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("cannot find the disk of partition {}", sys.display()))
}

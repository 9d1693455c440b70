//! A throw-away Ceph cluster for the RBD tests: `scripts/ceph-cluster.sh up` in a temp dir,
//! `down` on drop, plus the `rbd` CLI calls a test needs to make an image and read it back
//! on the host (no kernel RBD mapping: the host check goes through librbd's own tool, never
//! through corodev). Boundary: the cluster's processes and the `rbd` tool; corodev itself
//! is started by [`crate::Daemon::corodev_rbd`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::workspace::{on_path, workspace};

/// What a missing Ceph tool's failure says.
pub const CEPH_HINT: &str = "run `bash scripts/install-deps.sh` (as root) to install Ceph \
     (ceph-mon, ceph-mgr, ceph-osd, ceph-common) and librbd1";

/// A single-node cluster (monitor, manager, one OSD) with pool `rbd`, torn down on drop.
pub struct CephCluster {
    dir: tempfile::TempDir,
    /// The cluster's configuration file (with client.admin's keyring), for `--ceph-conf`.
    pub conf: PathBuf,
    /// How long `up` took, for the notes.
    pub bring_up: std::time::Duration,
}

impl CephCluster {
    /// Brings a cluster up (about 15 s), under target/ (bluestore's O_DIRECT needs a real
    /// file system, not tmpfs). Panics with the script's output if it fails.
    pub fn up() -> CephCluster {
        assert!(
            on_path("ceph-mon") && on_path("rbd"),
            "Ceph is not installed: {CEPH_HINT}"
        );
        let base = workspace().join("target/ceph");
        std::fs::create_dir_all(&base)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", base.display()));
        let dir = tempfile::tempdir_in(&base)
            .unwrap_or_else(|e| panic!("cannot make a temp dir in {}: {e}", base.display()));
        let cluster_dir = dir.path().join("c");
        // A port of its own, so clusters of concurrent tests do not meet.
        let port = 20000 + (std::process::id() % 20000);
        let start = Instant::now();
        let out = Command::new("bash")
            .arg(workspace().join("scripts/ceph-cluster.sh"))
            .arg("up")
            .arg(&cluster_dir)
            .env("CEPH_MON_PORT", port.to_string())
            .output()
            .unwrap_or_else(|e| panic!("cannot run scripts/ceph-cluster.sh: {e}"));
        let bring_up = start.elapsed();
        let cluster = CephCluster {
            conf: cluster_dir.join("ceph.conf"),
            dir,
            bring_up,
        };
        assert!(
            out.status.success(),
            "ceph-cluster.sh up failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(
            Path::new(&printed),
            cluster.conf,
            "ceph-cluster.sh prints the conf path"
        );
        cluster
    }

    /// Runs `rbd -c <conf> args...`; panics with its stderr if it fails; returns stdout.
    pub fn rbd(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run rbd: {e}; {CEPH_HINT}"));
        assert!(
            out.status.success(),
            "rbd {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Creates image `name` of `size_mib` MiB in pool `rbd`.
    pub fn create_image(&self, name: &str, size_mib: u64) {
        self.rbd(&[
            "create",
            "--size",
            &format!("{size_mib}M"),
            &format!("rbd/{name}"),
        ]);
    }

    /// The whole image `name`, read through librbd (`rbd export` to stdout).
    pub fn export(&self, name: &str) -> Vec<u8> {
        self.rbd(&["export", "--no-progress", &format!("rbd/{name}"), "-"])
    }

    /// The OSD's pid (its pid file).
    pub fn osd_pid(&self) -> libc::pid_t {
        std::fs::read_to_string(self.dir().join("run/osd.0.pid"))
            .expect("OSD pid file")
            .trim()
            .parse()
            .expect("a pid in the OSD pid file")
    }

    /// Kills the OSD (SIGKILL, a crash), waits until it is gone, leaves it down for
    /// `down`, and starts it again on the same store (bluestore keeps the data); returns
    /// once the new process has daemonized.
    pub fn crash_and_restart_osd(&self, down: std::time::Duration) {
        let pid = self.osd_pid();
        // SAFETY: a signal to the OSD this cluster started; no memory involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill the OSD");
        let t0 = std::time::Instant::now();
        // SAFETY: as above; signal 0 only checks that the process exists.
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "the OSD is still there 10 s after SIGKILL"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(down);
        let status = Command::new("ceph-osd")
            .arg("-c")
            .arg(&self.conf)
            .args(["-i", "0"])
            .status()
            .unwrap_or_else(|e| panic!("cannot run ceph-osd: {e}; {CEPH_HINT}"));
        assert!(status.success(), "restarting the OSD: {status}");
    }

    /// The cluster's directory (logs under `log/`).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().join("c")
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(workspace().join("scripts/ceph-cluster.sh"))
            .arg("down")
            .arg(self.dir())
            .status();
    }
}

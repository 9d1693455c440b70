//! Shared helpers for the daemon's end-to-end tests.

#![allow(dead_code)] // Each test binary uses a different subset.

pub mod frontend;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running vhost-user-blk server on a temp image: corodev by default, or QEMU's
/// qemu-storage-daemon with `CORODEV_TEST_SERVER=qsd` (to check the tests themselves).
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

pub const IMAGE_SIZE: u64 = 64 << 20;

impl Server {
    pub fn start(extra: &[&str]) -> Server {
        Server::start_in(tempfile::tempdir().expect("tempdir"), extra)
    }

    /// Like [`start`](Self::start), with the image (and socket) in `dir`.
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Server {
        let socket = dir.path().join("blk.sock");
        let image = dir.path().join("disk.img");
        let log = dir.path().join("server.log");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(IMAGE_SIZE))
            .expect("create image");
        let logf = std::fs::File::create(&log).expect("log file");
        let qsd = std::env::var("CORODEV_TEST_SERVER").is_ok_and(|v| v == "qsd");
        let mut cmd = if qsd {
            let ro = extra.contains(&"--readonly");
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev").arg(format!(
                "driver=file,node-name=f,filename={},read-only={}",
                image.display(),
                if ro { "on" } else { "off" }
            ));
            c.arg("--export").arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable={}",
                socket.display(),
                if ro { "off" } else { "on" }
            ));
            c
        } else {
            let mut c = Command::new(env!("CARGO_BIN_EXE_corodev"));
            c.arg("--socket").arg(&socket).arg("--disk").arg(&image);
            c.args(["--queue-size", "128", "--serial", "corodev-test-serial"]);
            c.args(extra);
            c.env("RUST_LOG", "debug");
            c
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start server");
        let mut server = Server {
            child,
            socket,
            image,
            log,
            _dir: dir,
        };
        server.wait_socket();
        server
    }

    fn wait_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("server exited early ({status}): {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "no socket after 10 s: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asserts the server process is still running.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("server died ({status}): {}", self.log_text());
        }
    }

    /// CPU seconds (user + system) the server has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("server /proc stat");
        // Fields after the ")" closing the command name: state is field 3; utime 14, stime 15.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 =
            f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
        // SAFETY: sysconf has no preconditions.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    /// Asserts the server is not burning CPU while the guest does nothing (a guest must
    /// not be able to make a worker spin).
    pub fn assert_idle(&mut self) {
        std::thread::sleep(Duration::from_millis(200));
        let before = self.cpu_seconds();
        std::thread::sleep(Duration::from_millis(500));
        let used = self.cpu_seconds() - before;
        assert!(
            used < 0.2,
            "server used {used:.2} CPU-s in 0.5 s of guest idleness"
        );
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

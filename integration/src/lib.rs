//! Test harness for corodev's end-to-end tests: start a vhost-user-blk server on an image,
//! boot a real Linux guest (QEMU, `scripts/run-vm.sh`) that runs one test through the
//! kernel's virtio_blk driver, and parse the results it prints on the serial console.
//!
//! [`frontend`] is a second, protocol-level client: it speaks vhost-user itself with
//! hand-built rings, for the hostile-guest and hostile-frontend tests.
//!
//! Nothing here is skipped silently: a missing QEMU, kernel or daemon binary is a test
//! failure with a message saying how to get it. Guests are serialised (one at a time):
//! under TCG on a 2-core machine two guests would only make each other time out.

pub mod frontend;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The workspace root (parent of this crate).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}

/// One guest at a time.
static GUEST: Mutex<()> = Mutex::new(());

fn guest_lock() -> MutexGuard<'static, ()> {
    GUEST
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Which server the tests run against: corodev, or QEMU's own qemu-storage-daemon when
/// `CORODEV_TEST_SERVER=qsd` (to check that a failure is corodev's and not the test's).
fn use_qsd() -> bool {
    std::env::var("CORODEV_TEST_SERVER").is_ok_and(|v| v == "qsd")
}

/// The corodev binary under test: `$CORODEV_BIN`, else target/release/corodev.
pub fn corodev_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CORODEV_BIN") {
        return PathBuf::from(p);
    }
    let p = workspace().join("target/release/corodev");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release --bin corodev` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A raw image file in a temp dir, removed on drop.
pub struct Image {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

/// The image size of [`Daemon::with_image`]: 64 MiB.
pub const TEST_IMAGE_SIZE: u64 = 64 << 20;

impl Image {
    /// A sparse image of `size` bytes. Kept under target/ rather than /tmp: tmpfs refuses
    /// O_DIRECT.
    pub fn new(size: u64) -> Image {
        let base = workspace().join("target/test-images");
        std::fs::create_dir_all(&base).expect("create target/test-images");
        Image::new_in(tempfile::tempdir_in(base).expect("temp dir"), size)
    }

    /// A sparse image of `size` bytes in `dir` (which the image then owns).
    pub fn new_in(dir: tempfile::TempDir, size: u64) -> Image {
        let path = dir.path().join("disk.img");
        File::create(&path)
            .and_then(|f| f.set_len(size))
            .expect("create image");
        Image { path, _dir: dir }
    }

    /// `len` bytes at `offset`, as the host sees them.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = File::open(&self.path).expect("open image");
        f.seek(SeekFrom::Start(offset)).expect("seek");
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).expect("read image");
        buf
    }

    /// Hex md5 of `len` bytes at `offset`.
    pub fn md5(&self, offset: u64, len: usize) -> String {
        format!("{:x}", md5::compute(self.read(offset, len)))
    }
}

/// A running vhost-user-blk server, killed on drop.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
    /// The image, when the daemon owns it ([`Daemon::with_image`]).
    pub image: Option<Image>,
}

impl Daemon {
    /// Starts corodev (or qemu-storage-daemon, see [`use_qsd`]) serving `image`, with
    /// extra corodev options.
    pub fn start(image: &Image, args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("blk.sock");
        let log = dir.path().join("daemon.log");
        let logf = File::create(&log).expect("log file");
        let mut cmd = if use_qsd() {
            let ro = args.contains(&"--readonly");
            let nq = args
                .iter()
                .position(|a| *a == "--num-queues")
                .and_then(|i| args.get(i + 1))
                .copied()
                .unwrap_or("1");
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev").arg(format!(
                "driver=file,node-name=f,filename={},aio=io_uring,read-only={}",
                image.path.display(),
                if ro { "on" } else { "off" }
            ));
            c.arg("--export").arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable={},num-queues={nq}",
                socket.display(),
                if ro { "off" } else { "on" }
            ));
            c
        } else {
            let mut c = Command::new(corodev_bin());
            c.arg("--socket")
                .arg(&socket)
                .arg("--disk")
                .arg(&image.path);
            c.args(args);
            c
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start the server ({e}); run scripts/install-deps.sh")
            });
        let mut d = Daemon {
            child,
            socket,
            log,
            _dir: dir,
            image: None,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.socket.exists() {
            d.assert_alive();
            assert!(
                Instant::now() < deadline,
                "no socket after 10 s: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// A daemon on its own fresh [`TEST_IMAGE_SIZE`] image, with a 128-entry queue and the
    /// serial `corodev-test-serial` (what the protocol-level tests expect).
    pub fn with_image(args: &[&str]) -> Daemon {
        Daemon::own(Image::new(TEST_IMAGE_SIZE), args)
    }

    /// Like [`with_image`](Self::with_image), with the image in `dir`.
    pub fn with_image_in(dir: tempfile::TempDir, args: &[&str]) -> Daemon {
        Daemon::own(Image::new_in(dir, TEST_IMAGE_SIZE), args)
    }

    fn own(image: Image, args: &[&str]) -> Daemon {
        let mut all = vec!["--queue-size", "128", "--serial", "corodev-test-serial"];
        all.extend_from_slice(args);
        let mut d = Daemon::start(&image, &all);
        d.image = Some(image);
        d
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds (user + system) the server has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("server /proc stat");
        // Fields after the ")" closing the command name start at field 3: utime is 14, stime 15.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
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

    /// The server's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with its log) if the server exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("server exited ({status}); log:\n{}", self.log_text());
        }
    }

    /// Boots a guest against this server; see [`Guest`].
    pub fn boot(&self, guest: Guest<'_>) -> GuestRun {
        guest.run(&self.socket)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What to boot: the guest test to run (scripts/guest-init.sh) and the VM shape.
pub struct Guest<'a> {
    pub test: &'a str,
    pub arg: Option<&'a str>,
    pub queues: u16,
    pub smp: u16,
    pub timeout: Duration,
}

impl<'a> Guest<'a> {
    /// One vCPU, one queue, a 3-minute limit (TCG is slow).
    pub fn test(test: &'a str) -> Guest<'a> {
        Guest {
            test,
            arg: None,
            queues: 1,
            smp: 1,
            timeout: Duration::from_secs(180),
        }
    }

    fn run(&self, socket: &Path) -> GuestRun {
        let _one_at_a_time = guest_lock();
        let script = workspace().join("scripts/run-vm.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg("--socket")
            .arg(socket)
            .args(["--test", self.test])
            .args(["--queues", &self.queues.to_string()])
            .args(["--smp", &self.smp.to_string()])
            .args(["--timeout", &self.timeout.as_secs().to_string()]);
        if let Some(a) = self.arg {
            cmd.args(["--arg", a]);
        }
        let started = Instant::now();
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let console = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        GuestRun {
            results: parse_results(&console),
            console,
            elapsed: started.elapsed(),
        }
    }
}

/// One `CORODEV-RESULT` or `CORODEV-INFO` line: its `key=value` fields.
#[derive(Debug, Clone)]
pub struct GuestLine {
    pub kind: String,
    pub fields: HashMap<String, String>,
}

impl GuestLine {
    /// A field's value, or "" if absent.
    pub fn get(&self, key: &str) -> &str {
        self.fields.get(key).map_or("", String::as_str)
    }
}

/// What a guest printed.
pub struct GuestRun {
    pub console: String,
    pub results: Vec<GuestLine>,
    pub elapsed: Duration,
}

impl GuestRun {
    /// The test's result line; panics with the console if there is none or it failed.
    pub fn expect_pass(&self) -> &GuestLine {
        let r = self
            .results
            .iter()
            .find(|l| l.kind == "CORODEV-RESULT")
            .unwrap_or_else(|| panic!("guest printed no result; console:\n{}", self.console));
        assert_eq!(
            r.get("status"),
            "PASS",
            "guest test failed; console:\n{}",
            self.console
        );
        r
    }

    /// The guest's `CORODEV-INFO` line (device as the guest kernel sees it).
    pub fn info(&self) -> &GuestLine {
        self.results
            .iter()
            .find(|l| l.kind == "CORODEV-INFO")
            .unwrap_or_else(|| panic!("guest printed no info; console:\n{}", self.console))
    }
}

/// Parses `CORODEV-RESULT k=v ...` / `CORODEV-INFO k=v ...` lines from a console log.
pub fn parse_results(console: &str) -> Vec<GuestLine> {
    console
        .lines()
        .filter_map(|line| {
            let start = line.find("CORODEV-")?;
            let mut words = line[start..].split_whitespace();
            let kind = words.next()?.to_owned();
            if kind != "CORODEV-RESULT" && kind != "CORODEV-INFO" {
                return None;
            }
            let fields = words
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            Some(GuestLine { kind, fields })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines_amid_console_noise() {
        let log = "[    1.0] boot\n\x1b[2JCORODEV-INFO size=8 ro=0\nCORODEV-RESULT name=pattern status=PASS md5=ab\n";
        let r = parse_results(log);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].get("size"), "8");
        assert_eq!(r[1].get("status"), "PASS");
        assert_eq!(r[1].get("md5"), "ab");
        assert_eq!(r[1].get("missing"), "");
    }
}

//! Test harness for corodev's end-to-end tests: start a vhost-user-blk server on an image
//! ([`Daemon`]), boot a real Linux guest under QEMU against its socket ([`Vm`], through
//! `scripts/run-vm.sh`) that runs one test through the kernel's virtio_blk driver, and parse
//! the `CORODEV-*` lines it prints on the serial console ([`GuestRun`], [`GuestLine`]).
//! [`Image`] makes the disk image and reads it back, so a test can check on the host what
//! the guest wrote.
//!
//! [`frontend`] is a second, protocol-level client: it speaks vhost-user itself with
//! hand-built rings, for the hostile-guest and hostile-frontend tests.
//!
//! Boundary: this crate only drives processes (the corodev binary, qemu-storage-daemon,
//! QEMU) and files; it links none of corodev's code. The guest side (what each test does
//! inside the VM and what it prints) lives in `scripts/guest-init.sh`, the QEMU command
//! line in `scripts/run-vm.sh`, the guest image in `scripts/build-guest.sh`.
//!
//! The server under test is corodev unless `CORODEV_TEST_SERVER=qsd` selects QEMU's own
//! qemu-storage-daemon ([`Server::from_env`]): running the same tests against the reference
//! implementation tells a corodev bug from a test bug.
//!
//! Nothing here is skipped silently: a missing QEMU, kernel or daemon binary is a test
//! failure with a message saying how to get it. Guests are serialised (one at a time):
//! under TCG on a 2-core machine two guests would only make each other time out.

pub mod frontend;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root (parent of this crate).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}

/// One guest at a time (see the crate docs). Held by a [`Vm`] for its whole life.
static GUEST: Mutex<()> = Mutex::new(());

fn guest_lock() -> MutexGuard<'static, ()> {
    GUEST
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The advice every "missing tool" failure carries.
const INSTALL_HINT: &str = "run `bash scripts/install-deps.sh` (as root) to install QEMU, \
     the guest kernel, busybox-static, fio and e2fsprogs";

/// Which vhost-user-blk server the tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// The corodev binary under test ([`corodev_bin`]).
    Corodev,
    /// QEMU's `qemu-storage-daemon` with a vhost-user-blk export: the reference server, to
    /// check that a failing test fails because of corodev and not because of the test.
    Qsd,
}

impl Server {
    /// `CORODEV_TEST_SERVER`: unset, empty or `corodev` is corodev, `qsd` is
    /// qemu-storage-daemon. Anything else panics, so a typo cannot silently test the wrong
    /// server.
    pub fn from_env() -> Server {
        match std::env::var("CORODEV_TEST_SERVER").as_deref() {
            Err(_) | Ok("") | Ok("corodev") => Server::Corodev,
            Ok("qsd") => Server::Qsd,
            Ok(other) => panic!("CORODEV_TEST_SERVER={other:?}: expected `corodev` or `qsd`"),
        }
    }
}

/// The corodev binary under test: `$CORODEV_BIN`, else `target/release/corodev`, else
/// `target/debug/corodev`. Panics with the build command if none exists, because a test
/// that silently ran against nothing would prove nothing.
pub fn corodev_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CORODEV_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "CORODEV_BIN={} does not exist; unset it or build corodev there",
            p.display()
        );
        return p;
    }
    let target = workspace().join("target");
    let candidates = [target.join("release/corodev"), target.join("debug/corodev")];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no corodev binary at {} or {}: run `cargo build --release --bin corodev` \
                 first (scripts/test.sh does), or set CORODEV_BIN; or set \
                 CORODEV_TEST_SERVER=qsd to run against qemu-storage-daemon",
                candidates[0].display(),
                candidates[1].display()
            )
        })
}

/// Whether `name` is an executable file in a `$PATH` directory.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// The guest's kernel and initramfs, as built by `scripts/build-guest.sh`.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    /// Copy of the Debian cloud kernel (`target/guest/vmlinuz`).
    pub kernel: PathBuf,
    /// The test initramfs (`target/guest/initramfs.cpio.gz`).
    pub initrd: PathBuf,
}

/// Builds the guest image if needed (the script caches it) and checks that QEMU is
/// installed. Runs once per test process; every caller after a failure panics with the
/// same message. Never skips: without QEMU or the kernel the guest tests cannot mean
/// anything, so they fail and say how to fix it.
pub fn guest_artifacts() -> &'static GuestArtifacts {
    static ARTIFACTS: OnceLock<Result<GuestArtifacts, String>> = OnceLock::new();
    let found = ARTIFACTS.get_or_init(|| {
        if !on_path("qemu-system-x86_64") {
            return Err(format!("qemu-system-x86_64 is not on PATH: {INSTALL_HINT}"));
        }
        let script = workspace().join("scripts/build-guest.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let paths: Vec<&str> = stdout.lines().collect();
        match (out.status.success(), paths.as_slice()) {
            (true, [kernel, initrd]) => Ok(GuestArtifacts {
                kernel: PathBuf::from(kernel),
                initrd: PathBuf::from(initrd),
            }),
            _ => Err(format!(
                "{} failed ({}): {}\n{INSTALL_HINT}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    });
    match found {
        Ok(artifacts) => artifacts,
        Err(why) => panic!("the test guest is not available: {why}"),
    }
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
        std::fs::create_dir_all(&base)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", base.display()));
        let dir = tempfile::tempdir_in(&base)
            .unwrap_or_else(|e| panic!("cannot make a temp dir in {}: {e}", base.display()));
        Image::new_in(dir, size)
    }

    /// A sparse image of `size` bytes in `dir` (which the image then owns).
    pub fn new_in(dir: tempfile::TempDir, size: u64) -> Image {
        let path = dir.path().join("disk.img");
        File::create(&path)
            .and_then(|f| f.set_len(size))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Image { path, _dir: dir }
    }

    /// `len` bytes at `offset`, as the host sees them.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(&self.path)
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(offset))?;
                f.read_exact(&mut buf)
            })
            .unwrap_or_else(|e| {
                panic!(
                    "cannot read {len} bytes at {offset} of {}: {e}",
                    self.path.display()
                )
            });
        buf
    }

    /// Hex md5 of `len` bytes at `offset` (what the guest's `pattern` test prints).
    pub fn md5(&self, offset: u64, len: usize) -> String {
        format!("{:x}", md5::compute(self.read(offset, len)))
    }
}

/// A running vhost-user-blk server, killed on drop.
pub struct Daemon {
    child: Child,
    kind: Server,
    pub socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
    /// The image, when the daemon owns it ([`Daemon::with_image`]).
    pub image: Option<Image>,
}

/// How long a server may take to listen on its socket.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

impl Daemon {
    /// Starts the server [`Server::from_env`] selects on `image`, with corodev options
    /// (translated for qemu-storage-daemon, see [`Daemon::qsd`]).
    pub fn start(image: &Image, args: &[&str]) -> Daemon {
        match Server::from_env() {
            Server::Corodev => Daemon::corodev(image, args),
            Server::Qsd => Daemon::qsd(image, args),
        }
    }

    /// Starts corodev ([`corodev_bin`]) with `--socket <temp> --disk <image>` and `args`.
    pub fn corodev(image: &Image, args: &[&str]) -> Daemon {
        let (dir, socket) = socket_dir();
        let mut cmd = Command::new(corodev_bin());
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(&image.path)
            .args(args);
        Daemon::spawn(Server::Corodev, cmd, dir, socket)
    }

    /// Starts qemu-storage-daemon exporting `image` over vhost-user-blk. `args` are corodev
    /// options; those with a qsd equivalent are translated (`--readonly`, `--num-queues`,
    /// `--block-size`, `--direct`, `--backend null` with `--size`), the rest only tune
    /// corodev or have no qsd counterpart (`--serial`, `--threads`, `--queue-size`, ...)
    /// and are ignored, so a test that checks them must check [`Daemon::kind`] first.
    pub fn qsd(image: &Image, args: &[&str]) -> Daemon {
        let value = |name: &str| {
            args.iter()
                .position(|a| *a == name)
                .and_then(|i| args.get(i + 1))
                .copied()
        };
        let ro = args.contains(&"--readonly");
        let direct = if args.contains(&"--direct") {
            "on"
        } else {
            "off"
        };
        let blockdev = if value("--backend") == Some("null") {
            let size = value("--size").expect("--backend null needs --size");
            format!("driver=null-co,node-name=f,read-zeroes=on,size={size}")
        } else {
            format!(
                "driver=file,node-name=f,filename={},aio=io_uring,cache.direct={direct},read-only={}",
                image.path.display(),
                if ro { "on" } else { "off" }
            )
        };
        let (dir, socket) = socket_dir();
        let mut export = format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable={},num-queues={}",
            socket.display(),
            if ro { "off" } else { "on" },
            value("--num-queues").unwrap_or("1"),
        );
        if let Some(bs) = value("--block-size") {
            export.push_str(&format!(",logical-block-size={bs}"));
        }
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(blockdev)
            .arg("--export")
            .arg(export);
        Daemon::spawn(Server::Qsd, cmd, dir, socket)
    }

    /// Spawns `cmd` with its stderr in a log file and waits until it listens on `socket`.
    fn spawn(kind: Server, mut cmd: Command, dir: tempfile::TempDir, socket: PathBuf) -> Daemon {
        let log = dir.path().join("daemon.log");
        let logf =
            File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| match kind {
                Server::Corodev => panic!("cannot start {program}: {e}"),
                Server::Qsd => panic!("cannot start {program}: {e}; {INSTALL_HINT}"),
            });
        let mut d = Daemon {
            child,
            kind,
            socket,
            log,
            _dir: dir,
            image: None,
        };
        d.wait_listening();
        d
    }

    /// Waits until the socket file exists and the server has a listening unix socket.
    /// Listening is read from /proc (the server's fds against /proc/net/unix) rather than
    /// probed with a connect: a probe connection would be a real vhost-user session to the
    /// server (and count in its connection log). The path in /proc/net/unix cannot be
    /// used: corodev binds a temporary name and renames it into place.
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !(self.socket.exists() && has_listening_unix_socket(self.pid())) {
            self.assert_alive();
            assert!(
                Instant::now() < deadline,
                "{:?} is not listening on {} after {LISTEN_TIMEOUT:?}; log:\n{}",
                self.kind,
                self.socket.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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

    /// Which server this is.
    pub fn kind(&self) -> Server {
        self.kind
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
            panic!(
                "{:?} server exited ({status}); log:\n{}",
                self.kind,
                self.log_text()
            );
        }
    }

    /// Boots a guest against this server and waits for it; see [`Vm`]. If the server
    /// exits meanwhile the VM is killed at once (its guest would only hang on I/O until its
    /// timeout). The run carries the server's log, which [`GuestRun::expect_pass`] prints
    /// on failure.
    pub fn boot(&mut self, guest: Guest<'_>) -> GuestRun {
        let vm = Vm::start(&self.socket, &guest);
        let mut run = vm.wait_while(|| match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("the {:?} server exited ({status})", self.kind)),
            _ => None,
        });
        run.server_log = Some(self.log_text());
        run
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh temp dir for a server's socket and log. Under /tmp: a unix socket path must fit
/// in 108 bytes, which a path under the workspace may not.
fn socket_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("corodev-test-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
    let socket = dir.path().join("blk.sock");
    (dir, socket)
}

/// Whether process `pid` holds a listening unix socket: one of its fds is a socket whose
/// inode /proc/net/unix lists with `__SO_ACCEPTCON` in the flags column.
fn has_listening_unix_socket(pid: u32) -> bool {
    const SO_ACCEPTCON: u32 = 1 << 16;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return true; // no /proc: fall back to the socket file alone
    };
    let listening: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(cols.get(3)?, 16).ok()?;
            (flags & SO_ACCEPTCON != 0).then_some(*cols.get(6)?)
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .is_some_and(|inode| listening.contains(&inode))
        })
    })
}

/// What to boot: the guest test to run (see `scripts/guest-init.sh`) and the VM shape.
#[derive(Debug, Clone)]
pub struct Guest<'a> {
    /// `corodev.test=`: info, pattern, fio, mq, ext4, readonly, discard.
    pub test: &'a str,
    /// `corodev.arg=` (fio/mq: number of jobs).
    pub arg: Option<&'a str>,
    /// Virtqueues of the vhost-user-blk-pci device.
    pub queues: u16,
    /// vCPUs. Linux uses min(vCPUs, queues) queues, so multi-queue tests need both.
    pub smp: u16,
    /// Limit for boot + test; the VM is killed past it.
    pub timeout: Duration,
}

impl<'a> Guest<'a> {
    /// One vCPU, one queue, a 3-minute limit: a TCG boot takes ~5-10 s and the fio tests
    /// ~10 s more, but a loaded 2-core machine can be several times slower.
    pub fn test(test: &'a str) -> Guest<'a> {
        Guest {
            test,
            arg: None,
            queues: 1,
            smp: 1,
            timeout: Duration::from_secs(180),
        }
    }

    /// With `queues` virtqueues and as many vCPUs.
    pub fn queues(mut self, queues: u16) -> Guest<'a> {
        self.queues = queues;
        self.smp = queues;
        self
    }
}

/// Exit status of `scripts/run-vm.sh` when QEMU hit its timeout.
const RUN_VM_TIMEOUT: i32 = 3;
/// Extra time the harness gives run-vm.sh beyond the guest's own limit: building the guest
/// image the first time and the accelerator probe happen before QEMU starts.
const SETUP_GRACE: Duration = Duration::from_secs(120);

/// A booted guest: `scripts/run-vm.sh` with its console in a file. Holds the one-guest
/// lock; killed (with QEMU, its whole process group) on drop, so a panicking test leaves no
/// VM behind.
pub struct Vm {
    child: Child,
    console: PathBuf,
    test: String,
    started: Instant,
    deadline: Instant,
    _dir: tempfile::TempDir,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl Vm {
    /// Boots `guest` against the vhost-user socket `socket`. Waits for any other guest of
    /// this process to finish first.
    pub fn start(socket: &Path, guest: &Guest<'_>) -> Vm {
        let artifacts = guest_artifacts();
        assert!(
            artifacts.kernel.is_file() && artifacts.initrd.is_file(),
            "guest kernel or initramfs missing ({artifacts:?}); {INSTALL_HINT}"
        );
        let lock = guest_lock();
        let dir = tempfile::Builder::new()
            .prefix("corodev-vm-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let console = dir.path().join("console.log");
        let out = File::create(&console)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", console.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot dup the console file: {e}"));
        let script = workspace().join("scripts/run-vm.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg("--socket")
            .arg(socket)
            .args(["--test", guest.test])
            .args(["--queues", &guest.queues.to_string()])
            .args(["--smp", &guest.smp.to_string()])
            .args(["--timeout", &guest.timeout.as_secs().max(1).to_string()]);
        if let Some(a) = guest.arg {
            cmd.args(["--arg", a]);
        }
        // Its own process group, so Drop can kill QEMU and timeout(1) along with bash.
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        Vm {
            child,
            console,
            test: guest.test.to_owned(),
            started,
            deadline: started + guest.timeout + SETUP_GRACE,
            _dir: dir,
            _one_at_a_time: lock,
        }
    }

    /// The console so far (serial output, then run-vm.sh's one-line verdict).
    pub fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits for the guest to power off (or be killed at its timeout) and returns what it
    /// printed. Does not judge the result: see [`GuestRun::expect_pass`].
    pub fn wait(self) -> GuestRun {
        self.wait_while(|| None)
    }

    /// Like [`wait`](Self::wait), but kills the VM early when `abort` (polled every 50 ms)
    /// returns a reason, which the run then reports.
    pub fn wait_while(mut self, mut abort: impl FnMut() -> Option<String>) -> GuestRun {
        let mut aborted = None;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= self.deadline => {
                    self.kill();
                    break None;
                }
                Ok(None) => {
                    if let Some(why) = abort() {
                        self.kill();
                        aborted = Some(why);
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot wait for the VM: {e}"),
            }
        };
        let console = self.console();
        let timed_out =
            aborted.is_none() && status.is_none_or(|s| s.code() == Some(RUN_VM_TIMEOUT));
        let run = GuestRun {
            test: self.test.clone(),
            results: parse_results(&console),
            console,
            elapsed: self.started.elapsed(),
            status,
            timed_out,
            aborted,
            server_log: None,
        };
        eprintln!("{}", run.summary());
        run
    }

    /// Kills the VM's whole process group and reaps run-vm.sh.
    fn kill(&mut self) {
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) with a negative pid signals that process group; the group is
            // the one this Vm created (process_group(0) above), so nothing else is hit.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        } else if let Ok(pgid) = i32::try_from(self.child.id()) {
            // run-vm.sh exited; make sure nothing it started outlives it.
            // SAFETY: as in `kill`; an empty or reused-and-gone group just gets ESRCH.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// Which `CORODEV-*` line a [`GuestLine`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// `CORODEV-BEGIN name= boot_s=`: init reached the test (`boot_s` = kernel uptime).
    Begin,
    /// `CORODEV-INFO ...`: the device as the guest kernel sees it.
    Info,
    /// `CORODEV-RESULT name= status=PASS|FAIL [detail=] ... test_s=`: the verdict.
    Result,
}

/// One `CORODEV-BEGIN`, `CORODEV-INFO` or `CORODEV-RESULT` line: its `key=value` fields.
#[derive(Debug, Clone)]
pub struct GuestLine {
    pub kind: LineKind,
    pub fields: HashMap<String, String>,
}

impl GuestLine {
    /// A field's value, or "" if absent.
    pub fn get(&self, key: &str) -> &str {
        self.fields.get(key).map_or("", String::as_str)
    }

    /// A field parsed as a number; panics naming the field if absent or malformed (for
    /// tests: the guest always prints the fields its test documents).
    pub fn num(&self, key: &str) -> u64 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("guest field {key}={:?} is not a number", self.get(key)))
    }

    /// Whether this is a result line with `status=PASS`.
    pub fn passed(&self) -> bool {
        self.kind == LineKind::Result && self.get("status") == "PASS"
    }
}

/// What a guest printed.
#[derive(Debug)]
pub struct GuestRun {
    /// The test that was asked for.
    pub test: String,
    /// Serial console plus run-vm.sh's messages.
    pub console: String,
    /// The `CORODEV-*` lines, in order.
    pub results: Vec<GuestLine>,
    /// Wall time from spawning run-vm.sh to its exit.
    pub elapsed: Duration,
    /// run-vm.sh's exit status (None if the harness had to kill it).
    pub status: Option<ExitStatus>,
    /// Whether the guest hit its time limit.
    pub timed_out: bool,
    /// Why the harness stopped the VM early (the server died), if it did.
    pub aborted: Option<String>,
    /// The server's log after the run, when booted through [`Daemon::boot`].
    pub server_log: Option<String>,
}

impl GuestRun {
    fn line(&self, kind: LineKind) -> Option<&GuestLine> {
        self.results.iter().find(|l| l.kind == kind)
    }

    /// The test's result line, if the guest got that far.
    pub fn result(&self) -> Option<&GuestLine> {
        self.line(LineKind::Result)
    }

    /// The test's result line; panics with the console (and the server's log) if there is
    /// none or it failed.
    pub fn expect_pass(&self) -> &GuestLine {
        let Some(r) = self.result() else {
            panic!(
                "guest test {} printed no result{}{}",
                self.test,
                match (&self.aborted, self.timed_out) {
                    (Some(why), _) => format!(" ({why})"),
                    (None, true) => " (timed out)".to_owned(),
                    (None, false) => String::new(),
                },
                self.transcript()
            );
        };
        assert!(
            r.passed(),
            "guest test {} failed: {}{}",
            self.test,
            r.get("detail"),
            self.transcript()
        );
        assert_eq!(r.get("name"), self.test, "result of another test?");
        r
    }

    /// Console and server log, for failure messages.
    fn transcript(&self) -> String {
        let mut t = format!("\n--- console ---\n{}", self.console);
        if let Some(log) = &self.server_log {
            t.push_str(&format!("--- server log ---\n{log}"));
        }
        t
    }

    /// The guest's `CORODEV-INFO` line (device as the guest kernel sees it).
    pub fn info(&self) -> &GuestLine {
        self.line(LineKind::Info)
            .unwrap_or_else(|| panic!("guest printed no info{}", self.transcript()))
    }

    /// Seconds from kernel start to the test (the guest's uptime), if it got there.
    pub fn boot_secs(&self) -> Option<f64> {
        self.line(LineKind::Begin)?.get("boot_s").parse().ok()
    }

    /// Seconds the test itself took inside the guest.
    pub fn test_secs(&self) -> Option<f64> {
        self.result()?.get("test_s").parse().ok()
    }

    /// One line: test, verdict, wall time, guest boot and test time.
    pub fn summary(&self) -> String {
        let verdict = match self.result() {
            Some(r) => r.get("status").to_owned(),
            None if self.aborted.is_some() => "ABORTED (server exited)".to_owned(),
            None if self.timed_out => "TIMEOUT".to_owned(),
            None => match self.status {
                Some(s) => format!("NO-RESULT ({})", describe(s)),
                None => "NO-RESULT (killed)".to_owned(),
            },
        };
        let secs = |s: Option<f64>| s.map_or("?".to_owned(), |s| format!("{s:.1}"));
        format!(
            "guest {}: {verdict} in {:.1} s wall (guest boot {} s, test {} s)",
            self.test,
            self.elapsed.as_secs_f64(),
            secs(self.boot_secs()),
            secs(self.test_secs())
        )
    }
}

fn describe(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => s.to_string(),
    }
}

/// Parses `CORODEV-BEGIN|INFO|RESULT k=v ...` lines from a console log. Lines may carry
/// console noise before the marker (escape sequences, a kernel message without newline).
pub fn parse_results(console: &str) -> Vec<GuestLine> {
    console
        .lines()
        .filter_map(|line| {
            let start = line.find("CORODEV-")?;
            let mut words = line[start..].split_whitespace();
            let kind = match words.next()? {
                "CORODEV-BEGIN" => LineKind::Begin,
                "CORODEV-INFO" => LineKind::Info,
                "CORODEV-RESULT" => LineKind::Result,
                _ => return None,
            };
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
        let log = "[    1.0] boot\n\x1b[2JCORODEV-BEGIN name=pattern boot_s=5.1\n\
                   CORODEV-INFO size=8 ro=0\r\nCORODEV-DONE\n\
                   CORODEV-RESULT name=pattern status=PASS md5=ab test_s=0.8\n";
        let r = parse_results(log);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].kind, LineKind::Begin);
        assert_eq!(r[1].get("size"), "8");
        assert_eq!(r[1].get("ro"), "0");
        assert_eq!(r[2].get("status"), "PASS");
        assert!(r[2].passed());
        assert_eq!(r[2].get("md5"), "ab");
        assert_eq!(r[2].get("missing"), "");
        let run = GuestRun {
            test: "pattern".into(),
            console: log.into(),
            results: r,
            elapsed: Duration::from_secs(7),
            status: None,
            timed_out: false,
            aborted: None,
            server_log: None,
        };
        assert_eq!(run.boot_secs(), Some(5.1));
        assert_eq!(run.test_secs(), Some(0.8));
        assert_eq!(run.expect_pass().get("md5"), "ab");
    }

    #[test]
    fn a_failed_result_is_not_a_pass() {
        let r = parse_results("CORODEV-RESULT name=fio status=FAIL detail=verify\n");
        assert!(!r[0].passed());
        assert_eq!(r[0].get("detail"), "verify");
    }

    #[test]
    fn sees_its_own_listening_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let _listener =
            std::os::unix::net::UnixListener::bind(dir.path().join("s.sock")).expect("bind");
        assert!(has_listening_unix_socket(std::process::id()));
        assert!(!has_listening_unix_socket(u32::MAX), "no such process");
    }
}

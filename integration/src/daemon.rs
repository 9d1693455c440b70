//! A running vhost-user-blk server: corodev, or qemu-storage-daemon with corodev's options
//! translated, started on an [`Image`] with its stderr in a log, killed on drop; and started
//! again on the same socket once it exited ([`Daemon::restart`], [`Daemon::respawn`]).
//! Boundary: the server process and its socket; booting a guest against it is
//! [`crate::Vm`]'s job ([`Daemon::boot`] only joins the two).

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::console::{GuestLine, GuestRun};
use crate::frontend::GUEST_MEMFD_NAME;
use crate::image::{Image, TEST_IMAGE_SIZE};
use crate::procfs;
use crate::server::{corodev_bin, Server};
use crate::vm::{Guest, Vm};
use crate::workspace::INSTALL_HINT;

/// A running vhost-user-blk server, killed on drop.
pub struct Daemon {
    child: Child,
    kind: Server,
    /// The vhost-user socket it listens on.
    pub socket: PathBuf,
    log: PathBuf,
    /// The command line it was started with, to start it again ([`Daemon::restart`]).
    program: std::ffi::OsString,
    args: Vec<std::ffi::OsString>,
    /// Processes started so far on this socket (1 + restarts).
    generation: u32,
    /// The `cgroup.procs` file every process of this daemon joins ([`Daemon::join_cgroup`]).
    cgroup_procs: Option<PathBuf>,
    _dir: tempfile::TempDir,
    /// The image, when the daemon owns it ([`Daemon::with_image`]).
    pub image: Option<Image>,
}

/// How long a server may take to listen on its socket.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// What a server process holds at one moment, from /proc: for the tests that check a
/// closed connection leaves nothing behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resources {
    /// Open file descriptors.
    pub fds: usize,
    /// Threads.
    pub threads: usize,
    /// Lines of /proc/PID/maps that map a test frontend's guest memory
    /// ([`GUEST_MEMFD_NAME`]).
    pub guest_maps: Vec<String>,
    /// Resident memory, KiB.
    pub rss_kib: u64,
}

impl Resources {
    /// Whether this holds no more than `baseline`: no more fds or threads, and no guest
    /// memory mapped (RSS is not compared: the allocator keeps what it freed).
    pub fn within(&self, baseline: &Resources) -> bool {
        self.fds <= baseline.fds && self.threads <= baseline.threads && self.guest_maps.is_empty()
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} fds, {} threads, RSS {} KiB, {} mapping(s) of guest memory",
            self.fds,
            self.threads,
            self.rss_kib,
            self.guest_maps.len()
        )?;
        for m in &self.guest_maps {
            write!(f, "\n  {m}")?;
        }
        Ok(())
    }
}

impl Daemon {
    /// Starts the server [`Server::from_env`] selects on `image`, with corodev options
    /// (translated for qemu-storage-daemon, see [`Daemon::qsd`]).
    pub fn start(image: &Image, args: &[&str]) -> Daemon {
        match Server::from_env() {
            Server::Corodev => Daemon::corodev(image, args),
            Server::Qsd => Daemon::qsd(image, args),
        }
    }

    /// Like [`start`](Self::start), for an image that another server serves at the same
    /// time (the source and destination of a live migration share their storage), as the
    /// destination of a migration if `incoming`: corodev gets `--incoming` (it takes the
    /// image's write lock only when the guest starts on it, after the source's corodev
    /// gave it up at the switch-over; the first source locks at startup as usual).
    /// qemu-storage-daemon is told not to lock the image (`locking=off`): it would keep
    /// its write lock while the other server needs it, having no such hand-over.
    pub fn start_shared(image: &Image, args: &[&str], incoming: bool) -> Daemon {
        Daemon::shared(Server::from_env(), image, args, incoming)
    }

    /// [`start_shared`](Self::start_shared) with the server given (for a benchmark that
    /// runs both in turn).
    pub fn shared(kind: Server, image: &Image, args: &[&str], incoming: bool) -> Daemon {
        match kind {
            Server::Corodev if incoming => {
                let mut all = args.to_vec();
                all.push("--incoming");
                Daemon::corodev(image, &all)
            }
            Server::Corodev => Daemon::corodev(image, args),
            Server::Qsd => Daemon::qsd_with(image, args, true),
        }
    }

    /// Starts corodev ([`corodev_bin`]) with `--socket <temp> --disk <image>` and `args`.
    pub fn corodev(image: &Image, args: &[&str]) -> Daemon {
        Daemon::corodev_at(&corodev_bin(), image, args)
    }

    /// [`corodev`](Self::corodev) with another build of it (e.g. the static musl one).
    pub fn corodev_at(program: &Path, image: &Image, args: &[&str]) -> Daemon {
        let (dir, socket) = socket_dir();
        let mut cmd = Command::new(program);
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(&image.path)
            .args(args);
        Daemon::spawn(Server::Corodev, cmd, dir, socket)
    }

    /// Starts corodev the way a socket unit does, through `systemd-socket-activate`: it
    /// listens on the socket itself (named `fdname`, as `FileDescriptorName=` names it)
    /// and execs corodev (`--name name --socket <it> --disk <image>` and `args`) in its
    /// own process at the first connection, passing the socket as `LISTEN_FDS`. The
    /// daemon counts as listening from the start: the activator's socket queues the
    /// frontend's connection until corodev accepts it.
    pub fn socket_activated(image: &Image, fdname: &str, name: &str, args: &[&str]) -> Daemon {
        assert!(
            crate::workspace::on_path("systemd-socket-activate"),
            "systemd-socket-activate is not on PATH (it ships with systemd): {INSTALL_HINT}"
        );
        let (dir, socket) = socket_dir();
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.arg("-l").arg(&socket).arg(format!("--fdname={fdname}"));
        // The activator passes on only the variables it is told to (`-E NAME` alone sets
        // an unset one to empty, which would silence the log).
        if std::env::var_os("RUST_LOG").is_some() {
            cmd.args(["-E", "RUST_LOG"]);
        }
        cmd.arg(corodev_bin())
            .args(["--name", name])
            .arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(&image.path)
            .args(args);
        Daemon::spawn(Server::Corodev, cmd, dir, socket)
    }

    /// Starts corodev on its null backend (`--backend null --size 64M`: reads return
    /// zeroes, writes are discarded) with `args`, e.g. `--null-latency-us` to keep requests
    /// parked. Always corodev: the options that make these tests work (latency, polling,
    /// stack size) have no qemu-storage-daemon counterpart, so callers skip under
    /// `CORODEV_TEST_SERVER=qsd`.
    pub fn corodev_null(args: &[&str]) -> Daemon {
        let (dir, socket) = socket_dir();
        let mut cmd = Command::new(corodev_bin());
        cmd.arg("--socket")
            .arg(&socket)
            .args(["--backend", "null", "--size", "64M"])
            .args(args);
        Daemon::spawn(Server::Corodev, cmd, dir, socket)
    }

    /// Starts corodev on an RBD image (`--backend rbd --ceph-conf <conf> --rbd-pool <pool>
    /// --rbd-image <image>`) with `args`. Always corodev (the qsd comparison is the
    /// benchmark's job, with its own rbd driver options).
    pub fn corodev_rbd(conf: &Path, pool: &str, image: &str, args: &[&str]) -> Daemon {
        let (dir, socket) = socket_dir();
        let mut cmd = Command::new(corodev_bin());
        cmd.arg("--socket")
            .arg(&socket)
            .args(["--backend", "rbd", "--rbd-pool", pool, "--rbd-image", image])
            .arg("--ceph-conf")
            .arg(conf)
            .args(args);
        Daemon::spawn(Server::Corodev, cmd, dir, socket)
    }

    /// Starts corodev with `--config config`, whose exports listen on `sockets` (the first
    /// is [`socket`](Self::socket)), and `env`; waits until every one of them listens.
    /// Always corodev: qemu-storage-daemon has no such file.
    pub fn with_config(config: &Path, sockets: &[&Path], env: &[(&str, &str)]) -> Daemon {
        let (dir, _) = socket_dir();
        let mut cmd = Command::new(corodev_bin());
        cmd.arg("--config").arg(config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let first = sockets
            .first()
            .expect("a config serves at least one socket");
        let d = Daemon::spawn(Server::Corodev, cmd, dir, first.to_path_buf());
        for socket in &sockets[1..] {
            d.wait_socket(socket, true);
        }
        d
    }

    /// Starts corodev with `--config config` under `systemd-socket-activate`, which binds
    /// each of `sockets` (path, name) and passes them as `LISTEN_FDS` with those names
    /// (`LISTEN_FDNAMES`), as corodev-export@NAME.socket units do for corodev.service.
    pub fn with_config_activated(config: &Path, sockets: &[(&Path, &str)]) -> Daemon {
        assert!(
            crate::workspace::on_path("systemd-socket-activate"),
            "systemd-socket-activate is not on PATH (it ships with systemd): {INSTALL_HINT}"
        );
        let (dir, _) = socket_dir();
        let mut cmd = Command::new("systemd-socket-activate");
        for (path, _) in sockets {
            cmd.arg("-l").arg(path);
        }
        let names: Vec<&str> = sockets.iter().map(|(_, name)| *name).collect();
        cmd.arg(format!("--fdname={}", names.join(":")));
        if std::env::var_os("RUST_LOG").is_some() {
            cmd.args(["-E", "RUST_LOG"]);
        }
        cmd.arg(corodev_bin()).arg("--config").arg(config);
        let first = sockets.first().expect("at least one socket").0;
        Daemon::spawn(Server::Corodev, cmd, dir, first.to_path_buf())
    }

    /// Waits until `socket` exists (`present`) or is gone, panicking with the log after
    /// [`LISTEN_TIMEOUT`]. corodev creates a socket file only once it listens (it binds
    /// a temporary name and renames it into place).
    pub fn wait_socket(&self, socket: &Path, present: bool) {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while socket.exists() != present {
            assert!(
                Instant::now() < deadline,
                "{} is {} after {LISTEN_TIMEOUT:?}; log:\n{}",
                socket.display(),
                if present {
                    "still missing"
                } else {
                    "still there"
                },
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts qemu-storage-daemon exporting `image` over vhost-user-blk. `args` are corodev
    /// options; those with a qsd equivalent are translated (`--readonly`, `--num-queues`,
    /// `--block-size`, `--direct`, `--backend null` with `--size`), the rest only tune
    /// corodev or have no qsd counterpart (`--serial`, `--threads`, `--queue-size`, ...)
    /// and are ignored, so a test that checks them must check [`Daemon::kind`] first.
    pub fn qsd(image: &Image, args: &[&str]) -> Daemon {
        Daemon::qsd_with(image, args, false)
    }

    /// [`qsd`](Self::qsd), with the image unlocked if `shared`.
    fn qsd_with(image: &Image, args: &[&str], shared: bool) -> Daemon {
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
                "driver=file,node-name=f,filename={},aio=io_uring,cache.direct={direct},read-only={}{}",
                image.path.display(),
                if ro { "on" } else { "off" },
                if shared { ",locking=off" } else { "" }
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
        let program = cmd.get_program().to_os_string();
        let args = cmd.get_args().map(|a| a.to_os_string()).collect();
        let child = Daemon::launch(kind, &mut cmd, &log);
        let mut d = Daemon {
            child,
            kind,
            socket,
            log,
            program,
            args,
            generation: 1,
            cgroup_procs: None,
            _dir: dir,
            image: None,
        };
        d.wait_listening();
        d
    }

    fn launch(kind: Server, cmd: &mut Command, log: &Path) -> Child {
        let logf =
            File::create(log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let program = cmd.get_program().to_string_lossy().into_owned();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| match kind {
                Server::Corodev => panic!("cannot start {program}: {e}"),
                Server::Qsd => panic!("cannot start {program}: {e}; {INSTALL_HINT}"),
            })
    }

    /// Ends the server with `sig` (SIGKILL: a crash; SIGTERM: a stop), waits until the
    /// process is gone (and with it its end of every connection), then starts `program`
    /// (an upgrade) or the same binary again with the same arguments on the same socket,
    /// as a service manager restarting it would. The new process logs to a new file:
    /// [`log_text`](Self::log_text) is the new process's log from then on.
    pub fn restart(&mut self, sig: libc::c_int, program: Option<&Path>) {
        self.signal(sig);
        let status = self.wait_exit(Duration::from_secs(60));
        assert!(
            status.is_some(),
            "{:?} server still running 60 s after signal {sig}; log:\n{}",
            self.kind,
            self.log_text()
        );
        self.respawn(program);
    }

    /// The second half of [`restart`](Self::restart), for a test that ends the process
    /// itself and acts before the next one starts: starts `program` (or the same binary)
    /// with the same arguments on the same socket, once the previous process has exited
    /// and been reaped ([`wait_exit`](Self::wait_exit) returned its status), so its socket
    /// and every file it had open are closed. The new process joins the cgroup of
    /// [`join_cgroup`](Self::join_cgroup), if any, before it listens. Waits until it listens.
    pub fn respawn(&mut self, program: Option<&Path>) {
        assert!(
            matches!(self.child.try_wait(), Ok(Some(_))),
            "respawn: the previous {:?} server (pid {}) has not exited",
            self.kind,
            self.pid()
        );
        self.generation += 1;
        self.log = self.log_of(self.generation);
        let mut cmd = Command::new(program.map_or(self.program.as_os_str(), Path::as_os_str));
        cmd.args(&self.args);
        self.child = Daemon::launch(self.kind, &mut cmd, &self.log);
        if let Some(procs) = self.cgroup_procs.clone() {
            self.enter_cgroup(&procs);
        }
        self.wait_listening();
    }

    /// The log file of the `generation`th process (1: the first).
    fn log_of(&self, generation: u32) -> PathBuf {
        let name = match generation {
            1 => "daemon.log".to_owned(),
            n => format!("daemon-{n}.log"),
        };
        self.log.with_file_name(name)
    }

    /// Moves the server (all its threads, and the io_uring workers it starts later) into the
    /// cgroup whose `cgroup.procs` file is `procs`, and every process
    /// [`respawn`](Self::respawn) starts after it: e.g. a
    /// [`WriteThrottle`](crate::WriteThrottle) on its writes.
    pub fn join_cgroup(&mut self, procs: &Path) {
        self.cgroup_procs = Some(procs.to_owned());
        self.enter_cgroup(procs);
    }

    fn enter_cgroup(&self, procs: &Path) {
        std::fs::write(procs, self.pid().to_string()).unwrap_or_else(|e| {
            panic!(
                "cannot move the server (pid {}) into {}: {e}",
                self.pid(),
                procs.display()
            )
        });
    }

    /// The first process's binary (what [`respawn`](Self::respawn) starts unless given
    /// another), as given: a path, or a name looked up on `$PATH` (`qemu-storage-daemon`).
    pub fn program(&self) -> &std::ffi::OsStr {
        &self.program
    }

    /// Waits until the socket file exists and the server has a listening unix socket.
    /// Listening is read from /proc (the server's fds against /proc/net/unix) rather than
    /// probed with a connect: a probe connection would be a real vhost-user session to the
    /// server (and count in its connection log). The path in /proc/net/unix cannot be
    /// used: corodev binds a temporary name and renames it into place.
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !(self.socket.exists() && procfs::has_listening_unix_socket(self.pid())) {
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
        procfs::cpu_seconds(self.pid())
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

    /// What the server holds now: open fds, threads, mappings of guest memory, RSS.
    pub fn resources(&self) -> Resources {
        let pid = self.pid();
        Resources {
            fds: procfs::count_entries(pid, "fd"),
            threads: procfs::count_entries(pid, "task"),
            guest_maps: procfs::mappings_of(pid, GUEST_MEMFD_NAME),
            rss_kib: procfs::status_kib(pid, "VmRSS"),
        }
    }

    /// The server's virtual memory size in KiB (`VmSize`, what RLIMIT_AS limits).
    pub fn vm_size_kib(&self) -> u64 {
        procfs::status_kib(self.pid(), "VmSize")
    }

    /// Sends the server SIGTERM (returns at once; see [`wait_exit`](Self::wait_exit)).
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends `sig` to the server.
    pub fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child, not
        // yet reaped (the Child is reaped only by wait_exit or drop), so it is not reused.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits up to `timeout` for the server to exit; its status, or `None` if it is still
    /// running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the server") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sets the soft limit on the server's address space (RLIMIT_AS) to `bytes`, leaving the
    /// hard limit alone; returns the soft limit it replaces, to restore it with. For tests
    /// that make the server's allocations (coroutine stacks) fail.
    pub fn limit_address_space(&self, bytes: u64) -> u64 {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reading into a valid rlimit; the pid is our unreaped child.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_AS, std::ptr::null(), &mut old) };
        assert_eq!(rc, 0, "prlimit (get): {}", std::io::Error::last_os_error());
        let new = libc::rlimit {
            rlim_cur: bytes.min(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        // SAFETY: as above, with a valid new limit.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_AS, &new, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit (set): {}", std::io::Error::last_os_error());
        old.rlim_cur
    }

    /// The server's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every process's log, first to current, each under a `--- server process N ---` line.
    pub fn all_logs(&self) -> String {
        let mut all = String::new();
        for n in 1..=self.generation {
            all.push_str(&format!("--- server process {n} ---\n"));
            all.push_str(&std::fs::read_to_string(self.log_of(n)).unwrap_or_default());
        }
        all
    }

    /// The first line of the server's log that contains `needle`, waiting up to `timeout`
    /// for it to appear (the server writes its log asynchronously to what a test sees on
    /// the socket); `None` if none did.
    pub fn wait_log_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.log_text();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Some(line.to_owned());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
        self.wait_guest(vm)
    }

    /// The second half of [`boot`](Self::boot), for a test that acts while its guest runs
    /// (started with [`Vm::start`] on this server's socket): waits for `vm` to power off,
    /// killing it at once if the server exits, and returns the run with the server's log.
    pub fn wait_guest(&mut self, vm: Vm) -> GuestRun {
        let mut run = vm.wait_while(|| match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("the {:?} server exited ({status})", self.kind)),
            _ => None,
        });
        run.server_log = Some(self.log_text());
        run
    }

    /// Boots the guest's `pattern` test, then asserts the server is alive and `image` holds
    /// exactly what the guest wrote (the md5 of the range it reports). Returns the guest's
    /// result line for further checks.
    pub fn assert_pattern_lands(&mut self, image: &Image) -> GuestLine {
        let run = self.boot(Guest::test("pattern"));
        self.assert_pattern_landed(image, &run)
    }

    /// The check of [`assert_pattern_lands`](Self::assert_pattern_lands), for a `pattern`
    /// guest booted another way (e.g. through libvirt), or an `idle` guest (which writes the
    /// same pattern first): `run` passed, the server is alive, and `image` holds exactly
    /// what the guest wrote. Returns the guest's result line.
    pub fn assert_pattern_landed(&mut self, image: &Image, run: &GuestRun) -> GuestLine {
        assert!(
            matches!(run.test.as_str(), "pattern" | "idle"),
            "guest test {} writes no pattern",
            run.test
        );
        let r = run.expect_pass().clone();
        let (offset, len) = (r.num("offset"), r.num("length") as usize);
        self.assert_alive();
        assert_eq!(
            image.md5(offset, len),
            r.get("md5"),
            "the image must hold exactly what the guest wrote"
        );
        r
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A daemon built with a sanitizer (scripts/test.sh runs the hostile suites against
        // one) may report an error after the test's own assertions passed, or abort in a
        // way the test did not look at: fail the test on any report.
        let log = self.all_logs();
        if log.contains("ERROR: AddressSanitizer") && !std::thread::panicking() {
            panic!("the server reported a memory error:\n{log}");
        }
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

//! systemd's side of the protocols corodev speaks with it, played by the test with the real
//! kernel objects: the notify socket ([`NotifySocket`]: an `AF_UNIX` datagram socket the
//! test binds and reads, as the service manager does) and the listening socket a socket
//! unit owns ([`HeldSocket`]: bound by the test, passed to each corodev it starts as
//! `LISTEN_FDS`, and kept open across their restarts). `systemd-socket-activate` itself is
//! used through [`crate::Daemon::socket_activated`]; [`stop_thread`] freezes one thread of
//! a process (ptrace), to show what the watchdog does when a worker stops.
//! [`syscall_filter`] reads a unit's `SystemCallFilter=` as the set of system calls it
//! allows, groups expanded by `systemd-analyze syscall-filter`; [`traced_syscalls`] runs a
//! program under `strace -f` and names every system call it made.
//! Boundary: processes and sockets; what corodev does with them is the tests' business.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::server::corodev_bin;

/// A notify socket (`NOTIFY_SOCKET`) and every datagram received on it so far.
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every message, with when it arrived.
    pub seen: Vec<(Instant, String)>,
    _dir: tempfile::TempDir,
}

impl Default for NotifySocket {
    fn default() -> Self {
        NotifySocket::new()
    }
}

impl NotifySocket {
    /// A fresh datagram socket in a temp dir.
    pub fn new() -> NotifySocket {
        let dir = tempfile::Builder::new()
            .prefix("corodev-notify-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket {
            sock,
            path,
            seen: Vec::new(),
            _dir: dir,
        }
    }

    /// Its path, for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next message, waiting up to `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<String> {
        self.sock
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .expect("read timeout");
        let mut buf = vec![0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push((Instant::now(), msg.clone()));
                Some(msg)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("reading the notify socket: {e}"),
        }
    }

    /// Waits up to `timeout` for a message with a line starting with `prefix`; returns
    /// the whole message. Panics, listing what did arrive, if none does.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {prefix:?} notification within {timeout:?}; received: {:#?}",
                self.seen.iter().map(|(_, m)| m).collect::<Vec<_>>()
            );
            if let Some(msg) = self.recv(left) {
                if msg.lines().any(|l| l.starts_with(prefix)) {
                    return msg;
                }
            }
        }
    }

    /// How many messages with a line equal to `line` arrive during `window`.
    pub fn count(&mut self, line: &str, window: Duration) -> usize {
        let deadline = Instant::now() + window;
        let mut n = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return n;
            }
            if let Some(msg) = self.recv(left) {
                n += usize::from(msg.lines().any(|l| l == line));
            }
        }
    }
}

/// A listening socket held by the test the way a socket unit holds it: it outlives every
/// corodev started on it.
pub struct HeldSocket {
    listener: UnixListener,
    /// The socket file.
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Default for HeldSocket {
    fn default() -> Self {
        HeldSocket::new()
    }
}

impl HeldSocket {
    /// Binds and listens on a fresh path.
    pub fn new() -> HeldSocket {
        let dir = tempfile::Builder::new()
            .prefix("corodev-held-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("vm.sock");
        let listener = UnixListener::bind(&path).expect("bind the held socket");
        HeldSocket {
            listener,
            path,
            _dir: dir,
        }
    }

    /// Starts corodev with this socket as descriptor 3, `LISTEN_FDS=1`,
    /// `LISTEN_FDNAMES=fdname`, `LISTEN_PID` its own pid (what systemd passes), `env`
    /// added, `args` after `--socket PATH`, its stderr in `log`.
    pub fn spawn_corodev(
        &self,
        fdname: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Child {
        // LISTEN_PID must be the pid of the process that reads it: a shell learns its own
        // pid ($$) and execs corodev in place.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
            .arg(corodev_bin())
            .arg("--socket")
            .arg(&self.path)
            .args(args)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", fdname)
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log).expect("create the log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let fd = self.listener.as_raw_fd();
        // SAFETY: between fork and exec only dup2 and fcntl run, which are
        // async-signal-safe; they put the listening socket at descriptor 3 without
        // FD_CLOEXEC (dup2 onto itself keeps the flag, hence the fcntl), so the exec'd
        // shell and then corodev inherit it there.
        unsafe {
            cmd.pre_exec(move || {
                if fd != 3 && libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().expect("start corodev")
    }
}

/// One thread of another process, stopped with ptrace until this is dropped (ptrace works
/// per thread: the rest of the process runs on). Must be dropped on the thread that
/// made it (the tracer).
pub struct StoppedThread {
    tid: libc::pid_t,
}

/// Stops thread `tid` (PTRACE_SEIZE + PTRACE_INTERRUPT) and waits until it is stopped.
/// Needs CAP_SYS_PTRACE or a tracee the test may trace (the test runs as root).
pub fn stop_thread(tid: libc::pid_t) -> StoppedThread {
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: PTRACE_SEIZE reads no memory of ours (addr and data are unused: 0 options).
    let rc = unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, null, null) };
    assert_eq!(
        rc,
        0,
        "PTRACE_SEIZE {tid}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: as above; the thread is now our tracee.
    let rc = unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null) };
    assert_eq!(
        rc,
        0,
        "PTRACE_INTERRUPT {tid}: {}",
        std::io::Error::last_os_error()
    );
    let mut status = 0;
    // SAFETY: `status` is valid for the write; __WALL waits for a traced thread.
    let rc = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
    assert_eq!(
        rc,
        tid,
        "waitpid {tid}: {}",
        std::io::Error::last_os_error()
    );
    assert!(
        libc::WIFSTOPPED(status),
        "thread {tid} not stopped: {status:#x}"
    );
    StoppedThread { tid }
}

impl Drop for StoppedThread {
    fn drop(&mut self) {
        let null = std::ptr::null_mut::<libc::c_void>();
        // SAFETY: detaching our stopped tracee reads no memory of ours; it resumes.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.tid, null, null) };
    }
}

/// The thread ids of process `pid` whose name (`comm`) is `name`.
pub fn threads_named(pid: u32, name: &str) -> Vec<libc::pid_t> {
    let dir = format!("/proc/{pid}/task");
    let mut tids: Vec<libc::pid_t> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|tid| {
            std::fs::read_to_string(format!("{dir}/{tid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect();
    tids.sort_unstable();
    tids
}

/// Runs `systemd-analyze args`: (success, stdout, stderr). Fails loudly if the tool is
/// missing.
pub fn analyze(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .env("SYSTEMD_COLORS", "0")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run systemd-analyze ({e}): run `bash scripts/install-deps.sh` (systemd)")
        });
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The system calls in `name` (a call, or a `@group` expanded with `systemd-analyze
/// syscall-filter`, nested groups included).
fn syscall_group(name: &str, into: &mut std::collections::BTreeSet<String>) {
    if !name.starts_with('@') {
        into.insert(name.to_owned());
        return;
    }
    let (ok, out, err) = analyze(&["syscall-filter".as_ref(), name.as_ref()]);
    assert!(ok, "systemd-analyze syscall-filter {name}: {err}");
    for item in out.lines().skip(1).map(str::trim) {
        if !item.is_empty() && !item.starts_with('#') {
            syscall_group(item, into);
        }
    }
}

/// The system calls a unit's `SystemCallFilter=` lines allow, in order: an allow list
/// starts the set, a `~` list removes from it (the unit must start with an allow list).
pub fn syscall_filter(unit_text: &str) -> std::collections::BTreeSet<String> {
    let mut allowed = std::collections::BTreeSet::new();
    for line in unit_text
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
    {
        let (deny, list) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let mut set = std::collections::BTreeSet::new();
        for name in list.split_whitespace() {
            syscall_group(name, &mut set);
        }
        if deny {
            allowed.retain(|c| !set.contains(c));
        } else {
            allowed.extend(set);
        }
    }
    assert!(!allowed.is_empty(), "no SystemCallFilter= allow list");
    allowed
}

/// Every system call named in an `strace -f -o FILE` log.
pub fn traced_syscalls(log: &Path) -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(log)
        .unwrap_or_else(|e| panic!("strace log {}: {e}", log.display()));
    text.lines()
        .filter_map(|l| {
            // "PID name(args..." or "PID <... name resumed>...": skip signals and exits.
            let rest = l.split_once(' ')?.1.trim_start();
            let rest = rest.strip_prefix("<... ").unwrap_or(rest);
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty() && rest[name.len()..].starts_with(['(', ' '])).then_some(name)
        })
        .filter(|n| n != "exited" && n != "killed")
        .collect()
}

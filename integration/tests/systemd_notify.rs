//! corodev under systemd, with systemd's side played by real sockets: `Type=notify`
//! (READY=1 only once the socket accepts, STATUS= lines, STOPPING=1 on SIGTERM), the
//! watchdog (WATCHDOG=1 only while the workers and the serve loop answer: a worker frozen
//! with ptrace stops the pings), socket activation with `systemd-socket-activate` and with
//! a socket held across daemon restarts as a socket unit holds it, and a real guest doing
//! I/O through a socket-activated corodev.
//!
//! Always corodev: qemu-storage-daemon speaks none of this.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration::systemd::{stop_thread, threads_named, HeldSocket, NotifySocket};
use integration::{corodev_bin, Daemon, Image};

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(20);

fn start(args: &[&str], env: &[(&str, &str)], log: &Path) -> Child {
    let mut cmd = Command::new(corodev_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start corodev")
}

/// A corodev on a fresh 16 MiB image whose notifications go to `notify`.
struct Notified {
    notify: NotifySocket,
    socket: PathBuf,
    log: PathBuf,
    child: Child,
    _image: Image,
    _dir: tempfile::TempDir,
}

/// Starts corodev on a fresh image and a socket named `socket_name` in a temp dir, with
/// `NOTIFY_SOCKET` set to a fresh notify socket, plus `args` and `env`.
fn start_notified(socket_name: &str, args: &[&str], env: &[(&str, &str)]) -> Notified {
    let image = Image::new(16 * MIB);
    let notify = NotifySocket::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join(socket_name);
    let log = dir.path().join("log");
    let mut all_args = vec![
        "--socket",
        socket.to_str().expect("utf-8"),
        "--disk",
        image.path.to_str().expect("utf-8"),
    ];
    all_args.extend_from_slice(args);
    let mut all_env = vec![("NOTIFY_SOCKET", notify.path().to_str().expect("utf-8"))];
    all_env.extend_from_slice(env);
    let child = start(&all_args, &all_env, &log);
    Notified {
        notify,
        socket,
        log,
        child,
        _image: image,
        _dir: dir,
    }
}

fn sigterm(child: &Child) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

fn wait_exit(child: &mut Child, log: &Path) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "corodev did not exit; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The STATUS= line of a notification.
fn status(msg: &str) -> &str {
    msg.lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= in {msg:?}"))
}

#[test]
fn ready_only_once_the_socket_accepts_then_status_and_stopping() {
    let Notified {
        mut notify,
        socket,
        log,
        mut child,
        _image,
        _dir,
    } = start_notified("vm7.sock", &[], &[]);
    let ready = notify.wait_for("READY=1", WAIT);
    // At the moment READY=1 is read the socket must accept: a frontend started on it
    // (systemd orders QEMU's unit after this one) must not see ENOENT or ECONNREFUSED.
    let first = UnixStream::connect(&socket)
        .unwrap_or_else(|e| panic!("READY=1 was sent but connecting failed: {e}"));
    assert_eq!(
        status(&ready),
        format!(
            "export vm7: listening on {}, no frontend; 0 connection(s) served",
            socket.display()
        ),
        "the export is named after the socket file by default"
    );
    let serving = notify.wait_for("STATUS=export vm7: serving", WAIT);
    assert!(status(&serving).ends_with("(connection 1)"), "{serving}");
    drop(first);
    let back = notify.wait_for("STATUS=export vm7: listening", WAIT);
    assert!(status(&back).ends_with("1 connection(s) served"), "{back}");
    let _second = UnixStream::connect(&socket).expect("accepts again");
    let serving = notify.wait_for("STATUS=export vm7: serving", WAIT);
    assert!(status(&serving).ends_with("(connection 2)"), "{serving}");

    sigterm(&child);
    let stopping = notify.wait_for("STOPPING=1", WAIT);
    assert!(stopping.contains("STATUS=stopping"), "{stopping}");
    assert!(wait_exit(&mut child, &log).success());
    assert!(
        !socket.exists(),
        "a socket corodev bound is removed at exit"
    );
    assert_eq!(
        notify
            .seen
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == "READY=1"))
            .count(),
        1,
        "READY=1 is sent once"
    );
}

#[test]
fn watchdog_pings_stop_while_a_worker_or_the_serve_loop_is_frozen() {
    // 400 ms: the daemon checks and pings every 100 ms.
    let Notified {
        mut notify,
        socket,
        log,
        mut child,
        _image,
        _dir,
    } = start_notified(
        "wd.sock",
        &["--num-queues", "2", "--threads", "2"],
        &[("WATCHDOG_USEC", "400000")],
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    notify.wait_for("READY=1", WAIT);
    let pings = notify.count("WATCHDOG=1", Duration::from_secs(1));
    assert!(
        (5..=15).contains(&pings),
        "about 10 pings per second expected, got {pings}; log:\n{}",
        log_text()
    );

    let pid = child.id();
    let workers = threads_named(pid, "vring_worker");
    assert_eq!(workers.len(), 2, "two worker threads: {workers:?}");
    {
        let _frozen = stop_thread(workers[1]);
        // Pings already on their way, and the one round the frozen worker may have
        // answered before it stopped, come first.
        notify.count("WATCHDOG=1", Duration::from_millis(300));
        let pings = notify.count("WATCHDOG=1", Duration::from_secs(1));
        assert_eq!(
            pings,
            0,
            "a frozen worker must stop the pings; log:\n{}",
            log_text()
        );
    }
    let pings = notify.count("WATCHDOG=1", Duration::from_secs(1));
    assert!(pings >= 4, "pings resume once the worker runs: {pings}");
    let text = log_text();
    assert!(
        text.contains("watchdog: worker thread(s) [1] did not get back to their event loop")
            && text.contains("watchdog: the serving path answers again"),
        "{text}"
    );

    // The export's serve loop (thread serve:NAME), waiting for a frontend.
    let serve = threads_named(pid, "serve:wd");
    assert_eq!(serve.len(), 1, "one serve loop: {serve:?}");
    {
        let _frozen = stop_thread(serve[0]);
        notify.count("WATCHDOG=1", Duration::from_millis(300));
        let pings = notify.count("WATCHDOG=1", Duration::from_secs(1));
        assert_eq!(pings, 0, "a frozen serve loop must stop the pings");
    }
    assert!(notify.count("WATCHDOG=1", Duration::from_secs(1)) >= 4);
    assert!(log_text().contains("watchdog: the serve loop stopped waiting for frontends"));

    // With a frontend connected the workers still answer.
    let _frontend = UnixStream::connect(&socket).expect("connect");
    notify.wait_for("STATUS=export wd: serving", WAIT);
    assert!(notify.count("WATCHDOG=1", Duration::from_secs(1)) >= 5);
    sigterm(&child);
    notify.wait_for("STOPPING=1", WAIT);
    assert!(wait_exit(&mut child, &log).success());
}

#[test]
fn activated_socket_is_kept_and_accepts_across_daemon_restarts() {
    let image = Image::new(16 * MIB);
    let held = HeldSocket::new();
    let inode = std::fs::metadata(&held.path).expect("socket file").ino();
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = image.path.to_str().expect("utf-8");

    let mut notify = NotifySocket::new();
    let notify_path = notify.path().to_str().expect("utf-8").to_owned();
    let env = [("NOTIFY_SOCKET", notify_path.as_str())];
    let log1 = dir.path().join("log1");
    let mut first = held.spawn_corodev("vm1", &["--name", "vm1", "--disk", disk], &env, &log1);
    let ready = notify.wait_for("READY=1", WAIT);
    assert!(
        status(&ready).contains("(socket-activated)"),
        "{ready}; log:\n{}",
        std::fs::read_to_string(&log1).unwrap_or_default()
    );
    let c1 = UnixStream::connect(&held.path).expect("connect");
    assert!(
        status(&notify.wait_for("STATUS=export vm1: serving", WAIT)).ends_with("(connection 1)")
    );
    drop(c1);
    notify.wait_for("STATUS=export vm1: listening", WAIT);
    let c2 = UnixStream::connect(&held.path).expect("connect again");
    assert!(
        status(&notify.wait_for("STATUS=export vm1: serving", WAIT)).ends_with("(connection 2)"),
        "the same activated descriptor accepts the next frontend"
    );
    drop(c2);
    notify.wait_for("STATUS=export vm1: listening", WAIT);

    sigterm(&first);
    notify.wait_for("STOPPING=1", WAIT);
    assert!(wait_exit(&mut first, &log1).success());
    let meta = std::fs::metadata(&held.path).expect("the socket file must stay");
    assert_eq!(
        meta.ino(),
        inode,
        "the activated socket file is not replaced"
    );

    // No daemon runs: the held socket still takes the frontend's connection (QEMU's
    // reconnect), and the next daemon accepts it.
    let waiting = UnixStream::connect(&held.path).expect("queued while no daemon runs");
    let log2 = dir.path().join("log2");
    let mut second = held.spawn_corodev("vm1", &["--name", "vm1", "--disk", disk], &env, &log2);
    notify.wait_for("READY=1", WAIT);
    assert!(
        status(&notify.wait_for("STATUS=export vm1: serving", WAIT)).ends_with("(connection 1)"),
        "the connection queued before the daemon started is served"
    );
    drop(waiting);
    sigterm(&second);
    assert!(wait_exit(&mut second, &log2).success());
    assert_eq!(
        std::fs::metadata(&held.path).expect("still there").ino(),
        inode
    );

    // A socket named for another export is refused in one line naming the fix.
    let log3 = dir.path().join("log3");
    let mut wrong = held.spawn_corodev("vm2", &["--name", "vm1", "--disk", disk], &[], &log3);
    let st = wait_exit(&mut wrong, &log3);
    assert_eq!(st.code(), Some(1));
    let err = std::fs::read_to_string(&log3).expect("log");
    assert_eq!(
        err.trim(),
        "corodev: error: socket activation passed no socket named 'vm1' (LISTEN_FDNAMES=vm2); \
         set FileDescriptorName=vm1 in the socket unit, or --name to one of those names"
    );
    assert_eq!(
        std::fs::metadata(&held.path).expect("untouched").ino(),
        inode
    );
}

#[test]
fn systemd_socket_activate_starts_corodev_and_a_guest_does_io_through_it() {
    let image = Image::new(64 * MIB);
    let mut daemon = Daemon::socket_activated(&image, "disk0", "disk0", &[]);
    daemon.assert_pattern_lands(&image);
    assert!(
        daemon
            .wait_log_line("(socket-activated)", Duration::from_secs(5))
            .is_some(),
        "corodev served the activated socket; log:\n{}",
        daemon.log_text()
    );
    assert!(daemon.socket().exists(), "the activated socket file stays");
}

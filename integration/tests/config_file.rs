//! Several exports in one corodev process, from a `--config` TOML file: two real guests
//! served at the same time, each writing its own image; `check-config` naming every
//! problem by its key path; SIGHUP adding an export (a guest then does I/O on it) and
//! removing one (its socket goes) while a guest on a third keeps running undisturbed;
//! a bad file on SIGHUP changing nothing; READY/STATUS and the watchdog over several
//! exports.
//!
//! Always corodev: qemu-storage-daemon has no such file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration::systemd::{stop_thread, threads_named, NotifySocket};
use integration::{corodev_bin, Daemon, Guest, GuestRun, GuestSlot, Image, Vm, VmControl};

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(20);

/// A temp dir (under /tmp: socket paths must be short) for the config and its sockets.
fn dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("corodev-cfg-")
        .tempdir()
        .expect("tempdir")
}

/// An `[[exports]]` table for a file export.
fn file_export(name: &str, socket: &Path, image: &Image) -> String {
    format!(
        "[[exports]]\nname = \"{name}\"\nsocket = \"{}\"\ndisk = \"{}\"\n\n",
        socket.display(),
        image.path.display()
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Boots the `pattern` test on `socket` alongside the other VMs of `slot`.
fn start_pattern(slot: &GuestSlot, socket: &Path) -> Vm {
    Vm::start_in(slot, socket, &Guest::test("pattern"), &VmControl::default())
}

/// Asserts the guest passed and that `image` holds what it wrote.
fn assert_landed(run: &GuestRun, image: &Image) {
    let r = run.expect_pass();
    let (offset, len) = (r.num("offset"), r.num("length") as usize);
    assert_eq!(
        image.md5(offset, len),
        r.get("md5"),
        "the image must hold exactly what its guest wrote"
    );
}

/// Two file exports `vm-a` and `vm-b` in one config file, served by the daemon `start`
/// makes from (config, socket a, socket b); a guest on each socket at the same time, each
/// pattern checked on its own export's image. Returns the daemon, both sockets and the
/// directory holding them.
fn two_guests_on_two_exports(
    start: impl FnOnce(&Path, &Path, &Path) -> Daemon,
) -> (Daemon, PathBuf, PathBuf, tempfile::TempDir) {
    let d = dir();
    let (a, b) = (Image::new(32 * MIB), Image::new(32 * MIB));
    let (sa, sb) = (d.path().join("a.sock"), d.path().join("b.sock"));
    let config = d.path().join("exports.toml");
    write(
        &config,
        &(file_export("vm-a", &sa, &a) + &file_export("vm-b", &sb, &b)),
    );
    let mut daemon = start(&config, &sa, &sb);
    let slot = GuestSlot::take();
    let (va, vb) = (start_pattern(&slot, &sa), start_pattern(&slot, &sb));
    let (ra, rb) = (va.wait(), vb.wait());
    daemon.assert_alive();
    assert_landed(&ra, &a);
    assert_landed(&rb, &b);
    (daemon, sa, sb, d)
}

#[test]
fn two_exports_serve_two_guests_at_the_same_time() {
    let (mut daemon, sa, sb, _dir) =
        two_guests_on_two_exports(|config, sa, sb| Daemon::with_config(config, &[sa, sb], &[]));
    let log = daemon.log_text();
    for name in ["vm-a", "vm-b"] {
        assert!(
            log.contains(&format!("export {name}: connection 1: frontend connected")),
            "each export serves its own guest; log:\n{log}"
        );
    }
    daemon.sigterm();
    assert!(daemon.wait_exit(WAIT).expect("exits on SIGTERM").success());
    assert!(
        !sa.exists() && !sb.exists(),
        "every socket it bound is removed at exit"
    );
}

/// `corodev check-config FILE`: exit code, stdout, stderr.
fn check_config(file: &Path) -> (i32, String, String) {
    let out = Command::new(corodev_bin())
        .arg("check-config")
        .arg(file)
        .env("RUST_LOG", "off")
        .output()
        .expect("run corodev check-config");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_names_every_problem_by_its_key_path() {
    let d = dir();
    let image = Image::new(MIB);
    let odd = d.path().join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).expect("odd image");
    let missing: PathBuf = d.path().join("missing.img");
    let sock = |n: &str| d.path().join(format!("{n}.sock"));
    let bad = d.path().join("bad.toml");
    write(
        &bad,
        &format!(
            "{}{}[[exports]]\nname = \"vm3\"\nsocket = \"{}\"\ndisk = \"{}\"\nqueue-size = 100\nthreads = 2\n\n{}[[exports]]\nsocket = \"{}\"\nbackend = \"null\"\n",
            file_export("vm1", &sock("vm1"), &image),
            format_args!(
                "[[exports]]\nname = \"vm2\"\nsocket = \"{}\"\ndisk = \"{}\"\n\n",
                sock("vm2").display(),
                missing.display()
            ),
            sock("vm3").display(),
            odd.display(),
            format_args!(
                "[[exports]]\nname = \"vm1\"\nsocket = \"{}\"\nbackend = \"null\"\nsize = \"1M\"\n\n",
                sock("vm1").display()
            ),
            sock("n").display(),
        ),
    );
    let (code, stdout, stderr) = check_config(&bad);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            "exports[2].queue-size: 100 is not a power of two between 2 and 32768: use e.g. 128 or 256".to_owned(),
            "exports[2].threads: 2 is more than num-queues 1: a thread serves whole queues".to_owned(),
            r#"exports[3].name: "vm1" is already used by exports[0]"#.to_owned(),
            format!("exports[3].socket: {} is already used by exports[0]", sock("vm1").display()),
            "exports[4].size: required with backend null, e.g. 1G".to_owned(),
        ],
        "every problem of the settings, in file order; disks are opened only once they pass"
    );
    // The settings fixed, the disks are opened: each failure at its export's disk key.
    let disks = d.path().join("disks.toml");
    write(
        &disks,
        &format!(
            "{}[[exports]]\nname = \"vm2\"\nsocket = \"{}\"\ndisk = \"{}\"\n\n[[exports]]\nname = \"vm3\"\nsocket = \"{}\"\ndisk = \"{}\"\n",
            file_export("vm1", &sock("vm1"), &image),
            sock("vm2").display(),
            missing.display(),
            sock("vm3").display(),
            odd.display(),
        ),
    );
    let (code, _, stderr) = check_config(&disks);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            format!(
                "exports[1].disk: cannot open disk {}: No such file or directory (os error 2); check the path and permissions",
                missing.display()
            ),
            format!(
                "exports[2].disk: disk {} is 1000 bytes, not a multiple of the 512-byte block size; resize it (e.g. qemu-img resize) or use --block-size 512",
                odd.display()
            ),
        ]
    );
    // A syntax error: one line, with line and column.
    let syntax = d.path().join("syntax.toml");
    write(&syntax, "[[exports]]\nsocket = \"/s\"\nqueue_size = 128\n");
    let (code, _, stderr) = check_config(&syntax);
    assert_eq!(code, 1);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with(&format!(
            "{}:3:1: unknown field `queue_size`, expected one of",
            syntax.display()
        )),
        "{stderr}"
    );
    // A good file: one line on stdout, exit 0, no socket created.
    let good = d.path().join("good.toml");
    write(
        &good,
        &format!(
            "{}[[exports]]\nsocket = \"{}\"\nbackend = \"null\"\nsize = \"1M\"\n",
            file_export("vm1", &sock("vm1"), &image),
            sock("scratch").display()
        ),
    );
    let (code, stdout, stderr) = check_config(&good);
    assert_eq!((code, stderr.as_str()), (0, ""));
    assert_eq!(
        stdout,
        format!("{}: 2 export(s) OK: vm1, scratch\n", good.display())
    );
    assert!(!sock("vm1").exists(), "check-config serves nothing");
    // The daemon refuses the bad file the same way, before any socket exists.
    let out = Command::new(corodev_bin())
        .arg("--config")
        .arg(&disks)
        .env("RUST_LOG", "off")
        .output()
        .expect("run corodev");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 2);
    assert!(!sock("vm1").exists(), "no socket is left behind");
}

#[test]
fn sighup_adds_and_removes_exports_while_an_unchanged_one_serves_on() {
    let d = dir();
    let (a, c) = (Image::new(32 * MIB), Image::new(32 * MIB));
    let sock = |n: &str| d.path().join(format!("{n}.sock"));
    let null_b = format!(
        "[[exports]]\nname = \"b\"\nsocket = \"{}\"\nbackend = \"null\"\nsize = \"16M\"\n\n",
        sock("b").display()
    );
    let config = d.path().join("exports.toml");
    write(&config, &(file_export("a", &sock("a"), &a) + &null_b));
    let mut daemon = Daemon::with_config(&config, &[&sock("a"), &sock("b")], &[]);

    // A guest on export a, connected while the file changes under it.
    let slot = GuestSlot::take();
    let va = Vm::start_in(
        &slot,
        &sock("a"),
        &Guest::test("fio"),
        &VmControl::default(),
    );
    assert!(
        daemon
            .wait_log_line("export a: connection 1: frontend connected", WAIT * 3)
            .is_some(),
        "{}",
        daemon.log_text()
    );

    // An invalid file changes nothing.
    write(
        &config,
        &(file_export("a", &sock("a"), &a) + "[[exports]]\nsocket = \"/x\"\nqueue-size = 3\n"),
    );
    daemon.signal(libc::SIGHUP);
    let kept = daemon
        .wait_log_line("is not applied; still serving a, b", WAIT)
        .unwrap_or_else(|| panic!("{}", daemon.log_text()));
    assert!(kept.contains(&config.display().to_string()), "{kept}");
    let log = daemon.log_text();
    assert!(
        log.contains("reload: exports[1].queue-size: 3 is not a power of two")
            && log.contains("reload: exports[1].disk: required with backend file"),
        "every problem is logged; log:\n{log}"
    );
    assert!(sock("b").exists());

    // b removed, c added, a unchanged.
    write(
        &config,
        &(file_export("a", &sock("a"), &a) + &file_export("c", &sock("c"), &c)),
    );
    daemon.signal(libc::SIGHUP);
    daemon.wait_socket(&sock("c"), true);
    daemon.wait_socket(&sock("b"), false);
    assert!(
        daemon
            .wait_log_line(
                "reload: 1 export(s) added, 1 removed, 0 restarted, 1 unchanged",
                WAIT
            )
            .is_some(),
        "{}",
        daemon.log_text()
    );
    let vc = start_pattern(&slot, &sock("c"));
    let rc = vc.wait();
    assert_landed(&rc, &c);
    let ra = va.wait();
    ra.expect_pass();
    daemon.assert_alive();
    let log = daemon.log_text();
    let reloaded = log
        .find("reload: 1 export(s) added")
        .expect("the reload is logged");
    assert!(
        log.find("export a: connection 1: frontend disconnected")
            .is_none_or(|at| at > reloaded),
        "the unchanged export's guest stays connected through the reloads; log:\n{log}"
    );
    assert!(
        !log.contains("export a: connection 2"),
        "its guest never had to reconnect; log:\n{log}"
    );
    drop(slot);
    daemon.sigterm();
    assert!(daemon.wait_exit(WAIT).expect("exits").success());
}

#[test]
fn ready_status_and_watchdog_cover_every_export() {
    let d = dir();
    let sock = |n: &str| d.path().join(format!("{n}.sock"));
    let null = |n: &str| {
        format!(
            "[[exports]]\nname = \"{n}\"\nsocket = \"{}\"\nbackend = \"null\"\nsize = \"1M\"\nnum-queues = 1\n\n",
            sock(n).display()
        )
    };
    let config = d.path().join("exports.toml");
    write(&config, &(null("a") + &null("b")));
    let mut notify = NotifySocket::new();
    let notify_path = notify.path().to_str().expect("utf-8").to_owned();
    let mut daemon = Daemon::with_config(
        &config,
        &[&sock("a"), &sock("b")],
        &[
            ("NOTIFY_SOCKET", notify_path.as_str()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let ready = notify.wait_for("READY=1", WAIT);
    assert!(
        ready.contains("STATUS=2 exports, 0 serving a frontend; 0 connection(s) served"),
        "{ready}"
    );
    let _frontend = std::os::unix::net::UnixStream::connect(sock("b"))
        .expect("every export listens when READY=1 is sent");
    notify.wait_for(
        "STATUS=2 exports, 1 serving a frontend (b); 1 connection(s) served",
        WAIT,
    );
    assert!(notify.count("WATCHDOG=1", Duration::from_secs(1)) >= 5);
    // Export a's serve loop frozen: no more pings, and the log says which export.
    let serve_a = threads_named(daemon.pid(), "serve:a");
    assert_eq!(serve_a.len(), 1, "{serve_a:?}");
    {
        let _frozen = stop_thread(serve_a[0]);
        notify.count("WATCHDOG=1", Duration::from_millis(300));
        assert_eq!(notify.count("WATCHDOG=1", Duration::from_secs(1)), 0);
    }
    assert!(notify.count("WATCHDOG=1", Duration::from_secs(1)) >= 4);
    assert!(
        daemon
            .log_text()
            .contains("watchdog: the serve loop stopped waiting for frontends (export a)"),
        "{}",
        daemon.log_text()
    );
    daemon.sigterm();
    notify.wait_for("STOPPING=1", WAIT);
    assert!(daemon.wait_exit(WAIT).expect("exits").success());
}

/// Config-file mode under socket activation, as corodev.service with one
/// corodev-export@NAME.socket per export runs it: each export takes the activated socket
/// named after it (the names in the other order than the file's, so matching is by name),
/// a guest on each one's socket writes its pattern to that export's image, and at SIGTERM
/// the activated sockets stay for the next process.
#[test]
fn socket_activated_exports_take_their_sockets_by_name() {
    // The activator starts corodev at the first connection (a guest's).
    let (mut daemon, sa, sb, _dir) = two_guests_on_two_exports(|config, sa, sb| {
        Daemon::with_config_activated(config, &[(sb, "vm-b"), (sa, "vm-a")])
    });
    let log = daemon.log_text();
    for name in ["vm-a", "vm-b"] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("export {name}: listening on"))
                    && l.contains("socket-activated")),
            "{name} listens on its activated socket; log:\n{log}"
        );
    }
    daemon.sigterm();
    assert!(daemon.wait_exit(WAIT).expect("exits on SIGTERM").success());
    assert!(
        sa.exists() && sb.exists(),
        "activated sockets belong to the activator and stay"
    );
}

/// A reload whose only export cannot start (its socket's directory is gone) leaves the
/// daemon up with no export, not exited: the next SIGHUP with a good file serves again,
/// and SIGTERM still ends it (exit 0) with nothing running.
#[test]
fn a_reload_that_starts_no_export_keeps_the_daemon_for_the_next() {
    let d = dir();
    let null = |name: &str, socket: &Path| {
        format!(
            "[[exports]]\nname = \"{name}\"\nsocket = \"{}\"\nbackend = \"null\"\nsize = \"16M\"\n",
            socket.display()
        )
    };
    let (b, z) = (d.path().join("b.sock"), d.path().join("gone/z.sock"));
    let config = d.path().join("exports.toml");
    write(&config, &null("b", &b));
    let mut daemon = Daemon::with_config(&config, &[&b], &[]);

    write(&config, &null("z", &z));
    daemon.signal(libc::SIGHUP);
    daemon.wait_socket(&b, false);
    std::thread::sleep(Duration::from_millis(500));
    daemon.assert_alive();
    let log = daemon.log_text();
    assert!(
        log.contains("reload: export z cannot start") && log.contains("no export is running"),
        "log:\n{log}"
    );

    write(&config, &null("b", &b));
    daemon.signal(libc::SIGHUP);
    daemon.wait_socket(&b, true);
    daemon.assert_alive();

    write(&config, &null("z", &z));
    daemon.signal(libc::SIGHUP);
    daemon.wait_socket(&b, false);
    assert!(daemon.wait_log_line("no export is running", WAIT).is_some());
    daemon.sigterm();
    let status = daemon
        .wait_exit(WAIT)
        .expect("SIGTERM ends a daemon with no export");
    assert!(status.success(), "{status}");
}

//! The daemon's own settings: a config file's `[daemon]` table (control socket, log
//! level) under socket activation, the log level changed by a reload, and log lines in
//! the journal's form when stderr is the journal (`JOURNAL_STREAM`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration::control::ctl;
use integration::{corodev_bin, Daemon};
use serde_json::json;

fn dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("corodev-set-")
        .tempdir()
        .expect("tempdir")
}

fn config(control: &Path, socket: &Path, level: &str) -> String {
    format!(
        "[daemon]\ncontrol = \"{}\"\nlog-level = \"{level}\"\n\n[[exports]]\nname = \"vm\"\nsocket = \"{}\"\nbackend = \"null\"\nsize = \"16M\"\n",
        control.display(),
        socket.display()
    )
}

#[test]
fn the_daemon_table_sets_an_activated_control_socket_and_a_level_a_reload_changes() {
    let d = dir();
    let (control, socket) = (d.path().join("control.sock"), d.path().join("vm.sock"));
    let file = d.path().join("corodev.toml");
    std::fs::write(&file, config(&control, &socket, "warn")).expect("write config");
    let mut daemon =
        Daemon::with_config_activated(&file, &[(&socket, "vm"), (&control, "control")]);
    // The activator listens on both sockets; corodev takes them over when it starts.
    let exports = ctl(&control, &["query-exports"]).json();
    assert_eq!(exports[0]["name"], "vm");
    assert_eq!(exports[0]["size"], 16 << 20);
    let log = daemon.log_text();
    assert!(
        !log.contains("listening on"),
        "log-level = warn keeps info lines out; log:\n{log}"
    );

    std::fs::write(&file, config(&control, &socket, "info")).expect("rewrite config");
    daemon.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !daemon.log_text().contains("reload: log level is now Info") {
        assert!(Instant::now() < deadline, "log:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let extra = d.path().join("extra.sock");
    let added = ctl(
        &control,
        &[
            "export-add",
            "name=extra",
            &format!("socket={}", extra.display()),
            "backend=null",
            "size=1M",
        ],
    );
    assert_eq!(added.json(), json!({}));
    let log = daemon.log_text();
    assert!(
        log.contains("control: export extra added"),
        "info lines are logged after the reload; log:\n{log}"
    );
    daemon.sigterm();
    assert!(daemon
        .wait_exit(Duration::from_secs(20))
        .expect("exits")
        .success());
    assert!(
        control.exists(),
        "an activated control socket belongs to its activator: left in place"
    );
    assert!(!extra.exists(), "a socket corodev bound is removed");
}

/// Runs corodev on a null export with stderr in a file, `JOURNAL_STREAM` set by
/// `journal` from that file's device and inode, until it listens; stops it and returns
/// its log.
fn log_with_journal_stream(journal: impl Fn(u64, u64) -> String) -> String {
    let d = dir();
    let (log, socket) = (d.path().join("log"), d.path().join("j.sock"));
    let logf = std::fs::File::create(&log).expect("log file");
    let meta = logf.metadata().expect("stat log");
    let mut child = Command::new(corodev_bin())
        .arg("--socket")
        .arg(&socket)
        .args(["--backend", "null", "--size", "1M", "--log-level", "info"])
        .env("JOURNAL_STREAM", journal(meta.dev(), meta.ino()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .expect("start corodev");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "corodev never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert!(child.wait().expect("wait").success());
    std::fs::read_to_string(&log).expect("read log")
}

#[test]
fn lines_carry_syslog_priorities_and_no_timestamp_when_stderr_is_the_journal() {
    let journal = log_with_journal_stream(|dev, ino| format!("{dev}:{ino}"));
    let lines: Vec<&str> = journal.lines().collect();
    assert!(!lines.is_empty());
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("<6>") || l.starts_with("<4>")),
        "every line starts with its priority; log:\n{journal}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>export j: listening on")),
        "log:\n{journal}"
    );
    let elsewhere = log_with_journal_stream(|dev, ino| format!("{dev}:{}", ino + 1));
    assert!(
        elsewhere
            .lines()
            .all(|l| l.starts_with('[') && l.contains(" INFO ")),
        "a JOURNAL_STREAM that is not our stderr (inherited) changes nothing; log:\n{elsewhere}"
    );
}

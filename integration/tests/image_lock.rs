//! Image locking against real processes: a second corodev on an image another corodev
//! writes is refused with one line naming the holder; corodev and a real
//! qemu-storage-daemon exclude each other both ways (same lock bytes as QEMU's
//! `locking=on`); read-only exports share; `--lock off` opts out; and the migration
//! hand-over: a `--incoming` daemon starts beside the writer but cannot start a ring until
//! the writer, with dirty logging on, has stopped every ring (a real vhost-user frontend
//! drives both). The full migration with a real guest is `migration.rs`.
//!
//! Always corodev against the servers named in each test.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use integration::frontend::TestFrontend;
use integration::{corodev_bin, Daemon, Image};

const MIB: u64 = 1 << 20;

/// Runs corodev on `image` with `args` until it exits (it is expected to refuse), and
/// checks it left no socket behind.
fn refused(image: &Image, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("refused.sock");
    let out = Command::new(corodev_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("--disk")
        .arg(&image.path)
        .args(args)
        .output()
        .expect("run corodev");
    assert!(
        !socket.exists(),
        "a refused daemon must not create its socket"
    );
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

/// Starts a corodev on `image` with `args` and asserts it exits 1 with exactly the locked
/// line naming `holder` and `conflict`.
fn assert_refused(image: &Image, args: &[&str], holder: &str, conflict: &str) {
    let out = refused(image, args);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), locked_line(&image.path, holder, conflict));
}

fn locked_line(path: &Path, holder: &str, conflict: &str) -> String {
    format!(
        "corodev: error: disk {} is locked: {holder} {conflict}; stop it first, or pass \
         --lock off if something else keeps the writers apart",
        path.display()
    )
}

#[test]
fn second_corodev_is_refused_naming_the_first() {
    let image = Image::new(16 * MIB);
    let first = Daemon::corodev(&image, &[]);
    let holder = format!("corodev (pid {})", first.pid());
    assert_refused(&image, &[], &holder, "does not share write access to it");
    // A read-only export is refused too: the first one writes.
    assert_refused(&image, &["--readonly"], &holder, "has it open for writing");
    // Opting out is possible, and said so in the message.
    let mut second = Daemon::corodev(&image, &["--lock", "off"]);
    second.assert_alive();
}

#[test]
fn read_only_exports_share_and_keep_writers_out() {
    let image = Image::new(16 * MIB);
    let mut r1 = Daemon::corodev(&image, &["--readonly"]);
    let mut r2 = Daemon::corodev(&image, &["--readonly"]);
    r1.assert_alive();
    r2.assert_alive();
    let out = refused(&image, &[]);
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "corodev: error: disk {} is locked: corodev (pid ",
            image.path.display()
        )) && err.contains(&format!("(pid {})", r1.pid()))
            && err.contains(&format!("(pid {})", r2.pid()))
            && err.contains("does not share write access to it"),
        "both readers are named: {err}"
    );
    // qemu-storage-daemon's read-only export shares with them as well.
    let mut qsd = Daemon::qsd(&image, &["--readonly"]);
    qsd.assert_alive();
    r1.assert_alive();
}

#[test]
fn qemu_storage_daemon_and_corodev_exclude_each_other() {
    let image = Image::new(16 * MIB);
    {
        let qsd = Daemon::qsd(&image, &[]);
        // /proc/PID/comm keeps the first 15 bytes of the name. qsd's export shares write
        // access itself (byte 201 free), so what stops corodev is its own refusal to share
        // it with the writer on byte 101.
        let holder = format!("qemu-storage-da (pid {})", qsd.pid());
        assert_refused(&image, &[], &holder, "has it open for writing");
    }
    let corodev = Daemon::corodev(&image, &[]);
    let out = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            image.path.display()
        ))
        .arg("--export")
        .arg("type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/nonexistent/x.sock,writable=on")
        .output()
        .expect("run qemu-storage-daemon");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "qsd must refuse the image corodev holds"
    );
    assert!(
        err.contains("Failed to get \"write\" lock")
            || err.contains("Failed to get shared \"write\" lock"),
        "qsd names the write lock corodev holds (pid {}):\n{err}",
        corodev.pid()
    );
}

#[test]
fn incoming_daemon_takes_the_write_lock_only_after_the_source_stops() {
    let image = Image::new(16 * MIB);
    let source = Daemon::corodev(&image, &[]);
    let mut fe = TestFrontend::connect_logged(&source.socket, 1, 128).expect("source frontend");
    let dest = Daemon::corodev(&image, &["--incoming"]);
    assert!(dest
        .wait_log_line(
            "incoming: write lock taken when the guest starts here",
            Duration::from_secs(5)
        )
        .is_some());

    // The guest cannot start on the destination while the source writes.
    let early = TestFrontend::connect(&dest.socket, 1, 128);
    let line = dest
        .wait_log_line("queue 0: not starting", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no refusal; log:\n{}", dest.log_text()));
    assert!(
        line.ends_with(&format!(
            "queue 0: not starting: disk {} is locked: corodev (pid {}) does not share write access to it; stop it first, or pass --lock off if something else keeps the writers apart",
            image.path.display(),
            source.pid()
        )),
        "{line}"
    );
    drop(early);

    // Stopping a ring without logging (a paused VM) keeps the lock: only a migration
    // hands it over.
    fe.stop_queue(0).expect("GET_VRING_BASE");
    assert!(source
        .wait_log_line("write lock released", Duration::from_millis(500))
        .is_none());
    fe.restart_queue(0).expect("restart");
    fe.set_logging(true).expect("dirty logging on");
    fe.stop_queue(0).expect("GET_VRING_BASE");
    assert!(
        source
            .wait_log_line(
                "write lock released: every ring stopped during a migration",
                Duration::from_secs(5)
            )
            .is_some(),
        "{}",
        source.log_text()
    );

    let _running =
        TestFrontend::connect(&dest.socket, 1, 128).expect("the guest starts on the destination");
    assert!(
        dest.wait_log_line(
            "write lock taken: the guest runs here",
            Duration::from_secs(5)
        )
        .is_some(),
        "{}",
        dest.log_text()
    );
    // Now the destination is the one writer.
    let out = refused(&image, &[]);
    assert!(
        stderr(&out).contains(&format!(
            "corodev (pid {}) does not share write access",
            dest.pid()
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_frontend_leaving_with_every_ring_stopped_hands_the_lock_over() {
    let image = Image::new(16 * MIB);
    let source = Daemon::corodev(&image, &[]);
    let dest = Daemon::corodev(&image, &["--incoming"]);

    // A frontend that vanishes with a ring running (QEMU killed) keeps the lock: it will
    // reconnect to the same guest.
    let fe = TestFrontend::connect(&source.socket, 1, 128).expect("frontend");
    drop(fe);
    assert!(source
        .wait_log_line(
            "connection 1: frontend disconnected",
            Duration::from_secs(5)
        )
        .is_some());
    let early = TestFrontend::connect(&dest.socket, 1, 128);
    assert!(
        dest.wait_log_line("queue 0: not starting", Duration::from_secs(10))
            .is_some(),
        "the source still holds the lock; log:\n{}",
        dest.log_text()
    );
    drop(early);

    // A paused VM migrating away: its rings are stopped, QEMU sends no dirty-log switch to
    // a stopped device, and the source QEMU just hangs up after the switch-over.
    let mut fe = TestFrontend::connect(&source.socket, 1, 128).expect("frontend");
    fe.stop_queue(0).expect("GET_VRING_BASE: the VM is paused");
    drop(fe);
    assert!(
        source
            .wait_log_line(
                "write lock released: the frontend left with every ring stopped",
                Duration::from_secs(5)
            )
            .is_some(),
        "{}",
        source.log_text()
    );
    let _resumed = TestFrontend::connect(&dest.socket, 1, 128).expect("the VM resumes here");
    assert!(dest
        .wait_log_line(
            "write lock taken: the guest runs here",
            Duration::from_secs(5)
        )
        .is_some());
    // The source's next guest is the one refused now.
    let _late = TestFrontend::connect(&source.socket, 1, 128);
    assert!(
        source
            .wait_log_line(
                &format!(
                    "not starting: disk {} is locked: corodev (pid {})",
                    image.path.display(),
                    dest.pid()
                ),
                Duration::from_secs(10)
            )
            .is_some(),
        "{}",
        source.log_text()
    );
}

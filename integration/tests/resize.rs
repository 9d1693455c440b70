//! `export-resize` (issue 13) through the control API's client, `corodev ctl`: a running
//! guest sees the new capacity without a reboot (the daemon sends vhost-user's
//! config-change message on the backend channel; QEMU reads the new config and raises the
//! config interrupt) and writes past the old end land on the grown image; refused sizes
//! get one clear line; an export resized with no frontend shows its new size to the next.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration::control::{ctl, CtlOutput};
use integration::{Daemon, Guest, Image, Vm};

const MIB: u64 = 1 << 20;
/// How long the guest may take to boot and print its size: a TCG boot takes 5-10 s, a
/// loaded 2-core machine several times that.
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);

/// corodev serving `image` as export `blk` (the socket's name), with its control API in
/// `dir`; the control socket's path.
fn daemon_with_control(image: &Image, dir: &Path) -> (Daemon, PathBuf) {
    let control = dir.join("control.sock");
    let daemon = Daemon::corodev(image, &["--control", control.to_str().expect("utf-8 path")]);
    daemon.wait_socket(&control, true);
    (daemon, control)
}

/// A temp dir under /tmp (socket paths must be short).
fn short_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("corodev-resize-")
        .tempdir_in("/tmp")
        .expect("temp dir")
}

/// `corodev ctl export-resize name=blk size=BYTES`.
fn export_resize(control: &Path, size: u64) -> CtlOutput {
    ctl(
        control,
        &["export-resize", "name=blk", &format!("size={size}")],
    )
}

/// The sizes, in 512-byte sectors, that the guest's `resize` test has printed so far
/// (`CORODEV-PROGRESS name=resize size=N`): the size at boot, then the new one.
fn sizes_seen(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.split("CORODEV-PROGRESS name=resize size=").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

#[test]
fn a_running_guest_sees_the_grown_disk_and_writes_past_its_old_end() {
    let image = Image::new(64 * MIB);
    let dir = short_dir();
    let (mut daemon, control) = daemon_with_control(&image, dir.path());
    let vm = Vm::start(daemon.socket(), &Guest::test("resize"));
    // Only a started device is told (QEMU ignores a config change before the driver
    // starts it): resize once the guest has read its size.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while sizes_seen(&vm.console()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the guest printed no size within {BOOT_TIMEOUT:?}:\n{}",
            vm.console()
        );
        daemon.assert_alive();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        sizes_seen(&vm.console()),
        [64 * MIB / 512],
        "/sys/block/vda/size before the resize"
    );

    let out = export_resize(&control, 128 * MIB);
    assert_eq!(
        out.json(),
        serde_json::json!({"old-size": 64 * MIB, "size": 128 * MIB}),
        "export-resize answers the old and the new size"
    );
    assert!(
        daemon
            .wait_log_line(
                "export blk: frontend told of the new size",
                Duration::from_secs(10)
            )
            .is_some(),
        "QEMU acknowledged the config change (after its GET_CONFIG):\n{}",
        daemon.log_text()
    );

    let mut run = vm.wait_while(|| None);
    run.server_log = Some(daemon.log_text());
    let r = run.expect_pass();
    assert_eq!(
        (r.num("old_size"), r.num("new_size")),
        (64 * MIB / 512, 128 * MIB / 512),
        "/sys/block/vda/size before and after, without a reboot"
    );
    assert_ne!(
        r.get("kmsg"),
        "none",
        "the guest kernel logged the capacity change"
    );
    assert_eq!(
        (r.num("offset"), r.num("length")),
        (64 * MIB, MIB),
        "written at the old end"
    );
    daemon.assert_alive();
    assert_eq!(
        std::fs::metadata(&image.path).expect("stat image").len(),
        128 * MIB,
        "the image file grew"
    );
    assert_eq!(
        image.md5(64 * MIB, MIB as usize),
        r.get("md5"),
        "the guest's write past the old end is on the image"
    );
}

#[test]
fn refused_sizes_get_one_line_and_the_next_guest_sees_a_size_set_while_none_was_connected() {
    let image = Image::new(32 * MIB);
    let dir = short_dir();
    let (mut daemon, control) = daemon_with_control(&image, dir.path());
    for (size, why) in [
        (
            32 * MIB + 100,
            "export blk: cannot resize to 33554532 bytes: not a positive multiple of its 512-byte block size",
        ),
        (
            0,
            "export blk: cannot resize to 0 bytes: not a positive multiple of its 512-byte block size",
        ),
        (
            16 * MIB,
            "export blk: cannot shrink from 33554432 to 16777216 bytes",
        ),
    ] {
        let out = export_resize(&control, size);
        assert_ne!(out.code, 0, "size {size} must be refused: {}", out.stdout);
        assert!(
            out.stderr.contains(why) && out.stderr.trim().lines().count() == 1,
            "size {size}: one line saying {why:?}, got: {}",
            out.stderr
        );
    }
    let out = ctl(&control, &["export-resize", "name=blk", "size=12Q"]);
    assert_eq!(
        out.stderr.trim(),
        "corodev ctl: error: GenericError: export-resize: argument 'size': unknown size suffix 'Q' in '12Q': use K, M, G or T"
    );
    let out = ctl(&control, &["export-resize", "name=nope", "size=1048576"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("no export named 'nope' is running"),
        "{}",
        out.stderr
    );
    assert_eq!(
        std::fs::metadata(&image.path).expect("stat image").len(),
        32 * MIB,
        "nothing refused changed the image"
    );

    // A size as people type it.
    let out = ctl(&control, &["export-resize", "name=blk", "size=48M"]);
    assert_eq!(
        out.json(),
        serde_json::json!({"old-size": 32 * MIB, "size": 48 * MIB})
    );
    let run = daemon.boot(Guest::test("info"));
    run.expect_pass();
    assert_eq!(
        run.info().num("size"),
        48 * MIB / 512,
        "the next frontend reads the new size"
    );
    daemon.assert_alive();
}

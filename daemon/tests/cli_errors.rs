//! Bad invocations fail with one clear line, a non-zero exit, and leave nothing behind.

use std::path::Path;
use std::process::Command;

fn corodev(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_corodev"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run corodev");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts one error line naming `needle`, and that the socket file was not created.
fn assert_refused(args: &[&str], socket: &Path, needle: &str) {
    let (code, stderr) = corodev(args);
    assert_ne!(code, 0, "must fail: {args:?}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.iter().any(|l| l.contains(needle)),
        "stderr must mention '{needle}': {stderr}"
    );
    assert!(
        lines.len() <= 3,
        "error should be short (clap adds a usage hint at most): {stderr}"
    );
    assert!(!socket.exists(), "no socket may be left behind: {args:?}");
}

#[test]
fn refuses_bad_invocations_without_side_effects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let s = sock.to_str().expect("utf8 path");
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![7u8; 1000]).expect("write image");
    let i = img.to_str().expect("utf8 path");
    let missing = dir.path().join("missing.img");
    let m = missing.to_str().expect("utf8 path");

    assert_refused(&["--socket", s, "--disk", m], &sock, "cannot open disk");
    assert_refused(
        &["--socket", s, "--disk", i],
        &sock,
        "not a multiple of the 512-byte block size",
    );
    assert_refused(
        &["--socket", s, "--disk", i, "--queue-size", "100"],
        &sock,
        "not a power of two",
    );
    assert_refused(
        &["--socket", s, "--disk", i, "--block-size", "1000"],
        &sock,
        "512 or 4096",
    );
    assert_refused(
        &["--socket", s],
        &sock,
        "--disk: required with backend file (or use backend null with a size)",
    );
    assert_refused(
        &[
            "--socket",
            s,
            "--disk",
            i,
            "--stack-mode",
            "shared",
            "--coroutine-backend",
            "ucontext",
        ],
        &sock,
        "--stack-mode: shared needs a register-switch coroutine backend",
    );
    assert_refused(&["--socket", s, "--backend", "null"], &sock, "--size");
    // Every problem at once, one line each.
    let (code, stderr) = corodev(&[
        "--socket",
        s,
        "--disk",
        i,
        "--queue-size",
        "100",
        "--block-size",
        "1000",
    ]);
    assert_eq!(code, 2);
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            "corodev: error: --queue-size: 100 is not a power of two between 2 and 32768: use e.g. 128 or 256",
            "corodev: error: --block-size: 1000 is not a supported block size: use 512 or 4096",
        ]
    );
    assert_refused(
        &["--config", i, "--disk", i],
        &sock,
        "error: --disk is an export flag, and --config FILE describes every export: put it in the file's [[exports]] table, or drop --config",
    );
    assert_eq!(
        std::fs::read(&img).expect("read image"),
        vec![7u8; 1000],
        "the image must be untouched"
    );
}

#[test]
fn refuses_a_socket_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("live.sock");
    let _live = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let (code, stderr) = corodev(&[
        "--socket",
        sock.to_str().expect("utf8"),
        "--backend",
        "null",
        "--size",
        "1M",
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("in use by a running daemon"), "{stderr}");
    assert!(
        sock.exists(),
        "the live daemon's socket must not be removed"
    );
}

#[test]
fn help_has_examples() {
    let out = Command::new(env!("CARGO_BIN_EXE_corodev"))
        .arg("--help")
        .output()
        .expect("run corodev --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        help.contains("Examples:") && help.contains("vhost-user-blk-pci"),
        "{help}"
    );
}

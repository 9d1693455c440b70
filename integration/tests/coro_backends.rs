//! The coroutine backends and stack modes other than the default, each serving a real guest:
//! the static musl build (which has no ucontext and runs the `sigaltstack` backend), the
//! `thread` backend, and the shared stack.
//! The coro crate's own suites run every backend; these prove the daemon's whole request path
//! (parse, io_uring, completion, interrupts) on them, with a real kernel driver.

use std::process::Command;

use integration::server::corodev_musl_bin;
use integration::{corodev_bin, Daemon, Guest, Image};

const MIB: u64 = 1 << 20;

/// Whether the ELF file at `path` asks for a dynamic loader (has a `PT_INTERP` segment).
fn has_interpreter(path: &std::path::Path) -> bool {
    let elf = std::fs::read(path).expect("read the binary");
    assert_eq!(
        &elf[..4],
        b"\x7fELF",
        "{} is not an ELF file",
        path.display()
    );
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let ph = phoff + i * phentsize;
        u32::from_le_bytes(elf[ph..ph + 4].try_into().expect("4 bytes")) == 3 // PT_INTERP
    })
}

#[test]
fn static_musl_build_serves_a_real_guest_on_sigaltstack() {
    let musl = corodev_musl_bin();
    assert!(
        !has_interpreter(&musl),
        "{} must be statically linked (no ELF interpreter)",
        musl.display()
    );
    assert!(
        has_interpreter(&corodev_bin()),
        "the check itself must tell a dynamic binary apart"
    );
    let image = Image::new(64 * MIB);
    // The default backend, `fast`, needs makecontext; musl has none, so it runs sigaltstack.
    let mut daemon = Daemon::corodev_at(&musl, &image, &["--num-queues", "2"]);
    daemon.assert_pattern_lands(&image);
    let log = daemon.log_text();
    assert!(
        log.contains("sigaltstack coroutines"),
        "the musl build must run the sigaltstack backend; log:\n{log}"
    );
    // fio with verification on both queues, on the same daemon.
    let run = daemon.boot(Guest::test("fio"));
    assert_eq!(run.expect_pass().get("jobs"), "2");
    daemon.assert_alive();
}

#[test]
fn static_musl_build_refuses_ucontext_in_one_line() {
    let out = Command::new(corodev_musl_bin())
        .args([
            "--backend",
            "null",
            "--size",
            "1M",
            "--socket",
            "/nonexistent/s",
        ])
        .args(["--coroutine-backend", "ucontext"])
        .output()
        .expect("run the musl build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line, naming problem and fix: {stderr}");
    assert!(
        lines[0].contains("--coroutine-backend")
            && lines[0].contains("ucontext")
            && lines[0].contains("use sigaltstack or thread"),
        "{stderr}"
    );
}

#[test]
fn thread_backend_serves_a_real_guest() {
    let image = Image::new(64 * MIB);
    let mut daemon = Daemon::corodev(
        &image,
        &["--coroutine-backend", "thread", "--num-queues", "2"],
    );
    daemon.assert_pattern_lands(&image);
    let log = daemon.log_text();
    assert!(log.contains("thread coroutines"), "log:\n{log}");
    let run = daemon.boot(Guest::test("fio"));
    assert_eq!(run.expect_pass().get("jobs"), "2");
    daemon.assert_alive();
}

/// `--stack-mode shared` under a real guest: fio's verified random writes, two jobs at
/// QD16, so requests park on io_uring while others run on the worker's one shared stack
/// (their stack bytes copied out and back). corodev only: qsd has no such option.
#[test]
fn fio_verified_randwrite_on_the_shared_stack() {
    fio_on_the_shared_stack(&["--stack-mode", "shared"]);
}

/// The same with the sigaltstack backend, whose bootstrap leaves a dead signal frame above
/// each parked trampoline that the shared stack must not save or trust.
#[test]
fn fio_verified_randwrite_on_the_shared_stack_sigaltstack() {
    fio_on_the_shared_stack(&[
        "--stack-mode",
        "shared",
        "--coroutine-backend",
        "sigaltstack",
    ]);
}

fn fio_on_the_shared_stack(args: &[&str]) {
    let image = Image::new(64 * MIB);
    let mut daemon = Daemon::corodev(&image, args);
    let run = daemon.boot(Guest::test("fio"));
    let r = run.expect_pass();
    assert_eq!(r.get("jobs"), "2");
    daemon.assert_alive();
    assert!(
        daemon.log_text().contains("shared stacks"),
        "the daemon must report the shared stack mode: {}",
        daemon.log_text()
    );
}

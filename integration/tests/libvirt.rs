//! corodev behind libvirt, the way most people attach disks to QEMU (issue 13): a private
//! libvirtd ([`Libvirtd`], in its own mount namespace) defines and starts a TCG domain from
//! `integration/libvirt/domain.xml` (the README's "With libvirt" example) whose disk is
//! `<disk type='vhostuser'>` on corodev's socket, with guest RAM in a shared memfd, direct
//! kernel boot of the test guest and its serial console in a file. The guest's verified I/O
//! must land: the `pattern` test's data on the host image (md5), then fio's verified
//! random writes from a second domain on the same corodev.
//!
//! Always corodev, never skipped: without libvirt (or root) the tests fail and say to run
//! `scripts/install-deps.sh`.

use std::time::{Duration, Instant};

use integration::libvirt::{domain_template, DOMAIN_TEMPLATE};
use integration::{workspace, Daemon, Guest, Image, Libvirtd};

const MIB: u64 = 1 << 20;

/// The socket path the README's example uses.
const README_SOCKET: &str = "/run/corodev/vm1.sock";
/// The queues the README's example uses (as its `corodev --num-queues 2`).
const README_QUEUES: &str = "2";

#[test]
fn libvirt_domain_on_corodev_pattern_lands_and_fio_verifies() {
    let started = Instant::now();
    let image = Image::new(64 * MIB);
    let mut daemon = Daemon::corodev(&image, &[]);
    let libvirtd = Libvirtd::start();

    eprintln!("libvirt: workload 1: the guest writes a 4 MiB pattern at 1 MiB");
    let domain = libvirtd.boot(daemon.socket(), &Guest::test("pattern"));
    // The domain's QEMU got the disk as the XML says: a vhost-user-blk device on corodev's
    // socket that reconnects, and guest RAM QEMU can share with it.
    let log = domain.qemu_log();
    let socket = daemon.socket().display().to_string();
    for want in [
        "\"driver\":\"vhost-user-blk-pci\"",
        "\"num-queues\":1",
        &format!("path={socket},reconnect=1"),
        "\"qom-type\":\"memory-backend-memfd\"",
        "\"share\":true",
        "-accel tcg",
    ] {
        assert!(
            log.contains(want),
            "the domain's QEMU command line has no {want:?}:\n{log}"
        );
    }
    let daemon_alive = |daemon: &mut Daemon| {
        daemon
            .wait_exit(Duration::ZERO)
            .map(|s| format!("corodev exited ({s})"))
    };
    let mut run = domain.wait_while(|| daemon_alive(&mut daemon));
    run.server_log = Some(daemon.log_text());
    let r = daemon.assert_pattern_landed(&image, &run);
    assert_eq!((r.num("offset"), r.num("length")), (MIB, 4 * MIB));
    assert!(
        image.read(0, MIB as usize).iter().all(|&b| b == 0),
        "nothing written before the pattern"
    );
    assert!(
        daemon
            .wait_log_line(
                "connection 1: frontend disconnected",
                Duration::from_secs(10)
            )
            .is_some(),
        "the domain's QEMU hung up when the guest powered off; log:\n{}",
        daemon.log_text()
    );
    eprintln!(
        "libvirt: pattern md5 {} is on the host image ({:.1} s so far)",
        r.get("md5"),
        started.elapsed().as_secs_f64()
    );

    eprintln!(
        "libvirt: workload 2: fio verified random writes, 2 jobs x 8 MiB, from a second domain"
    );
    let domain = libvirtd.boot(daemon.socket(), &Guest::test("fio"));
    let mut run = domain.wait_while(|| daemon_alive(&mut daemon));
    run.server_log = Some(daemon.log_text());
    let r = run.expect_pass();
    assert_eq!(r.get("jobs"), "2");
    daemon.assert_alive();
    for job in 0..2 {
        assert!(
            image
                .read(job * 8 * MIB, 8 * MIB as usize)
                .iter()
                .any(|&b| b != 0),
            "fio job {job}'s region is still zero on the host"
        );
    }
    assert!(
        daemon
            .log_text()
            .contains("connection 2: frontend connected"),
        "the second domain must be corodev's second connection; log:\n{}",
        daemon.log_text()
    );
    eprintln!(
        "libvirt: fio verified {} write IOPS; {:.1} s in all",
        r.get("write_iops"),
        started.elapsed().as_secs_f64()
    );
}

/// The lines of `text` from the one containing `open` to the next containing `close`, each
/// trimmed: a block of the XML, compared without its indentation.
fn block(text: &str, open: &str, close: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with(open))
        .unwrap_or_else(|| panic!("no {open} line in:\n{text}"));
    let len = lines[start..]
        .iter()
        .position(|l| l.starts_with(close))
        .unwrap_or_else(|| panic!("no {close} after {open} in:\n{text}"));
    lines[start..=start + len]
        .iter()
        .map(|l| (*l).to_owned())
        .collect()
}

/// The README shows the parts of the tested template a user needs (shared guest memory,
/// the vhost-user disk) exactly as the test boots them, with the example's socket and
/// queues: the two cannot drift apart.
#[test]
fn readme_shows_the_tested_domain_xml() {
    let template = domain_template();
    // The XML after the leading comment (which names the blocks too).
    let (_, body) = template
        .split_once("-->")
        .unwrap_or_else(|| panic!("{DOMAIN_TEMPLATE} starts with a comment"));
    let template = body
        .replace("@SOCKET@", README_SOCKET)
        .replace("@QUEUES@", README_QUEUES);
    let readme = std::fs::read_to_string(workspace().join("README.md")).expect("README.md");
    assert!(
        readme.contains(DOMAIN_TEMPLATE),
        "the README must point to {DOMAIN_TEMPLATE}"
    );
    let readme_lines: Vec<&str> = readme.lines().map(str::trim).collect();
    for (open, close) in [
        ("<memoryBacking>", "</memoryBacking>"),
        ("<disk type='vhostuser'", "</disk>"),
    ] {
        let want = block(&template, open, close);
        assert!(
            readme_lines.windows(want.len()).any(|w| w == want),
            "the README's \"With libvirt\" section must show {DOMAIN_TEMPLATE}'s {open} \
             block (socket {README_SOCKET}, queues {README_QUEUES}):\n{}",
            want.join("\n")
        );
    }
}

//! corodev behind libvirt, the way most people attach disks to QEMU (issue 13): a private
//! libvirtd ([`Libvirtd`], in its own mount namespace) defines and starts a TCG domain from
//! `integration/libvirt/domain.xml` (the README's "With libvirt" example) whose disk is
//! `<disk type='vhostuser'>` on corodev's socket, with guest RAM in a shared memfd, direct
//! kernel boot of the test guest and its serial console in a file. The guest's verified I/O
//! must land: the `pattern` test's data on the host image (md5), then fio's verified
//! random writes from a second domain on the same corodev. And the `<reconnect>` of the
//! disk: corodev killed (SIGKILL) and started again on its socket while the guest's
//! writers verify every write, libvirt's QEMU reconnects by itself and the guest's I/O goes
//! on, with no error and the host image as the guest wrote it.
//!
//! Always corodev, never skipped: without libvirt (or root) the tests fail and say to run
//! `scripts/install-deps.sh`.

use std::time::{Duration, Instant};

use integration::libvirt::{domain_template, Domain, DOMAIN_TEMPLATE};
use integration::migration::CONSOLE_ERRORS;
use integration::{workspace, Daemon, Guest, Image, Libvirtd, Progress};

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
        "the domain's QEMU must hang up when the guest powers off; log:\n{}",
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
        "libvirt: fio verified every write ({} write IOPS); {:.1} s in all",
        r.get("write_iops"),
        started.elapsed().as_secs_f64()
    );
}

/// How long the restart guest may take to boot and start writing, and to write again after
/// corodev is back (QEMU reconnects once a second).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);
/// Verified guest writes before the kill, and after the restart.
const WRITES_BETWEEN: u64 = 3;

/// Waits until the guest has verified at least `writes` writes (its `CORODEV-PROGRESS`
/// lines); fails on a guest I/O error, a console line saying the disk broke, the domain
/// leaving `running`, corodev exiting, or no progress within `timeout`. Returns the writes.
fn wait_writes(
    domain: &Domain<'_>,
    daemon: &mut Daemon,
    writes: u64,
    timeout: Duration,
    what: &str,
) -> u64 {
    let deadline = Instant::now() + timeout;
    let fail = |why: String, daemon: &Daemon| -> ! {
        panic!(
            "{what}: {why}\n--- console ---\n{}\n--- QEMU log ---\n{}\n{}",
            domain.console(),
            domain.qemu_log(),
            daemon.all_logs()
        )
    };
    loop {
        let console = domain.console();
        let p = Progress::latest(&console);
        let done = p.as_ref().map_or(0, |p| p.get("writes"));
        let errors = p.as_ref().map_or(0, |p| p.get("errors"));
        if errors > 0 {
            fail(format!("the guest counted {errors} I/O error(s)"), daemon);
        }
        if let Some(line) = console
            .lines()
            .find(|l| CONSOLE_ERRORS.iter().any(|e| l.contains(e)))
        {
            fail(format!("the console says {line:?}"), daemon);
        }
        if done >= writes {
            return done;
        }
        let state = domain.state();
        if state != "running" {
            fail(format!("the domain is {state:?}, not running"), daemon);
        }
        if let Some(status) = daemon.wait_exit(Duration::ZERO) {
            fail(format!("corodev exited ({status})"), daemon);
        }
        if Instant::now() >= deadline {
            fail(
                format!("the guest verified {done} write(s), not {writes}, within {timeout:?}"),
                daemon,
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn libvirt_qemu_reconnects_to_a_restarted_corodev_and_guest_io_goes_on() {
    let started = Instant::now();
    // The restart guest's 8 regions of 8 MiB from offset 0; the stop word at the end.
    let image = Image::new(128 * MIB);
    let mut daemon = Daemon::corodev(&image, &[]);
    let libvirtd = Libvirtd::start();
    let mut guest = Guest::test("restart");
    guest.arg = Some("150"); // the guest's own cap, should the stop word never come
    guest.mem_mib = 512; // the writers keep a copy of their 64 MiB
    guest.timeout = Duration::from_secs(240);
    eprintln!("libvirt: workload: 8 guest writers, every write read back and compared");
    let domain = libvirtd.boot(daemon.socket(), &guest);
    let before = wait_writes(
        &domain,
        &mut daemon,
        WRITES_BETWEEN,
        BOOT_TIMEOUT,
        "guest start",
    );

    eprintln!("libvirt: guest verified {before} writes; killing corodev (SIGKILL)");
    let killed = Instant::now();
    daemon.signal(libc::SIGKILL);
    assert!(
        daemon.wait_exit(Duration::from_secs(30)).is_some(),
        "corodev not reaped 30 s after SIGKILL"
    );
    // Nothing completes while no server runs; the guest prints its count every 0.2 s.
    std::thread::sleep(Duration::from_millis(500));
    let at_kill = Progress::latest(&domain.console()).map_or(0, |p| p.get("writes"));
    assert_eq!(
        domain.state(),
        "running",
        "the domain must outlive its disk server"
    );
    eprintln!(
        "libvirt: starting corodev again on {}",
        daemon.socket().display()
    );
    daemon.respawn(None);
    assert!(
        daemon
            .wait_log_line("frontend connected", PROGRESS_TIMEOUT)
            .is_some(),
        "libvirt's QEMU did not reconnect to the restarted corodev; QEMU log:\n{}\n{}",
        domain.qemu_log(),
        daemon.all_logs()
    );
    let after = wait_writes(
        &domain,
        &mut daemon,
        at_kill + WRITES_BETWEEN,
        PROGRESS_TIMEOUT,
        "after the restart",
    );
    eprintln!(
        "libvirt: QEMU reconnected; the guest verified {} more writes, {:.1} s after the kill",
        after - at_kill,
        killed.elapsed().as_secs_f64()
    );
    let log = daemon.log_text();
    let resubmits: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("left in flight by the previous daemon"))
        .collect();
    eprintln!(
        "libvirt: requests the killed corodev left in flight: {}",
        if resubmits.is_empty() {
            "none at this kill (restart.rs is the test that makes sure there are some)".to_owned()
        } else {
            resubmits.join("; ")
        }
    );

    eprintln!("libvirt: telling the guest to stop and check every block");
    image.tell_guest_to_stop();
    let mut run = domain.wait_while(|| {
        daemon
            .wait_exit(Duration::ZERO)
            .map(|s| format!("corodev exited ({s})"))
    });
    run.server_log = Some(daemon.all_logs());
    let r = run.expect_pass();
    assert_eq!(
        r.get("stopped"),
        "host",
        "the guest stops on the host's word"
    );
    assert_eq!(r.num("errors"), 0, "guest I/O errors");
    assert_eq!(r.get("dmesg"), "clean", "guest kernel log");
    assert_eq!((r.num("offset"), r.num("length")), (0, 64 * MIB));
    daemon.assert_alive();
    assert_eq!(
        image.md5(0, 64 * MIB as usize),
        r.get("md5"),
        "the host image must hold exactly what the guest wrote"
    );
    eprintln!(
        "libvirt: guest verified {} writes and every block at the end; host image md5 {} \
         matches; {:.1} s in all",
        r.num("writes"),
        r.get("md5"),
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

//! The RBD backend against a real Ceph cluster (scripts/ceph-cluster.sh, brought up and torn
//! down by each test): a real guest writes through corodev into an RBD image, and the host
//! reads the image back through librbd's own tool (`rbd export`), never through corodev.
//! Start-up failures (bad pool, bad image, no cluster) are one line and a non-zero exit.
//!
//! Needs root (the Ceph daemons run as root here) and Ceph 16.2 (scripts/install-deps.sh).

use std::process::Command;
use std::time::{Duration, Instant};

use integration::{corodev_bin, CephCluster, Daemon, Guest};

const MIB: u64 = 1 << 20;

#[test]
fn pattern_written_by_guest_is_in_the_rbd_image() {
    let cluster = CephCluster::up();
    eprintln!("ceph cluster up in {:.1} s", cluster.bring_up.as_secs_f64());
    cluster.create_image("pattern", 64);
    let mut daemon = Daemon::corodev_rbd(&cluster.conf, "rbd", "pattern", &[]);
    let run = daemon.boot(Guest::test("pattern"));
    let r = run.expect_pass();
    let (offset, len) = (r.num("offset") as usize, r.num("length") as usize);
    assert_eq!((offset as u64, len as u64), (MIB, 4 * MIB));
    daemon.assert_alive();
    // SIGTERM while waiting for the next frontend: the daemon closes the image before it
    // exits, so it leaves no exclusive lock and no watch behind for the next opener (a
    // restarted daemon or QEMU) to wait out.
    daemon.sigterm();
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("corodev exits within 10 s of SIGTERM");
    assert!(status.success(), "exit status {status}");
    let locks = String::from_utf8_lossy(&cluster.rbd(&["lock", "ls", "rbd/pattern"])).into_owned();
    assert_eq!(locks.trim(), "", "no lock left on the image");
    let watchers = String::from_utf8_lossy(&cluster.rbd(&["status", "rbd/pattern"])).into_owned();
    assert_eq!(
        watchers.trim(),
        "Watchers: none",
        "no watch left on the image"
    );
    drop(daemon);
    let image = cluster.export("pattern");
    assert_eq!(
        image.len() as u64,
        64 * MIB,
        "rbd export returns the whole image"
    );
    assert_eq!(
        format!("{:x}", md5::compute(&image[offset..offset + len])),
        r.get("md5"),
        "the RBD image must hold exactly what the guest wrote"
    );
    assert!(
        image[..offset].iter().all(|&b| b == 0),
        "nothing written before it"
    );
}

/// An RBD export from a config file, next to a null export in the same process: the
/// file's rbd keys reach the backend (a guest's pattern is what `rbd export` reads back),
/// and SIGTERM closes the image (no lock left) and removes both sockets.
#[test]
fn rbd_export_from_a_config_file() {
    let cluster = CephCluster::up();
    cluster.create_image("cfg", 64);
    let dir = tempfile::tempdir().expect("tempdir");
    let (rbd_sock, null_sock) = (dir.path().join("rbd.sock"), dir.path().join("null.sock"));
    let config = dir.path().join("exports.toml");
    std::fs::write(
        &config,
        format!(
            "[[exports]]\nname = \"vm-rbd\"\nsocket = \"{}\"\nbackend = \"rbd\"\n\
             rbd-pool = \"rbd\"\nrbd-image = \"cfg\"\nceph-conf = \"{}\"\n\n\
             [[exports]]\nname = \"scratch\"\nsocket = \"{}\"\nbackend = \"null\"\nsize = \"1G\"\n",
            rbd_sock.display(),
            cluster.conf.display(),
            null_sock.display()
        ),
    )
    .expect("write the config");
    let mut daemon = Daemon::with_config(&config, &[&rbd_sock, &null_sock], &[]);
    let run = daemon.boot(Guest::test("pattern"));
    let r = run.expect_pass();
    let (offset, len) = (r.num("offset") as usize, r.num("length") as usize);
    daemon.sigterm();
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("corodev exits within 10 s of SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(
        !rbd_sock.exists() && !null_sock.exists(),
        "both sockets removed"
    );
    let locks = String::from_utf8_lossy(&cluster.rbd(&["lock", "ls", "rbd/cfg"])).into_owned();
    assert_eq!(locks.trim(), "", "the image is closed at exit");
    let image = cluster.export("cfg");
    assert_eq!(
        format!("{:x}", md5::compute(&image[offset..offset + len])),
        r.get("md5"),
        "the guest's pattern is in the RBD image named in the config file"
    );
}

/// Runs corodev with `args` and expects it to exit non-zero within `within`, printing one
/// `corodev: error:` line that contains every one of `words`.
fn expect_start_failure(args: &[&str], words: &[&str], within: Duration) {
    let dir = tempfile::tempdir().expect("temp dir");
    let start = Instant::now();
    let out = Command::new(corodev_bin())
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .args(args)
        .output()
        .expect("run corodev");
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("corodev: error:"))
        .collect();
    assert!(
        !out.status.success(),
        "corodev {args:?} must fail; stderr:\n{stderr}"
    );
    assert_eq!(errors.len(), 1, "one error line; stderr:\n{stderr}");
    for w in words {
        assert!(errors[0].contains(w), "'{w}' missing from: {}", errors[0]);
    }
    assert!(took < within, "took {took:?}, more than {within:?}");
    assert!(!dir.path().join("s.sock").exists(), "no socket left behind");
}

#[test]
fn bad_pool_bad_image_and_no_cluster_fail_with_one_line() {
    let cluster = CephCluster::up();
    cluster.create_image("exists", 8);
    let conf = cluster.conf.to_str().expect("utf-8 path");
    let rbd = |pool: &'static str, image: &'static str| {
        vec![
            "--backend",
            "rbd",
            "--ceph-conf",
            conf,
            "--rbd-pool",
            pool,
            "--rbd-image",
            image,
        ]
    };
    expect_start_failure(
        &rbd("nopool", "exists"),
        &["pool 'nopool' does not exist"],
        Duration::from_secs(30),
    );
    expect_start_failure(
        &rbd("rbd", "noimage"),
        &["image 'noimage' does not exist in pool 'rbd'"],
        Duration::from_secs(30),
    );
    drop(cluster);
    // The cluster is gone: its conf names a monitor nobody listens on any more.
    let dir = tempfile::tempdir().expect("temp dir");
    let conf = dir.path().join("ceph.conf");
    std::fs::write(
        &conf,
        "[global]\nmon host = v1:127.0.0.1:1\nauth client required = none\n",
    )
    .expect("write conf");
    let conf = conf.to_str().expect("utf-8 path");
    expect_start_failure(
        &[
            "--backend",
            "rbd",
            "--ceph-conf",
            conf,
            "--rbd-pool",
            "rbd",
            "--rbd-image",
            "x",
            "--ceph-connect-timeout",
            "3",
        ],
        &["cannot connect to the Ceph cluster", "within 3 s"],
        Duration::from_secs(20),
    );
}

/// Two queues on two worker threads share the one image handle (each completion goes to
/// its own worker's ring): verified fio on every queue, then ext4 on the same daemon.
#[test]
fn verified_fio_on_two_queues_then_ext4_fsck_clean() {
    let cluster = CephCluster::up();
    cluster.create_image("mq", 128);
    let mut daemon = Daemon::corodev_rbd(&cluster.conf, "rbd", "mq", &["--num-queues", "2"]);
    let run = daemon.boot(Guest::test("mq").queues(2));
    let r = run.expect_pass();
    assert_eq!(r.num("queues"), 2, "blk-mq queues in the guest");
    let irqs: Vec<u64> = r
        .get("irqs_per_queue")
        .split(',')
        .map(|n| n.parse().expect("irqs_per_queue is a list of numbers"))
        .collect();
    assert!(
        irqs.len() == 2 && irqs.iter().all(|&n| n > 0),
        "every queue completed requests: {irqs:?}"
    );
    daemon.assert_alive();
    let run = daemon.boot(Guest::test("ext4").queues(2));
    assert_eq!(run.expect_pass().get("fsck"), "clean");
    daemon.assert_alive();
    drop(daemon);
    // The ext4 superblock magic (0xEF53 at byte 1080), read back through librbd.
    let image = cluster.export("mq");
    assert_eq!(image[1080..1082], [0x53, 0xef]);
}

/// The OSD crashes (SIGKILL) while the guest's 8 verified O_DIRECT writers run, and is
/// started again 3 s later on the same store: inside the op timeout (20 s), so the guest
/// sees a stall and no error; every write is read back and compared, every region verified
/// at the end, and the daemon stays up. With librbd's cache off (`--direct`), so that every
/// request waits for the OSD through the outage.
#[test]
fn osd_crash_and_restart_within_the_op_timeout_is_only_a_stall() {
    let cluster = CephCluster::up();
    cluster.create_image("stall", 128);
    let mut daemon = Daemon::corodev_rbd(&cluster.conf, "rbd", "stall", &["--direct"]);
    let vm = start_writers(&daemon, "40");
    let before = vm.console().matches("CORODEV-PROGRESS").count();
    let t = Instant::now();
    cluster.crash_and_restart_osd(Duration::from_secs(3));
    eprintln!(
        "OSD killed after {before} progress lines, running again after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let run = vm.wait_while(|| None);
    let r = run.expect_pass();
    assert_eq!(
        r.num("errors"),
        0,
        "a crash inside the op timeout must not fail guest I/O"
    );
    assert!(r.num("writes") > 0);
    daemon.assert_alive();
}

/// The OSD stops answering for 10 s with `--ceph-op-timeout 3`: the guest's requests fail
/// (IOERR) instead of hanging, the daemon stays up, and once the OSD is back a new guest's
/// I/O on the same daemon succeeds and lands in the image. With librbd's cache off
/// (`--direct`), so that every write waits for the OSD: with it on, the cache takes the
/// guest's writes during the outage and only a flush fails (devices/tests/rbd_backend.rs).
#[test]
fn osd_stopped_past_the_op_timeout_fails_requests_then_serves_again() {
    let cluster = CephCluster::up();
    cluster.create_image("lost", 128);
    let mut daemon = Daemon::corodev_rbd(
        &cluster.conf,
        "rbd",
        "lost",
        &["--ceph-op-timeout", "3", "--direct"],
    );
    let vm = start_writers(&daemon, "30");
    let pid = cluster.osd_pid();
    // SAFETY: signals to the OSD this test's cluster started; no memory involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    std::thread::sleep(Duration::from_secs(10));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let run = vm.wait_while(|| None);
    let r = run.result().expect("the guest printed a result");
    eprintln!("guest during the outage: {}", run.summary());
    assert!(r.num("errors") > 0, "requests failed during the outage");
    daemon.assert_alive();
    let run = daemon.boot(Guest::test("pattern"));
    let r = run.expect_pass();
    daemon.assert_alive();
    let (offset, len) = (r.num("offset") as usize, r.num("length") as usize);
    drop(daemon);
    let image = cluster.export("lost");
    assert_eq!(
        format!("{:x}", md5::compute(&image[offset..offset + len])),
        r.get("md5"),
        "I/O after the outage lands in the image"
    );
}

/// An RBD instance stays inside the service unit's system call filter: a real corodev,
/// traced with `strace -f` from start (cluster connection, image open, the worker threads
/// of a connection waiting for a frontend) to SIGTERM (image close, cluster shutdown),
/// makes no system call that `corodev@.service`'s `SystemCallFilter=` lines deny, so the
/// RBD drop-in (`daemon/systemd/rbd.conf`) needs to open the network only.
#[test]
fn rbd_instance_stays_inside_the_units_syscall_filter() {
    use integration::systemd::{syscall_filter, traced_syscalls};
    let cluster = CephCluster::up();
    cluster.create_image("sandbox", 16);
    let unit =
        std::fs::read_to_string(integration::workspace().join("daemon/systemd/corodev@.service"))
            .expect("read corodev@.service");
    let allowed = syscall_filter(&unit);
    // The deny lists took effect (setpriority is @resources, mount @privileged).
    assert!(
        allowed.contains("io_uring_enter")
            && allowed.contains("connect")
            && !allowed.contains("setpriority")
            && !allowed.contains("mount"),
        "{allowed:?}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, socket) = (dir.path().join("strace.log"), dir.path().join("s.sock"));
    let mut strace = Command::new("strace")
        .arg("-f")
        .arg("-qq")
        .arg("-o")
        .arg(&log)
        .arg(corodev_bin())
        .arg("--socket")
        .arg(&socket)
        .args([
            "--backend",
            "rbd",
            "--rbd-pool",
            "rbd",
            "--rbd-image",
            "sandbox",
        ])
        .arg("--ceph-conf")
        .arg(&cluster.conf)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run strace (scripts/install-deps.sh installs it)");
    let t0 = Instant::now();
    while !socket.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "corodev under strace did not listen within 60 s"
        );
        assert!(strace.try_wait().expect("wait").is_none(), "corodev exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let children = std::fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        strace.id(),
        strace.id()
    ))
    .expect("strace's children");
    let pid: libc::pid_t = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("corodev's pid");
    // SAFETY: a signal to the corodev this test started; no memory involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = strace.wait().expect("wait for strace");
    assert!(status.success(), "corodev under strace: {status}");
    let used = traced_syscalls(&log);
    assert!(
        ["io_uring_setup", "connect", "sendmsg", "epoll_wait"]
            .iter()
            .all(|c| used.contains(*c)),
        "the trace must show the cluster connection and the workers' rings: {used:?}"
    );
    let denied: Vec<&String> = used.iter().filter(|c| !allowed.contains(*c)).collect();
    assert!(
        denied.is_empty(),
        "system calls the unit's filter denies: {denied:?}"
    );
}

/// Boots a guest running 8 verified O_DIRECT writers for `seconds` (the restart workload)
/// on `daemon`, and returns once they are writing.
fn start_writers(daemon: &Daemon, seconds: &'static str) -> integration::Vm {
    let mut guest = Guest::test("restart");
    guest.arg = Some(seconds);
    guest.mem_mib = 512; // the writers keep a copy of their 64 MiB in guest memory
    guest.timeout = Duration::from_secs(300);
    let vm = integration::Vm::start(&daemon.socket, &guest);
    let t0 = Instant::now();
    while !vm.console().contains("CORODEV-PROGRESS") {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "the guest never started its writers:\n{}",
            vm.console()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    vm
}

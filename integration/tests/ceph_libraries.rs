//! Ceph's client libraries are loaded only when an RBD export opens: a corodev serving a
//! null (or file) export maps none of them and stays small, and runs on a host where they
//! are missing, where an RBD export fails with one line naming the library and the package.
//!
//! Needs root for the second test (a private mount namespace hides the libraries).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration::{corodev_bin, Daemon};

/// What linking librbd put into every corodev process.
const CEPH_LIBRARIES: [&str; 3] = ["librbd.so", "librados.so", "libceph-common.so"];

/// Idle RSS bound for a null export, KiB. Measured idle with `--backend null` (Debian 12,
/// x86_64, 2 CPUs): 4.2 MiB (release) and 9.3 MiB (debug) with Ceph's libraries loaded only
/// for RBD, 22.9 MiB and 27.5 MiB when librbd was linked (its libraries about 15 MiB of
/// that). 16 MiB: well clear of the run-to-run noise (a few hundred KiB) and of the debug
/// build, and below any build that maps Ceph again.
const IDLE_RSS_MAX_KIB: u64 = 16 * 1024;

/// The lines of `/proc/<pid>/maps` that map one of [`CEPH_LIBRARIES`].
fn ceph_mappings(pid: u32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    maps.lines()
        .filter(|l| CEPH_LIBRARIES.iter().any(|lib| l.contains(lib)))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_null_export_maps_no_ceph_library_and_stays_small() {
    let daemon = Daemon::corodev_null(&[]);
    let pid = daemon.pid();
    let ceph = ceph_mappings(pid);
    assert!(
        ceph.is_empty(),
        "a null export maps Ceph's libraries ({} lines), e.g.\n{}",
        ceph.len(),
        ceph.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
    let rss = daemon.resources().rss_kib;
    assert!(
        rss > 0 && rss <= IDLE_RSS_MAX_KIB,
        "idle RSS of a null export is {rss} KiB, over {IDLE_RSS_MAX_KIB} KiB"
    );
}

/// Where the dynamic loader finds `name` (`ldconfig -p`'s view, which `dlopen` uses).
fn loader_paths(name: &str) -> Vec<PathBuf> {
    let out = Command::new("ldconfig")
        .arg("-p")
        .output()
        .expect("run ldconfig -p");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(name))
        .filter_map(|l| l.rsplit(" => ").next().map(PathBuf::from))
        .collect()
}

/// A command running corodev with `args` in a private mount namespace where every file the
/// loader would open for librados and librbd is `/dev/null` (as unusable as absent).
fn corodev_without_ceph(socket: &Path, args: &[&str]) -> Command {
    let hidden: Vec<PathBuf> = ["librados.so.2", "librbd.so.1"]
        .iter()
        .flat_map(|l| loader_paths(l))
        .collect();
    let mut script = String::from("set -e\n");
    for p in &hidden {
        script.push_str(&format!("mount --bind /dev/null '{}'\n", p.display()));
    }
    script.push_str("exec \"$@\"\n");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ])
    .arg(corodev_bin())
    .arg("--socket")
    .arg(socket)
    .args(args)
    .stdin(Stdio::null());
    cmd
}

#[test]
fn without_ceph_libraries_a_null_export_serves_and_an_rbd_export_fails_with_one_line() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root for its mount namespace (CI runs as root)"
    );
    let dir = tempfile::tempdir().expect("temp dir");

    let socket = dir.path().join("null.sock");
    let mut null = corodev_without_ceph(&socket, &["--backend", "null", "--size", "64M"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run unshare");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Some(status) = null.try_wait().expect("wait") {
            let out = null.wait_with_output().expect("stderr");
            panic!(
                "a null export without Ceph's libraries exited ({status}) instead of serving:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "corodev never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child, which exec'd corodev in place of unshare and sh.
    assert_eq!(
        unsafe { libc::kill(null.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let status = null.wait().expect("wait");
    assert!(status.success(), "null export: {status}");

    let out = corodev_without_ceph(
        &dir.path().join("rbd.sock"),
        &["--backend", "rbd", "--rbd-pool", "rbd", "--rbd-image", "vm"],
    )
    .output()
    .expect("run unshare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an RBD export without librados started"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line:\n{stderr}");
    assert!(
        lines[0].starts_with("corodev: error: --backend rbd: cannot load librados.so.2: ")
            && lines[0]
                .ends_with("; install Ceph's client library (Debian: apt-get install librbd1)"),
        "{stderr}"
    );
}

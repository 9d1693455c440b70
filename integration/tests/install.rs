//! `scripts/install.sh` into a temp root (`DESTDIR`): every file where the units expect it,
//! with its mode; the corodev user and group created by systemd-sysusers in that root's
//! /etc; the image directory owned by that user; and a second run changes nothing and
//! keeps an edited example config. (A real install also runs `systemctl daemon-reload`,
//! which needs a running systemd: not tested here.)

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use integration::{corodev_bin, workspace};

fn install(root: &Path) -> String {
    let out = Command::new("bash")
        .arg(workspace().join("scripts/install.sh"))
        .env("DESTDIR", root)
        .env("CORODEV_BIN", corodev_bin())
        .output()
        .expect("run install.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "install.sh failed:\n{text}");
    text
}

/// Every file under `root` with its mode, owner, size and modification time.
fn snapshot(root: &Path) -> BTreeMap<String, (u32, u32, u64, i64, i64)> {
    let mut all = BTreeMap::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let m = e.metadata().expect("metadata");
            if m.is_dir() {
                dirs.push(e.path());
            }
            let name = e
                .path()
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            all.insert(
                name,
                (m.mode(), m.uid(), m.size(), m.mtime(), m.mtime_nsec()),
            );
        }
    }
    all
}

fn mode(root: &Path, path: &str) -> u32 {
    std::fs::metadata(root.join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn installs_into_a_temp_root_and_a_second_run_changes_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    let first = install(root);
    assert!(
        first.contains("installed /usr/local/bin/corodev"),
        "{first}"
    );

    for (path, want) in [
        ("usr/local/bin/corodev", 0o755),
        ("etc/systemd/system/corodev@.service", 0o644),
        ("etc/systemd/system/corodev@.socket", 0o644),
        ("etc/systemd/system/corodev.service", 0o644),
        ("etc/systemd/system/corodev-export@.socket", 0o644),
        ("etc/systemd/system/corodev-control.socket", 0o644),
        ("usr/local/lib/sysusers.d/corodev.conf", 0o644),
        ("etc/corodev/example.env", 0o644),
        ("etc/corodev/example.toml", 0o644),
        ("usr/local/share/doc/corodev/README.md", 0o644),
        ("usr/local/share/doc/corodev/rbd.conf", 0o644),
        ("var/lib/corodev/images", 0o750),
    ] {
        assert_eq!(mode(root, path), want, "{path}");
    }
    for unit in [
        "corodev@.service",
        "corodev@.socket",
        "corodev.service",
        "corodev-export@.socket",
        "corodev-control.socket",
    ] {
        assert_eq!(
            std::fs::read(root.join("etc/systemd/system").join(unit)).expect("installed"),
            std::fs::read(workspace().join("daemon/systemd").join(unit)).expect("source"),
            "{unit} is installed as it is in the tree"
        );
    }
    let version = Command::new(root.join("usr/local/bin/corodev"))
        .arg("--version")
        .output()
        .expect("run the installed binary");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("corodev "));

    // The user: a system account without a login shell, owning the image directory.
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
    let entry: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("corodev:"))
        .unwrap_or_else(|| panic!("no corodev user in:\n{passwd}"))
        .split(':')
        .collect();
    let uid: u32 = entry[2].parse().expect("uid");
    assert!(uid > 0 && uid < 1000, "a system uid: {uid}");
    assert_eq!(entry[6], "/usr/sbin/nologin");
    let group = std::fs::read_to_string(root.join("etc/group")).expect("group");
    let gid: u32 = group
        .lines()
        .find_map(|l| l.strip_prefix("corodev:x:"))
        .and_then(|rest| rest.split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no corodev group in:\n{group}"));
    let images = std::fs::metadata(root.join("var/lib/corodev/images")).expect("images");
    assert_eq!((images.uid(), images.gid()), (uid, gid));

    // Idempotent: nothing rewritten, an edited example config kept.
    let edited = "CORODEV_ARGS=\"--disk /elsewhere\"\n";
    std::fs::write(root.join("etc/corodev/example.env"), edited).expect("edit");
    let before = snapshot(root);
    let second = install(root);
    assert!(second.contains("nothing changed"), "{second}");
    assert_eq!(
        snapshot(root),
        before,
        "the second run must not touch a file"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/corodev/example.env")).expect("example"),
        edited
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/passwd")).expect("passwd"),
        passwd,
        "the user is not created twice"
    );
}

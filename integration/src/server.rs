//! Which vhost-user-blk server the tests run against (`CORODEV_TEST_SERVER`) and where
//! the corodev binary under test is. Boundary: choosing and locating; [`crate::Daemon`]
//! starts it.

use std::path::PathBuf;

use crate::workspace;

/// Which vhost-user-blk server the tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// The corodev binary under test ([`corodev_bin`]).
    Corodev,
    /// QEMU's `qemu-storage-daemon` with a vhost-user-blk export: the reference server, to
    /// check that a failing test fails because of corodev and not because of the test.
    Qsd,
}

impl Server {
    /// `CORODEV_TEST_SERVER`: unset, empty or `corodev` is corodev, `qsd` is
    /// qemu-storage-daemon. Anything else panics, so a typo cannot silently test the wrong
    /// server.
    pub fn from_env() -> Server {
        match std::env::var("CORODEV_TEST_SERVER").as_deref() {
            Err(_) | Ok("") | Ok("corodev") => Server::Corodev,
            Ok("qsd") => Server::Qsd,
            Ok(other) => panic!("CORODEV_TEST_SERVER={other:?}: expected `corodev` or `qsd`"),
        }
    }
}

/// The corodev binary under test: `$CORODEV_BIN`, else `target/release/corodev`, else
/// `target/debug/corodev`. Panics with the build command if none exists, because a test
/// that silently ran against nothing would prove nothing.
pub fn corodev_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CORODEV_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "CORODEV_BIN={} does not exist; unset it or build corodev there",
            p.display()
        );
        return p;
    }
    let target = workspace().join("target");
    let candidates = [target.join("release/corodev"), target.join("debug/corodev")];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no corodev binary at {} or {}: run `cargo build --release --bin corodev` \
                 first (scripts/test.sh does), or set CORODEV_BIN; or set \
                 CORODEV_TEST_SERVER=qsd to run against qemu-storage-daemon",
                candidates[0].display(),
                candidates[1].display()
            )
        })
}

/// The statically linked musl build of corodev, which scripts/test.sh builds with
/// `cargo build --release --target x86_64-unknown-linux-musl --bin corodev --no-default-features --features nvme`
/// (no RBD backend: a static binary cannot dlopen librbd); panics with that
/// command when it is missing (a test of it must not pass without it).
pub fn corodev_musl_bin() -> PathBuf {
    let p = workspace().join("target/x86_64-unknown-linux-musl/release/corodev");
    assert!(
        p.is_file(),
        "no musl build at {}: run `rustup target add x86_64-unknown-linux-musl && cargo build \
         --release --target x86_64-unknown-linux-musl --bin corodev --no-default-features --features nvme` first \
         (scripts/test.sh does)",
        p.display()
    );
    p
}

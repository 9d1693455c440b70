//! Host-side storage errors reach the guest as IOERR for that request only; the daemon
//! keeps serving. The image lives on a 1 MiB tmpfs, so writes past the first megabyte of
//! the (sparse, 64 MiB) image fail with ENOSPC from the real file system.

use std::process::Command;

use integration::frontend::*;
use integration::Daemon;

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct SmallFs {
    dir: Option<tempfile::TempDir>,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mounting a tmpfs failed: this test needs root (CI runs as root)"
        );
        SmallFs { dir: Some(dir) }
    }

    /// Hands over a directory on the small file system to the server (which keeps its
    /// image and socket there); unmounting waits for the server to be dropped first.
    fn subdir(&self) -> tempfile::TempDir {
        let base = self.dir.as_ref().expect("mounted").path();
        tempfile::tempdir_in(base).expect("subdir")
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = Command::new("umount").arg("-l").arg(dir.path()).status();
        }
    }
}

#[test]
fn enospc_fails_that_write_only() {
    let fs = SmallFs::mount("1m");
    let mut server = Daemon::with_image_in(fs.subdir(), &[]);
    let mut fe = TestFrontend::connect(server.socket(), 1, 128).expect("connect");
    let data = pattern(5, 64 * 1024);
    // Fill well past the file system's 1 MiB: some write must fail with ENOSPC.
    let mut failed = None;
    for i in 0..64u64 {
        fe.mem.write(DATA_BASE, &data);
        let status = fe.run(0, T_OUT, i * 128, &[(DATA_BASE, data.len() as u32)]);
        match status {
            S_OK => {}
            S_IOERR => {
                failed = Some(i);
                break;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let failed = failed.expect("a 64 MiB fill of a 1 MiB file system must hit ENOSPC");
    assert!(failed > 0, "the first writes fit");
    server.assert_alive();
    // The device still serves: reads of what was written, and flushes.
    fe.mem.write(DATA_BASE + (4 << 20), &vec![0u8; data.len()]);
    assert_eq!(
        fe.run(0, T_IN, 0, &[(DATA_BASE + (4 << 20), data.len() as u32)]),
        S_OK
    );
    assert_eq!(fe.mem.read(DATA_BASE + (4 << 20), data.len()), data);
    assert_eq!(fe.run(0, T_FLUSH, 0, &[]), S_OK);
    assert!(
        server.log_text().contains("No space left on device"),
        "the host log names the cause: {}",
        server.log_text()
    );
    drop(fe);
    drop(server);
}

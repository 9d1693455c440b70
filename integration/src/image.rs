//! The disk image a server exports: a sparse file in a temp dir, which a test reads back
//! on the host to check what the guest wrote. Boundary: plain file I/O; no server.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::workspace;

/// A raw image file in a temp dir, removed on drop.
pub struct Image {
    /// The image file.
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

/// What the host writes into an image's last 4 KiB to end a guest's long-running test
/// (`restart`, `migrate`, `iobench` in `scripts/guest-init.sh`): [`Image::tell_guest_to_stop`].
pub const STOP_WORD: &[u8] = b"CORODEV-STOP\n";

/// The image size of [`Daemon::with_image`]: 64 MiB.
pub const TEST_IMAGE_SIZE: u64 = 64 << 20;

impl Image {
    /// A sparse image of `size` bytes. Kept under target/ rather than /tmp: tmpfs refuses
    /// O_DIRECT.
    pub fn new(size: u64) -> Image {
        let base = workspace().join("target/test-images");
        std::fs::create_dir_all(&base)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", base.display()));
        let dir = tempfile::tempdir_in(&base)
            .unwrap_or_else(|e| panic!("cannot make a temp dir in {}: {e}", base.display()));
        Image::new_in(dir, size)
    }

    /// A sparse image of `size` bytes in `dir` (which the image then owns).
    pub fn new_in(dir: tempfile::TempDir, size: u64) -> Image {
        let path = dir.path().join("disk.img");
        File::create(&path)
            .and_then(|f| f.set_len(size))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Image { path, _dir: dir }
    }

    /// `len` bytes at `offset`, as the host sees them.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(&self.path)
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(offset))?;
                f.read_exact(&mut buf)
            })
            .unwrap_or_else(|e| {
                panic!(
                    "cannot read {len} bytes at {offset} of {}: {e}",
                    self.path.display()
                )
            });
        buf
    }

    /// Tells the guest to stop its long-running test: [`STOP_WORD`] in the image's last 4
    /// KiB, which the guest polls with O_DIRECT reads (the server's O_DIRECT read sees it:
    /// the kernel writes a file's dirty pages back before a direct read).
    pub fn tell_guest_to_stop(&self) {
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .and_then(|f| {
                let len = f.metadata()?.len();
                f.write_all_at(STOP_WORD, len.saturating_sub(4096))?;
                f.sync_data()
            });
        if let Err(e) = written {
            panic!(
                "cannot write the stop word into {}: {e}",
                self.path.display()
            );
        }
    }

    /// Hex md5 of `len` bytes at `offset` (what the guest's `pattern` test prints).
    pub fn md5(&self, offset: u64, len: usize) -> String {
        format!("{:x}", md5::compute(self.read(offset, len)))
    }
}

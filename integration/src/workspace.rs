//! Where the harness finds things: the workspace root, tools on `$PATH`, and the install
//! advice every "missing tool" failure carries. Boundary: lookups only; nothing here
//! starts a process.

use std::path::{Path, PathBuf};

/// The workspace root (parent of this crate).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}

/// The advice every "missing tool" failure carries.
pub(crate) const INSTALL_HINT: &str =
    "run `bash scripts/install-deps.sh` (as root) to install QEMU, \
     the guest kernel, busybox-static, fio, e2fsprogs and systemd's tools";

/// Whether `name` is an executable file in a `$PATH` directory.
pub(crate) fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

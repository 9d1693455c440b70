//! The NVMe test guest, for corodev's NVMe-over-VFIO backend: `scripts/nvme-guest.sh` boots
//! a q35 machine (TCG) with QEMU's intel-iommu and one emulated NVMe controller on a host
//! file ([`NvmeRun::disk`]), and inside it runs a daemon (corodev, static musl) and a
//! frontend ([`guest_bin`]: `verify-load`, `nvme-load`, `nvme-probe`), each a shell command. The guest
//! prints the `CORODEV-*` lines [`crate::console`] parses; after it powers off, the test
//! reads the backing file to check what reached the "hardware".
//!
//! Boundary: booting that guest and collecting what it printed. The guest side (binding the
//! controller to vfio-pci, starting the commands) is `scripts/nvme-guest-init.sh`; the QEMU
//! command line is `scripts/nvme-guest.sh`'s. Shares the one-guest-at-a-time lock with
//! [`crate::vm`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::console::{parse_results, GuestRun};
use crate::vm::{GuestScript, GuestSlot};
use crate::workspace::workspace;
use crate::Image;

/// Which driver holds the NVMe controller while the test runs (`--bind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    /// vfio-pci, for a userspace driver: `NVME_BDF` and `NVME_GROUP` name it.
    Vfio,
    /// The kernel's nvme driver: the namespace is the block device `NVME_BLK`.
    Kernel,
}

/// What to run in the NVMe guest. The commands are run by the guest's shell and see
/// `NVME_BDF`, `NVME_GROUP`, `NVME_BLK` and `SOCK` (the vhost-user socket path).
#[derive(Debug, Clone)]
pub struct NvmeGuest<'a> {
    /// Which driver gets the controller.
    pub bind: Bind,
    /// Started before the frontend, stopped with SIGTERM after it (must then exit 0).
    pub daemon: Option<&'a str>,
    /// Its exit status is the test's verdict; its last stdout line the result's fields.
    pub frontend: &'a str,
    /// Static binaries copied into the guest's /bin.
    pub bins: Vec<PathBuf>,
    /// Size of the NVMe namespace's backing file.
    pub disk_size: u64,
    /// Limit for boot + test; the VM is killed past it.
    pub timeout: Duration,
    /// Guest memory in MiB (`--mem`).
    pub mem_mib: u32,
    /// QEMU trace event patterns to enable (`--trace`): the controller's side of the
    /// test, on the console.
    pub trace: Vec<&'a str>,
}

impl<'a> NvmeGuest<'a> {
    /// `frontend` alone on a 64 MiB namespace, 512 MiB of guest memory, no trace, 3 minutes: a TCG boot to the test takes
    /// ~3 s here, but a loaded 2-core machine can be several times slower.
    pub fn new(bind: Bind, frontend: &'a str) -> NvmeGuest<'a> {
        NvmeGuest {
            bind,
            daemon: None,
            frontend,
            bins: Vec::new(),
            disk_size: 64 << 20,
            timeout: Duration::from_secs(180),
            mem_mib: 512,
            trace: Vec::new(),
        }
    }
}

/// A finished NVMe guest: what it printed and the backing file it wrote.
pub struct NvmeRun {
    /// The console and the parsed `CORODEV-*` lines.
    pub run: GuestRun,
    /// The NVMe namespace's backing file, as the guest left it.
    pub disk: Image,
}

/// Extra time beyond the guest's own limit: the base initramfs is built on first use.
const SETUP_GRACE: Duration = Duration::from_secs(60);
/// Exit status of `scripts/nvme-guest.sh` when QEMU hit its timeout.
const TIMED_OUT: i32 = 3;

/// A static binary of this workspace for the guest (which has no libc):
/// `target/x86_64-unknown-linux-musl/release/NAME`. Panics with the command that builds it
/// when it is missing (scripts/test.sh runs it): a test must not pass without it.
pub fn guest_bin(name: &str) -> PathBuf {
    let p = workspace()
        .join("target/x86_64-unknown-linux-musl/release")
        .join(name);
    assert!(
        p.is_file(),
        "no musl build at {}: run `cargo build --release --target x86_64-unknown-linux-musl \
         -p integration --bin nvme-probe --bin verify-load --bin nvme-load` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Boots `guest` on a fresh, zeroed backing file and waits for it to power off (or kills
/// it, with QEMU, at its timeout). Waits for any other guest of this process first.
/// Does not judge the result: see [`GuestRun::expect_pass`]. Never skips: a missing QEMU,
/// kernel, module or busybox fails the run with the script's message.
pub fn boot(guest: &NvmeGuest<'_>) -> NvmeRun {
    let _slot = GuestSlot::take();
    let disk = Image::new(guest.disk_size);
    // The temp dir holds the console file until the run is read.
    let GuestScript {
        mut cmd,
        dir: _dir,
        console,
    } = GuestScript::new("nvme-guest.sh", "corodev-nvme-vm-");
    cmd.arg("--disk")
        .arg(&disk.path)
        .args(["--frontend", guest.frontend])
        .args(["--timeout", &guest.timeout.as_secs().max(1).to_string()])
        .args(["--mem", &guest.mem_mib.to_string()])
        .args([
            "--bind",
            match guest.bind {
                Bind::Vfio => "vfio",
                Bind::Kernel => "kernel",
            },
        ]);
    if let Some(daemon) = guest.daemon {
        cmd.args(["--daemon", daemon]);
    }
    for pattern in &guest.trace {
        cmd.args(["--trace", pattern]);
    }
    for bin in &guest.bins {
        cmd.arg("--bin").arg(bin);
    }
    let started = Instant::now();
    let mut child = GuestScript::spawn(&mut cmd);
    let deadline = started + guest.timeout + SETUP_GRACE;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                kill_group(&mut child);
                break None;
            }
            Err(e) => panic!("cannot wait for the NVMe guest: {e}"),
        }
    };
    let text = read_console(&console);
    let run = GuestRun {
        test: "nvme".to_owned(),
        results: parse_results(&text),
        console: text,
        elapsed: started.elapsed(),
        status,
        timed_out: status.is_none_or(|s| s.code() == Some(TIMED_OUT)),
        aborted: None,
        server_log: None,
    };
    eprintln!("{}", run.summary());
    NvmeRun { run, disk }
}

fn read_console(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Kills the script's whole process group (QEMU with it) and reaps the script.
fn kill_group(child: &mut std::process::Child) {
    if let Ok(pgid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) with a negative pid signals that process group, the one `boot`
        // created for this child (process_group(0)), so nothing else is hit.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

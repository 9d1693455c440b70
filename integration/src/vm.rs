//! A booted test guest: `scripts/run-vm.sh` running QEMU against a vhost-user socket,
//! one guest at a time, its console in a file, killed with its whole process group on
//! drop. Also what to boot ([`Guest`]), the guest's kernel and initramfs
//! ([`guest_artifacts`]) and its kernel command line ([`Guest::kernel_cmdline`]), which
//! [`crate::libvirt`] boots through libvirt instead. Boundary: the VM process; reading what
//! the guest printed is [`crate::console`]'s.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::console::{parse_results, GuestRun};
use crate::workspace::{on_path, workspace, INSTALL_HINT};

/// One guest at a time (see the crate docs). Held by a [`Vm`] for its whole life.
static GUEST: Mutex<()> = Mutex::new(());

fn guest_lock() -> MutexGuard<'static, ()> {
    GUEST
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The guest's kernel and initramfs, as built by `scripts/build-guest.sh`.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    /// Copy of the Debian cloud kernel (`target/guest/vmlinuz`).
    pub kernel: PathBuf,
    /// The test initramfs (`target/guest/initramfs.cpio.gz`).
    pub initrd: PathBuf,
}

/// Builds the guest image if needed (the script caches it) and checks that QEMU is
/// installed. Runs once per test process; every caller after a failure panics with the
/// same message. Never skips: without QEMU or the kernel the guest tests cannot mean
/// anything, so they fail and say how to fix it.
pub fn guest_artifacts() -> &'static GuestArtifacts {
    static ARTIFACTS: OnceLock<Result<GuestArtifacts, String>> = OnceLock::new();
    let found = ARTIFACTS.get_or_init(|| {
        if !on_path("qemu-system-x86_64") {
            return Err(format!("qemu-system-x86_64 is not on PATH: {INSTALL_HINT}"));
        }
        let script = workspace().join("scripts/build-guest.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let paths: Vec<&str> = stdout.lines().collect();
        match (out.status.success(), paths.as_slice()) {
            (true, [kernel, initrd]) => Ok(GuestArtifacts {
                kernel: PathBuf::from(kernel),
                initrd: PathBuf::from(initrd),
            }),
            _ => Err(format!(
                "{} failed ({}): {}\n{INSTALL_HINT}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    });
    match found {
        Ok(artifacts) => artifacts,
        Err(why) => panic!("the test guest is not available: {why}"),
    }
}

/// What to boot: the guest test to run (see `scripts/guest-init.sh`) and the VM shape.
#[derive(Debug, Clone)]
pub struct Guest<'a> {
    /// `corodev.test=`: info, pattern, idle, fio, mq, ext4, readonly, discard, restart,
    /// migrate.
    pub test: &'a str,
    /// `corodev.arg=` (fio/mq: number of jobs; restart: longest run, seconds; idle: how long
    /// it idles, seconds).
    pub arg: Option<&'a str>,
    /// Virtqueues of the vhost-user-blk-pci device.
    pub queues: u16,
    /// vCPUs. Linux uses min(vCPUs, queues) queues, so multi-queue tests need both.
    pub smp: u16,
    /// Limit for boot + test; the VM is killed past it.
    pub timeout: Duration,
    /// Guest memory, MiB.
    pub mem_mib: u32,
    /// Whether QEMU reconnects to the socket by itself when the server goes away
    /// (`run-vm.sh --reconnect`), for tests that restart the server under a running guest.
    pub reconnect: bool,
    /// More words for the guest kernel's command line (`run-vm.sh --kernel-arg`).
    pub kernel_args: &'a [&'a str],
}

impl<'a> Guest<'a> {
    /// One vCPU, one queue, a 3-minute limit: a TCG boot takes ~5-10 s and the fio tests
    /// ~10 s more, but a loaded 2-core machine can be several times slower.
    pub fn test(test: &'a str) -> Guest<'a> {
        Guest {
            test,
            arg: None,
            queues: 1,
            smp: 1,
            timeout: Duration::from_secs(180),
            mem_mib: 256,
            reconnect: false,
            kernel_args: &[],
        }
    }

    /// With `queues` virtqueues and as many vCPUs.
    pub fn queues(mut self, queues: u16) -> Guest<'a> {
        self.queues = queues;
        self.smp = queues;
        self
    }

    /// `scripts/run-vm.sh`'s options for this guest (the test, its argument, the VM shape).
    fn run_vm_args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            ("--test", self.test.to_owned()),
            ("--queues", self.queues.to_string()),
            ("--smp", self.smp.to_string()),
            ("--mem", self.mem_mib.to_string()),
            ("--timeout", self.timeout.as_secs().max(1).to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect();
        if let Some(a) = self.arg {
            args.extend(["--arg".to_owned(), a.to_owned()]);
        }
        if self.reconnect {
            args.push("--reconnect".to_owned());
        }
        for k in self.kernel_args {
            args.extend(["--kernel-arg".to_owned(), (*k).to_owned()]);
        }
        args
    }

    /// The guest kernel's command line for this guest, as `scripts/run-vm.sh` builds it
    /// (`--print-cmdline`): for booting the same guest another way than run-vm.sh, e.g.
    /// through libvirt ([`crate::libvirt`]), with the [`guest_artifacts`].
    pub fn kernel_cmdline(&self) -> String {
        let script = workspace().join("scripts/run-vm.sh");
        let out = Command::new("bash")
            .arg(&script)
            .args(self.run_vm_args())
            .arg("--print-cmdline")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.lines().count() == 1,
            "{} --print-cmdline failed ({}): {}{}",
            script.display(),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout.trim().to_owned()
    }
}

/// Exit status of `scripts/run-vm.sh` when QEMU hit its timeout.
const RUN_VM_TIMEOUT: i32 = 3;
/// Extra time the harness gives run-vm.sh beyond the guest's own limit: building the guest
/// image the first time and the accelerator probe happen before QEMU starts.
const SETUP_GRACE: Duration = Duration::from_secs(120);

/// A booted guest: `scripts/run-vm.sh` with its console in a file. Holds the one-guest
/// lock (or its [`GuestSlot`] does); killed (with QEMU, its whole process group) on drop, so
/// a panicking test leaves no VM behind.
pub struct Vm {
    child: Child,
    console: PathBuf,
    test: String,
    started: Instant,
    deadline: Instant,
    qmp: Option<PathBuf>,
    _dir: tempfile::TempDir,
    _one_at_a_time: Option<MutexGuard<'static, ()>>,
}

/// The one-guest lock held for a group of VMs that must run at the same time: the source
/// and destination QEMUs of a live migration ([`crate::migration`]). VMs started with
/// [`Vm::start_in`] while the slot is held do not wait for each other.
pub struct GuestSlot {
    _held: MutexGuard<'static, ()>,
}

impl GuestSlot {
    /// Waits until no other guest of this process runs, and keeps it so.
    pub fn take() -> GuestSlot {
        GuestSlot {
            _held: guest_lock(),
        }
    }
}

/// How a [`Vm`] is controlled besides its console (`run-vm.sh --qmp`, `--incoming`).
#[derive(Debug, Clone, Default)]
pub struct VmControl {
    /// A QMP server on a unix socket in the VM's temp dir ([`Vm::qmp_socket`]).
    pub qmp: bool,
    /// Start as a migration destination: QEMU's `-incoming` value (`defer`, `tcp:...`).
    pub incoming: Option<String>,
}

impl Vm {
    /// Boots `guest` against the vhost-user socket `socket`. Waits for any other guest of
    /// this process to finish first.
    pub fn start(socket: &Path, guest: &Guest<'_>) -> Vm {
        Vm::launch(socket, guest, &VmControl::default(), Some(guest_lock()))
    }

    /// Boots `guest` against `socket` with `control`, alongside the other VMs of `slot`
    /// (which must outlive it).
    pub fn start_in(
        _slot: &GuestSlot,
        socket: &Path,
        guest: &Guest<'_>,
        control: &VmControl,
    ) -> Vm {
        Vm::launch(socket, guest, control, None)
    }

    fn launch(
        socket: &Path,
        guest: &Guest<'_>,
        control: &VmControl,
        lock: Option<MutexGuard<'static, ()>>,
    ) -> Vm {
        let artifacts = guest_artifacts();
        assert!(
            artifacts.kernel.is_file() && artifacts.initrd.is_file(),
            "guest kernel or initramfs missing ({artifacts:?}); {INSTALL_HINT}"
        );
        let GuestScript {
            mut cmd,
            dir,
            console,
        } = GuestScript::new("run-vm.sh", "corodev-vm-");
        cmd.arg("--socket").arg(socket).args(guest.run_vm_args());
        let qmp = control.qmp.then(|| dir.path().join("qmp.sock"));
        if let Some(qmp) = &qmp {
            cmd.arg("--qmp").arg(qmp);
        }
        if let Some(incoming) = &control.incoming {
            cmd.args(["--incoming", incoming]);
        }
        let started = Instant::now();
        let child = GuestScript::spawn(&mut cmd);
        Vm {
            child,
            console,
            test: guest.test.to_owned(),
            started,
            deadline: started + guest.timeout + SETUP_GRACE,
            qmp,
            _dir: dir,
            _one_at_a_time: lock,
        }
    }

    /// The console so far (serial output, then run-vm.sh's one-line verdict).
    pub fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The first whole console line that contains `needle`, waiting up to `timeout` for the
    /// guest to print it (e.g. a test's `CORODEV-PROGRESS` line marking a phase); `None` if
    /// it did not, or the VM ended first.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console();
            // The file may end in the middle of the line being printed.
            let whole = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
            if let Some(line) = whole.lines().find(|l| l.contains(needle)) {
                return Some(line.trim_end().to_owned());
            }
            if !self.running() || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The QMP socket, if started with [`VmControl::qmp`] (QEMU creates it soon after
    /// start; see [`crate::qmp::Qmp::connect`]).
    pub fn qmp_socket(&self) -> Option<&Path> {
        self.qmp.as_deref()
    }

    /// Whether run-vm.sh (and so the guest) is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the guest to power off (or be killed at its timeout) and returns what it
    /// printed. Does not judge the result: see [`GuestRun::expect_pass`].
    pub fn wait(self) -> GuestRun {
        self.wait_while(|| None)
    }

    /// Like [`wait`](Self::wait), but kills the VM early when `abort` (polled every 50 ms)
    /// returns a reason, which the run then reports.
    pub fn wait_while(mut self, mut abort: impl FnMut() -> Option<String>) -> GuestRun {
        let mut aborted = None;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= self.deadline => {
                    self.kill();
                    break None;
                }
                Ok(None) => {
                    if let Some(why) = abort() {
                        self.kill();
                        aborted = Some(why);
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot wait for the VM: {e}"),
            }
        };
        let console = self.console();
        let timed_out =
            aborted.is_none() && status.is_none_or(|s| s.code() == Some(RUN_VM_TIMEOUT));
        let run = GuestRun {
            test: self.test.clone(),
            results: parse_results(&console),
            console,
            elapsed: self.started.elapsed(),
            status,
            timed_out,
            aborted,
            server_log: None,
        };
        eprintln!("{}", run.summary());
        run
    }

    /// Waits up to `timeout` for run-vm.sh to exit (e.g. after QMP `quit`); its status, or
    /// `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the VM's whole process group (QEMU with it) and reaps run-vm.sh: a crash of
    /// this QEMU, as far as anyone talking to it can tell.
    pub fn kill(&mut self) {
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) with a negative pid signals that process group; the group is
            // the one this Vm created (process_group(0) above), so nothing else is hit.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        } else if let Ok(pgid) = i32::try_from(self.child.id()) {
            // run-vm.sh exited; make sure nothing it started outlives it.
            // SAFETY: as in `kill`; an empty or reused-and-gone group just gets ESRCH.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// A guest script of scripts/ (run-vm.sh, nvme-guest.sh) about to run: `bash SCRIPT` with
/// stdout and stderr in a console file of a temp dir, in a process group of its own (so
/// that a timeout or `Drop` kills QEMU and timeout(1) along with bash). The caller adds
/// the script's options and spawns it.
pub(crate) struct GuestScript {
    /// The command.
    pub cmd: Command,
    /// Holds the console file (and whatever else the run puts there).
    pub dir: tempfile::TempDir,
    /// The console file.
    pub console: PathBuf,
}

impl GuestScript {
    /// `bash scripts/<script>` with its output going to `<temp dir named prefix*>/console.log`.
    pub(crate) fn new(script: &str, prefix: &str) -> GuestScript {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let console = dir.path().join("console.log");
        let out = File::create(&console)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", console.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot dup the console file: {e}"));
        let mut cmd = Command::new("bash");
        cmd.arg(workspace().join("scripts").join(script))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        GuestScript { cmd, dir, console }
    }

    /// Starts `cmd` (a [`GuestScript`]'s, options added).
    pub(crate) fn spawn(cmd: &mut Command) -> std::process::Child {
        cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {:?}: {e}",
                cmd.get_args().next().unwrap_or_default()
            )
        })
    }
}

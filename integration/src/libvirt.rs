//! The test guest booted through libvirt: a private `libvirtd` ([`Libvirtd`]) that defines
//! and starts a domain from the template `integration/libvirt/domain.xml` (the README's
//! "With libvirt" example), whose disk is a vhost-user socket, and a [`Domain`] whose serial
//! console is read like a [`crate::Vm`]'s. Boundary: libvirtd, virsh and the domain; the
//! vhost-user server is [`crate::Daemon`]'s, the guest (kernel, initramfs, command line) is
//! [`crate::vm`]'s, what it prints is [`crate::console`]'s.
//!
//! **Private.** A libvirtd running as root uses the system's paths (`/etc/libvirt`,
//! `/run/libvirt`, `/var/lib/libvirt`, `/var/cache/libvirt`, `/var/log/libvirt`); options
//! move only its sockets and its own config file. So it runs in its own mount namespace
//! (`unshare --mount`) in which those five directories are bind mounts: four of one temp
//! dir (its configuration, domains, logs and QEMU's monitor sockets, gone when the test
//! ends), the cache of `target/libvirt-cache` (QEMU's capabilities, kept from run to run:
//! [`CAPS_CACHE`]). The host's libvirt (running or not) is neither used nor changed. Its
//! socket is in the temp dir too, which the test's `virsh` reaches
//! (`qemu+unix:///system?socket=...`). The only trace on the host: the five directories are
//! created (empty) if missing, as mount points. The namespace also has its own
//! `/etc/passwd` and `/etc/group` with the `libvirt-qemu` user added if the host has none:
//! the QEMU driver looks up its built-in default user at start-up even when qemu.conf names
//! another, and only Debian's `libvirt-daemon-system` (which the tests do not need) creates
//! it.
//!
//! **qemu.conf.** QEMU runs as root (`user`/`group` root, `dynamic_ownership = 0`,
//! `security_driver = "none"`): every file it opens is the test's, in 0700 temp dirs owned
//! by root (the vhost-user socket, the console file, the kernel under `target/`), which
//! `libvirt-qemu` could not reach and which libvirt should not chown. On a real host keep
//! libvirt's defaults and let its QEMU user reach the socket instead (the socket unit gives
//! it group `kvm`, mode 0660). `stdio_handler = "file"`: QEMU writes its log and the serial
//! file itself, with no virtlogd (which only systemd would start here).
//! `cgroup_controllers = []`: no cgroups for the domain, so the host's are not touched (no
//! systemd-machined here either).
//!
//! Nothing is skipped: without root, `unshare`, `libvirtd` or `virsh` the test fails and
//! says how to get them.

use std::fmt::Write as _;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::console::{parse_results, GuestRun};
use crate::vm::{guest_artifacts, Guest, GuestSlot};
use crate::workspace::{on_path, workspace};

/// The domain template, relative to the workspace root.
pub const DOMAIN_TEMPLATE: &str = "integration/libvirt/domain.xml";

/// What a missing libvirt failure says.
const LIBVIRT_HINT: &str = "run `bash scripts/install-deps.sh` (as root): it installs \
     libvirt-daemon, libvirt-daemon-driver-qemu and libvirt-clients";

/// How long libvirtd may take to answer its first call: it probes QEMU's capabilities
/// first (a few seconds under TCG on a loaded machine).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one virsh call may take.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a running domain's state is polled.
const POLL: Duration = Duration::from_millis(200);

/// The directories libvirtd sees at the system paths, each a bind mount of a subdirectory
/// of the instance's temp dir: (subdirectory, system path). `/var/cache/libvirt` is
/// [`CAPS_CACHE`] instead.
const PRIVATE_DIRS: [(&str, &str); 4] = [
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
];

/// What libvirtd sees as `/var/cache/libvirt`, relative to the workspace root: kept from
/// run to run, like the guest image in `target/guest`. It holds only the QEMU driver's
/// capabilities cache, which libvirt checks against the QEMU binaries, itself and the host
/// kernel at start-up and probes again when any changed. Without it every libvirtd start
/// probes QEMU first: 8 s here under TCG, against 0.1 s.
pub const CAPS_CACHE: &str = "target/libvirt-cache";

/// The user (and group) libvirt's QEMU driver looks up at start-up, added to the
/// namespace's /etc/passwd and /etc/group if the host has none (see the module docs):
/// (name, passwd line, group line).
const QEMU_USER: (&str, &str, &str) = (
    "libvirt-qemu",
    "libvirt-qemu:x:64055:64055:libvirt QEMU, corodev test:/nonexistent:/usr/sbin/nologin",
    "libvirt-qemu:x:64055:",
);

/// Run by `unshare --mount` (so in the new namespace) as
/// `sh -c SCRIPT sh DIR SOURCE PATH SOURCE PATH...`: the bind mounts of each SOURCE at its
/// PATH ([`PRIVATE_DIRS`], [`CAPS_CACHE`]; PATH is created if missing, as a mount point),
/// then libvirtd in place of the shell, so the test's child process is libvirtd.
const NAMESPACE_SCRIPT: &str = r#"set -eu
d=$1
shift
while [ $# -ge 2 ]; do
    mkdir -p "$2"
    mount --bind "$1" "$2"
    shift 2
done
mount --bind "$d/passwd" /etc/passwd
mount --bind "$d/group" /etc/group
exec libvirtd -f "$d/etc/libvirtd.conf" -p "$d/libvirtd.pid"
"#;

/// A private libvirtd (see the module docs): killed, with every domain it started, and
/// its directories removed on drop.
pub struct Libvirtd {
    child: Child,
    uri: String,
    // Last: removed after the processes that use it are gone.
    dir: tempfile::TempDir,
}

impl Libvirtd {
    /// Starts a private libvirtd and waits until it answers (`virsh version`). Panics,
    /// saying how to fix it, if libvirt is not installed or this is not root.
    pub fn start() -> Libvirtd {
        for tool in ["libvirtd", "virsh", "unshare", "timeout"] {
            assert!(on_path(tool), "{tool} is not on PATH: {LIBVIRT_HINT}");
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "a private libvirtd needs root (a mount namespace, and libvirtd's system mode)"
        );
        // Under /tmp: the socket path must fit in 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("corodev-libvirt-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let d = dir.path();
        for sub in PRIVATE_DIRS.iter().map(|(sub, _)| *sub).chain(["sock"]) {
            mkdir(&d.join(sub));
        }
        let sock_dir = d.join("sock");
        write(
            &d.join("etc/libvirtd.conf"),
            &format!(
                "unix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0700\"\nauth_unix_rw = \"none\"\n\
                 auth_unix_ro = \"none\"\nlog_outputs = \"3:file:{}\"\n",
                sock_dir.display(),
                d.join("libvirtd.log").display()
            ),
        );
        write(
            &d.join("etc/qemu.conf"),
            "# Why each line: integration/src/libvirt.rs\n\
             user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\n\
             security_driver = \"none\"\nstdio_handler = \"file\"\ncgroup_controllers = [ ]\n",
        );
        let (user, passwd_line, group_line) = QEMU_USER;
        write(
            &d.join("passwd"),
            &with_line("/etc/passwd", user, passwd_line),
        );
        write(&d.join("group"), &with_line("/etc/group", user, group_line));

        let cache = workspace().join(CAPS_CACHE);
        mkdir(&cache);
        let mounts: Vec<(PathBuf, &str)> = PRIVATE_DIRS
            .iter()
            .map(|(sub, path)| (d.join(sub), *path))
            .chain([(cache.clone(), "/var/cache/libvirt")])
            .collect();
        // One libvirtd of this workspace starts at a time: the one that probes QEMU writes
        // the cache, which another must not read half-written.
        let cache_lock = CacheLock::take(&cache.join(".lock"));

        eprintln!("libvirt: starting a private libvirtd in {}", d.display());
        let out = std::fs::File::create(d.join("libvirtd.out"))
            .unwrap_or_else(|e| panic!("cannot create libvirtd.out: {e}"));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot dup libvirtd.out: {e}"));
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(NAMESPACE_SCRIPT)
            .arg("sh")
            .arg(d)
            .args(
                mounts
                    .iter()
                    .flat_map(|(src, dst)| [src.as_os_str(), dst.as_ref()]),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run unshare: {e}"));
        let uri = format!(
            "qemu+unix:///system?socket={}",
            sock_dir.join("libvirt-sock").display()
        );
        let mut libvirtd = Libvirtd { child, uri, dir };
        libvirtd.wait_ready();
        drop(cache_lock);
        libvirtd
    }

    /// Waits until the socket exists and libvirtd answers with its QEMU driver up.
    fn wait_ready(&mut self) {
        let started = Instant::now();
        let socket = self.dir.path().join("sock/libvirt-sock");
        while !socket.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "libvirtd exited ({status}) before listening{}",
                    self.diagnostics(None)
                );
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "libvirtd did not create {} within {START_TIMEOUT:?}{}",
                socket.display(),
                self.diagnostics(None)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The first call waits for the driver's start-up (QEMU's capabilities probe).
        let version = self.virsh_ok(&["version"]);
        let hypervisor = version
            .lines()
            .find_map(|l| l.strip_prefix("Running hypervisor: "))
            .unwrap_or_else(|| {
                panic!(
                    "libvirt runs no QEMU driver (virsh version: {version:?}): {LIBVIRT_HINT}{}",
                    self.diagnostics(None)
                )
            });
        eprintln!(
            "libvirt: libvirtd (pid {}) answers after {:.1} s, hypervisor {hypervisor}",
            self.child.id(),
            started.elapsed().as_secs_f64()
        );
    }

    /// The URI `virsh -c` connects to this libvirtd with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Runs `virsh -c <uri> args` (killed past [`VIRSH_TIMEOUT`]): its stdout, or why it
    /// failed (its stderr).
    pub fn virsh(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("timeout")
            .args(["--kill-after=5", &VIRSH_TIMEOUT.as_secs().to_string()])
            .args(["virsh", "-q", "-c", &self.uri])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run virsh: {e}"))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        }
        let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        Err(match out.status.code() {
            Some(124 | 137) => format!("timed out after {VIRSH_TIMEOUT:?}: {why}"),
            _ => format!("{}: {why}", out.status),
        })
    }

    /// [`virsh`](Self::virsh), panicking with libvirtd's logs if it fails.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        self.virsh(args).unwrap_or_else(|why| {
            panic!(
                "virsh {} failed: {why}{}",
                args.join(" "),
                self.diagnostics(None)
            )
        })
    }

    /// libvirtd's log, and the QEMU log of `domain` if given, for failure messages.
    fn diagnostics(&self, domain: Option<&str>) -> String {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let d = self.dir.path();
        let mut t = format!(
            "\n--- libvirtd output ---\n{}--- libvirtd log ---\n{}",
            read(d.join("libvirtd.out")),
            read(d.join("libvirtd.log"))
        );
        if let Some(name) = domain {
            let _ = write!(
                t,
                "--- QEMU log of {name} ---\n{}",
                read(d.join(format!("log/qemu/{name}.log")))
            );
        }
        t
    }

    /// Defines a domain from [`DOMAIN_TEMPLATE`] for `guest` (its test, memory, vCPUs and
    /// queues; its kernel, initramfs and command line as `scripts/run-vm.sh` boots it)
    /// with its disk on the vhost-user socket `socket`, and starts it. Waits for any other
    /// guest of this process to finish first (one guest at a time, as for a [`crate::Vm`]).
    /// The domain is destroyed and undefined on drop.
    pub fn boot(&self, socket: &Path, guest: &Guest<'_>) -> Domain<'_> {
        static DOMAINS: AtomicU32 = AtomicU32::new(0);
        let slot = GuestSlot::take();
        let name = format!(
            "corodev-{}-{}",
            guest.test,
            DOMAINS.fetch_add(1, Ordering::Relaxed) + 1
        );
        let console = self.dir.path().join(format!("{name}.console"));
        let xml_path = self.dir.path().join(format!("{name}.xml"));
        write(&xml_path, &domain_xml(&name, socket, guest, &console));
        let xml = xml_path.to_str().expect("temp paths are UTF-8");
        eprintln!(
            "libvirt: defining domain {name} (guest test {}, disk on {})",
            guest.test,
            socket.display()
        );
        self.virsh_ok(&["define", xml]);
        let started = Instant::now();
        let domain = Domain {
            libvirtd: self,
            name,
            console,
            test: guest.test.to_owned(),
            started,
            deadline: started + guest.timeout,
            _slot: slot,
        };
        eprintln!("libvirt: starting {}", domain.name);
        if let Err(why) = self.virsh(&["start", &domain.name]) {
            panic!(
                "virsh start {} failed: {why}{}",
                domain.name,
                self.diagnostics(Some(&domain.name))
            );
        }
        domain
    }

    fn kill_leftover_qemus(&self) {
        // QEMU's pid file for each running domain, in the private /run/libvirt/qemu.
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("run/qemu")) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "pid") {
                continue;
            }
            let Some(pid) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            // Only if that pid is still a QEMU (not a reused pid).
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("qemu-system") {
                // SAFETY: kill has no memory-safety preconditions; the pid was just checked
                // to be a QEMU that this libvirtd started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if let Ok(names) = self.virsh(&["list", "--name"]) {
            for name in names.lines().filter(|n| !n.is_empty()) {
                let _ = self.virsh(&["destroy", name]);
            }
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.kill_leftover_qemus();
    }
}

/// An exclusive `flock` on a file, held until dropped (closing the file releases it).
struct CacheLock {
    _file: std::fs::File,
}

impl CacheLock {
    fn take(path: &Path) -> CacheLock {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        // SAFETY: flock only reads the descriptor number, which `file` keeps open.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            rc,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        CacheLock { _file: file }
    }
}

/// A domain started by [`Libvirtd::boot`]: one guest running its test; destroyed and
/// undefined on drop.
pub struct Domain<'a> {
    libvirtd: &'a Libvirtd,
    name: String,
    console: PathBuf,
    test: String,
    started: Instant,
    deadline: Instant,
    _slot: GuestSlot,
}

impl Domain<'_> {
    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What `virsh domstate` says: `running`, `shut off`, `paused`, ...
    pub fn state(&self) -> String {
        self.libvirtd.virsh_ok(&["domstate", &self.name])
    }

    /// The guest's serial console so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// libvirt's log of this domain's QEMU (its command line, and what QEMU printed).
    pub fn qemu_log(&self) -> String {
        let path = self
            .libvirtd
            .dir
            .path()
            .join(format!("log/qemu/{}.log", self.name));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Waits until the guest powers off (the domain is shut off) or its time is up, and
    /// returns what it printed; see [`crate::Vm::wait_while`]. `abort` (polled) returning
    /// a reason destroys the domain early.
    pub fn wait_while(self, mut abort: impl FnMut() -> Option<String>) -> GuestRun {
        let mut aborted = None;
        let mut timed_out = false;
        loop {
            let state = self.state();
            if state == "shut off" {
                break;
            }
            if Instant::now() >= self.deadline {
                timed_out = true;
                break;
            }
            if let Some(why) = abort() {
                aborted = Some(why);
                break;
            }
            std::thread::sleep(POLL);
        }
        let console = self.console();
        let run = GuestRun {
            test: self.test.clone(),
            results: parse_results(&console),
            console,
            elapsed: self.started.elapsed(),
            // No process of ours ran QEMU; the verdict is the console's.
            status: None,
            timed_out,
            aborted,
            server_log: None,
        };
        eprintln!("libvirt: {} {}", self.name, run.summary());
        run
    }
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        if self.libvirtd.virsh(&["domstate", &self.name]).as_deref() != Ok("shut off") {
            let _ = self.libvirtd.virsh(&["destroy", &self.name]);
        }
        let _ = self.libvirtd.virsh(&["undefine", &self.name]);
    }
}

/// [`DOMAIN_TEMPLATE`]'s text.
pub fn domain_template() -> String {
    let path = workspace().join(DOMAIN_TEMPLATE);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// [`DOMAIN_TEMPLATE`] with every `@PLACEHOLDER@` filled in for `guest`, its disk on
/// `socket` and its serial console into the file `console`.
pub fn domain_xml(name: &str, socket: &Path, guest: &Guest<'_>, console: &Path) -> String {
    let artifacts = guest_artifacts();
    let values = [
        ("@NAME@", name.to_owned()),
        ("@MEMORY_MIB@", guest.mem_mib.to_string()),
        ("@VCPUS@", guest.smp.to_string()),
        ("@KERNEL@", artifacts.kernel.display().to_string()),
        ("@INITRD@", artifacts.initrd.display().to_string()),
        ("@CMDLINE@", guest.kernel_cmdline()),
        ("@QUEUES@", guest.queues.to_string()),
        ("@SOCKET@", socket.display().to_string()),
        ("@CONSOLE@", console.display().to_string()),
    ];
    let mut xml = domain_template();
    for (placeholder, value) in &values {
        assert!(
            xml.contains(placeholder),
            "{DOMAIN_TEMPLATE} has no {placeholder}"
        );
        xml = xml.replace(placeholder, &xml_escape(value));
    }
    xml
}

/// `s` as XML text or attribute value.
fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The file `path` with `line` appended unless a line already starts with `name:`.
fn with_line(path: &str, name: &str, line: &str) -> String {
    let mut text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    if !text.lines().any(|l| l.starts_with(&format!("{name}:"))) {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(line);
        text.push('\n');
    }
    text
}

fn mkdir(path: &Path) {
    std::fs::create_dir_all(path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_values_are_escaped() {
        assert_eq!(xml_escape("a&b<c>'d\""), "a&amp;b&lt;c&gt;&apos;d&quot;");
    }

    #[test]
    fn a_missing_user_is_appended_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("passwd");
        std::fs::write(&f, "root:x:0:0::/root:/bin/sh").expect("write");
        let p = f.to_str().expect("utf-8");
        let added = with_line(p, "libvirt-qemu", "libvirt-qemu:x:1:1::/:/bin/false");
        assert_eq!(
            added,
            "root:x:0:0::/root:/bin/sh\nlibvirt-qemu:x:1:1::/:/bin/false\n"
        );
        std::fs::write(&f, &added).expect("write");
        assert_eq!(with_line(p, "libvirt-qemu", "other"), added);
        assert_eq!(with_line(p, "libvirt", "x"), format!("{added}x\n"));
    }
}

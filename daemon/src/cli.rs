//! Command-line options and their validation.
//!
//! Everything a user can get wrong is checked here, before any file or socket is touched,
//! and reported as one line naming the option, the problem and the fix.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use corodev_devices::config::{MAX_QUEUE_SIZE, MIN_QUEUE_SIZE};
use corodev_units::parse_size;

/// Examples printed after `--help`.
const EXAMPLES: &str = "\
Examples:
  # Serve a raw image; attach QEMU with
  #   -chardev socket,id=c0,path=/run/corodev/vm1.sock
  #   -device vhost-user-blk-pci,chardev=c0,num-queues=2
  #   -object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem
  corodev --socket /run/corodev/vm1.sock --disk /var/lib/images/vm1.raw --num-queues 2

  # A block device with O_DIRECT, read-only, with a serial number
  corodev --socket /run/corodev/ro.sock --disk /dev/vg0/data --direct --readonly --serial DATA01

  # A 4 GiB null device for benchmarks (reads zeroes, discards writes)
  corodev --socket /tmp/null.sock --backend null --size 4G

  # An RBD image in a Ceph cluster, as client.vm1 with a cluster's own configuration
  corodev --socket /run/corodev/vm2.sock --backend rbd --rbd-pool rbd --rbd-image vm2 \
      --ceph-conf /etc/ceph/ceph.conf --ceph-id vm1";

/// Storage behind the virtio-blk device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// A raw image file or block device, through io_uring.
    File,
    /// Reads return zeroes, writes are discarded (benchmarks, tests).
    Null,
    /// An RBD image in a Ceph cluster, through librbd (--rbd-pool, --rbd-image).
    Rbd,
}

/// Whether the image is locked against other servers (QEMU's `locking=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LockMode {
    /// Take QEMU's OFD locks: another corodev, QEMU or qemu-storage-daemon writing the
    /// image is refused, and refuses this one.
    On,
    /// No locks (a cluster file system or an operator keeps writers apart).
    Off,
}

/// Coroutine context-switch implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CoroutineBackend {
    /// Register-only switch, no syscall; makecontext to start a stack (x86_64 and aarch64 with glibc; a
    /// musl build uses sigaltstack, other architectures ucontext).
    Fast,
    /// The same register switch, stacks started from a signal handler (SIGUSR2) instead of
    /// makecontext: what a static musl build runs.
    Sigaltstack,
    /// glibc swapcontext on every switch (portable; for debugging and comparison).
    Ucontext,
    /// Every coroutine an OS thread, switches hand a baton (slow; for gdb, Valgrind's
    /// thread tools and sanitizers, which understand threads but not stack switching).
    Thread,
}

impl From<CoroutineBackend> for coro::Backend {
    fn from(b: CoroutineBackend) -> coro::Backend {
        match b {
            CoroutineBackend::Fast => coro::Backend::Fast,
            CoroutineBackend::Sigaltstack => coro::Backend::Sigaltstack,
            CoroutineBackend::Ucontext => coro::Backend::Ucontext,
            CoroutineBackend::Thread => coro::Backend::Thread,
        }
    }
}

/// Where request coroutines keep their stacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StackMode {
    /// Each coroutine owns a guarded stack, reused from a per-thread pool. No copying on a
    /// switch; a parked request costs the stack pages it touched (4 KiB or more).
    Pooled,
    /// All coroutines of a worker thread run on one stack; a parked request's used bytes
    /// (1-2 KiB) are copied to the heap when another request runs. For many mostly idle
    /// requests on a memory-bound host; not for deep stacks or lowest latency.
    Shared,
}

impl StackMode {
    /// The coroutine crate's value.
    pub fn to_coro(self) -> coro::StackMode {
        match self {
            StackMode::Pooled => coro::StackMode::Pooled,
            StackMode::Shared => coro::StackMode::Shared,
        }
    }
}

/// corodev: a vhost-user-blk daemon whose every guest request is a stackful coroutine.
#[derive(Debug, Parser)]
#[command(version, about, after_help = EXAMPLES)]
pub struct Cli {
    /// vhost-user socket to listen on (a stale socket file is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// The export's name: which socket-activated socket is its own (the socket unit's
    /// FileDescriptorName=), and how logs and `systemctl status` call it. Default: the
    /// socket file's name without its extension (vm1 for /run/corodev/vm1.sock).
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,

    /// Raw image file or block device to export (required for --backend file).
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,

    /// Storage backend.
    #[arg(long, value_enum, default_value_t = BackendKind::File)]
    pub backend: BackendKind,

    /// Size of a null device, in bytes or with a K/M/G/T suffix (binary units).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Fixed latency added to every null-backend request, in microseconds.
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub null_latency_us: u64,

    /// Ceph pool of the RBD image (--backend rbd).
    #[arg(long, value_name = "POOL", value_parser = parse_ceph_name)]
    pub rbd_pool: Option<String>,

    /// RBD image to export (--backend rbd).
    #[arg(long, value_name = "IMAGE", value_parser = parse_ceph_name)]
    pub rbd_image: Option<String>,

    /// RADOS namespace of the image within its pool (default: none).
    #[arg(long, value_name = "NS", value_parser = parse_ceph_name)]
    pub rbd_namespace: Option<String>,

    /// Ceph configuration file (default: $CEPH_CONF, then /etc/ceph/ceph.conf).
    #[arg(long, value_name = "PATH")]
    pub ceph_conf: Option<PathBuf>,

    /// Ceph client name, without "client." (default: admin); its key comes from the
    /// keyring the configuration names.
    #[arg(long, value_name = "NAME", value_parser = parse_ceph_name)]
    pub ceph_id: Option<String>,

    /// How long connecting to the Ceph monitors may take before start-up fails, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ceph_connect_timeout: u64,

    /// How long one request may wait for the Ceph cluster before it fails with an I/O
    /// error, in seconds (rados_osd_op_timeout). Keep it below --stop-timeout, so that
    /// stopping a ring while the cluster is lost ends with errors, not a dropped connection.
    #[arg(long, value_name = "SECONDS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ceph_op_timeout: u64,

    /// Export read-only: the guest sees VIRTIO_BLK_F_RO and writes fail.
    #[arg(long)]
    pub readonly: bool,

    /// Lock the image the way QEMU's locking=on does (see --incoming for migrations).
    #[arg(long, value_enum, default_value_t = LockMode::On)]
    pub lock: LockMode,

    /// This daemon serves the destination of a live migration: take the image's write
    /// lock only when the frontend starts the device (the guest runs here), after the
    /// source's daemon gave it up at the switch-over. Like QEMU's -incoming.
    #[arg(long)]
    pub incoming: bool,

    /// Bypass the host's cache: the file is opened with O_DIRECT; an RBD image is opened
    /// with librbd's cache off (`rbd_cache = false`, as QEMU's `cache.direct=on`), so a
    /// write completes once the OSDs have it and the guest sees a write-through disk.
    #[arg(long)]
    pub direct: bool,

    /// Number of virtqueues offered to the guest (1-64).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Worker threads serving the queues (default: min(num-queues, CPU cores)).
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: Option<u16>,

    /// Maximum virtqueue size: a power of two from 2 to 32768.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Serial number returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    #[arg(long, value_name = "S", default_value = "corodev", value_parser = parse_serial)]
    pub serial: String,

    /// Logical block size the guest sees.
    #[arg(long, value_name = "512|4096", default_value_t = 512, value_parser = parse_block_size)]
    pub block_size: u32,

    /// Coroutine stack size, in bytes or with a K/M suffix (minimum 32K).
    #[arg(long, value_name = "BYTES", default_value = "256K", value_parser = parse_stack_size)]
    pub stack_size: u64,

    /// Coroutine context-switch implementation.
    #[arg(long, value_enum, default_value_t = CoroutineBackend::Fast)]
    pub coroutine_backend: CoroutineBackend,

    /// Where request coroutines keep their stacks. `shared` runs all of a worker's
    /// requests on one stack and copies each parked request's used bytes (1-2 KiB) to the
    /// heap: use it when many requests sit parked (deep queues, slow storage) on a host
    /// short of memory. Keep `pooled` (no copying) when latency matters or requests use
    /// deep stacks. `shared` needs a register switch: --coroutine-backend fast or
    /// sigaltstack.
    #[arg(long, value_enum, default_value_t = StackMode::Pooled)]
    pub stack_mode: StackMode,

    /// Poll the queues for up to this many microseconds after the last request before
    /// sleeping (0: never poll). Each worker adapts its window within this limit to how
    /// soon work comes back: polling saves the guest's kicks and our wake-ups under load,
    /// and stops costing CPU when the next request is further away than this.
    #[arg(long, value_name = "US", default_value_t = 32, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub poll_us: u64,

    /// How long stopping a ring (GET_VRING_BASE: VM stop, migration, device reset) waits
    /// for the ring's requests in flight, in seconds. Past it the stop cannot be answered
    /// truthfully, so the connection is closed instead.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stop_timeout: u64,

    /// Serve one connection, then exit (default: listen again after each disconnect).
    #[arg(long)]
    pub once: bool,
}

/// A power of two the device accepts (the same bounds `DeviceConfig::build` checks, so a
/// value that passes here is never refused later).
fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number: use a power of two such as 128 or 256"))?;
    let valid = u32::from(MIN_QUEUE_SIZE)..=u32::from(MAX_QUEUE_SIZE);
    match u16::try_from(n) {
        Ok(q) if valid.contains(&n) && n.is_power_of_two() => Ok(q),
        _ => Err(format!(
            "{n} is not a power of two between {MIN_QUEUE_SIZE} and {MAX_QUEUE_SIZE}: use e.g. 128 or 256"
        )),
    }
}

/// A name systemd can pass in `LISTEN_FDNAMES`: 1 to 255 printable ASCII characters,
/// no `:` (the list separator) and no spaces.
fn parse_name(s: &str) -> Result<String, String> {
    let ok =
        !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "'{s}' is not a usable name: use 1 to 255 printable ASCII characters without ':' or spaces, e.g. vm1"
        ))
    }
}

/// A Ceph pool, image, namespace or client name: non-empty, no NUL, no '/' or '@' (which
/// rbd's own `pool/image@snap` spec syntax would read differently), at most 255 bytes.
fn parse_ceph_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && !s.contains(['\0', '/', '@'])
        && !s.chars().any(char::is_control);
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "'{s}' is not a usable Ceph name: use 1 to 255 characters without '/', '@' or control characters"
        ))
    }
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!(
            "'{s}' is not a supported block size: use 512 or 4096"
        )),
    }
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err(format!(
            "serial '{s}' is {} bytes; virtio-blk allows at most 20",
            s.len()
        ));
    }
    Ok(s.to_owned())
}

fn parse_stack_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n < coro::MIN_STACK_SIZE as u64 {
        return Err(format!(
            "stack size {n} is below the minimum of {} bytes: use at least 32K",
            coro::MIN_STACK_SIZE
        ));
    }
    if n > 64 << 20 {
        return Err(format!("stack size {n} is above 64M: use e.g. 256K or 1M"));
    }
    Ok(n)
}

/// A combination of options that cannot work (single options are checked by their
/// parsers above, which clap reports itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    /// `--backend file` without a disk.
    #[error("--disk PATH is required with --backend file (or use --backend null --size BYTES)")]
    DiskRequired,
    /// `--size` given for a file, whose size is its own.
    #[error("--size is only for --backend null; a file's size is its own")]
    SizeWithFile,
    /// `--backend null` without a size.
    #[error("--backend null needs --size BYTES, e.g. --size 1G")]
    NullNeedsSize,
    /// A null device size of zero or a partial last block.
    #[error("--size {size} is not a positive multiple of the block size {block_size}")]
    NullSizeMisaligned {
        /// The size given.
        size: u64,
        /// The logical block size.
        block_size: u32,
    },
    /// `--incoming` only changes when the image file's lock is taken (not with --lock off,
    /// nor for null or RBD exports, which have no file lock).
    #[error(
        "--incoming only delays the write lock of a --backend file image; drop it with --lock off or another backend"
    )]
    IncomingWithoutLock,
    /// `--backend rbd` without `--rbd-pool` or `--rbd-image`.
    #[error("--backend rbd needs --rbd-pool POOL and --rbd-image IMAGE")]
    RbdNeedsImage,
    /// An RBD option given with another backend.
    #[error("{option} is only for --backend rbd")]
    RbdOptionWithoutRbd {
        /// The option given.
        option: &'static str,
    },
    /// `--disk` or `--size` given with `--backend rbd`.
    #[error("{option} is not used with --backend rbd: the image's size is its own")]
    NotForRbd {
        /// The option given.
        option: &'static str,
    },
    /// `--disk` given with `--backend null`.
    #[error("--disk is not used with --backend null: drop it or use --backend file")]
    DiskWithNull,
    /// More worker threads than queues to give them.
    #[error(
        "--threads {threads} is more than --num-queues {queues}: a thread serves whole queues"
    )]
    TooManyThreads {
        /// `--threads`.
        threads: u16,
        /// `--num-queues`.
        queues: u16,
    },
    /// `--stack-mode shared` with a backend that cannot share a stack (`ucontext`,
    /// `thread`, or a register switch where this build falls back from it).
    #[error(
        "--stack-mode shared needs a register-switch coroutine backend, which \
         --coroutine-backend {backend} is not in this build: use --coroutine-backend fast or \
         sigaltstack (x86_64), or --stack-mode pooled"
    )]
    SharedStackNeedsRegisterSwitch {
        /// `--coroutine-backend`, as typed.
        backend: &'static str,
    },
}

impl Cli {
    /// Checks combinations of options that clap cannot express.
    pub fn validate(&self) -> Result<(), CliError> {
        match self.backend {
            BackendKind::File => {
                if self.disk.is_none() {
                    return Err(CliError::DiskRequired);
                }
                if self.size.is_some() {
                    return Err(CliError::SizeWithFile);
                }
            }
            BackendKind::Null => {
                let size = self.size.ok_or(CliError::NullNeedsSize)?;
                if size == 0 || size % u64::from(self.block_size) != 0 {
                    return Err(CliError::NullSizeMisaligned {
                        size,
                        block_size: self.block_size,
                    });
                }
                if self.disk.is_some() {
                    return Err(CliError::DiskWithNull);
                }
            }
            BackendKind::Rbd => {
                if self.rbd_pool.is_none() || self.rbd_image.is_none() {
                    return Err(CliError::RbdNeedsImage);
                }
                if self.disk.is_some() {
                    return Err(CliError::NotForRbd { option: "--disk" });
                }
                if self.size.is_some() {
                    return Err(CliError::NotForRbd { option: "--size" });
                }
            }
        }
        if self.backend != BackendKind::Rbd {
            let given = [
                ("--rbd-pool", self.rbd_pool.is_some()),
                ("--rbd-image", self.rbd_image.is_some()),
                ("--rbd-namespace", self.rbd_namespace.is_some()),
                ("--ceph-conf", self.ceph_conf.is_some()),
                ("--ceph-id", self.ceph_id.is_some()),
            ];
            if let Some(&(option, _)) = given.iter().find(|(_, set)| *set) {
                return Err(CliError::RbdOptionWithoutRbd { option });
            }
        }
        // The image lock is a file lock; an RBD image has librbd's exclusive lock instead.
        if self.incoming && (self.lock == LockMode::Off || self.backend != BackendKind::File) {
            return Err(CliError::IncomingWithoutLock);
        }
        if self.stack_mode == StackMode::Shared
            && !coro::Backend::from(self.coroutine_backend).switches_by_register()
        {
            return Err(CliError::SharedStackNeedsRegisterSwitch {
                backend: coro::Backend::from(self.coroutine_backend).name(),
            });
        }
        match self.threads {
            Some(threads) if threads > self.num_queues => Err(CliError::TooManyThreads {
                threads,
                queues: self.num_queues,
            }),
            _ => Ok(()),
        }
    }

    /// The export's name: `--name`, or the socket file's name without its extension.
    pub fn export_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.socket
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| parse_name(n).is_ok())
                .unwrap_or_else(|| "corodev".to_owned())
        })
    }

    /// Worker threads to run: `--threads`, or one per queue up to the number of CPUs.
    pub fn worker_threads(&self) -> u16 {
        self.threads.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            self.num_queues.min(u16::try_from(cpus).unwrap_or(u16::MAX))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        let mut all = vec!["corodev", "--socket", "/tmp/s"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
        cli.validate().map_err(|e| e.to_string())?;
        Ok(cli)
    }

    /// The combination errors as values, not only their text.
    fn combination(args: &[&str]) -> Option<CliError> {
        let mut all = vec!["corodev", "--socket", "/tmp/s"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("parses").validate().err()
    }

    #[test]
    fn queue_size_must_be_power_of_two() {
        assert!(parse(&["--disk", "d", "--queue-size", "100"])
            .unwrap_err()
            .contains("not a power of two"));
        assert!(parse(&["--disk", "d", "--queue-size", "65536"]).is_err());
        assert!(parse(&["--disk", "d", "--queue-size", "0"]).is_err());
        assert!(
            parse(&["--disk", "d", "--queue-size", "1"])
                .unwrap_err()
                .contains("between 2 and 32768"),
            "the device needs 2 (header and status); refused here, never clamped"
        );
        assert_eq!(
            parse(&["--disk", "d", "--queue-size", "1024"]).map(|c| c.queue_size),
            Ok(1024)
        );
    }

    #[test]
    fn backend_needs_its_options() {
        assert!(parse(&[]).unwrap_err().contains("--disk PATH is required"));
        assert!(parse(&["--backend", "null"])
            .unwrap_err()
            .contains("--size"));
        assert!(parse(&["--backend", "null", "--size", "1000"])
            .unwrap_err()
            .contains("multiple of the block size"));
        assert!(parse(&["--backend", "null", "--size", "1M"]).is_ok());
    }

    #[test]
    fn block_size_serial_threads() {
        assert!(parse(&["--disk", "d", "--block-size", "1024"])
            .unwrap_err()
            .contains("512 or 4096"));
        assert!(parse(&["--disk", "d", "--serial", "123456789012345678901"])
            .unwrap_err()
            .contains("at most 20"));
        assert!(parse(&["--disk", "d", "--threads", "2"])
            .unwrap_err()
            .contains("more than --num-queues"));
        assert!(parse(&["--disk", "d", "--stack-size", "4K"])
            .unwrap_err()
            .contains("minimum"));
    }

    #[test]
    fn stack_mode_shared_needs_a_register_switch() {
        assert_eq!(
            parse(&["--disk", "d"]).map(|c| c.stack_mode),
            Ok(StackMode::Pooled)
        );
        assert_eq!(
            parse(&["--disk", "d", "--stack-mode", "shared"]).map(|c| c.stack_mode),
            Ok(StackMode::Shared)
        );
        for backend in ["ucontext", "thread"] {
            let args = [
                "--disk",
                "d",
                "--stack-mode",
                "shared",
                "--coroutine-backend",
                backend,
            ];
            assert_eq!(
                combination(&args),
                Some(CliError::SharedStackNeedsRegisterSwitch { backend }),
                "{backend}"
            );
        }
        assert_eq!(
            parse(&[
                "--disk",
                "d",
                "--stack-mode",
                "shared",
                "--coroutine-backend",
                "sigaltstack"
            ])
            .map(|c| c.stack_mode),
            Ok(StackMode::Shared)
        );
        assert!(parse(&["--disk", "d", "--stack-mode", "stacked"]).is_err());
    }

    #[test]
    fn ceph_names_are_checked() {
        assert!(
            parse(&["--backend", "rbd", "--rbd-pool", "a/b", "--rbd-image", "i"])
                .unwrap_err()
                .contains("not a usable Ceph name")
        );
        assert!(parse(&[
            "--backend",
            "rbd",
            "--rbd-pool",
            "p",
            "--rbd-image",
            "i@snap"
        ])
        .unwrap_err()
        .contains("without '/', '@'"));
        assert!(parse(&["--backend", "rbd", "--rbd-pool", "p", "--rbd-image", ""]).is_err());
        let cli = parse(&[
            "--backend",
            "rbd",
            "--rbd-pool",
            "p",
            "--rbd-image",
            "i",
            "--rbd-namespace",
            "ns",
            "--ceph-id",
            "vm1",
        ])
        .expect("parses");
        assert_eq!(cli.rbd_namespace.as_deref(), Some("ns"));
        assert_eq!(cli.ceph_id.as_deref(), Some("vm1"));
        assert_eq!((cli.ceph_connect_timeout, cli.ceph_op_timeout), (15, 20));
    }

    #[test]
    fn export_name_from_option_or_socket_file() {
        assert_eq!(
            parse(&["--disk", "d"]).map(|c| c.export_name()),
            Ok("s".into())
        );
        let cli = Cli::try_parse_from([
            "corodev",
            "--socket",
            "/run/corodev/vm1.sock",
            "--disk",
            "d",
        ])
        .expect("parses");
        assert_eq!(cli.export_name(), "vm1");
        assert_eq!(
            parse(&["--disk", "d", "--name", "disk-a"]).map(|c| c.export_name()),
            Ok("disk-a".into())
        );
        assert!(parse(&["--disk", "d", "--name", "a:b"])
            .unwrap_err()
            .contains("without ':'"));
        assert!(parse(&["--disk", "d", "--name", ""]).is_err());
    }

    #[test]
    fn combination_errors_carry_their_values() {
        assert_eq!(combination(&[]), Some(CliError::DiskRequired));
        assert_eq!(
            combination(&["--disk", "d", "--size", "1M"]),
            Some(CliError::SizeWithFile)
        );
        assert_eq!(
            combination(&["--backend", "null"]),
            Some(CliError::NullNeedsSize)
        );
        assert_eq!(
            combination(&["--backend", "null", "--size", "6K", "--block-size", "4096"]),
            Some(CliError::NullSizeMisaligned {
                size: 6 << 10,
                block_size: 4096
            })
        );
        assert_eq!(
            combination(&["--backend", "null", "--size", "1M", "--disk", "d"]),
            Some(CliError::DiskWithNull)
        );
        assert_eq!(
            combination(&["--disk", "d", "--num-queues", "2", "--threads", "3"]),
            Some(CliError::TooManyThreads {
                threads: 3,
                queues: 2
            })
        );
        assert_eq!(
            combination(&["--disk", "d", "--lock", "off", "--incoming"]),
            Some(CliError::IncomingWithoutLock)
        );
        assert_eq!(combination(&["--disk", "d", "--incoming"]), None);
        assert_eq!(
            combination(&["--backend", "rbd", "--rbd-pool", "rbd"]),
            Some(CliError::RbdNeedsImage)
        );
        assert_eq!(
            combination(&["--backend", "rbd", "--rbd-image", "i"]),
            Some(CliError::RbdNeedsImage)
        );
        let rbd = ["--backend", "rbd", "--rbd-pool", "p", "--rbd-image", "i"];
        assert_eq!(combination(&rbd), None);
        assert_eq!(
            combination(&[&rbd[..], &["--disk", "d"]].concat()),
            Some(CliError::NotForRbd { option: "--disk" })
        );
        assert_eq!(
            combination(&[&rbd[..], &["--size", "1M"]].concat()),
            Some(CliError::NotForRbd { option: "--size" })
        );
        assert_eq!(
            combination(&["--disk", "d", "--ceph-id", "x"]),
            Some(CliError::RbdOptionWithoutRbd {
                option: "--ceph-id"
            })
        );
        assert_eq!(
            combination(&[&rbd[..], &["--incoming"]].concat()),
            Some(CliError::IncomingWithoutLock)
        );
        assert_eq!(combination(&["--disk", "d"]), None);
    }
}

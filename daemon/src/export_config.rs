//! One export's settings, and the one place they are validated.
//!
//! An export is configured either by command-line flags (one export per process) or by a
//! `[[exports]]` table of a `--config` file (several). Both are the same struct,
//! [`ExportConfig`]: clap fills it from flags, serde from TOML, with the same names
//! (`--queue-size` is `queue-size`) and the same defaults. [`ExportConfig::validate`] turns
//! it into an [`ExportSpec`], whose values are known good, or into every problem found,
//! each tied to the setting it is about ([`ExportError::key`]), so the caller can name it
//! the way the user wrote it (`--queue-size` or `exports[1].queue-size`).
//!
//! Values are kept wide (`u64`, strings) until validation, so that a file with several
//! bad values is reported whole instead of one serde error at a time.
//!
//! Boundary: nothing here touches a file or a socket; opening the disk (which can fail
//! too) is [`crate::exports::prepare`]'s.

use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use corodev_devices::config::{MAX_QUEUE_SIZE, MIN_QUEUE_SIZE};
use corodev_units::parse_size;
use serde::Deserialize;

/// Storage behind the virtio-blk device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// A raw image file or block device, through io_uring.
    File,
    /// Reads return zeroes, writes are discarded (benchmarks, tests).
    Null,
    /// An RBD image in a Ceph cluster, through librbd (rbd-pool, rbd-image).
    Rbd,
    /// A namespace of a local NVMe controller bound to vfio-pci, driven from userspace
    /// (pci, nvme-namespace).
    Nvme,
}

impl BackendKind {
    /// As written in a file or a flag.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::File => "file",
            BackendKind::Null => "null",
            BackendKind::Rbd => "rbd",
            BackendKind::Nvme => "nvme",
        }
    }
}

/// Whether the image is locked against other servers (QEMU's `locking=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockMode {
    /// Take QEMU's OFD locks: another corodev, QEMU or qemu-storage-daemon writing the
    /// image is refused, and refuses this one.
    On,
    /// No locks (a cluster file system or an operator keeps writers apart).
    Off,
}

/// Coroutine context-switch implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StackMode {
    /// Pooled stacks for a worker's first [`AUTO_POOLED`] requests in flight, the shared
    /// stack for those beyond: requests at ordinary depths switch without copying, and
    /// a deep queue of parked requests costs their used bytes each rather than a page or
    /// more. Plain pooled where the backend cannot share a stack.
    Auto,
    /// Each coroutine owns a guarded stack, reused from a per-thread pool. No copying on a
    /// switch; a parked request costs the stack pages it touched (4 KiB or more).
    Pooled,
    /// All coroutines of a worker thread run on one stack; a parked request's used bytes
    /// (1-2 KiB) are copied to the heap when another request runs. For many mostly idle
    /// requests on a memory-bound host; not for deep stacks or lowest latency.
    Shared,
}

/// Requests in flight on one worker that `auto` gives pooled stacks: the queue depth
/// most drivers and benchmarks use. With 1,024 requests parked on 4 queues it kept the
/// daemon's RSS at 10.9 MiB (pooled: 13.3, shared: 10.7), while the queue depth 32 cases
/// stay on pooled stacks (2-vCPU machine, BENCHMARKS.md).
pub const AUTO_POOLED: usize = 32;

impl StackMode {
    /// How the workers' coroutine builder keeps stacks: `auto` starts from pooled.
    pub fn to_coro(self) -> coro::StackMode {
        match self {
            StackMode::Auto | StackMode::Pooled => coro::StackMode::Pooled,
            StackMode::Shared => coro::StackMode::Shared,
        }
    }

    /// Requests in flight on a worker beyond which new ones go on the shared stack
    /// ([`coro::Scheduler::share_stacks_beyond`]); `usize::MAX`: never.
    pub fn shared_beyond(self) -> usize {
        match self {
            StackMode::Auto => AUTO_POOLED,
            StackMode::Pooled | StackMode::Shared => usize::MAX,
        }
    }

    /// The name `--stack-mode` takes.
    pub fn name(self) -> &'static str {
        match self {
            StackMode::Auto => "auto",
            StackMode::Pooled => "pooled",
            StackMode::Shared => "shared",
        }
    }
}

/// A size as written: a number of bytes (a TOML integer) or text with a K/M/G/T suffix
/// (a flag, or a TOML string such as `"4G"`). Parsed by validation, so a bad one is
/// reported with the others.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged, expecting = "a number of bytes or a size like \"64M\"")]
pub enum SizeArg {
    /// A plain number of bytes.
    Bytes(u64),
    /// Text for [`parse_size`].
    Text(String),
}

impl std::str::FromStr for SizeArg {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<SizeArg, Self::Err> {
        Ok(SizeArg::Text(s.to_owned()))
    }
}

impl SizeArg {
    /// The size in bytes.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            SizeArg::Bytes(n) => Ok(*n),
            SizeArg::Text(s) => parse_size(s),
        }
    }
}

// The defaults, shared by clap's `default_value`s and `ExportConfig::default` (serde's).
const DEFAULT_NUM_QUEUES: u64 = 1;
const DEFAULT_QUEUE_SIZE: u64 = 256;
const DEFAULT_SERIAL: &str = "corodev";
const DEFAULT_BLOCK_SIZE: u64 = 512;
const DEFAULT_STACK_SIZE: &str = "256K";
const DEFAULT_POLL_US: u64 = 32;
const DEFAULT_STOP_TIMEOUT: u64 = 30;
const DEFAULT_CEPH_CONNECT_TIMEOUT: u64 = 15;
const DEFAULT_CEPH_OP_TIMEOUT: u64 = 20;
const DEFAULT_NVME_NAMESPACE: u64 = 1;

/// One export's settings as the user wrote them, from flags or from a config file's
/// `[[exports]]` table: not yet validated (see [`ExportConfig::validate`]).
#[derive(Clone, Debug, PartialEq, Eq, clap::Args, Deserialize)]
#[group(id = "export", multiple = true)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ExportConfig {
    /// vhost-user socket to listen on (a stale socket file is replaced).
    #[arg(long, value_name = "PATH", required_unless_present = "config")]
    pub socket: Option<PathBuf>,

    /// The export's name: which socket-activated socket is its own (the socket unit's
    /// FileDescriptorName=), and how logs and `systemctl status` call it. Default: the
    /// socket file's name without its extension (vm1 for /run/corodev/vm1.sock).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Raw image file or block device to export (required for --backend file).
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,

    /// Storage backend.
    #[arg(long, value_enum, default_value_t = BackendKind::File)]
    pub backend: BackendKind,

    /// Size of a null device, in bytes or with a K/M/G/T suffix (binary units).
    #[arg(long, value_name = "BYTES")]
    pub size: Option<SizeArg>,

    /// Fixed latency added to every null-backend request, in microseconds.
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub null_latency_us: u64,

    /// Ceph pool of the RBD image (--backend rbd).
    #[arg(long, value_name = "POOL")]
    pub rbd_pool: Option<String>,

    /// RBD image to export (--backend rbd).
    #[arg(long, value_name = "IMAGE")]
    pub rbd_image: Option<String>,

    /// RADOS namespace of the image within its pool (default: none).
    #[arg(long, value_name = "NS")]
    pub rbd_namespace: Option<String>,

    /// Ceph configuration file (default: $CEPH_CONF, then /etc/ceph/ceph.conf).
    #[arg(long, value_name = "PATH")]
    pub ceph_conf: Option<PathBuf>,

    /// Ceph client name, without "client." (default: admin); its key comes from the
    /// keyring the configuration names.
    #[arg(long, value_name = "NAME")]
    pub ceph_id: Option<String>,

    /// How long connecting to the Ceph monitors may take before start-up fails, in seconds
    /// (1-3600).
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_CEPH_CONNECT_TIMEOUT)]
    pub ceph_connect_timeout: u64,

    /// How long one request may wait for the Ceph cluster before it fails with an I/O
    /// error, in seconds (1-3600; rados_osd_op_timeout). Keep it below --stop-timeout, so
    /// that stopping a ring while the cluster is lost ends with errors, not a dropped
    /// connection.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_CEPH_OP_TIMEOUT)]
    pub ceph_op_timeout: u64,

    /// PCI address of the NVMe controller (--backend nvme), DDDD:BB:DD.F as lspci -D
    /// shows it; the controller must be bound to vfio-pci.
    #[arg(long, value_name = "DDDD:BB:DD.F")]
    pub pci: Option<String>,

    /// Namespace of the NVMe controller to export (--backend nvme).
    #[arg(long, value_name = "NSID", default_value_t = DEFAULT_NVME_NAMESPACE)]
    pub nvme_namespace: u64,

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
    #[arg(long, value_name = "N", default_value_t = DEFAULT_NUM_QUEUES)]
    pub num_queues: u64,

    /// Worker threads serving the queues, 1-64 (default: min(num-queues, CPU cores)).
    #[arg(long, value_name = "M")]
    pub threads: Option<u64>,

    /// Maximum virtqueue size: a power of two from 2 to 32768.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUEUE_SIZE)]
    pub queue_size: u64,

    /// Serial number returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    #[arg(long, value_name = "S", default_value = DEFAULT_SERIAL)]
    pub serial: String,

    /// Logical block size the guest sees.
    #[arg(long, value_name = "512|4096", default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: u64,

    /// Coroutine stack size, in bytes or with a K/M suffix (32K to 64M).
    #[arg(long, value_name = "BYTES", default_value = DEFAULT_STACK_SIZE)]
    pub stack_size: SizeArg,

    /// Coroutine context-switch implementation.
    #[arg(long, value_enum, default_value_t = CoroutineBackend::Fast)]
    pub coroutine_backend: CoroutineBackend,

    /// Where request coroutines keep their stacks. `shared` runs all of a worker's
    /// requests on one stack and copies each parked request's used bytes (1-2 KiB) to the
    /// heap: use it when many requests sit parked (deep queues, slow storage) on a host
    /// short of memory. `pooled` gives each request a stack of its own (no copying, 4 KiB
    /// or more per parked request). `auto` (the default) gives a worker's first 32
    /// requests in flight pooled stacks and those beyond the shared one. `shared` needs a
    /// register switch: --coroutine-backend fast or sigaltstack (`auto` is then pooled).
    #[arg(long, value_enum, default_value_t = StackMode::Auto)]
    pub stack_mode: StackMode,

    /// Poll the queues for up to this many microseconds (0-10000) after the last request
    /// before sleeping (0: never poll). Each worker adapts its window within this limit to
    /// how soon work comes back: polling saves the guest's kicks and our wake-ups under
    /// load, and stops costing CPU when the next request is further away than this.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_US)]
    pub poll_us: u64,

    /// How long stopping a ring (GET_VRING_BASE: VM stop, migration, device reset) waits
    /// for the ring's requests in flight, in seconds (1-3600). Past it the stop cannot be
    /// answered truthfully, so the connection is closed instead.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_STOP_TIMEOUT)]
    pub stop_timeout: u64,
}

impl Default for ExportConfig {
    /// What an `[[exports]]` table leaves out: the flags' defaults (a unit test holds the
    /// two equal).
    fn default() -> ExportConfig {
        ExportConfig {
            socket: None,
            name: None,
            disk: None,
            backend: BackendKind::File,
            size: None,
            null_latency_us: 0,
            rbd_pool: None,
            rbd_image: None,
            rbd_namespace: None,
            ceph_conf: None,
            ceph_id: None,
            ceph_connect_timeout: DEFAULT_CEPH_CONNECT_TIMEOUT,
            ceph_op_timeout: DEFAULT_CEPH_OP_TIMEOUT,
            pci: None,
            nvme_namespace: DEFAULT_NVME_NAMESPACE,
            readonly: false,
            lock: LockMode::On,
            incoming: false,
            direct: false,
            num_queues: DEFAULT_NUM_QUEUES,
            threads: None,
            queue_size: DEFAULT_QUEUE_SIZE,
            serial: DEFAULT_SERIAL.to_owned(),
            block_size: DEFAULT_BLOCK_SIZE,
            stack_size: SizeArg::Text(DEFAULT_STACK_SIZE.to_owned()),
            coroutine_backend: CoroutineBackend::Fast,
            stack_mode: StackMode::Auto,
            poll_us: DEFAULT_POLL_US,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
        }
    }
}

/// The storage of a validated export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A raw image file or block device.
    File {
        /// Its path.
        disk: PathBuf,
        /// Open it with O_DIRECT.
        direct: bool,
        /// Take QEMU-compatible image locks.
        lock: LockMode,
        /// Take the write lock only when the guest starts here (a migration's
        /// destination).
        incoming: bool,
    },
    /// Zeroes for reads, writes discarded.
    Null {
        /// Capacity in bytes, a positive multiple of the block size.
        size: u64,
        /// Added to every request.
        latency: Duration,
    },
    /// An RBD image in a Ceph cluster.
    Rbd(RbdSpec),
    /// A namespace of an NVMe controller, through VFIO.
    Nvme {
        /// The controller's PCI address, as given.
        pci: String,
        /// The namespace.
        namespace: u32,
    },
}

/// Where an RBD export's image is and how the cluster is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdSpec {
    /// The pool.
    pub pool: String,
    /// The image.
    pub image: String,
    /// The RADOS namespace within the pool.
    pub namespace: Option<String>,
    /// The Ceph configuration file (default: librados's).
    pub conf: Option<PathBuf>,
    /// The client name, without `client.`.
    pub id: Option<String>,
    /// librbd's cache off (`direct`).
    pub direct: bool,
    /// Longest wait for the monitors at open.
    pub connect_timeout: Duration,
    /// Longest wait for the cluster per request.
    pub op_timeout: Duration,
}

/// A validated export: every value in range and every combination possible. What runs,
/// and what a reload compares to decide whether an export changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    /// Its name (activated socket, logs, STATUS=, the registry's key).
    pub name: String,
    /// The vhost-user socket path.
    pub socket: PathBuf,
    /// The storage.
    pub backend: Backend,
    /// Read-only for the guest.
    pub readonly: bool,
    /// Virtqueues, 1-64.
    pub num_queues: u16,
    /// Worker threads, 1 to `num_queues`.
    pub threads: u16,
    /// Maximum virtqueue size, a power of two.
    pub queue_size: u16,
    /// GET_ID's answer, at most 20 bytes.
    pub serial: String,
    /// 512 or 4096.
    pub block_size: u32,
    /// Coroutine stack size in bytes.
    pub stack_size: usize,
    /// Coroutine switch implementation.
    pub coroutine_backend: CoroutineBackend,
    /// Where coroutine stacks live.
    pub stack_mode: StackMode,
    /// Longest poll window after the last request.
    pub poll: Duration,
    /// Longest wait for a ring's requests when the ring stops.
    pub stop_timeout: Duration,
}

/// What is wrong with one setting (the [`ExportError::key`] says which). Worded without
/// the setting's own name, which the caller puts in front (`--queue-size: ...` or
/// `exports[1].queue-size: ...`); another setting is named by its key, which is also its
/// flag without the dashes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A required setting is missing.
    #[error("required{0}")]
    Required(&'static str),
    /// A name systemd cannot pass in `LISTEN_FDNAMES`.
    #[error("'{0}' is not a usable name: use 1 to 255 printable ASCII characters without ':' or spaces, e.g. vm1")]
    BadName(String),
    /// A number outside its range.
    #[error("{value} is out of range: use {min} to {max}")]
    OutOfRange {
        /// What was given.
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// A queue size the device cannot use.
    #[error("{0} is not a power of two between {MIN_QUEUE_SIZE} and {MAX_QUEUE_SIZE}: use e.g. 128 or 256")]
    QueueSize(u64),
    /// A block size other than 512 or 4096.
    #[error("{0} is not a supported block size: use 512 or 4096")]
    BlockSize(u64),
    /// A serial longer than virtio-blk's 20 bytes.
    #[error("'{0}' is {len} bytes; virtio-blk allows at most 20", len = .0.len())]
    SerialTooLong(String),
    /// A size that does not parse.
    #[error("{0}")]
    Size(String),
    /// A coroutine stack size outside 32K..=64M.
    #[error("{0} bytes is not a usable stack size: use 32K to 64M, e.g. 256K or 1M")]
    StackSize(u64),
    /// A Ceph pool, image, namespace or client name that librbd would misread.
    #[error("'{0}' is not a usable Ceph name: use 1 to 255 characters without '/', '@' or control characters")]
    BadCephName(String),
    /// A setting that only another backend uses.
    #[error("not used with backend {backend}: {hint}")]
    NotForBackend {
        /// The backend chosen.
        backend: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
    /// A null device size of zero or a partial last block.
    #[error("{size} is not a positive multiple of the block size {block_size}")]
    NullSizeMisaligned {
        /// The size given.
        size: u64,
        /// The logical block size.
        block_size: u64,
    },
    /// `incoming` without an image lock to delay.
    #[error("only delays the write lock of a backend file image; drop it with lock off or another backend")]
    IncomingWithoutLock,
    /// More worker threads than queues to give them.
    #[error("{threads} is more than num-queues {queues}: a thread serves whole queues")]
    TooManyThreads {
        /// `threads`.
        threads: u64,
        /// `num-queues`.
        queues: u64,
    },
    /// `stack-mode shared` with a backend that cannot share a stack (`ucontext`, `thread`,
    /// or a register switch where this build falls back from it).
    #[error(
        "shared needs a register-switch coroutine backend, which coroutine-backend {backend} \
         is not in this build: use coroutine-backend fast or sigaltstack (x86_64), or \
         stack-mode pooled"
    )]
    SharedStackNeedsRegisterSwitch {
        /// The coroutine backend's name.
        backend: &'static str,
    },
}

/// One problem with one setting of an export.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("--{key}: {problem}")]
pub struct ExportError {
    /// The setting: its config-file key, which is its flag without `--`.
    pub key: &'static str,
    /// What is wrong with it.
    pub problem: Problem,
}

/// Every problem of one export, in the order of its settings. Displayed as flags would
/// name them, one per line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ExportErrors(pub Vec<ExportError>);

/// A name systemd can pass in `LISTEN_FDNAMES`: 1 to 255 printable ASCII characters,
/// no `:` (the list separator) and no spaces.
fn usable_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// A Ceph pool, image, namespace or client name: non-empty, no NUL, no '/' or '@' (which
/// rbd's own `pool/image@snap` spec syntax would read differently), at most 255 bytes.
fn usable_ceph_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && !s.contains(['/', '@']) && !s.chars().any(char::is_control)
}

/// `value` as a `T` within `min..=max`.
fn in_range<T: TryFrom<u64>>(value: u64, min: u64, max: u64) -> Result<T, Problem> {
    match T::try_from(value) {
        Ok(v) if (min..=max).contains(&value) => Ok(v),
        _ => Err(Problem::OutOfRange { value, min, max }),
    }
}

impl ExportConfig {
    /// The export's name: `name`, or the socket file's name without its extension.
    pub fn export_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.socket
                .as_deref()
                .and_then(|s| s.file_stem())
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| usable_name(n))
                .unwrap_or_else(|| "corodev".to_owned())
        })
    }

    /// Checks every setting and every combination; the export to run, or every problem.
    pub fn validate(&self) -> Result<ExportSpec, ExportErrors> {
        let mut errors = Vec::new();
        let mut check = |key: &'static str, r: Result<(), Problem>| {
            if let Err(problem) = r {
                errors.push(ExportError { key, problem });
            }
        };
        // Each value on its own first, so that combinations are judged on known values.
        let name = self.export_name();
        check(
            "name",
            if usable_name(&name) {
                Ok(())
            } else {
                Err(Problem::BadName(name.clone()))
            },
        );
        check(
            "socket",
            match self.socket {
                Some(_) => Ok(()),
                None => Err(Problem::Required("")),
            },
        );
        let num_queues = in_range::<u16>(self.num_queues, 1, 64);
        check("num-queues", num_queues.clone().map(drop));
        let threads = self.threads.map(|t| in_range::<u16>(t, 1, 64)).transpose();
        check("threads", threads.clone().map(drop));
        let queue_size = match u16::try_from(self.queue_size) {
            Ok(q) if (MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&q) && q.is_power_of_two() => Ok(q),
            _ => Err(Problem::QueueSize(self.queue_size)),
        };
        check("queue-size", queue_size.clone().map(drop));
        check(
            "serial",
            if self.serial.len() > 20 {
                Err(Problem::SerialTooLong(self.serial.clone()))
            } else {
                Ok(())
            },
        );
        let block_size = match self.block_size {
            512 | 4096 => Ok(self.block_size as u32),
            n => Err(Problem::BlockSize(n)),
        };
        check("block-size", block_size.clone().map(drop));
        let stack_size = self
            .stack_size
            .bytes()
            .map_err(Problem::Size)
            .and_then(|n| match usize::try_from(n) {
                Ok(s) if (coro::MIN_STACK_SIZE..=64 << 20).contains(&s) => Ok(s),
                _ => Err(Problem::StackSize(n)),
            });
        check("stack-size", stack_size.clone().map(drop));
        let poll_us = in_range::<u64>(self.poll_us, 0, 10_000);
        check("poll-us", poll_us.clone().map(drop));
        let stop_timeout = in_range::<u64>(self.stop_timeout, 1, 3600);
        check("stop-timeout", stop_timeout.clone().map(drop));
        let backend = self.backend_of(block_size.as_ref().ok().copied(), &mut check);
        // The image lock is a file lock; an RBD image has librbd's exclusive lock instead.
        if self.incoming && (self.lock == LockMode::Off || self.backend != BackendKind::File) {
            check("incoming", Err(Problem::IncomingWithoutLock));
        }
        let coroutine = coro::Backend::from(self.coroutine_backend);
        if self.stack_mode == StackMode::Shared && !coroutine.switches_by_register() {
            check(
                "stack-mode",
                Err(Problem::SharedStackNeedsRegisterSwitch {
                    backend: coroutine.name(),
                }),
            );
        }
        if let (Ok(q), Ok(Some(t))) = (&num_queues, &threads) {
            if t > q {
                check(
                    "threads",
                    Err(Problem::TooManyThreads {
                        threads: u64::from(*t),
                        queues: u64::from(*q),
                    }),
                );
            }
        }
        let (
            Some(socket),
            Ok(num_queues),
            Ok(threads),
            Ok(queue_size),
            Ok(block_size),
            Ok(stack_size),
            Ok(poll_us),
            Ok(stop_timeout),
            Some(backend),
            true,
        ) = (
            self.socket.clone(),
            num_queues,
            threads,
            queue_size,
            block_size,
            stack_size,
            poll_us,
            stop_timeout,
            backend,
            errors.is_empty(),
        )
        else {
            return Err(ExportErrors(errors));
        };
        Ok(ExportSpec {
            name,
            socket,
            backend,
            readonly: self.readonly,
            num_queues,
            threads: threads.unwrap_or_else(|| default_threads(num_queues)),
            queue_size,
            serial: self.serial.clone(),
            block_size,
            stack_size,
            coroutine_backend: self.coroutine_backend,
            stack_mode: self.stack_mode,
            poll: Duration::from_micros(poll_us),
            stop_timeout: Duration::from_secs(stop_timeout),
        })
    }

    /// The backend's own settings, and those given that it does not use.
    fn backend_of(
        &self,
        block_size: Option<u32>,
        check: &mut impl FnMut(&'static str, Result<(), Problem>),
    ) -> Option<Backend> {
        if self.backend != BackendKind::Rbd {
            let given = [
                ("rbd-pool", self.rbd_pool.is_some()),
                ("rbd-image", self.rbd_image.is_some()),
                ("rbd-namespace", self.rbd_namespace.is_some()),
                ("ceph-conf", self.ceph_conf.is_some()),
                ("ceph-id", self.ceph_id.is_some()),
            ];
            for (key, _) in given.iter().filter(|(_, set)| *set) {
                check(
                    key,
                    Err(Problem::NotForBackend {
                        backend: self.backend.name(),
                        hint: "it is only for backend rbd",
                    }),
                );
            }
        }
        if self.backend != BackendKind::Nvme {
            if self.pci.is_some() {
                check(
                    "pci",
                    Err(Problem::NotForBackend {
                        backend: self.backend.name(),
                        hint: "it is only for backend nvme",
                    }),
                );
            }
            if self.nvme_namespace != DEFAULT_NVME_NAMESPACE {
                check(
                    "nvme-namespace",
                    Err(Problem::NotForBackend {
                        backend: self.backend.name(),
                        hint: "it is only for backend nvme",
                    }),
                );
            }
        }
        match self.backend {
            BackendKind::Rbd => self.rbd_of(check).map(Backend::Rbd),
            BackendKind::Nvme => {
                for (key, given) in [("disk", self.disk.is_some()), ("size", self.size.is_some())] {
                    if given {
                        check(
                            key,
                            Err(Problem::NotForBackend {
                                backend: "nvme",
                                hint: "the namespace's size is its own",
                            }),
                        );
                    }
                }
                let namespace = in_range::<u32>(self.nvme_namespace, 1, u64::from(u32::MAX));
                check("nvme-namespace", namespace.clone().map(drop));
                if self.pci.is_none() {
                    check(
                        "pci",
                        Err(Problem::Required(" with backend nvme, e.g. 0000:01:00.0")),
                    );
                }
                Some(Backend::Nvme {
                    pci: self.pci.clone()?,
                    namespace: namespace.ok()?,
                })
            }
            BackendKind::File => {
                if self.size.is_some() {
                    check(
                        "size",
                        Err(Problem::NotForBackend {
                            backend: "file",
                            hint: "a file's size is its own",
                        }),
                    );
                }
                if self.disk.is_none() {
                    check(
                        "disk",
                        Err(Problem::Required(
                            " with backend file (or use backend null with a size)",
                        )),
                    );
                }
                Some(Backend::File {
                    disk: self.disk.clone()?,
                    direct: self.direct,
                    lock: self.lock,
                    incoming: self.incoming,
                })
            }
            BackendKind::Null => {
                if self.disk.is_some() {
                    check(
                        "disk",
                        Err(Problem::NotForBackend {
                            backend: "null",
                            hint: "drop it or use backend file",
                        }),
                    );
                }
                let Some(size) = &self.size else {
                    check(
                        "size",
                        Err(Problem::Required(" with backend null, e.g. 1G")),
                    );
                    return None;
                };
                let size = match size.bytes() {
                    Ok(n) => n,
                    Err(e) => {
                        check("size", Err(Problem::Size(e)));
                        return None;
                    }
                };
                let block_size = u64::from(block_size?);
                if size == 0 || size % block_size != 0 {
                    check(
                        "size",
                        Err(Problem::NullSizeMisaligned { size, block_size }),
                    );
                    return None;
                }
                Some(Backend::Null {
                    size,
                    latency: Duration::from_micros(self.null_latency_us),
                })
            }
        }
    }
}

impl ExportConfig {
    /// An RBD export's settings.
    fn rbd_of(&self, check: &mut impl FnMut(&'static str, Result<(), Problem>)) -> Option<RbdSpec> {
        for (key, given) in [("disk", self.disk.is_some()), ("size", self.size.is_some())] {
            if given {
                check(
                    key,
                    Err(Problem::NotForBackend {
                        backend: "rbd",
                        hint: "the image's size is its own",
                    }),
                );
            }
        }
        let mut name = |key: &'static str, value: &Option<String>, required: bool| match value {
            Some(v) if usable_ceph_name(v) => Some(Some(v.clone())),
            Some(v) => {
                check(key, Err(Problem::BadCephName(v.clone())));
                None
            }
            None if required => {
                check(key, Err(Problem::Required(" with backend rbd")));
                None
            }
            None => Some(None),
        };
        let pool = name("rbd-pool", &self.rbd_pool, true);
        let image = name("rbd-image", &self.rbd_image, true);
        let namespace = name("rbd-namespace", &self.rbd_namespace, false);
        let id = name("ceph-id", &self.ceph_id, false);
        let connect_timeout = in_range::<u64>(self.ceph_connect_timeout, 1, 3600);
        check("ceph-connect-timeout", connect_timeout.clone().map(drop));
        let op_timeout = in_range::<u64>(self.ceph_op_timeout, 1, 3600);
        check("ceph-op-timeout", op_timeout.clone().map(drop));
        Some(RbdSpec {
            pool: pool??,
            image: image??,
            namespace: namespace?,
            conf: self.ceph_conf.clone(),
            id: id?,
            direct: self.direct,
            connect_timeout: Duration::from_secs(connect_timeout.ok()?),
            op_timeout: Duration::from_secs(op_timeout.ok()?),
        })
    }
}

/// One worker thread per queue, up to the number of CPUs.
fn default_threads(num_queues: u16) -> u16 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    num_queues.min(u16::try_from(cpus).unwrap_or(u16::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(disk: &str) -> ExportConfig {
        ExportConfig {
            socket: Some("/run/corodev/vm1.sock".into()),
            disk: Some(disk.into()),
            ..ExportConfig::default()
        }
    }

    fn errors(cfg: &ExportConfig) -> Vec<ExportError> {
        cfg.validate().expect_err("must be refused").0
    }

    fn one(key: &'static str, problem: Problem) -> Vec<ExportError> {
        vec![ExportError { key, problem }]
    }

    #[test]
    fn defaults_validate_to_the_documented_values() {
        let spec = file("d").validate().expect("valid");
        assert_eq!(spec.name, "vm1", "named after the socket file");
        assert_eq!(
            (
                spec.num_queues,
                spec.threads,
                spec.queue_size,
                spec.block_size
            ),
            (1, 1, 256, 512)
        );
        assert_eq!(spec.stack_size, 256 << 10);
        assert_eq!(spec.serial, "corodev");
        assert_eq!(spec.poll, Duration::from_micros(32));
        assert_eq!(spec.stop_timeout, Duration::from_secs(30));
        assert_eq!(
            spec.backend,
            Backend::File {
                disk: "d".into(),
                direct: false,
                lock: LockMode::On,
                incoming: false
            }
        );
    }

    #[test]
    fn each_value_is_checked() {
        let mut c = file("d");
        c.queue_size = 100;
        assert_eq!(errors(&c), one("queue-size", Problem::QueueSize(100)));
        c.queue_size = 1;
        assert_eq!(
            errors(&c),
            one("queue-size", Problem::QueueSize(1)),
            "the device needs 2 (header and status); refused here, never clamped"
        );
        c.queue_size = 65536;
        assert_eq!(errors(&c), one("queue-size", Problem::QueueSize(65536)));
        let mut c = file("d");
        c.block_size = 1024;
        assert_eq!(errors(&c), one("block-size", Problem::BlockSize(1024)));
        let mut c = file("d");
        c.serial = "123456789012345678901".into();
        assert!(matches!(
            &errors(&c)[..],
            [ExportError { key: "serial", .. }]
        ));
        let mut c = file("d");
        c.stack_size = SizeArg::Text("4K".into());
        assert_eq!(errors(&c), one("stack-size", Problem::StackSize(4096)));
        c.stack_size = SizeArg::Bytes(1 << 20);
        assert_eq!(c.validate().map(|s| s.stack_size), Ok(1 << 20));
        let mut c = file("d");
        c.num_queues = 0;
        assert_eq!(
            errors(&c),
            one(
                "num-queues",
                Problem::OutOfRange {
                    value: 0,
                    min: 1,
                    max: 64
                }
            )
        );
        let mut c = file("d");
        c.name = Some("a:b".into());
        assert_eq!(errors(&c), one("name", Problem::BadName("a:b".into())));
        let mut c = file("d");
        c.socket = None;
        c.name = Some("x".into());
        assert_eq!(errors(&c), one("socket", Problem::Required("")));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut c = file("d");
        c.queue_size = 3;
        c.block_size = 7;
        c.poll_us = 20_000;
        c.size = Some(SizeArg::Bytes(1));
        let keys: Vec<_> = errors(&c).iter().map(|e| e.key).collect();
        assert_eq!(keys, ["queue-size", "block-size", "poll-us", "size"]);
    }

    /// The keys of every problem of `c`.
    fn keys(c: &ExportConfig) -> Vec<&'static str> {
        errors(c).iter().map(|e| e.key).collect()
    }

    #[test]
    fn nvme_needs_a_pci_address_and_only_it_takes_one() {
        let nvme = |pci: Option<&str>, ns: u64| ExportConfig {
            socket: Some("/s".into()),
            backend: BackendKind::Nvme,
            pci: pci.map(Into::into),
            nvme_namespace: ns,
            ..ExportConfig::default()
        };
        assert_eq!(
            nvme(Some("0000:00:04.0"), 2).validate().map(|s| s.backend),
            Ok(Backend::Nvme {
                pci: "0000:00:04.0".into(),
                namespace: 2
            })
        );
        assert_eq!(
            errors(&nvme(None, 1)),
            one(
                "pci",
                Problem::Required(" with backend nvme, e.g. 0000:01:00.0")
            )
        );
        assert_eq!(
            keys(&nvme(Some("0000:00:04.0"), 0)),
            ["nvme-namespace"],
            "namespace ids start at 1"
        );
        let mut c = nvme(Some("0000:00:04.0"), 1);
        c.disk = Some("d".into());
        assert_eq!(keys(&c), ["disk"]);
        let mut c = file("d");
        c.pci = Some("0000:00:04.0".into());
        c.nvme_namespace = 3;
        assert_eq!(keys(&c), ["pci", "nvme-namespace"]);
    }

    #[test]
    fn rbd_needs_its_keys_and_only_it_takes_them() {
        let rbd = |pool: Option<&str>, image: Option<&str>| ExportConfig {
            socket: Some("/s".into()),
            backend: BackendKind::Rbd,
            rbd_pool: pool.map(Into::into),
            rbd_image: image.map(Into::into),
            ..ExportConfig::default()
        };
        let spec = rbd(Some("p"), Some("i")).validate().expect("valid");
        assert!(matches!(
            spec.backend,
            Backend::Rbd(RbdSpec { ref pool, ref image, connect_timeout, op_timeout, .. })
                if pool == "p" && image == "i"
                    && connect_timeout == Duration::from_secs(15)
                    && op_timeout == Duration::from_secs(20)
        ));
        assert_eq!(keys(&rbd(None, None)), ["rbd-pool", "rbd-image"]);
        assert_eq!(
            errors(&rbd(Some("a/b"), Some("i"))),
            one("rbd-pool", Problem::BadCephName("a/b".into()))
        );
        let mut c = rbd(Some("p"), Some("i@snap"));
        c.disk = Some("d".into());
        c.incoming = true;
        assert_eq!(keys(&c), ["disk", "rbd-image", "incoming"]);
        let mut c = file("d");
        c.ceph_id = Some("vm1".into());
        c.rbd_pool = Some("p".into());
        assert_eq!(keys(&c), ["rbd-pool", "ceph-id"]);
    }

    #[test]
    fn combinations() {
        let null = |size: Option<SizeArg>| ExportConfig {
            socket: Some("/s".into()),
            backend: BackendKind::Null,
            size,
            ..ExportConfig::default()
        };
        let mut c = file("d");
        c.disk = None;
        assert!(matches!(
            &errors(&c)[..],
            [ExportError {
                key: "disk",
                problem: Problem::Required(_)
            }]
        ));
        assert!(matches!(
            &errors(&null(None))[..],
            [ExportError {
                key: "size",
                problem: Problem::Required(_)
            }]
        ));
        assert!(
            null(Some(SizeArg::Text("6K".into()))).validate().is_ok(),
            "6K is whole 512-byte blocks"
        );
        let mut c = null(Some(SizeArg::Text("6K".into())));
        c.block_size = 4096;
        assert_eq!(
            errors(&c),
            one(
                "size",
                Problem::NullSizeMisaligned {
                    size: 6 << 10,
                    block_size: 4096
                }
            )
        );
        let mut c = null(Some(SizeArg::Text("1M".into())));
        c.disk = Some("d".into());
        assert!(matches!(
            &errors(&c)[..],
            [ExportError {
                key: "disk",
                problem: Problem::NotForBackend {
                    backend: "null",
                    ..
                }
            }]
        ));
        let mut c = file("d");
        c.size = Some(SizeArg::Text("1M".into()));
        assert!(matches!(
            &errors(&c)[..],
            [ExportError {
                key: "size",
                problem: Problem::NotForBackend {
                    backend: "file",
                    ..
                }
            }]
        ));
        let mut c = file("d");
        c.num_queues = 2;
        c.threads = Some(3);
        assert_eq!(
            errors(&c),
            one(
                "threads",
                Problem::TooManyThreads {
                    threads: 3,
                    queues: 2
                }
            )
        );
        let mut c = file("d");
        c.lock = LockMode::Off;
        c.incoming = true;
        assert_eq!(errors(&c), one("incoming", Problem::IncomingWithoutLock));
        c.lock = LockMode::On;
        assert!(c.validate().is_ok());
        for backend in [CoroutineBackend::Ucontext, CoroutineBackend::Thread] {
            let mut c = file("d");
            c.stack_mode = StackMode::Shared;
            c.coroutine_backend = backend;
            assert!(matches!(
                &errors(&c)[..],
                [ExportError {
                    key: "stack-mode",
                    problem: Problem::SharedStackNeedsRegisterSwitch { .. }
                }]
            ));
        }
    }
}

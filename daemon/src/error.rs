//! Errors that stop the daemon (startup and connection setup). Guest faults never reach
//! here: they end one request with an error status.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use corodev_devices::backend::ResizeError;
use corodev_devices::config::ConfigError;

use crate::export_config::ExportErrors;

/// Why the daemon cannot start or serve.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An export's settings that cannot work (one line per problem).
    #[error(transparent)]
    Export(#[from] ExportErrors),
    /// An export of that name runs already.
    #[error("an export named '{0}' is already running")]
    ExportExists(String),
    /// An export's serve loop panicked (a bug); the other exports go on.
    #[error("export {0}: its serve loop panicked (a bug; please report it with the log)")]
    Panicked(String),
    /// The daemon is stopping: no export starts any more.
    #[error("the daemon is stopping")]
    Stopping,
    /// No running export has that name.
    #[error("no export named '{0}' is running")]
    NoSuchExport(String),
    /// A new size the guest could not address: zero, or a partial last block.
    #[error("export {name}: cannot resize to {size} bytes: not a positive multiple of its {block_size}-byte block size")]
    ResizeMisaligned {
        /// The export.
        name: String,
        /// The size asked for, bytes.
        size: u64,
        /// The export's logical block size.
        block_size: u32,
    },
    /// Shrinking is refused: the guest's file system may have data past the new end, and
    /// it would see I/O errors there, or silently lose what it wrote.
    #[error("export {name}: cannot shrink from {old} to {new} bytes: only growing is supported while the export runs (the guest may have data past the new end)")]
    ResizeShrink {
        /// The export.
        name: String,
        /// Its size now, bytes.
        old: u64,
        /// The size asked for, bytes.
        new: u64,
    },
    /// The export cannot change its size (read-only, a block device) or its storage
    /// refused.
    #[error("export {name}: cannot resize to {size} bytes: {source}")]
    Resize {
        /// The export.
        name: String,
        /// The size asked for, bytes.
        size: u64,
        /// Why.
        source: ResizeError,
    },
    /// The export has its new size, but its frontend did not take the config-change
    /// notice (it did not answer in time, or its backend channel is broken).
    #[error("export {name}: resized from {old} to {new} bytes, but the frontend was not told ({source}); the guest sees the new size after the frontend reconnects or the guest reboots")]
    ResizeNotNotified {
        /// The export.
        name: String,
        /// The old size, bytes.
        old: u64,
        /// The new size, bytes.
        new: u64,
        /// What sending the notice said.
        source: io::Error,
    },
    /// The disk image does not exist or cannot be opened.
    #[error("cannot open disk {path}: {source}; check the path and permissions")]
    OpenDisk {
        /// Disk path.
        path: PathBuf,
        /// What opening it said.
        source: io::Error,
    },
    /// The disk size is not a whole number of logical blocks.
    #[error("disk {path} is {size} bytes, not a multiple of the {block_size}-byte block size; resize it (e.g. qemu-img resize) or use --block-size 512")]
    DiskSize {
        /// Disk path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The configured logical block size.
        block_size: u32,
    },
    /// The RBD image cannot be served (cluster, pool, image: the variant says which).
    #[cfg(feature = "rbd")]
    #[error(transparent)]
    Rbd(#[from] corodev_devices::backend::RbdError),
    /// The RBD image has no blocks.
    #[error("RBD image '{image}' in pool '{pool}' is empty; give it a size (e.g. rbd resize --size 1G {pool}/{image})")]
    RbdEmpty {
        /// `--rbd-pool`.
        pool: String,
        /// `--rbd-image`.
        image: String,
    },
    /// The NVMe controller cannot be served (binding, VFIO, the controller itself).
    #[cfg(feature = "nvme")]
    #[error(transparent)]
    Nvme(#[from] corodev_devices::backend::NvmeError),
    /// `--pci` is not a PCI address.
    #[error(
        "'{0}' is not a PCI address: use DDDD:BB:DD.F as lspci -D shows it, e.g. 0000:01:00.0"
    )]
    PciAddress(String),
    /// `--backend nvme` in a build without it.
    #[error(
        "this corodev was built without the NVMe backend (cargo feature 'nvme'); rebuild with it"
    )]
    NvmeNotBuilt,
    /// `--backend rbd` in a build without the RBD backend (e.g. the static musl build).
    #[error("this corodev was built without the RBD backend (cargo feature 'rbd'); use a dynamically linked build with the default features: it loads librbd.so.1 when an RBD image is opened, which a static binary cannot")]
    RbdNotBuilt,
    /// The disk is empty.
    #[error("disk {0} is empty; give it a size (e.g. truncate -s 1G {0})")]
    DiskEmpty(PathBuf),
    /// The device cannot be built from the options and the disk (e.g. `--block-size 512`
    /// over O_DIRECT on a 4K-sector disk).
    #[error("cannot export the disk: {0}; {hint}", hint = device_hint(.0))]
    Device(#[from] ConfigError),
    /// Another daemon accepts connections on the socket.
    #[error("socket {0} is in use by a running daemon; stop it or choose another --socket path")]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket.
    #[error("{0} exists and is not a socket; remove it or choose another --socket path")]
    SocketNotASocket(PathBuf),
    /// The socket cannot be created.
    #[error("cannot listen on socket {path}: {source}")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The vhost-user library could not set up a connection. (Its error type does not
    /// implement `std::error::Error`, so it is kept as a value, not a source.)
    #[error("vhost-user setup failed: {0}")]
    Vhost(vhost_user_backend::Error),
    /// The library started another number of worker threads than the device asked for.
    #[error("vhost-user library started {got} worker threads, the device asked for {expected}")]
    WorkerCount {
        /// Threads the device's queue map asks for.
        expected: usize,
        /// Threads the library started.
        got: usize,
    },
    /// The chosen `--coroutine-backend` cannot run in this build (ucontext in a musl build).
    #[error("--coroutine-backend: {0}")]
    CoroutineBackend(coro::Error),
    /// The image is in use by another server, or cannot be locked.
    #[error(transparent)]
    Lock(#[from] crate::image_lock::LockError),
    /// `LISTEN_FDS`/`LISTEN_FDNAMES` are set for this process but malformed.
    #[error("socket activation: {0}; check the socket unit (or the activator's command line)")]
    ActivationEnv(io::Error),
    /// Socket activation passed sockets, none of them named after the export.
    #[error("socket activation passed no socket named '{name}' (LISTEN_FDNAMES={names}); set FileDescriptorName={name} in the socket unit, or --name to one of those names")]
    ActivationNoSocket {
        /// The export's name (`--name`).
        name: String,
        /// The names passed, `:`-separated as in `LISTEN_FDNAMES`.
        names: String,
    },
    /// The activated socket of the export is not a listening unix stream socket.
    #[error("activated socket '{name}' is not a listening AF_UNIX stream socket ({what}); use ListenStream=PATH with Accept=no in the socket unit")]
    ActivationNotListening {
        /// The export's name.
        name: String,
        /// What it is instead.
        what: String,
    },
    /// The activated socket is bound to another path than `--socket`.
    #[error("activated socket '{name}' is bound to {bound}, not to --socket {socket}; make the socket unit's ListenStream= and --socket the same path")]
    ActivationPath {
        /// The export's name.
        name: String,
        /// Where the socket is bound.
        bound: String,
        /// The `--socket` path.
        socket: PathBuf,
    },
    /// `--metrics` cannot listen on its address (in use, not this host's, a privileged
    /// port).
    #[error("--metrics {addr}: cannot listen: {source}; choose another port or address (a bare port means 127.0.0.1:PORT)")]
    Metrics {
        /// The address asked for.
        addr: SocketAddr,
        /// What binding it said.
        source: io::Error,
    },
    /// An OS resource (eventfd, thread, signal handler) could not be created.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// What the OS said.
        source: io::Error,
    },
}

/// The option that fixes a device the disk and options cannot make.
fn device_hint(e: &ConfigError) -> &'static str {
    match e {
        ConfigError::BlockSize(_) | ConfigError::BlockSizeBelowBackend { .. } => {
            "choose a --block-size the disk supports (4096 for a 4K-sector disk with --direct)"
        }
        ConfigError::CapacityMisaligned { .. } | ConfigError::SizeMisaligned { .. } => {
            "resize the disk to whole blocks"
        }
        ConfigError::QueueSize(_) => "use a --queue-size that is a power of two from 2 to 32768",
        ConfigError::NoQueues => "use --num-queues 1 or more",
        ConfigError::SerialTooLong(_) => "use a --serial of at most 20 bytes",
        // Config-space accesses come from the frontend, never from building a device.
        ConfigError::ReadOnlyField { .. }
        | ConfigError::BadWriteback(_)
        | ConfigError::OutOfRange { .. } => "this is a bug; please report it",
    }
}

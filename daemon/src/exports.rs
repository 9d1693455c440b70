//! The running exports: a registry from name to a running export (its serve loop on its
//! own thread, its socket, disk, image lock and [`Stop`]), with the operations that
//! change it: [`Exports::add`], [`Exports::remove`], [`Exports::apply`] (a whole new
//! configuration: what SIGHUP does) and [`Exports::stop_all`] (SIGTERM). A control API
//! calls the same functions, and [`Exports::resize`], which changes a running export's
//! size and tells its frontend.
//!
//! **Where an export comes from** ([`Origin`]): the flags or the config file, or the
//! control API's `export-add`. A reload manages the file's exports only: one added through
//! the control API runs until `export-del` (or until the file names it: then the file's
//! settings win, as for a changed export).
//!
//! **Deleting** ([`Exports::retire`], `export-del` in safe mode): the export's socket goes
//! at once (no new frontend), its current frontend is served until it disconnects by
//! itself, then the export is gone and [`Event::ExportDeleted`] is emitted. A hard delete
//! is [`Exports::remove`].
//!
//! Each export runs [`server::serve_on`] on a thread named `serve:NAME`, exactly as the
//! one export of the flag command line does; exports share nothing but the process, the
//! STATUS= line ([`StatusBoard`]) and the watchdog ([`Watched`], which pings only while
//! every export's serve loop and workers answer).
//!
//! **Reload rule.** [`Exports::apply`] compares each export's validated settings
//! ([`ExportSpec`]) by name: an export whose settings are equal is not touched (its
//! frontend stays connected); one that is gone is stopped the way SIGTERM stops one (its
//! requests in flight answered, then the frontend hung up on); one that is new is started;
//! one whose settings differ is stopped, then started with the new settings (logged: its
//! frontend sees a disconnect and, with `reconnect=`, comes back). Every new or changed
//! export's disk is opened first: if any fails, nothing changes.
//!
//! Boundary: the file is [`crate::config_file`]'s; the connection loop is
//! [`crate::server`]'s. This module owns threads and sockets, not protocol.

use std::collections::BTreeMap;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use corodev_devices::backend::{BlockBackend, FileBackend, NullBackend, ResizeError};
use corodev_devices::config::{ConfigError as DeviceError, DeviceConfig, DeviceParams};

use crate::activation::Activated;
use crate::config_file::{self, ConfigError};
use crate::connection::WorkerConfig;
use crate::error::Error;
use crate::events::{Event, Events};
use crate::export_config::{Backend, ExportSpec, LockMode, RbdSpec};
use crate::image_lock::ImageLock;
use crate::server::{self, Listening, ServerConfig, Stop, Supervision};
use crate::stats::{ExportStats, ExportStatsSnapshot};
use crate::systemd::{Liveness, StatusBoard, Watched};

/// An export whose disk is open and whose device is built: everything that can fail
/// because of its settings has been tried; what is left (socket, lock) depends on the
/// rest of the system.
pub struct Prepared {
    /// Its settings.
    pub spec: ExportSpec,
    disk: Arc<dyn BlockBackend>,
    device: DeviceConfig,
    workers: WorkerConfig,
}

/// Opens `spec`'s disk and builds its device, the one path from settings to a device (no
/// value is clamped or adjusted behind the user's back).
pub fn prepare(spec: ExportSpec) -> Result<Prepared, Error> {
    let disk = open_disk(&spec)?;
    let mut params = DeviceParams::for_backend(&*disk);
    params.num_queues = spec.num_queues;
    params.queue_size = spec.queue_size;
    params.block_size = spec.block_size;
    params.readonly |= spec.readonly;
    params.serial = spec.serial.clone().into_bytes();
    let device = DeviceConfig::build(params)?;
    let workers = WorkerConfig {
        threads: usize::from(spec.threads),
        coroutine_backend: coro::Backend::from(spec.coroutine_backend)
            .check()
            .map_err(Error::CoroutineBackend)?,
        stack_mode: spec.stack_mode,
        stack_size: spec.stack_size,
        poll: spec.poll,
        stop_timeout: spec.stop_timeout,
    };
    Ok(Prepared {
        spec,
        disk,
        device,
        workers,
    })
}

fn open_disk(spec: &ExportSpec) -> Result<Arc<dyn BlockBackend>, Error> {
    match &spec.backend {
        Backend::Rbd(rbd) => open_rbd(rbd, spec.readonly),
        Backend::Nvme { pci, namespace } => open_nvme(pci, *namespace),
        Backend::Null { size, latency } => Ok(Arc::new(NullBackend::new(*size, *latency))),
        Backend::File { disk, direct, .. } => {
            let file = FileBackend::open(disk, spec.readonly, *direct).map_err(|source| {
                Error::OpenDisk {
                    path: disk.clone(),
                    source,
                }
            })?;
            let size = file.size();
            if size == 0 {
                return Err(Error::DiskEmpty(disk.clone()));
            }
            if size % u64::from(spec.block_size) != 0 {
                return Err(Error::DiskSize {
                    path: disk.clone(),
                    size,
                    block_size: spec.block_size,
                });
            }
            Ok(Arc::new(file))
        }
    }
}

/// Connects to the Ceph cluster and opens the image (one connection per export).
#[cfg(feature = "rbd")]
fn open_rbd(rbd: &RbdSpec, readonly: bool) -> Result<Arc<dyn BlockBackend>, Error> {
    use corodev_devices::backend::{RbdBackend, RbdOptions};
    let opts = RbdOptions {
        pool: rbd.pool.clone(),
        image: rbd.image.clone(),
        namespace: rbd.namespace.clone(),
        conf: rbd.conf.clone(),
        id: rbd.id.clone(),
        readonly,
        cache: !rbd.direct,
        connect_timeout: rbd.connect_timeout,
        op_timeout: rbd.op_timeout,
    };
    let disk = RbdBackend::open(&opts)?;
    if disk.size() == 0 {
        return Err(Error::RbdEmpty {
            pool: rbd.pool.clone(),
            image: rbd.image.clone(),
        });
    }
    log::info!(
        "RBD image {}/{}{}: {} bytes, {}, librbd cache {}",
        rbd.pool,
        rbd.namespace
            .as_ref()
            .map_or_else(String::new, |ns| format!("{ns}/")),
        rbd.image,
        disk.size(),
        if readonly { "read-only" } else { "read-write" },
        if disk.writeback_cache() {
            "on, write-back (the guest flushes)"
        } else {
            "off"
        },
    );
    Ok(Arc::new(disk))
}

/// Takes over the NVMe controller at `pci` and serves namespace `namespace`.
#[cfg(feature = "nvme")]
fn open_nvme(pci: &str, namespace: u32) -> Result<Arc<dyn BlockBackend>, Error> {
    use corodev_devices::backend::nvme::{parse_address, NvmeBackend};
    let address = parse_address(pci).ok_or_else(|| Error::PciAddress(pci.to_owned()))?;
    Ok(Arc::new(NvmeBackend::open(&address, namespace)?))
}

#[cfg(not(feature = "nvme"))]
fn open_nvme(_pci: &str, _namespace: u32) -> Result<Arc<dyn BlockBackend>, Error> {
    Err(Error::NvmeNotBuilt)
}

#[cfg(not(feature = "rbd"))]
fn open_rbd(_rbd: &RbdSpec, _readonly: bool) -> Result<Arc<dyn BlockBackend>, Error> {
    Err(Error::RbdNotBuilt)
}

/// The setting a failure of [`prepare`] or of starting an export is about, as its key
/// (`exports[i].KEY` in a config file's errors).
pub fn error_key(e: &Error) -> &'static str {
    match e {
        Error::Device(DeviceError::BlockSize(_) | DeviceError::BlockSizeBelowBackend { .. }) => {
            "block-size"
        }
        Error::Device(DeviceError::QueueSize(_)) => "queue-size",
        Error::Device(DeviceError::NoQueues) => "num-queues",
        Error::Device(DeviceError::SerialTooLong(_)) => "serial",
        Error::CoroutineBackend(_) => "coroutine-backend",
        Error::SocketInUse(_)
        | Error::SocketNotASocket(_)
        | Error::Socket { .. }
        | Error::ActivationNoSocket { .. }
        | Error::ActivationNotListening { .. }
        | Error::ActivationPath { .. } => "socket",
        Error::RbdEmpty { .. } => "rbd-image",
        #[cfg(feature = "rbd")]
        Error::Rbd(e) => rbd_error_key(e),
        Error::RbdNotBuilt | Error::NvmeNotBuilt => "backend",
        Error::PciAddress(_) => "pci",
        #[cfg(feature = "nvme")]
        Error::Nvme(_) => "pci",
        _ => "disk",
    }
}

/// The setting an RBD open failure is about.
#[cfg(feature = "rbd")]
fn rbd_error_key(e: &corodev_devices::backend::RbdError) -> &'static str {
    use corodev_devices::backend::RbdError;
    match e {
        RbdError::LoadLibrary { .. }
        | RbdError::MissingSymbol { .. }
        | RbdError::LibraryTooOld { .. } => "backend",
        RbdError::Conf { .. } | RbdError::ConfSet { .. } => "ceph-conf",
        RbdError::Create { .. } | RbdError::Connect { .. } => "ceph-id",
        RbdError::NoPool { .. } | RbdError::Pool { .. } => "rbd-pool",
        _ => "rbd-image",
    }
}

/// A serve loop that ended by itself (`--once`, an error) or was stopped: the thread
/// that waits for the daemon to end ([`Exports::reap`]) hears of each.
pub struct Finished {
    name: String,
    id: u64,
    result: Result<(), Error>,
}

/// Where a running export's settings came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// The command line's flags or the `--config` file: a reload manages it.
    Config,
    /// The control API's `export-add`: a reload leaves it alone.
    Control,
}

/// A running export as the control API's `query-exports` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExportInfo {
    /// The export's name.
    pub name: String,
    /// Its vhost-user socket.
    pub socket: std::path::PathBuf,
    /// `file`, `null` or `rbd`.
    pub backend: &'static str,
    /// The disk's path (file backend) or `pool/image` (RBD); none for null.
    pub disk: Option<String>,
    /// Current capacity in bytes.
    pub size: u64,
    /// Read-only for the guest.
    pub readonly: bool,
    /// Virtqueues offered.
    pub num_queues: u16,
    /// `listening` (no frontend), `serving` (a frontend is connected) or `deleting`
    /// (safe `export-del`: its frontend is served until it disconnects).
    pub state: &'static str,
    /// Connections served since the export started.
    pub connections: u64,
    /// Where its settings came from.
    pub origin: Origin,
}

/// One running export.
struct Running {
    /// Which start of this name (a restarted export is a new one).
    id: u64,
    spec: ExportSpec,
    origin: Origin,
    /// Its socket came from socket activation (the activator owns the file).
    activated: bool,
    /// `export-del` in safe mode was asked: it ends with its current connection.
    retiring: bool,
    disk: Arc<dyn BlockBackend>,
    stop: Arc<Stop>,
    liveness: Arc<Liveness>,
    /// Its request counters, shared with every connection it serves.
    stats: Arc<ExportStats>,
    thread: JoinHandle<()>,
    sizing: Arc<Sizing>,
}

/// What [`Exports::resize`] changes besides the disk: the export's device, the same one its
/// serve loop serves (every connection's device shares the capacity, see
/// [`DeviceConfig::reset`]).
struct Sizing {
    device: DeviceConfig,
    /// One resize of the export at a time: the size check and the change are one step.
    busy: Mutex<()>,
}

struct Inner {
    running: BTreeMap<String, Running>,
    /// Socket-activated sockets no export has claimed yet.
    activated: Option<Activated>,
    /// Sockets that were activated, by export name, kept after their export stops so a
    /// restarted or re-added export serves the same socket (a copy of each runs).
    activated_kept: BTreeMap<String, UnixListener>,
    next_id: u64,
    /// Set by [`Exports::started`].
    started: bool,
    /// Set by [`Exports::stop_all`]: nothing starts any more.
    stopping: bool,
}

/// What [`Exports::apply`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Started.
    pub added: Vec<String>,
    /// Stopped.
    pub removed: Vec<String>,
    /// Stopped and started again with new settings.
    pub restarted: Vec<String>,
    /// Left running as they were.
    pub unchanged: Vec<String>,
    /// New or changed exports that failed to start (socket, lock), with why.
    pub failed: Vec<(String, String)>,
}

/// The running exports, by name. See the module docs.
pub struct Exports {
    inner: Mutex<Inner>,
    status: Arc<StatusBoard>,
    watched: Arc<Watched>,
    beat_every: Option<Duration>,
    finished: Sender<Finished>,
    /// `--once`: each export serves one connection.
    once: bool,
    events: Events,
}

impl Exports {
    /// An empty registry. `activated`: the sockets passed by socket activation, which
    /// exports claim by name. Serve loops that end are reported on the returned channel
    /// (see [`reap`](Self::reap)).
    pub fn new(
        status: Arc<StatusBoard>,
        watched: Arc<Watched>,
        beat_every: Option<Duration>,
        activated: Option<Activated>,
        once: bool,
    ) -> (Exports, Receiver<Finished>) {
        let (finished, rx) = mpsc::channel();
        let exports = Exports {
            inner: Mutex::new(Inner {
                running: BTreeMap::new(),
                activated,
                activated_kept: BTreeMap::new(),
                next_id: 0,
                started: false,
                stopping: false,
            }),
            status,
            watched,
            beat_every,
            finished,
            once,
            events: Events::default(),
        };
        (exports, rx)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The names of the running exports.
    pub fn names(&self) -> Vec<String> {
        self.lock().running.keys().cloned().collect()
    }

    /// The daemon's event channel.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// Every running export, by name.
    pub fn list(&self) -> Vec<ExportInfo> {
        let inner = self.lock();
        inner
            .running
            .iter()
            .map(|(name, r)| {
                let status = self.status.get(name);
                let (backend, disk) = match &r.spec.backend {
                    Backend::File { disk, .. } => ("file", Some(disk.display().to_string())),
                    Backend::Null { .. } => ("null", None),
                    Backend::Rbd(rbd) => ("rbd", Some(format!("{}/{}", rbd.pool, rbd.image))),
                    Backend::Nvme { pci, namespace } => {
                        ("nvme", Some(format!("{pci} namespace {namespace}")))
                    }
                };
                ExportInfo {
                    name: name.clone(),
                    socket: r.spec.socket.clone(),
                    backend,
                    disk,
                    size: r.disk.size(),
                    readonly: r.spec.readonly,
                    num_queues: r.spec.num_queues,
                    state: match (r.retiring, status.as_ref().is_some_and(|s| s.serving)) {
                        (true, _) => "deleting",
                        (false, true) => "serving",
                        (false, false) => "listening",
                    },
                    connections: status.map_or(0, |s| s.served),
                    origin: r.origin,
                }
            })
            .collect()
    }

    /// The request statistics of every running export, in name order: what `query-stats`
    /// returns and `--metrics` exposes. Each export's counters run from its start (see
    /// [`ExportStats`]). Waits while a reload or a stop holds the registry (at most the
    /// drains' stop timeout).
    pub fn stats(&self) -> Vec<ExportStatsSnapshot> {
        let counters: Vec<(String, Arc<ExportStats>)> = self
            .lock()
            .running
            .iter()
            .map(|(name, r)| (name.clone(), r.stats.clone()))
            .collect();
        // Read after the registry's lock is released: it is not needed for the counters.
        counters
            .iter()
            .map(|(name, stats)| stats.snapshot(name))
            .collect()
    }

    /// The settings of running export `name`.
    pub fn spec(&self, name: &str) -> Option<ExportSpec> {
        self.lock().running.get(name).map(|r| r.spec.clone())
    }

    /// Starts a prepared export: takes its image lock, its socket (an activated one
    /// named after it, else one bound at its path), and runs its serve loop on its own
    /// thread. Returns once the socket listens.
    pub fn add(&self, export: Prepared, origin: Origin) -> Result<(), Error> {
        let mut inner = self.lock();
        self.add_locked(&mut inner, export, origin)
    }

    fn add_locked(&self, inner: &mut Inner, export: Prepared, origin: Origin) -> Result<(), Error> {
        let Prepared {
            spec,
            disk,
            device,
            workers,
        } = export;
        if inner.stopping {
            return Err(Error::Stopping);
        }
        if inner.running.contains_key(&spec.name) {
            return Err(Error::ExportExists(spec.name));
        }
        let image_lock = match &spec.backend {
            Backend::File {
                disk,
                lock: LockMode::On,
                incoming,
                ..
            } => Some(Arc::new(ImageLock::acquire(
                disk,
                device.readonly(),
                *incoming,
            )?)),
            _ => None,
        };
        // The lock is taken before the socket exists (a refused export leaves no socket
        // behind), and logged once the export has its socket (an activation error is then
        // the only line).
        let listening = Self::listen(inner, &spec.name, &spec.socket)?;
        if let Some(lock) = &image_lock {
            log::info!(
                "export {}: disk {} locked ({}{})",
                spec.name,
                lock.path().display(),
                if device.readonly() {
                    "read-only, shared with readers"
                } else {
                    "read-write"
                },
                if lock.is_active() {
                    ""
                } else {
                    "; incoming: write lock taken when the guest starts here"
                },
            );
        }
        let activated = listening.is_activated();
        let stats = Arc::new(ExportStats::new(usize::from(device.num_queues())));
        let sizing = Arc::new(Sizing {
            device: device.clone(),
            busy: Mutex::new(()),
        });
        let cfg = ServerConfig {
            image_lock,
            stats: stats.clone(),
            socket: spec.socket.clone(),
            name: spec.name.clone(),
            disk: disk.clone(),
            device,
            workers,
            once: self.once,
        };
        let liveness = Arc::new(Liveness::default());
        let sup = Supervision {
            status: self.status.clone(),
            liveness: liveness.clone(),
            beat_every: self.beat_every,
        };
        let stop = Arc::new(Stop::new()?);
        inner.next_id += 1;
        let id = inner.next_id;
        let name = spec.name.clone();
        let finished = self.finished.clone();
        let thread_stop = stop.clone();
        self.watched.add(&name, liveness.clone());
        self.status
            .set(&name, server::listening_status(&cfg, activated, 0));
        let thread = std::thread::Builder::new()
            .name(format!("serve:{name}"))
            .spawn(move || {
                // A panic ends this export only, and is reported like an error: the
                // thread waiting for the daemon's end must hear of every export's.
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    server::serve_on(&cfg, listening, &thread_stop, &sup)
                }));
                drop(cfg); // the disk and the image lock go before anyone hears of the end
                let result = served.unwrap_or_else(|_| Err(Error::Panicked(name.clone())));
                let _ = finished.send(Finished { name, id, result });
            })
            .map_err(|source| Error::Os {
                what: "starting an export's thread",
                source,
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                self.watched.remove(&liveness);
                self.status.remove(&spec.name);
                return Err(e);
            }
        };
        inner.running.insert(
            spec.name.clone(),
            Running {
                id,
                spec,
                origin,
                activated,
                retiring: false,
                disk,
                stop,
                liveness,
                stats,
                thread,
                sizing,
            },
        );
        Ok(())
    }

    /// Makes running export `name` `new_size` bytes large and tells its frontend, if one is
    /// connected and gave a backend channel (`VHOST_USER_PROTOCOL_F_BACKEND_REQ`), so the
    /// guest sees the new capacity without a reboot. Returns the old and new sizes; a size
    /// equal to the current one changes nothing. With no frontend connected, the next
    /// one reads the new size.
    ///
    /// Only growing is supported: shrinking is refused, as is a size that is not a
    /// positive multiple of the export's block size, a read-only export and a block
    /// device (whose size is the device's). The storage grows first, then the device's
    /// capacity, so no request reaches past the old end before the storage is there.
    ///
    /// Blocks: the storage's resize, then the frontend's answer (up to the backend
    /// channel's timeout). Call it from a thread that may block (a control API's
    /// `spawn_blocking`): the notice is sent from this thread with no registry lock held,
    /// because with REPLY_ACK QEMU answers it only after it has read the new config
    /// (GET_CONFIG) from the export's frontend thread.
    pub fn resize(&self, name: &str, new_size: u64) -> Result<(u64, u64), Error> {
        let (disk, sizing, stop) = {
            let inner = self.lock();
            let r = inner
                .running
                .get(name)
                .ok_or_else(|| Error::NoSuchExport(name.to_owned()))?;
            (r.disk.clone(), r.sizing.clone(), r.stop.clone())
        };
        let _one_at_a_time = sizing.busy.lock().unwrap_or_else(PoisonError::into_inner);
        let device = &sizing.device;
        let old = device.size();
        let refused = |source| Error::Resize {
            name: name.to_owned(),
            size: new_size,
            source,
        };
        if device.readonly() {
            return Err(refused(ResizeError::ReadOnly));
        }
        let misaligned = |_| Error::ResizeMisaligned {
            name: name.to_owned(),
            size: new_size,
            block_size: device.block_size(),
        };
        device.check_size(new_size).map_err(misaligned)?;
        if new_size < old {
            return Err(Error::ResizeShrink {
                name: name.to_owned(),
                old,
                new: new_size,
            });
        }
        if new_size == old {
            return Ok((old, old));
        }
        disk.resize(new_size).map_err(refused)?;
        device.set_size(new_size).map_err(misaligned)?;
        log::info!("export {name}: resized from {old} to {new_size} bytes");
        let Some(conn) = stop.connection() else {
            return Ok((old, new_size));
        };
        match conn.notify_config_change() {
            Ok(true) => log::info!("export {name}: frontend told of the new size"),
            Ok(false) => log::info!(
                "export {name}: the frontend gave no backend channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ): the guest sees the new size after it reconnects or reboots"
            ),
            Err(source) => {
                return Err(Error::ResizeNotNotified {
                    name: name.to_owned(),
                    old,
                    new: new_size,
                    source,
                })
            }
        }
        Ok((old, new_size))
    }

    /// The export's socket: activated (kept from an earlier start of the same name, or
    /// from systemd's set) or bound here. Until [`started`](Self::started), an activated
    /// process's export must find its socket in the set (a misnamed unit is a
    /// configuration error); an export added later may bind its own.
    fn listen(inner: &mut Inner, name: &str, socket: &Path) -> Result<Listening, Error> {
        let copy = |l: &UnixListener| {
            l.try_clone().map_err(|source| Error::Socket {
                path: socket.to_owned(),
                source,
            })
        };
        if let Some(kept) = inner.activated_kept.get(name) {
            crate::activation::check_bound(name, kept, socket)?;
            return Ok(Listening::activated(copy(kept)?));
        }
        if let Some(fds) = &mut inner.activated {
            if !inner.started || fds.names().contains(&name) {
                let listener = fds.take(name, socket)?;
                let served = copy(&listener)?;
                inner.activated_kept.insert(name.to_owned(), listener);
                return Ok(Listening::activated(served));
            }
        }
        Ok(Listening::bound(crate::socket::bind(socket)?))
    }

    /// Claims the socket named `name`, bound at `path`, if socket activation passed one
    /// (the control socket: `None` means bind it).
    pub fn take_activated(&self, name: &str, path: &Path) -> Option<Result<UnixListener, Error>> {
        let mut inner = self.lock();
        let fds = inner.activated.as_mut()?;
        fds.names().contains(&name).then(|| fds.take(name, path))
    }

    /// The first exports are running: from now on an export not socket-activated binds its
    /// own socket. Returns the activated sockets no export claimed.
    pub fn started(&self) -> Vec<String> {
        let mut inner = self.lock();
        inner.started = true;
        inner
            .activated
            .as_ref()
            .map(|a| a.names().into_iter().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Stops export `name` (its requests in flight answered, then its frontend hung up
    /// on, as SIGTERM does) and waits for its serve loop to end: `export-del` in hard
    /// mode. Whether it was running.
    pub fn remove(&self, name: &str) -> bool {
        let mut inner = self.lock();
        let removed = self.stop_locked(&mut inner, &[name.to_owned()], true);
        !removed.is_empty()
    }

    /// Deletes export `name` once its current frontend disconnects by itself (at once
    /// without one): its socket is removed now, so no other frontend connects; then
    /// [`Event::ExportDeleted`]. `export-del` in safe mode. Returns without waiting;
    /// `false` if no such export runs.
    pub fn retire(&self, name: &str) -> bool {
        let mut inner = self.lock();
        let Some(r) = inner.running.get_mut(name) else {
            return false;
        };
        if !r.retiring {
            r.retiring = true;
            log::info!("export {name}: deleting it once its frontend disconnects");
            let socket = (!r.activated).then_some(r.spec.socket.as_path());
            r.stop.retire(socket);
        }
        true
    }

    /// Stops `names` in parallel (each drain may take up to its stop timeout), joins
    /// their threads and stops watching them (and, if `report`, drops them from the
    /// STATUS= line); the names that were running.
    fn stop_locked(&self, inner: &mut Inner, names: &[String], report: bool) -> Vec<String> {
        let stopping: Vec<(String, Running)> = names
            .iter()
            .filter_map(|n| inner.running.remove(n).map(|r| (n.clone(), r)))
            .collect();
        std::thread::scope(|s| {
            for (_, r) in &stopping {
                s.spawn(|| r.stop.request());
            }
        });
        stopping
            .into_iter()
            .map(|(name, r)| {
                let _ = r.thread.join(); // a panic was caught and reported in the thread
                self.watched.remove(&r.liveness);
                if report {
                    log::info!("export {name}: deleted");
                    self.status.remove(&name);
                    self.events
                        .emit(Event::ExportDeleted { name: name.clone() });
                }
                name
            })
            .collect()
    }

    /// Forgets what the registry no longer runs: called for each [`Finished`] by the
    /// thread that waits for the daemon to end. Returns the serve loop's result if the
    /// export ended by itself (`--once`, an error; not a safe delete, which is announced
    /// instead), and whether no export is left.
    pub fn reap(&self, finished: Finished) -> (Option<Result<(), Error>>, bool) {
        let mut inner = self.lock();
        let ours = inner
            .running
            .get(&finished.name)
            .is_some_and(|r| r.id == finished.id);
        let mut result = None;
        if let Some(r) = ours.then(|| inner.running.remove(&finished.name)).flatten() {
            self.forget(&finished.name, &r.liveness);
            let _ = r.thread.join();
            if r.retiring {
                log::info!("export {}: deleted", finished.name);
                self.events.emit(Event::ExportDeleted {
                    name: finished.name,
                });
                if let Err(e) = finished.result {
                    log::error!("{e}");
                }
            } else {
                result = Some(finished.result);
            }
        }
        (result, inner.running.is_empty())
    }

    /// Whether [`stop_all`](Self::stop_all) was called: the daemon is on its way out.
    pub fn stopping(&self) -> bool {
        self.lock().stopping
    }

    fn forget(&self, name: &str, liveness: &Arc<Liveness>) {
        self.watched.remove(liveness);
        self.status.remove(name);
    }

    /// Stops every export (in parallel, each as [`remove`](Self::remove)) and refuses to
    /// start any more: SIGTERM.
    pub fn stop_all(&self) {
        let mut inner = self.lock();
        inner.stopping = true;
        let names: Vec<String> = inner.running.keys().cloned().collect();
        if names.is_empty() {
            // No serve loop will report: wake the waiting thread ourselves (a name no
            // export has: names are never empty).
            let _ = self.finished.send(Finished {
                name: String::new(),
                id: 0,
                result: Ok(()),
            });
        }
        // The daemon exits: the STATUS= line stays "stopping".
        self.stop_locked(&mut inner, &names, false);
    }

    /// Makes the running exports those of `specs` (a config file read again), following
    /// the reload rule of the module docs. Fails, changing nothing, if a new or changed
    /// export's disk or device cannot be prepared.
    pub fn apply(&self, specs: &[ExportSpec]) -> Result<Applied, ConfigError> {
        let mut inner = self.lock();
        let mut applied = Applied::default();
        let running = &inner.running;
        // An export the file names is the file's, even if `export-add` started it (then
        // the file's settings win); one added through the control API that the file does
        // not name is left alone.
        let prepared = config_file::prepare_all(specs, |s| {
            running
                .get(&s.name)
                .is_none_or(|r| r.spec != *s || r.origin != Origin::Config)
        })?;
        for (name, r) in running {
            if r.origin == Origin::Control && !specs.iter().any(|s| &s.name == name) {
                continue;
            }
            match specs.iter().find(|s| &s.name == name) {
                None => applied.removed.push(name.clone()),
                Some(s) if r.spec != *s || r.origin != Origin::Config => {
                    applied.restarted.push(name.clone())
                }
                Some(_) => applied.unchanged.push(name.clone()),
            }
        }
        for p in &prepared {
            if !applied.restarted.contains(&p.spec.name) {
                applied.added.push(p.spec.name.clone());
            }
        }
        for name in &applied.restarted {
            if let (Some(old), Some(new)) = (
                inner.running.get(name),
                specs.iter().find(|s| &s.name == name),
            ) {
                log::info!(
                    "reload: export {name} changed ({}): restarting it; its frontend is disconnected once its requests in flight are answered",
                    changed_keys(&old.spec, new).join(", ")
                );
            }
        }
        for name in &applied.removed {
            log::info!("reload: export {name} removed: stopping it once its requests in flight are answered");
        }
        let stopping: Vec<String> = applied
            .removed
            .iter()
            .chain(&applied.restarted)
            .cloned()
            .collect();
        self.stop_locked(&mut inner, &stopping, true);
        for p in prepared {
            let name = p.spec.name.clone();
            match self.add_locked(&mut inner, p, Origin::Config) {
                Ok(()) => {
                    if !applied.restarted.contains(&name) {
                        log::info!("reload: export {name} added");
                    }
                }
                Err(e) => {
                    log::error!("reload: export {name} cannot start: {e}");
                    applied.failed.push((name, e.to_string()));
                }
            }
        }
        Ok(applied)
    }
}

/// The keys whose values differ between two versions of an export, for the reload log.
fn changed_keys(old: &ExportSpec, new: &ExportSpec) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut differ = |key, differs: bool| {
        if differs {
            keys.push(key);
        }
    };
    differ("socket", old.socket != new.socket);
    differ("backend", old.backend != new.backend);
    differ("readonly", old.readonly != new.readonly);
    differ("num-queues", old.num_queues != new.num_queues);
    differ("threads", old.threads != new.threads);
    differ("queue-size", old.queue_size != new.queue_size);
    differ("serial", old.serial != new.serial);
    differ("block-size", old.block_size != new.block_size);
    differ("stack-size", old.stack_size != new.stack_size);
    differ(
        "coroutine-backend",
        old.coroutine_backend != new.coroutine_backend,
    );
    differ("stack-mode", old.stack_mode != new.stack_mode);
    differ("poll-us", old.poll != new.poll);
    differ("stop-timeout", old.stop_timeout != new.stop_timeout);
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export_config::{BackendKind, ExportConfig, LockMode, SizeArg};

    fn null_spec(dir: &Path, name: &str, queues: u64) -> ExportSpec {
        ExportConfig {
            socket: Some(dir.join(format!("{name}.sock"))),
            backend: BackendKind::Null,
            size: Some(SizeArg::Text("1M".into())),
            num_queues: queues,
            ..ExportConfig::default()
        }
        .validate()
        .expect("valid")
    }

    fn registry() -> (Exports, Receiver<Finished>) {
        Exports::new(
            Arc::new(StatusBoard::default()),
            Arc::new(Watched::default()),
            None,
            None,
            false,
        )
    }

    #[test]
    fn apply_adds_removes_restarts_and_leaves_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exports, _rx) = registry();
        let (a, b, c) = (
            null_spec(dir.path(), "a", 1),
            null_spec(dir.path(), "b", 1),
            null_spec(dir.path(), "c", 1),
        );
        let first = exports.apply(&[a.clone(), b.clone()]).expect("applies");
        assert_eq!(first.added, ["a", "b"]);
        assert!(dir.path().join("a.sock").exists() && dir.path().join("b.sock").exists());
        let b2 = null_spec(dir.path(), "b", 2);
        let second = exports.apply(&[a.clone(), b2.clone(), c]).expect("applies");
        assert_eq!(
            second,
            Applied {
                added: vec!["c".into()],
                removed: vec![],
                restarted: vec!["b".into()],
                unchanged: vec!["a".into()],
                failed: vec![],
            }
        );
        assert_eq!(exports.spec("b"), Some(b2));
        let third = exports.apply(std::slice::from_ref(&a)).expect("applies");
        assert_eq!(third.removed, ["b", "c"]);
        assert_eq!(exports.names(), ["a"]);
        assert!(
            !dir.path().join("b.sock").exists(),
            "a removed export's socket is gone"
        );
        assert!(dir.path().join("a.sock").exists());
        exports.stop_all();
        assert!(exports.names().is_empty());
        assert!(!dir.path().join("a.sock").exists());
    }

    #[test]
    fn a_reload_whose_disk_cannot_open_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exports, _rx) = registry();
        let a = null_spec(dir.path(), "a", 1);
        exports.apply(std::slice::from_ref(&a)).expect("applies");
        let missing = ExportConfig {
            socket: Some(dir.path().join("m.sock")),
            disk: Some(dir.path().join("missing.img")),
            ..ExportConfig::default()
        }
        .validate()
        .expect("valid settings");
        let err = exports.apply(&[missing]).expect_err("the disk is missing");
        assert!(
            err.lines()[0].starts_with("exports[0].disk: cannot open disk"),
            "{err}"
        );
        assert_eq!(
            exports.names(),
            ["a"],
            "the old configuration keeps running"
        );
        exports.stop_all();
    }

    #[test]
    fn add_and_remove_one_export_as_a_control_api_would() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exports, _rx) = registry();
        let a = null_spec(dir.path(), "a", 1);
        exports
            .add(prepare(a.clone()).expect("prepares"), Origin::Control)
            .expect("starts");
        assert!(
            dir.path().join("a.sock").exists(),
            "listening once add returns"
        );
        assert!(matches!(
            exports.add(prepare(a).expect("prepares"), Origin::Control),
            Err(Error::ExportExists(name)) if name == "a"
        ));
        assert!(exports.remove("a"));
        assert!(!dir.path().join("a.sock").exists(), "its socket is removed");
        assert!(exports.names().is_empty());
        assert!(!exports.remove("a"), "nothing left to remove");
        exports.stop_all();
        assert!(matches!(
            exports.add(
                prepare(null_spec(dir.path(), "b", 1)).expect("prepares"),
                Origin::Control
            ),
            Err(Error::Stopping)
        ));
    }

    #[test]
    fn resize_grows_the_image_and_the_device_and_refuses_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exports, _rx) = registry();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![0u8; 1 << 20]).expect("image");
        let spec = |name: &str, readonly| {
            ExportConfig {
                socket: Some(dir.path().join(format!("{name}.sock"))),
                disk: Some(image.clone()),
                readonly,
                lock: LockMode::Off,
                ..ExportConfig::default()
            }
            .validate()
            .expect("valid")
        };
        exports
            .add(
                prepare(spec("rw", false)).expect("prepares"),
                Origin::Config,
            )
            .expect("starts");
        assert_eq!(exports.resize("rw", 2 << 20).ok(), Some((1 << 20, 2 << 20)));
        assert_eq!(std::fs::metadata(&image).expect("stat").len(), 2 << 20);
        assert_eq!(
            exports.resize("rw", 2 << 20).ok(),
            Some((2 << 20, 2 << 20)),
            "the same size changes nothing"
        );
        assert!(matches!(
            exports.resize("rw", (2 << 20) + 100),
            Err(Error::ResizeMisaligned { size, block_size: 512, .. }) if size == (2 << 20) + 100
        ));
        assert!(matches!(
            exports.resize("rw", 0),
            Err(Error::ResizeMisaligned { .. })
        ));
        assert!(matches!(
            exports.resize("rw", 1 << 20),
            Err(Error::ResizeShrink { old, new, .. }) if old == 2 << 20 && new == 1 << 20
        ));
        assert!(matches!(
            exports.resize("nope", 4 << 20),
            Err(Error::NoSuchExport(n)) if n == "nope"
        ));
        exports
            .add(prepare(spec("ro", true)).expect("prepares"), Origin::Config)
            .expect("starts");
        let err = exports.resize("ro", 4 << 20).expect_err("read-only");
        assert!(
            matches!(
                err,
                Error::Resize {
                    source: ResizeError::ReadOnly,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "export ro: cannot resize to 4194304 bytes: the disk is open read-only"
        );
        assert_eq!(std::fs::metadata(&image).expect("stat").len(), 2 << 20);
        exports.stop_all();
    }

    #[test]
    fn changed_keys_name_what_differs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = null_spec(dir.path(), "a", 1);
        let mut b = a.clone();
        b.num_queues = 2;
        b.serial = "x".into();
        assert_eq!(changed_keys(&a, &b), ["num-queues", "serial"]);
    }
}

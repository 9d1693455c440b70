//! The connection loop: one vhost-user connection at a time, each with fresh device state.
//!
//! A connection gets a new `VhostUserDaemon` (and so new worker threads, vrings and guest
//! memory map), while the disk stays open. When the frontend goes away (guest shutdown,
//! QEMU exit or a protocol error), dropping the daemon joins its worker threads; each
//! worker's scheduler waits for its in-flight I/O before its coroutines are unwound, so no
//! request outlives the memory it writes to. Then we accept the next connection on the same
//! socket, unless `--once`.
//!
//! One loop serves one export; a daemon with several runs one loop per export, each on its
//! own thread ([`crate::exports`]). A [`Stop`] ends a loop: a connection after its
//! requests in flight are answered, a wait for a frontend at once (so one export can be
//! removed while the others serve).
//!
//! The socket is bound here ([`crate::socket`]) or handed over by systemd
//! ([`crate::activation`]); an activated one is never unlinked, and the loop accepts the
//! next frontend on the same descriptor. What systemd is told along the way (READY=1,
//! STATUS=, the watchdog's evidence) is [`crate::systemd`]'s.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vmm_sys_util::eventfd::EventFd;

use corodev_devices::backend::BlockBackend;
use corodev_devices::config::DeviceConfig;
use corodev_devices::ratelimit::{RateLimitedLog, DEFAULT_BURST, DEFAULT_WINDOW};

use crate::connection::{Connection, WorkerConfig};
use crate::device::BlkDevice;
use crate::error::Error;
use crate::systemd::{ExportStatus, Liveness, StatusBoard};

/// The per-connection lines: a frontend that connects and disconnects in a loop must not
/// flood the journal any more than a guest can.
static CONNECTION_LOG: RateLimitedLog = RateLimitedLog::new(DEFAULT_BURST, DEFAULT_WINDOW);

/// How long a closing connection waits for its workers to finish their requests in flight
/// before saying so (it goes on waiting: the kernel may still write into their buffers).
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What every connection is served with.
pub struct ServerConfig {
    /// Socket path to listen on (or that the activated socket is bound to).
    pub socket: PathBuf,
    /// The export's name (`--name`): its activated socket's name, and in STATUS= lines.
    pub name: String,
    /// The storage, open for the daemon's lifetime.
    pub disk: Arc<dyn BlockBackend>,
    /// Device parameters; each connection starts from its reset state.
    pub device: DeviceConfig,
    /// How each connection's worker threads run.
    pub workers: WorkerConfig,
    /// Serve a single connection.
    pub once: bool,
    /// The image's lock, shared by every connection (see [`crate::image_lock`]).
    pub image_lock: Option<Arc<crate::image_lock::ImageLock>>,
    /// The export's request statistics, counted by every connection in turn.
    pub stats: Arc<crate::stats::ExportStats>,
}

/// Lets a signal handler end the current connection and the loop.
///
/// The loop always ends by returning, never by `exit` from the signal thread: the export's
/// backend must be dropped on the way out. An RBD image is closed there, which writes back
/// librbd's cache and releases the image's exclusive lock; a process that exits with the
/// image open leaves a lock and a watch behind, and the next opener (a restarted daemon or
/// QEMU) waits for the cluster to time the watch out before it can write.
pub struct Stop {
    /// No further connection is accepted.
    requested: AtomicBool,
    /// The current connection is ended too (not only the loop after it).
    cut: AtomicBool,
    /// The bound socket's file was removed by [`Stop::retire`]: the loop's end must not
    /// remove it again (the path may be another export's by then).
    unlinked: AtomicBool,
    current: Mutex<Option<(ShutdownHandle, Arc<Connection>)>>,
    /// Readable once a stop is requested (never read back), so a wait for a frontend
    /// that polls it alongside the listener ends.
    wake: EventFd,
}

impl Stop {
    /// A stop not yet requested.
    pub fn new() -> Result<Stop, Error> {
        let wake =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| Error::Os {
                what: "creating the stop eventfd",
                source,
            })?;
        Ok(Stop {
            requested: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            unlinked: AtomicBool::new(false),
            current: Mutex::new(None),
            wake,
        })
    }

    /// Stops accepting new connections and ends the current one (if any) — after its
    /// requests in flight are answered (up to `--stop-timeout`), so the frontend finds its
    /// rings exactly as far as they were served when it sees the hang-up. Blocks for that
    /// long. A loop waiting for a frontend returns at once.
    pub fn request(&self) {
        self.cut.store(true, Ordering::Release);
        self.end_loop();
        let current = match self.current.lock() {
            Ok(cur) => cur.clone(),
            Err(_) => None,
        };
        let Some((handle, conn)) = current else {
            return;
        };
        let timeout = conn.workers.stop_timeout;
        if !conn.drain(timeout) {
            log::error!(
                "requests still in flight {timeout:?} after the stop request; hanging up anyway"
            );
        }
        handle.shutdown();
    }

    /// Ends the loop once the current connection (if any) ends by itself, and accepts no
    /// other: `export-del` in safe mode. `socket`: the bound socket's file, removed now so
    /// that no frontend connects to an export on its way out (`None` for an activated
    /// socket, which its activator owns). Returns at once; a loop waiting for a frontend
    /// ends at once.
    pub fn retire(&self, socket: Option<&std::path::Path>) {
        if let Some(path) = socket {
            if !self.unlinked.swap(true, Ordering::AcqRel) {
                if let Err(e) = std::fs::remove_file(path) {
                    log::warn!("removing socket {}: {e}", path.display());
                }
            }
        }
        self.end_loop();
    }

    fn end_loop(&self) {
        self.requested.store(true, Ordering::Release);
        if let Err(e) = self.wake.write(1) {
            log::error!("waking the connection loop to stop: {e}");
        }
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// The connection being served, if a frontend is connected: for messages to it
    /// (a resize's config-change notice) from threads other than the serve loop.
    pub fn connection(&self) -> Option<Arc<Connection>> {
        match self.current.lock() {
            Ok(cur) => cur.as_ref().map(|(_, conn)| conn.clone()),
            Err(_) => None,
        }
    }

    fn set(&self, h: Option<(ShutdownHandle, Arc<Connection>)>) {
        if let Ok(mut cur) = self.current.lock() {
            *cur = h;
        }
    }
}

/// The listening socket the serve loop accepts frontends on.
pub struct Listening {
    listener: Listener,
    /// Handed over by an activator, which owns the socket file: never unlinked.
    activated: bool,
}

impl Listening {
    /// A socket this process bound (see [`crate::socket::bind`]): its file is removed when
    /// the loop ends.
    pub fn bound(listener: Listener) -> Listening {
        Listening {
            listener,
            activated: false,
        }
    }

    /// A socket handed over by socket activation: left in place when the loop ends.
    pub fn activated(listener: std::os::unix::net::UnixListener) -> Listening {
        Listening {
            listener: Listener::from(listener),
            activated: true,
        }
    }

    /// Whether the socket came from socket activation.
    pub fn is_activated(&self) -> bool {
        self.activated
    }
}

/// What systemd is told, and the watchdog's view of the loop (see [`crate::systemd`]).
#[derive(Default)]
pub struct Supervision {
    /// The daemon's STATUS= line, to which this export contributes its state.
    pub status: Arc<StatusBoard>,
    /// What this export's serve loop and workers show the watchdog.
    pub liveness: Arc<Liveness>,
    /// With a watchdog: how long the wait for a frontend may block before it beats.
    pub beat_every: Option<std::time::Duration>,
}

/// Serves connections on a socket bound at `cfg.socket`, without a service manager (the
/// fuzz targets, embedders).
pub fn serve(cfg: &ServerConfig, stop: &Stop) -> Result<(), Error> {
    let listening = Listening::bound(crate::socket::bind(&cfg.socket)?);
    serve_on(cfg, listening, stop, &Supervision::default())
}

/// What ended a wait for a frontend.
#[derive(Debug, PartialEq, Eq)]
enum Woken {
    /// A frontend's connection is queued on the listener.
    Frontend,
    /// A stop was requested.
    Stop,
}

/// Waits until a frontend's connection is queued on `listener` or `stop` is requested,
/// beating the watchdog's serve-loop heart every `beat_every` (blocking without a
/// watchdog).
fn wait_for_frontend(
    listener: &Listener,
    stop: &Stop,
    live: &Liveness,
    beat_every: Option<std::time::Duration>,
) -> Result<Woken, Error> {
    let timeout = beat_every.map_or(-1, |d| {
        libc::c_int::try_from(d.as_millis().max(1)).unwrap_or(libc::c_int::MAX)
    });
    loop {
        live.accept_beat();
        let mut pfds = [listener.as_raw_fd(), stop.wake.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `pfds` is an array of valid pollfds for the duration of the call, and
        // the count passed is its length.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
        if rc > 0 {
            return Ok(if pfds[1].revents != 0 {
                Woken::Stop
            } else {
                Woken::Frontend
            });
        }
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::Os {
                    what: "waiting for a frontend (poll)",
                    source: e,
                });
            }
        }
    }
}

/// The export's state while no frontend is connected (also what the registry shows for an
/// export whose loop has not started yet, so READY=1 never names fewer exports than run).
pub(crate) fn listening_status(cfg: &ServerConfig, activated: bool, served: u64) -> ExportStatus {
    ExportStatus {
        line: format!(
            "export {}: listening on {}{}, no frontend; {served} connection(s) served",
            cfg.name,
            cfg.socket.display(),
            if activated { " (socket-activated)" } else { "" },
        ),
        serving: false,
        served,
    }
}

/// Serves connections on `listening` until `--once` is done or a stop is requested,
/// telling systemd's STATUS= line (`sup.status`) at each connect and disconnect. READY=1
/// is the caller's, once every export listens: `listening` already does when this starts.
pub fn serve_on(
    cfg: &ServerConfig,
    listening: Listening,
    stop: &Stop,
    sup: &Supervision,
) -> Result<(), Error> {
    let activated = listening.activated;
    let status = |served| listening_status(cfg, activated, served);
    let mut listener = listening.listener;
    log::info!(
        "export {}: listening on {}{} ({} bytes, {} queue(s) on {} thread(s), {} coroutines, {} stacks)",
        cfg.name,
        cfg.socket.display(),
        if activated { " (socket-activated)" } else { "" },
        cfg.disk.size(),
        cfg.device.num_queues(),
        cfg.workers.threads,
        cfg.workers.coroutine_backend.name(),
        cfg.workers.stack_mode.name(),
    );
    let live = &sup.liveness;
    sup.status.set(&cfg.name, status(0));
    let mut connection = 0u64;
    let mut served = 0u64;
    while !stop.requested() {
        connection += 1;
        let conn = Arc::new(
            Connection::new(cfg.disk.clone(), cfg.device.reset(), cfg.workers)?
                .with_image_lock(cfg.image_lock.clone())
                .with_stats(cfg.stats.clone()),
        );
        let mem = conn.mem.clone();
        let mut daemon = VhostUserDaemon::new("corodev".into(), BlkDevice(conn.clone()), mem)
            .map_err(Error::Vhost)?;
        conn.completions.register(&daemon)?;
        // From here the worker threads run, idle: the watchdog checks them.
        live.set_connection(Some(conn.clone()));
        live.set_accepting(true);
        let waited = wait_for_frontend(&listener, stop, live, sup.beat_every);
        live.set_accepting(false);
        if waited? == Woken::Stop {
            live.set_connection(None);
            break;
        }
        if let Err(e) = daemon.start(&mut listener) {
            CONNECTION_LOG.log(
                log::Level::Error,
                format_args!(
                    "export {}: accepting connection {connection} failed: {e}",
                    cfg.name
                ),
            );
            live.set_connection(None);
            continue;
        }
        served += 1;
        CONNECTION_LOG.log(
            log::Level::Info,
            format_args!(
                "export {}: connection {connection}: frontend connected",
                cfg.name
            ),
        );
        sup.status.set(
            &cfg.name,
            ExportStatus {
                line: format!(
                    "export {}: serving a frontend on {} (connection {served})",
                    cfg.name,
                    cfg.socket.display()
                ),
                serving: true,
                served,
            },
        );
        if let Some(h) = daemon.shutdown_handle() {
            stop.set(Some((h.clone(), conn.clone())));
            conn.set_shutdown(h);
            // A stop requested between the wait and `set` found no connection to end.
            if stop.cut.load(Ordering::Acquire) {
                stop.request();
            }
        }
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => {
                CONNECTION_LOG.log(
                    log::Level::Info,
                    format_args!(
                        "export {}: connection {connection}: frontend disconnected",
                        cfg.name
                    ),
                );
            }
            // A malformed message ends only this connection.
            Err(e) => {
                CONNECTION_LOG.warn(format_args!(
                    "export {}: connection {connection}: closed: {e}",
                    cfg.name
                ));
            }
        }
        stop.set(None);
        conn.frontend_left();
        // Every request in flight is finished and every worker's scheduler, ring, stacks
        // and memory map freed before the library joins the worker threads.
        match conn.close_workers(CLOSE_TIMEOUT) {
            Ok(()) => {
                CONNECTION_LOG.log(
                    log::Level::Info,
                    format_args!("export {}: connection {connection}: in-flight requests drained", cfg.name),
                );
            }
            Err(n) => log::error!(
                "export {}: connection {connection}: {n} worker(s) still have requests in flight after {CLOSE_TIMEOUT:?}; waiting for them to finish",
                cfg.name
            ),
        }
        // The workers answer the watchdog until their threads are joined.
        live.set_connection(None);
        drop(daemon); // joins the worker threads
                      // Nothing of this connection is in flight: a backend that mapped its guest
                      // memory for DMA unmaps it before the mappings go.
        if let Err(e) = cfg.disk.guest_memory(&[]) {
            log::error!("export {}: releasing guest memory: {e}", cfg.name);
        }
        let leaked = Arc::strong_count(&conn) - 1;
        if leaked > 0 {
            log::error!(
                "export {}: connection {connection}: state still referenced {leaked} time(s) after close",
                cfg.name
            );
        }
        if cfg.once || stop.requested() {
            break;
        }
        sup.status.set(&cfg.name, status(served));
    }
    // The activator owns an activated socket: it stays, for the next process.
    if !activated && !stop.unlinked.load(Ordering::Acquire) {
        let _ = std::fs::remove_file(&cfg.socket);
    }
    Ok(())
}

//! The connection loop: one vhost-user connection at a time, each with fresh device state.
//!
//! A connection gets a new `VhostUserDaemon` (and so new worker threads, vrings and guest
//! memory map), while the disk stays open. When the frontend goes away (guest shutdown,
//! QEMU exit or a protocol error), dropping the daemon joins its worker threads; each
//! worker's scheduler waits for its in-flight I/O before its coroutines are unwound, so no
//! request outlives the memory it writes to. Then we accept the next connection on the same
//! socket, unless `--once`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};

use corodev_devices::backend::BlockBackend;
use corodev_devices::config::DeviceConfig;
use corodev_devices::ratelimit::{RateLimitedLog, DEFAULT_BURST, DEFAULT_WINDOW};

use crate::connection::{Connection, WorkerConfig};
use crate::device::BlkDevice;
use crate::error::Error;

/// The per-connection lines: a frontend that connects and disconnects in a loop must not
/// flood the journal any more than a guest can.
static CONNECTION_LOG: RateLimitedLog = RateLimitedLog::new(DEFAULT_BURST, DEFAULT_WINDOW);

/// How long a closing connection waits for its workers to finish their requests in flight
/// before saying so (it goes on waiting: the kernel may still write into their buffers).
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What every connection is served with.
pub struct ServerConfig {
    /// Socket path to listen on.
    pub socket: PathBuf,
    /// The storage, open for the daemon's lifetime.
    pub disk: Arc<dyn BlockBackend>,
    /// Device parameters; each connection starts from its reset state.
    pub device: DeviceConfig,
    /// How each connection's worker threads run.
    pub workers: WorkerConfig,
    /// Serve a single connection.
    pub once: bool,
}

/// Lets a signal handler end the current connection and the loop.
#[derive(Default)]
pub struct Stop {
    requested: AtomicBool,
    current: Mutex<Option<(ShutdownHandle, Arc<Connection>)>>,
}

impl Stop {
    /// Stops accepting new connections and ends the current one (if any) — after its
    /// requests in flight are answered (up to `--stop-timeout`), so the frontend finds its
    /// rings exactly as far as they were served when it sees the hang-up. Blocks for that
    /// long. Returns whether a connection was active (if not, the caller may exit at once).
    pub fn request(&self) -> bool {
        self.requested.store(true, Ordering::Release);
        let current = match self.current.lock() {
            Ok(cur) => cur.clone(),
            Err(_) => None,
        };
        let Some((handle, conn)) = current else {
            return false;
        };
        let timeout = conn.workers.stop_timeout;
        if !conn.drain(timeout) {
            log::error!(
                "requests still in flight {timeout:?} after the stop request; hanging up anyway"
            );
        }
        handle.shutdown();
        true
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    fn set(&self, h: Option<(ShutdownHandle, Arc<Connection>)>) {
        if let Ok(mut cur) = self.current.lock() {
            *cur = h;
        }
    }
}

/// Serves connections until `--once` is done or a stop is requested.
pub fn serve(cfg: &ServerConfig, stop: &Stop) -> Result<(), Error> {
    let mut listener = crate::socket::bind(&cfg.socket)?;
    log::info!(
        "listening on {} ({} bytes, {} queue(s) on {} thread(s), {} coroutines, {} stacks)",
        cfg.socket.display(),
        cfg.disk.size(),
        cfg.device.num_queues(),
        cfg.workers.threads,
        cfg.workers.coroutine_backend.name(),
        cfg.workers.stack_mode.name(),
    );
    let mut connection = 0u64;
    while !stop.requested() {
        connection += 1;
        let conn = Arc::new(Connection::new(
            cfg.disk.clone(),
            cfg.device.reset(),
            cfg.workers,
        )?);
        let mem = conn.mem.clone();
        let mut daemon = VhostUserDaemon::new("corodev".into(), BlkDevice(conn.clone()), mem)
            .map_err(Error::Vhost)?;
        conn.completions.register(&daemon)?;
        if let Err(e) = daemon.start(&mut listener) {
            CONNECTION_LOG.log(
                log::Level::Error,
                format_args!("accepting connection {connection} failed: {e}"),
            );
            continue;
        }
        CONNECTION_LOG.log(
            log::Level::Info,
            format_args!("connection {connection}: frontend connected"),
        );
        if let Some(h) = daemon.shutdown_handle() {
            stop.set(Some((h.clone(), conn.clone())));
            conn.set_shutdown(h);
        }
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => {
                CONNECTION_LOG.log(
                    log::Level::Info,
                    format_args!("connection {connection}: frontend disconnected"),
                );
            }
            // A malformed message ends only this connection.
            Err(e) => {
                CONNECTION_LOG.warn(format_args!("connection {connection}: closed: {e}"));
            }
        }
        stop.set(None);
        // Every request in flight is finished and every worker's scheduler, ring, stacks
        // and memory map freed before the library joins the worker threads.
        match conn.close_workers(CLOSE_TIMEOUT) {
            Ok(()) => {
                CONNECTION_LOG.log(
                    log::Level::Info,
                    format_args!("connection {connection}: in-flight requests drained"),
                );
            }
            Err(n) => log::error!(
                "connection {connection}: {n} worker(s) still have requests in flight after {CLOSE_TIMEOUT:?}; waiting for them to finish"
            ),
        }
        drop(daemon); // joins the worker threads
        let leaked = Arc::strong_count(&conn) - 1;
        if leaked > 0 {
            log::error!(
                "connection {connection}: state still referenced {leaked} time(s) after close"
            );
        }
        if cfg.once {
            break;
        }
    }
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

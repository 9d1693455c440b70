//! What systemd is told (`Type=notify`, sd_notify(3)): READY=1 once the vhost-user socket
//! accepts connections, STATUS= lines as frontends come and go, STOPPING=1 on a stop, and,
//! when the unit sets `WatchdogSec=`, WATCHDOG=1 only while the serving path proves alive.
//!
//! **What proves liveness.** A thread that pings systemd on a timer proves only that the
//! timer thread runs. The watchdog thread here pings on a timer too, but only after the
//! serving path answered a challenge since the last tick:
//!
//! - each worker thread of the current connection is woken through its completion
//!   eventfd (the same wake-up its io_uring uses) and answers by recording the round on
//!   the next event its epoll loop handles ([`Connection::beat`]). A worker stuck in a
//!   request's coroutine, blocked in a system call, deadlocked on a ring lock or spinning
//!   never gets back to epoll, never answers, and systemd stops hearing from us: after
//!   `WatchdogSec=` it kills the daemon and `Restart=` starts a fresh one, which resumes
//!   the requests left in flight from QEMU's inflight region. The workers exist from
//!   before a frontend connects, so they are checked while idle too;
//! - while waiting for a frontend, the serve loop waits in `poll(2)` with a timeout of a
//!   fraction of the watchdog interval and beats on every pass ([`Liveness::accept_beat`]),
//!   so a serve loop that stopped looping stops the pings.
//!
//! With several exports ([`crate::exports`]) each has its own [`Liveness`]; [`Watched`]
//! holds them all and the watchdog pings only while every one answers, and the STATUS=
//! line counts the exports ([`StatusBoard`]); READY=1 is sent once, when all listen.
//!
//! Not covered: the thread that reads the frontend's vhost-user messages (it can only be
//! probed with a message, which would be a protocol event); a deadlock there shows up as
//! soon as it stops a ring the workers need, and QEMU notices the rest.
//!
//! Boundary: the protocol itself is the `sd-notify` crate's; without `NOTIFY_SOCKET`
//! every notification is a no-op, and without `WATCHDOG_USEC` no watchdog thread starts.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sd_notify::NotifyState;

use crate::connection::Connection;
use crate::error::Error;

/// Sends notifications to the service manager; a no-op without `NOTIFY_SOCKET`.
pub struct Notifier {
    /// A failed send is logged once, not at every status change.
    failed: AtomicBool,
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier::new()
    }
}

impl Notifier {
    /// A notifier for this process's `NOTIFY_SOCKET`, if any.
    pub fn new() -> Notifier {
        Notifier {
            failed: AtomicBool::new(false),
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            if !self.failed.swap(true, Ordering::AcqRel) {
                log::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
            }
        }
    }

    /// READY=1 with the first status line: the socket accepts connections.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A STATUS= line (what `systemctl status` shows).
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// STOPPING=1: the daemon is finishing what is in flight and will exit.
    pub fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: finishing requests in flight"),
        ]);
    }

    /// WATCHDOG=1.
    fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}

/// What the serve loop and the workers of one export show the watchdog.
#[derive(Default)]
pub struct Liveness {
    /// Bumped on every pass of the serve loop's wait for a frontend.
    accept_beats: AtomicU64,
    /// `accept_beats` at the watchdog's last check.
    checked_beats: AtomicU64,
    /// Whether the serve loop is waiting for a frontend (and so must beat).
    accepting: AtomicBool,
    /// The connection whose worker threads are running (from before it is accepted
    /// until just before its threads are joined).
    current: Mutex<Option<Arc<Connection>>>,
}

impl Liveness {
    /// The serve loop passed through its wait for a frontend.
    pub fn accept_beat(&self) {
        self.accept_beats.fetch_add(1, Ordering::AcqRel);
    }

    /// The serve loop starts (true) or stops (false) waiting for a frontend.
    pub fn set_accepting(&self, accepting: bool) {
        self.accept_beat();
        self.accepting.store(accepting, Ordering::Release);
    }

    /// The connection whose workers the watchdog challenges (`None`: no worker threads).
    pub fn set_connection(&self, conn: Option<Arc<Connection>>) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = conn;
    }

    fn connection(&self) -> Option<Arc<Connection>> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `Ok` if everything challenged at the last tick answered; otherwise who did not.
    fn check(&self) -> Result<(), String> {
        let beats = self.accept_beats.load(Ordering::Acquire);
        let last = self.checked_beats.swap(beats, Ordering::AcqRel);
        // A first check (nothing recorded yet) passes: the loop had no tick to beat in.
        let accept_ok = !self.accepting.load(Ordering::Acquire) || beats != last || last == 0;
        let silent = self
            .connection()
            .map(|c| c.silent_workers())
            .unwrap_or_default();
        match (accept_ok, silent.is_empty()) {
            (true, true) => Ok(()),
            (false, _) => Err("the serve loop stopped waiting for frontends".into()),
            (true, false) => Err(format!(
                "worker thread(s) {silent:?} did not get back to their event loop"
            )),
        }
    }

    /// Starts the next round: wakes every worker thread.
    fn challenge(&self) {
        if let Some(conn) = self.connection() {
            conn.ping_workers();
        }
    }
}

/// Every running export's [`Liveness`]: the watchdog pings only while all of them answer,
/// so one frozen export among several still gets the daemon restarted. Exports join when
/// they start and leave when they stop (a reload, a stop), never while checked.
#[derive(Default)]
pub struct Watched {
    members: Mutex<Vec<(String, Arc<Liveness>)>>,
}

impl Watched {
    /// Watches export `name`'s serve loop and workers from now on.
    pub fn add(&self, name: &str, live: Arc<Liveness>) {
        self.lock().push((name.to_owned(), live));
    }

    /// Stops watching `live` (its export stopped).
    pub fn remove(&self, live: &Arc<Liveness>) {
        self.lock().retain(|(_, l)| !Arc::ptr_eq(l, live));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Arc<Liveness>)>> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `Ok` if every export answered; otherwise the first that did not, and why.
    fn check(&self) -> Result<(), String> {
        // Every member is checked (not only up to the first failure), so that each
        // records its beats for the next round.
        let failures: Vec<String> = self
            .lock()
            .iter()
            .filter_map(|(name, live)| {
                live.check()
                    .err()
                    .map(|why| format!("{why} (export {name})"))
            })
            .collect();
        match failures.into_iter().next() {
            None => Ok(()),
            Some(first) => Err(first),
        }
    }

    fn challenge(&self) {
        for (_, live) in self.lock().iter() {
            live.challenge();
        }
    }
}

/// One export's part of the STATUS= line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportStatus {
    /// What the line says when this is the only export.
    pub line: String,
    /// A frontend is connected.
    pub serving: bool,
    /// Connections served so far.
    pub served: u64,
}

/// The STATUS= line of the whole daemon, made from every export's state: the export's own
/// line when there is one export, otherwise counts (`systemctl status` shows one line, so
/// exports cannot each send theirs). READY=1 is sent once, by whoever started the exports,
/// when every one of them listens ([`StatusBoard::ready`]); until then nothing is sent.
#[derive(Default)]
pub struct StatusBoard {
    notifier: Arc<Notifier>,
    exports: Mutex<std::collections::BTreeMap<String, ExportStatus>>,
    ready: AtomicBool,
}

impl StatusBoard {
    /// A board that tells `notifier`.
    pub fn new(notifier: Arc<Notifier>) -> StatusBoard {
        StatusBoard {
            notifier,
            exports: Mutex::default(),
            ready: AtomicBool::new(false),
        }
    }

    /// Export `name`'s state changed (a state equal to the last one sends nothing: the
    /// registry shows an export's first state before its serve loop does).
    pub fn set(&self, name: &str, status: ExportStatus) {
        let changed = self.lock().insert(name.to_owned(), status.clone()) != Some(status);
        if changed {
            self.send();
        }
    }

    /// Export `name`'s last state.
    pub fn get(&self, name: &str) -> Option<ExportStatus> {
        self.lock().get(name).cloned()
    }

    /// Export `name` stopped.
    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
        self.send();
    }

    /// READY=1 with the current line (once; later calls only update the line).
    pub fn ready(&self) {
        if self.ready.swap(true, Ordering::AcqRel) {
            self.send();
        } else {
            self.notifier.ready(&self.line());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, ExportStatus>> {
        self.exports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self) {
        if self.ready.load(Ordering::Acquire) {
            self.notifier.status(&self.line());
        }
    }

    /// The STATUS= line.
    pub fn line(&self) -> String {
        let exports = self.lock();
        if exports.len() == 1 {
            if let Some(only) = exports.values().next() {
                return only.line.clone();
            }
        }
        let serving: Vec<&str> = exports
            .iter()
            .filter(|(_, s)| s.serving)
            .map(|(n, _)| n.as_str())
            .collect();
        let served: u64 = exports.values().map(|s| s.served).sum();
        format!(
            "{} exports, {} serving a frontend{}; {served} connection(s) served",
            exports.len(),
            serving.len(),
            if serving.is_empty() {
                String::new()
            } else {
                format!(" ({})", serving.join(", "))
            },
        )
    }
}

/// The systemd watchdog interval (`WATCHDOG_USEC`, for this process), if enabled.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// How often the watchdog thread checks and pings, and so the longest a challenged
/// thread may take to answer: a quarter of the interval, so that a ping reaches systemd
/// at least twice per interval even when an answer takes a whole tick.
pub fn tick(interval: Duration) -> Duration {
    (interval / 4).max(Duration::from_millis(1))
}

/// Starts the watchdog thread: every [`tick`], checks that everything challenged at the
/// previous tick answered, in every export, sends WATCHDOG=1 only if so, and challenges again.
pub fn spawn_watchdog(
    interval: Duration,
    live: Arc<Watched>,
    notifier: Arc<Notifier>,
) -> Result<(), Error> {
    let tick = tick(interval);
    log::info!(
        "systemd watchdog every {interval:?}: pinging every {tick:?} while the workers and the serve loop answer"
    );
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(tick);
                match live.check() {
                    Ok(()) => {
                        if failing {
                            log::info!("watchdog: the serving path answers again");
                            failing = false;
                        }
                        notifier.watchdog();
                    }
                    Err(why) => {
                        if !failing {
                            log::error!(
                                "watchdog: {why} within {tick:?}; not telling systemd we are alive"
                            );
                            failing = true;
                        }
                    }
                }
                live.challenge();
            }
        })
        .map_err(|source| Error::Os {
            what: "starting the watchdog thread",
            source,
        })?;
    Ok(())
}

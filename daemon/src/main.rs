//! `corodev`: serves virtio-blk devices to QEMU guests over vhost-user sockets: one
//! export from flags, or several from a `--config` file (SIGHUP reloads it).
//!
//! Startup order matters for operators: every setting and every disk are checked before
//! any socket is created, so a bad invocation or file fails with every problem named and
//! leaves nothing behind. Under systemd the sockets may come from socket activation, and
//! READY=1 is sent only once every export accepts connections (see `corodev::activation`,
//! `corodev::systemd`). The running exports are `corodev::exports`'s registry; this file
//! only wires signals and the command line to it.

#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use corodev::activation::Activated;
use corodev::cli::{Cli, DaemonArgs, Mode};
use corodev::config_file;
use corodev::control::{self, commands::Context, ControlServer};
use corodev::ctl;
use corodev::error::Error;
use corodev::exports::{self, Exports, Origin, Prepared};
use corodev::logging;
use corodev::shutdown::Shutdown;
use corodev::systemd::{self as sd, Notifier, StatusBoard, Watched};

/// Starts `prepared` and serves until every export ended (`--once`) or SIGTERM (or the
/// control API's `shutdown`). `config`: the file SIGHUP reads again.
fn serve(
    prepared: Vec<Prepared>,
    config: Option<PathBuf>,
    once: bool,
    settings: Settings,
) -> Result<(), Error> {
    // Claimed first: a bad activation setup is a configuration error like a bad option.
    let activated = Activated::from_env()?;
    let notifier = Arc::new(Notifier::new());
    let status = Arc::new(StatusBoard::new(notifier.clone()));
    let watched = Arc::new(Watched::default());
    let watchdog = sd::watchdog_interval();
    let (exports, finished) = Exports::new(
        status.clone(),
        watched.clone(),
        watchdog.map(|d| sd::tick(d) / 2),
        activated,
        once,
    );
    let exports = Arc::new(exports);
    let shutdown = Arc::new(Shutdown::new(exports.clone(), notifier.clone()));
    // Before any socket exists, so that a SIGTERM during startup removes what was bound.
    let control = settings.effective.control.clone();
    let metrics = settings.effective.metrics;
    install_signal_handlers(exports.clone(), config, settings, shutdown.clone())?;
    // Bound before any socket: a bad --metrics leaves nothing behind.
    if let Some(addr) = metrics {
        let exports = exports.clone();
        corodev::metrics::spawn(addr, move || exports.stats())?;
    }
    // Kept to the end: dropping it removes the socket file.
    let _control = match &control {
        Some(path) => Some(start_control(
            path,
            Context {
                exports: exports.clone(),
                shutdown: shutdown.clone(),
            },
        )?),
        None => None,
    };
    for export in prepared {
        match exports.add(export, Origin::Config) {
            Ok(()) => {}
            // SIGTERM during startup: the exports started so far were stopped.
            Err(Error::Stopping) => return Ok(()),
            Err(e) => {
                exports.stop_all();
                return Err(e);
            }
        }
    }
    for extra in exports.started() {
        log::warn!("socket activation passed socket '{extra}', which no export uses; ignoring it");
    }
    status.ready();
    if let Some(interval) = watchdog {
        sd::spawn_watchdog(interval, watched, notifier.clone())?;
    }
    let mut failure = None;
    for done in finished.iter() {
        let (result, none_left) = exports.reap(done);
        let ended_by_itself = result.is_some();
        if let Some(Err(e)) = result {
            // The last one is printed by `main`.
            if !none_left {
                log::error!("{e}; the other exports go on");
            }
            failure = Some(e);
        }
        // The daemon ends with its last export when that one ended by itself (`--once`,
        // an error) or at SIGTERM; a reload that left none running (every new export
        // failed to start) keeps it up for the next SIGHUP.
        if none_left && (ended_by_itself || exports.stopping()) {
            break;
        }
        if none_left {
            log::warn!("no export is running; waiting for SIGHUP, a control command or SIGTERM");
        }
    }
    notifier.stopping();
    failure.map_or(Ok(()), Err)
}

/// The control socket: the activated one named `control` if systemd passed it, else one
/// bound at `path`.
fn start_control(path: &Path, ctx: Context) -> Result<ControlServer, Error> {
    let (listener, is_activated) = match ctx.exports.take_activated(control::ACTIVATION_NAME, path)
    {
        Some(passed) => (passed?, true),
        None => (control::bind(path)?, false),
    };
    control::spawn(listener, path, is_activated, ctx)
}

/// SIGTERM/SIGINT: tell systemd we are stopping and stop every export gracefully
/// ([`Shutdown`]): each connection's in-flight I/O completes (bounded by its stop
/// timeout), a wait for a frontend ends at once, sockets we bound are removed (activated
/// ones stay) and every backend is closed on the way out (an RBD image's lock released).
/// A second signal (after a signal or the `shutdown` command) exits at once, for an
/// operator who will not wait for the drains. SIGHUP: read the config file again and
/// apply it ([`reload`]).
fn install_signal_handlers(
    exports: Arc<Exports>,
    config: Option<PathBuf>,
    mut settings: Settings,
    shutdown: Arc<Shutdown>,
) -> Result<(), Error> {
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(|source| {
            Error::Os {
                what: "installing signal handlers",
                source,
            }
        })?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                match (sig, shutdown.begun()) {
                    (SIGHUP, false) => reload(&exports, config.as_deref(), &mut settings),
                    (SIGHUP, true) => log::warn!("SIGHUP while stopping: ignoring it"),
                    (_, false) => {
                        log::info!("signal {sig}: shutting down");
                        // Returns at once: the next signal must still be seen.
                        shutdown.begin("signal");
                    }
                    (_, true) => {
                        log::warn!(
                            "signal {sig} again: exiting without waiting for requests in flight"
                        );
                        std::process::exit(1);
                    }
                }
            }
        })
        .map_err(|source| Error::Os {
            what: "starting the signal thread",
            source,
        })?;
    Ok(())
}

/// The daemon's own settings: as given by flags, and in effect (flags over the file's
/// `[daemon]` table).
struct Settings {
    flags: DaemonArgs,
    effective: DaemonArgs,
}

impl Settings {
    fn new(flags: DaemonArgs, file: Option<DaemonArgs>) -> Settings {
        let effective = flags.clone().over(file.unwrap_or_default());
        Settings { flags, effective }
    }

    /// A reloaded file's `[daemon]` table: a new log level applies now (unless a flag set
    /// it, or the logger follows RUST_LOG); a new control socket or metrics address at the
    /// next start.
    fn reload(&mut self, file: DaemonArgs) {
        let new = self.flags.clone().over(file);
        if new.log_level != self.effective.log_level {
            match (self.effective.log_level, new.log_level) {
                (Some(_), Some(level)) => {
                    logging::set_level(level);
                    log::info!("reload: log level is now {level:?}");
                }
                _ => log::warn!(
                    "reload: [daemon] log-level changed between set and unset; that takes effect when corodev restarts"
                ),
            }
        }
        if new.control != self.effective.control {
            log::warn!(
                "reload: [daemon] control changed; the control socket moves when corodev restarts"
            );
        }
        if new.metrics != self.effective.metrics {
            log::warn!(
                "reload: [daemon] metrics changed; the metrics address moves when corodev restarts"
            );
        }
        self.effective.log_level = new.log_level.or(self.effective.log_level);
    }
}

/// SIGHUP: applies the config file as it is now (see `corodev::exports` for what changes
/// and what does not). A file with any problem changes nothing: each problem is logged
/// and the running exports keep serving.
fn reload(exports: &Exports, config: Option<&Path>, settings: &mut Settings) {
    let Some(path) = config else {
        log::warn!("SIGHUP: no --config file to reload (the export comes from flags); ignoring it");
        return;
    };
    log::info!("SIGHUP: reloading {}", path.display());
    let applied = config_file::load(path).and_then(|config| {
        let applied = exports.apply(&config.exports)?;
        settings.reload(config.daemon);
        Ok(applied)
    });
    match applied {
        Ok(a) => log::info!(
            "reload: {} export(s) added, {} removed, {} restarted, {} unchanged{}",
            a.added.len(),
            a.removed.len(),
            a.restarted.len(),
            a.unchanged.len(),
            if a.failed.is_empty() {
                String::new()
            } else {
                format!(", {} failed to start", a.failed.len())
            }
        ),
        Err(e) => {
            for line in e.lines() {
                log::error!("reload: {line}");
            }
            log::error!(
                "reload: {} is not applied; still serving {}",
                path.display(),
                exports.names().join(", ")
            );
        }
    }
}

/// `check-config FILE`: every problem on stderr, one per line, and exit 1; or a one-line
/// summary on stdout and exit 0.
fn check_config(path: &Path) -> ExitCode {
    match config_file::check(path) {
        Ok(config) => {
            let names: Vec<&str> = config
                .exports
                .iter()
                .map(|p| p.spec.name.as_str())
                .collect();
            println!(
                "{}: {} export(s) OK: {}",
                path.display(),
                names.len(),
                names.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `ctl`: the answer as pretty JSON on stdout and exit 0, or one error line and exit 1.
fn run_ctl(
    control: &Path,
    command: &str,
    args: &[String],
    timeout: std::time::Duration,
) -> ExitCode {
    let result = ctl::arguments(args).and_then(|a| ctl::run(control, command, a, timeout));
    match result {
        Ok(value) => {
            match serde_json::to_string_pretty(&value) {
                Ok(text) => println!("{text}"),
                Err(_) => println!("{value}"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("corodev ctl: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::from_args(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let (prepared, config, once, daemon) = match cli.mode() {
        Mode::Check(path) => {
            logging::init(None);
            return check_config(&path);
        }
        Mode::Ctl {
            control,
            timeout,
            command,
            args,
        } => return run_ctl(&control, &command, &args, timeout),
        Mode::Flags {
            export,
            once,
            daemon,
        } => {
            logging::init(daemon.log_level);
            let spec = match export.validate() {
                Ok(spec) => spec,
                Err(errors) => {
                    for e in errors.0 {
                        eprintln!("corodev: error: {e}");
                    }
                    return ExitCode::from(2);
                }
            };
            match exports::prepare(spec) {
                Ok(p) => (vec![p], None, once, Settings::new(daemon, None)),
                Err(e) => {
                    eprintln!("corodev: error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        Mode::ConfigFile { file, daemon } => {
            // The file is read before the disks are opened, so that its log level
            // applies to what opening them logs.
            let loaded = config_file::load(&file).and_then(|c| {
                let settings = Settings::new(daemon, Some(c.daemon.clone()));
                logging::init(settings.effective.log_level);
                Ok((config_file::prepare_all(&c.exports, |_| true)?, settings))
            });
            match loaded {
                Ok((prepared, settings)) => (prepared, Some(file), false, settings),
                Err(e) => {
                    for line in e.lines() {
                        eprintln!("corodev: error: {line}");
                    }
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    match serve(prepared, config, once, daemon) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corodev: error: {e}");
            ExitCode::FAILURE
        }
    }
}

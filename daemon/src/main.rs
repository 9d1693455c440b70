//! `corodev`: serves a virtio-blk device to QEMU guests over a vhost-user socket.
//!
//! Startup order matters for operators: every option and the disk are validated before the
//! socket is created, so a bad invocation fails with one line and leaves nothing behind.
//! Under systemd the socket may come from socket activation, and READY=1 is sent only once
//! it accepts connections (see `corodev::activation`, `corodev::systemd`).

#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};

use corodev_devices::backend::{BlockBackend, FileBackend, NullBackend};
use corodev_devices::config::{DeviceConfig, DeviceParams};

use corodev::activation::Activated;
use corodev::cli::{BackendKind, Cli, CliError, LockMode};
use corodev::connection::WorkerConfig;
use corodev::error::Error;
use corodev::image_lock::ImageLock;
use corodev::server::{self, Listening, ServerConfig, Stop, Supervision};
use corodev::systemd::{self as sd, Liveness, Notifier};

fn open_disk(cli: &Cli) -> Result<Arc<dyn BlockBackend>, Error> {
    match (cli.backend, &cli.disk) {
        (BackendKind::Null, _) => Ok(Arc::new(NullBackend::new(
            cli.size.unwrap_or(0),
            std::time::Duration::from_micros(cli.null_latency_us),
        ))),
        (BackendKind::File, Some(path)) => {
            let disk = FileBackend::open(path, cli.readonly, cli.direct).map_err(|source| {
                Error::OpenDisk {
                    path: path.clone(),
                    source,
                }
            })?;
            let size = disk.size();
            if size == 0 {
                return Err(Error::DiskEmpty(path.clone()));
            }
            if size % u64::from(cli.block_size) != 0 {
                return Err(Error::DiskSize {
                    path: path.clone(),
                    size,
                    block_size: cli.block_size,
                });
            }
            Ok(Arc::new(disk))
        }
        (BackendKind::File, None) => Err(CliError::DiskRequired.into()),
        (BackendKind::Rbd, _) => open_rbd(cli),
    }
}

/// Connects to the Ceph cluster and opens the image (one connection for the process).
#[cfg(feature = "rbd")]
fn open_rbd(cli: &Cli) -> Result<Arc<dyn BlockBackend>, Error> {
    use corodev_devices::backend::{RbdBackend, RbdOptions};
    let (Some(pool), Some(image)) = (&cli.rbd_pool, &cli.rbd_image) else {
        return Err(CliError::RbdNeedsImage.into());
    };
    let opts = RbdOptions {
        pool: pool.clone(),
        image: image.clone(),
        namespace: cli.rbd_namespace.clone(),
        conf: cli.ceph_conf.clone(),
        id: cli.ceph_id.clone(),
        readonly: cli.readonly,
        cache: !cli.direct,
        connect_timeout: std::time::Duration::from_secs(cli.ceph_connect_timeout),
        op_timeout: std::time::Duration::from_secs(cli.ceph_op_timeout),
    };
    let disk = RbdBackend::open(&opts)?;
    if disk.size() == 0 {
        return Err(Error::RbdEmpty {
            pool: pool.clone(),
            image: image.clone(),
        });
    }
    log::info!(
        "RBD image {pool}/{}{image}: {} bytes, {}, librbd cache {}",
        cli.rbd_namespace
            .as_ref()
            .map_or_else(String::new, |ns| format!("{ns}/")),
        disk.size(),
        if cli.readonly {
            "read-only"
        } else {
            "read-write"
        },
        if disk.writeback_cache() {
            "on, write-back (the guest flushes)"
        } else {
            "off"
        },
    );
    Ok(Arc::new(disk))
}

#[cfg(not(feature = "rbd"))]
fn open_rbd(_cli: &Cli) -> Result<Arc<dyn BlockBackend>, Error> {
    Err(Error::RbdNotBuilt)
}

/// The device the options describe, validated against the disk: the one path from
/// options to a device, so nothing is clamped or adjusted behind the user's back.
fn device_config(cli: &Cli, disk: &dyn BlockBackend) -> Result<DeviceConfig, Error> {
    let mut params = DeviceParams::for_backend(disk);
    params.num_queues = cli.num_queues;
    params.queue_size = cli.queue_size;
    params.block_size = cli.block_size;
    params.readonly |= cli.readonly;
    params.serial = cli.serial.clone().into_bytes();
    Ok(DeviceConfig::build(params)?)
}

fn run(cli: Cli) -> Result<(), Error> {
    let name = cli.export_name();
    // Claimed first: a bad activation setup is a configuration error like a bad option.
    let activated = match Activated::from_env()? {
        Some(mut fds) => {
            let listener = fds.take(&name, &cli.socket)?;
            for extra in fds.names() {
                log::warn!(
                    "socket activation passed socket '{extra}', which no export uses; ignoring it"
                );
            }
            Some(listener)
        }
        None => None,
    };
    let disk = open_disk(&cli)?;
    let device = device_config(&cli, &*disk)?;
    let image_lock = match (&cli.disk, cli.lock) {
        (Some(path), LockMode::On) => Some(Arc::new(ImageLock::acquire(
            path,
            device.readonly(),
            cli.incoming,
        )?)),
        _ => None,
    };
    if let Some(lock) = &image_lock {
        log::info!(
            "disk {} locked ({}{})",
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
    let cfg = ServerConfig {
        image_lock,
        socket: cli.socket.clone(),
        name,
        disk,
        device,
        workers: WorkerConfig {
            threads: usize::from(cli.worker_threads()),
            coroutine_backend: coro::Backend::from(cli.coroutine_backend)
                .check()
                .map_err(Error::CoroutineBackend)?,
            stack_mode: cli.stack_mode.to_coro(),
            stack_size: usize::try_from(cli.stack_size).unwrap_or(coro::DEFAULT_STACK_SIZE),
            poll: std::time::Duration::from_micros(cli.poll_us),
            stop_timeout: std::time::Duration::from_secs(cli.stop_timeout),
        },
        once: cli.once,
    };
    let listening = match activated {
        Some(listener) => Listening::activated(listener),
        None => Listening::bound(corodev::socket::bind(&cfg.socket)?),
    };
    let watchdog = sd::watchdog_interval();
    let sup = Supervision {
        notifier: Arc::new(Notifier::new()),
        liveness: Arc::new(Liveness::default()),
        beat_every: watchdog.map(|d| sd::tick(d) / 2),
    };
    let stop = Arc::new(Stop::new()?);
    install_signal_handlers(stop.clone(), sup.notifier.clone())?;
    if let Some(interval) = watchdog {
        sd::spawn_watchdog(interval, sup.liveness.clone(), sup.notifier.clone())?;
    }
    server::serve_on(&cfg, listening, &stop, &sup)
}

/// SIGTERM/SIGINT: tell systemd we are stopping and end the loop gracefully: the current
/// connection's in-flight I/O completes (bounded by `--stop-timeout`), a wait for a frontend
/// ends at once, and `main` returns, closing the backend on the way (see [`Stop`]). A second
/// signal exits at once, for an operator who will not wait for the drain.
fn install_signal_handlers(stop: Arc<Stop>, notifier: Arc<Notifier>) -> Result<(), Error> {
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(|source| Error::Os {
            what: "installing signal handlers",
            source,
        })?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signals = signals.forever();
            if let Some(sig) = signals.next() {
                log::info!("signal {sig}: shutting down");
                notifier.stopping();
                // The drain blocks; the next signal must still be seen.
                let spawned = std::thread::Builder::new()
                    .name("stop".into())
                    .spawn(move || stop.request());
                if let Err(e) = spawned {
                    log::error!("starting the stop thread: {e}; exiting now");
                    std::process::exit(1);
                }
            }
            if let Some(sig) = signals.next() {
                log::warn!("signal {sig} again: exiting without waiting for requests in flight");
                std::process::exit(1);
            }
        })
        .map_err(|source| Error::Os {
            what: "starting the signal thread",
            source,
        })?;
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    if let Err(msg) = cli.validate() {
        eprintln!("corodev: error: {msg}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corodev: error: {e}");
            ExitCode::FAILURE
        }
    }
}

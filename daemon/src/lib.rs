//! The corodev daemon as a library: the `corodev` binary is a thin `main` over it, and the
//! fuzz targets drive [`device::BlkDevice`] through real vhost-user connections.
//!
//! - [`cli`]: the command line (one export from flags, or `--config`, or `check-config`).
//! - [`export_config`]: one export's settings, from flags or a file, and their validation.
//! - [`config_file`]: the `--config` TOML file: several exports, every error with its key.
//! - [`exports`]: the registry of running exports (add, remove, reload, stop).
//! - [`control`]: the control socket's QMP-shaped API (tokio), and [`ctl`], its client.
//! - [`events`]: what control clients are told unasked (export deleted, shutdown).
//! - [`shutdown`]: the daemon's orderly end (SIGTERM, SIGINT, the `shutdown` command).
//! - [`logging`]: the log's level and its journald-friendly form.
//! - [`socket`]: binding the vhost-user socket (live vs. stale).
//! - [`activation`]: taking the socket from systemd instead (socket activation).
//! - [`systemd`]: READY/STATUS/STOPPING notifications and the watchdog's evidence.
//! - [`image_lock`]: QEMU-compatible image locks, and their hand-over in a migration.
//! - [`server`]: the connection loop.
//! - [`connection`]: what one connection shares between its frontend and worker threads.
//! - [`device`]: the `VhostUserBackend` implementation (features, config, ring stops,
//!   event dispatch).
//! - [`completion_event`]: the eventfd through which a worker's io_uring wakes it.
//! - [`worker`]: per-thread scheduler, kicks, completions, notifications.
//! - [`ring`]: popping the avail ring with every ring-level check (faults break a queue).
//! - [`dirty_log`]: marking the guest pages the daemon writes while the VM migrates.
//! - [`inflight`]: the region that lets a restarted daemon resume requests left in flight.
//! - [`guest_fault`]: surviving a frontend that truncates guest memory (SIGBUS recovery).
//! - [`poll_window`]: how long a worker polls after its last work.
//! - [`stats`]: per-export, per-queue request counters and latency histograms.
//! - [`metrics`]: `--metrics`: the statistics in Prometheus's text format over HTTP.

#![deny(
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks,
    clippy::missing_safety_doc
)]
#![warn(missing_docs)]

pub mod activation;
pub mod cli;
pub mod completion_event;
pub mod config_file;
pub mod connection;
pub mod control;
pub mod core_sharing;
pub mod ctl;
pub mod device;
pub mod dirty_log;
pub mod error;
pub mod events;
pub mod export_config;
pub mod exports;
pub mod guest_fault;
pub mod image_lock;
pub mod inflight;
pub mod logging;
pub mod metrics;
pub mod poll_window;
pub mod ring;
pub mod server;
pub mod shutdown;
pub mod socket;
pub mod stats;
pub mod systemd;
pub mod worker;

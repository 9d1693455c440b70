//! The corodev daemon as a library: the `corodev` binary is a thin `main` over it, and the
//! fuzz targets drive [`device::BlkDevice`] through real vhost-user connections.
//!
//! - [`cli`]: options and their validation.
//! - [`socket`]: binding the vhost-user socket (live vs. stale).
//! - [`server`]: the connection loop.
//! - [`device`]: the `VhostUserBackend` implementation (features, config, events).
//! - [`worker`]: per-thread scheduler, kicks, completions, notifications.
//! - [`poll_window`]: how long a worker polls after its last work.

pub mod cli;
pub mod device;
pub mod error;
pub mod poll_window;
pub mod server;
pub mod socket;
pub mod worker;

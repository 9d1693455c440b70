//! corodev's device models and storage backends.
//!
//! - [`config`]: the virtio-blk configuration space and feature bits the device offers.
//! - [`request`]: turning an untrusted descriptor chain into a validated
//!   [`request::Request`] whose data buffers are iovecs pointing straight into guest memory.
//! - [`blk`]: the device model, [`blk::VirtioBlk`]: serves one descriptor chain (parse,
//!   execute on a [`backend::BlockBackend`] or reject, complete) inside its coroutine.
//! - [`backend`]: storage (`file` through io_uring, `null`), as blocking-style calls that
//!   park the calling coroutine.
//! - [`memory`]: [`memory::GuestMap`], a worker's handle on the guest memory map that its
//!   requests clone without touching what other threads share.
//! - [`ratelimit`]: logging that a guest cannot use to flood the host's journal.
//!
//! This crate knows nothing of vhost-user sockets or threads: the daemon hands it
//! descriptor chains and runs [`blk::VirtioBlk::serve`] in a coroutine per request.

#![deny(
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks,
    clippy::missing_safety_doc
)]
#![warn(missing_docs)]

pub mod backend;
pub mod blk;
pub mod config;
pub mod memory;
pub mod ratelimit;
pub mod request;

/// The virtio-blk sector: request offsets are always in 512-byte units, whatever the
/// logical block size.
pub const SECTOR_SIZE: u64 = 512;

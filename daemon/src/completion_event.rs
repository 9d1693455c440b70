//! The completion event: how a worker's io_uring wakes the worker thread.
//!
//! Each worker thread has one eventfd that its io_uring signals when completions are
//! ready. This type owns those eventfds for a connection, knows the epoll data value they
//! are registered under (the first one vhost-user-backend leaves free: `0..num_queues` are
//! the vrings' kicks, `num_queues` is the library's exit event), registers them, and hands
//! each worker the duplicate its ring writes to. Nothing else knows the id.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use vhost_user_backend::VhostUserDaemon;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::device::BlkDevice;
use crate::error::Error;

/// One completion eventfd per worker thread of a connection.
pub struct CompletionEvents {
    fds: Vec<EventFd>,
    /// The epoll data value the fds are registered under, in every worker's epoll.
    id: u16,
}

impl CompletionEvents {
    /// Eventfds for `workers` threads serving `num_queues` vrings.
    pub fn new(workers: usize, num_queues: u16) -> Result<CompletionEvents, Error> {
        let fds = (0..workers)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| Error::Os {
                what: "creating completion eventfds",
                source,
            })?;
        Ok(CompletionEvents {
            fds,
            id: num_queues + 1,
        })
    }

    /// Adds each worker's eventfd to that worker's epoll, before the daemon starts.
    pub fn register(&self, daemon: &VhostUserDaemon<BlkDevice>) -> Result<(), Error> {
        let handlers = daemon.get_epoll_handlers();
        if handlers.len() != self.fds.len() {
            return Err(Error::WorkerCount {
                expected: self.fds.len(),
                got: handlers.len(),
            });
        }
        for (handler, fd) in handlers.iter().zip(&self.fds) {
            handler
                .register_listener(fd.as_raw_fd(), EventSet::IN, u64::from(self.id))
                .map_err(|source| Error::Os {
                    what: "registering a completion eventfd",
                    source,
                })?;
        }
        Ok(())
    }

    /// Whether an event the library dispatched is a completion event rather than a kick.
    pub fn is_completion(&self, device_event: u16) -> bool {
        device_event == self.id
    }

    /// Wakes worker `worker` as if completions had arrived: its next pass through epoll
    /// returns at once (to see a shutdown, or other events, while its queues stay busy).
    pub fn wake(&self, worker: usize) {
        if let Some(fd) = self.fds.get(worker) {
            if let Err(e) = fd.write(1) {
                log::error!("cannot wake worker {worker}: {e}");
            }
        }
    }

    /// Consumes a pending wake-up of worker `worker` without running its ring (when the
    /// worker has no ring any more).
    pub fn clear(&self, worker: usize) {
        if let Some(fd) = self.fds.get(worker) {
            let _ = fd.read(); // EAGAIN: nothing was pending
        }
    }

    /// A duplicate of worker `worker`'s eventfd, for its io_uring to signal.
    pub fn ring_fd(&self, worker: usize) -> io::Result<OwnedFd> {
        let fd = self.fds.get(worker).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no completion eventfd for worker {worker}"),
            )
        })?;
        let dup = fd.try_clone()?.into_raw_fd();
        // SAFETY: `into_raw_fd` gave up the duplicate's only owner, so we own it alone.
        Ok(unsafe { OwnedFd::from_raw_fd(dup) })
    }
}

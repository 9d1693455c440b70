//! Running one request inside its coroutine: parse, validate, do the I/O (parking while it
//! is in flight), write the status. Plain sequential code; the coroutine makes it
//! non-blocking for the worker thread.

use std::ops::Deref;
use std::sync::Arc;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use crate::backend::{BlockBackend, GuestBuffers};
use crate::config::DeviceConfig;
use crate::ratelimit::RateLimitedLog;
use crate::request::{Op, Request, S_IOERR, S_OK};

/// Serves one descriptor chain end to end. Returns the used element `(head, len)`.
/// Must run inside a `coro` task (backends park on I/O).
pub fn serve<M>(
    chain: DescriptorChain<M>,
    mem: Arc<GuestMemoryMmap>,
    config: &DeviceConfig,
    disk: &dyn BlockBackend,
    log: &RateLimitedLog,
) -> (u16, u32)
where
    M: Deref<Target = GuestMemoryMmap>,
{
    match Request::parse(chain, mem, config) {
        Ok(req) => {
            let head = req.completion.head();
            let (status, written) = match run(&req, config, disk) {
                Ok(written) => (S_OK, written),
                Err(e) => {
                    log.warn(format_args!("request {head}: {:?} failed: {e}", req.op));
                    (S_IOERR, 0)
                }
            };
            req.completion.complete(status, written)
        }
        Err(rejected) => {
            log.warn(format_args!(
                "request {}: rejected: {}",
                rejected.completion.head(),
                rejected.error
            ));
            let status = rejected.error.status();
            rejected.completion.complete(status, 0)
        }
    }
}

/// Executes a validated request; returns the data bytes written to the guest.
fn run(req: &Request, config: &DeviceConfig, disk: &dyn BlockBackend) -> std::io::Result<u64> {
    // SAFETY: the iovecs were built by `Request::parse` from ranges checked against the
    // guest memory map, which `req.completion` keeps mapped for as long as `req` lives.
    let bufs = unsafe { GuestBuffers::new(&req.data) };
    match &req.op {
        Op::Read { offset } => {
            disk.read(&bufs, *offset)?;
            Ok(bufs.len())
        }
        Op::Write { offset } => {
            disk.write(&bufs, *offset)?;
            if !config.writeback() {
                // Writethrough: the guest turned the write cache off (virtio 5.2.6.1).
                disk.flush()?;
            }
            Ok(0)
        }
        Op::Flush => disk.flush().map(|()| 0),
        Op::GetId => {
            // Up to 20 bytes, not NUL-terminated when exactly 20; a shorter buffer gets
            // what fits.
            Ok(bufs.copy_from(config.serial()) as u64)
        }
        Op::Discard(segs) => {
            for s in segs {
                disk.discard(s.offset, s.len)?;
            }
            Ok(0)
        }
        Op::WriteZeroes(segs) => {
            for s in segs {
                disk.write_zeroes(s.offset, s.len, s.unmap)?;
            }
            Ok(0)
        }
    }
}

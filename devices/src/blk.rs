//! The virtio-blk request executor: runs one validated [`Request`] against a
//! [`BlockBackend`] inside its coroutine, then completes it.
//!
//! Plain sequential code: the backend calls park the coroutine while their I/O is in
//! flight, so the worker thread serves other requests meanwhile. Whatever happens, the
//! request ends in exactly one [`Request::complete`] (the one place a status byte is
//! written), and a backend error fails only this request, with IOERR.
//!
//! [`serve`] is the whole life of a descriptor chain (parse, execute or reject, complete)
//! for the daemon's request coroutine.

use std::io;
use std::ops::Deref;
use std::sync::Arc;

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryMmap;

use crate::backend::BlockBackend;
use crate::config::DeviceConfig;
use crate::ratelimit::RateLimitedLog;
use crate::request::{Op, Request, S_IOERR, S_OK};

/// Executes `request` on `backend` and completes it: writes the status byte and returns
/// the used element `(head, used_len)`. With `writeback` false (the guest chose
/// writethrough, or cannot flush) a write or write-zeroes is followed by a flush before it
/// completes (virtio 1.2, 5.2.6.1). Must run inside a coroutine if the backend parks.
pub fn execute<B: Bitmap + 'static>(
    request: Request<B>,
    backend: &dyn BlockBackend,
    writeback: bool,
) -> (u16, u32) {
    match run(&request, backend, writeback) {
        Ok(written) => request.complete(S_OK, written),
        Err(e) => {
            crate::warn_ratelimited!(
                "request {} ({} at sector {}): {e}",
                request.head(),
                request.request_type(),
                request.sector()
            );
            request.complete(S_IOERR, 0)
        }
    }
}

/// Serves one descriptor chain end to end: parses it against `mem` and `config`,
/// executes it on `disk` (or rejects it, logging why through `log`), completes it.
/// Returns the used element `(head, used_len)`. Must run inside a coroutine.
pub fn serve<M, B>(
    chain: DescriptorChain<M>,
    mem: Arc<GuestMemoryMmap<B>>,
    config: &DeviceConfig,
    disk: &dyn BlockBackend,
    log: &RateLimitedLog,
) -> (u16, u32)
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
    B: Bitmap + 'static,
{
    match Request::parse(chain, mem, config) {
        Ok(request) => execute(request, disk, config.writeback()),
        Err(rejected) => {
            log.warn(format_args!(
                "request {}: rejected: {}{}",
                rejected.head(),
                rejected.error(),
                if rejected.status_addr().is_some() {
                    ""
                } else {
                    " (no status byte; completed with nothing written)"
                }
            ));
            rejected.complete()
        }
    }
}

/// Does the I/O; returns the bytes written to the guest's data buffers.
fn run<B: Bitmap + 'static>(
    request: &Request<B>,
    disk: &dyn BlockBackend,
    writeback: bool,
) -> io::Result<u64> {
    let bufs = request.buffers();
    match request.op() {
        Op::Read { offset } => {
            disk.read_vectored(&bufs, *offset)?;
            Ok(bufs.len())
        }
        Op::Write { offset } => {
            disk.write_vectored(&bufs, *offset)?;
            if !writeback {
                disk.flush()?;
            }
            Ok(0)
        }
        Op::Flush => disk.flush().map(|()| 0),
        // Up to 20 bytes, zero-padded, so NUL-terminated unless the serial is exactly 20
        // bytes; a shorter buffer gets what fits.
        Op::GetId(id) => Ok(bufs.copy_from(id) as u64),
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
            if !writeback {
                disk.flush()?;
            }
            Ok(0)
        }
    }
}

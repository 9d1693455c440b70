//! The virtio-blk device model: one [`VirtioBlk`] per export owns what a request needs
//! (the config space, the disk, the log for guest-caused trouble) and serves one
//! descriptor chain at a time inside the chain's coroutine.
//!
//! Plain sequential code: the backend calls park the coroutine while their I/O is in
//! flight, so the worker thread serves other requests meanwhile. Whatever happens, the
//! request ends in exactly one completion (the one place a status byte is written), and a
//! backend error fails only this request, with IOERR.

use std::io;
use std::ops::Deref;
use std::sync::Arc;

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;

use crate::backend::BlockBackend;
use crate::config::DeviceConfig;
use crate::memory::GuestMap;
use crate::ratelimit::RateLimitedLog;
use crate::request::{Op, Rejected, Request, RequestType, Used, WriteLog, S_IOERR, S_OK};

/// What serving one chain did: the used element to publish, and what the guest asked for
/// and got, for the caller's statistics. Returned by value (no allocation), so a caller
/// that keeps no statistics pays nothing for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// The used element to publish.
    pub used: Used,
    /// The request's type as its header said; `None` when the chain was refused before
    /// its header could be read (no status byte, a header cut short).
    pub kind: Option<RequestType>,
    /// Data bytes moved between the disk and the guest's buffers: read into them or
    /// written from them; 0 for the other types and for every failure.
    pub bytes: u64,
    /// The status written: `S_OK`, `S_IOERR` or `S_UNSUPP` (also when the chain had no
    /// status byte to write it to).
    pub status: u8,
    /// Refused by validation (a malformed or unsupported request), not executed.
    pub rejected: bool,
}

/// A virtio-blk device: its config space, its storage, and the one rate-limited log
/// through which every guest-triggerable message goes (a guest that makes every request
/// fail must not flood the journal, whichever way its requests fail).
pub struct VirtioBlk {
    config: DeviceConfig,
    disk: Arc<dyn BlockBackend>,
    log: RateLimitedLog,
    /// Where the guest memory the device writes is recorded while the VM migrates.
    writes: Option<Arc<dyn WriteLog>>,
}

impl VirtioBlk {
    /// A device exporting `disk` as described by `config`.
    pub fn new(config: DeviceConfig, disk: Arc<dyn BlockBackend>) -> VirtioBlk {
        VirtioBlk {
            config,
            disk,
            log: RateLimitedLog::default(),
            writes: None,
        }
    }

    /// Records the guest memory every request writes (data, status byte) in `writes`
    /// while it logs: live migration's dirty log.
    pub fn with_write_log(mut self, writes: Arc<dyn WriteLog>) -> VirtioBlk {
        self.writes = Some(writes);
        self
    }

    /// The config space and negotiated state.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// The storage.
    pub fn disk(&self) -> &Arc<dyn BlockBackend> {
        &self.disk
    }

    /// The log for anything a guest can trigger (rejected requests, I/O errors, ring
    /// faults found by the caller): rate-limited, shared by every queue of the device.
    pub fn log(&self) -> &RateLimitedLog {
        &self.log
    }

    /// Serves one descriptor chain end to end: parses it against `mem`, executes it (or
    /// rejects it, logging why), completes it. Must run inside a coroutine: the backend
    /// parks it while I/O is in flight.
    pub fn serve<M, B>(&self, chain: DescriptorChain<M>, mem: GuestMap<B>) -> Served
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
        B: Bitmap + 'static,
    {
        match Request::parse(chain, mem, &self.config) {
            Ok(request) => self.execute(request),
            Err(rejected) => self.reject(*rejected),
        }
    }

    /// Executes a parsed `request` and completes it. Unless the guest chose writeback (and
    /// negotiated FLUSH), a write or write-zeroes is flushed before it completes (virtio
    /// 1.2, 5.2.6.1).
    pub fn execute<B: Bitmap + 'static>(&self, request: Request<B>) -> Served {
        let kind = Some(request.request_type());
        match self.run(&request) {
            Ok(written) => {
                let bytes = match request.op() {
                    Op::Read { .. } | Op::Write { .. } => request.data_len(),
                    _ => 0,
                };
                Served {
                    used: request.complete(S_OK, written, self.writes.as_deref()),
                    kind,
                    bytes,
                    status: S_OK,
                    rejected: false,
                }
            }
            Err(e) => {
                self.log.warn(format_args!(
                    "request {} ({} at sector {}): {e}",
                    request.head(),
                    request.request_type(),
                    request.sector()
                ));
                Served {
                    used: request.complete(S_IOERR, 0, self.writes.as_deref()),
                    kind,
                    bytes: 0,
                    status: S_IOERR,
                    rejected: false,
                }
            }
        }
    }

    /// Answers a chain with IOERR without executing it, for a caller that cannot run it
    /// (no coroutine could be started): the guest must read a failure, never a stale status
    /// byte as success. Parsing does no I/O, so this may run outside a coroutine.
    pub fn refuse<M, B>(&self, chain: DescriptorChain<M>, mem: GuestMap<B>) -> Served
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
        B: Bitmap + 'static,
    {
        match Request::parse(chain, mem, &self.config) {
            Ok(request) => Served {
                kind: Some(request.request_type()),
                used: request.complete(S_IOERR, 0, self.writes.as_deref()),
                bytes: 0,
                status: S_IOERR,
                rejected: false,
            },
            Err(rejected) => self.reject(*rejected),
        }
    }

    /// Answers a request that failed validation with its error's status.
    fn reject<B: Bitmap + 'static>(&self, rejected: Rejected<B>) -> Served {
        self.log.warn(format_args!(
            "request {}: rejected: {}{}",
            rejected.head(),
            rejected.error(),
            if rejected.status_addr().is_some() {
                ""
            } else {
                " (no status byte; completed with nothing written)"
            }
        ));
        let (kind, status) = (rejected.kind(), rejected.error().status());
        Served {
            used: rejected.complete(self.writes.as_deref()),
            kind,
            bytes: 0,
            status,
            rejected: true,
        }
    }

    /// Does the I/O; returns the bytes written to the guest's data buffers.
    fn run<B: Bitmap + 'static>(&self, request: &Request<B>) -> io::Result<u64> {
        let disk = &*self.disk;
        let writeback = self.config.writeback();
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
            // Up to 20 bytes, zero-padded, so NUL-terminated unless the serial is exactly
            // 20 bytes; a shorter buffer gets what fits.
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
}

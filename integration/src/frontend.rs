//! A test-side vhost-user frontend: a real client over the socket, guest memory in a memfd
//! shared with the backend, and split virtqueues built by hand so that tests can place any
//! descriptor, well-formed or hostile, exactly where they want it.
//!
//! The protocol handshake uses the `vhost` crate's frontend (an independent implementation
//! from the backend library the daemon uses); [`raw_message`] sends arbitrary bytes for
//! malformed-message tests.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

// The virtio-blk wire format, shared with corodev-devices' tests; re-exported so a test's
// `use integration::frontend::*` has everything it needs to build requests.
pub use corodev_testkit::{
    header, segment, segments, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_WRITE_ZEROES, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};

const F_VERSION_1: u64 = 1 << 32;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_SEG_MAX: u64 = 1 << 2;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const F_CONFIG_WCE: u64 = 1 << 11;

/// The name of every test frontend's guest-memory memfd: a backend that maps the memory
/// shows it in `/proc/PID/maps` (as `/memfd:corodev-test-guest (deleted)`).
pub const GUEST_MEMFD_NAME: &str = "corodev-test-guest";

/// Guest physical memory: one memfd mapped at GPA 0 here and in the backend.
pub struct GuestMem {
    file: File,
    ptr: *mut u8,
    size: usize,
}

// SAFETY: a GuestMem owns its mapping (unmapped only by its drop) and no other value of
// this process points into it, so the owner may move to another thread (a load generator).
// It is not Sync: its accessors copy bytes without synchronisation.
unsafe impl Send for GuestMem {}

impl GuestMem {
    /// Shrinks the file behind guest memory to `len` bytes, as a hostile frontend could
    /// at any time. Pages past `len` then raise SIGBUS on access, here too: afterwards the
    /// test must touch only memory below `len`.
    pub fn truncate(&self, len: u64) {
        self.file
            .set_len(len)
            .expect("truncate the guest memory file");
    }

    /// `size` bytes of zeroed, shared guest memory.
    pub fn new(size: usize) -> GuestMem {
        let name = std::ffi::CString::new(GUEST_MEMFD_NAME).expect("no NUL in the name");
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).expect("size guest memory");
        // SAFETY: mapping `size` bytes of our own memfd, shared so the backend sees writes.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap guest memory");
        GuestMem {
            file,
            ptr: ptr.cast(),
            size,
        }
    }

    fn check(&self, gpa: u64, len: usize) -> usize {
        let start = usize::try_from(gpa).expect("gpa fits usize");
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.size),
            "test bug: access {gpa:#x}+{len} outside guest memory"
        );
        start
    }

    /// Writes `data` at guest address `gpa`; panics (a test bug) outside the memory.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let start = self.check(gpa, data.len());
        // SAFETY: bounds checked above; the mapping lives as long as `self`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(start), data.len()) };
    }

    /// `len` bytes at guest address `gpa`; panics (a test bug) outside the memory.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let start = self.check(gpa, len);
        let mut out = vec![0u8; len];
        // SAFETY: bounds checked above; the mapping lives as long as `self`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(start), out.as_mut_ptr(), len) };
        out
    }

    /// A little-endian `u16` at `gpa` (ring indices and entries).
    pub fn write_u16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }

    /// The little-endian `u16` at `gpa`.
    pub fn read_u16(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// The little-endian `u32` at `gpa`.
    pub fn read_u32(&self, gpa: u64) -> u32 {
        let b = self.read(gpa, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Bytes of guest memory.
    pub fn size(&self) -> u64 {
        self.size as u64
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

/// A descriptor as the driver writes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Buffer length in bytes.
    pub len: u32,
    /// `VIRTQ_DESC_F_*` bits.
    pub flags: u16,
    /// Next descriptor's index, when `flags` has `VIRTQ_DESC_F_NEXT`.
    pub next: u16,
}

impl Desc {
    /// A descriptor from its four fields, in table order.
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
        Desc {
            addr,
            len,
            flags,
            next,
        }
    }

    /// `struct virtq_desc` as it sits in a descriptor table.
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// A used-ring element: which chain the backend completed and how many bytes it wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// The head descriptor index of the completed chain.
    pub id: u32,
    /// Bytes the backend wrote into the chain's device-writable buffers.
    pub len: u32,
}

/// One region of a memory table for [`send_mem_table`], backed by one shared memfd.
#[derive(Clone, Copy, Debug)]
pub struct MemRegion {
    /// Guest physical address where the region starts.
    pub gpa: u64,
    /// Bytes in the region.
    pub size: u64,
    /// Offset of the region in the memfd.
    pub offset: u64,
}

/// One split virtqueue laid out in guest memory.
pub struct Queue {
    /// Entries in the rings.
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the avail (driver) ring.
    pub avail: u64,
    /// Guest address of the used (device) ring.
    pub used: u64,
    /// Eventfd the frontend writes to kick the backend.
    pub kick: EventFd,
    /// Eventfd the backend signals completions on.
    pub call: EventFd,
    /// Eventfd the backend signals when it finds the ring broken (SET_VRING_ERR).
    pub err: EventFd,
    /// The avail index published so far.
    pub avail_idx: u16,
    /// Used elements consumed so far.
    pub used_seen: u16,
}

/// Fixed guest memory layout: rings at 64 KiB steps from 0, data from 1 MiB.
pub const DATA_BASE: u64 = 1 << 20;
/// Bytes of guest memory a [`TestFrontend`] maps.
pub const MEM_SIZE: usize = 16 << 20;
/// Where [`TestFrontend::put_flush`] puts its requests' headers and status bytes: a 64 KiB
/// block per queue of 32-byte slots, clear of the data buffers tests use from [`DATA_BASE`].
pub const REQ_AREA: u64 = 12 << 20;

/// A connected frontend with its queues started.
pub struct TestFrontend {
    /// The vhost-user connection.
    pub fe: Frontend,
    /// Guest memory, shared with the backend.
    pub mem: GuestMem,
    /// The started queues, by index.
    pub queues: Vec<Queue>,
    /// The virtio features negotiated.
    pub features: u64,
    /// The inflight region the backend allocated, kept across backend restarts.
    pub inflight: Option<(VhostUserInflight, File)>,
}

impl TestFrontend {
    /// Connects and brings up `nq` queues of `qsize` entries.
    pub fn connect(sock: &Path, nq: usize, qsize: u16) -> io::Result<TestFrontend> {
        TestFrontend::connect_with(sock, nq, qsize, false, MEM_SIZE)
    }

    /// Like [`connect`](Self::connect) with `mem_size` bytes of guest memory instead of
    /// [`MEM_SIZE`], for loads that keep many large buffers in flight at once.
    pub fn connect_mem(
        sock: &Path,
        nq: usize,
        qsize: u16,
        mem_size: usize,
    ) -> io::Result<TestFrontend> {
        TestFrontend::connect_with(sock, nq, qsize, false, mem_size)
    }

    /// Like [`connect`](Self::connect), and also asks the backend for an inflight region
    /// (GET_INFLIGHT_FD) and hands it back (SET_INFLIGHT_FD), as QEMU's vhost-user-blk
    /// does, so that [`reconnect`](Self::reconnect) can give it to a restarted backend.
    pub fn connect_tracked(sock: &Path, nq: usize, qsize: u16) -> io::Result<TestFrontend> {
        TestFrontend::connect_with(sock, nq, qsize, true, MEM_SIZE)
    }

    /// Like [`connect`](Self::connect), with `VHOST_USER_PROTOCOL_F_LOG_SHMFD` negotiated
    /// (every message answered), so the test can hand over a dirty log (SET_LOG_BASE) and
    /// switch logging on and off with `VHOST_F_LOG_ALL`, as QEMU does when it migrates.
    pub fn connect_logged(sock: &Path, nq: usize, qsize: u16) -> io::Result<TestFrontend> {
        let mut fe = TestFrontend::connect_with(sock, nq, qsize, false, MEM_SIZE)?;
        let pf = fe.fe.get_protocol_features().map_err(err)?;
        assert!(
            pf.contains(VhostUserProtocolFeatures::LOG_SHMFD),
            "the backend does not offer dirty-page logging (offered {pf:?})"
        );
        fe.fe
            .set_protocol_features(pf & (VhostUserProtocolFeatures::LOG_SHMFD | BASE_PROTOCOL))
            .map_err(err)?;
        fe.fe
            .set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        Ok(fe)
    }

    /// Switches the backend's dirty-page logging (`VHOST_F_LOG_ALL`) on or off.
    pub fn set_logging(&mut self, on: bool) -> Result<(), vhost::Error> {
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        self.features = if on {
            self.features | log_all
        } else {
            self.features & !log_all
        };
        self.fe.set_features(self.features)
    }

    fn connect_with(
        sock: &Path,
        nq: usize,
        qsize: u16,
        track: bool,
        mem_size: usize,
    ) -> io::Result<TestFrontend> {
        let stream = UnixStream::connect(sock)?;
        let mut fe = Frontend::from_stream(stream, nq as u64);
        let mem = GuestMem::new(mem_size);
        let features = handshake(&mut fe, &mem, track).map_err(err)?;
        let inflight = if track {
            let ask = VhostUserInflight::new(0, 0, nq as u16, qsize);
            let (desc, file) = fe.get_inflight_fd(&ask).map_err(err)?;
            fe.set_inflight_fd(&desc, file.as_raw_fd()).map_err(err)?;
            Some((desc, file))
        } else {
            None
        };
        let mut queues = Vec::new();
        for q in 0..nq {
            let base = (q as u64) << 16;
            let n = u64::from(qsize);
            let desc = base;
            let avail = desc + 16 * n;
            let used = (avail + 6 + 2 * n + 3) & !3;
            assert!(
                used + 6 + 8 * n < (q as u64 + 1) << 16,
                "queue fits its 64K slot"
            );
            let queue = Queue {
                size: qsize,
                desc,
                avail,
                used,
                kick: EventFd::new(libc::EFD_NONBLOCK)?,
                call: EventFd::new(libc::EFD_NONBLOCK)?,
                err: EventFd::new(libc::EFD_NONBLOCK)?,
                avail_idx: 0,
                used_seen: 0,
            };
            start_queue(&mut fe, &mem, q, &queue, 0).map_err(err)?;
            queues.push(queue);
        }
        Ok(TestFrontend {
            fe,
            mem,
            queues,
            features,
            inflight,
        })
    }

    /// Connects to a backend started on `sock` after the previous one died, as QEMU does
    /// with `reconnect=`: the same guest memory and rings, untouched; the inflight region
    /// (if any) handed over with SET_INFLIGHT_FD; each ring restarted at the used index in
    /// guest memory (what QEMU sets when it could not ask the dead backend for its base).
    pub fn reconnect(&mut self, sock: &Path) -> io::Result<()> {
        let stream = UnixStream::connect(sock)?;
        self.fe = Frontend::from_stream(stream, self.queues.len() as u64);
        let track = self.inflight.is_some();
        self.features = handshake(&mut self.fe, &self.mem, track).map_err(err)?;
        if let Some((desc, file)) = &self.inflight {
            self.fe
                .set_inflight_fd(desc, file.as_raw_fd())
                .map_err(err)?;
        }
        for (q, queue) in self.queues.iter().enumerate() {
            let base = self.mem.read_u16(queue.used + 2);
            start_queue(&mut self.fe, &self.mem, q, queue, base).map_err(err)?;
        }
        Ok(())
    }

    /// Replaces the memory table with one region of `size` bytes at GPA 0 (at most the
    /// file's size), as a frontend resizing or re-sending its table does.
    pub fn set_memory_size(&mut self, size: u64) -> Result<(), vhost::Error> {
        self.fe
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: size,
                userspace_addr: self.mem.ptr as u64,
                mmap_offset: 0,
                mmap_handle: self.mem.file.as_raw_fd(),
            }])
            .map(drop)
    }

    /// Replaces the memory table with guest memory at GPA 0 plus a second mapping of the
    /// same file at `alias`, so that guest addresses from `alias` on name the same bytes as
    /// those from 0 (the rings included): a hostile but well-formed table.
    pub fn alias_memory(&mut self, alias: u64) -> Result<(), vhost::Error> {
        let region = |gpa, va| VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: self.mem.size(),
            userspace_addr: va,
            mmap_offset: 0,
            mmap_handle: self.mem.file.as_raw_fd(),
        };
        let va = self.mem.ptr as u64;
        self.fe
            .set_mem_table(&[region(0, va), region(alias, va + self.mem.size())])
            .map(drop)
    }

    /// Stops queue `q` (GET_VRING_BASE, which the backend answers only once none of the
    /// ring's requests is in flight) and returns the base it reported.
    pub fn stop_queue(&mut self, q: usize) -> Result<u32, vhost::Error> {
        self.fe.get_vring_base(q)
    }

    /// A second handle on the vhost-user connection's socket (a duplicate descriptor):
    /// shutting it down ends the connection and nothing else, so guest memory, rings and
    /// eventfds stay and a guest can go on publishing and kicking, as when QEMU loses its
    /// socket to the backend while the VM runs. Usable from another thread than the one
    /// driving the queues.
    pub fn socket(&self) -> io::Result<UnixStream> {
        // SAFETY: the descriptor is `fe`'s socket, open for as long as `self` is borrowed
        // here; it is only duplicated.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fe.as_raw_fd()) };
        Ok(UnixStream::from(fd.try_clone_to_owned()?))
    }

    /// Sets queue `q` up afresh, as a driver resetting the device does: stops it, clears
    /// its rings, and starts it again at index 0.
    pub fn restart_queue(&mut self, q: usize) -> Result<(), vhost::Error> {
        self.stop_queue(q)?;
        let queue = &mut self.queues[q];
        let n = u64::from(queue.size);
        self.mem.write(queue.desc, &vec![0; (16 * n) as usize]);
        self.mem.write(queue.avail, &vec![0; (6 + 2 * n) as usize]);
        self.mem.write(queue.used, &vec![0; (6 + 8 * n) as usize]);
        queue.avail_idx = 0;
        queue.used_seen = 0;
        let _ = queue.err.read();
        start_queue(&mut self.fe, &self.mem, q, queue, 0)
    }

    /// Whether the backend signalled queue `q`'s error eventfd within `timeout` (consumes
    /// the signal).
    pub fn error_signalled(&self, q: usize, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.queues[q].err.read().is_ok() {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Writes descriptors at the given table slots.
    pub fn put_descs(&self, q: usize, descs: &[(u16, Desc)]) {
        let queue = &self.queues[q];
        for (slot, d) in descs {
            self.mem
                .write(queue.desc + 16 * u64::from(*slot), &d.bytes());
        }
    }

    /// Writes `descs` at table slots 0, 1, ... (their `next` fields as given).
    pub fn put_chain(&self, q: usize, descs: &[Desc]) {
        let slots: Vec<(u16, Desc)> = descs
            .iter()
            .copied()
            .enumerate()
            .map(|(i, d)| (i as u16, d))
            .collect();
        self.put_descs(q, &slots);
    }

    /// Publishes `head` in the avail ring and kicks.
    pub fn publish(&mut self, q: usize, head: u16) {
        self.publish_heads(q, &[head]);
    }

    /// Publishes several heads with one avail index update and one kick, so the backend
    /// sees them in one pass (for the "same head twice" hostile case).
    pub fn publish_heads(&mut self, q: usize, heads: &[u16]) {
        let queue = &mut self.queues[q];
        for &head in heads {
            let slot = u64::from(queue.avail_idx % queue.size);
            self.mem.write_u16(queue.avail + 4 + 2 * slot, head);
            queue.avail_idx = queue.avail_idx.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem.write_u16(queue.avail + 2, queue.avail_idx);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        queue.kick.write(1).expect("kick");
    }

    /// Sets the avail index to any value (for the "index jumps" hostile case) and kicks.
    pub fn publish_raw_idx(&mut self, q: usize, idx: u16) {
        let queue = &mut self.queues[q];
        self.mem.write_u16(queue.avail + 2, idx);
        queue.kick.write(1).expect("kick");
    }

    /// Waits for the next used element, or None on timeout.
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Option<Used> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let queue = &mut self.queues[q];
            let used_idx = self.mem.read_u16(queue.used + 2);
            if used_idx != queue.used_seen {
                let slot = u64::from(queue.used_seen % queue.size);
                let id = self.mem.read_u32(queue.used + 4 + 8 * slot);
                let len = self.mem.read_u32(queue.used + 8 + 8 * slot);
                queue.used_seen = queue.used_seen.wrapping_add(1);
                return Some(Used { id, len });
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: queue.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as i32) };
            let _ = queue.call.read();
        }
    }

    /// Builds a well-formed request in slots 0.. of the table: header, data buffers,
    /// status, and returns the status GPA. `data` are (gpa, len) pairs.
    pub fn request(&mut self, q: usize, kind: u32, sector: u64, data: &[(u64, u32)]) -> u64 {
        let hdr = DATA_BASE - 4096;
        let status = DATA_BASE - 16;
        self.mem.write(hdr, &header(kind, 0, sector));
        self.mem.write(status, &[0xff]);
        let data_flags = if kind == T_IN || kind == T_GET_ID {
            VIRTQ_DESC_F_WRITE
        } else {
            0
        };
        let mut descs = vec![Desc {
            addr: hdr,
            len: 16,
            flags: VIRTQ_DESC_F_NEXT,
            next: 1,
        }];
        for (i, (addr, len)) in data.iter().enumerate() {
            descs.push(Desc {
                addr: *addr,
                len: *len,
                flags: data_flags | VIRTQ_DESC_F_NEXT,
                next: i as u16 + 2,
            });
        }
        descs.push(Desc {
            addr: status,
            len: 1,
            flags: VIRTQ_DESC_F_WRITE,
            next: 0,
        });
        self.put_chain(q, &descs);
        self.publish(q, 0);
        status
    }

    /// Runs a well-formed request and returns its status byte (0xff if none was written).
    /// Panics unless its used element names its head (0) and a length that fits the
    /// outcome: exactly data + status for a successful read (what fits of the 20-byte
    /// serial for GET_ID), only the status byte for anything else that succeeded, and at
    /// least the status byte but no more than data + status for a failure.
    pub fn run(&mut self, q: usize, kind: u32, sector: u64, data: &[(u64, u32)]) -> u8 {
        let status = self.request(q, kind, sector, data);
        let Some(used) = self.wait_used(q, Duration::from_secs(10)) else {
            panic!("request type {kind} got no used element");
        };
        let st = self.mem.read(status, 1)[0];
        assert_eq!(used.id, 0, "the used element names the chain's head");
        let writable: u32 = if kind == T_IN || kind == T_GET_ID {
            data.iter().map(|&(_, len)| len).sum()
        } else {
            0
        };
        match (kind, st) {
            (T_IN, S_OK) => assert_eq!(used.len, writable + 1, "read: data + status"),
            (T_GET_ID, S_OK) => assert_eq!(used.len, writable.min(20) + 1, "serial + status"),
            (_, S_OK) => assert_eq!(used.len, 1, "type {kind}: only the status byte"),
            _ => assert!(
                (1..=writable + 1).contains(&used.len),
                "type {kind} failed with status {st}: used length {} outside 1..={}",
                used.len,
                writable + 1
            ),
        }
        st
    }

    /// Guest address of flush request `n`'s header on queue `q` (its status byte is 16 on).
    fn flush_slot(q: usize, n: u16) -> u64 {
        assert!(
            q < 16 && n < 2048,
            "test bug: flush {n} of queue {q} outside REQ_AREA"
        );
        REQ_AREA + ((q as u64) << 16) + 32 * u64::from(n)
    }

    /// Builds flush request `n` of queue `q` in descriptor slots 2n (header) and 2n+1
    /// (status), with a header and status byte of its own (0xff, a canary, until the
    /// backend answers); returns its head, 2n. Not published. Unlike
    /// [`request`](Self::request)'s, which all use slot 0, any number of these can be in
    /// flight at once.
    pub fn put_flush(&self, q: usize, n: u16) -> u16 {
        let head = 2 * n;
        assert!(
            head + 1 < self.queues[q].size,
            "test bug: flush {n} needs slots {head}..={} of a {}-entry queue",
            head + 1,
            self.queues[q].size
        );
        let hdr = Self::flush_slot(q, n);
        self.mem.write(hdr, &header(T_FLUSH, 0, 0));
        self.mem.write(hdr + 16, &[0xff]);
        self.put_descs(
            q,
            &[
                (
                    head,
                    Desc {
                        addr: hdr,
                        len: 16,
                        flags: VIRTQ_DESC_F_NEXT,
                        next: head + 1,
                    },
                ),
                (
                    head + 1,
                    Desc {
                        addr: hdr + 16,
                        len: 1,
                        flags: VIRTQ_DESC_F_WRITE,
                        next: 0,
                    },
                ),
            ],
        );
        head
    }

    /// The status byte of [`put_flush`](Self::put_flush) request `n` of queue `q` (0xff
    /// until the backend writes it).
    pub fn flush_status(&self, q: usize, n: u16) -> u8 {
        self.mem.read(Self::flush_slot(q, n) + 16, 1)[0]
    }

    /// Queue `q`'s used index as the backend last published it.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_u16(self.queues[q].used + 2)
    }

    /// Writes `data` at `sector` and reads it back; true if it round-trips.
    pub fn verified_io(&mut self, q: usize, sector: u64, data: &[u8]) -> bool {
        let len = data.len() as u32;
        self.mem.write(DATA_BASE, data);
        if self.run(q, T_OUT, sector, &[(DATA_BASE, len)]) != S_OK {
            return false;
        }
        self.mem
            .write(DATA_BASE + (4 << 20), &vec![0u8; data.len()]);
        if self.run(q, T_IN, sector, &[(DATA_BASE + (4 << 20), len)]) != S_OK {
            return false;
        }
        self.mem.read(DATA_BASE + (4 << 20), data.len()) == data
    }
}

/// A fresh connection that has negotiated VERSION_1 and REPLY_ACK and asks for a reply to
/// every message, so that the backend NACKs (rather than silently drops) what it refuses:
/// for tests that send one message at a time and look at the backend's verdict.
pub struct AckedSession {
    /// The vhost-user connection.
    pub fe: Frontend,
    /// Guest memory a memory table can point into.
    pub mem: GuestMem,
    /// A second handle on the connection's socket, to see the backend hang up
    /// ([`AckedSession::hangup`]).
    stream: UnixStream,
}

impl AckedSession {
    /// Connects and negotiates; panics if any step fails, since every test that uses a
    /// session needs this much to work before it can test anything.
    pub fn connect(sock: &Path) -> AckedSession {
        let stream = UnixStream::connect(sock).expect("connect");
        // A backend that never answers must fail the test, not hang it.
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let mut fe = Frontend::from_stream(stream.try_clone().expect("clone the socket"), 1);
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        fe.set_features(
            offered & (F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()),
        )
        .expect("SET_FEATURES");
        let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        assert!(
            pf.contains(VhostUserProtocolFeatures::REPLY_ACK),
            "the backend must offer REPLY_ACK: {pf:?}"
        );
        fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
            .expect("SET_PROTOCOL_FEATURES");
        fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        AckedSession {
            fe,
            mem: GuestMem::new(MEM_SIZE),
            stream,
        }
    }

    /// Sends a memory table of `regions` (all in [`AckedSession::mem`]'s memfd); returns
    /// the backend's verdict: `Err(VhostUserProtocol(BackendInternalError))` is a NACK.
    pub fn set_mem_table(&mut self, regions: &[MemRegion]) -> Result<(), vhost::Error> {
        let infos: Vec<VhostUserMemoryRegionInfo> = regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: self.mem.ptr as u64 + r.offset,
                mmap_offset: r.offset,
                mmap_handle: self.mem.file.as_raw_fd(),
            })
            .collect();
        self.fe.set_mem_table(&infos).map(drop)
    }

    /// The frontend address of guest address `gpa` when the memory table maps all of
    /// [`AckedSession::mem`] at GPA 0 (what ring addresses travel as).
    pub fn va(&self, gpa: u64) -> u64 {
        self.mem.ptr as u64 + gpa
    }

    /// How the backend's end of the connection reads now: `Ok(())` once it hung up (EOF,
    /// or ECONNRESET when it closed with our bytes unread), the read's error if it stayed
    /// silent for the 5 s read timeout, and `InvalidData` if it sent anything more.
    pub fn hangup(&self) -> io::Result<()> {
        let mut buf = [0u8; 64];
        match (&self.stream).read(&mut buf) {
            Ok(0) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the backend sent {n} more bytes instead of hanging up"),
            )),
            Err(e) => Err(e),
        }
    }
}

/// Negotiates features on a fresh connection ([`AckedSession`]) and sends a memory table
/// of `regions`; returns the backend's verdict on the table. When the table is accepted,
/// checks that the backend goes on answering (a GET_FEATURES).
pub fn send_mem_table(sock: &Path, regions: &[MemRegion]) -> Result<(), vhost::Error> {
    let mut s = AckedSession::connect(sock);
    s.set_mem_table(regions)?;
    s.fe.get_features()
        .expect("the backend answers after accepting a table");
    Ok(())
}

/// Writes one raw vhost-user message (the three header fields, then `payload`) to `stream`,
/// for malformed-message tests: `size` need not match the payload. The caller reads the
/// daemon's answer, or its closing the connection, from the same stream.
pub fn raw_message(
    stream: &mut UnixStream,
    request: u32,
    flags: u32,
    size: u32,
    payload: &[u8],
) -> io::Result<()> {
    let mut msg = Vec::with_capacity(12 + payload.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&flags.to_le_bytes());
    msg.extend_from_slice(&size.to_le_bytes());
    msg.extend_from_slice(payload);
    stream.write_all(&msg)
}

/// Configures and starts one queue: size, ring addresses, base 0, call, error and kick
/// eventfds, enabled.
fn err(e: vhost::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// The protocol features every test frontend negotiates.
const BASE_PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG
    .union(VhostUserProtocolFeatures::MQ)
    .union(VhostUserProtocolFeatures::REPLY_ACK);

/// Owner, features, protocol features (inflight tracking too with `track`), memory table.
/// Returns the virtio features acked.
fn handshake(fe: &mut Frontend, mem: &GuestMem, track: bool) -> Result<u64, vhost::Error> {
    fe.set_owner()?;
    let offered = fe.get_features()?;
    let wanted = F_VERSION_1
        | F_INDIRECT_DESC
        | F_SEG_MAX
        | F_BLK_SIZE
        | F_FLUSH
        | F_MQ
        | F_DISCARD
        | F_WRITE_ZEROES
        | F_CONFIG_WCE
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    let features = offered & wanted;
    fe.set_features(features)?;
    let pf = fe.get_protocol_features()?;
    let mut want = BASE_PROTOCOL;
    if track {
        assert!(
            pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
            "the backend does not offer inflight I/O tracking (offered {pf:?})"
        );
        want |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    fe.set_protocol_features(pf & want)?;
    if track {
        // Every message answered, so that a refused one (a hostile region) is seen as such.
        fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    }
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: mem.size(),
        userspace_addr: mem.ptr as u64,
        mmap_offset: 0,
        mmap_handle: mem.file.as_raw_fd(),
    }])?;
    Ok(features)
}

/// Sets queue `q` up and starts it at avail position `base`.
fn start_queue(
    fe: &mut Frontend,
    mem: &GuestMem,
    q: usize,
    queue: &Queue,
    base: u16,
) -> Result<(), vhost::Error> {
    fe.set_vring_num(q, queue.size)?;
    // Ring addresses travel as frontend virtual addresses (vhost-user spec, "Vring address
    // description"); the backend maps them through the memory table.
    let va = mem.ptr as u64;
    fe.set_vring_addr(
        q,
        &VringConfigData {
            queue_max_size: queue.size,
            queue_size: queue.size,
            flags: 0,
            desc_table_addr: va + queue.desc,
            used_ring_addr: va + queue.used,
            avail_ring_addr: va + queue.avail,
            log_addr: None,
        },
    )?;
    fe.set_vring_base(q, base)?;
    fe.set_vring_call(q, &queue.call)?;
    fe.set_vring_err(q, &queue.err)?;
    fe.set_vring_kick(q, &queue.kick)?;
    fe.set_vring_enable(q, true)
}

/// Ends a guest workload program with the result line `detail=<why>` (blanks and '='
/// made '_', so it stays one field) and exit status 1: how verify-load and nvme-load
/// report a failure to the guest's init.
pub fn exit_with_detail(why: &str) -> ! {
    let detail: String = why
        .chars()
        .map(|c| if c == ' ' || c == '=' { '_' } else { c })
        .collect();
    println!("detail={detail}");
    std::process::exit(1)
}
/// A deterministic pseudo-random buffer.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

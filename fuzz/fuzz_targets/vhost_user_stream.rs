//! Fuzzes the vhost-user message stream, file descriptors included: one corodev server
//! runs in this process (null backend, its real connection loop); each input becomes a
//! fresh connection's guest memory contents and message stream. Messages can carry
//! descriptors from a fixed pool (a guest-memory memfd and kick, call and error eventfds),
//! so a memory table, ring setup and kicks reach the data path, not only the parser.
//! Whatever the messages say, the server must answer or close, then accept the next
//! connection: a crash, a hang (the next connect times out), an abort or (under ASan) a
//! bad access is a finding.
//!
//! Input layout (see `fuzz/make_seeds.py` for a valid session to start from):
//! - `u16` little-endian `L`, then `L` bytes copied to the start of guest memory;
//! - then messages, each: one byte naming the descriptors to attach (bits 0-1: how many,
//!   0-3; bits 2-3, 4-5, 6-7: pool index of each: 0 memfd, 1 kick, 2 call, 3 error), the
//!   12-byte vhost-user header, and the payload (as many bytes as the header's size field
//!   says, at most what is left). After the last message every pool eventfd is kicked.

#![no_main]

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use corodev::connection::WorkerConfig;
use corodev::server::{serve, ServerConfig, Stop};
use corodev::stats::ExportStats;
use corodev_devices::backend::NullBackend;
use corodev_devices::config::{DeviceConfig, DeviceParams};
use libfuzzer_sys::fuzz_target;

/// Bytes of the guest memory memfd in the pool.
const GUEST_MEM: usize = 1 << 20;

/// Descriptors a message may carry: guest memory, then kick, call and error eventfds.
struct Pool {
    memfd: std::fs::File,
    events: [RawFd; 3],
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        // SAFETY: memfd_create with a valid NUL-terminated name; checked below.
        let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: a fresh descriptor we own.
        let memfd = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        memfd.set_len(GUEST_MEM as u64).expect("size the memfd");
        // SAFETY: eventfd has no preconditions; results are checked.
        let events = [0; 3].map(|_| unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) });
        assert!(events.iter().all(|&e| e >= 0), "eventfd");
        Pool { memfd, events }
    })
}

impl Pool {
    fn fd(&self, index: u8) -> RawFd {
        match index & 3 {
            0 => self.memfd.as_raw_fd(),
            i => self.events[usize::from(i) - 1],
        }
    }
}

/// Sends `bytes` with `fds` attached (SCM_RIGHTS), as a vhost-user frontend does.
fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let mut cmsg = [0u64; 8]; // room for CMSG_SPACE(3 * sizeof(int)), 8-byte aligned
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the call, and the
    // control buffer is large enough for the header plus three descriptors.
    let rc = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let len = std::mem::size_of_val(fds) as u32;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(len) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(len) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
        libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn server() -> &'static PathBuf {
    static SOCKET: OnceLock<PathBuf> = OnceLock::new();
    SOCKET.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let socket = dir.join("fuzz.sock");
        let disk = Arc::new(NullBackend::new(64 << 20, Duration::ZERO));
        let device = DeviceConfig::build(DeviceParams {
            num_queues: 2,
            queue_size: 64,
            serial: b"fuzz".to_vec(),
            ..DeviceParams::for_backend(&*disk)
        })
        .expect("valid device");
        let cfg = ServerConfig {
            socket: socket.clone(),
            name: "fuzz".into(),
            disk,
            device,
            workers: WorkerConfig {
                threads: 1,
                coroutine_backend: coro::Backend::Fast,
                stack_mode: corodev::export_config::StackMode::Auto,
                stack_size: coro::DEFAULT_STACK_SIZE,
                poll: Duration::ZERO,
                stop_timeout: Duration::from_secs(5),
            },
            once: false,
            image_lock: None,
            stats: Arc::new(ExportStats::new(2)),
        };
        std::thread::spawn(move || serve(&cfg, &Stop::new().expect("stop eventfd")).expect("server"));
        while !socket.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        socket
    })
}

fuzz_target!(|data: &[u8]| {
    let socket = server();
    let pool = pool();
    let mut s = UnixStream::connect(socket).expect("server must accept (it died or hung)");
    s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let (mem_len, mut rest) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => (0, data),
    };
    let mem_len = mem_len.min(rest.len());
    use std::os::unix::fs::FileExt;
    let _ = pool.memfd.write_all_at(&rest[..mem_len], 0);
    rest = &rest[mem_len..];
    while let [spec, tail @ ..] = rest {
        if tail.len() < 12 {
            break;
        }
        let size = u32::from_le_bytes([tail[8], tail[9], tail[10], tail[11]]) as usize;
        let end = (12 + size).min(tail.len());
        let fds: Vec<RawFd> = (0..(spec & 3))
            .map(|i| pool.fd(spec >> (2 + 2 * i)))
            .collect();
        if send_with_fds(&s, &tail[..end], &fds).is_err() {
            break;
        }
        rest = &tail[end..];
    }
    for &e in &pool.events {
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
        unsafe { libc::write(e, (&1u64 as *const u64).cast(), 8) };
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut buf = [0u8; 4096];
    for _ in 0..64 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let _ = s.flush();
});

//! Load generator for the cost of inflight I/O tracking: keeps `--iodepth` 4 KiB reads in
//! flight on queue 0 of a vhost-user-blk server for `--seconds`, through the test
//! frontend, with (`--tracked`) or without an inflight region, and prints
//! `ios=N seconds=S iops=I`. libblkio (`corodev-bench`) never asks for an inflight region,
//! so it cannot measure what tracking costs; `scripts/bench-inflight.sh` runs this both
//! ways against the same daemon binary and compares.
//!
//! `--logged`: dirty-page logging on for the whole run, as while QEMU migrates the VM
//! (`VHOST_USER_PROTOCOL_F_LOG_SHMFD`, a log handed over with SET_LOG_BASE, then
//! `VHOST_F_LOG_ALL`): what logging costs the server per request
//! (`scripts/bench-migration.sh`). Not with `--tracked`. corodev only: against
//! qemu-storage-daemon the vhost crate's frontend hangs at SET_LOG_BASE (it expects a
//! 16-byte reply, libvhost-user sends QEMU's 8 bytes).
//!
//! Each request has its own three descriptors (header, 4 KiB buffer, status) at slots
//! 3i..3i+2 and is published again as soon as its used element is seen, in one batch (one
//! kick) per pass over the used ring.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use integration::frontend::*;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

const QSIZE: u16 = 256;

fn usage() -> ! {
    eprintln!(
        "usage: tracked-load SOCKET [--tracked | --logged] [--iodepth N (1-85)] [--seconds S]"
    );
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(socket) = args.next() else { usage() };
    let (mut tracked, mut logged, mut iodepth, mut seconds) = (false, false, 32u16, 5.0f64);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--tracked" => tracked = true,
            "--logged" => logged = true,
            "--iodepth" => iodepth = value().parse().unwrap_or_else(|_| usage()),
            "--seconds" => seconds = value().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    if iodepth == 0 || 3 * iodepth > QSIZE || (tracked && logged) {
        usage();
    }
    let connect = match (tracked, logged) {
        (true, _) => TestFrontend::connect_tracked,
        (_, true) => TestFrontend::connect_logged,
        _ => TestFrontend::connect,
    };
    let mut fe = connect(socket.as_ref(), 1, QSIZE).unwrap_or_else(|e| {
        eprintln!("tracked-load: cannot connect to {socket}: {e}");
        std::process::exit(1)
    });
    // Kept open for the run: the server maps it.
    let log = logged.then(|| start_logging(&mut fe));
    let heads: Vec<u16> = (0..iodepth).map(|i| put_read(&fe, i)).collect();
    fe.publish_heads(0, &heads);
    let (size, used_ring) = (fe.queues[0].size, fe.queues[0].used);
    let mut seen = 0u16;
    let mut ios = 0u64;
    let mut failed = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut again = Vec::with_capacity(usize::from(iodepth));
    while Instant::now() < end {
        let idx = fe.mem.read_u16(used_ring + 2);
        while seen != idx {
            let slot = u64::from(seen % size);
            let head = fe.mem.read_u32(used_ring + 4 + 8 * slot) as u16;
            let status = status_of(head);
            if fe.mem.read(status, 1)[0] != S_OK {
                failed += 1;
            }
            fe.mem.write(status, &[0xff]);
            again.push(head);
            seen = seen.wrapping_add(1);
        }
        if again.is_empty() {
            std::hint::spin_loop();
            continue;
        }
        ios += again.len() as u64;
        fe.publish_heads(0, &again);
        again.clear();
    }
    let secs = start.elapsed().as_secs_f64();
    let marked = log.map_or(String::new(), |f| {
        let mut bits = vec![0u8; MEM_SIZE / 4096 / 8];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut bits, 0).unwrap_or_else(|e| {
            eprintln!("tracked-load: reading the log: {e}");
            std::process::exit(1)
        });
        let n: u32 = bits.iter().map(|b| b.count_ones()).sum();
        if n == 0 {
            eprintln!("tracked-load: logging on, but the server marked no page in the log");
            std::process::exit(1)
        }
        format!(" marked_pages={n}")
    });
    println!(
        "ios={ios} seconds={secs:.3} iops={:.0}{marked}",
        ios as f64 / secs
    );
    if failed > 0 {
        eprintln!("tracked-load: {failed} request(s) did not complete with status OK");
        std::process::exit(1);
    }
}

/// Hands the server a zeroed dirty log covering the test frontend's guest memory (one bit
/// per 4 KiB page) and switches logging on; exits with the reason if the server refuses.
fn start_logging(fe: &mut TestFrontend) -> std::fs::File {
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        eprintln!("tracked-load: {what}: {e}");
        std::process::exit(1)
    };
    let len = (MEM_SIZE / 4096 / 8) as u64;
    let file = tempfile::tempfile().unwrap_or_else(|e| fail("log file", &e));
    file.set_len(len).unwrap_or_else(|e| fail("log file", &e));
    let region = VhostUserDirtyLogRegion {
        mmap_size: len,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    };
    // corodev only: the vhost crate's frontend expects a 16-byte reply to SET_LOG_BASE,
    // libvhost-user (qemu-storage-daemon) sends QEMU's 8 bytes, and the frontend hangs.
    fe.fe
        .set_log_base(0, Some(region))
        .unwrap_or_else(|e| fail("SET_LOG_BASE", &e));
    fe.set_logging(true)
        .unwrap_or_else(|e| fail("VHOST_F_LOG_ALL", &e));
    file
}

/// Guest address of request `head`'s status byte (see [`put_read`]).
fn status_of(head: u16) -> u64 {
    DATA_BASE + u64::from(head / 3) * 8192 + 16
}

/// Request `i`: a 4 KiB read of sector 8i into its own buffer; returns its head.
fn put_read(fe: &TestFrontend, i: u16) -> u16 {
    let head = 3 * i;
    let base = DATA_BASE + u64::from(i) * 8192;
    fe.mem.write(base, &header(T_IN, 0, 8 * u64::from(i)));
    fe.put_descs(
        0,
        &[
            (head, Desc::new(base, 16, VIRTQ_DESC_F_NEXT, head + 1)),
            (
                head + 1,
                Desc::new(
                    base + 4096,
                    4096,
                    VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                    head + 2,
                ),
            ),
            (head + 2, Desc::new(base + 16, 1, VIRTQ_DESC_F_WRITE, 0)),
        ],
    );
    head
}

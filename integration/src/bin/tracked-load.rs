//! Load generator for the cost of inflight I/O tracking: keeps `--iodepth` 4 KiB reads in
//! flight on queue 0 of a vhost-user-blk server for `--seconds`, through the test
//! frontend, with (`--tracked`) or without an inflight region, and prints
//! `ios=N seconds=S iops=I`. libblkio (`corodev-bench`) never asks for an inflight region,
//! so it cannot measure what tracking costs; `scripts/bench-inflight.sh` runs this both
//! ways against the same daemon binary and compares.
//!
//! Each request has its own three descriptors (header, 4 KiB buffer, status) at slots
//! 3i..3i+2 and is published again as soon as its used element is seen, in one batch (one
//! kick) per pass over the used ring.

use std::time::{Duration, Instant};

use integration::frontend::*;

const QSIZE: u16 = 256;

fn usage() -> ! {
    eprintln!("usage: tracked-load SOCKET [--tracked] [--iodepth N (1-85)] [--seconds S]");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(socket) = args.next() else { usage() };
    let (mut tracked, mut iodepth, mut seconds) = (false, 32u16, 5.0f64);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--tracked" => tracked = true,
            "--iodepth" => iodepth = value().parse().unwrap_or_else(|_| usage()),
            "--seconds" => seconds = value().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    if iodepth == 0 || 3 * iodepth > QSIZE {
        usage();
    }
    let connect = if tracked {
        TestFrontend::connect_tracked
    } else {
        TestFrontend::connect
    };
    let mut fe = connect(socket.as_ref(), 1, QSIZE).unwrap_or_else(|e| {
        eprintln!("tracked-load: cannot connect to {socket}: {e}");
        std::process::exit(1)
    });
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
    println!("ios={ios} seconds={secs:.3} iops={:.0}", ios as f64 / secs);
    if failed > 0 {
        eprintln!("tracked-load: {failed} request(s) did not complete with status OK");
        std::process::exit(1);
    }
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

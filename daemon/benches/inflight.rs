//! What inflight tracking adds to one request: `popped` when it is taken off the ring,
//! `completing` + `completed` around its used element (see `corodev::inflight`), on a real
//! sealed memfd region, as the worker does them. `cargo bench -p corodev --bench inflight`.
//! The best of several runs of N requests, to filter out scheduler noise on a shared
//! machine. Compare with a request's whole cost in the data path (BENCHMARKS.md).

use std::hint::black_box;
use std::time::Instant;

use corodev::inflight::{allocate, Region, RingView};
use vhost::vhost_user::message::VhostUserInflight;

const ROUNDS: usize = 9;
const QSIZE: u16 = 256;
const DEPTH: u16 = 32;

fn main() {
    let ask = VhostUserInflight::new(0, 0, 1, QSIZE);
    let (desc, file) = allocate(&ask, 1, QSIZE).expect("allocate");
    let region = Region::map(&desc, file, 1, QSIZE).expect("map");
    let tracker = region.queue(0).expect("queue 0");
    let fresh = RingView {
        size: QSIZE,
        used_idx: 0,
        avail_idx: 0,
        avail_head: |_| None,
    };
    tracker.resume(&fresh).expect("fresh region");
    let iters = 20_000_000u64;
    let best = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            let mut used = 0u16;
            // QD32 in steps: pop 32 heads, answer them, as a batch does.
            for round in 0..iters / u64::from(DEPTH) {
                let first = (round % 8) as u16 * DEPTH;
                for h in first..first + DEPTH {
                    tracker.popped(black_box(h));
                }
                for h in first..first + DEPTH {
                    tracker.completing(h);
                    used = used.wrapping_add(1);
                    tracker.completed(h, black_box(used));
                }
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .fold(f64::INFINITY, f64::min);
    println!("inflight tracking per request (pop + complete, QD{DEPTH}): {best:.1} ns");
}

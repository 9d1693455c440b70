//! What both coro bench binaries share: timing as the best of several runs.

use std::time::Instant;

/// Runs per measurement; the best one counts, to filter out a shared machine's noise.
pub const ROUNDS: usize = 7;

/// Nanoseconds per iteration of `f(iters)`, the best of [`ROUNDS`] runs.
pub fn best_ns_per_iter(iters: u64, mut f: impl FnMut(u64)) -> f64 {
    (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            f(iters);
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .fold(f64::INFINITY, f64::min)
}

//! Pooled stacks vs the shared stack: memory per parked coroutine, and switch cost by the
//! depth of stack in use.
//!
//! `cargo bench -p coro --bench stacks` prints two tables:
//! - Memory per parked coroutine with 10K and 100K coroutines parked, each holding 1.5 KiB
//!   of locals (a request handler's worth): pooled stacks with every backend, and the shared
//!   stack with both register switches (the `Sigaltstack` bootstrap leaves a dead signal
//!   frame above each trampoline). Each case runs in a fresh child process (this binary,
//!   re-run with `CORO_STACKS_CHILD`), so earlier cases' freed memory that the allocator
//!   keeps does not count. RSS is read from `/proc/self/statm` before and after parking
//!   them; kernel memory that RSS leaves out (thread kernel stacks, page tables: the
//!   `KernelStack` and `PageTables` lines of `/proc/meminfo`, system-wide, so only large
//!   differences mean anything) is shown next to it where it exceeds 1 KiB per coroutine.
//! - The round trip (resume + yield) with 256 B to 16 KiB of stack in use: one coroutine
//!   resumed over and over (shared mode copies nothing: it stays resident) and two
//!   coroutines alternating (shared mode copies both out and in on every switch).
//!
//! `cargo bench -p coro --bench stacks -- rss` or `-- switch` runs one table. Times are the
//! best of several runs, to filter out a shared machine's noise.

mod common;

use std::hint::black_box;
use std::process::Command;

use common::{best_ns_per_iter, ROUNDS};
use coro::{yield_now, Backend, Builder, Coroutine, StackMode};

const CHILD_VAR: &str = "CORO_STACKS_CHILD";
/// Stack bytes each parked coroutine of the RSS table holds live.
const HANDLER_LOCALS: usize = 1536;

fn builder(mode: StackMode) -> Builder {
    Builder::new().backend(Backend::Fast).stack_mode(mode)
}

/// Kernel memory on behalf of processes that RSS does not count: `KernelStack` (one per
/// thread) plus `PageTables`, in bytes, system-wide.
fn kernel_bytes() -> usize {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let kib = |key: &str| -> usize {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("meminfo field")
    };
    (kib("KernelStack:") + kib("PageTables:")) * 1024
}

/// A coroutine body that keeps `N` bytes of locals live across every yield (`black_box`
/// makes the compiler keep them in the frame). It never returns: the coroutines are parked
/// for good or dropped (which unwinds them).
fn holds<const N: usize>() -> u64 {
    let mut frame = [0u8; N];
    for (i, b) in frame.iter_mut().enumerate() {
        *b = i as u8;
    }
    loop {
        black_box(&mut frame);
        yield_now();
    }
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("rss field");
    pages * 4096
}

/// In the child: parks `n` coroutines in `mode`, prints the RSS they added per coroutine
/// (or how many could be made before spawning failed).
fn rss_child(b: Builder, n: usize) {
    // Warm-up: the overflow handler, the shared stack, the allocator's first arenas.
    let mut warm = b.spawn(holds::<HANDLER_LOCALS>).expect("spawn");
    warm.resume();
    drop(warm);
    let mut cos: Vec<Coroutine<u64>> = Vec::with_capacity(n);
    let before = rss_bytes();
    let kernel_before = kernel_bytes();
    for i in 0..n {
        match b.spawn(holds::<HANDLER_LOCALS>) {
            Ok(mut co) => {
                co.resume(); // runs to its first yield: parked with its locals live
                cos.push(co);
            }
            Err(e) => {
                println!("FAILED after {i} coroutines: {e}");
                std::mem::forget(cos); // unwinding 30K stacks adds nothing to the answer
                return;
            }
        }
    }
    let after = rss_bytes();
    let kernel = kernel_bytes().saturating_sub(kernel_before) / n;
    println!("{} {kernel}", (after.saturating_sub(before)) / n);
    std::mem::forget(cos);
}

/// The RSS table's columns: heading, and the child's `backend:mode`.
const RSS_CASES: [(&str, &str); 6] = [
    ("pooled, fast", "fast:pooled"),
    ("pooled, sigaltstack", "sigaltstack:pooled"),
    ("pooled, ucontext", "ucontext:pooled"),
    ("pooled, thread", "thread:pooled"),
    ("shared, fast", "fast:shared"),
    ("shared, sigaltstack", "sigaltstack:shared"),
];

fn rss_table() {
    println!(
        "Memory per parked coroutine ({HANDLER_LOCALS} B of live locals each, fresh process per case)"
    );
    let head: Vec<&str> = RSS_CASES.iter().map(|c| c.0).collect();
    println!("| coroutines parked | {} |", head.join(" | "));
    println!("|---|{}", "---|".repeat(RSS_CASES.len()));
    for n in [10_000usize, 100_000] {
        let cell = |kind: &str| {
            let out = Command::new(std::env::current_exe().expect("bench binary"))
                .env(CHILD_VAR, format!("rss:{kind}:{n}"))
                .output()
                .expect("run child");
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let nums: Vec<usize> = text.split(' ').filter_map(|v| v.parse().ok()).collect();
            match nums[..] {
                [rss, kernel] if kernel > 1024 => format!("{rss} B + {kernel} B kernel"),
                [rss, _] => format!("{rss} B"),
                _ if text.starts_with("FAILED") => text,
                _ => format!(
                    "{text} {}",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                ),
            }
        };
        let cells: Vec<String> = RSS_CASES.iter().map(|c| cell(c.1)).collect();
        println!("| {n} | {} |", cells.join(" | "));
    }
}

/// Round trip of one coroutine holding `N` bytes, resumed over and over.
fn one<const N: usize>(mode: StackMode, iters: u64) -> f64 {
    let mut co = builder(mode).spawn(holds::<N>).expect("spawn");
    best_ns_per_iter(iters, |n| {
        for _ in 0..n {
            black_box(co.resume());
        }
    })
}

/// Round trip (per coroutine resumed) of two coroutines holding `N` bytes each, resumed in
/// turn: in shared mode every resume evicts the other one.
fn two<const N: usize>(mode: StackMode, iters: u64) -> f64 {
    let b = builder(mode);
    let mut a = b.spawn(holds::<N>).expect("spawn");
    let mut c = b.spawn(holds::<N>).expect("spawn");
    best_ns_per_iter(iters, |n| {
        for _ in 0..n / 2 {
            black_box(a.resume());
            black_box(c.resume());
        }
    })
}

fn switch_row<const N: usize>(label: &str, iters: u64) {
    println!(
        "| {label} | {:.1} | {:.1} | {:.1} | {:.1} |",
        one::<N>(StackMode::Pooled, iters),
        one::<N>(StackMode::Shared, iters),
        two::<N>(StackMode::Pooled, iters),
        two::<N>(StackMode::Shared, iters),
    );
}

fn switch_table() {
    println!("Round trip (resume + yield), ns, by stack bytes in use (best of {ROUNDS})");
    println!("| stack in use | one coroutine, pooled | one coroutine, shared | two alternating, pooled | two alternating, shared |");
    println!("|---|---|---|---|---|");
    switch_row::<256>("256 B", 2_000_000);
    switch_row::<1024>("1 KiB", 2_000_000);
    switch_row::<4096>("4 KiB", 1_000_000);
    switch_row::<16384>("16 KiB", 200_000);
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_VAR) {
        let mut parts = spec.split(':');
        let (Some("rss"), Some(backend), Some(mode), Some(n)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            panic!("bad {CHILD_VAR}: {spec}");
        };
        let b =
            builder(mode.parse().expect("stack mode")).backend(backend.parse().expect("backend"));
        rss_child(b, n.parse().expect("count"));
        return;
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    if wants("rss") {
        rss_table();
        println!();
    }
    if wants("switch") {
        switch_table();
    }
}

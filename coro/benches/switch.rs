//! Coroutine microbenchmarks: switch round trip and create+finish cost.
//!
//! `cargo bench -p coro` prints one table. `cargo bench -p coro -- fast-roundtrip` runs a
//! single measurement (for `strace -c`, which should then show no per-switch syscalls).
//! Times are the best of several runs of N iterations, to filter out scheduler noise on a
//! shared 2-core machine.

mod common;

use std::hint::black_box;

use common::best_ns_per_iter;
use coro::{yield_now, Backend, Builder, Resumed};

fn roundtrip(backend: Backend, iters: u64) -> f64 {
    let mut co = Builder::new()
        .backend(backend)
        .spawn(|| loop {
            yield_now();
        })
        .expect("spawn");
    best_ns_per_iter(iters, |n| {
        for _ in 0..n {
            black_box(co.resume());
        }
    })
}

fn create_finish(backend: Backend, pooled: bool, iters: u64) -> f64 {
    let b = Builder::new().backend(backend).pooled(pooled);
    best_ns_per_iter(iters, |n| {
        for i in 0..n {
            let mut co = b.spawn(move || black_box(i)).expect("spawn");
            match co.resume() {
                Resumed::Returned(v) => {
                    black_box(v);
                }
                Resumed::Yielded => unreachable!(),
            }
        }
    })
}

/// The baseline: two raw ucontexts ping-ponging with libc `swapcontext`.
#[cfg(target_env = "gnu")]
mod raw {
    use super::*;
    use std::mem;

    static mut MAIN: mem::MaybeUninit<libc::ucontext_t> = mem::MaybeUninit::uninit();
    static mut CO: mem::MaybeUninit<libc::ucontext_t> = mem::MaybeUninit::uninit();

    extern "C" fn body() {
        loop {
            // SAFETY: both contexts were initialised by `roundtrip` before the first switch.
            unsafe { libc::swapcontext((&raw mut CO).cast(), (&raw const MAIN).cast()) };
        }
    }

    pub fn roundtrip(iters: u64) -> f64 {
        let mut stack = vec![0u8; 64 * 1024];
        // SAFETY: the context gets a live stack that outlives all switches below; `body`
        // never returns, and the program only switches between MAIN and CO on this thread.
        unsafe {
            let co = (&raw mut CO).cast::<libc::ucontext_t>();
            libc::getcontext(co);
            (*co).uc_stack.ss_sp = stack.as_mut_ptr().cast();
            (*co).uc_stack.ss_size = stack.len();
            (*co).uc_link = std::ptr::null_mut();
            libc::makecontext(co, body, 0);
        }
        let ns = best_ns_per_iter(iters, |n| {
            for _ in 0..n {
                // SAFETY: as above.
                unsafe { libc::swapcontext((&raw mut MAIN).cast(), (&raw const CO).cast()) };
            }
        });
        drop(stack);
        ns
    }
}

fn main() {
    let only = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let mut cases: Vec<(&str, &dyn Fn() -> f64)> = vec![
        ("fast-roundtrip", &|| roundtrip(Backend::Fast, 20_000_000)),
        ("sigaltstack-roundtrip", &|| {
            roundtrip(Backend::Sigaltstack, 20_000_000)
        }),
        ("thread-roundtrip", &|| roundtrip(Backend::Thread, 20_000)),
        ("fast-create-finish-pooled", &|| {
            create_finish(Backend::Fast, true, 5_000_000)
        }),
        ("sigaltstack-create-finish-pooled", &|| {
            create_finish(Backend::Sigaltstack, true, 5_000_000)
        }),
        ("thread-create-finish-pooled", &|| {
            create_finish(Backend::Thread, true, 20_000)
        }),
        ("fast-create-finish-fresh-stack", &|| {
            create_finish(Backend::Fast, false, 20_000)
        }),
        ("sigaltstack-create-finish-fresh-stack", &|| {
            create_finish(Backend::Sigaltstack, false, 20_000)
        }),
        ("thread-create-finish-fresh-stack", &|| {
            create_finish(Backend::Thread, false, 200)
        }),
    ];
    #[cfg(target_env = "gnu")]
    cases.extend([
        (
            "raw-swapcontext-roundtrip",
            &(|| raw::roundtrip(200_000)) as &dyn Fn() -> f64,
        ),
        ("ucontext-roundtrip", &|| {
            roundtrip(Backend::Ucontext, 200_000)
        }),
        ("ucontext-create-finish-pooled", &|| {
            create_finish(Backend::Ucontext, true, 200_000)
        }),
    ]);
    let mut results = Vec::new();
    for (name, f) in &cases {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        let ns = f();
        println!("{name:<40} {ns:>12.2} ns");
        results.push((*name, ns));
    }
    let get = |n: &str| results.iter().find(|r| r.0 == n).map(|r| r.1);
    if let (Some(raw), Some(fast)) = (get("raw-swapcontext-roundtrip"), get("fast-roundtrip")) {
        println!(
            "{:<40} {:>12.1} x",
            "fast speedup over swapcontext",
            raw / fast
        );
    }
}

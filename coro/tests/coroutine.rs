//! Coroutine semantics, run against every switch backend and the shared stack mode.

use std::cell::RefCell;
use std::hint::black_box;
use std::panic::{self, AssertUnwindSafe};
use std::process::Command;
use std::rc::Rc;

use coro::{yield_now, Backend, Builder, Coroutine, Error, Resumed, StackMode, State};

/// Defines `mod name { fn fast(); fn sigaltstack(); fn ucontext(); fn thread(); }` running
/// `body(builder)` on each backend (ucontext only where libc has it) with pooled stacks,
/// plus `fn shared(); fn shared_sigaltstack();` on the shared stack with the two register
/// switches, unless the test starts with `pooled_only` (it creates coroutines inside
/// coroutines, which shared mode refuses).
macro_rules! each_backend {
    (pooled_only $name:ident, $body:expr) => {
        each_backend!(@cases $name, $body, []);
    };
    ($name:ident, $body:expr) => {
        each_backend!(@cases $name, $body, [
            shared: shared_builder(),
            shared_sigaltstack: shared_builder().backend(Backend::Sigaltstack),
        ]);
    };
    (@cases $name:ident, $body:expr, [$($case:ident: $builder:expr),* $(,)?]) => {
        mod $name {
            use super::*;
            #[test]
            fn fast() {
                ($body)(Builder::new().backend(Backend::Fast))
            }
            #[test]
            fn sigaltstack() {
                ($body)(Builder::new().backend(Backend::Sigaltstack))
            }
            #[cfg(target_env = "gnu")]
            #[test]
            fn ucontext() {
                ($body)(Builder::new().backend(Backend::Ucontext))
            }
            #[test]
            fn thread() {
                ($body)(Builder::new().backend(Backend::Thread))
            }
            $(
                #[test]
                fn $case() {
                    ($body)($builder)
                }
            )*
        }
    };
}

/// `Fast` on the shared stack.
fn shared_builder() -> Builder {
    Builder::new()
        .backend(Backend::Fast)
        .stack_mode(StackMode::Shared)
}

each_backend!(ping_pong, |b: Builder| {
    // cloudwu's example: two coroutines printing 0..5 and 100..105, interleaved by main.
    let out = Rc::new(RefCell::new(Vec::new()));
    let make = |start: i32| {
        let out = out.clone();
        b.spawn(move || {
            for i in 0..5 {
                out.borrow_mut().push(start + i);
                yield_now();
            }
        })
        .expect("spawn")
    };
    let mut co1 = make(0);
    let mut co2 = make(100);
    while co1.state() != State::Done && co2.state() != State::Done {
        co1.resume();
        co2.resume();
    }
    assert_eq!(*out.borrow(), vec![0, 100, 1, 101, 2, 102, 3, 103, 4, 104]);
});

each_backend!(states_and_return_value, |b: Builder| {
    let mut co = b
        .spawn(|| {
            yield_now();
            String::from("done")
        })
        .expect("spawn");
    assert_eq!(co.state(), State::Ready);
    assert_eq!(co.resume(), Resumed::Yielded);
    assert_eq!(co.state(), State::Suspended);
    assert_eq!(co.resume(), Resumed::Returned(String::from("done")));
    assert_eq!(co.state(), State::Done);
});

each_backend!(large_values_are_boxed_transparently, |b: Builder| {
    let big = [7u64; 100]; // 800 bytes: larger than the inline payload
    let mut co = b.spawn(move || big).expect("spawn");
    assert_eq!(co.resume(), Resumed::Returned([7u64; 100]));
});

each_backend!(pooled_only nested_coroutines, |b: Builder| {
    let mut outer = b
        .spawn(move || {
            let mut inner = b
                .spawn(|| {
                    yield_now();
                    2
                })
                .expect("spawn inner");
            assert_eq!(inner.resume(), Resumed::Yielded);
            yield_now(); // yields the outer one while the inner is suspended
            match inner.resume() {
                Resumed::Returned(v) => v + 1,
                Resumed::Yielded => 0,
            }
        })
        .expect("spawn outer");
    assert_eq!(outer.resume(), Resumed::Yielded);
    assert_eq!(outer.resume(), Resumed::Returned(3));
});

fn recurse(depth: u32) -> u64 {
    let buf = std::hint::black_box([depth as u8; 256]);
    if depth == 0 {
        buf[0] as u64
    } else {
        recurse(depth - 1) + buf[1] as u64
    }
}

each_backend!(deep_recursion_within_stack, |b: Builder| {
    // ~300 bytes per frame x 400 frames = ~120 KiB of a 256 KiB stack.
    let mut co = b.spawn(|| recurse(400)).expect("spawn");
    let expected: u64 = (1..=400u64).map(|d| d as u8 as u64).sum();
    assert_eq!(co.resume(), Resumed::Returned(expected));
});

/// Ten integers and eight floats, opaque to the optimiser.
fn live_values(seed: u64) -> ([u64; 10], [f64; 8]) {
    (
        std::array::from_fn(|k| black_box(seed.wrapping_mul(k as u64 + 0x9e37_79b9))),
        std::array::from_fn(|k| black_box((seed + k as u64) as f64 * 1.25)),
    )
}

/// Inlined and by value, so the arrays become scalars that can live in registers.
#[inline(always)]
fn fold(ints: [u64; 10], floats: [f64; 8], round: u64) -> (u64, f64) {
    let i = ints
        .iter()
        .fold(0u64, |a, &v| a.rotate_left(7) ^ v.wrapping_add(round));
    let f = floats.iter().fold(0f64, |a, &v| a * 0.5 + v * round as f64);
    (i, f)
}

each_backend!(callee_saved_registers_survive_switches, |b: Builder| {
    // Both sides keep more values live across every switch than there are caller-saved
    // registers, so the compiler parks them in callee-saved ones (x19-x28 and d8-d15 on
    // aarch64, rbx and r12-r15 on x86_64) or spills them because the switch declares them
    // clobbered; either way each side must get its own values back, not the other's.
    let mut co = b
        .spawn(|| {
            let (ints, floats) = live_values(3);
            let mut acc = (0u64, 0f64);
            for round in 0..4 {
                yield_now();
                let (i, f) = fold(ints, floats, round);
                acc = (acc.0 ^ i, acc.1 + f);
            }
            acc
        })
        .expect("spawn");
    let (ints, floats) = live_values(11);
    let mut mine = (0u64, 0f64);
    let mut round = 0;
    let theirs = loop {
        match co.resume() {
            Resumed::Yielded => {
                let (i, f) = fold(ints, floats, round);
                mine = (mine.0 ^ i, mine.1 + f);
                round += 1;
            }
            Resumed::Returned(v) => break v,
        }
    };
    let expect = |seed| {
        let (ints, floats) = live_values(seed);
        (0..4).fold((0u64, 0f64), |acc, r| {
            let (i, f) = fold(ints, floats, r);
            (acc.0 ^ i, acc.1 + f)
        })
    };
    assert_eq!(round, 4);
    assert_eq!(theirs, expect(3), "the coroutine's values");
    assert_eq!(mine, expect(11), "the resumer's values");
});

each_backend!(panic_propagates_to_resumer, |b: Builder| {
    let mut co = b
        .spawn(|| {
            yield_now();
            panic!("boom in coroutine");
        })
        .expect("spawn");
    co.resume();
    let err = panic::catch_unwind(AssertUnwindSafe(|| co.resume())).expect_err("must panic");
    assert_eq!(err.downcast_ref::<&str>(), Some(&"boom in coroutine"));
    assert_eq!(co.state(), State::Done);
});

struct SetOnDrop(Rc<RefCell<bool>>);
impl Drop for SetOnDrop {
    fn drop(&mut self) {
        *self.0.borrow_mut() = true;
    }
}

each_backend!(drop_suspended_unwinds_and_returns_stack, |b: Builder| {
    // Warm the pool so the count below is about this coroutine's stack.
    drop(b.spawn(|| ()).expect("spawn"));
    let before = coro::pool_idle_count();
    let dropped = Rc::new(RefCell::new(false));
    let flag = dropped.clone();
    let mut co = b
        .spawn(move || {
            let _guard = SetOnDrop(flag);
            loop {
                yield_now();
            }
        })
        .expect("spawn");
    assert_eq!(co.resume(), Resumed::Yielded);
    assert_eq!(coro::pool_idle_count(), before - 1);
    assert!(!*dropped.borrow());
    drop(co);
    assert!(
        *dropped.borrow(),
        "destructor on the coroutine stack must run"
    );
    assert_eq!(
        coro::pool_idle_count(),
        before,
        "stack must return to the pool"
    );
});

each_backend!(drop_unstarted_drops_closure, |b: Builder| {
    let dropped = Rc::new(RefCell::new(false));
    let guard = SetOnDrop(dropped.clone());
    let co = b.spawn(move || drop(guard)).expect("spawn");
    assert!(!*dropped.borrow());
    drop(co);
    assert!(*dropped.borrow());
});

fn rss_pages() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("rss field")
}

/// The child process of `create_finish_100k_no_rss_growth_*`: RSS is per process, so
/// parallel tests in the same process would disturb the measurement. Ignored so that a
/// plain test run never counts it as passed without having measured anything; the parents
/// run it with `--ignored --exact` and the backend in `CORO_RSS_CHILD`, and it fails when
/// run any other way.
#[test]
#[ignore = "child process: run by create_finish_100k_no_rss_growth_*"]
fn rss_child() {
    let b = child_builder("CORO_RSS_CHILD");
    let cycle = |n: u32| {
        for i in 0..n {
            let mut co = b.spawn(move || i.wrapping_mul(3)).expect("spawn");
            assert_eq!(co.resume(), Resumed::Returned(i.wrapping_mul(3)));
        }
    };
    cycle(1000); // warm-up: pool and allocator reach steady state
    let before = rss_pages();
    cycle(100_000);
    let after = rss_pages();
    // 64 pages (256 KiB) of slack for allocator noise in the test harness.
    assert!(
        after <= before + 64,
        "RSS grew from {before} to {after} pages over 100k cycles"
    );
}

fn rss_in_child(backend: &str) {
    let out = run_child("rss_child", "CORO_RSS_CHILD", backend);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child rss_child ({backend}) failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A child that ran no test (a renamed test, a filter that matched nothing) also exits 0.
    assert!(
        stdout.contains("test rss_child ... ok") && stdout.contains("1 passed"),
        "the child must have run rss_child and passed it; stdout: {stdout}"
    );
}

#[test]
fn create_finish_100k_no_rss_growth_fast() {
    rss_in_child("fast");
}

#[cfg(target_env = "gnu")]
#[test]
fn create_finish_100k_no_rss_growth_ucontext() {
    rss_in_child("ucontext");
}

#[test]
fn create_finish_100k_no_rss_growth_sigaltstack() {
    rss_in_child("sigaltstack");
}

#[test]
fn create_finish_100k_no_rss_growth_thread() {
    rss_in_child("thread");
}

#[test]
fn create_finish_100k_no_rss_growth_shared() {
    rss_in_child("shared");
}

each_backend!(unpooled_stacks_are_unmapped, |b: Builder| {
    let b = b.pooled(false);
    let before = coro::pool_idle_count();
    for _ in 0..100 {
        let mut co = b.spawn(|| 1).expect("spawn");
        assert_eq!(co.resume(), Resumed::Returned(1));
    }
    assert_eq!(coro::pool_idle_count(), before);
});

each_backend!(oversized_stack_is_refused, |b: Builder| {
    let err = b
        .stack_size(usize::MAX)
        .spawn(|| ())
        .err()
        .expect("a stack of usize::MAX bytes cannot be mapped");
    assert!(
        matches!(
            err,
            Error::StackTooLarge {
                requested: usize::MAX
            }
        ),
        "{err:?}"
    );
});

#[test]
fn unknown_backend_name_is_an_error() {
    for b in Backend::ALL {
        assert_eq!(
            b.name().parse::<Backend>().expect("a backend's own name"),
            b
        );
    }
    let err = "turbo".parse::<Backend>().expect_err("no such backend");
    assert!(
        matches!(&err, Error::UnknownBackend { name } if name == "turbo"),
        "{err:?}"
    );
}

#[test]
#[should_panic(expected = "yield_now called outside a coroutine")]
fn yield_outside_coroutine_panics() {
    yield_now();
}

#[test]
#[should_panic(expected = "resume of a coroutine that is Done")]
fn resume_after_done_panics() {
    let mut co = Coroutine::new(|| ());
    co.resume();
    co.resume();
}

/// The child process of `stack_overflow_is_reported_*`: overflows a small stack, which
/// kills the process. Ignored (see `rss_child`); the parents run it with the backend in
/// `CORO_OVERFLOW_CHILD`.
#[test]
#[ignore = "child process: run by stack_overflow_is_reported_*"]
fn overflow_child() {
    let b = child_builder("CORO_OVERFLOW_CHILD");
    #[allow(unconditional_recursion)] // the point: run off the stack
    fn runaway(n: u64) -> u64 {
        let buf = std::hint::black_box([n; 64]);
        runaway(n + 1) + buf[3]
    }
    let mut co = b
        .stack_size(coro::MIN_STACK_SIZE)
        .spawn(|| runaway(0))
        .expect("spawn");
    co.resume();
    panic!("resumed a coroutine that recursed without bound, and it returned");
}

/// The coroutines a child test makes, from `var`: a backend name, or `shared` /
/// `shared-sigaltstack` for that register switch on the shared stack. Panics when the
/// variable is absent, since a child entry point run outside its parent has nothing to test.
fn child_builder(var: &str) -> Builder {
    let name = std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: this is a child process entry point, run by its parent test")
    });
    match name.as_str() {
        "shared" => shared_builder(),
        "shared-sigaltstack" => shared_builder().backend(Backend::Sigaltstack),
        backend => Builder::new().backend(backend.parse().expect("backend")),
    }
}

/// The runner cargo started this test binary through (`CARGO_TARGET_<TRIPLE>_RUNNER`, e.g.
/// `qemu-aarch64-static -L /usr/aarch64-linux-gnu` for the aarch64 tests), split on
/// whitespace as cargo splits it; empty when the binary runs natively.
///
/// A child must be started the same way. Under qemu-user, `current_exe` is the emulated
/// test binary, and the host kernel can only exec it through a binfmt_misc entry for qemu,
/// which containers and fresh CI machines often lack; the child then dies with status 127
/// before printing anything. Only the variable form is seen here (the process inherits it
/// from whoever ran cargo), not a runner set in `.cargo/config.toml`.
fn runner() -> Vec<String> {
    let prefix = format!("CARGO_TARGET_{}_", std::env::consts::ARCH.to_uppercase());
    std::env::vars()
        .find(|(k, _)| k.starts_with(&prefix) && k.ends_with("_RUNNER"))
        .map(|(_, v)| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// Runs the ignored test `name` of this binary alone in a child process with `var=value`
/// set (through the same [`runner`] as this process); the caller judges its exit status and
/// output.
fn run_child(name: &str, var: &str, value: &str) -> std::process::Output {
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = match runner().split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(&exe);
            cmd
        }
        None => Command::new(&exe),
    };
    let out = cmd
        .args([
            "--ignored",
            "--exact",
            name,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(var, value)
        .output()
        .expect("run child");
    assert!(
        !(out.status.code() == Some(127) && out.stdout.is_empty()),
        "could not exec the child {cmd:?}: an emulated test binary needs its runner, so set \
         CARGO_TARGET_<TRIPLE>_RUNNER in the environment (not only in .cargo/config.toml)"
    );
    out
}

fn overflow_in_child(backend: &str) {
    let out = run_child("overflow_child", "CORO_OVERFLOW_CHILD", backend);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("running 1 test"),
        "the child must have started overflow_child; stdout: {stdout}"
    );
    assert!(!out.status.success(), "child must die, stderr: {stderr}");
    assert!(
        stderr.contains("coroutine stack overflow"),
        "missing overflow message, stderr: {stderr}"
    );
}

#[test]
fn stack_overflow_is_reported_fast() {
    overflow_in_child("fast");
}

#[cfg(target_env = "gnu")]
#[test]
fn stack_overflow_is_reported_ucontext() {
    overflow_in_child("ucontext");
}

#[test]
fn stack_overflow_is_reported_sigaltstack() {
    overflow_in_child("sigaltstack");
}

#[test]
fn stack_overflow_is_reported_thread() {
    overflow_in_child("thread");
}

/// The shared stack has a guard page too, reported as the current coroutine's.
#[test]
fn stack_overflow_is_reported_shared() {
    overflow_in_child("shared");
}

#[test]
fn stack_overflow_is_reported_shared_sigaltstack() {
    overflow_in_child("shared-sigaltstack");
}

// ---- Shared stack mode ----

/// A coroutine's stack as a request handler's would be: 1.5 KiB of locals, a pointer into
/// them, all checked after every resume.
fn busy_body(id: u64, rounds: u64) -> u64 {
    let mut frame = [0u64; 192];
    for (i, w) in frame.iter_mut().enumerate() {
        *w = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64;
    }
    let me: *const [u64; 192] = &frame;
    let mut sum = 0;
    for r in 0..rounds {
        frame[(r % 192) as usize] ^= r;
        yield_now();
        let frame = std::hint::black_box(&mut frame);
        frame[(r % 192) as usize] ^= r;
        assert_eq!(
            frame as *const _, me,
            "the frame must be back at its address"
        );
        for (i, w) in frame.iter().enumerate() {
            assert_eq!(
                *w,
                id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64,
                "coroutine {id}, word {i}, after round {r}"
            );
        }
        sum += r;
    }
    sum
}

#[test]
fn shared_interleaved_coroutines_keep_their_stacks() {
    const N: u64 = 64;
    const ROUNDS: u64 = 20;
    let b = shared_builder();
    let mut cos: Vec<_> = (0..N)
        .map(|id| b.spawn(move || busy_body(id, ROUNDS)).expect("spawn"))
        .collect();
    // Every resume switches to another coroutine: each one evicts the previous occupant.
    // Odd rounds go backwards and resume each coroutine twice in a row (no copy the
    // second time).
    for round in 0..ROUNDS {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..N as usize).collect()
        } else {
            (0..N as usize).rev().collect()
        };
        for i in order {
            assert_eq!(cos[i].resume(), Resumed::Yielded);
        }
    }
    let expected: u64 = (0..ROUNDS).sum();
    for co in &mut cos {
        assert_eq!(co.resume(), Resumed::Returned(expected));
    }
}

#[test]
fn shared_coroutine_resuming_one_on_the_same_stack_panics() {
    let b = shared_builder();
    let mut inner = b.spawn(yield_now).expect("spawn inner");
    let mut outer = b
        .spawn(move || {
            inner.resume();
        })
        .expect("spawn outer");
    let err = panic::catch_unwind(AssertUnwindSafe(|| outer.resume())).expect_err("must panic");
    let msg = err
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| err.downcast_ref::<String>().cloned())
        .expect("a message");
    assert!(
        msg.contains("resumed another coroutine on the same shared stack"),
        "{msg}"
    );
}

#[test]
fn shared_coroutine_may_resume_a_pooled_one_and_vice_versa() {
    let mut outer = shared_builder()
        .spawn(|| {
            let mut pooled = Builder::new()
                .spawn(|| {
                    yield_now();
                    1
                })
                .expect("spawn pooled");
            assert_eq!(pooled.resume(), Resumed::Yielded);
            yield_now();
            matches!(pooled.resume(), Resumed::Returned(1))
        })
        .expect("spawn shared");
    assert_eq!(outer.resume(), Resumed::Yielded);
    assert_eq!(outer.resume(), Resumed::Returned(true));
    // A pooled coroutine resuming a shared one: the shared stack is not in use.
    let mut shared = shared_builder()
        .spawn(|| {
            yield_now();
            2
        })
        .expect("spawn shared");
    let mut pooled = Builder::new()
        .spawn(move || {
            assert_eq!(shared.resume(), Resumed::Yielded);
            shared.resume()
        })
        .expect("spawn pooled");
    assert_eq!(pooled.resume(), Resumed::Returned(Resumed::Returned(2)));
}

#[test]
fn shared_coroutine_cannot_create_one_on_its_stack() {
    let b = shared_builder();
    let mut outer = b
        .spawn(move || match b.spawn(|| ()) {
            Err(Error::SharedStackInUse { stack_size }) => stack_size,
            Err(e) => panic!("unexpected error {e:?}"),
            Ok(_) => panic!("creating a coroutine on the running shared stack must fail"),
        })
        .expect("spawn outer");
    assert_eq!(outer.resume(), Resumed::Returned(coro::DEFAULT_STACK_SIZE));
}

#[test]
fn shared_mode_needs_a_register_switch() {
    let err = Builder::new()
        .backend(Backend::Ucontext)
        .stack_mode(StackMode::Shared)
        .spawn(|| ())
        .err()
        .expect("ucontext cannot share a stack");
    assert!(
        matches!(
            err,
            Error::StackModeUnsupported {
                backend: Backend::Ucontext,
                mode: StackMode::Shared
            }
        ),
        "{err:?}"
    );
    let err = shared_builder()
        .backend(Backend::Thread)
        .spawn(|| ())
        .err()
        .expect("a coroutine thread cannot share a stack");
    assert!(
        matches!(
            err,
            Error::StackModeUnsupported {
                backend: Backend::Thread,
                mode: StackMode::Shared
            }
        ),
        "{err:?}"
    );
    assert!(Backend::Fast.switches_by_register());
    assert!(Backend::Sigaltstack.switches_by_register());
    assert!(!Backend::Ucontext.switches_by_register());
    assert!(!Backend::Thread.switches_by_register());
}

#[test]
fn stack_mode_names() {
    assert_eq!(
        "pooled".parse::<StackMode>().expect("pooled"),
        StackMode::Pooled
    );
    assert_eq!(
        "shared".parse::<StackMode>().expect("shared"),
        StackMode::Shared
    );
    assert_eq!(StackMode::default(), StackMode::Pooled);
    let err = "stacked".parse::<StackMode>().expect_err("no such mode");
    assert!(
        matches!(&err, Error::UnknownStackMode { name } if name == "stacked"),
        "{err:?}"
    );
}

#[test]
fn shared_stacks_are_per_stack_size() {
    // A coroutine on the 64 KiB shared stack can create and resume ones on the default
    // shared stack: a different stack, not in use.
    let mut outer = shared_builder()
        .stack_size(64 * 1024)
        .spawn(|| {
            let mut inner = shared_builder()
                .spawn(|| busy_body(7, 3))
                .expect("spawn on the other shared stack");
            while inner.resume() == Resumed::Yielded {}
            busy_body(8, 2)
        })
        .expect("spawn outer");
    while outer.resume() == Resumed::Yielded {}
}

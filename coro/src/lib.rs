//! Stackful coroutines for corodev.
//!
//! Every guest request in corodev runs as a coroutine written as plain sequential code: it
//! parses the request, submits backend I/O, *yields* until the completion arrives, then
//! writes the status. This crate provides the pieces, bottom up:
//!
//! - `stack`: `mmap`'d stacks with a guard page; an overflow is reported (`overflow`), not
//!   silent corruption.
//! - switch backends ([`Backend`]): `Fast` (register-only `asm`, no syscall, first entry via
//!   `makecontext`), `Sigaltstack` (the same switch, first entry via a signal handler: no
//!   `makecontext`, so it runs on musl), `Ucontext` (`swapcontext`) and `Thread` (an OS
//!   thread per coroutine, for debuggers and thread-aware tools); all share one trampoline
//!   and pool (`fiber`).
//! - stack modes ([`StackMode`]): each coroutine on its own pooled stack, or all of a
//!   thread's on one shared stack with the parked ones' bytes copied out (`shared_stack`).
//! - [`Coroutine`]: create, [`resume`](Coroutine::resume), [`yield_now`], return a value;
//!   panics propagate to the resumer; dropping a suspended coroutine unwinds it.
//! - [`Scheduler`]: a single-threaded executor with [`park`]/[`wake`], plus [`sync`]
//!   (`Mutex`, `Condvar`) and [`io`] (io_uring operations that park the calling task).
//! - [`Error`]: why setting up or driving coroutines failed (a named system call, a stack
//!   too large, ...). The I/O operations return the operation's own `io::Error` instead.
//!
//! What it does not do: move coroutines between threads (they are `!Send`), or own an event
//! loop (the caller's epoll drives [`Scheduler::run`]).
//!
//! # Debugging tools
//! Stacks are registered with Valgrind through client requests, so `valgrind` runs clean.
//! AddressSanitizer does not know about stack switches; build with the `Ucontext` backend
//! (`--coroutine-backend ucontext` in the daemon) and `ASAN_OPTIONS=detect_stack_use_after_return=0`,
//! as QEMU does for its ucontext backend without the sanitizer fiber hooks.

#![deny(
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks,
    clippy::missing_safety_doc
)]
#![warn(missing_docs)]

mod arch;
mod coroutine;
mod error;
mod fiber;
pub mod io;
mod overflow;
mod sched;
mod shared_stack;
mod signal_stack;
mod stack;
pub mod sync;
mod thread_switch;
mod valgrind;

pub use coroutine::{yield_now, Builder, Coroutine, Resumed, State};
pub use error::{Error, SpawnError};
pub use fiber::{pool_idle_count, Backend, POOL_MAX};
pub use io::sleep;
pub use sched::{current_task, park, wake, yield_task, Job, Scheduler, TaskId};
pub use shared_stack::StackMode;
pub use stack::{DEFAULT_STACK_SIZE, MIN_STACK_SIZE};

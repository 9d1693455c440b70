//! Architecture-specific register-only switches for the `fast` backend.
//!
//! x86_64 and aarch64 have one (one file each, same contract: [`switch`] and [`bootstrap`]);
//! elsewhere `Fast` and `Sigaltstack` fall back to `Ucontext` (see
//! [`crate::Backend::effective`]).

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "aarch64")]
pub(crate) use aarch64::{bootstrap, switch};
#[cfg(target_arch = "x86_64")]
pub(crate) use x86_64::{bootstrap, switch};

/// Whether this build has a `fast` switch.
pub(crate) const HAS_FAST: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

/// Where `makecontext` exists (glibc), the only place the argument split happens.
#[cfg(all(test, target_env = "gnu"))]
mod tests {
    use std::ptr::NonNull;

    use crate::fiber::{self, Backend, Fiber, Payload};
    use crate::shared_stack::StackMode;
    use crate::stack::DEFAULT_STACK_SIZE;

    /// `makecontext` can only pass `int`s, so `Fiber::new` hands the fiber pointer to
    /// `fiber_entry` as two 32-bit halves (for both backends: the `fast` bootstrap enters
    /// through the same `makecontext` frame). Were the high half lost, the trampoline would
    /// use a truncated pointer: on a fiber above 4 GiB that faults inside `acquire`, or the
    /// job's `finished` flag lands elsewhere and the check below fails. Below 4 GiB the
    /// test would prove nothing, hence the address assertion; this is a unit test because
    /// only the crate can see where a fiber lives.
    fn fiber_above_4gib_runs_its_job(backend: Backend) {
        let f: NonNull<Fiber> =
            Fiber::acquire(backend, StackMode::Pooled, DEFAULT_STACK_SIZE, false).expect("fiber");
        let p = f.as_ptr();
        assert!(
            p as usize > u32::MAX as usize,
            "fiber at {p:p} is below 4 GiB, so this run cannot tell a lost high half"
        );
        // SAFETY: a fresh fiber is parked with no job and an empty payload (`start`,
        // `switch_in`); the job returns without yielding, so after one switch it is parked
        // again with its result in the payload (`is_finished`), which is read out as the
        // type `start::<_, u64>` stored before the fiber is released with the size it was
        // acquired with, unpooled as acquired.
        unsafe {
            Fiber::start(p, || 0x1234_5678_9abc_u64);
            fiber::switch_in(p);
            assert!(Fiber::is_finished(p), "the trampoline ran on another fiber");
            let out = Payload::read::<std::thread::Result<u64>>(&raw mut (*p).payload);
            assert_eq!(out.expect("job panicked"), 0x1234_5678_9abc);
            Fiber::release(f, false, DEFAULT_STACK_SIZE);
        }
    }

    #[test]
    fn fiber_pointer_high_half_survives_makecontext_fast() {
        fiber_above_4gib_runs_its_job(Backend::Fast);
    }

    #[test]
    fn fiber_pointer_high_half_survives_makecontext_ucontext() {
        fiber_above_4gib_runs_its_job(Backend::Ucontext);
    }
}

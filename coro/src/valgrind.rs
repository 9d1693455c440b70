//! Valgrind client requests that tell memcheck where coroutine stacks are.
//!
//! Without them Valgrind sees the stack pointer jump into an unknown mapping on every switch
//! and reports spurious invalid reads/writes. The request is a magic no-op instruction
//! sequence that Valgrind's JIT recognises (as in `valgrind.h`: on x86_64 a run of `rol` on
//! `rdi` followed by `xchg rbx, rbx`; on aarch64 a run of `ror` on `x12` followed by
//! `orr x10, x10, x10`); on bare hardware it changes nothing and returns the default value,
//! so it is always compiled in. We write the ~10 instructions by hand rather than depend on
//! a crate that needs Valgrind's C headers at build time. Other architectures: requests are
//! no-ops.

const STACK_REGISTER: usize = 0x1501;
const STACK_DEREGISTER: usize = 0x1502;
/// Memcheck's `VALGRIND_MAKE_MEM_DEFINED` (tool base `'M' << 24 | 'C' << 16`, third request);
/// other tools ignore it.
const MAKE_MEM_DEFINED: usize = 0x4d43_0002;

#[cfg(target_arch = "x86_64")]
fn client_request(default: usize, args: [usize; 6]) -> usize {
    let result;
    // SAFETY: the sequence only rotates rdi by a total of 128 bits (a no-op) and exchanges rbx
    // with itself; Valgrind, if present, reads the argument block through rax, which points at
    // a live local array. No memory is written and no flags the compiler relies on survive.
    unsafe {
        std::arch::asm!(
            "rol rdi, 3",
            "rol rdi, 13",
            "rol rdi, 61",
            "rol rdi, 51",
            "xchg rbx, rbx",
            inout("rdx") default => result,
            in("rax") args.as_ptr(),
            options(nostack, readonly),
        );
    }
    result
}

#[cfg(target_arch = "aarch64")]
fn client_request(default: usize, args: [usize; 6]) -> usize {
    let result;
    // SAFETY: the sequence only rotates x12 by a total of 128 bits (a no-op) and ORs x10
    // with itself; Valgrind, if present, reads the argument block through x4, which points
    // at a live local array, and leaves its answer in x3 (else x3 keeps the default). No
    // memory is written, sp is not touched and no flags are set.
    unsafe {
        std::arch::asm!(
            "ror x12, x12, #3",
            "ror x12, x12, #13",
            "ror x12, x12, #51",
            "ror x12, x12, #61",
            "orr x10, x10, x10",
            inout("x3") default => result,
            in("x4") args.as_ptr(),
            options(nostack, readonly, preserves_flags),
        );
    }
    result
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn client_request(default: usize, _args: [usize; 6]) -> usize {
    default
}

/// Registers `[lo, hi)` as a stack; returns Valgrind's id for it (0 when not under Valgrind).
pub(crate) fn stack_register(lo: *mut u8, hi: *mut u8) -> usize {
    client_request(0, [STACK_REGISTER, lo as usize, hi as usize, 0, 0, 0])
}

/// Forgets a stack registered with [`stack_register`].
pub(crate) fn stack_deregister(id: usize) {
    client_request(0, [STACK_DEREGISTER, id, 0, 0, 0, 0]);
}

/// Tells memcheck that `[lo, lo + len)` holds defined, accessible data again.
///
/// For the `sigaltstack` bootstrap: the trampoline parks *below* the signal handler's frame
/// on the same stack, and when the handler's stack pointer moves back up past it (the
/// switch out of the trampoline, the handler's return), memcheck takes the parked frames
/// for popped stack and marks them inaccessible, though they hold the context the next
/// switch in reads.
pub(crate) fn make_defined(lo: *mut u8, len: usize) {
    client_request(0, [MAKE_MEM_DEFINED, lo as usize, len, 0, 0, 0]);
}

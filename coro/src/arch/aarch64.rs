//! The `fast` backend's register-only context switch for aarch64 (AAPCS64, Linux).
//!
//! The contract is the x86_64 one (`arch/x86_64.rs`): a suspended context is a single stack
//! pointer; [`switch`] stores what it must keep below sp and parks sp; the other side loads
//! the same shape. The stack of a suspended context, at a switch:
//!
//! ```text
//!            higher addresses
//!          | caller's frame    |   sp at entry to the asm block (always 16-byte aligned)
//!          +-------------------+
//!   sp+24  | saved x19         |   x19 (reserved by LLVM as base pointer) and x29 (frame
//!   sp+16  | saved x29         |   pointer) cannot be asm operands, so they go on the stack
//!   sp+8   | (padding)         |   keeps sp a multiple of 16 between the two stores
//!   sp --> | resume address    |   label `2:` inside the switch that suspended this context
//!          +-------------------+   (sp is what `*save_sp` holds)
//!            lower addresses
//! ```
//!
//! Resuming is the mirror image: load that sp, pop the resume address (16 bytes, padding
//! included) and branch to it; the code at `2:` pops x29 and x19, leaving sp at its entry
//! value. [`bootstrap`] saves the same frame, then calls a function on the stack below it.
//!
//! AAPCS64 registers, and who keeps each across a switch:
//!
//! - x0-x17: caller-saved arguments and temporaries; `clobber_abi("C")` declares them
//!   clobbered. x9 is also named as an early-clobber scratch: it carries sp and the resume
//!   address, so no input may be assigned to it.
//! - x18: the platform register. Never read or written here. On Linux it is an ordinary
//!   temporary, and `clobber_abi("C")` includes it there (Rust leaves it out on targets that
//!   reserve it), so the compiler keeps nothing in it across a switch and we need not save
//!   the other context's value.
//! - x19: callee-saved, but LLVM reserves it: saved by hand, above.
//! - x20-x28: callee-saved; declared clobbered (`out("x20") _` ...), so the compiler spills
//!   only those live at this call site, not all nine on every switch.
//! - x29 (fp): callee-saved frame pointer; cannot be an operand: saved by hand, above.
//! - x30 (lr): the link register, in `clobber_abi("C")` (the caller of any function already
//!   assumes a call rewrites it). Not used to resume, see below.
//! - sp: the context itself; kept 16-byte aligned at every instruction, because with
//!   alignment checking on (Linux enables it for EL0) any sp-based access through a
//!   misaligned sp faults.
//! - v8-v15: only their low 64 bits (d8-d15) are callee-saved; `clobber_abi("C")` already
//!   clobbers all of v0-v31 and v8-v15 are named too, so the compiler spills what is live.
//! - FPCR/FPSR, like MXCSR on x86_64, and TPIDR_EL0 (the thread pointer: a fiber never
//!   leaves its thread) are not switched.
//!
//! The switch ends in an indirect `br` to the popped resume address rather than `ret`: `ret`
//! is hinted to the branch predictor as a function return and predicted by popping the
//! return stack, whose top entry was pushed by some unrelated `bl`, so it would mispredict
//! on every switch and also rob that `bl`'s own later `ret` of its prediction; `br` is
//! predicted per site by the indirect predictor and leaves the return stack alone. Each
//! resume label starts with `hint #36` (`bti j`, a no-op without Branch Target
//! Identification), so that `br` may land there should the binary ever be built with BTI.
//! No syscall is made, unlike glibc's `swapcontext`, which calls `rt_sigprocmask`.

use std::arch::asm;

/// Saves the current context into `*save_sp` and resumes the context whose stack pointer is
/// `load_sp`. Returns when some other context switches back to the saved one.
///
/// # Safety
/// `save_sp` must be writable. `load_sp` must be a stack pointer saved by [`switch`] or
/// [`bootstrap`] whose context has not been resumed since, on a stack that is still mapped.
#[inline(always)]
pub(crate) unsafe fn switch(save_sp: *mut *mut u8, load_sp: *mut u8) {
    // SAFETY: the caller guarantees both pointers; the asm restores sp, x19 and x29 to
    // their entry values before falling through at `2:`, and declares all other registers
    // it or the other context may change clobbered. sp moves in steps of 16 only.
    unsafe {
        asm!(
            // Build the suspended frame of the diagram: x29 and x19, then where to resume.
            "stp x29, x19, [sp, #-16]!",
            "adr x9, 2f",
            "str x9, [sp, #-16]!",
            // Park this context: its whole state is now the stack pointer (`str` cannot
            // store sp itself; register 31 as a data operand is xzr).
            "mov x9, sp",
            "str x9, [{save}]",
            // Enter the other context and continue at its resume address. `br`, not `ret`:
            // no `bl` pushed this address, so `ret` would mispredict every time.
            "mov sp, {load}",
            "ldr x9, [sp], #16",
            "br x9",
            // Someone switched back to us: restore what we stored, in reverse.
            "2:",
            "hint #36",
            "ldp x29, x19, [sp], #16",
            // `save` and `load` are read after x9 is written, which is sound because x9 and
            // x20-x28 are `out` (not `lateout`), so no input shares them; the `reg` class
            // never hands out sp, x19 or x29.
            save = in(reg) save_sp,
            load = in(reg) load_sp,
            out("x9") _,
            out("x20") _,
            out("x21") _,
            out("x22") _,
            out("x23") _,
            out("x24") _,
            out("x25") _,
            out("x26") _,
            out("x27") _,
            out("x28") _,
            out("v8") _,
            out("v9") _,
            out("v10") _,
            out("v11") _,
            out("v12") _,
            out("v13") _,
            out("v14") _,
            out("v15") _,
            clobber_abi("C"),
        );
    }
}

/// Saves the current context into `*save_sp` exactly as [`switch`] does, then runs
/// `enter(arg)` on the current stack below the saved frame, with a zero link register and
/// frame pointer (the end of any stack walk). `enter` must never return; the first
/// [`switch`] back to the saved pointer makes this function return.
///
/// Two backends start fibers with it. `fast` uses `makecontext` only once per new stack:
/// `enter` jumps into the `makecontext`-prepared trampoline (`setcontext`), which parks
/// itself with [`switch`] straight back to us. `sigaltstack` calls it from a signal handler
/// already running on the new stack: `enter` is the trampoline itself, which parks.
///
/// # Safety
/// As for [`switch`]; additionally `enter` must not return and must not unwind.
#[inline(always)]
pub(crate) unsafe fn bootstrap(
    save_sp: *mut *mut u8,
    enter: unsafe extern "C" fn(*mut u8) -> !,
    arg: *mut u8,
) {
    // SAFETY: as in `switch`; the stack below the saved frame is ours to use because sp
    // points at the saved frame, and `enter` never returns into this asm.
    unsafe {
        asm!(
            // The same suspended frame as `switch` builds.
            "stp x29, x19, [sp, #-16]!",
            "adr x9, 2f",
            "str x9, [sp, #-16]!",
            "mov x9, sp",
            "str x9, [{save}]",
            // AAPCS64 wants sp 16-byte aligned at a call; both stores moved it by 16, so
            // unlike x86_64 there is nothing to round. `enter` (arg in x0) never returns,
            // so it gets a zero link register and frame pointer instead of `blr`'s: that is
            // where a stack walk (a panic's backtrace, a debugger) stops. Above `enter`
            // there is only dead memory: this abandoned frame, and for the sigaltstack
            // backend a signal handler's frame and the kernel's signal frame, whose saved
            // registers describe a stack long gone. (x29 was saved above and is restored at
            // `2:`; this path never comes back.) The branch goes through x16, which a `bti c`
            // landing pad accepts from `br`.
            "mov x30, xzr",
            "mov x29, xzr",
            "br x16",
            // The first switch back to the saved frame lands here, and what `enter` left
            // below the frame is abandoned.
            "2:",
            "hint #36",
            "ldp x29, x19, [sp], #16",
            save = in(reg) save_sp,
            in("x16") enter,
            in("x0") arg,
            out("x9") _,
            out("x20") _,
            out("x21") _,
            out("x22") _,
            out("x23") _,
            out("x24") _,
            out("x25") _,
            out("x26") _,
            out("x27") _,
            out("x28") _,
            out("v8") _,
            out("v9") _,
            out("v10") _,
            out("v11") _,
            out("v12") _,
            out("v13") _,
            out("v14") _,
            out("v15") _,
            clobber_abi("C"),
        );
    }
}

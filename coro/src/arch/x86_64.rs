//! The `fast` backend's register-only context switch for x86_64 (System V ABI).
//!
//! A suspended context is a single stack pointer. [`switch`] pushes what it must keep and
//! parks the stack pointer; the other side pops the same shape. The stack of a suspended
//! context, at a switch:
//!
//! ```text
//!            higher addresses
//!          | caller's frame    |   rsp at entry to the asm block (16-byte aligned)
//!          +-------------------+
//!   sp+16  | saved rbp         |   rbp and rbx cannot be named as asm operands in Rust
//!   sp+8   | saved rbx         |   (frame pointer / reserved by LLVM), so they go on the stack
//!   sp --> | resume address    |   label `2:` inside the switch that suspended this context
//!          +-------------------+   (sp is what `*save_sp` holds)
//!            lower addresses
//! ```
//!
//! Resuming is the mirror image: load that sp, pop the resume address and jump to it; the
//! code at `2:` pops rbx and rbp, leaving rsp at its entry value. [`bootstrap`] saves the
//! same three words, then calls a function on the stack below them (see there).
//!
//! Pushing below rsp is allowed because the blocks are not `nostack`: the compiler keeps
//! rsp call-aligned at entry and nothing live in the red zone.
//!
//! Every other register is declared clobbered (`clobber_abi("C")` plus `r12`-`r15`), so the
//! compiler spills only what is live across the switch at that call site instead of us
//! saving all callee-saved registers every time. MXCSR and the x87 control word are not
//! switched: coroutines are expected to leave them as the ABI default.
//!
//! The switch ends in an indirect `jmp` to the popped resume address rather than `ret`: a
//! `ret` to a return address that no `call` pushed empties the return stack buffer's
//! prediction and mispredicts every time, while the indirect jump is predicted per site.
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
    // SAFETY: the caller guarantees both pointers; the asm restores rsp, rbx and rbp to
    // their entry values before falling through at `2:`, and declares all other registers
    // clobbered.
    unsafe {
        asm!(
            // Build the suspended frame of the diagram: rbp, rbx, then where to resume.
            "push rbp",
            "push rbx",
            "lea rax, [rip + 2f]",
            "push rax",
            // Park this context: its whole state is now the stack pointer.
            "mov [{save}], rsp",
            // Enter the other context and continue at its resume address. `jmp`, not `ret`:
            // no `call` pushed this address, so `ret` would mispredict every time.
            "mov rsp, {load}",
            "pop rax",
            "jmp rax",
            // Someone switched back to us: restore what we pushed, in reverse.
            "2:",
            "pop rbx",
            "pop rbp",
            // `save` and `load` are read after rax is overwritten, which is sound because
            // rax and r12-r15 are `out` (not `lateout`), so no input shares them; the `reg`
            // class never hands out rsp, rbx or rbp.
            save = in(reg) save_sp,
            load = in(reg) load_sp,
            out("rax") _,
            out("r12") _,
            out("r13") _,
            out("r14") _,
            out("r15") _,
            clobber_abi("C"),
        );
    }
}

/// Saves the current context into `*save_sp` exactly as [`switch`] does, then runs
/// `enter(arg)` on the current stack below the saved frame, with a zero return address (the
/// end of any stack walk). `enter` must never return; the first [`switch`] back to the saved
/// pointer makes this function return.
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
    // SAFETY: as in `switch`; the stack below the saved frame is ours to use because rsp
    // points at the saved frame, and `enter` never returns into this asm.
    unsafe {
        asm!(
            // The same suspended frame as `switch` builds.
            "push rbp",
            "push rbx",
            "lea rax, [rip + 2f]",
            "push rax",
            "mov [{save}], rsp",
            // The System V ABI requires rsp to be a multiple of 16 at a `call` (the callee
            // finds rsp+8 aligned and aligns its own frame, SSE spills included, on that).
            // Entry was aligned and three pushes left rsp 8 off; rounding down moves it into
            // free stack below the saved frame, never into it.
            "and rsp, -16",
            // `enter` never returns, so instead of `call` (which would push our address)
            // it gets a zero return address: that is where a stack walk (a panic's
            // backtrace, a debugger) stops. Above `enter` there is only dead memory: this
            // abandoned frame, and for the sigaltstack backend a signal handler's frame and
            // the kernel's signal frame, whose saved registers describe a stack long gone;
            // a backtrace that followed them crashed.
            "push 0",
            "jmp {enter}",
            // The first switch back to the saved frame lands here, and what
            // `enter` left below the frame is abandoned.
            "2:",
            "pop rbx",
            "pop rbp",
            save = in(reg) save_sp,
            enter = in(reg) enter,
            in("rdi") arg,
            out("rax") _,
            out("r12") _,
            out("r13") _,
            out("r14") _,
            out("r15") _,
            clobber_abi("C"),
        );
    }
}

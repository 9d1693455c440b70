//! Coroutine stacks: `mmap`'d memory with a `PROT_NONE` guard page below.
//!
//! A stack is only address space until a coroutine touches it, so a generous default costs
//! nothing for shallow handlers; the guard page turns an overflow into a fault that
//! [`crate::overflow`] reports instead of silent corruption of the neighbouring mapping.
//! Reuse of stacks (the pool) lives in [`crate::fiber`]; this module only maps and unmaps.

use std::ptr::NonNull;

use crate::valgrind;
use crate::Error;

/// Default usable stack size: 256 KiB.
///
/// QEMU uses 1 MiB because arbitrary block-layer code (format drivers, qcow2 metadata) runs in
/// its coroutines. corodev's request handlers are shallow (parse, submit, yield), but a panic
/// with backtrace capture or a formatted log line inside a coroutine can use tens of KiB, so we
/// keep 4x headroom over that. Pages that are never touched are never backed by memory.
pub const DEFAULT_STACK_SIZE: usize = 256 * 1024;

/// The smallest stack we accept: enough for the trampoline, a panic and a log line.
pub const MIN_STACK_SIZE: usize = 32 * 1024;

/// One mapped stack: `[base, base + guard)` is `PROT_NONE`, `[base + guard, top)` is usable.
#[derive(Debug)]
pub(crate) struct Stack {
    base: NonNull<u8>,
    len: usize,
    guard: usize,
    valgrind_id: usize,
}

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(ps).unwrap_or(4096)
}

impl Stack {
    /// Maps a stack of at least `size` usable bytes (rounded up to pages) plus one guard page.
    pub(crate) fn new(size: usize) -> Result<Stack, Error> {
        let page = page_size();
        let too_large = || Error::StackTooLarge { requested: size };
        let usable = size
            .max(MIN_STACK_SIZE)
            .checked_next_multiple_of(page)
            .ok_or_else(too_large)?;
        let len = usable.checked_add(page).ok_or_else(too_large)?;
        // SAFETY: an anonymous private mapping at a kernel-chosen address aliases nothing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::last_os("mmap"));
        }
        let Some(base) = NonNull::new(ptr.cast::<u8>()) else {
            // Only possible where vm.mmap_min_addr is 0; `Stack` keeps a non-null base, so
            // give that mapping back rather than describe it.
            // SAFETY: unmapping exactly the mapping created above.
            unsafe { libc::munmap(ptr, len) };
            return Err(Error::Os {
                call: "mmap",
                source: std::io::ErrorKind::AddrNotAvailable.into(),
            });
        };
        // SAFETY: the first page lies inside the mapping we just created.
        if unsafe { libc::mprotect(ptr, page, libc::PROT_NONE) } != 0 {
            let err = Error::last_os("mprotect");
            // SAFETY: unmapping exactly the mapping created above.
            unsafe { libc::munmap(ptr, len) };
            return Err(err);
        }
        let mut stack = Stack {
            base,
            len,
            guard: page,
            valgrind_id: 0,
        };
        stack.valgrind_id = valgrind::stack_register(stack.bottom(), stack.top());
        Ok(stack)
    }

    /// Highest address (exclusive): the stack grows down from here.
    pub(crate) fn top(&self) -> *mut u8 {
        // SAFETY: `len` is the size of the mapping starting at `base`.
        unsafe { self.base.as_ptr().add(self.len) }
    }

    /// Lowest usable address (just above the guard page).
    pub(crate) fn bottom(&self) -> *mut u8 {
        // SAFETY: the guard page is the first page of the mapping.
        unsafe { self.base.as_ptr().add(self.guard) }
    }

    /// Usable bytes between the guard page and the top.
    pub(crate) fn usable(&self) -> usize {
        self.len - self.guard
    }

    /// Whether `addr` falls in this stack's guard page.
    pub(crate) fn guard_contains(&self, addr: usize) -> bool {
        let lo = self.base.as_ptr() as usize;
        (lo..lo + self.guard).contains(&addr)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        valgrind::stack_deregister(self.valgrind_id);
        // SAFETY: `base..base+len` is a mapping this Stack owns; nothing runs on it any more
        // (the fiber owning it is parked or was never started).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_and_guards() {
        let s = Stack::new(MIN_STACK_SIZE + 1).expect("map stack");
        assert!(s.usable() > MIN_STACK_SIZE);
        assert_eq!(s.usable() % page_size(), 0);
        assert!(s.guard_contains(s.bottom() as usize - 1));
        assert!(!s.guard_contains(s.bottom() as usize));
        // The usable range is writable end to end.
        // SAFETY: both addresses are inside the usable, writable part of the mapping.
        unsafe {
            s.bottom().write(1);
            s.top().sub(1).write(2);
        }
    }
}

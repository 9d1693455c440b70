//! Surviving a frontend that truncates guest memory under us.
//!
//! Guest memory is the frontend's file (a memfd, a tmpfs or hugetlbfs file) mapped into
//! the daemon. The vhost-user library refuses a region longer than its file when it is
//! added, but the frontend can shrink the file *later*: the next access to a page past the
//! new end raises SIGBUS, whose default action kills the daemon and every other guest it
//! serves. Sealing the file cannot be relied on (only memfds take seals, and a frontend may
//! have sealed it against further seals already).
//!
//! So a SIGBUS on an address inside a registered guest mapping is recovered: the handler
//! maps a private zero page over the faulting page (the access is retried and succeeds,
//! reading zeroes or writing into memory the guest no longer sees) and counts the fault
//! against the connection that registered the mapping. That connection's worker notices
//! the count ([`faults`]) and closes the connection: its memory is no longer the guest's.
//! A SIGBUS anywhere else still kills the process, as it should. The kernel's own accesses
//! (io_uring into a truncated page) fail with EFAULT and need nothing from here.
//!
//! The registry is a fixed table of atomics, so the handler reads it without locks or
//! allocation (it must be async-signal-safe).

use std::mem;
use std::ptr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

use corodev_devices::ratelimit::{RateLimitedLog, DEFAULT_BURST, DEFAULT_WINDOW};

/// Guest mappings that can be registered at once (regions of all live connections'
/// memory tables, old tables included until their connection closes).
const SLOTS: usize = 1024;

/// One registered mapping: `[start, end)` in the daemon's address space, owned by a
/// connection id (0: free slot), mapped in pages of `page` bytes (huge pages for a
/// hugetlbfs file: a mapping there can only be replaced a whole huge page at a time), with
/// the faults recovered in it.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    page: AtomicUsize,
    owner: AtomicU64,
    faults: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)] // only the array initialiser uses it
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    page: AtomicUsize::new(0),
    owner: AtomicU64::new(0),
    faults: AtomicU64::new(0),
};

static REGISTRY: [Slot; SLOTS] = [FREE; SLOTS];
/// Faults recovered in any connection: one load tells the data path whether to look.
static TOTAL_FAULTS: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

/// Registers `[start, start + len)`, mapped in pages of `page` bytes, as guest memory of
/// connection `owner` (non-zero), and installs the SIGBUS handler on first use. Returns
/// false if the table is full (the mapping then stays unprotected, as before this module
/// existed; logged).
pub fn register(owner: u64, start: *const u8, len: usize, page: usize) -> bool {
    INSTALL.call_once(install);
    let (start, end) = (start as usize, (start as usize).saturating_add(len));
    for slot in &REGISTRY {
        if slot.owner.load(Ordering::Acquire) == owner
            && slot.start.load(Ordering::Acquire) == start
            && slot.end.load(Ordering::Acquire) == end
        {
            return true;
        }
    }
    for slot in &REGISTRY {
        // Claim a free slot with a placeholder owner first, so the handler never sees a
        // half-written range under a real owner.
        if slot
            .owner
            .compare_exchange(0, u64::MAX, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            slot.start.store(start, Ordering::Release);
            slot.end.store(end, Ordering::Release);
            slot.page.store(page, Ordering::Release);
            slot.faults.store(0, Ordering::Release);
            slot.owner.store(owner, Ordering::Release);
            return true;
        }
    }
    // Each memory table message can get here: rate-limited like anything a frontend does.
    static FULL: RateLimitedLog = RateLimitedLog::new(DEFAULT_BURST, DEFAULT_WINDOW);
    FULL.log(
        log::Level::Error,
        format_args!("guest memory registry full: a truncated memory file could crash the daemon"),
    );
    false
}

/// Forgets every mapping of connection `owner` (when the connection and its memory maps
/// are gone), or only `[start, end)` of it (a map no request uses any more).
pub fn unregister(owner: u64, range: Option<(usize, usize)>) {
    for slot in &REGISTRY {
        let matches = slot.owner.load(Ordering::Acquire) == owner
            && range.is_none_or(|(start, end)| {
                slot.start.load(Ordering::Acquire) == start
                    && slot.end.load(Ordering::Acquire) == end
            });
        if matches {
            // Hide the slot from the handler before clearing it, then free it.
            slot.owner.store(u64::MAX, Ordering::Release);
            slot.start.store(0, Ordering::Release);
            slot.end.store(0, Ordering::Release);
            slot.owner.store(0, Ordering::Release);
        }
    }
}

/// The page size of the file behind a mapping: the huge page size for a hugetlbfs file,
/// else the base page size.
pub fn page_size_of(file: &std::fs::File) -> usize {
    use std::os::fd::AsRawFd;
    const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;
    // SAFETY: a zeroed statfs is a valid buffer for fstatfs to fill; the fd is borrowed.
    let mut st: libc::statfs = unsafe { mem::zeroed() };
    // SAFETY: fstatfs writes only into `st`.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    // `f_type` is an i64 in glibc on x86_64, a u64 in musl, narrower elsewhere.
    #[allow(clippy::useless_conversion, clippy::unnecessary_fallible_conversions)]
    let f_type = u64::try_from(st.f_type).ok();
    if rc == 0 && f_type == Some(HUGETLBFS_MAGIC) {
        usize::try_from(st.f_bsize).unwrap_or(page_size())
    } else {
        page_size()
    }
}

/// Faults recovered so far in all guest memory (cheap: one atomic load).
pub fn total_faults() -> u64 {
    TOTAL_FAULTS.load(Ordering::Acquire)
}

/// Faults recovered so far in connection `owner`'s guest memory.
pub fn faults(owner: u64) -> u64 {
    REGISTRY
        .iter()
        .filter(|s| s.owner.load(Ordering::Acquire) == owner)
        .map(|s| s.faults.load(Ordering::Acquire))
        .sum()
}

fn install() {
    // SAFETY: sysconf has no preconditions.
    if let Ok(p) = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }) {
        if p.is_power_of_two() {
            PAGE.store(p, Ordering::Relaxed);
        }
    }
    // SAFETY: a zeroed `sigaction` is a valid value to fill in; the handler has the
    // SA_SIGINFO signature; the old action is not needed (we fall back to SIG_DFL).
    let rc = unsafe {
        let mut action: libc::sigaction = mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, ptr::null_mut())
    };
    if rc != 0 {
        log::error!(
            "cannot install the SIGBUS handler: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The SIGBUS handler. Async-signal-safe: atomics, `mmap`, `sigaction` and `raise`.
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code <= 0 {
        // Sent by a process (kill, sigqueue), not a fault: `si_addr` means nothing and
        // returning would not re-raise it. Die as SIGBUS would have.
        die();
        return;
    }
    for slot in &REGISTRY {
        let owner = slot.owner.load(Ordering::Acquire);
        if owner == 0 || owner == u64::MAX {
            continue;
        }
        let (start, end) = (
            slot.start.load(Ordering::Acquire),
            slot.end.load(Ordering::Acquire),
        );
        if (start..end).contains(&addr) {
            let page = match slot.page.load(Ordering::Acquire) {
                p if p.is_power_of_two() => p,
                _ => page_size(),
            };
            let at = addr & !(page - 1);
            // SAFETY: `at` is a page (huge page for hugetlbfs) inside a guest mapping this
            // process made, registered by its connection and not yet unregistered, and
            // mappings are page-aligned: replacing that one page with a private anonymous
            // page changes only memory the guest shares with us, and MAP_FIXED never
            // touches anything outside the page.
            let p = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                slot.faults.fetch_add(1, Ordering::AcqRel);
                TOTAL_FAULTS.fetch_add(1, Ordering::AcqRel);
                return; // the access is retried and now succeeds
            }
            break;
        }
    }
    // Not guest memory (or the page could not be replaced): returning re-raises the fault,
    // which the default action turns into the death SIGBUS always meant.
    default_action();
}

/// Restores SIGBUS's default action (terminate with a core).
fn default_action() {
    // SAFETY: a zeroed sigaction with SIG_DFL is a valid action; sigaction is
    // async-signal-safe.
    unsafe {
        let mut dfl: libc::sigaction = mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &dfl, ptr::null_mut());
    }
}

/// Terminates the process with SIGBUS from inside the handler.
fn die() {
    default_action();
    // SAFETY: raise is async-signal-safe; with the default action restored it terminates
    // the process once the handler returns and the signal is unblocked.
    unsafe { libc::raise(libc::SIGBUS) };
}

/// The page size, read once by [`install`] (`sysconf` is not async-signal-safe).
static PAGE: AtomicUsize = AtomicUsize::new(4096);

fn page_size() -> usize {
    PAGE.load(Ordering::Relaxed)
}

//! When a worker signals the driver: as soon as a request completes, or once per batch.
//!
//! A driver that waits for completions sleeps until it is signalled, and how much that
//! sleep costs depends on where the driver runs relative to the worker:
//!
//! - **On another core**, waking it is a cross-core wake-up (on a virtual machine, an
//!   inter-processor interrupt through the hypervisor: tens of microseconds on some
//!   machines). Signalling at the end of a batch leaves the driver asleep while the
//!   worker finishes the batch, then the worker idle while the driver wakes, and the
//!   two take turns. Signalling as soon as the batch's first request completes (when the
//!   driver asked for it, through EVENT_IDX) wakes the driver while the worker goes on,
//!   and a driver that finds completions waiting does not go back to sleep: the two
//!   overlap. Once per batch is enough: a signal at every completion the driver asks for
//!   costs the worker a system call every few requests, most of them to a driver that
//!   is already awake.
//! - **On the worker's own core**, a signal makes the driver runnable there and it
//!   preempts the worker at once. Signalling each completion then becomes a context
//!   switch every few requests; signalling once per batch lets the worker finish the
//!   batch and the driver take it all in one turn.
//!
//! Measured with the null backend, 4 KiB reads at queue depth 32 from one libblkio
//! client, on a 2-vCPU virtual machine (IOPS, worker and client pinned; early = when the
//! driver asks, through EVENT_IDX):
//!
//! | signal                              | other core | same core |
//! |-------------------------------------|-----------:|----------:|
//! | once, at the end of each batch      |      0.53M |     1.61M |
//! | early, at every completion          |      1.44M |     0.51M |
//! | early, at a batch's first completion |     1.49M |         - |
//!
//! Neither is right for both, and an unpinned worker and driver move between the two
//! placements. So the worker measures which one it is in: a worker sharing its core with
//! the driver it signals is preempted at every signal (about 50,000 involuntary context
//! switches a second in the run above), one on its own core almost never (under 20 a
//! second). [`SignalPolicy`] reads the thread's involuntary context switch count (one
//! `getrusage` call) each time the worker passes through its poll loop's end, at most
//! every [`CHECK_EVERY`], and signals early while the rate stays under [`SHARED_RATE`].

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How often the context switch count is read, at most.
pub const CHECK_EVERY: Duration = Duration::from_millis(4);

/// Involuntary context switches a second above which the worker is taken to share its
/// core with the driver. Between the two measured regimes (about 20 and 50,000) by a
/// wide margin either side; other load on the core also counts, and batching is then
/// the better choice as well.
pub const SHARED_RATE: u64 = 2_000;

/// A worker's choice between early and batched signals (see the module docs).
pub struct SignalPolicy {
    /// Signal each completion the driver asked for, rather than once per batch.
    early: Cell<bool>,
    /// When the count was last read, and what it was.
    last: Cell<Option<(Instant, u64)>>,
}

impl Default for SignalPolicy {
    fn default() -> Self {
        SignalPolicy {
            early: Cell::new(true),
            last: Cell::new(None),
        }
    }
}

impl SignalPolicy {
    /// Whether to signal as each request completes (the driver permitting).
    pub fn early(&self) -> bool {
        self.early.get()
    }

    /// Re-measures, if [`CHECK_EVERY`] has passed since the last time: called from the
    /// worker's thread only (the count is the calling thread's).
    pub fn update(&self, now: Instant) {
        if let Some((then, _)) = self.last.get() {
            if now.duration_since(then) < CHECK_EVERY {
                return;
            }
        }
        let Some(count) = involuntary_switches() else {
            return;
        };
        if let Some((then, before)) = self.last.get() {
            self.early.set(!shared(
                count.saturating_sub(before),
                now.duration_since(then),
            ));
        }
        self.last.set(Some((now, count)));
    }
}

/// Whether `switches` involuntary context switches in `elapsed` mean a shared core.
fn shared(switches: u64, elapsed: Duration) -> bool {
    let micros = elapsed.as_micros().max(1);
    u128::from(switches) * 1_000_000 > u128::from(SHARED_RATE) * micros
}

/// The calling thread's involuntary context switches so far; `None` if the kernel
/// refuses (never on Linux: the policy then stays as it is).
fn involuntary_switches() -> Option<u64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` points to writable memory the size of a `rusage`, which is all
    // getrusage writes; RUSAGE_THREAD reads the calling thread's counters.
    let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: getrusage returned 0, so it filled the whole struct (and it was zeroed
    // before, so every field is initialised either way).
    let usage = unsafe { usage.assume_init() };
    u64::try_from(usage.ru_nivcsw).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_separates_the_measured_regimes() {
        let second = Duration::from_secs(1);
        assert!(!shared(20, second));
        assert!(shared(50_000, second));
        assert!(!shared(8, CHECK_EVERY));
        assert!(shared(200, CHECK_EVERY));
    }

    #[test]
    fn starts_early_and_a_quiet_thread_stays_early() {
        let p = SignalPolicy::default();
        assert!(p.early());
        let t0 = Instant::now();
        p.update(t0);
        p.update(t0 + CHECK_EVERY);
        // This test thread is not preempted 2,000 times a second.
        assert!(p.early());
    }

    /// Pins the calling thread to `cpu`.
    fn pin(cpu: usize) {
        let mut set = std::mem::MaybeUninit::<libc::cpu_set_t>::zeroed();
        // SAFETY: `set` is a zeroed cpu_set_t (a valid empty set); CPU_SET writes one bit
        // inside it, and sched_setaffinity reads size_of::<cpu_set_t>() bytes from it for
        // the calling thread (pid 0).
        let r = unsafe {
            let set = set.assume_init_mut();
            libc::CPU_SET(cpu, set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set)
        };
        assert_eq!(
            r,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }

    #[test]
    fn a_worker_signalling_a_driver_on_its_own_core_batches() {
        // The real pattern: a thread that keeps working and writes an eventfd every few
        // microseconds, read by a thread blocked on it on the same CPU. Each write makes
        // the reader runnable there, and it preempts the writer.
        // SAFETY: sched_getcpu takes no arguments and only returns a number.
        let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).unwrap_or(0);
        let efd = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
        let reader_fd = efd.try_clone().expect("eventfd clone");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin(cpu);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = reader_fd.read();
                }
            })
        };
        let writer = std::thread::spawn(move || {
            pin(cpu);
            let p = SignalPolicy::default();
            let start = Instant::now();
            p.update(start);
            while start.elapsed() < Duration::from_millis(200) {
                let spin = Instant::now();
                while spin.elapsed() < Duration::from_micros(5) {
                    std::hint::spin_loop();
                }
                efd.write(1).expect("eventfd write");
            }
            p.update(Instant::now());
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            efd.write(1).expect("eventfd write");
            p.early()
        });
        let early = writer.join().expect("writer thread");
        reader.join().expect("reader thread");
        assert!(
            !early,
            "a writer preempted at every signal kept signalling early"
        );
    }
}

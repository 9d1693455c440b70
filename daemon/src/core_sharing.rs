//! Whether a worker shares its core: what decides when it signals the driver, and
//! whether it polls.
//!
//! **Signals.** A driver that waits for completions sleeps until it is signalled, and
//! how much that sleep costs depends on where the driver runs relative to the worker:
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
//! **Polling.** A worker that spins waiting for its next completion keeps the core from
//! whoever shares it: the driver, or the io_uring worker threads that do buffered writes
//! (the kernel cannot do those without blocking, so every one runs on such a thread). On
//! 2 vCPUs, 4 KiB buffered random writes at queue depth 32 had the worker, the driver and
//! an io_uring thread runnable at once; the worker was preempted about 15,000 times a
//! second, and its polling took the time the write thread needed (128 KiB sequential
//! writes: 48K IOPS polling, 60K with `--poll-us 0`). A worker that shares its core
//! therefore goes to sleep as soon as it is idle; one on its own core polls within its
//! window ([`crate::poll_window`]). Daemon CPU per million I/Os, before and after, in the
//! same benchmark rounds: 128 KiB sequential writes 31.7 -> 26.1 CPU-seconds, 4 KiB random
//! writes 63.3 -> 52.3 (BENCHMARKS.md).
//!
//! **Telling the two apart.** A worker sharing its core is preempted over and over (about
//! 50,000 involuntary context switches a second in the signalling run above, 15,000 in
//! the write run), one on its own core almost never (under 20 a second). [`CoreSharing`]
//! reads the thread's involuntary context switch count (one `getrusage` call) each time
//! the worker enters its poll loop, at most every [`CHECK_EVERY`], and takes the core as
//! shared while the rate is above [`SHARED_RATE`].

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How often the context switch count is read, at most.
pub const CHECK_EVERY: Duration = Duration::from_millis(4);

/// Involuntary context switches a second above which the worker is taken to share its
/// core. Between the two measured regimes (about 20 and 50,000) by a
/// wide margin either side; other load on the core also counts, and batching is then
/// the better choice as well.
pub const SHARED_RATE: u64 = 2_000;

/// Whether a worker shares its core, as last measured (see the module docs).
pub struct CoreSharing {
    /// The worker has its core to itself: signal early, and poll.
    alone: Cell<bool>,
    /// When the count was last read, and what it was.
    last: Cell<Option<(Instant, u64)>>,
}

impl Default for CoreSharing {
    fn default() -> Self {
        CoreSharing {
            alone: Cell::new(true),
            last: Cell::new(None),
        }
    }
}

impl CoreSharing {
    /// Whether the worker has its core to itself: then it signals as each batch's first
    /// request completes (the driver permitting) and polls; otherwise it signals once per
    /// batch and sleeps when idle.
    pub fn alone(&self) -> bool {
        self.alone.get()
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
            self.alone.set(!shared(
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
    fn starts_alone_and_a_quiet_thread_stays_alone() {
        let p = CoreSharing::default();
        assert!(p.alone());
        let t0 = Instant::now();
        p.update(t0);
        p.update(t0 + CHECK_EVERY);
        // This test thread is not preempted 2,000 times a second.
        assert!(p.alone());
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
            let p = CoreSharing::default();
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
            p.alone()
        });
        let alone = writer.join().expect("writer thread");
        reader.join().expect("reader thread");
        assert!(
            !alone,
            "a writer preempted at every signal was taken to have its core to itself"
        );
    }
}

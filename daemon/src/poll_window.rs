//! How long a worker keeps polling after its last work: adapted to how long it actually
//! waits for the next one, as QEMU's event loop does with `poll-max-ns`.
//!
//! Polling pays when work comes back sooner than a sleep and wake-up would take (a busy
//! driver resubmitting, fast storage completing): the worker sees it at once and the
//! driver does not have to kick. It wastes a core when the next event is far away (slow
//! storage, 128 KiB writes, an idle guest): every request then costs a full window of
//! spinning. So the window starts closed, opens (4 µs, doubling up to the maximum) each
//! time work arrived within the maximum but later than the window allowed, and closes
//! again as soon as a wait is longer than the maximum.

use std::cell::Cell;
use std::time::Duration;

/// The first nonzero window.
const FIRST: Duration = Duration::from_micros(4);

/// A worker's current poll window, between zero and the configured maximum.
pub struct PollWindow {
    max: Duration,
    current: Cell<Duration>,
}

impl PollWindow {
    /// A closed window that may open up to `max` (`--poll-us`; zero never polls).
    pub fn new(max: Duration) -> PollWindow {
        PollWindow {
            max,
            current: Cell::new(Duration::ZERO),
        }
    }

    /// How long to keep polling after the last work.
    pub fn get(&self) -> Duration {
        self.current.get()
    }

    /// Records that the worker waited `waited` for its next work after going idle,
    /// polling or asleep, and adapts the window.
    pub fn waited(&self, waited: Duration) {
        let current = self.current.get();
        let next = if waited <= current {
            // Polling caught it: the window is right.
            current
        } else if waited > self.max {
            // Polling long enough to catch it would cost more than sleeping.
            Duration::ZERO
        } else if current.is_zero() {
            FIRST.min(self.max)
        } else {
            (current * 2).min(self.max)
        };
        self.current.set(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(32);

    #[test]
    fn starts_closed_and_opens_by_doubling_up_to_the_maximum() {
        let w = PollWindow::new(MAX);
        assert_eq!(w.get(), Duration::ZERO);
        let mut seen = Vec::new();
        for _ in 0..6 {
            w.waited(Duration::from_micros(30));
            seen.push(w.get().as_micros());
        }
        assert_eq!(seen, [4, 8, 16, 32, 32, 32]);
    }

    #[test]
    fn a_wait_the_window_covered_changes_nothing() {
        let w = PollWindow::new(MAX);
        w.waited(Duration::from_micros(10));
        w.waited(Duration::from_micros(10));
        assert_eq!(w.get(), Duration::from_micros(8));
        w.waited(Duration::from_micros(3));
        assert_eq!(w.get(), Duration::from_micros(8));
    }

    #[test]
    fn a_wait_longer_than_the_maximum_closes_it() {
        let w = PollWindow::new(MAX);
        for _ in 0..4 {
            w.waited(Duration::from_micros(20));
        }
        assert_eq!(w.get(), MAX);
        w.waited(Duration::from_micros(33));
        assert_eq!(w.get(), Duration::ZERO);
    }

    #[test]
    fn a_zero_maximum_never_opens() {
        let w = PollWindow::new(Duration::ZERO);
        w.waited(Duration::ZERO);
        w.waited(Duration::from_nanos(1));
        assert_eq!(w.get(), Duration::ZERO);
    }
}

//! Rate-limited logging for guest-triggered events.
//!
//! A guest can trigger an error per request, millions per second; each must not become a
//! journal line. We allow a burst of lines per one-second window and then count what we
//! drop, reporting the count when the next window opens.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines allowed per window.
const BURST: u64 = 10;
const WINDOW: Duration = Duration::from_secs(1);

/// A rate-limited warning logger, shareable between threads.
pub struct RateLimitedLog {
    window: Mutex<(Instant, u64)>,
    suppressed: AtomicU64,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        RateLimitedLog {
            window: Mutex::new((Instant::now(), 0)),
            suppressed: AtomicU64::new(0),
        }
    }
}

impl RateLimitedLog {
    /// Logs at warn level unless this window's budget is spent; returns whether it logged.
    pub fn warn(&self, msg: fmt::Arguments<'_>) -> bool {
        let Ok(mut w) = self.window.lock() else {
            return false;
        };
        let now = Instant::now();
        if now.duration_since(w.0) >= WINDOW {
            *w = (now, 0);
            let dropped = self.suppressed.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                log::warn!("{dropped} similar guest errors suppressed in the last window");
            }
        }
        if w.1 < BURST {
            w.1 += 1;
            drop(w);
            log::warn!("{msg}");
            true
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Messages dropped in the current window (for tests and metrics).
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses() {
        let log = RateLimitedLog::default();
        let logged = (0..100)
            .filter(|i| log.warn(format_args!("guest error {i}")))
            .count();
        assert_eq!(logged as u64, BURST);
        assert_eq!(log.suppressed(), 100 - BURST);
    }
}

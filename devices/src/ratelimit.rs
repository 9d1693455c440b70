//! Rate-limited logging for guest-triggered events.
//!
//! A guest can make every request fail, millions per second; each failure must not become
//! a journal line. A [`RateLimitedLog`] lets a burst of lines through per window, counts
//! what it drops, and reports that count ("N messages suppressed") before the first line
//! of the next window. Each device owns one ([`crate::blk::VirtioBlk::log`]), so every
//! message a guest can trigger on it shares one budget.

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines allowed per window by default.
pub const DEFAULT_BURST: u32 = 10;
/// The default window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(1);

struct Window {
    /// When the current window opened; `None` before the first line.
    start: Option<Instant>,
    /// Lines logged in it.
    used: u32,
    /// Lines dropped since the last report.
    suppressed: u64,
}

/// What [`RateLimitedLog::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Log the line; first report this many suppressed ones (0: none).
    Log { suppressed: u64 },
    /// Drop it.
    Drop,
}

/// A rate-limited logger, shareable between threads; `const`-constructible so it can be a
/// `static`.
pub struct RateLimitedLog {
    burst: u32,
    window: Duration,
    state: Mutex<Window>,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        RateLimitedLog::new(DEFAULT_BURST, DEFAULT_WINDOW)
    }
}

impl RateLimitedLog {
    /// At most `burst` lines per `window`.
    pub const fn new(burst: u32, window: Duration) -> RateLimitedLog {
        RateLimitedLog {
            burst,
            window,
            state: Mutex::new(Window {
                start: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// Logs at warn level unless this window's budget is spent; returns whether it logged.
    pub fn warn(&self, msg: fmt::Arguments<'_>) -> bool {
        self.log(log::Level::Warn, msg)
    }

    /// Logs at `level` unless this window's budget is spent; returns whether it logged.
    pub fn log(&self, level: log::Level, msg: fmt::Arguments<'_>) -> bool {
        match self.admit(Instant::now()) {
            Admit::Log { suppressed } => {
                if suppressed > 0 {
                    log::log!(
                        level,
                        "{suppressed} similar messages suppressed (more than {} per {:?})",
                        self.burst,
                        self.window
                    );
                }
                log::log!(level, "{msg}");
                true
            }
            Admit::Drop => false,
        }
    }

    /// Messages dropped and not yet reported (for tests and metrics).
    pub fn suppressed(&self) -> u64 {
        self.lock().suppressed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // The state is three counters, consistent after any panic: keep logging.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn admit(&self, now: Instant) -> Admit {
        let mut w = self.lock();
        let expired = w
            .start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            w.start = Some(now);
            w.used = 0;
        }
        if w.used < self.burst {
            w.used += 1;
            Admit::Log {
                suppressed: std::mem::take(&mut w.suppressed),
            }
        } else {
            w.suppressed += 1;
            Admit::Drop
        }
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
        assert_eq!(logged, DEFAULT_BURST as usize);
        assert_eq!(log.suppressed(), 100 - u64::from(DEFAULT_BURST));
    }

    #[test]
    fn next_window_reports_the_suppressed_count() {
        let log = RateLimitedLog::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(log.admit(t0), Admit::Log { suppressed: 0 });
        assert_eq!(log.admit(t0), Admit::Log { suppressed: 0 });
        assert_eq!(log.admit(t0), Admit::Drop);
        assert_eq!(log.admit(t0 + Duration::from_millis(999)), Admit::Drop);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(log.admit(t1), Admit::Log { suppressed: 2 });
        assert_eq!(log.admit(t1), Admit::Log { suppressed: 0 }, "reported once");
        assert_eq!(log.admit(t1), Admit::Drop);
    }
}

//! The daemon's orderly end, one path for SIGTERM/SIGINT and the control API's `shutdown`:
//! STOPPING=1 to systemd, [`Event::Shutdown`] to control clients, then every export
//! stopped as [`Exports::stop_all`] stops them (requests in flight answered, bounded by
//! each export's stop timeout; backends closed). The process exits once the last serve
//! loop has ended (the main thread waits for that).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::events::Event;
use crate::exports::Exports;
use crate::systemd::Notifier;

/// Begins the daemon's end once; see the module docs.
pub struct Shutdown {
    exports: Arc<Exports>,
    notifier: Arc<Notifier>,
    begun: AtomicBool,
}

impl Shutdown {
    /// The end of the daemon that runs `exports`, announced to `notifier`.
    pub fn new(exports: Arc<Exports>, notifier: Arc<Notifier>) -> Shutdown {
        Shutdown {
            exports,
            notifier,
            begun: AtomicBool::new(false),
        }
    }

    /// Starts stopping every export, on a thread of its own (the drains block), and
    /// returns at once. `reason`: `signal` or `command`. Whether this call began it
    /// (`false`: it had begun already).
    pub fn begin(&self, reason: &'static str) -> bool {
        if self.begun.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.notifier.stopping();
        self.exports.events().emit(Event::Shutdown { reason });
        let exports = self.exports.clone();
        let spawned = std::thread::Builder::new()
            .name("stop".into())
            .spawn(move || exports.stop_all());
        if let Err(e) = spawned {
            log::error!("starting the stop thread: {e}; exiting now");
            std::process::exit(1);
        }
        true
    }

    /// Whether the daemon's end has begun.
    pub fn begun(&self) -> bool {
        self.begun.load(Ordering::Acquire)
    }
}

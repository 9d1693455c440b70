//! What the daemon announces to control-API clients without being asked: an export
//! deleted (its last connection ended), the daemon shutting down. Each control client that
//! finished capability negotiation receives every event as a QMP-shaped
//! `{"event": ..., "data": ..., "timestamp": ...}` line ([`crate::control`]).
//!
//! Anything may emit, from any thread (the registry from a serve loop's end, the signal
//! thread): [`Events::emit`] never blocks and never fails. Nobody listening is normal;
//! a client that reads too slowly misses the oldest events and is told how many.

use serde::Serialize;
use tokio::sync::broadcast;

/// How many events a slow client may fall behind before it misses some.
const BACKLOG: usize = 64;

/// One event, named as QMP names events (upper case, underscores).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", content = "data", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Event {
    /// An export is gone: its serve loop ended after `export-del` (or a reload removed
    /// it), its socket is removed and its disk closed. The name may be used again.
    ExportDeleted {
        /// The export.
        name: String,
    },
    /// The daemon stops (SIGTERM, SIGINT or the `shutdown` command): every export stops
    /// once its requests in flight are answered, then the process exits.
    Shutdown {
        /// `signal` or `command`.
        reason: &'static str,
    },
}

/// The daemon's event channel: cheap to clone, one per daemon.
#[derive(Clone)]
pub struct Events(broadcast::Sender<Event>);

impl Default for Events {
    fn default() -> Events {
        Events(broadcast::channel(BACKLOG).0)
    }
}

impl Events {
    /// Announces `event` to every subscribed client.
    pub fn emit(&self, event: Event) {
        // An error only means that nobody listens.
        let _ = self.0.send(event);
    }

    /// A receiver of every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_as_qmp_names_them() {
        let json =
            serde_json::to_value(Event::ExportDeleted { name: "vm1".into() }).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"event": "EXPORT_DELETED", "data": {"name": "vm1"}})
        );
        let json = serde_json::to_value(Event::Shutdown { reason: "command" }).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"event": "SHUTDOWN", "data": {"reason": "command"}})
        );
    }

    #[test]
    fn every_subscriber_gets_every_event_and_nobody_listening_is_fine() {
        let events = Events::default();
        events.emit(Event::Shutdown { reason: "signal" });
        let mut a = events.subscribe();
        let mut b = events.subscribe();
        events.emit(Event::ExportDeleted { name: "x".into() });
        for rx in [&mut a, &mut b] {
            assert_eq!(
                rx.try_recv().expect("one event"),
                Event::ExportDeleted { name: "x".into() }
            );
            assert!(rx.try_recv().is_err(), "and only the one after subscribing");
        }
    }
}

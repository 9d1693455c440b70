//! Live migration of a test guest between QEMUs, each with its own vhost-user-blk server
//! on the same image (shared storage), driven through QMP: a [`Fleet`] starts the
//! [`Side`]s (one QEMU + one server each: a source that boots the guest, destinations that
//! wait with `-incoming`), moves the guest from one to the next (`migrate`, then
//! `query-migrate` until it ends), cancels, and reads each move's [`MigrationInfo`]
//! (total time, downtime). The guest's console continues on the destination's console; a
//! side the guest left is ended with QMP `quit` and its console and server log are kept
//! for failure messages. Boundary: processes and QMP; what the guest does is
//! `scripts/guest-init.sh`'s (test `migrate`), what must hold is the tests'.
//!
//! Guest RAM is a shared memfd (`run-vm.sh`, as for every guest: vhost-user needs it); it
//! is copied over the migration stream like any RAM. Destinations listen on a port the
//! kernel picks (`-incoming defer`, then `migrate-incoming tcp:127.0.0.1:0`, and the port
//! read back from `query-migrate`), so parallel test processes never race for a port.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::console::GuestRun;
use crate::daemon::Daemon;
use crate::image::Image;
use crate::qmp::{Qmp, QmpError};
use crate::server::Server;
use crate::vm::{Guest, GuestSlot, Vm, VmControl};

/// How long QEMU may take to create its QMP socket after start.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `query-migrate` is polled while a migration runs.
const POLL: Duration = Duration::from_millis(50);

/// Console lines that mean the guest's disk broke: the guest kernel's driver saw a broken
/// device or failed a request, QEMU was told a ring broke, or the guest test saw wrong
/// data (`CORODEV-ERROR`, e.g. a stale read).
pub const CONSOLE_ERRORS: [&str; 4] = [
    "is not a head",
    "I/O error",
    "vhost vring error",
    "CORODEV-ERROR",
];

/// One QEMU and its server. Dropped: QEMU killed (its process group), then the server.
pub struct Side {
    /// `A1`, `B2`, ...: the order sides were started in.
    pub name: String,
    /// The QMP connection to this QEMU.
    pub qmp: Qmp,
    /// The QEMU (run-vm.sh) and its console.
    pub vm: Vm,
    /// This side's vhost-user-blk server.
    pub daemon: Daemon,
    /// Where a destination listens (`tcp:127.0.0.1:PORT`); `None` for a source.
    pub incoming: Option<String>,
}

/// What `query-migrate` says about a migration.
#[derive(Debug, Clone)]
pub struct MigrationInfo {
    /// `setup`, `active`, `completed`, `failed`, `cancelling`, `cancelled`, ...; empty
    /// before any migration.
    pub status: String,
    /// `total-time`, ms: from the start to the end (or so far, while active).
    pub total_time_ms: Option<u64>,
    /// `downtime`, ms: how long the guest was stopped for the switch-over (completed only).
    pub downtime_ms: Option<u64>,
    /// `expected-downtime`, ms (while active).
    pub expected_downtime_ms: Option<u64>,
    /// `setup-time`, ms.
    pub setup_time_ms: Option<u64>,
    /// `ram.transferred`, bytes.
    pub ram_transferred: u64,
    /// `ram.remaining`, bytes: dirty (or in the first pass, not yet sent) RAM.
    pub ram_remaining: u64,
    /// `ram.dirty-sync-count`: dirty bitmap syncs (1 + the RAM passes after the first).
    pub dirty_syncs: u64,
    /// `ram.mbps`: throughput, megabits per second.
    pub mbps: f64,
    /// `error-desc`: why it failed.
    pub error: Option<String>,
    /// The whole reply.
    pub raw: Value,
}

impl MigrationInfo {
    /// Parses a `query-migrate` reply.
    pub fn from_reply(raw: Value) -> MigrationInfo {
        let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
        let ram = raw.get("ram").cloned().unwrap_or(Value::Null);
        MigrationInfo {
            status: raw
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            total_time_ms: num(&raw, "total-time"),
            downtime_ms: num(&raw, "downtime"),
            expected_downtime_ms: num(&raw, "expected-downtime"),
            setup_time_ms: num(&raw, "setup-time"),
            ram_transferred: num(&ram, "transferred").unwrap_or(0),
            ram_remaining: num(&ram, "remaining").unwrap_or(0),
            dirty_syncs: num(&ram, "dirty-sync-count").unwrap_or(0),
            mbps: ram.get("mbps").and_then(Value::as_f64).unwrap_or(0.0),
            error: raw
                .get("error-desc")
                .and_then(Value::as_str)
                .map(str::to_owned),
            raw,
        }
    }

    /// Whether the migration has ended (completed, failed or cancelled).
    pub fn ended(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }

    /// One line: status, times, RAM sent.
    pub fn summary(&self) -> String {
        let ms = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
        format!(
            "{} total {} ms, downtime {} ms, setup {} ms, {:.1} MiB RAM sent, {} dirty syncs, \
             {:.0} Mbit/s{}",
            self.status,
            ms(self.total_time_ms),
            ms(self.downtime_ms),
            ms(self.setup_time_ms),
            self.ram_transferred as f64 / f64::from(1 << 20),
            self.dirty_syncs,
            self.mbps,
            self.error
                .as_deref()
                .map_or(String::new(), |e| format!(" ({e})"))
        )
    }
}

/// A `CORODEV-PROGRESS` line of the guest's `restart`/`migrate`/`iobench` tests: its
/// numeric fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    fields: Vec<(String, u64)>,
}

impl Progress {
    /// The latest whole `CORODEV-PROGRESS` line of `console` (the file may end in the
    /// middle of one: `writes=1` of 12).
    pub fn latest(console: &str) -> Option<Progress> {
        let whole = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
        let line = whole
            .lines()
            .rev()
            .find(|l| l.contains("CORODEV-PROGRESS "))?;
        let start = line.find("CORODEV-PROGRESS ")?;
        let fields = line[start..]
            .split_whitespace()
            .filter_map(|w| {
                let (k, v) = w.split_once('=')?;
                Some((k.to_owned(), v.trim().parse().ok()?))
            })
            .collect();
        Some(Progress { fields })
    }

    /// A numeric field, 0 if absent.
    pub fn get(&self, key: &str) -> u64 {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map_or(0, |(_, v)| *v)
    }

    /// Whether the line has `key`.
    pub fn has(&self, key: &str) -> bool {
        self.fields.iter().any(|(k, _)| k == key)
    }
}

impl Side {
    /// `query-migrate` now.
    pub fn query_migrate(&mut self) -> MigrationInfo {
        MigrationInfo::from_reply(self.qmp.run("query-migrate", None))
    }

    /// `migrate-set-parameters` (e.g. `{"max-bandwidth": N, "downtime-limit": ms}`).
    pub fn set_parameters(&mut self, params: Value) {
        self.qmp.run("migrate-set-parameters", Some(params));
    }

    /// Starts migrating this side's guest to `dest`; QEMU's refusal (a migration blocker,
    /// e.g. a vhost-user backend without dirty-page logging) is the error.
    pub fn start_migration(&mut self, dest: &Side) -> Result<(), QmpError> {
        let uri = dest
            .incoming
            .as_deref()
            .unwrap_or_else(|| panic!("{} is not a migration destination", dest.name));
        self.qmp.execute("migrate", Some(json!({ "uri": uri })))?;
        Ok(())
    }

    /// Polls `query-migrate` until the migration has ended; panics past `timeout`.
    pub fn wait_migration(&mut self, timeout: Duration) -> MigrationInfo {
        self.wait_migration_until(timeout, MigrationInfo::ended)
    }

    /// Polls `query-migrate` (every 50 ms) until `done` holds for it; panics past
    /// `timeout`.
    pub fn wait_migration_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&MigrationInfo) -> bool,
    ) -> MigrationInfo {
        self.poll_migration_until(timeout, POLL, done)
    }

    /// [`wait_migration_until`](Self::wait_migration_until), polling every `every`.
    pub fn poll_migration_until(
        &mut self,
        timeout: Duration,
        every: Duration,
        done: impl Fn(&MigrationInfo) -> bool,
    ) -> MigrationInfo {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate();
            if done(&info) {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "{}: migration still {} after {timeout:?}: {}",
                self.name,
                info.status,
                info.summary()
            );
            std::thread::sleep(every);
        }
    }

    /// Migrates this side's guest to `dest` and waits until that ends, within `timeout`.
    /// Err: QEMU refused (its reason), or the migration ended other than completed.
    pub fn migrate_to(
        &mut self,
        dest: &mut Side,
        timeout: Duration,
    ) -> Result<MigrationInfo, String> {
        self.start_migration(dest).map_err(|e| {
            format!(
                "QEMU refused to migrate {} -> {}: {e}",
                self.name, dest.name
            )
        })?;
        let info = self.wait_migration(timeout);
        if info.status != "completed" {
            return Err(format!(
                "migration {} -> {} ended {}: {}",
                self.name,
                dest.name,
                info.status,
                info.summary()
            ));
        }
        Ok(info)
    }

    /// `query-status`: `running`, `paused`, `postmigrate`, `inmigrate`, ...
    pub fn run_state(&mut self) -> String {
        self.qmp.run("query-status", None)["status"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// Waits up to `timeout` for `query-status` to say `want`; the last state seen if it
    /// never did.
    pub fn wait_run_state(&mut self, want: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.run_state();
            if state == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(state);
            }
            std::thread::sleep(POLL);
        }
    }

    /// The guest's latest progress line on this side's console.
    pub fn progress(&self) -> Option<Progress> {
        Progress::latest(&self.vm.console())
    }

    /// The first console line that says the guest's disk broke.
    pub fn console_error(&self) -> Option<String> {
        self.vm
            .console()
            .lines()
            .find(|l| CONSOLE_ERRORS.iter().any(|e| l.contains(e)))
            .map(str::to_owned)
    }

    /// Console and server log, under this side's name.
    pub fn transcript(&self) -> String {
        format!(
            "--- {} console ---\n{}\n--- {} {:?} server log ---\n{}\n",
            self.name,
            self.vm.console(),
            self.name,
            self.daemon.kind(),
            self.daemon.all_logs()
        )
    }
}

/// The sides of one migration test: which server, on which image, with which guest, and
/// the one-guest lock for all of their QEMUs. Keeps the transcripts of retired sides.
pub struct Fleet<'a> {
    slot: GuestSlot,
    kind: Server,
    image: &'a Image,
    daemon_args: Vec<&'a str>,
    guest: Guest<'a>,
    started: u32,
    retired: Vec<String>,
}

impl<'a> Fleet<'a> {
    /// Sides of `kind` on `image`, each server started with `daemon_args` (corodev options,
    /// see [`Daemon::shared`]), each QEMU booting `guest`. Takes the one-guest lock.
    pub fn new(
        kind: Server,
        image: &'a Image,
        daemon_args: &[&'a str],
        guest: Guest<'a>,
    ) -> Fleet<'a> {
        Fleet {
            slot: GuestSlot::take(),
            kind,
            image,
            daemon_args: daemon_args.to_vec(),
            guest,
            started: 0,
            retired: Vec::new(),
        }
    }

    /// The server these sides run.
    pub fn kind(&self) -> Server {
        self.kind
    }

    fn side(&mut self, incoming: bool) -> Side {
        self.started += 1;
        let name = format!(
            "{}{}",
            if self.started % 2 == 1 { 'A' } else { 'B' },
            self.started.div_ceil(2)
        );
        let daemon = Daemon::shared(self.kind, self.image, &self.daemon_args, incoming);
        let control = VmControl {
            qmp: true,
            incoming: incoming.then(|| "defer".to_owned()),
        };
        let vm = Vm::start_in(&self.slot, daemon.socket(), &self.guest, &control);
        let path = vm
            .qmp_socket()
            .expect("started with a QMP socket")
            .to_owned();
        let qmp = Qmp::connect(&path, QMP_CONNECT_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "{name}: no QMP: {e}\n--- console ---\n{}\n--- server log ---\n{}",
                vm.console(),
                daemon.all_logs()
            )
        });
        let mut side = Side {
            name,
            qmp,
            vm,
            daemon,
            incoming: None,
        };
        if incoming {
            side.qmp.run(
                "migrate-incoming",
                Some(json!({ "uri": "tcp:127.0.0.1:0" })),
            );
            let info = side.qmp.run("query-migrate", None);
            let port = info["socket-address"]
                .as_array()
                .and_then(|a| a.first())
                .and_then(|a| a["port"].as_str())
                .unwrap_or_else(|| {
                    panic!("{}: no listening port in query-migrate: {info}", side.name)
                })
                .to_owned();
            side.incoming = Some(format!("tcp:127.0.0.1:{port}"));
        }
        side
    }

    /// A server and a QEMU that boots the guest.
    pub fn source(&mut self) -> Side {
        self.side(false)
    }

    /// A server and a QEMU waiting for a migration (`query-status` says `inmigrate`), its
    /// guest not booted.
    pub fn destination(&mut self) -> Side {
        self.side(true)
    }

    /// Ends `side`: QMP `quit` (a QEMU that no longer answers is killed), then its server;
    /// its console and server log are kept for [`transcript`](Self::transcript).
    pub fn retire(&mut self, mut side: Side) {
        let _ = side.qmp.execute("quit", None);
        if side.vm.wait_exit(Duration::from_secs(10)).is_none() {
            side.vm.kill();
        }
        self.retired.push(side.transcript());
    }

    /// Waits for the guest on `side` to finish its test and power off, then ends the side.
    /// The run's console is this side's (the guest's output since it arrived there); its
    /// server log is every server's, in order.
    pub fn finish(&mut self, side: Side) -> GuestRun {
        let Side {
            name,
            qmp,
            vm,
            mut daemon,
            ..
        } = side;
        drop(qmp);
        let kind = daemon.kind();
        let mut run = vm.wait_while(|| {
            daemon
                .wait_exit(Duration::ZERO)
                .map(|s| format!("the {kind:?} server of {name} exited ({s})"))
        });
        run.server_log = Some(format!(
            "{}--- {name} {kind:?} server log ---\n{}",
            self.retired.join(""),
            daemon.all_logs()
        ));
        run
    }

    /// Every retired side's console and server log, then those of `live`.
    pub fn transcript(&self, live: &[&Side]) -> String {
        let mut t = self.retired.join("");
        for s in live {
            t.push_str(&s.transcript());
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_query_migrate() {
        let done = MigrationInfo::from_reply(json!({
            "status": "completed", "total-time": 2345, "downtime": 31, "setup-time": 4,
            "ram": {"transferred": 52428800, "dirty-sync-count": 3, "mbps": 268.5}
        }));
        assert!(done.ended());
        assert_eq!(done.total_time_ms, Some(2345));
        assert_eq!(done.downtime_ms, Some(31));
        assert_eq!(done.dirty_syncs, 3);
        assert_eq!(done.ram_transferred, 50 << 20);
        assert!(done.summary().contains("downtime 31 ms"));
        let active =
            MigrationInfo::from_reply(json!({"status": "active", "expected-downtime": 300}));
        assert!(!active.ended());
        assert_eq!(active.downtime_ms, None);
        let failed = MigrationInfo::from_reply(
            json!({"status": "failed", "error-desc": "Unable to write to socket"}),
        );
        assert!(failed.ended());
        assert!(failed.summary().contains("Unable to write"));
        assert_eq!(MigrationInfo::from_reply(json!({})).status, "");
    }

    #[test]
    fn latest_whole_progress_line() {
        let console = "CORODEV-PROGRESS name=migrate writes=2 bytes=1 errors=0 t=1.5\n\
            noise\r\n\x1b[0mCORODEV-PROGRESS name=migrate writes=17 bytes=9 errors=1 fills=3 \
            checks=12 t=2.25\r\nCORODEV-PROGRESS name=migrate writes=1";
        let p = Progress::latest(console).expect("a progress line");
        assert_eq!(p.get("writes"), 17);
        assert_eq!(p.get("errors"), 1);
        assert_eq!(p.get("checks"), 12);
        assert!(p.has("fills"));
        assert!(!p.has("name"), "not a number");
        assert!(!p.has("t"), "not an integer");
        assert_eq!(p.get("missing"), 0);
        assert_eq!(Progress::latest("nothing\n"), None);
    }
}

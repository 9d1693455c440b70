//! Live migration with a real guest (issue 17): a Linux guest under QEMU (TCG) does verified
//! I/O on a vhost-user-blk disk (`scripts/guest-init.sh`, test `migrate`: 4 writers whose
//! every O_DIRECT write is read back and compared, and a reader that has the device write
//! fresh data into page-cache pages and checks it from there again and again) while it is
//! moved between QEMUs over loopback TCP, each QEMU with its own server on the same image.
//!
//! - `there_and_back_*`: five moves there and back (ten in all) between fresh QEMU + server
//!   pairs, 1 queue and 2 queues (2 vCPUs).
//! - `cancelled_migrations_leave_the_source_running`: a migration cancelled mid-way
//!   (`migrate_cancel`) and one whose destination QEMU is killed mid-way; the guest must
//!   keep running on the source with no I/O error, and a third migration must then
//!   complete.
//!
//! Dirty-page logging: every move is held after its first pass over guest RAM until the
//! reader has filled pages that pass already sent (see `MOVE_BPS`). A server that does not
//! mark the guest pages it writes dirty leaves them stale on the destination, where the
//! reader's next check fails. Checked against a corodev build that offers
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD` and marks nothing: a stale read at each of the ten
//! moves.
//!
//! After the last move the host writes the stop word; the guest then checks every block it
//! wrote and its kernel log, and the host image must hold what it wrote (md5). 0 I/O errors,
//! 0 stale reads. Each move's total time and downtime (QMP `query-migrate`) are printed.
//!
//! QEMU refuses to migrate a VM whose vhost-user backend cannot log dirty pages; the test
//! then fails at the first move with QEMU's reason. `CORODEV_TEST_SERVER=qsd` runs the same
//! against qemu-storage-daemon.

use std::time::{Duration, Instant};

use integration::{Fleet, Guest, Image, MigrationInfo, Progress, Server, Side};
use serde_json::json;

const MIB: u64 = 1 << 20;
/// The image: the writers' 4 regions of 4 MiB from offset 0, the reader's 1 MiB at 32 MiB,
/// the stop word in the last 4 KiB.
const IMAGE_SIZE: u64 = 64 * MIB;
const WRITERS: u64 = 4;
const REGIONS_LEN: u64 = 16 * MIB;
const READ_AT: u64 = 32 * MIB;
const READ_LEN: u64 = MIB;
/// Moves in `there_and_back_*`: there and back five times.
const MOVES: usize = 10;
/// Guest limits: its own run cap (corodev.arg, in case the stop word never comes) and each
/// QEMU's.
const GUEST_RUN_CAP_S: &str = "280";
const VM_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the guest may take to boot and start its I/O, and to make progress after a
/// move or a cancelled migration.
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);
/// One migration of a 256 MiB TCG guest over loopback takes a few seconds.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Verified writes and reader checks the guest must complete after each move (or
/// cancelled migration) before the next one.
const WRITES_BETWEEN: u64 = 3;
const CHECKS_BETWEEN: u64 = 2;
/// A slow migration, to act on one while it runs: the guest's non-zero RAM takes tens of
/// seconds at this rate. It is acted on once this much RAM has been sent.
const SLOW_BPS: u64 = 4 * MIB;
const SENT_BEFORE_ACTING: u64 = 8 * MIB;
/// A move is held after its first pass over guest RAM (about 1.5 s for this guest at
/// QEMU's default `max-bandwidth`, `MOVE_BPS`) until the guest's reader has filled pages
/// that pass already sent, `HOLD_FILLS` times; only then may it switch over (QEMU's default
/// `downtime-limit`). A server that does not mark the pages it writes dirty leaves them
/// stale on the destination. Without the hold most fills land before their pages are sent
/// (a move at full speed takes ~1.5 s, not much more than one reader cycle): a corodev
/// build that logs nothing was caught only at move 4 of one run, at move 1 of another;
/// with the hold, at each of the ten moves.
///
/// The hold: a `downtime-limit` of 1 ms, which the running guest cannot meet, with a
/// `max-bandwidth` (`HOLD_BPS`) that QEMU must already measure when the first pass ends
/// (it is set once `SLOW_DOWN_AT` of the first pass is left): QEMU's threshold for the
/// switch-over is the bandwidth it measured over the last 100 ms times the limit. At full
/// bandwidth that is 128 KiB, which QEMU then tries to reach by syncing the dirty bitmap
/// back to back, each sync under QEMU's big lock: the guest stalls, and with it the
/// dirtying, and the migration may complete without a hold.
const MOVE_BPS: u64 = 128 * MIB;
const HOLD_BPS: u64 = 8 * MIB;
const SLOW_DOWN_AT: u64 = 16 * MIB;
const HOLD_DOWNTIME_MS: u64 = 1;
const HOLD_FILLS: u64 = 2;
const FINAL_DOWNTIME_MS: u64 = 300;

#[test]
fn there_and_back_one_queue() {
    there_and_back(1);
}

#[test]
fn there_and_back_two_queues() {
    there_and_back(2);
}

fn guest(queues: u16) -> Guest<'static> {
    let mut g = Guest::test("migrate").queues(queues);
    g.arg = Some(GUEST_RUN_CAP_S);
    g.timeout = VM_TIMEOUT;
    // Fresh page-cache pages keep their old content until the device writes them (not
    // zeroes the CPU writes, and so marks dirty, at allocation): see guest-init.sh.
    g.kernel_args = &["init_on_alloc=0"];
    g
}

/// The guest's counters on `side` until `done` holds; fails the test on a guest I/O error,
/// a console line saying the disk broke, the guest or the server ending, or no progress
/// within `timeout`.
fn wait_progress(
    fleet: &Fleet<'_>,
    side: &mut Side,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Progress) -> bool,
) -> Progress {
    let deadline = Instant::now() + timeout;
    loop {
        let p = side.progress().unwrap_or_default();
        if let Some(line) = side.console_error() {
            fail_on(fleet, side, what, &format!("the console says {line:?}"));
        }
        if p.get("errors") > 0 {
            let why = format!(
                "the guest counted {} error(s): failed or mismatching I/O, or stale reads",
                p.get("errors")
            );
            fail_on(fleet, side, what, &why);
        }
        if done(&p) {
            return p;
        }
        if !side.vm.running() {
            fail_on(fleet, side, what, "the guest's QEMU ended");
        }
        if let Some(status) = side.daemon.wait_exit(Duration::ZERO) {
            fail_on(fleet, side, what, &format!("the server exited ({status})"));
        }
        if Instant::now() >= deadline {
            let why = format!(
                "no progress within {timeout:?}: the guest is at writes={} checks={}",
                p.get("writes"),
                p.get("checks")
            );
            fail_on(fleet, side, what, &why);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Panics with `what`, `why` and every side's console and server log.
fn fail_on(fleet: &Fleet<'_>, side: &Side, what: &str, why: &str) -> ! {
    panic!(
        "{what}, on {}: {why}\n{}",
        side.name,
        fleet.transcript(&[side])
    )
}

/// Waits until the guest has done `WRITES_BETWEEN` more verified writes and
/// `CHECKS_BETWEEN` more reader checks on `side` than `since`.
fn wait_more(fleet: &Fleet<'_>, side: &mut Side, since: &Progress, what: &str) -> Progress {
    let (w, c) = (since.get("writes"), since.get("checks"));
    wait_progress(fleet, side, what, PROGRESS_TIMEOUT, |p| {
        p.get("writes") >= w + WRITES_BETWEEN && p.get("checks") >= c + CHECKS_BETWEEN
    })
}

/// Moves the guest from `from` to a fresh destination (see `MOVE_BPS` for the hold after
/// the first pass over RAM) and checks both ends: the migration completed, the source is
/// paused for good (`postmigrate`), the guest runs on the destination and goes on with its
/// I/O. Returns the destination and the migration's figures.
fn move_guest(fleet: &mut Fleet<'_>, mut from: Side, n: usize) -> (Side, MigrationInfo, Move) {
    let mut to = fleet.destination();
    from.set_parameters(json!({
        "max-bandwidth": MOVE_BPS,
        "downtime-limit": HOLD_DOWNTIME_MS
    }));
    let t = Instant::now();
    if let Err(e) = from.start_migration(&to) {
        panic!(
            "move {n}: QEMU refused to migrate {} -> {}: {e}\n{}",
            from.name,
            to.name,
            fleet.transcript(&[&from, &to])
        );
    }
    // Slow down for the end of the first pass (see HOLD_BPS), which is over once QEMU syncs
    // the dirty bitmap a second time.
    let tail = from.poll_migration_until(MIGRATION_TIMEOUT, Duration::from_millis(10), |i| {
        i.ended() || i.dirty_syncs >= 2 || (i.ram_transferred > 0 && i.ram_remaining < SLOW_DOWN_AT)
    });
    from.set_parameters(json!({ "max-bandwidth": HOLD_BPS }));
    let first_pass =
        from.wait_migration_until(MIGRATION_TIMEOUT, |i| i.ended() || i.dirty_syncs >= 2);
    assert_eq!(
        first_pass.status,
        "active",
        "move {n}: the migration ended before the hold: {} (slowed down at {})",
        first_pass.summary(),
        tail.summary()
    );
    let first_pass_time = t.elapsed();
    let fills_at = from.progress().unwrap_or_default().get("fills");
    let held = wait_progress(
        fleet,
        &mut from,
        &format!("move {n}, hold"),
        PROGRESS_TIMEOUT,
        |p| p.get("fills") >= fills_at + HOLD_FILLS,
    );
    let hold = from.query_migrate();
    assert_eq!(
        hold.status,
        "active",
        "move {n}: the migration must not switch over during the hold: {}",
        hold.summary()
    );
    let hold_time = t.elapsed() - first_pass_time;
    from.set_parameters(json!({
        "max-bandwidth": MOVE_BPS,
        "downtime-limit": FINAL_DOWNTIME_MS
    }));
    let info = from.wait_migration(MIGRATION_TIMEOUT);
    if info.status != "completed" {
        panic!(
            "move {n}: migration {} -> {} ended {}: {}\n{}",
            from.name,
            to.name,
            info.status,
            info.summary(),
            fleet.transcript(&[&from, &to])
        );
    }
    let at_switch = from.progress().unwrap_or_default();
    if let Err(state) = from.wait_run_state("postmigrate", Duration::from_secs(10)) {
        panic!(
            "move {n}: the source {} is {state:?} after the migration, not postmigrate",
            from.name
        );
    }
    if let Err(state) = to.wait_run_state("running", Duration::from_secs(10)) {
        panic!(
            "move {n}: the destination {} is {state:?} after the migration, not running\n{}",
            to.name,
            fleet.transcript(&[&from, &to])
        );
    }
    for (what, v) in [
        ("total-time", info.total_time_ms),
        ("downtime", info.downtime_ms),
    ] {
        assert!(
            v.is_some(),
            "move {n}: query-migrate has no {what}: {}",
            info.raw
        );
    }
    let route = format!("{}->{}", from.name, to.name);
    fleet.retire(from);
    let after = wait_more(fleet, &mut to, &at_switch, &format!("after move {n}"));
    let m = Move {
        route,
        first_pass: first_pass_time,
        hold: hold_time,
        hold_fills: held.get("fills") - fills_at,
        checks_after: after.get("checks") - at_switch.get("checks"),
        writes_after: after.get("writes") - at_switch.get("writes"),
    };
    (to, info, m)
}

/// What the guest did around one move.
struct Move {
    route: String,
    /// From `migrate` to the end of the first pass over RAM.
    first_pass: Duration,
    /// The hold after it, and the reader fills in it: reads that landed in guest memory
    /// the first pass had already sent.
    hold: Duration,
    hold_fills: u64,
    /// Verified writes and reader checks on the destination before the next move.
    writes_after: u64,
    checks_after: u64,
}

impl Move {
    fn describe(&self, info: &MigrationInfo) -> String {
        format!(
            "{:<7} {}; first pass {:.1} s, then {} reader fills in {:.1} s of hold; then {} \
             writes, {} checks on the destination",
            self.route,
            info.summary(),
            self.first_pass.as_secs_f64(),
            self.hold_fills,
            self.hold.as_secs_f64(),
            self.writes_after,
            self.checks_after
        )
    }
}

/// The guest's final verdict, checked in full against the host's image.
fn check_final(fleet: &mut Fleet<'_>, side: Side, image: &Image) -> (u64, u64, u64) {
    image.tell_guest_to_stop();
    let run = fleet.finish(side);
    let r = run.expect_pass();
    assert_eq!(
        r.get("stopped"),
        "host",
        "the guest must stop on the host's word"
    );
    assert_eq!(r.num("writers"), WRITERS);
    assert_eq!(r.num("errors"), 0, "guest I/O errors");
    assert_eq!(r.num("stale"), 0, "stale reads");
    assert_eq!(r.get("dmesg"), "clean", "guest kernel log");
    assert_eq!(
        r.get("init_on_alloc"),
        "0",
        "the reader's check needs init_on_alloc=0"
    );
    assert!(r.num("checks") > 0 && r.num("fills") > 0, "the reader ran");
    assert_eq!((r.num("offset"), r.num("length")), (0, REGIONS_LEN));
    assert_eq!(
        (r.num("read_offset"), r.num("read_length")),
        (READ_AT, READ_LEN)
    );
    assert_eq!(
        image.md5(0, REGIONS_LEN as usize),
        r.get("md5"),
        "the host image must hold exactly what the guest wrote"
    );
    assert_eq!(
        image.md5(READ_AT, READ_LEN as usize),
        r.get("read_md5"),
        "the reader's regions on the host image"
    );
    eprintln!(
        "migration: guest verified {} writes ({} MiB), {} reader checks of {} fills, every \
         block at the end; 0 errors, 0 stale; host image md5 {} matches",
        r.num("writes"),
        r.num("bytes") / MIB,
        r.num("checks"),
        r.num("fills"),
        r.get("md5")
    );
    (r.num("writes"), r.num("checks"), r.num("fills"))
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn there_and_back(queues: u16) {
    let started = Instant::now();
    let kind = Server::from_env();
    let image = Image::new(IMAGE_SIZE);
    let q = queues.to_string();
    let mut fleet = Fleet::new(kind, &image, &["--num-queues", &q], guest(queues));
    eprintln!("migration: {kind:?}, {queues} queue(s), {MOVES} moves");
    let mut side = fleet.source();
    let start = wait_progress(&fleet, &mut side, "guest start", BOOT_TIMEOUT, |p| {
        p.get("writes") >= WRITES_BETWEEN && p.get("checks") >= CHECKS_BETWEEN
    });
    eprintln!(
        "migration: guest doing I/O ({} writes, {} checks) after {:.1} s",
        start.get("writes"),
        start.get("checks"),
        started.elapsed().as_secs_f64()
    );
    let mut infos = Vec::new();
    let mut moves = Vec::new();
    for n in 1..=MOVES {
        let (to, info, m) = move_guest(&mut fleet, side, n);
        eprintln!("migration: move {n:>2} {}", m.describe(&info));
        side = to;
        infos.push(info);
        moves.push(m);
    }
    check_final(&mut fleet, side, &image);
    let total: Vec<u64> = infos.iter().filter_map(|i| i.total_time_ms).collect();
    let down: Vec<u64> = infos.iter().filter_map(|i| i.downtime_ms).collect();
    let fills: u64 = moves.iter().map(|m| m.hold_fills).sum();
    eprintln!(
        "migration: {kind:?}, {queues} queue(s): {MOVES} moves, median total {} ms, median \
         downtime {} ms; {fills} reader fills into pages already sent; {:.1} s in all",
        median(total),
        median(down),
        started.elapsed().as_secs_f64()
    );
}

/// Starts a slow migration from `src` to a fresh destination and waits until it has sent
/// `SENT_BEFORE_ACTING` of RAM with the guest's I/O going on meanwhile (dirty logging on);
/// returns the destination.
fn start_slow_migration(fleet: &mut Fleet<'_>, src: &mut Side, what: &str) -> Side {
    let dest = fleet.destination();
    src.set_parameters(json!({ "max-bandwidth": SLOW_BPS }));
    let before = src.progress().unwrap_or_default();
    if let Err(e) = src.start_migration(&dest) {
        panic!(
            "{what}: QEMU refused to migrate {} -> {}: {e}\n{}",
            src.name,
            dest.name,
            fleet.transcript(&[src, &dest])
        );
    }
    let info = src.wait_migration_until(MIGRATION_TIMEOUT, |i| {
        i.ended() || (i.status == "active" && i.ram_transferred >= SENT_BEFORE_ACTING)
    });
    assert_eq!(
        info.status,
        "active",
        "{what}: the slow migration must still run: {}",
        info.summary()
    );
    // The guest's I/O goes on while RAM is being copied.
    wait_more(fleet, src, &before, &format!("{what}, while migrating"));
    let info = src.query_migrate();
    assert_eq!(
        info.status,
        "active",
        "{what}: the slow migration ended early: {}",
        info.summary()
    );
    eprintln!("migration: {what}: acting on it at {}", info.summary());
    dest
}

/// After a migration that did not complete: the source runs its guest on, the I/O goes on
/// without errors.
fn source_runs_on(fleet: &Fleet<'_>, src: &mut Side, what: &str) {
    if let Err(state) = src.wait_run_state("running", Duration::from_secs(10)) {
        panic!(
            "{what}: the source is {state:?}, not running\n{}",
            fleet.transcript(&[src])
        );
    }
    let now = src.progress().unwrap_or_default();
    let after = wait_more(fleet, src, &now, &format!("after {what}"));
    eprintln!(
        "migration: {what}: the source runs on ({} writes, {} checks so far)",
        after.get("writes"),
        after.get("checks")
    );
}

#[test]
fn cancelled_migrations_leave_the_source_running() {
    let started = Instant::now();
    let kind = Server::from_env();
    let image = Image::new(IMAGE_SIZE);
    let mut fleet = Fleet::new(kind, &image, &["--num-queues", "1"], guest(1));
    eprintln!("migration: {kind:?}: a cancelled migration, a killed destination, then a move");
    let mut src = fleet.source();
    wait_progress(&fleet, &mut src, "guest start", BOOT_TIMEOUT, |p| {
        p.get("writes") >= WRITES_BETWEEN && p.get("checks") >= CHECKS_BETWEEN
    });

    // 1. migrate_cancel mid-way.
    let mut dest = start_slow_migration(&mut fleet, &mut src, "cancel");
    src.qmp.run("migrate_cancel", None);
    let info = src.wait_migration(MIGRATION_TIMEOUT);
    assert_eq!(
        info.status,
        "cancelled",
        "migrate_cancel: {}",
        info.summary()
    );
    // The destination's incoming migration broke off: that QEMU ends by itself.
    let dest_ended = dest.vm.wait_exit(Duration::from_secs(30)).is_some();
    let dest_name = dest.name.clone();
    fleet.retire(dest);
    assert!(
        dest_ended,
        "the destination {dest_name} of the cancelled migration still runs"
    );
    source_runs_on(&fleet, &mut src, "the cancelled migration");

    // 2. The destination QEMU dies mid-way.
    let mut dest = start_slow_migration(&mut fleet, &mut src, "killed destination");
    dest.vm.kill();
    let info = src.wait_migration(MIGRATION_TIMEOUT);
    assert_eq!(
        info.status,
        "failed",
        "a migration whose destination died: {}",
        info.summary()
    );
    eprintln!("migration: killed destination: {}", info.summary());
    fleet.retire(dest);
    source_runs_on(&fleet, &mut src, "the killed destination");

    // 3. A migration now completes.
    let (side, info, m) = move_guest(&mut fleet, src, 1);
    eprintln!("migration: then move {}", m.describe(&info));
    check_final(&mut fleet, side, &image);
    eprintln!(
        "migration: {kind:?}: cancel, killed destination and move in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

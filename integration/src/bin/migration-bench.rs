//! One live-migration measurement run for `scripts/bench-migration.sh`: a TCG guest under
//! steady I/O (`scripts/guest-init.sh` test `iobench`: fio 4 KiB random reads and writes in
//! back-to-back windows) on one server (corodev or qemu-storage-daemon), and
//!
//! 1. **the cost of dirty logging while it is on**: phases without and with a migration
//!    running, in turn (`off on off ...`). A phase "on" is a migration to a fresh
//!    destination held far from completion (`max-bandwidth` --slow-bps, `downtime-limit`
//!    1 ms), so that dirty-page logging stays on in QEMU and in the server for the whole
//!    phase, then cancelled. Per fio window wholly inside a phase: guest IOPS, and the
//!    server's CPU time per I/O (utime + stime from /proc, sampled when the window's line
//!    appears on the console). Under TCG, QEMU's own tracking of the guest's RAM writes
//!    slows the guest in an "on" phase too, whatever the server; that part is the same for
//!    both servers, so compare the drops, and the server's CPU per I/O, between servers.
//! 2. **migration time and downtime**: one migration at QEMU's defaults (or
//!    --max-bandwidth) to a fresh destination, under the same load: `total-time` and
//!    `downtime` from `query-migrate`. The guest must go on doing I/O on the destination.
//!
//! Prints progress to stderr and one `RESULT key=value ...` line to stdout.

use std::time::{Duration, Instant};

use integration::{Fleet, Guest, Image, Progress, Server, Side};
use serde_json::json;

const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 64 * MIB;

struct Opts {
    server: Server,
    queues: u16,
    window_s: u64,
    phases: usize,
    phase_windows: u64,
    slow_bps: u64,
    max_bandwidth: Option<u64>,
}

fn usage() -> ! {
    eprintln!(
        "usage: migration-bench --server corodev|qsd [--queues N] [--window SECONDS] \
         [--phases N (odd: off on off ...)] [--phase-windows N] [--slow-bps BYTES] \
         [--max-bandwidth BYTES]"
    );
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut o = Opts {
        server: Server::Corodev,
        queues: 1,
        window_s: 3,
        phases: 3,
        phase_windows: 3,
        slow_bps: MIB,
        max_bandwidth: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        let mut num = || value().parse::<u64>().unwrap_or_else(|_| usage());
        match a.as_str() {
            "--server" => {
                o.server = match value().as_str() {
                    "corodev" => Server::Corodev,
                    "qsd" => Server::Qsd,
                    _ => usage(),
                }
            }
            "--queues" => o.queues = u16::try_from(num()).unwrap_or_else(|_| usage()),
            "--window" => o.window_s = num(),
            "--phases" => o.phases = usize::try_from(num()).unwrap_or_else(|_| usage()),
            "--phase-windows" => o.phase_windows = num(),
            "--slow-bps" => o.slow_bps = num(),
            "--max-bandwidth" => o.max_bandwidth = Some(num()),
            _ => usage(),
        }
    }
    if o.queues == 0 || o.window_s == 0 || o.phase_windows == 0 || o.phases % 2 == 0 {
        usage();
    }
    o
}

/// One fio window as the host saw it.
#[derive(Clone, Copy)]
struct Window {
    index: u64,
    ios: u64,
    iops: u64,
    /// Server CPU seconds since the previous window's line appeared.
    cpu_s: f64,
}

/// Follows the guest's windows on one side, sampling its server's CPU time at each.
struct Watch {
    last_index: u64,
    last_cpu: f64,
}

impl Watch {
    fn new(side: &Side) -> Watch {
        let p = side.progress().unwrap_or_default();
        Watch {
            last_index: p.get("window"),
            last_cpu: side.daemon.cpu_seconds(),
        }
    }

    /// Waits for the next window line (each one, in order; a window is skipped only if two
    /// lines appear within one poll, and then has no CPU figure of its own).
    fn next(&mut self, fleet: &Fleet<'_>, side: &mut Side, timeout: Duration) -> Window {
        let deadline = Instant::now() + timeout;
        loop {
            let p: Progress = side.progress().unwrap_or_default();
            if p.get("window") > self.last_index {
                let cpu = side.daemon.cpu_seconds();
                let w = Window {
                    index: p.get("window"),
                    ios: p.get("ios"),
                    iops: p.get("iops"),
                    cpu_s: cpu - self.last_cpu,
                };
                let skipped = p.get("window") > self.last_index + 1;
                self.last_index = w.index;
                self.last_cpu = cpu;
                if p.get("errors") > 0 {
                    die(fleet, side, &format!("fio failed in the guest: {p:?}"));
                }
                if !skipped {
                    return w;
                }
                continue;
            }
            if let Some(line) = side.console_error() {
                die(fleet, side, &format!("the console says {line:?}"));
            }
            if !side.vm.running() {
                die(fleet, side, "the guest's QEMU ended");
            }
            if Instant::now() >= deadline {
                die(fleet, side, &format!("no fio window within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn die(fleet: &Fleet<'_>, side: &Side, why: &str) -> ! {
    eprintln!("{}", fleet.transcript(&[side]));
    panic!("migration-bench on {}: {why}", side.name)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() {
    let o = parse_args();
    let label = match o.server {
        Server::Corodev => "corodev",
        Server::Qsd => "qsd",
    };
    if o.server == Server::Corodev {
        eprintln!(
            "migration-bench: corodev {}",
            integration::corodev_bin().display()
        );
    }
    let image = Image::new(IMAGE_SIZE);
    let q = o.queues.to_string();
    let window_arg = o.window_s.to_string();
    let mut guest = Guest::test("iobench").queues(o.queues);
    guest.arg = Some(&window_arg);
    guest.timeout = Duration::from_secs(900);
    let mut fleet = Fleet::new(o.server, &image, &["--num-queues", &q], guest);
    let window_timeout = Duration::from_secs(o.window_s * 4 + 30);
    let mut src = fleet.source();
    let mut watch = Watch::new(&src);
    // Boot, then two windows of warm-up.
    for _ in 0..2 {
        watch.next(&fleet, &mut src, Duration::from_secs(150));
    }

    // 1. Phases off / on.
    let mut off: Vec<Window> = Vec::new();
    let mut on: Vec<Window> = Vec::new();
    for phase in 0..o.phases {
        let logging = phase % 2 == 1;
        let mut dest = None;
        if logging {
            let d = fleet.destination();
            src.set_parameters(json!({ "max-bandwidth": o.slow_bps, "downtime-limit": 1 }));
            if let Err(e) = src.start_migration(&d) {
                die(&fleet, &src, &format!("QEMU refused to migrate: {e}"));
            }
            let info = src.wait_migration_until(Duration::from_secs(60), |i| {
                i.ended() || i.status == "active"
            });
            if info.status != "active" {
                die(
                    &fleet,
                    &src,
                    &format!("migration not active: {}", info.summary()),
                );
            }
            dest = Some(d);
        }
        // The window running when the phase began is not counted.
        let first = watch.next(&fleet, &mut src, window_timeout);
        let mut got = Vec::new();
        for _ in 0..o.phase_windows {
            got.push(watch.next(&fleet, &mut src, window_timeout));
        }
        if let Some(d) = dest {
            let info = src.query_migrate();
            if info.status != "active" {
                die(
                    &fleet,
                    &src,
                    &format!(
                        "the slow migration ended inside its phase ({}); lower --slow-bps",
                        info.summary()
                    ),
                );
            }
            src.qmp.run("migrate_cancel", None);
            let end = src.wait_migration(Duration::from_secs(60));
            eprintln!(
                "migration-bench: {label}: logging phase: migration {}, then {}",
                info.summary(),
                end.status
            );
            fleet.retire(d);
        }
        let iops: Vec<String> = got.iter().map(|w| w.iops.to_string()).collect();
        eprintln!(
            "migration-bench: {label}: phase {} ({}): windows {}..{} iops {}",
            phase + 1,
            if logging {
                "migrating, logging on"
            } else {
                "no migration"
            },
            first.index + 1,
            first.index + o.phase_windows,
            iops.join(" ")
        );
        if logging { &mut on } else { &mut off }.extend(got);
    }

    // 2. One migration to the end.
    let params = match o.max_bandwidth {
        Some(b) => json!({ "max-bandwidth": b, "downtime-limit": 300 }),
        None => json!({ "max-bandwidth": 128 * MIB, "downtime-limit": 300 }),
    };
    src.set_parameters(params);
    let mut dest = fleet.destination();
    let info = src
        .migrate_to(&mut dest, Duration::from_secs(120))
        .unwrap_or_else(|why| die(&fleet, &src, &why));
    eprintln!("migration-bench: {label}: migration {}", info.summary());
    fleet.retire(src);
    let mut watch = Watch::new(&dest);
    let mut after = Vec::new();
    for _ in 0..2 {
        after.push(watch.next(&fleet, &mut dest, window_timeout));
    }
    image.tell_guest_to_stop();
    let run = fleet.finish(dest);
    run.expect_pass();

    let iops = |v: &[Window]| median(v.iter().map(|w| w.iops as f64).collect());
    let cpu_us = |v: &[Window]| {
        median(
            v.iter()
                .filter(|w| w.ios > 0)
                .map(|w| w.cpu_s / w.ios as f64 * 1e6)
                .collect(),
        )
    };
    let ms = |v: Option<u64>| v.map_or("nan".to_owned(), |v| v.to_string());
    println!(
        "RESULT server={label} queues={} total_ms={} downtime_ms={} setup_ms={} ram_mib={:.1} \
         dirty_syncs={} iops_off={:.0} iops_on={:.0} iops_after={:.0} cpu_us_per_io_off={:.2} \
         cpu_us_per_io_on={:.2}",
        o.queues,
        ms(info.total_time_ms),
        ms(info.downtime_ms),
        ms(info.setup_time_ms),
        info.ram_transferred as f64 / MIB as f64,
        info.dirty_syncs,
        iops(&off),
        iops(&on),
        iops(&after),
        cpu_us(&off),
        cpu_us(&on),
    );
}

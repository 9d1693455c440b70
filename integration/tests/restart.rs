//! Crash-safe restart with a real guest (issue 11): a Linux guest under QEMU does verified
//! O_DIRECT I/O on a corodev disk (`scripts/guest-init.sh`, test `restart`: 8 writers, 1-4
//! MiB writes, each read back and compared) while corodev is killed with SIGKILL at random
//! moments, 10 times, and started again on the same socket; QEMU reconnects by itself
//! (`run-vm.sh --reconnect`). One more stop is a graceful upgrade: SIGTERM with the guest's
//! I/O running, then a copy of the binary at another path. The guest must see no I/O error
//! (its writers' status and its kernel log), every block it wrote must read back as last
//! written at the end, in the guest, and the host image must hold what the guest wrote
//! (md5 of the written regions).
//!
//! Requests must be in flight at every kill, and complete out of order: the daemon's
//! writes are throttled ([`WriteThrottle`], a blkio cgroup; the image is opened with
//! `--direct` on a disk-backed file system) while its reads are not, so the guest's
//! read-backs overtake writes queued before them. Each kill comes a random moment after the
//! guest has completed requests on the current process, when writes are queued. That this
//! worked is read from the restarted daemon's own log: after every kill it must report
//! requests left in flight by the previous process that it resubmits, some of them
//! overtaken (`queue Q: resubmitting N request(s) left in flight by the previous daemon; M
//! of them were overtaken (completed out of order)`). The throttle is lifted from a killed
//! process until it is reaped, so its queued writes reach the disk before the next process
//! starts (a real crash does not hold them back for seconds; the throttle would).
//!
//! `CORODEV_TEST_SERVER=qsd` runs the same guest against qemu-storage-daemon (restarted the
//! same way, the upgrade with a copy of its binary); the log check is corodev's and is
//! skipped there, which the output says. qemu-storage-daemon 7.2 does not pass: at the
//! first kill either the guest driver reports `virtio_blk virtio0: req.0:id N is not a
//! head!` (a request answered twice), or the restarted qsd `vu_panic: virtio: invalid
//! address for buffers` on every reconnect; either way the guest's I/O stops.
//!
//! `CORODEV_RESTART_SEED=N` repeats a run's kill moments (the seed is printed).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration::{workspace, Daemon, Guest, Image, Server, Vm, WriteThrottle};

const MIB: u64 = 1 << 20;
/// The image: the guest's 8 regions of 8 MiB from offset 0, and its last 4 KiB, where the
/// host writes the stop word.
const IMAGE_SIZE: u64 = 128 * MIB;
const REGIONS_LEN: u64 = 64 * MIB;
/// SIGKILLs, and after how many of them the graceful upgrade comes.
const KILLS: usize = 10;
const UPGRADE_AFTER: usize = 5;
/// The daemon's write bandwidth. The guest (TCG) verifies ~12 MB/s unthrottled, so at 4
/// MiB/s its 8 writers keep ~10-20 MiB of writes queued at any moment: always some in
/// flight, and one queued write takes a few seconds, during which other writers' reads
/// complete.
const WRITE_BPS: u64 = 4 * MIB;
/// Random wait before each stop, once the guest has completed requests on the current
/// process.
const DELAY_MS: std::ops::Range<u64> = 200..1500;
/// Verified guest writes that must complete on a new process before it is stopped again.
const WRITES_BETWEEN_STOPS: u64 = 3;
/// The guest's writers. After a graceful stop every writer's first completion on the new
/// process is the read-back of a write the old process answered, submitted before the
/// writers queued new writes: such reads overtake nothing, so the next kill waits for this
/// many more.
const GUEST_WRITERS: u64 = 8;
/// How long the guest may take to boot and start writing, and to make progress again
/// after a restart (QEMU reconnects once a second).
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);
/// The guest's own limit on its run (corodev.arg), in case the stop word never arrives.
const GUEST_RUN_CAP_S: &str = "240";

#[test]
fn sigkill_restarts_under_guest_io_one_queue() {
    restarts_under_guest_io(1);
}

#[test]
fn sigkill_restarts_under_guest_io_two_queues() {
    restarts_under_guest_io(2);
}

/// How one stop of the server went.
#[derive(Debug)]
struct Stop {
    /// SIGKILL, or SIGTERM + upgrade.
    graceful: bool,
    /// The random wait before it.
    delay: Duration,
    /// Verified guest writes so far, when it came.
    writes: u64,
    /// Verified guest writes when the server was gone.
    writes_stopped: u64,
    /// From the signal to the process reaped.
    reaped_in: Duration,
    /// From the signal to the guest's next verified write.
    resumed_in: Duration,
    /// What the next process's log says it resubmitted, per queue.
    resubmits: Vec<Resubmit>,
}

impl Stop {
    fn resubmitted(&self) -> u64 {
        self.resubmits.iter().map(|r| r.resubmitted).sum()
    }

    fn overtaken(&self) -> u64 {
        self.resubmits.iter().map(|r| r.overtaken).sum()
    }

    /// One line: the stop numbered `n` and what followed it.
    fn describe(&self, n: usize) -> String {
        let per_queue: Vec<String> = self
            .resubmits
            .iter()
            .map(|r| format!("q{} {}/{}", r.queue, r.resubmitted, r.overtaken))
            .collect();
        format!(
            "stop {n:>2} {:<7} after {:>4} ms, at {:>3} writes ({:>3} when gone): reaped in \
             {:>4} ms, guest resumed in {:.1} s; resubmitted {}, overtaken {} [{}]",
            if self.graceful { "SIGTERM" } else { "SIGKILL" },
            self.delay.as_millis(),
            self.writes,
            self.writes_stopped,
            self.reaped_in.as_millis(),
            self.resumed_in.as_secs_f64(),
            self.resubmitted(),
            self.overtaken(),
            per_queue.join(", ")
        )
    }
}

/// One `queue Q: resubmitting N request(s) left in flight by the previous daemon; M of them
/// were overtaken (completed out of order)` line of corodev's log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resubmit {
    queue: u64,
    resubmitted: u64,
    overtaken: u64,
}

/// The resubmission lines of a corodev log.
fn parse_resubmits(log: &str) -> Vec<Resubmit> {
    log.lines().filter_map(parse_resubmit).collect()
}

fn parse_resubmit(line: &str) -> Option<Resubmit> {
    let rest = &line[line.find("queue ")? + "queue ".len()..];
    let (queue, rest) = rest.split_once(": resubmitting ")?;
    let (resubmitted, rest) =
        rest.split_once(" request(s) left in flight by the previous daemon; ")?;
    let (overtaken, _) = rest.split_once(" of them were overtaken")?;
    Some(Resubmit {
        queue: queue.trim().parse().ok()?,
        resubmitted: resubmitted.trim().parse().ok()?,
        overtaken: overtaken.trim().parse().ok()?,
    })
}

/// The guest's latest `CORODEV-PROGRESS writes=N errors=E` line: (writes, errors). Only
/// whole lines count: the console file may end in the middle of one (`writes=1` of 12).
fn progress(console: &str) -> Option<(u64, u64)> {
    let whole = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    whole
        .lines()
        .rev()
        .filter(|l| l.contains("CORODEV-PROGRESS"))
        .find_map(|l| {
            let field = |key: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            Some((field("writes")?, field("errors")?))
        })
}

/// Console lines that end a run at once: the guest kernel's driver saw a broken device or
/// failed a request (printed even with `quiet`: they are errors; the guest's final check
/// reads its whole kernel log), or QEMU was told a ring broke (the server signalled its
/// error eventfd). QEMU's `vhost VQ N ring restore failed` is not one: it follows every
/// kill (the dead server cannot answer GET_VRING_BASE).
const CONSOLE_ERRORS: [&str; 3] = ["is not a head", "I/O error", "vhost vring error"];
/// How long after a server is reaped the guest's progress count is read as the count at
/// the stop: the guest prints it every 0.2 s, and nothing completes while no server runs.
const PROGRESS_SETTLE: Duration = Duration::from_millis(300);

/// A small xorshift64* for the kill moments; seeded from the clock unless
/// `CORODEV_RESTART_SEED` is set, and printed so a run can be repeated.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("CORODEV_RESTART_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("restart: seed {seed} (CORODEV_RESTART_SEED={seed} repeats the kill moments)");
        Rng(seed | 1)
    }

    fn below(&mut self, range: std::ops::Range<u64>) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        range.start + x % (range.end - range.start).max(1)
    }
}

/// The server, the guest and the throttle of one run, and what to print when it fails.
struct Run {
    // Field order is drop order: the VM and the server go before their cgroup.
    vm: Vm,
    daemon: Daemon,
    throttle: WriteThrottle,
    started: Instant,
}

impl Run {
    /// Panics with `why`, the guest's console and every server process's log.
    fn fail(&self, why: &str) -> ! {
        panic!(
            "{why}\n--- console ---\n{}\n{}",
            self.vm.console(),
            self.daemon.all_logs()
        );
    }

    /// Waits until the guest has verified at least `writes` writes; fails on a guest
    /// error, a guest kernel complaint, the guest ending, the server exiting, or no
    /// progress within `timeout`. Returns the writes so far.
    fn wait_writes(&mut self, writes: u64, timeout: Duration, what: &str) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.vm.console();
            let (done, errors) = progress(&console).unwrap_or((0, 0));
            if errors > 0 {
                self.fail(&format!("{what}: the guest counted {errors} I/O error(s)"));
            }
            if let Some(line) = console
                .lines()
                .find(|l| CONSOLE_ERRORS.iter().any(|e| l.contains(e)))
            {
                self.fail(&format!("{what}: the console says {line:?}"));
            }
            if done >= writes {
                return done;
            }
            if !self.vm.running() {
                self.fail(&format!("{what}: the guest ended"));
            }
            if let Some(status) = self.daemon.wait_exit(Duration::ZERO) {
                self.fail(&format!("{what}: the server exited by itself ({status})"));
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "{what}: the guest verified {done} write(s) in all, not {writes}, within \
                     {timeout:?}: its I/O is stuck"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (SIGKILL, or SIGTERM and a clean exit) with its write limit
    /// lifted so that what it queued reaches the disk, waits until it is reaped and the
    /// disk settles, then starts `program` (or the same binary) on the same socket, in the
    /// same cgroup, with the limit back. Returns how long the stop took, and the guest's
    /// verified writes when the server was gone (all it completed).
    fn stop_and_restart(&mut self, graceful: bool, program: Option<&Path>) -> (Duration, u64) {
        let t = Instant::now();
        self.daemon.signal(if graceful {
            libc::SIGTERM
        } else {
            libc::SIGKILL
        });
        self.throttle.lift();
        let Some(status) = self.daemon.wait_exit(Duration::from_secs(60)) else {
            self.fail("the server did not exit within 60 s of its signal");
        };
        let reaped_in = t.elapsed();
        if graceful && !status.success() {
            self.fail(&format!("SIGTERM must be a clean exit: {status}"));
        }
        if !self.throttle.wait_disk_idle(Duration::from_secs(2)) {
            eprintln!(
                "restart: disk {} still busy 2 s after the server was reaped",
                self.throttle.device()
            );
        }
        // QEMU retries once a second, so this costs no time.
        std::thread::sleep(PROGRESS_SETTLE);
        let writes = progress(&self.vm.console()).map_or(0, |(w, _)| w);
        self.throttle.apply();
        self.daemon.respawn(program);
        if self.daemon.kind() == Server::Corodev
            && self
                .daemon
                .wait_log_line("frontend connected", PROGRESS_TIMEOUT)
                .is_none()
        {
            self.fail("QEMU did not reconnect to the restarted server");
        }
        (reaped_in, writes)
    }
}

/// A copy of the server's binary at another path, in `dir`: the "new version" of the
/// graceful upgrade.
fn copy_of_binary(program: &OsStr, dir: &Path) -> PathBuf {
    let src = if Path::new(program).components().count() > 1 {
        PathBuf::from(program)
    } else {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{} is not on PATH", program.to_string_lossy()))
    };
    let name = src
        .file_name()
        .map_or_else(|| "server".to_owned(), |n| n.to_string_lossy().into_owned());
    let dst = dir.join(format!("{name}-upgraded"));
    std::fs::copy(&src, &dst)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", src.display(), dst.display()));
    dst
}

fn restarts_under_guest_io(queues: u16) {
    let started = Instant::now();
    let kind = Server::from_env();
    // Under target/: the throttle needs a block device, and O_DIRECT a real file system.
    let image = Image::new(IMAGE_SIZE);
    let throttle = WriteThrottle::new(&image.path, WRITE_BPS);
    let q = queues.to_string();
    let mut daemon = Daemon::start(&image, &["--direct", "--num-queues", &q]);
    daemon.join_cgroup(&throttle.procs());
    let upgrade_dir = tempfile::Builder::new()
        .prefix("corodev-upgrade-")
        .tempdir_in(workspace().join("target"))
        .unwrap_or_else(|e| panic!("cannot make a temp dir under target/: {e}"));
    let upgraded = copy_of_binary(daemon.program(), upgrade_dir.path());
    eprintln!(
        "restart: {kind:?}, {queues} queue(s), writes limited to {} MiB/s on disk {}, \
         {KILLS} SIGKILLs and a SIGTERM upgrade to {}",
        throttle.bytes_per_sec() / MIB,
        throttle.device(),
        upgraded.display()
    );
    let mut guest = Guest::test("restart").queues(queues);
    guest.arg = Some(GUEST_RUN_CAP_S);
    guest.mem_mib = 512; // the writers keep a copy of their 64 MiB in guest memory
    guest.reconnect = true;
    guest.timeout = Duration::from_secs(300);
    let vm = Vm::start(daemon.socket(), &guest);
    let mut run = Run {
        vm,
        daemon,
        throttle,
        started,
    };
    let mut rng = Rng::from_env();
    let mut writes = run.wait_writes(WRITES_BETWEEN_STOPS, BOOT_TIMEOUT, "guest start");
    eprintln!(
        "restart: guest writing ({writes} verified) after {:.1} s",
        run.started.elapsed().as_secs_f64()
    );

    let mut stops: Vec<Stop> = Vec::new();
    for n in 0..=KILLS {
        let graceful = n == UPGRADE_AFTER;
        let delay = Duration::from_millis(rng.below(DELAY_MS));
        std::thread::sleep(delay);
        let at = progress(&run.vm.console()).map_or(writes, |(w, _)| w);
        let t = Instant::now();
        let (reaped_in, since) =
            run.stop_and_restart(graceful, graceful.then_some(upgraded.as_path()));
        if graceful {
            let exe =
                std::fs::read_link(format!("/proc/{}/exe", run.daemon.pid())).unwrap_or_default();
            if exe != upgraded {
                run.fail(&format!(
                    "the upgraded server runs {}, not {}",
                    exe.display(),
                    upgraded.display()
                ));
            }
        }
        let what = format!(
            "after {} {}",
            if graceful { "the upgrade" } else { "kill" },
            n + 1
        );
        let need = if graceful {
            GUEST_WRITERS + WRITES_BETWEEN_STOPS
        } else {
            WRITES_BETWEEN_STOPS
        };
        writes = run.wait_writes(since + need, PROGRESS_TIMEOUT, &what);
        let resubmits = parse_resubmits(&run.daemon.log_text());
        let stop = Stop {
            graceful,
            delay,
            writes: at,
            writes_stopped: since,
            reaped_in,
            resumed_in: t.elapsed(),
            resubmits,
        };
        eprintln!("restart: {}", stop.describe(n + 1));
        stops.push(stop);
    }

    image.tell_guest_to_stop();
    // The writes still queued need not crawl: the stops are over.
    run.throttle.lift();
    let Run {
        vm,
        mut daemon,
        throttle,
        started,
    } = run;
    let mut result = vm.wait_while(|| {
        daemon
            .wait_exit(Duration::ZERO)
            .map(|s| format!("the server exited ({s})"))
    });
    result.server_log = Some(daemon.all_logs());
    let r = result.expect_pass();
    assert_eq!(
        r.get("stopped"),
        "host",
        "the guest must stop on the host's word"
    );
    assert_eq!(r.num("writers"), GUEST_WRITERS);
    assert_eq!(r.num("errors"), 0, "guest I/O errors");
    assert_eq!(r.get("dmesg"), "clean", "guest kernel log");
    assert_eq!((r.num("offset"), r.num("length")), (0, REGIONS_LEN));
    daemon.assert_alive();
    assert_eq!(
        image.md5(0, REGIONS_LEN as usize),
        r.get("md5"),
        "the host image must hold exactly what the guest wrote"
    );
    eprintln!(
        "restart: guest verified {} writes ({} MiB) and every block at the end; host image \
         md5 {} matches; {:.1} s in all",
        r.num("writes"),
        r.num("bytes") / MIB,
        r.get("md5"),
        started.elapsed().as_secs_f64()
    );

    if kind != Server::Corodev {
        eprintln!(
            "({kind:?}: the resubmission log check is corodev's and is skipped: requests in \
             flight at each kill are not proven)"
        );
        drop(daemon);
        drop(throttle);
        return;
    }
    let log = daemon.all_logs();
    eprintln!("restart: per stop (resubmitted/overtaken per queue, from the daemon's log):");
    for (n, s) in stops.iter().enumerate() {
        eprintln!("  {}", s.describe(n + 1));
    }
    for (n, s) in stops.iter().enumerate() {
        if s.graceful {
            continue;
        }
        assert!(
            s.resubmitted() > 0 && s.overtaken() > 0,
            "stop {}: the restarted daemon must resubmit requests the killed one left in \
             flight, some of them overtaken; its log said {:?}\n{log}",
            n + 1,
            s.resubmits
        );
    }
    drop(daemon);
    drop(throttle);
}

#[cfg(test)]
mod parse {
    use super::*;

    #[test]
    fn resubmission_lines() {
        let log = "[2026-01-01T00:00:00Z INFO ] connection 1: frontend connected\n\
            [2026-01-01T00:00:00Z INFO ] queue 0: resubmitting 5 request(s) left in flight by \
            the previous daemon; 3 of them were overtaken (completed out of order)\n\
            queue 1: resubmitting 12 request(s) left in flight by the previous daemon; 0 of \
            them were overtaken (completed out of order)\n\
            queue x: resubmitting 1 request(s) left in flight by the previous daemon; 1 of them\n";
        assert_eq!(
            parse_resubmits(log),
            vec![
                Resubmit {
                    queue: 0,
                    resubmitted: 5,
                    overtaken: 3
                },
                Resubmit {
                    queue: 1,
                    resubmitted: 12,
                    overtaken: 0
                },
            ]
        );
    }

    #[test]
    fn latest_progress() {
        let console = "CORODEV-PROGRESS name=restart writes=2 bytes=1 errors=0 t=1\n\
            noise\r\n\x1b[0mCORODEV-PROGRESS name=restart writes=17 bytes=9 errors=1 t=2\r\n";
        assert_eq!(progress(console), Some((17, 1)));
        let cut = format!("{console}CORODEV-PROGRESS name=restart writes=1");
        assert_eq!(
            progress(&cut),
            Some((17, 1)),
            "a partial last line is not read"
        );
        assert_eq!(progress("nothing"), None);
    }
}

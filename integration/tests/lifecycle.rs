//! A connection's life with requests in flight: what happens to parked requests when the
//! frontend goes away, when the daemon is told to stop (SIGTERM), when a ring is stopped
//! (GET_VRING_BASE) or disabled (SET_VRING_ENABLE 0), and when a request's coroutine cannot
//! be started; and that a guest toggling the write cache cannot flood the log.
//!
//! Requests are parked on corodev's null backend with a fixed latency
//! (`--null-latency-us`), each a flush with its own descriptors and status byte
//! ([`TestFrontend::put_flush`]), so many are in flight at once. corodev only: latency,
//! polling and stack size have no qemu-storage-daemon counterpart, and these are corodev's
//! promises (freeing, draining, log limits); each test returns early under
//! `CORODEV_TEST_SERVER=qsd`.

use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration::frontend::*;
use integration::{Daemon, Resources, Server};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

const QSIZE: u16 = 128;
/// How long a parked request waits in the null backend.
const LATENCY: Duration = Duration::from_millis(300);
const LATENCY_US: &str = "300000";
/// How long the daemon may take to free, drain or exit once it should.
const WAIT: Duration = Duration::from_secs(5);
/// `writeback` in `struct virtio_blk_config` (virtio 1.2, 5.2.4), the one byte a driver
/// may write (with VIRTIO_BLK_F_CONFIG_WCE).
const WRITEBACK_OFFSET: u32 = 32;

/// corodev on the null backend with a 128-entry queue and `args`; `None` (skip) when the
/// tests run against qemu-storage-daemon.
fn null_daemon(args: &[&str]) -> Option<Daemon> {
    if Server::from_env() != Server::Corodev {
        eprintln!(
            "skipped: corodev's connection lifecycle; qemu-storage-daemon has no --null-latency-us"
        );
        return None;
    }
    let mut all = vec!["--queue-size", "128"];
    all.extend_from_slice(args);
    Some(Daemon::corodev_null(&all))
}

fn connect(server: &Daemon) -> TestFrontend {
    TestFrontend::connect(server.socket(), 1, QSIZE).expect("connect")
}

/// Publishes `n` flushes on queue 0 (heads 0, 2, 4, ...) in one batch; returns the heads.
fn park(fe: &mut TestFrontend, n: u16) -> Vec<u16> {
    let heads: Vec<u16> = (0..n).map(|i| fe.put_flush(0, i)).collect();
    fe.publish_heads(0, &heads);
    heads
}

/// The daemon is alive and a new connection does I/O.
fn next_connection_serves(server: &mut Daemon) {
    server.assert_alive();
    let mut fe = connect(server);
    assert!(
        serves(&mut fe),
        "the next connection must serve; log:\n{}",
        server.log_text()
    );
}

/// Every used element queue 0 has now, without waiting.
fn used_now(fe: &mut TestFrontend) -> Vec<Used> {
    std::iter::from_fn(|| fe.wait_used(0, Duration::ZERO)).collect()
}

/// Waits up to `timeout` for `n` used elements on queue 0; returns what came.
fn wait_n_used(fe: &mut TestFrontend, n: usize, timeout: Duration) -> Vec<Used> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match fe.wait_used(0, left) {
            Some(u) => got.push(u),
            None => break,
        }
    }
    got
}

/// Asserts `used` names each of `heads` exactly once, as a flush (status byte only), and
/// that each request's status byte is OK.
fn assert_all_ok(fe: &TestFrontend, heads: &[u16], used: &[Used], log: &str) {
    let mut ids: Vec<u32> = used.iter().map(|u| u.id).collect();
    ids.sort_unstable();
    let want: Vec<u32> = heads.iter().map(|&h| u32::from(h)).collect();
    assert_eq!(
        ids,
        want,
        "{} of {} parked requests got a used element; log:\n{log}",
        used.len(),
        heads.len()
    );
    for u in used {
        assert_eq!(u.len, 1, "a flush writes only its status byte: {u:?}");
    }
    let statuses: Vec<u8> = (0..heads.len() as u16)
        .map(|n| fe.flush_status(0, n))
        .collect();
    assert!(
        statuses.iter().all(|&s| s == S_OK),
        "every parked flush must end OK; statuses: {statuses:?}"
    );
}

/// Whether a connection serves: a 4 KiB read of the null device returns OK and zeroes.
fn serves(fe: &mut TestFrontend) -> bool {
    fe.mem.write(DATA_BASE, &[0xaa; 4096]);
    fe.run(0, T_IN, 0, &[(DATA_BASE, 4096)]) == S_OK
        && fe.mem.read(DATA_BASE, 4096).iter().all(|&b| b == 0)
}

/// Polls the server's resources until `done` holds or `timeout` passes; the last reading
/// and whether `done` held.
fn wait_resources(
    server: &Daemon,
    timeout: Duration,
    done: impl Fn(&Resources) -> bool,
) -> (Resources, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let r = server.resources();
        if done(&r) {
            return (r, true);
        }
        if Instant::now() >= deadline {
            return (r, false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the idle daemon holds once connection `n` is closed: guest memory unmapped and
/// two readings 200 ms apart agreeing.
/// Serves one warm-up connection (the first may create lazily-made state) and returns the
/// daemon's resources once it has closed: what every later connection must return to.
fn warmed_up_baseline(server: &Daemon) -> Resources {
    {
        let mut fe = connect(server);
        assert!(
            serves(&mut fe),
            "warm-up connection; log:\n{}",
            server.log_text()
        );
    }
    settled_after(server, 1)
}

fn settled_after(server: &Daemon, n: u32) -> Resources {
    let line = format!("connection {n}: frontend disconnected");
    assert!(
        server.wait_log_line(&line, WAIT).is_some(),
        "no {line:?}; log:\n{}",
        server.log_text()
    );
    let deadline = Instant::now() + WAIT;
    let mut last = server.resources();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = server.resources();
        if now == last && now.guest_maps.is_empty() {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not settle after connection {n}, which closed with nothing in \
             flight: {now}; log:\n{}",
            server.log_text()
        );
        last = now;
    }
}

/// Kills the server (SIGKILL) unless disarmed within its timeout, so that a blocking
/// protocol call (GET_VRING_BASE has no timeout in the vhost crate) fails the test rather
/// than hang it: the call then sees the socket close.
struct Watchdog {
    disarmed: Arc<AtomicBool>,
}

impl Watchdog {
    fn new(server: &Daemon, timeout: Duration) -> Watchdog {
        let disarmed = Arc::new(AtomicBool::new(false));
        let flag = disarmed.clone();
        let pid = libc::pid_t::try_from(server.pid()).expect("pid fits pid_t");
        std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if flag.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if !flag.load(Ordering::Acquire) {
                // SAFETY: kill has no memory-safety preconditions; the server is not reaped
                // while a watchdog is armed (the tests drop it before any wait_exit).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        Watchdog { disarmed }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.disarmed.store(true, Ordering::Release);
    }
}

fn disconnect_with_requests_parked(poll_us: &str) {
    let Some(mut server) = null_daemon(&["--null-latency-us", LATENCY_US, "--poll-us", poll_us])
    else {
        return;
    };
    let baseline = warmed_up_baseline(&server);
    {
        let mut fe = connect(&server);
        park(&mut fe, 32);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(fe.used_idx(0), 0, "test bug: the requests are not parked");
        let held = server.resources();
        assert!(
            !held.guest_maps.is_empty(),
            "test bug: the connection's guest memory is not in /proc/PID/maps ({held})"
        );
        // The frontend goes away (socket, memory, eventfds) with 32 requests parked.
    }
    let (after, freed) = wait_resources(&server, WAIT, |r| r.within(&baseline));
    assert!(
        freed,
        "{WAIT:?} after the frontend dropped with 32 requests parked the daemon still holds \
         {after}\nbaseline after a clean close: {baseline}\nlog:\n{}",
        server.log_text()
    );
    next_connection_serves(&mut server);
}

/// The frontend dies with requests parked: they finish, and then the connection's fds,
/// guest memory mapping, stacks and worker threads are all gone; the next connection works.
#[test]
fn disconnect_with_requests_parked_frees_everything() {
    disconnect_with_requests_parked("0");
}

/// The same with the workers polling between requests.
#[test]
fn disconnect_with_requests_parked_frees_everything_polling() {
    disconnect_with_requests_parked("1000");
}

/// SIGTERM with requests parked: each gets its used element with status OK before the
/// daemon exits, and it exits 0 promptly.
#[test]
fn sigterm_with_requests_parked_completes_them_then_exits() {
    let Some(mut server) = null_daemon(&["--null-latency-us", LATENCY_US, "--poll-us", "0"]) else {
        return;
    };
    let mut fe = connect(&server);
    let heads = park(&mut fe, 32);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(fe.used_idx(0), 0, "test bug: the requests are not parked");
    let sent = Instant::now();
    server.sigterm();
    let exited = server.wait_exit(Duration::from_secs(10));
    let took = sent.elapsed();
    let log = server.log_text();
    // Guest memory is ours: what the daemon published before it exited is still there.
    let used = used_now(&mut fe);
    assert_all_ok(&fe, &heads, &used, &log);
    let Some(status) = exited else {
        panic!("the daemon did not exit within 10 s of SIGTERM; log:\n{log}");
    };
    assert!(
        status.success(),
        "SIGTERM is a clean stop: exit status {status}; log:\n{log}"
    );
    assert!(
        took >= LATENCY / 2,
        "the daemon exited {took:?} after SIGTERM, before the parked requests could finish"
    );
}

/// GET_VRING_BASE answers only once every request of the ring is finished, so the base it
/// returns accounts for all of them.
#[test]
fn get_vring_base_waits_for_requests_in_flight() {
    let Some(server) = null_daemon(&["--null-latency-us", LATENCY_US, "--poll-us", "0"]) else {
        return;
    };
    let mut fe = connect(&server);
    let heads = park(&mut fe, 16);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(fe.used_idx(0), 0, "test bug: the requests are not parked");
    let asked = Instant::now();
    let base = {
        let _watchdog = Watchdog::new(&server, Duration::from_secs(10));
        fe.stop_queue(0)
    };
    let used_then = fe.used_idx(0);
    let took = asked.elapsed();
    let base = base.unwrap_or_else(|e| {
        panic!(
            "GET_VRING_BASE failed ({e}), or the 10 s watchdog killed the daemon; log:\n{}",
            server.log_text()
        )
    });
    assert_eq!(
        used_then,
        16,
        "GET_VRING_BASE returned ({took:?} after it was sent) with only {used_then} of 16 \
         requests used; log:\n{}",
        server.log_text()
    );
    assert_eq!(base, 16, "the base counts every request popped");
    assert!(
        took >= LATENCY / 2,
        "test bug: GET_VRING_BASE took only {took:?}, so the requests were not in flight"
    );
    let used = used_now(&mut fe);
    assert_all_ok(&fe, &heads, &used, &server.log_text());
}

/// A ring whose requests cannot finish within `--stop-timeout`: GET_VRING_BASE must not
/// answer with a base that leaves requests unaccounted for (it used to give up silently
/// after 30 s and return one); the connection is closed, loudly, and once the requests
/// have finished the daemon serves the next connection.
#[test]
fn ring_stop_that_cannot_drain_closes_the_connection() {
    let Some(mut server) = null_daemon(&[
        "--null-latency-us",
        "3000000",
        "--poll-us",
        "0",
        "--stop-timeout",
        "1",
    ]) else {
        return;
    };
    {
        let mut fe = connect(&server);
        park(&mut fe, 4);
        std::thread::sleep(Duration::from_millis(20));
        let asked = Instant::now();
        let r = {
            let _watchdog = Watchdog::new(&server, Duration::from_secs(10));
            fe.stop_queue(0)
        };
        let took = asked.elapsed();
        assert!(
            r.is_err(),
            "GET_VRING_BASE answered {r:?} after {took:?} with 4 requests still in flight; log:\n{}",
            server.log_text()
        );
        assert!(
            took < Duration::from_millis(2500),
            "the refusal took {took:?}: longer than --stop-timeout 1"
        );
        let line = server.wait_log_line("cannot stop the ring, closing the connection", WAIT);
        assert!(
            line.is_some_and(|l| l.contains("queue 0: 4 requests still in flight")),
            "log:\n{}",
            server.log_text()
        );
    }
    next_connection_serves(&mut server);
}

/// SET_VRING_ENABLE(0): the worker stops taking requests from the ring, even while it is
/// polling; enabled again, the ring serves what was published meanwhile.
#[test]
fn disabled_ring_is_not_polled() {
    let Some(mut server) = null_daemon(&["--poll-us", "10000"]) else {
        return;
    };
    let mut fe = connect(&server);
    for round in 0..3u16 {
        // Requests 3 ms apart open the worker's poll window to cover 3 ms (4096 us): after
        // the last one it polls that long, and what follows takes well under 1 ms.
        for _ in 0..15 {
            assert_eq!(fe.run(0, T_FLUSH, 0, &[]), S_OK);
            std::thread::sleep(Duration::from_millis(3));
        }
        assert_eq!(fe.run(0, T_FLUSH, 0, &[]), S_OK);
        fe.fe
            .set_vring_enable(0, false)
            .expect("SET_VRING_ENABLE 0");
        // Messages are handled in order: once this is answered, the ring is disabled.
        fe.fe.get_features().expect("GET_FEATURES");
        let head = fe.put_flush(0, 10 + round);
        fe.publish(0, head);
        let got = fe.wait_used(0, Duration::from_millis(300));
        assert_eq!(
            (got, fe.flush_status(0, 10 + round)),
            (None, 0xff),
            "round {round}: a request on a disabled ring was served; log:\n{}",
            server.log_text()
        );
        fe.fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE 1");
        fe.fe.get_features().expect("GET_FEATURES");
        fe.queues[0].kick.write(1).expect("kick");
        assert_eq!(
            fe.wait_used(0, WAIT),
            Some(Used {
                id: u32::from(head),
                len: 1
            }),
            "round {round}: enabled again, the ring serves the waiting request; log:\n{}",
            server.log_text()
        );
        assert_eq!(fe.flush_status(0, 10 + round), S_OK);
    }
    server.assert_alive();
}

/// A request whose coroutine cannot get a stack is answered with IOERR in its status byte
/// (a used element over an untouched status byte would have the driver read whatever was
/// there, typically OK, and drop a write silently); the daemon lives on and serves once
/// memory is back.
#[test]
fn coroutine_spawn_failure_answers_ioerr() {
    const STACK_MIB: u64 = 64;
    let Some(mut server) = null_daemon(&[
        "--stack-size",
        "64M",
        "--null-latency-us",
        "2000000",
        "--poll-us",
        "0",
    ]) else {
        return;
    };
    let mut fe = connect(&server);
    // One request first, so the worker thread's own allocations (allocator arena, ring)
    // exist before the limit; GET_ID is answered without the backend's latency.
    assert_eq!(fe.run(0, T_GET_ID, 0, &[(DATA_BASE, 20)]), S_OK);
    // Room for about three more stacks: the rest of the 64 must fail to get one.
    let limit = (server.vm_size_kib() + (3 * STACK_MIB + STACK_MIB / 2) * 1024) * 1024;
    let old = server.limit_address_space(limit);
    let heads = park(&mut fe, 64);
    let used = wait_n_used(&mut fe, 64, Duration::from_secs(10));
    server.limit_address_space(old);
    let log = server.log_text();
    let mut ids: Vec<u32> = used.iter().map(|u| u.id).collect();
    ids.sort_unstable();
    let want: Vec<u32> = heads.iter().map(|&h| u32::from(h)).collect();
    assert_eq!(
        ids, want,
        "every request gets its used element; log:\n{log}"
    );
    let statuses: Vec<u8> = (0..64).map(|n| fe.flush_status(0, n)).collect();
    assert!(
        !statuses.contains(&0xff),
        "a used element was published over an untouched status byte (0xff canary): the \
         driver would read a stale status; statuses {statuses:?}; log:\n{log}"
    );
    assert!(
        statuses.iter().all(|&s| s == S_OK || s == S_IOERR),
        "statuses must be OK (got a stack) or IOERR (did not): {statuses:?}"
    );
    let refused = statuses.iter().filter(|&&s| s == S_IOERR).count();
    assert!(
        refused > 0,
        "test bug: RLIMIT_AS {limit} did not make any stack allocation fail; log:\n{log}"
    );
    server.assert_alive();
    drop(fe);
    let mut fe = connect(&server);
    assert_eq!(
        fe.run(0, T_GET_ID, 0, &[(DATA_BASE, 20)]),
        S_OK,
        "with the limit lifted a new connection serves; log:\n{}",
        server.log_text()
    );
    server.assert_alive();
}

/// A guest toggling the write cache as fast as it can gets a burst of log lines and a
/// count of the rest, not a line per toggle.
#[test]
fn write_cache_toggling_is_rate_limited() {
    const F_CONFIG_WCE: u64 = 1 << 11;
    let Some(server) = null_daemon(&[]) else {
        return;
    };
    let mut fe = connect(&server);
    assert_ne!(
        fe.features & F_CONFIG_WCE,
        0,
        "test bug: VIRTIO_BLK_F_CONFIG_WCE not negotiated"
    );
    let toggle = |fe: &mut TestFrontend, v: u8| {
        fe.fe
            .set_config(WRITEBACK_OFFSET, VhostUserConfigFlags::WRITABLE, &[v])
            .expect("SET_CONFIG");
    };
    for i in 0..1000u32 {
        toggle(&mut fe, (i % 2) as u8);
    }
    // Messages are handled in order: once this is answered, all 1000 were.
    let (_, cfg) = fe
        .fe
        .get_config(WRITEBACK_OFFSET, 1, VhostUserConfigFlags::WRITABLE, &[0])
        .expect("GET_CONFIG");
    assert_eq!(
        cfg,
        [1],
        "test bug: the toggles did not reach the config space"
    );
    // The limiter reports what it dropped with the first line of the next window.
    std::thread::sleep(Duration::from_millis(1100));
    toggle(&mut fe, 0);
    let suppressed = server.wait_log_line("suppressed", WAIT);
    let log = server.log_text();
    let lines = log.lines().filter(|l| l.contains("write cache")).count();
    assert!(
        lines <= 12,
        "1001 toggles made {lines} 'write cache' log lines (at most a burst of 10 per second \
         expected)"
    );
    assert!(
        suppressed.is_some_and(|l| l.contains("similar messages suppressed")),
        "no 'N similar messages suppressed' line; log:\n{log}"
    );
}

/// Keeps queue 0 busy until `stop` (or 20 s): `n` flushes in flight, each republished as
/// soon as its used element appears. With the backend's latency doing the waiting, the
/// worker gets a steady stream of completions even when this thread is slow to run (it
/// sleeps on the call eventfd, so the scheduler wakes it promptly). Counts completions in
/// `done`; gives the frontend back.
fn keep_busy(mut fe: TestFrontend, n: u16, stop: &AtomicBool, done: &AtomicU64) -> TestFrontend {
    park(&mut fe, n);
    let cap = Instant::now() + Duration::from_secs(20);
    while !stop.load(Ordering::Acquire) && Instant::now() < cap {
        let Some(first) = fe.wait_used(0, Duration::from_millis(50)) else {
            continue;
        };
        let again: Vec<u16> = std::iter::once(first)
            .chain(used_now(&mut fe))
            .map(|u| u16::try_from(u.id).expect("head fits u16"))
            .collect();
        done.fetch_add(again.len() as u64, Ordering::Relaxed);
        fe.publish_heads(0, &again);
    }
    fe
}

/// A worker whose queue never runs dry still goes back to its event loop often enough to
/// see its connection end: the frontend hangs up while the guest keeps every request slot
/// busy, and the connection is still torn down (worker thread gone, guest memory unmapped)
/// within seconds, after which the next connection serves. A worker that polled for as
/// long as it found work would never return, and the daemon would wait for it forever.
#[test]
fn busy_worker_still_sees_shutdown() {
    let Some(mut server) = null_daemon(&["--poll-us", "10000", "--null-latency-us", "2000"]) else {
        return;
    };
    let baseline = warmed_up_baseline(&server);
    let mut fe = connect(&server);
    // Requests 5 ms apart open the worker's poll window to 8 ms: from then on the worker
    // leaves its poll loop only if it finds no work for that long.
    for _ in 0..25 {
        assert_eq!(fe.run(0, T_FLUSH, 0, &[]), S_OK);
        std::thread::sleep(Duration::from_millis(5));
    }
    let socket = fe.socket().expect("the connection's socket");
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let (before, after, freed, fe) = std::thread::scope(|s| {
        let load = s.spawn(|| keep_busy(fe, 32, &stop, &done));
        std::thread::sleep(Duration::from_secs(1));
        let before = done.load(Ordering::Relaxed);
        socket.shutdown(Shutdown::Both).expect("hang up");
        let (after, freed) = wait_resources(&server, WAIT, |r| r.within(&baseline));
        stop.store(true, Ordering::Release);
        (before, after, freed, load.join().expect("load thread"))
    });
    drop(fe);
    assert!(
        before >= 1000,
        "test bug: only {before} requests completed in the second of load before the hang-up"
    );
    let total = done.load(Ordering::Relaxed);
    assert!(
        freed,
        "{WAIT:?} after the frontend hung up on a busy queue the daemon still holds {after}\n\
         baseline after a clean close: {baseline}\n({before} requests done before the \
         hang-up, {total} by the end: the worker went on serving the ring)\nlog:\n{}",
        server.log_text()
    );
    next_connection_serves(&mut server);
}

/// A disabled ring with a request waiting in it must not keep a polling worker spinning:
/// the worker neither serves the ring nor polls it.
#[test]
fn disabled_ring_with_a_request_waiting_costs_no_cpu() {
    let Some(server) = null_daemon(&["--poll-us", "10000"]) else {
        return;
    };
    let mut fe = connect(&server);
    // As in disabled_ring_is_not_polled: the worker is polling when the request comes.
    for _ in 0..15 {
        assert_eq!(fe.run(0, T_FLUSH, 0, &[]), S_OK);
        std::thread::sleep(Duration::from_millis(3));
    }
    assert_eq!(fe.run(0, T_FLUSH, 0, &[]), S_OK);
    fe.fe
        .set_vring_enable(0, false)
        .expect("SET_VRING_ENABLE 0");
    fe.fe.get_features().expect("GET_FEATURES");
    let head = fe.put_flush(0, 10);
    fe.publish(0, head);
    std::thread::sleep(Duration::from_millis(200));
    let before = server.cpu_seconds();
    std::thread::sleep(Duration::from_secs(1));
    let used = server.cpu_seconds() - before;
    assert!(
        used < 0.2,
        "the daemon used {used:.2} CPU-s in 1 s with its only ring disabled and a request \
         waiting in it; log:\n{}",
        server.log_text()
    );
    assert_eq!(
        fe.wait_used(0, Duration::ZERO),
        None,
        "a disabled ring is not served"
    );
}

/// The SIGBUS handler recovers faults in guest memory only. A SIGBUS another process sends
/// is no fault: the daemon must die of it as any process would (it used to shrug it off
/// and stay alive with its fault recovery switched off).
#[test]
fn sigbus_from_another_process_still_terminates() {
    let Some(mut server) = null_daemon(&[]) else {
        return;
    };
    let mut fe = connect(&server); // the first memory table installs the handler
    assert!(serves(&mut fe), "log:\n{}", server.log_text());
    server.signal(libc::SIGBUS);
    let status = server.wait_exit(WAIT);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.and_then(|s| s.signal()),
        Some(libc::SIGBUS),
        "status {status:?}; log:\n{}",
        server.log_text()
    );
}

/// While one worker of a closing connection still drains its requests, the others must
/// wait quietly: the wake-up that told them to shut down used to stay pending on their
/// level-triggered eventfd, so each spun a core until the slowest worker finished.
#[test]
fn closing_workers_wait_without_spinning() {
    let Some(server) = null_daemon(&[
        "--num-queues",
        "2",
        "--threads",
        "2",
        "--null-latency-us",
        "2000000",
        "--poll-us",
        "0",
    ]) else {
        return;
    };
    {
        let mut fe = TestFrontend::connect(server.socket(), 2, QSIZE).expect("connect");
        park(&mut fe, 4); // queue 0's worker will drain for 2 s after the hang-up
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = server.cpu_seconds();
    std::thread::sleep(Duration::from_secs(1));
    let used = server.cpu_seconds() - before;
    assert!(
        used < 0.2,
        "the daemon used {used:.2} CPU-s in 1 s while one worker drained; log:\n{}",
        server.log_text()
    );
    let drained = server.wait_log_line("connection 1: in-flight requests drained", WAIT);
    assert!(drained.is_some(), "log:\n{}", server.log_text());
}

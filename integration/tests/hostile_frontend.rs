//! Malformed vhost-user messages: the daemon closes that connection (with a log line) and
//! accepts the next one, which then serves verified I/O.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use integration::frontend::*;
use integration::{Daemon, Server};
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

// vhost-user request codes (vhost-user spec, "Front-end message types").
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const VERSION_1: u32 = 0x1;

/// How long the daemon may take to hang up on a connection that sent garbage.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `msgs` on a fresh connection (the daemon's first), expects the daemon to hang up
/// on it and to log why (`... closed: failed to handle request: {why}`), then checks that
/// a new connection does verified I/O.
fn case(msgs: &[(u32, u32, Vec<u8>)], why: &str) {
    let mut server = Daemon::with_image(&[]);
    {
        let mut s = UnixStream::connect(server.socket()).expect("connect");
        for (req, size, payload) in msgs {
            // The daemon may already have closed the connection: later sends may fail.
            if raw_message(&mut s, *req, VERSION_1, *size, payload).is_err() {
                break;
            }
        }
        expect_hangup(&mut s, &server);
    }
    expect_closed_log(&server, 1, why);
    server.assert_alive();
    next_connection_serves(&server, 9);
    server.assert_alive();
}

/// Reads (and drops replies to the valid messages) until the daemon hangs up: EOF, or
/// ECONNRESET, which is how Linux reports a peer that closed with our bytes unread. A read
/// timeout is a failure: the daemon ignored the garbage and kept the connection open.
fn expect_hangup(s: &mut UnixStream, server: &Daemon) {
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the daemon kept the connection open (and talking) for {CLOSE_TIMEOUT:?}; log:\n{}",
            server.log_text()
        );
        s.set_read_timeout(Some(left)).expect("read timeout");
        match s.read(&mut buf) {
            Ok(0) => return,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "the daemon did not close the connection within {CLOSE_TIMEOUT:?} of the \
                     garbage (read timed out: it ignored it); log:\n{}",
                    server.log_text()
                )
            }
            Err(e) => panic!(
                "reading from the daemon failed with {e:?}, neither EOF nor a reset; log:\n{}",
                server.log_text()
            ),
        }
    }
}

/// Asserts corodev logged why it closed its `connection`-th connection: the line ends in
/// `closed: failed to handle request: {why}`. Only corodev's log is checked:
/// qemu-storage-daemon words its errors its own way.
fn expect_closed_log(server: &Daemon, connection: u32, why: &str) {
    if server.kind() != Server::Corodev {
        return;
    }
    let prefix = format!("connection {connection}: closed: ");
    let Some(line) = server.wait_log_line(&prefix, CLOSE_TIMEOUT) else {
        panic!("no `{prefix}...` line in the log:\n{}", server.log_text());
    };
    let want = format!("{prefix}failed to handle request: {why}");
    assert!(
        line.ends_with(&want),
        "the close is logged, but not as {want:?}: {line}\nlog:\n{}",
        server.log_text()
    );
}

/// A fresh connection to `server` writes and reads back a 4 KiB pattern (`seed`).
fn next_connection_serves(server: &Daemon, seed: u64) {
    let mut fe = TestFrontend::connect(server.socket(), 1, 128).expect("next connection");
    assert!(
        fe.verified_io(0, 0, &pattern(seed, 4096)),
        "log: {}",
        server.log_text()
    );
}

fn u64b(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut v = index.to_le_bytes().to_vec();
    v.extend_from_slice(&num.to_le_bytes());
    v
}

/// What the vhost crate calls a message it cannot parse (`vhost_user::Error::InvalidMessage`).
const INVALID_MESSAGE: &str = "invalid message";
/// What it calls a well-formed request with values the backend refuses (`InvalidParam`).
const INVALID_PARAM: &str = "invalid parameters";

#[test]
fn wrong_payload_size() {
    case(
        &[(SET_OWNER, 0, vec![]), (SET_FEATURES, 4, vec![0, 0, 0, 0])],
        INVALID_MESSAGE,
    );
}

#[test]
fn size_field_larger_than_payload_limit() {
    case(
        &[(SET_OWNER, 0, vec![]), (GET_FEATURES, 0x1000_0000, vec![])],
        INVALID_MESSAGE,
    );
}

#[test]
fn unknown_request_code() {
    case(&[(SET_OWNER, 0, vec![]), (999, 0, vec![])], INVALID_MESSAGE);
}

#[test]
fn mem_table_with_zero_regions() {
    // VhostUserMemory header: num_regions u32 + padding u32, no regions and no fds.
    case(
        &[(SET_OWNER, 0, vec![]), (SET_MEM_TABLE, 8, vec![0; 8])],
        INVALID_MESSAGE,
    );
}

/// SET_VRING_NUM `num` for vring `index` after negotiating VERSION_1: the daemon must
/// refuse it and hang up. Nothing follows it, so a daemon that accepts the value keeps
/// the connection open and the test fails on the read timeout.
fn vring_num_case(index: u32, num: u32) {
    case(
        &[
            (SET_OWNER, 0, vec![]),
            (SET_FEATURES, 8, u64b(1 << 32 | 1 << 30)),
            (SET_VRING_NUM, 8, vring_state(index, num)),
        ],
        INVALID_PARAM,
    );
}

#[test]
fn vring_num_zero() {
    vring_num_case(0, 0);
}

#[test]
fn vring_num_not_power_of_two() {
    // Virtio 1.2, 2.7: "Queue Size value is always a power of 2" for split queues.
    vring_num_case(0, 100);
}

#[test]
fn vring_num_above_queue_size() {
    vring_num_case(0, 65535);
}

#[test]
fn vring_num_bad_index() {
    vring_num_case(99, 128);
}

/// The NACK a REPLY_ACK frontend gets for a request the backend refused.
fn is_nack(r: &Result<(), vhost::Error>) -> bool {
    matches!(
        r,
        Err(vhost::Error::VhostUserProtocol(
            vhost::vhost_user::Error::BackendInternalError
        ))
    )
}

/// The daemon NACKed `what` (the result `r`), then hung up, and (corodev) logged a line
/// containing `because`.
fn assert_refused(
    server: &Daemon,
    s: &AckedSession,
    r: Result<(), vhost::Error>,
    what: &str,
    because: &str,
) {
    assert!(
        is_nack(&r),
        "{what} must be NACKed, got {r:?}; log:\n{}",
        server.log_text()
    );
    if let Err(e) = s.hangup() {
        panic!(
            "the daemon must hang up after refusing {what}: {e}; log:\n{}",
            server.log_text()
        );
    }
    if server.kind() == Server::Corodev {
        assert!(
            server.wait_log_line(because, CLOSE_TIMEOUT).is_some(),
            "the log must say {because:?}; log:\n{}",
            server.log_text()
        );
    }
}

#[test]
fn vring_addr_outside_memory() {
    let mut server = Daemon::with_image(&[]);
    {
        let mut s = AckedSession::connect(server.socket());
        let all = MemRegion {
            gpa: 0,
            size: s.mem.size(),
            offset: 0,
        };
        s.set_mem_table(&[all]).expect("a valid table is accepted");
        s.fe.set_vring_num(0, 128).expect("SET_VRING_NUM 128");
        // Control: rings inside the table are accepted.
        let inside = |desc: u64, used: u64, avail: u64| VringConfigData {
            queue_max_size: 128,
            queue_size: 128,
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: used,
            avail_ring_addr: avail,
            log_addr: None,
        };
        s.fe.set_vring_addr(0, &inside(s.va(0), s.va(0x1000), s.va(0x2000)))
            .expect("rings inside guest memory are accepted");
        // Rings at frontend addresses no region maps.
        let r = s.fe.set_vring_addr(
            0,
            &inside(0xdead_0000_0000, 0xdead_0001_0000, 0xdead_0002_0000),
        );
        assert!(
            is_nack(&r),
            "rings outside guest memory must be NACKed, got {r:?}; log:\n{}",
            server.log_text()
        );
        if let Err(e) = s.hangup() {
            panic!(
                "the daemon must hang up after refusing the rings: {e}; log:\n{}",
                server.log_text()
            );
        }
    }
    expect_closed_log(
        &server,
        1,
        "handler failed to handle request: Missing memory mapping",
    );
    server.assert_alive();
    next_connection_serves(&server, 10);
    server.assert_alive();
}

#[test]
fn many_connections_leak_no_descriptors() {
    let mut server = Daemon::with_image(&["--num-queues", "2"]);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .expect("server fd dir")
            .count()
    };
    // Warm up: the first connection may create lazily-made state.
    drop(TestFrontend::connect(server.socket(), 2, 64).expect("connect"));
    std::thread::sleep(Duration::from_millis(200));
    let before = fds();
    for i in 0..30u64 {
        let mut fe = TestFrontend::connect(server.socket(), 2, 64).expect("connect");
        assert!(fe.verified_io((i % 2) as usize, i * 8, &pattern(i, 4096)));
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = fds();
    assert!(
        after <= before + 2,
        "descriptors grew from {before} to {after} over 30 connections"
    );
    server.assert_alive();
}

#[test]
fn overlapping_memory_regions_are_refused() {
    let mut server = Daemon::with_image(&[]);
    let mib = 1u64 << 20;
    // Control: the same exchange with a sane table is accepted.
    let region = |gpa, size, offset| MemRegion { gpa, size, offset };
    send_mem_table(server.socket(), &[region(0, 16 * mib, 0)]).expect("a valid table is accepted");
    // Two regions claiming the same guest addresses [4M, 8M) and [6M, 10M).
    let r = send_mem_table(
        server.socket(),
        &[
            region(4 * mib, 4 * mib, 0),
            region(6 * mib, 4 * mib, 4 * mib),
        ],
    );
    assert!(
        is_nack(&r),
        "an overlapping memory table must be NACKed, got {r:?}; log:\n{}",
        server.log_text()
    );
    // Connection 1 was the control.
    expect_closed_log(
        &server,
        2,
        "handler failed to handle request: Some of the memory regions intersect with each other",
    );
    server.assert_alive();
    next_connection_serves(&server, 11);
}

/// A ring that starts inside guest memory but runs past its end: the library used to
/// accept it, and the first kick then hung the daemon (it stopped answering even new
/// connections). Refused at SET_VRING_ADDR now.
#[test]
fn vring_avail_ring_running_past_the_end_of_memory() {
    let mut server = Daemon::with_image(&[]);
    {
        let mut s = AckedSession::connect(server.socket());
        let all = MemRegion {
            gpa: 0,
            size: s.mem.size(),
            offset: 0,
        };
        s.set_mem_table(&[all]).expect("a valid table is accepted");
        s.fe.set_vring_num(0, 128).expect("SET_VRING_NUM 128");
        // 6 + 2 * 128 bytes of avail ring, starting 64 bytes before the end of memory.
        let end = s.mem.size();
        let r = s.fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 128,
                queue_size: 128,
                flags: 0,
                desc_table_addr: s.va(0),
                used_ring_addr: s.va(0x1000),
                avail_ring_addr: s.va(end - 64),
                log_addr: None,
            },
        );
        assert_refused(
            &server,
            &s,
            r,
            "an avail ring running past the end of memory",
            "is not inside guest memory",
        );
    }
    server.assert_alive();
    next_connection_serves(&server, 11);
    server.assert_alive();
}

/// A memory region claiming more bytes than its file has: mapping it succeeds, and the
/// first access past the end of the file raised SIGBUS and killed the daemon. Refused at
/// SET_MEM_TABLE now.
#[test]
fn memory_region_larger_than_its_file() {
    let mut server = Daemon::with_image(&[]);
    {
        let mut s = AckedSession::connect(server.socket());
        let too_big = MemRegion {
            gpa: 0,
            size: 2 * s.mem.size(),
            offset: 0,
        };
        let r = s.set_mem_table(&[too_big]);
        assert_refused(
            &server,
            &s,
            r,
            "a region larger than its file",
            "runs past the end of its",
        );
    }
    server.assert_alive();
    next_connection_serves(&server, 12);
    server.assert_alive();
}

/// The frontend shrinks its memory file after the table was accepted: the daemon's next
/// access to a page past the new end raised SIGBUS and killed it (and every guest it
/// served). Now the fault is recovered, the connection closed, the daemon lives on.
#[test]
fn memory_file_truncated_while_in_use() {
    let mut server = Daemon::with_image(&[]);
    let fe = TestFrontend::connect(server.socket(), 1, 128).expect("connect");
    truncate_under_a_request(&mut server, fe);
    next_connection_serves(&server, 13);
    server.assert_alive();
}

/// A frontend that replaces its memory table over and over (different sizes, so every map
/// is a new range) must not wear out the truncation recovery: the daemon keeps track of
/// only the maps still in use. Before, each map took one of a fixed number of slots for
/// the connection's lifetime, and past them a truncation killed the daemon again.
#[test]
fn memory_table_churn_does_not_wear_out_truncation_recovery() {
    let mut server = Daemon::with_image(&[]);
    let mut fe = TestFrontend::connect(server.socket(), 1, 128).expect("connect");
    // 1100 sizes from 16 MiB down to 11.7 MiB: every map a range of its own, and all of
    // them larger than the 8 MiB the truncation below needs.
    for i in 0..1100u64 {
        let size = fe.mem.size() - i * 4096;
        fe.set_memory_size(size).expect("SET_MEM_TABLE");
    }
    // A round trip: the daemon has taken every table before the file shrinks. Without it
    // the worker could answer the first request below while the tables were still being
    // taken, and the next one, now longer than the file, ended the connection instead.
    fe.fe.get_features().expect("a round trip");
    truncate_under_a_request(&mut server, fe);
    next_connection_serves(&server, 17);
    server.assert_alive();
}

/// Puts a read whose header, data and status lie at 8 MiB, truncates the memory file to
/// 1 MiB and publishes it: the daemon must survive, notice and close the connection.
fn truncate_under_a_request(server: &mut Daemon, mut fe: TestFrontend) {
    // Setup messages are not acknowledged: a first request proves the daemon took the
    // memory table while the file was whole.
    assert!(fe.verified_io(0, 0, &pattern(14, 4096)));
    let (hdr, data, status) = (8u64 << 20, (8u64 << 20) + 4096, (8u64 << 20) + 8192);
    fe.mem.write(hdr, &header(T_IN, 0, 0));
    let d = Desc::new;
    fe.put_descs(
        0,
        &[
            (0, d(hdr, 16, VIRTQ_DESC_F_NEXT, 1)),
            (1, d(data, 4096, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2)),
            (2, d(status, 1, VIRTQ_DESC_F_WRITE, 0)),
        ],
    );
    fe.mem.truncate(1 << 20); // the rings (below 64 KiB) stay
    fe.publish(0, 0);
    std::thread::sleep(Duration::from_millis(300));
    server.assert_alive();
    if server.kind() == Server::Corodev {
        let line = server.wait_log_line("guest memory was truncated", CLOSE_TIMEOUT);
        assert!(
            line.is_some(),
            "the daemon must notice the truncation; log:\n{}",
            server.log_text()
        );
        assert!(
            server
                .wait_log_line(": frontend disconnected", CLOSE_TIMEOUT)
                .is_some()
                || server.wait_log_line(": closed", CLOSE_TIMEOUT).is_some(),
            "and close the connection; log:\n{}",
            server.log_text()
        );
    }
    drop(fe);
    server.assert_alive();
}

/// A call eventfd the frontend made blocking and filled to the top: signalling it would
/// block the worker for ever with the vring lock held, so that GET_VRING_BASE (and with it
/// SIGTERM) hung too. Ring eventfds are made non-blocking now.
#[test]
fn full_blocking_call_eventfd_does_not_wedge_the_daemon() {
    let mut server = Daemon::with_image(&[]);
    let mut fe = TestFrontend::connect(server.socket(), 1, 128).expect("connect");
    assert!(fe.verified_io(0, 0, &pattern(18, 4096)));
    let full = EventFd::new(0).expect("a blocking eventfd");
    full.write(u64::MAX - 1).expect("fill its counter");
    fe.fe.set_vring_call(0, &full).expect("SET_VRING_CALL");
    fe.fe
        .get_features()
        .expect("a round trip: the daemon has the new call fd");
    // Completing this request signals the full eventfd.
    let status = fe.request(0, T_IN, 0, &[(DATA_BASE, 4096)]);
    let used = fe.wait_used(0, Duration::from_secs(5));
    assert!(
        used.is_some(),
        "the request must still complete; log:\n{}",
        server.log_text()
    );
    assert_eq!(fe.mem.read(status, 1)[0], S_OK);
    // The ring stops, so the worker is not stuck holding the vring lock.
    let (tx, rx) = std::sync::mpsc::channel();
    let stopper = std::thread::spawn(move || {
        let r = fe.stop_queue(0).map(drop);
        let _ = tx.send(r.is_ok());
        fe
    });
    let stopped = rx.recv_timeout(Duration::from_secs(5));
    if stopped.is_err() {
        // Unstick the test before failing it: the daemon is wedged.
        let _ = full.read();
    }
    assert_eq!(
        stopped,
        Ok(true),
        "GET_VRING_BASE must answer; log:\n{}",
        server.log_text()
    );
    drop(stopper.join());
    server.assert_alive();
}

/// Kick, call and error descriptors must be eventfds. A pipe as the call descriptor used to
/// be taken: once its buffer filled, the worker signalling it blocked for ever.
#[test]
fn ring_descriptors_that_are_not_eventfds_are_refused() {
    use std::os::fd::FromRawFd;
    let mut server = Daemon::with_image(&[]);
    type Send = fn(&mut AckedSession, &EventFd) -> Result<(), vhost::Error>;
    let cases: [(&str, Send); 3] = [
        ("call", |s, fd| s.fe.set_vring_call(0, fd)),
        ("kick", |s, fd| s.fe.set_vring_kick(0, fd)),
        ("err", |s, fd| s.fe.set_vring_err(0, fd)),
    ];
    for (connection, (what, send)) in (1..).zip(cases) {
        {
            let mut s = AckedSession::connect(server.socket());
            let all = MemRegion {
                gpa: 0,
                size: s.mem.size(),
                offset: 0,
            };
            s.set_mem_table(&[all]).expect("a valid table is accepted");
            let mut pipe = [0; 2];
            // SAFETY: pipe2 fills two descriptors we then own.
            assert_eq!(
                unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) },
                0
            );
            // SAFETY: the read end is ours; EventFd takes it over (it is only sent, never
            // used as an eventfd here). The write end is closed by its File.
            let not_an_eventfd = unsafe { EventFd::from_raw_fd(pipe[0]) };
            // SAFETY: the write end is ours.
            drop(unsafe { std::fs::File::from_raw_fd(pipe[1]) });
            let r = send(&mut s, &not_an_eventfd);
            assert_refused(
                &server,
                &s,
                r,
                &format!("a pipe as the {what} descriptor"),
                &format!("the {what} descriptor is not an eventfd"),
            );
        }
        if server.kind() == Server::Corodev {
            expect_closed_log(&server, connection, "invalid parameters");
        }
        server.assert_alive();
    }
    next_connection_serves(&server, 15);
}

/// A memory table that maps the same file twice, so that a read's data buffer is the
/// queue's own rings: the device's data lands on the descriptor table and both rings. The
/// daemon must neither crash nor hang nor spin: whatever the rings then say is either
/// served or breaks the queue loudly, and the next connection works.
#[test]
fn data_buffer_aliasing_the_rings() {
    let mut server = Daemon::with_image(&["--num-queues", "1"]);
    {
        let mut fe = TestFrontend::connect(server.socket(), 1, 128).expect("connect");
        // Sector 0 holds a pattern (it will become the rings' contents).
        assert!(fe.verified_io(0, 0, &pattern(16, 65536)));
        let alias = 1u64 << 32;
        fe.alias_memory(alias).expect("SET_MEM_TABLE with an alias");
        // Read 64 KiB of the pattern into the alias of GPA 0: queue 0's whole 64 KiB slot.
        let status = fe.request(0, T_IN, 0, &[(alias, 65536)]);
        std::thread::sleep(Duration::from_millis(300));
        server.assert_alive();
        server.assert_idle();
        let _ = status; // the status byte sits outside the rings; what it says is not the point
        let broke = fe.error_signalled(0, Duration::from_millis(500));
        let served = fe.wait_used(0, Duration::from_millis(500)).is_some();
        assert!(
            broke || served,
            "the request must be answered or the queue break loudly; log:\n{}",
            server.log_text()
        );
        server.assert_alive();
    }
    next_connection_serves(&server, 16);
    server.assert_alive();
}

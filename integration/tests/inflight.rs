//! Crash-safe restart at the protocol level: a frontend that keeps its guest memory, its
//! rings and the inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) across a daemon
//! that is killed and started again, as QEMU with `reconnect=` does; and inflight regions a
//! hostile frontend hands over.
//!
//! Requests are held in flight on corodev's null backend with a fixed latency (flushes,
//! each with its own descriptors and status byte); a GET_ID, answered without backend I/O,
//! overtakes them, so the kill finds requests that completed out of order — the case a
//! restart at the used index gets wrong (it would answer the GET_ID again and never the
//! oldest flush). corodev only (latency has no qemu-storage-daemon counterpart): each
//! test returns early under `CORODEV_TEST_SERVER=qsd`. The real-guest proof is
//! `tests/restart.rs`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use integration::frontend::*;
use integration::{Daemon, Server};
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;

const QSIZE: u16 = 16;
/// How long a flush waits in the null backend: long enough to kill the daemon under it.
const LATENCY_US: &str = "1500000";
const WAIT: Duration = Duration::from_secs(10);
/// Where the GET_ID request lives: descriptor slots 12-14, buffers in the request area.
const GET_ID_HEAD: u16 = 12;

/// corodev on the null backend; `None` (skip) against qemu-storage-daemon.
fn null_daemon(queues: u16) -> Option<Daemon> {
    if Server::from_env() != Server::Corodev {
        eprintln!("skipped: corodev's inflight tracking on its null backend with latency");
        return None;
    }
    let queues = queues.to_string();
    Some(Daemon::corodev_null(&[
        "--null-latency-us",
        LATENCY_US,
        "--num-queues",
        &queues,
        "--threads",
        &queues,
        "--queue-size",
        "16",
    ]))
}

/// Publishes `n` flushes on queue `q` (heads 0, 2, ...) and then a GET_ID (head 12), which
/// overtakes them; waits for the GET_ID's answer. Returns the flush heads, in flight.
fn overtake(fe: &mut TestFrontend, q: usize, n: u16) -> Vec<u16> {
    let heads: Vec<u16> = (0..n).map(|i| fe.put_flush(q, i)).collect();
    fe.publish_heads(q, &heads);
    let base = REQ_AREA + ((q as u64) << 16) + 0x8000;
    fe.mem.write(base, &header(T_GET_ID, 0, 0));
    fe.mem.write(base + 64, &[0xff]);
    fe.put_descs(
        q,
        &[
            (GET_ID_HEAD, Desc::new(base, 16, VIRTQ_DESC_F_NEXT, 13)),
            (
                13,
                Desc::new(base + 32, 20, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 14),
            ),
            (14, Desc::new(base + 64, 1, VIRTQ_DESC_F_WRITE, 0)),
        ],
    );
    fe.publish(q, GET_ID_HEAD);
    let used = fe.wait_used(q, WAIT).expect("GET_ID answered");
    assert_eq!(
        used.id,
        u32::from(GET_ID_HEAD),
        "GET_ID overtakes the flushes"
    );
    assert_eq!(fe.mem.read(base + 64, 1)[0], S_OK);
    for i in 0..n {
        assert_eq!(fe.flush_status(q, i), 0xff, "flush {i} still in flight");
    }
    heads
}

/// Collects used elements on queue `q` until `n` arrived (panics past `WAIT`), then checks
/// no more come for a moment. Returns their heads in completion order.
fn answers(fe: &mut TestFrontend, q: usize, n: usize) -> Vec<u16> {
    let mut heads = Vec::new();
    let deadline = Instant::now() + WAIT;
    while heads.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(used) = fe.wait_used(q, left) else {
            panic!(
                "queue {q}: {} of {n} answers, then none: {heads:?}",
                heads.len()
            );
        };
        heads.push(used.id as u16);
    }
    if let Some(extra) = fe.wait_used(q, Duration::from_millis(300)) {
        panic!("queue {q}: answered again: {extra:?} after {heads:?}");
    }
    heads
}

/// The new daemon's resubmission line for queue `q`: (resubmitted, overtaken).
fn resubmission(server: &Daemon, q: usize) -> (u32, u32) {
    let needle = format!("queue {q}: resubmitting ");
    let line = server.wait_log_line(&needle, WAIT).unwrap_or_else(|| {
        panic!(
            "no resubmission logged for queue {q}:\n{}",
            server.log_text()
        )
    });
    // "... queue Q: resubmitting N request(s) ...; K of them were overtaken ...": the
    // numbers after the needle. (Not the first number equal to Q in the whole line: the
    // log timestamp's hour is one of them, so at 00:xx queue 0 read the minutes.)
    let (_, after) = line.split_once(&needle).expect("the line holds the needle");
    let nums: Vec<u32> = after
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

#[test]
fn killed_daemon_resumes_requests_left_in_flight_exactly_once() {
    let Some(mut server) = null_daemon(1) else {
        return;
    };
    let mut fe = TestFrontend::connect_tracked(server.socket(), 1, QSIZE).expect("connect");
    let heads = overtake(&mut fe, 0, 4);
    server.restart(libc::SIGKILL, None);
    fe.reconnect(server.socket()).expect("reconnect");
    // Oldest first, each once; the GET_ID not again.
    assert_eq!(answers(&mut fe, 0, 4), heads);
    for i in 0..4 {
        assert_eq!(fe.flush_status(0, i), S_OK, "flush {i}");
    }
    // Head 0 sat below the used index (1) at the kill: overtaken by the GET_ID.
    assert_eq!(resubmission(&server, 0), (4, 1));
    // And the ring goes on from the right place.
    let head = fe.put_flush(0, 4);
    fe.publish(0, head);
    assert_eq!(answers(&mut fe, 0, 1), vec![head]);
    assert_eq!(
        fe.used_idx(0),
        6,
        "4 flushes + GET_ID + 1, each answered once"
    );
    server.assert_alive();
}

#[test]
fn every_queue_resumes_its_own_requests() {
    let Some(mut server) = null_daemon(2) else {
        return;
    };
    let mut fe = TestFrontend::connect_tracked(server.socket(), 2, QSIZE).expect("connect");
    let first = overtake(&mut fe, 0, 3);
    let second = overtake(&mut fe, 1, 5);
    server.restart(libc::SIGKILL, None);
    fe.reconnect(server.socket()).expect("reconnect");
    assert_eq!(answers(&mut fe, 0, 3), first);
    assert_eq!(answers(&mut fe, 1, 5), second);
    assert_eq!(resubmission(&server, 0), (3, 1));
    assert_eq!(resubmission(&server, 1), (5, 1));
    server.assert_alive();
}

#[test]
fn daemon_killed_twice_before_answering_resumes_from_the_same_region() {
    let Some(mut server) = null_daemon(1) else {
        return;
    };
    let mut fe = TestFrontend::connect_tracked(server.socket(), 1, QSIZE).expect("connect");
    let heads = overtake(&mut fe, 0, 2);
    server.restart(libc::SIGKILL, None);
    fe.reconnect(server.socket()).expect("reconnect");
    assert_eq!(resubmission(&server, 0), (2, 1));
    // Killed again while the resubmitted flushes are still in the null backend.
    server.restart(libc::SIGKILL, None);
    fe.reconnect(server.socket()).expect("reconnect");
    assert_eq!(answers(&mut fe, 0, 2), heads);
    assert_eq!(resubmission(&server, 0), (2, 1));
}

#[test]
fn sigterm_then_a_new_binary_answers_everything_and_resubmits_nothing() {
    let Some(mut server) = null_daemon(1) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let upgrade = dir.path().join("corodev-upgraded");
    std::fs::copy(integration::corodev_bin(), &upgrade).expect("copy the binary");
    let mut fe = TestFrontend::connect_tracked(server.socket(), 1, QSIZE).expect("connect");
    let heads = overtake(&mut fe, 0, 3);
    // A stop drains: every request is answered before the process exits.
    server.restart(libc::SIGTERM, Some(&upgrade));
    assert_eq!(answers(&mut fe, 0, 3), heads);
    fe.reconnect(server.socket())
        .expect("reconnect to the new binary");
    let head = fe.put_flush(0, 3);
    fe.publish(0, head);
    assert_eq!(answers(&mut fe, 0, 1), vec![head]);
    assert!(
        !server.log_text().contains("resubmitting"),
        "nothing was left in flight:\n{}",
        server.log_text()
    );
}

/// Byte offset of head `head`'s `inflight` flag in queue 0's part of the region.
fn flag_at(head: u16) -> u64 {
    16 + 16 * u64::from(head)
}

#[test]
fn hostile_region_contents_refuse_the_ring_start_and_nothing_else() {
    let Some(mut server) = null_daemon(1) else {
        return;
    };
    let mut fe = TestFrontend::connect_tracked(server.socket(), 1, QSIZE).expect("connect");
    overtake(&mut fe, 0, 1);
    server.restart(libc::SIGKILL, None);
    let region = fe.inflight.as_ref().expect("region").1.try_clone().unwrap();
    // (offset, bytes, what the daemon says) — each restored before the next.
    let cases: [(u64, Vec<u8>, &str); 5] = [
        (8, 9u16.to_le_bytes().to_vec(), "region version 9 is not 1"),
        (
            10,
            64u16.to_le_bytes().to_vec(),
            "region records 64 descriptors, the ring has 16",
        ),
        (flag_at(5), vec![7], "descriptor 5 has inflight flag 7"),
        // Every head in flight: more than the driver ever published.
        (
            flag_at(0),
            vec![1; 16 * 16],
            "16 requests in flight, but only 1 published past the used index",
        ),
        // The region's used index one behind, its last batch head off the table.
        (
            12,
            [40u16.to_le_bytes(), 0u16.to_le_bytes()].concat(),
            "last batch entry 40 is not below the queue size 16",
        ),
    ];
    for (offset, bytes, said) in cases {
        let mut saved = vec![0; bytes.len()];
        region.read_exact_at(&mut saved, offset).unwrap();
        region.write_all_at(&bytes, offset).unwrap();
        let refused = fe.reconnect(server.socket());
        assert!(refused.is_err(), "{said}: the ring must not start");
        assert!(
            server.wait_log_line(said, WAIT).is_some(),
            "expected `{said}`, log:\n{}",
            server.log_text()
        );
        server.assert_alive();
        region.write_all_at(&saved, offset).unwrap();
    }
    // Restored, the region resumes the flush left in flight, on the same daemon.
    fe.reconnect(server.socket()).expect("reconnect");
    assert_eq!(answers(&mut fe, 0, 1), vec![0]);
    assert_eq!(resubmission(&server, 0), (1, 1));
}

#[test]
fn a_resubmitted_head_with_a_garbage_chain_fails_that_request_only() {
    let Some(mut server) = null_daemon(1) else {
        return;
    };
    let mut fe = TestFrontend::connect_tracked(server.socket(), 1, QSIZE).expect("connect");
    overtake(&mut fe, 0, 1);
    server.restart(libc::SIGKILL, None);
    // The region now claims head 9 (never a request: its descriptor points past guest
    // memory) is in flight instead of head 0.
    let region = fe.inflight.as_ref().expect("region").1.try_clone().unwrap();
    region.write_all_at(&[0], flag_at(0)).unwrap();
    region.write_all_at(&[1], flag_at(9)).unwrap();
    fe.put_descs(0, &[(9, Desc::new(1 << 40, 16, 0, 0))]);
    fe.reconnect(server.socket()).expect("reconnect");
    assert_eq!(answers(&mut fe, 0, 1), vec![9], "answered, as an error");
    server.assert_alive();
    let head = fe.put_flush(0, 2);
    fe.publish(0, head);
    assert_eq!(answers(&mut fe, 0, 1), vec![head], "the queue still serves");
}

#[test]
fn regions_the_device_cannot_use_are_refused_with_one_line() {
    let Some(mut server) = null_daemon(1) else {
        return;
    };
    let first = TestFrontend::connect_tracked(server.socket(), 1, QSIZE).expect("connect");
    let (desc, memfd) = first.inflight.as_ref().expect("region");
    let desc = *desc;
    let plain = tempfile::tempfile().unwrap();
    plain.set_len(desc.mmap_size).unwrap();
    let cases: [(VhostUserInflight, &std::fs::File, &str); 4] = [
        (
            desc,
            &plain,
            "region file is not a memfd sealed against shrinking",
        ),
        (
            VhostUserInflight::new(desc.mmap_size, desc.mmap_size, 1, QSIZE),
            memfd,
            "ends before the region",
        ),
        (
            VhostUserInflight::new(64, 0, 1, QSIZE),
            memfd,
            "region of 64 bytes is smaller than the",
        ),
        (
            VhostUserInflight::new(desc.mmap_size, 0, 9, QSIZE),
            memfd,
            "9 queues asked for, the device has 1",
        ),
    ];
    drop(first.fe);
    for (msg, file, said) in cases {
        let mut fe = TestFrontend::connect_tracked(server.socket(), 1, QSIZE).expect("connect");
        let refused = fe.fe.set_inflight_fd(&msg, file.as_raw_fd());
        assert!(refused.is_err(), "{said}: must be refused");
        assert!(
            server.wait_log_line(said, WAIT).is_some(),
            "expected `{said}`, log:\n{}",
            server.log_text()
        );
        server.assert_alive();
    }
    // The daemon goes on serving.
    let mut fe = TestFrontend::connect_tracked(server.socket(), 1, QSIZE).expect("connect");
    let head = fe.put_flush(0, 0);
    fe.publish(0, head);
    assert_eq!(answers(&mut fe, 0, 1), vec![head]);
}

#[test]
fn sigterm_answers_everything_before_it_hangs_up() {
    // A frontend without an inflight region restarts a ring at the used index it reads
    // when it sees the hang-up: every request must be answered by then.
    let Some(server) = null_daemon(1) else {
        return;
    };
    let mut fe = TestFrontend::connect(server.socket(), 1, QSIZE).expect("connect");
    let heads = overtake(&mut fe, 0, 4);
    let mut socket = fe.socket().expect("socket");
    socket.set_read_timeout(Some(WAIT)).unwrap();
    server.sigterm();
    let mut byte = [0u8; 1];
    let n = std::io::Read::read(&mut socket, &mut byte).expect("hang-up within the timeout");
    assert_eq!(n, 0, "the daemon sends nothing unasked");
    assert_eq!(
        fe.used_idx(0),
        5,
        "at the hang-up the 4 flushes (and the GET_ID) are answered"
    );
    assert_eq!(answers(&mut fe, 0, 4), heads);
}

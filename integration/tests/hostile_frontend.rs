//! Malformed vhost-user messages: the daemon closes that connection (with a log line) and
//! accepts the next one, which then serves verified I/O.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use integration::frontend::*;
use integration::Daemon;

// vhost-user request codes (vhost-user spec, "Front-end message types").
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const VERSION_1: u32 = 0x1;

/// Sends `msgs` on a fresh connection, expects the daemon to close it, then checks that a
/// new connection does verified I/O.
fn case(msgs: &[(u32, u32, Vec<u8>)]) {
    let mut server = Daemon::with_image(&[]);
    {
        let mut s = UnixStream::connect(server.socket()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        for (req, size, payload) in msgs {
            // The daemon may already have closed the connection: later sends may fail.
            if raw_message(&mut s, *req, VERSION_1, *size, payload).is_err() {
                break;
            }
        }
        // Drain replies until the daemon hangs up (EOF) or the read times out.
        let mut buf = [0u8; 4096];
        let mut closed = false;
        for _ in 0..100 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
            }
        }
        assert!(
            closed,
            "the daemon should close a connection that sent garbage"
        );
    }
    server.assert_alive();
    next_connection_serves(&server, 9);
    server.assert_alive();
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

#[test]
fn wrong_payload_size() {
    case(&[(SET_OWNER, 0, vec![]), (SET_FEATURES, 4, vec![0, 0, 0, 0])]);
}

#[test]
fn size_field_larger_than_payload_limit() {
    case(&[(SET_OWNER, 0, vec![]), (GET_FEATURES, 0x1000_0000, vec![])]);
}

#[test]
fn unknown_request_code() {
    case(&[(SET_OWNER, 0, vec![]), (999, 0, vec![])]);
}

#[test]
fn mem_table_with_zero_regions() {
    // VhostUserMemory header: num_regions u32 + padding u32, no regions and no fds.
    case(&[(SET_OWNER, 0, vec![]), (SET_MEM_TABLE, 8, vec![0; 8])]);
}

#[test]
fn vring_num_zero_not_power_of_two_too_big_bad_index() {
    for (index, num) in [(0, 0), (0, 100), (0, 65535), (99, 128)] {
        case(&[
            (SET_OWNER, 0, vec![]),
            (SET_FEATURES, 8, u64b(1 << 32 | 1 << 30)),
            (SET_VRING_NUM, 8, vring_state(index, num)),
            // A reply-less error may leave the connection open; follow with garbage.
            (999, 0, vec![]),
        ]);
    }
}

#[test]
fn vring_addr_outside_memory() {
    // index, flags, desc, used, avail, log (vhost_vring_addr).
    let mut addr = Vec::new();
    addr.extend_from_slice(&0u32.to_le_bytes());
    addr.extend_from_slice(&0u32.to_le_bytes());
    for a in [0xdead_0000_0000u64, 0xdead_0001_0000, 0xdead_0002_0000, 0] {
        addr.extend_from_slice(&a.to_le_bytes());
    }
    case(&[
        (SET_OWNER, 0, vec![]),
        (SET_FEATURES, 8, u64b(1 << 32 | 1 << 30)),
        (SET_VRING_ADDR, addr.len() as u32, addr),
        (999, 0, vec![]),
    ]);
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
    assert!(r.is_err(), "an overlapping memory table must be refused");
    server.assert_alive();
    next_connection_serves(&server, 11);
}

//! Ring-level corruption by a hostile guest: there is no request to answer, so the queue
//! breaks, loudly. Each case asserts the four things the guest and the operator rely on:
//! the frontend's error eventfd (VHOST_USER_SET_VRING_ERR) is signalled, the log names the
//! queue and the reason, the other queue keeps serving, and setting the ring up afresh
//! (what a driver does when it resets the device) brings the queue back.

use std::time::Duration;

use integration::frontend::*;
use integration::{Daemon, Server};

const HDR: u64 = DATA_BASE - 4096;
const STATUS: u64 = DATA_BASE - 16;
const QSIZE: u16 = 128;
const WAIT: Duration = Duration::from_secs(5);

fn setup() -> Option<(Daemon, TestFrontend)> {
    if Server::from_env() != Server::Corodev {
        // The error eventfd and the log lines are corodev's; qsd does neither.
        return None;
    }
    let server = Daemon::with_image(&["--num-queues", "2"]);
    let fe = TestFrontend::connect(server.socket(), 2, QSIZE).expect("connect");
    Some((server, fe))
}

/// A read request in slots 0 and 1 of queue 0, not yet published.
fn put_read(fe: &TestFrontend) {
    fe.mem.write(HDR, &header(T_IN, 0, 0));
    fe.mem.write(STATUS, &[0xff]);
    let d = Desc::new;
    fe.put_descs(
        0,
        &[
            (0, d(HDR, 16, VIRTQ_DESC_F_NEXT, 1)),
            (1, d(STATUS, 1, VIRTQ_DESC_F_WRITE, 0)),
        ],
    );
}

/// The queue-0 fault must be reported with `reason`, leave queue 1 serving and the daemon
/// idle, and go away when queue 0 is set up afresh.
fn assert_broken_then_reset(server: &mut Daemon, fe: &mut TestFrontend, reason: &str) {
    assert_reported(server, fe, reason);
    assert_recovers(server, fe);
}

/// The error eventfd of queue 0 fired and the log says `reason`.
fn assert_reported(server: &Daemon, fe: &TestFrontend, reason: &str) {
    assert!(
        fe.error_signalled(0, WAIT),
        "the error eventfd of queue 0 was not signalled; log:\n{}",
        server.log_text()
    );
    let Some(line) = server.wait_log_line("queue 0: ring is broken", WAIT) else {
        panic!("no 'ring is broken' line; log:\n{}", server.log_text());
    };
    assert!(line.contains(reason), "{line:?} does not say {reason:?}");
    // virtio-queue logs (unlimited) when asked to publish a head beyond the ring; the
    // daemon must never ask.
    assert!(
        !server
            .log_text()
            .contains("attempted to add out of bounds descriptor"),
        "a bad head reached the used ring; log:\n{}",
        server.log_text()
    );
}

/// Queue 1 serves while queue 0 is broken; queue 0 serves again once set up afresh.
fn assert_recovers(server: &mut Daemon, fe: &mut TestFrontend) {
    server.assert_alive();
    server.assert_idle();
    assert!(
        fe.verified_io(1, 8, &pattern(1, 8192)),
        "queue 1 must keep serving; log:\n{}",
        server.log_text()
    );
    assert!(
        !fe.error_signalled(1, Duration::ZERO),
        "only the broken queue reports an error"
    );
    fe.restart_queue(0).expect("restart queue 0");
    assert!(
        fe.verified_io(0, 16, &pattern(2, 8192)),
        "queue 0 must serve again after it is set up afresh; log:\n{}",
        server.log_text()
    );
    assert!(
        !fe.error_signalled(0, Duration::ZERO),
        "the restarted queue is not broken"
    );
}

#[test]
fn avail_index_more_than_a_queue_ahead() {
    let Some((mut server, mut fe)) = setup() else {
        return;
    };
    fe.publish_raw_idx(0, QSIZE + 72);
    assert_broken_then_reset(
        &mut server,
        &mut fe,
        "avail index 200 is more than the queue size 128 ahead of 0",
    );
}

#[test]
fn avail_index_moves_backwards() {
    let Some((mut server, mut fe)) = setup() else {
        return;
    };
    assert!(
        fe.verified_io(0, 0, &pattern(3, 4096)),
        "two good requests first"
    );
    fe.publish_raw_idx(0, 1);
    assert_broken_then_reset(
        &mut server,
        &mut fe,
        "avail index 1 is more than the queue size 128 ahead of 2",
    );
}

#[test]
fn avail_entry_equal_to_the_queue_size() {
    let Some((mut server, mut fe)) = setup() else {
        return;
    };
    put_read(&fe);
    fe.publish(0, QSIZE);
    assert_reported(
        &server,
        &fe,
        "avail entry 128 is not below the queue size 128",
    );
    assert_eq!(fe.mem.read(STATUS, 1)[0], 0xff, "nothing was answered");
    assert_eq!(fe.wait_used(0, Duration::ZERO), None, "no used element");
    assert_recovers(&mut server, &mut fe);
}

#[test]
fn avail_entry_0xffff() {
    let Some((mut server, mut fe)) = setup() else {
        return;
    };
    put_read(&fe);
    fe.publish(0, 0xffff);
    assert_broken_then_reset(
        &mut server,
        &mut fe,
        "avail entry 65535 is not below the queue size 128",
    );
}

/// A guest that publishes a head again before the device returned it (which virtio 1.2,
/// 2.7.13.1 forbids) could otherwise make the daemon start requests without bound.
#[test]
fn head_published_again_while_in_flight() {
    let Some((mut server, mut fe)) = setup() else {
        return;
    };
    put_read(&fe);
    fe.publish_heads(0, &[0, 0]);
    let first = fe.wait_used(0, WAIT);
    assert_eq!(
        first,
        Some(Used { id: 0, len: 1 }),
        "the first publication is served"
    );
    assert_broken_then_reset(
        &mut server,
        &mut fe,
        "head 0 published again while its request is in flight",
    );
}

//! Dirty-page logging at the protocol level, as QEMU drives it while it migrates a VM: the
//! frontend hands the daemon a log (SET_LOG_BASE, `VHOST_USER_PROTOCOL_F_LOG_SHMFD`) and
//! switches logging on and off with `VHOST_F_LOG_ALL`; every guest page the daemon writes
//! while it is on (data of reads, status bytes, used ring) must be marked, nothing while
//! it is off; and logs a hostile frontend hands over are refused without harm. The
//! real-QEMU proof is `tests/migration.rs`. corodev only (the log is read from the test
//! frontend's side; qemu-storage-daemon has its own tests): each test returns early under
//! `CORODEV_TEST_SERVER=qsd`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use integration::frontend::*;
use integration::{Daemon, Server};
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

const QSIZE: u16 = 128;
/// One bit per 4 KiB page of the test frontend's guest memory.
const LOG_BYTES: u64 = MEM_SIZE as u64 / 4096 / 8;
const WAIT: Duration = Duration::from_secs(10);

fn daemon(args: &[&str]) -> Option<Daemon> {
    if Server::from_env() != Server::Corodev {
        eprintln!("skipped: corodev's dirty log, read from the test frontend");
        return None;
    }
    Some(Daemon::with_image(args))
}

/// A zeroed log file of `len` bytes, handed over as one of `claimed` bytes.
fn give_log(fe: &mut TestFrontend, len: u64, claimed: u64) -> (File, Result<(), vhost::Error>) {
    let file = tempfile::tempfile().expect("log file");
    file.set_len(len).expect("size the log");
    let region = VhostUserDirtyLogRegion {
        mmap_size: claimed,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    };
    let res = fe.fe.set_log_base(0, Some(region));
    (file, res)
}

/// Whether guest page `gpa / 4096` is marked in `log`.
fn marked(log: &File, gpa: u64) -> bool {
    let page = gpa / 4096;
    let mut byte = [0u8];
    log.read_exact_at(&mut byte, page / 8)
        .expect("read the log");
    byte[0] & (1 << (page % 8)) != 0
}

fn clear(log: &File) {
    log.write_all_at(&vec![0; LOG_BYTES as usize], 0)
        .expect("clear the log");
}

#[test]
fn pages_written_while_logging_is_on_are_marked_and_only_then() {
    let Some(mut server) = daemon(&[]) else {
        return;
    };
    let mut fe = TestFrontend::connect_logged(server.socket(), 1, QSIZE).expect("connect");
    let (log, res) = give_log(&mut fe, LOG_BYTES, LOG_BYTES);
    res.expect("SET_LOG_BASE");
    // Data for the reads: written through the daemon first, with logging off.
    let data = DATA_BASE + 5 * 4096;
    assert!(fe.verified_io(0, 64, &pattern(1, 8192)), "seed data");
    clear(&log);

    fe.set_logging(true).expect("LOG_ALL on");
    assert_eq!(fe.run(0, T_IN, 64, &[(data, 8192)]), S_OK);
    let q = &fe.queues[0];
    let (status, used) = (DATA_BASE - 16, q.used);
    for (what, gpa) in [
        ("first data page", data),
        ("second data page", data + 4096),
        ("status byte", status),
        ("used ring", used),
    ] {
        assert!(
            marked(&log, gpa),
            "{what} ({gpa:#x}) not marked while logging"
        );
    }
    assert!(
        !marked(&log, data + 2 * 4096),
        "a page the daemon did not write is marked"
    );

    fe.set_logging(false).expect("LOG_ALL off");
    clear(&log);
    assert_eq!(fe.run(0, T_IN, 64, &[(data, 8192)]), S_OK);
    for gpa in [data, data + 4096, status, used] {
        assert!(!marked(&log, gpa), "{gpa:#x} marked with logging off");
    }
    server.assert_alive();
}

#[test]
fn a_log_longer_than_its_file_is_refused_with_one_line() {
    let Some(mut server) = daemon(&[]) else {
        return;
    };
    let mut fe = TestFrontend::connect_logged(server.socket(), 1, QSIZE).expect("connect");
    let (_log, res) = give_log(&mut fe, 100, LOG_BYTES);
    assert!(res.is_err(), "a 100-byte log claimed as {LOG_BYTES} bytes");
    let said = format!(
        "dirty log of {LOG_BYTES} bytes at file offset 0 runs past the end of its 100-byte file"
    );
    assert!(
        server.wait_log_line(&said, WAIT).is_some(),
        "expected `{said}`:\n{}",
        server.log_text()
    );
    server.assert_alive();
    // A log too short for guest memory (its file as long as it claims) is refused too.
    let mut fe = TestFrontend::connect_logged(server.socket(), 1, QSIZE).expect("connect");
    let (_log, res) = give_log(&mut fe, 64, 64);
    assert!(res.is_err(), "a 64-byte log for 16 MiB of guest memory");
    assert!(
        server
            .wait_log_line("dirty log of 64 bytes does not cover guest memory", WAIT)
            .is_some(),
        "{}",
        server.log_text()
    );
    server.assert_alive();
    let mut fe = TestFrontend::connect(server.socket(), 1, QSIZE).expect("connect");
    assert!(
        fe.verified_io(0, 8, &pattern(2, 4096)),
        "the daemon still serves"
    );
}

#[test]
fn logging_toggled_and_the_log_replaced_during_io_loses_nothing() {
    let Some(mut server) = daemon(&[]) else {
        return;
    };
    let mut fe = TestFrontend::connect_logged(server.socket(), 1, QSIZE).expect("connect");
    let mut logs = Vec::new();
    for round in 0..20u64 {
        let (log, res) = give_log(&mut fe, LOG_BYTES, LOG_BYTES);
        res.expect("SET_LOG_BASE");
        logs.push(log);
        fe.set_logging(round % 2 == 0).expect("toggle LOG_ALL");
        assert!(
            fe.verified_io(0, 8 * round, &pattern(round, 4096)),
            "I/O in round {round}"
        );
    }
    server.assert_alive();
    drop(fe);
    // SET_LOG_BASE with its descriptor missing: the connection ends, the daemon goes on.
    let fe = TestFrontend::connect_logged(server.socket(), 1, QSIZE).expect("connect");
    let _ = fe.fe.set_log_base(0, None);
    assert!(
        server
            .wait_log_line("closed: failed to handle request", WAIT)
            .is_some(),
        "{}",
        server.log_text()
    );
    server.assert_alive();
    let mut fe = TestFrontend::connect(server.socket(), 1, QSIZE).expect("connect");
    assert!(fe.verified_io(0, 8, &pattern(3, 4096)));
}

//! Real guests, real kernel driver: a Linux guest under QEMU does I/O through virtio_blk on
//! a disk served by corodev, and the results are checked in the guest and on the host.

use integration::{Daemon, Guest, Image};

const MIB: u64 = 1 << 20;

#[test]
fn pattern_written_by_guest_is_on_the_host_image() {
    let image = Image::new(64 * MIB);
    let mut daemon = Daemon::start(&image, &[]);
    let run = daemon.boot(Guest::test("pattern"));
    let r = run.expect_pass();
    let (offset, len) = (
        r.get("offset").parse::<u64>(),
        r.get("length").parse::<usize>(),
    );
    let (offset, len) = (offset.expect("offset"), len.expect("length"));
    daemon.assert_alive();
    assert_eq!(
        image.md5(offset, len),
        r.get("md5"),
        "the image must hold exactly what the guest wrote"
    );
    assert!(
        image.read(0, MIB as usize).iter().all(|&b| b == 0),
        "nothing written before it"
    );
}

#[test]
fn fio_verified_randwrite_two_jobs_qd16() {
    let image = Image::new(64 * MIB);
    let mut daemon = Daemon::start(&image, &[]);
    let r = daemon.boot(Guest::test("fio")).expect_pass().clone();
    assert_eq!(r.get("jobs"), "2");
    daemon.assert_alive();
}

#[test]
fn ext4_mkfs_write_sync_fsck_clean() {
    let image = Image::new(128 * MIB);
    let mut daemon = Daemon::start(&image, &[]);
    let run = daemon.boot(Guest::test("ext4"));
    assert_eq!(run.expect_pass().get("fsck"), "clean");
    daemon.assert_alive();
    // The ext4 superblock magic (0xEF53 at byte 1080) is on the host image.
    assert_eq!(image.read(1080, 2), vec![0x53, 0xef]);
}

#[test]
fn second_guest_on_the_same_running_daemon() {
    let image = Image::new(128 * MIB);
    let mut daemon = Daemon::start(&image, &[]);
    let first = daemon.boot(Guest::test("pattern"));
    let md5 = first.expect_pass().get("md5").to_owned();
    daemon.assert_alive();
    // The first guest powered off; the daemon listens again on the same socket.
    let second = daemon.boot(Guest::test("fio"));
    second.expect_pass();
    daemon.assert_alive();
    // fio wrote 2 x 8 MiB from offset 0, so the pattern at 1 MiB was overwritten; the
    // image now holds fio's data, not zeroes or the old pattern.
    assert_ne!(image.md5(MIB, 4 * MIB as usize), md5);
    let log = daemon.log_text();
    assert!(
        log.contains("connection 2: frontend connected"),
        "the second guest must be a second connection; log:\n{log}"
    );
}

#[test]
fn guest_sees_the_configured_device() {
    let image = Image::new(32 * MIB);
    let daemon = Daemon::start(&image, &["--serial", "CORO-SERIAL-7"]);
    let run = daemon.boot(Guest::test("info"));
    run.expect_pass();
    let info = run.info();
    assert_eq!(
        info.get("size"),
        (32 * MIB / 512).to_string(),
        "capacity in sectors"
    );
    assert_eq!(info.get("lbs"), "512");
    assert_eq!(info.get("ro"), "0");
    assert_eq!(info.get("serial"), "CORO-SERIAL-7");
    assert_eq!(info.get("cache"), "write_back");
    assert_ne!(info.get("discard_max"), "0", "discard offered");
}

#[test]
fn readonly_export_refuses_writes() {
    let image = Image::new(32 * MIB);
    let mut daemon = Daemon::start(&image, &["--readonly"]);
    let run = daemon.boot(Guest::test("readonly"));
    run.expect_pass();
    assert_eq!(run.info().get("ro"), "1");
    daemon.assert_alive();
}

#[test]
fn four_queues_two_threads_verified_fio_on_every_queue() {
    let image = Image::new(64 * MIB);
    let mut daemon = Daemon::start(&image, &["--num-queues", "4", "--threads", "2"]);
    let mut guest = Guest::test("mq");
    guest.queues = 4;
    guest.smp = 4; // Linux uses min(vCPUs, queues) queues: 4 vCPUs put fio on all 4.
    guest.arg = Some("4");
    let run = daemon.boot(guest);
    run.expect_pass();
    assert_eq!(run.info().get("queues"), "4");
    daemon.assert_alive();
}

#[test]
fn discard_from_the_guest() {
    let image = Image::new(32 * MIB);
    let mut daemon = Daemon::start(&image, &[]);
    daemon.boot(Guest::test("discard")).expect_pass();
    daemon.assert_alive();
}

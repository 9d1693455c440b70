//! A hostile guest: every malformed request gets IOERR/UNSUPP (or, without a usable status
//! descriptor, a used element of length 0) and the daemon keeps serving verified I/O.
//! Each test breaks one thing, through a real vhost-user connection with hand-built rings.

use std::time::Duration;

use integration::frontend::*;
use integration::Daemon;

const Q: usize = 0;
const WAIT: Duration = Duration::from_secs(10);
const HDR: u64 = DATA_BASE - 4096;
const STATUS: u64 = DATA_BASE - 16;
const BUF: u64 = DATA_BASE;

fn setup() -> (Daemon, TestFrontend) {
    let server = Daemon::with_image(&[]);
    let fe = TestFrontend::connect(server.socket(), 1, 128).expect("connect");
    (server, fe)
}

/// Writes a request header at HDR and an unwritten-status marker (0xff) at STATUS.
fn put_header(fe: &TestFrontend, kind: u32, sector: u64) {
    fe.mem.write(HDR, &header(kind, 0, sector));
    fe.mem.write(STATUS, &[0xff]);
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
    Desc::new(addr, len, flags, next)
}

const N: u16 = VIRTQ_DESC_F_NEXT;
const W: u16 = VIRTQ_DESC_F_WRITE;

/// Submits a chain at slots 0.. and returns (used element, status byte).
fn submit(fe: &mut TestFrontend, descs: &[Desc]) -> (Option<Used>, u8) {
    fe.put_chain(Q, descs);
    fe.publish(Q, 0);
    let used = fe.wait_used(Q, WAIT);
    (used, fe.mem.read(STATUS, 1)[0])
}

/// The used element for the chain at head 0 when the device wrote `len` bytes into it.
fn used(len: u32) -> Option<Used> {
    Some(Used { id: 0, len })
}

/// Bytes of [`CANARY`] at BUF before a chain that must not be written through.
const CANARY_LEN: usize = 1024;
const CANARY: u8 = 0xee;

/// Fills the data buffers at BUF with [`CANARY`].
fn put_canaries(fe: &TestFrontend) {
    fe.mem.write(BUF, &[CANARY; CANARY_LEN]);
}

/// A chain the device cannot answer (no usable status byte): completed with a used
/// length of 0, nothing written to its data buffers, the status canary untouched.
fn assert_unanswered(server: &Daemon, fe: &TestFrontend, got: Option<Used>) {
    assert_eq!(
        got,
        used(0),
        "completed with nothing written; log: {}",
        server.log_text()
    );
    assert_eq!(
        fe.mem.read(BUF, CANARY_LEN),
        vec![CANARY; CANARY_LEN],
        "data buffers untouched (no status byte was guessed into them); log: {}",
        server.log_text()
    );
    assert_eq!(fe.mem.read(STATUS, 1)[0], 0xff, "status canary untouched");
}

/// After a hostile request: the same connection still does verified I/O.
fn still_serves(server: &mut Daemon, fe: &mut TestFrontend) {
    server.assert_alive();
    assert!(
        fe.verified_io(Q, 8, &pattern(42, 8192)),
        "verified I/O after the hostile request failed; log: {}",
        server.log_text()
    );
    server.assert_alive();
}

/// A refused request: status `want`, a used length of 1 (the status byte; no data was
/// transferred), and its data buffers (0xee canaries at BUF) untouched.
fn expect_status(descs: &[Desc], kind: u32, sector: u64, want: u8) {
    let (mut server, mut fe) = setup();
    put_header(&fe, kind, sector);
    put_canaries(&fe);
    let (got, status) = submit(&mut fe, descs);
    assert_eq!(status, want, "status byte; log: {}", server.log_text());
    assert_eq!(
        got,
        used(1),
        "only the status byte written; log: {}",
        server.log_text()
    );
    assert_eq!(
        fe.mem.read(BUF, CANARY_LEN),
        vec![CANARY; CANARY_LEN],
        "no data transferred for a refused request"
    );
    still_serves(&mut server, &mut fe);
}

fn read_chain(len: u32) -> Vec<Desc> {
    vec![d(HDR, 16, N, 1), d(BUF, len, W | N, 2), d(STATUS, 1, W, 0)]
}

#[test]
fn good_read_write_flush_and_split_header() {
    let (mut server, mut fe) = setup();
    still_serves(&mut server, &mut fe);
    assert_eq!(fe.run(Q, T_FLUSH, 0, &[]), S_OK);
    // A header split over two descriptors (8 + 8 bytes) is legal.
    put_header(&fe, T_IN, 8);
    let (used, status) = submit(
        &mut fe,
        &[
            d(HDR, 8, N, 1),
            d(HDR + 8, 8, N, 2),
            d(BUF, 4096, W | N, 3),
            d(STATUS, 1, W, 0),
        ],
    );
    assert_eq!(status, S_OK);
    assert_eq!(
        used.map(|u| u.len),
        Some(4097),
        "used length = data + status"
    );
    assert_eq!(fe.mem.read(BUF, 4096), pattern(42, 8192)[..4096].to_vec());
}

#[test]
fn data_address_outside_memory() {
    expect_status(
        &[
            d(HDR, 16, N, 1),
            d(MEM_SIZE as u64 + 4096, 4096, W | N, 2),
            d(STATUS, 1, W, 0),
        ],
        T_IN,
        0,
        S_IOERR,
    );
}

#[test]
fn data_address_wraps_u64() {
    expect_status(
        &[
            d(HDR, 16, N, 1),
            d(u64::MAX - 511, 4096, W | N, 2),
            d(STATUS, 1, W, 0),
        ],
        T_IN,
        0,
        S_IOERR,
    );
}

#[test]
fn header_shorter_than_16_bytes() {
    expect_status(&[d(HDR, 8, N, 1), d(STATUS, 1, W, 0)], T_IN, 0, S_IOERR);
}

#[test]
fn no_status_descriptor() {
    let (mut server, mut fe) = setup();
    put_header(&fe, T_OUT, 0);
    let (got, status) = submit(&mut fe, &[d(HDR, 16, N, 1), d(BUF, 4096, 0, 0)]);
    assert_eq!(got, used(0), "completed with nothing written");
    assert_eq!(status, 0xff);
    still_serves(&mut server, &mut fe);
}

#[test]
fn device_readable_status_descriptor() {
    let (mut server, mut fe) = setup();
    put_header(&fe, T_IN, 0);
    put_canaries(&fe);
    let (got, status) = submit(
        &mut fe,
        &[d(HDR, 16, N, 1), d(BUF, 512, W | N, 2), d(STATUS, 1, 0, 0)],
    );
    assert_eq!(got, used(0), "completed with nothing written");
    assert_eq!(
        fe.mem.read(BUF, CANARY_LEN),
        vec![CANARY; CANARY_LEN],
        "no data read into a request that cannot report its status"
    );
    assert_eq!(
        status, 0xff,
        "a read-only status descriptor must not be written"
    );
    still_serves(&mut server, &mut fe);
}

#[test]
fn read_into_device_readable_buffer() {
    expect_status(
        &[d(HDR, 16, N, 1), d(BUF, 512, N, 2), d(STATUS, 1, W, 0)],
        T_IN,
        0,
        S_IOERR,
    );
}

#[test]
fn write_from_device_writable_buffer() {
    expect_status(
        &[d(HDR, 16, N, 1), d(BUF, 512, W | N, 2), d(STATUS, 1, W, 0)],
        T_OUT,
        0,
        S_IOERR,
    );
}

#[test]
fn zero_length_data() {
    expect_status(&read_chain(0), T_IN, 0, S_IOERR);
}

#[test]
fn sector_beyond_capacity() {
    expect_status(
        &read_chain(512),
        T_IN,
        integration::TEST_IMAGE_SIZE / 512,
        S_IOERR,
    );
}

#[test]
fn sector_plus_length_crosses_capacity() {
    expect_status(
        &read_chain(4096),
        T_IN,
        integration::TEST_IMAGE_SIZE / 512 - 1,
        S_IOERR,
    );
}

#[test]
fn sector_times_512_overflows() {
    expect_status(&read_chain(512), T_IN, u64::MAX / 256, S_IOERR);
}

#[test]
fn length_not_multiple_of_sector() {
    expect_status(&read_chain(1000), T_IN, 0, S_IOERR);
}

#[test]
fn unknown_request_type() {
    expect_status(&read_chain(512), 0x7777, 0, S_UNSUPP);
}

#[test]
fn get_id_short_buffer_gets_what_fits() {
    let (mut server, mut fe) = setup();
    fe.mem.write(BUF, &[0u8; 20]);
    put_header(&fe, T_GET_ID, 0);
    let (got, status) = submit(
        &mut fe,
        &[d(HDR, 16, N, 1), d(BUF, 7, W | N, 2), d(STATUS, 1, W, 0)],
    );
    assert_eq!(status, S_OK);
    assert_eq!(got, used(8), "7 bytes of serial + the status byte");
    assert_eq!(
        fe.mem.read(BUF, 8),
        b"corodev\0".to_vec(),
        "7 bytes of the serial, nothing past the buffer"
    );
    still_serves(&mut server, &mut fe);
}

fn segments_case(kind: u32, segs: &[[u8; 16]], want: u8) {
    let (mut server, mut fe) = setup();
    let bytes = segments(segs);
    fe.mem.write(BUF, &bytes);
    put_header(&fe, kind, 0);
    let (got, status) = submit(
        &mut fe,
        &[
            d(HDR, 16, N, 1),
            d(BUF, bytes.len() as u32, N, 2),
            d(STATUS, 1, W, 0),
        ],
    );
    assert_eq!(status, want, "log: {}", server.log_text());
    assert_eq!(
        got,
        used(1),
        "segments are device-readable: only the status byte is written"
    );
    still_serves(&mut server, &mut fe);
}

#[test]
fn discard_zero_sectors() {
    segments_case(T_DISCARD, &[segment(0, 0, 0)], S_IOERR);
}

#[test]
fn discard_beyond_capacity() {
    segments_case(
        T_DISCARD,
        &[segment(integration::TEST_IMAGE_SIZE / 512 - 4, 8, 0)],
        S_IOERR,
    );
}

#[test]
fn write_zeroes_reserved_flags() {
    segments_case(T_WRITE_ZEROES, &[segment(0, 8, 0x80)], S_UNSUPP);
}

#[test]
fn write_zeroes_multiple_segments_zero_data() {
    let (mut server, mut fe) = setup();
    assert!(fe.verified_io(Q, 0, &pattern(7, 16384)));
    let segs = [segment(0, 8, 0), segment(16, 8, 1)];
    let bytes = segments(&segs);
    fe.mem.write(BUF, &bytes);
    put_header(&fe, T_WRITE_ZEROES, 0);
    let (got, status) = submit(
        &mut fe,
        &[d(HDR, 16, N, 1), d(BUF, 32, N, 2), d(STATUS, 1, W, 0)],
    );
    assert_eq!(status, S_OK, "log: {}", server.log_text());
    assert_eq!(got, used(1), "only the status byte written");
    let out = BUF + (8 << 20);
    assert_eq!(fe.run(Q, T_IN, 0, &[(out, 16384)]), S_OK);
    let got = fe.mem.read(out, 16384);
    let orig = pattern(7, 16384);
    assert!(got[..4096].iter().all(|&b| b == 0), "segment 1 zeroed");
    assert_eq!(got[4096..8192], orig[4096..8192], "gap untouched");
    assert!(got[8192..12288].iter().all(|&b| b == 0), "segment 2 zeroed");
    assert_eq!(got[12288..], orig[12288..], "tail untouched");
    still_serves(&mut server, &mut fe);
}

#[test]
fn descriptor_next_loop() {
    let (mut server, mut fe) = setup();
    put_header(&fe, T_IN, 0);
    put_canaries(&fe);
    // 0 -> 1 -> 2 -> 1 -> 2 ...: never reaches a status descriptor.
    let (got, _) = submit(
        &mut fe,
        &[
            d(HDR, 16, N, 1),
            d(BUF, 512, W | N, 2),
            d(BUF + 512, 512, W | N, 1),
        ],
    );
    assert_unanswered(&server, &fe, got);
    still_serves(&mut server, &mut fe);
}

#[test]
fn indirect_table_loops() {
    let (mut server, mut fe) = setup();
    put_header(&fe, T_IN, 0);
    let table = BUF + (2 << 20);
    put_canaries(&fe);
    let entries = [d(HDR, 16, N, 1), d(BUF, 512, W | N, 0)];
    for (i, e) in entries.iter().enumerate() {
        fe.mem.write(table + 16 * i as u64, &e.bytes());
    }
    let (got, _) = submit(&mut fe, &[d(table, 32, VIRTQ_DESC_F_INDIRECT, 0)]);
    assert_unanswered(&server, &fe, got);
    still_serves(&mut server, &mut fe);
}

#[test]
fn indirect_table_nested() {
    let (mut server, mut fe) = setup();
    put_header(&fe, T_IN, 0);
    let table = BUF + (2 << 20);
    put_canaries(&fe);
    fe.mem
        .write(table, &d(table, 16, VIRTQ_DESC_F_INDIRECT, 0).bytes());
    let (got, _) = submit(&mut fe, &[d(table, 16, VIRTQ_DESC_F_INDIRECT, 0)]);
    assert_unanswered(&server, &fe, got);
    still_serves(&mut server, &mut fe);
}

#[test]
fn indirect_table_bad_length() {
    let (mut server, mut fe) = setup();
    put_header(&fe, T_IN, 0);
    put_canaries(&fe);
    let (got, _) = submit(&mut fe, &[d(BUF + (2 << 20), 20, VIRTQ_DESC_F_INDIRECT, 0)]);
    assert_unanswered(&server, &fe, got);
    still_serves(&mut server, &mut fe);
}

#[test]
fn indirect_table_outside_memory() {
    let (mut server, mut fe) = setup();
    put_header(&fe, T_IN, 0);
    put_canaries(&fe);
    let (got, _) = submit(
        &mut fe,
        &[d(MEM_SIZE as u64 - 16, 64, VIRTQ_DESC_F_INDIRECT, 0)],
    );
    assert_unanswered(&server, &fe, got);
    still_serves(&mut server, &mut fe);
}

#[test]
fn good_indirect_request() {
    let (mut server, mut fe) = setup();
    assert!(fe.verified_io(Q, 0, &pattern(3, 4096)));
    put_header(&fe, T_IN, 0);
    let table = BUF + (2 << 20);
    let out = BUF + (3 << 20);
    let entries = [d(HDR, 16, N, 1), d(out, 4096, W | N, 2), d(STATUS, 1, W, 0)];
    for (i, e) in entries.iter().enumerate() {
        fe.mem.write(table + 16 * i as u64, &e.bytes());
    }
    let (got, status) = submit(&mut fe, &[d(table, 48, VIRTQ_DESC_F_INDIRECT, 0)]);
    assert_eq!(status, S_OK);
    assert_eq!(got, used(4097), "data + status byte");
    assert_eq!(fe.mem.read(out, 4096), pattern(3, 4096));
    still_serves(&mut server, &mut fe);
}

#[test]
fn avail_index_jumps_past_queue_size_then_new_connection_works() {
    let (mut server, mut fe) = setup();
    fe.publish_raw_idx(Q, 1000);
    std::thread::sleep(Duration::from_millis(300));
    server.assert_alive();
    server.assert_idle();
    drop(fe);
    let mut fe2 = TestFrontend::connect(server.socket(), 1, 128).expect("reconnect");
    still_serves(&mut server, &mut fe2);
}

#[test]
fn write_on_readonly_export_fails() {
    let mut server = Daemon::with_image(&["--readonly"]);
    let mut fe = TestFrontend::connect(server.socket(), 1, 128).expect("connect");
    fe.mem.write(BUF, &pattern(1, 4096));
    assert_eq!(fe.run(Q, T_OUT, 0, &[(BUF, 4096)]), S_IOERR);
    assert_eq!(fe.wait_used(Q, Duration::ZERO), None, "one used element");
    let back = BUF + (4 << 20);
    fe.mem.write(back, &[0xee; 4096]);
    assert_eq!(fe.run(Q, T_IN, 0, &[(back, 4096)]), S_OK);
    assert_eq!(
        fe.mem.read(back, 4096),
        vec![0u8; 4096],
        "the refused write left the (fresh, zeroed) image unchanged"
    );
    server.assert_alive();
}

//! Request parsing over real guest memory and hand-built descriptor tables: each hostile
//! test breaks one rule and asserts the exact error variant; each legal variant asserts the
//! exact parsed request.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use corodev_devices::backend::NullBackend;
use corodev_devices::config::{DeviceConfig, DeviceParams, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use corodev_devices::memory::GuestMap;
use corodev_devices::request::{
    Error, Op, Rejected, Request, RequestType, Segment, Used, S_IOERR, S_OK, S_UNSUPP,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::{DescriptorTable, MockSplitQueue};
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const HDR: u64 = 0x2000;
const STATUS: u64 = 0x3000;
const DATA: u64 = 0x4000;
const TABLE: u64 = 0x8000;
/// Two 64 KiB regions, [0, 64K) and [64K, 128K), so a buffer can straddle them.
const REGION: u64 = 0x1_0000;
/// The mock queue's size (and the device's maximum).
const QSIZE: u16 = 16;
/// Device capacity: 1 MiB = 2048 sectors.
const CAPACITY: u64 = 2048;

fn mem() -> Arc<GuestMemoryMmap> {
    Arc::new(
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), REGION as usize),
            (GuestAddress(REGION), REGION as usize),
        ])
        .expect("guest memory"),
    )
}

fn config_with(readonly: bool, block_size: u32) -> DeviceConfig {
    let disk = NullBackend::new(CAPACITY * 512, Duration::ZERO);
    DeviceConfig::build(DeviceParams {
        queue_size: QSIZE,
        block_size,
        readonly,
        serial: b"serial-number".to_vec(),
        ..DeviceParams::for_backend(&disk)
    })
    .expect("valid device")
}

fn config() -> DeviceConfig {
    config_with(false, 512)
}

fn header_at(m: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    // ioprio is ignored by the device; a non-zero value checks that.
    let h = header(kind, 0xdead_beef, sector);
    m.write_slice(&h, GuestAddress(at)).expect("write header");
}

type Parsed = Result<Request, Box<Rejected>>;

/// Parses the chain `descs` (NEXT flags and indices filled in by the mock) with the header
/// already written into `m`.
fn parse_in(m: &Arc<GuestMemoryMmap>, cfg: &DeviceConfig, descs: &[RawDescriptor]) -> Parsed {
    let vq = MockSplitQueue::new(&**m, QSIZE);
    let chain = vq.build_desc_chain(descs).expect("build chain");
    Request::parse(chain, GuestMap::new(m.clone()), cfg)
}

fn parse_with(cfg: &DeviceConfig, kind: u32, sector: u64, descs: &[RawDescriptor]) -> Parsed {
    let m = mem();
    header_at(&m, HDR, kind, sector);
    parse_in(&m, cfg, descs)
}

fn parse(kind: u32, sector: u64, descs: &[RawDescriptor]) -> Parsed {
    parse_with(&config(), kind, sector, descs)
}

/// The error of a parse that must fail.
fn err(p: Parsed) -> Error {
    match p {
        Ok(r) => panic!("expected an error, parsed {:?}", r.op()),
        Err(r) => r.error().clone(),
    }
}

/// A parse that must succeed.
fn ok(p: Parsed) -> Request {
    match p {
        Ok(r) => r,
        Err(r) => panic!("expected a request, got {}", r.error()),
    }
}

fn read_req(len: u32) -> Vec<RawDescriptor> {
    vec![desc(HDR, 16, 0), desc(DATA, len, W), desc(STATUS, 1, W)]
}

fn write_req(len: u32) -> Vec<RawDescriptor> {
    vec![desc(HDR, 16, 0), desc(DATA, len, 0), desc(STATUS, 1, W)]
}

/// Runs a hand-written descriptor table: `entries` stored at their indices, `head` put on
/// the available ring, the chain taken from a real `Queue`.
fn parse_table(
    m: &Arc<GuestMemoryMmap>,
    cfg: &DeviceConfig,
    entries: &[(u16, RawDescriptor)],
    head: u16,
) -> Parsed {
    let vq = MockSplitQueue::new(&**m, QSIZE);
    for &(i, d) in entries {
        vq.desc_table().store(i, d).expect("store descriptor");
    }
    vq.avail().ring().ref_at(0).expect("ring").store(head);
    vq.avail().idx().store(1);
    let mut q: Queue = vq.create_queue().expect("queue");
    let chain = q.iter(&**m).expect("iter").next().expect("one chain");
    Request::parse(chain, GuestMap::new(m.clone()), cfg)
}

/// An indirect table of `descs` at TABLE (explicit flags and next fields), referenced by
/// descriptor 0 of the queue.
fn parse_indirect(
    cfg: &DeviceConfig,
    kind: u32,
    descs: &[RawDescriptor],
    table_len: u32,
) -> Parsed {
    let m = mem();
    header_at(&m, HDR, kind, 0);
    let table = DescriptorTable::new(&*m, GuestAddress(TABLE), descs.len() as u16);
    for (i, d) in descs.iter().enumerate() {
        table
            .store(i as u16, *d)
            .expect("store indirect descriptor");
    }
    parse_table(&m, cfg, &[(0, desc(TABLE, table_len, INDIRECT))], 0)
}

fn parse_segments_with(cfg: &DeviceConfig, kind: u32, segs: &[[u8; 16]]) -> Parsed {
    let m = mem();
    header_at(&m, HDR, kind, 0);
    let bytes = segments(segs);
    m.write_slice(&bytes, GuestAddress(DATA)).expect("segments");
    parse_in(
        &m,
        cfg,
        &[
            desc(HDR, 16, 0),
            desc(DATA, bytes.len() as u32, 0),
            desc(STATUS, 1, W),
        ],
    )
}

fn parse_segments(kind: u32, segs: &[[u8; 16]]) -> Parsed {
    parse_segments_with(&config(), kind, segs)
}

// ---------------------------------------------------------------- legal requests

#[test]
fn good_read() {
    let r = ok(parse(T_IN, 8, &read_req(4096)));
    assert_eq!(r.op(), &Op::Read { offset: 4096 });
    assert_eq!(r.request_type(), RequestType::In);
    assert_eq!(r.sector(), 8);
    assert_eq!(r.data_len(), 4096);
    assert_eq!(r.iovecs().len(), 1);
    assert_eq!(r.iovecs()[0].iov_len, 4096);
    assert_eq!(r.status_addr(), Some(GuestAddress(STATUS)));
    assert_eq!(r.head(), 0);
}

#[test]
fn good_write() {
    let r = ok(parse(T_OUT, 2, &write_req(1024)));
    assert_eq!(r.op(), &Op::Write { offset: 1024 });
    assert_eq!(r.data_len(), 1024);
}

#[test]
fn read_of_the_last_sector() {
    let r = ok(parse(T_IN, CAPACITY - 1, &read_req(512)));
    assert_eq!(
        r.op(),
        &Op::Read {
            offset: (CAPACITY - 1) * 512
        }
    );
}

#[test]
fn iovecs_point_into_guest_memory() {
    let m = mem();
    header_at(&m, HDR, T_OUT, 0);
    m.write_slice(&[0x5a; 512], GuestAddress(DATA))
        .expect("data");
    let r = ok(parse_in(&m, &config(), &write_req(512)));
    let mut got = [0u8; 512];
    assert_eq!(r.buffers().copy_to(&mut got), 512);
    assert_eq!(
        got, [0x5a; 512],
        "zero copy: the iovec is the guest's buffer"
    );
}

#[test]
fn header_split_over_two_descriptors() {
    let r = ok(parse(
        T_OUT,
        2,
        &[
            desc(HDR, 7, 0),
            desc(HDR + 7, 9, 0),
            desc(DATA, 512, 0),
            desc(STATUS, 1, W),
        ],
    ));
    assert_eq!(r.op(), &Op::Write { offset: 1024 });
}

#[test]
fn header_split_into_sixteen_descriptors() {
    let mut d: Vec<_> = (0..16).map(|i| desc(HDR + i, 1, 0)).collect();
    d.push(desc(STATUS, 1, W));
    // Chain of 17 > queue of 16: use a bigger device queue for this one.
    let disk = NullBackend::new(CAPACITY * 512, Duration::ZERO);
    let cfg = DeviceConfig::build(DeviceParams {
        queue_size: 32,
        ..DeviceParams::for_backend(&disk)
    })
    .expect("valid");
    let m = mem();
    header_at(&m, HDR, T_FLUSH, 0);
    let vq = MockSplitQueue::new(&*m, 32);
    let chain = vq.build_desc_chain(&d).expect("chain");
    let r = Request::parse(chain, GuestMap::new(m.clone()), &cfg)
        .map_err(|r| r.error().clone())
        .expect("valid");
    assert_eq!(r.op(), &Op::Flush);
}

#[test]
fn header_straddling_memory_regions() {
    let m = mem();
    let at = REGION - 5;
    header_at(&m, at, T_IN, 16);
    let r = ok(parse_in(
        &m,
        &config(),
        &[desc(at, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
    ));
    assert_eq!(r.op(), &Op::Read { offset: 16 * 512 });
}

#[test]
fn header_and_write_data_in_one_descriptor() {
    let r = ok(parse(
        T_OUT,
        0,
        &[desc(HDR, 16 + 512, 0), desc(STATUS, 1, W)],
    ));
    assert_eq!(r.iovecs().len(), 1);
    assert_eq!(r.iovecs()[0].iov_len, 512);
    assert_eq!(r.data_len(), 512);
}

#[test]
fn data_over_several_descriptors() {
    let r = ok(parse(
        T_IN,
        0,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, W),
            desc(DATA + 0x1000, 1024, W),
            desc(DATA + 0x2000, 512, W),
            desc(STATUS, 1, W),
        ],
    ));
    assert_eq!(r.iovecs().len(), 3);
    assert_eq!(r.data_len(), 2048);
}

#[test]
fn buffer_straddling_regions_becomes_two_iovecs() {
    let r = ok(parse(
        T_IN,
        0,
        &[
            desc(HDR, 16, 0),
            desc(REGION - 512, 1024, W),
            desc(STATUS, 1, W),
        ],
    ));
    assert_eq!(r.iovecs().len(), 2, "one iovec per memory region");
    assert_eq!(r.iovecs()[0].iov_len, 512);
    assert_eq!(r.iovecs()[1].iov_len, 512);
    assert_eq!(r.data_len(), 1024);
}

#[test]
fn status_shares_a_descriptor_with_read_data() {
    let r = ok(parse(T_IN, 0, &[desc(HDR, 16, 0), desc(DATA, 513, W)]));
    assert_eq!(r.data_len(), 512, "the final byte is the status");
    assert_eq!(r.status_addr(), Some(GuestAddress(DATA + 512)));
}

#[test]
fn long_status_descriptor_on_a_write() {
    let r = ok(parse(
        T_OUT,
        0,
        &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 8, W)],
    ));
    assert_eq!(
        r.status_addr(),
        Some(GuestAddress(STATUS + 7)),
        "its last byte"
    );
}

#[test]
fn long_status_descriptor_on_a_read_is_data_as_in_qemu() {
    // The writable stream is 512 + 8 bytes; all but the final one are read data.
    assert_eq!(
        err(parse(
            T_IN,
            0,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 8, W)]
        )),
        Error::Misaligned {
            sector: 0,
            len: 519,
            block_size: 512
        }
    );
}

#[test]
fn empty_data_descriptor_is_skipped() {
    let r = ok(parse(
        T_OUT,
        0,
        &[
            desc(HDR, 16, 0),
            desc(0xdead_0000_0000, 0, 0),
            desc(DATA, 512, 0),
            desc(STATUS, 1, W),
        ],
    ));
    assert_eq!(r.iovecs().len(), 1);
}

#[test]
fn flush() {
    let r = ok(parse(T_FLUSH, 0, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]));
    assert_eq!(r.op(), &Op::Flush);
    assert_eq!(r.data_len(), 0);
}

#[test]
fn flush_ignores_sector_as_qemu_does() {
    let r = ok(parse(
        T_FLUSH,
        u64::MAX,
        &[desc(HDR, 16, 0), desc(STATUS, 1, W)],
    ));
    assert_eq!(r.op(), &Op::Flush);
}

#[test]
fn get_id_with_a_20_byte_buffer() {
    let r = ok(parse(
        T_GET_ID,
        0,
        &[desc(HDR, 16, 0), desc(DATA, 20, W), desc(STATUS, 1, W)],
    ));
    let mut id = [0u8; 20];
    id[..13].copy_from_slice(b"serial-number");
    assert_eq!(r.op(), &Op::GetId(id));
    assert_eq!(r.data_len(), 20);
}

#[test]
fn get_id_short_buffer_is_fine() {
    let r = ok(parse(
        T_GET_ID,
        0,
        &[desc(HDR, 16, 0), desc(DATA, 5, W), desc(STATUS, 1, W)],
    ));
    assert_eq!(r.request_type(), RequestType::GetId);
    assert_eq!(r.data_len(), 5);
}

#[test]
fn get_id_without_a_buffer_is_fine() {
    let r = ok(parse(T_GET_ID, 0, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]));
    assert_eq!(r.data_len(), 0);
}

/// A legal read of `len` bytes at `sector` on `cfg`, start to finish: the parsed request
/// reads exactly `len` bytes at `sector * 512` into the guest's own buffer (0xa5 there is
/// seen through it, and what the backend copies in lands there), parsing leaves the 0xff
/// status canary alone, and completing it with every byte read writes S_OK and claims the
/// data plus the status byte.
fn assert_read_completes(cfg: &DeviceConfig, sector: u64, len: u32) {
    let m = mem();
    header_at(&m, HDR, T_IN, sector);
    m.write_slice(&vec![0xa5; len as usize], GuestAddress(DATA))
        .expect("data");
    m.write_obj(0xffu8, GuestAddress(STATUS)).expect("canary");
    let r = ok(parse_in(&m, cfg, &read_req(len)));
    assert_eq!(
        r.op(),
        &Op::Read {
            offset: sector * 512
        }
    );
    assert_eq!(r.request_type(), RequestType::In);
    assert_eq!(r.data_len(), u64::from(len));
    assert_eq!(r.status_addr(), Some(GuestAddress(STATUS)));
    let mut seen = vec![0u8; len as usize];
    assert_eq!(r.buffers().copy_to(&mut seen), len as usize);
    assert_eq!(
        seen,
        vec![0xa5; len as usize],
        "the iovec is the guest's buffer"
    );
    assert_eq!(
        r.buffers().copy_from(&vec![0x3c; len as usize]),
        len as usize
    );
    let mut landed = vec![0u8; len as usize];
    m.read_slice(&mut landed, GuestAddress(DATA)).expect("data");
    assert_eq!(
        landed,
        vec![0x3c; len as usize],
        "read data lands in guest memory"
    );
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(STATUS)).expect("status"),
        0xff,
        "parsing writes no status byte"
    );
    let used = r.complete(S_OK, u64::from(len), None);
    assert_eq!(
        used,
        Used {
            head: 0,
            len: len + 1
        },
        "data + status byte"
    );
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(STATUS)).expect("status"),
        S_OK
    );
}

#[test]
fn aligned_read_on_4k_device() {
    assert_read_completes(&config_with(false, 4096), 8, 4096);
}

#[test]
fn read_on_readonly_device() {
    assert_read_completes(&config_with(true, 512), 0, 512);
}

#[test]
fn good_indirect_request() {
    let r = ok(parse_indirect(
        &config(),
        T_IN,
        &[
            desc_next(HDR, 16, NEXT, 1),
            desc_next(DATA, 4096, W | NEXT, 2),
            desc(STATUS, 1, W),
        ],
        3 * 16,
    ));
    assert_eq!(r.op(), &Op::Read { offset: 0 });
    assert_eq!(r.data_len(), 4096);
}

#[test]
fn multi_segment_discard() {
    let r = ok(parse_segments(T_DISCARD, &[seg(0, 8, 0), seg(100, 4, 0)]));
    assert_eq!(
        r.op(),
        &Op::Discard(vec![
            Segment {
                offset: 0,
                len: 4096,
                unmap: false
            },
            Segment {
                offset: 100 * 512,
                len: 2048,
                unmap: false
            },
        ])
    );
}

#[test]
fn multi_segment_write_zeroes_with_unmap() {
    let r = ok(parse_segments(
        T_WRITE_ZEROES,
        &[seg(0, 8, 0), seg(100, 4, 1)],
    ));
    assert_eq!(
        r.op(),
        &Op::WriteZeroes(vec![
            Segment {
                offset: 0,
                len: 4096,
                unmap: false
            },
            Segment {
                offset: 100 * 512,
                len: 2048,
                unmap: true
            },
        ])
    );
}

#[test]
fn max_segments_of_max_sectors() {
    let disk = NullBackend::new(1 << 40, Duration::ZERO);
    let cfg = DeviceConfig::build(DeviceParams {
        queue_size: QSIZE,
        ..DeviceParams::for_backend(&disk)
    })
    .expect("valid");
    let segs: Vec<_> = (0..u64::from(MAX_DISCARD_SEG))
        .map(|i| seg(i * u64::from(MAX_DISCARD_SECTORS), MAX_DISCARD_SECTORS, 0))
        .collect();
    let r = ok(parse_segments_with(&cfg, T_DISCARD, &segs));
    match r.op() {
        Op::Discard(s) => assert_eq!(s.len(), MAX_DISCARD_SEG as usize),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn segment_split_over_two_descriptors() {
    let m = mem();
    header_at(&m, HDR, T_DISCARD, 0);
    m.write_slice(&seg(64, 8, 0), GuestAddress(DATA))
        .expect("segment");
    let r = ok(parse_in(
        &m,
        &config(),
        &[
            desc(HDR, 16, 0),
            desc(DATA, 5, 0),
            desc(DATA + 5, 11, 0),
            desc(STATUS, 1, W),
        ],
    ));
    assert_eq!(
        r.op(),
        &Op::Discard(vec![Segment {
            offset: 64 * 512,
            len: 4096,
            unmap: false
        }])
    );
}

#[test]
fn the_request_keeps_guest_memory_alive() {
    let m = mem();
    header_at(&m, HDR, T_IN, 0);
    let r = ok(parse_in(&m, &config(), &read_req(512)));
    let before = Arc::strong_count(&m);
    drop(r);
    assert_eq!(
        Arc::strong_count(&m),
        before - 1,
        "the request held one reference"
    );
}

// ---------------------------------------------------------------- chain shape

#[test]
fn head_index_beyond_the_queue() {
    let m = mem();
    let rejected = parse_table(&m, &config(), &[], QSIZE + 3)
        .err()
        .expect("rejected");
    assert_eq!(rejected.error(), &Error::EmptyChain { head: QSIZE + 3 });
    assert_eq!(rejected.status_addr(), None);
    assert_eq!(
        rejected.complete(None),
        Used {
            head: QSIZE + 3,
            len: 0
        },
        "used length 0"
    );
}

#[test]
fn looping_chain() {
    let m = mem();
    header_at(&m, HDR, T_IN, 0);
    // 0 -> 1 -> 0 -> ...: virtio-queue stops after queue-size descriptors.
    let e = err(parse_table(
        &m,
        &config(),
        &[
            (0, desc_next(HDR, 16, NEXT, 1)),
            (1, desc_next(DATA, 512, NEXT | W, 0)),
        ],
        0,
    ));
    assert_eq!(
        e,
        Error::ChainTruncated {
            descriptors: QSIZE as usize
        }
    );
}

#[test]
fn next_index_beyond_the_queue() {
    let m = mem();
    header_at(&m, HDR, T_IN, 0);
    let e = err(parse_table(
        &m,
        &config(),
        &[(0, desc_next(HDR, 16, NEXT, QSIZE))],
        0,
    ));
    assert_eq!(e, Error::ChainTruncated { descriptors: 1 });
}

#[test]
fn chain_over_4_gib() {
    // virtio-queue stops a chain whose lengths overflow u32.
    let e = err(parse(
        T_IN,
        0,
        &[
            desc(HDR, 16, 0),
            desc(DATA, u32::MAX - 16, W),
            desc(DATA, 1, W),
            desc(STATUS, 1, W),
        ],
    ));
    assert_eq!(e, Error::ChainTruncated { descriptors: 2 });
}

#[test]
fn indirect_table_loop() {
    let e = err(parse_indirect(
        &config(),
        T_IN,
        &[
            desc_next(HDR, 16, NEXT, 1),
            desc_next(DATA, 512, W | NEXT, 0),
        ],
        2 * 16,
    ));
    assert_eq!(e, Error::ChainTruncated { descriptors: 2 });
}

#[test]
fn nested_indirect_table() {
    let e = err(parse_indirect(
        &config(),
        T_IN,
        &[desc_next(HDR, 16, NEXT, 1), desc(TABLE, 32, INDIRECT)],
        2 * 16,
    ));
    assert_eq!(e, Error::ChainTruncated { descriptors: 1 });
}

#[test]
fn indirect_table_length_not_a_multiple_of_16() {
    let e = err(parse_indirect(
        &config(),
        T_IN,
        &[desc_next(HDR, 16, NEXT, 1), desc(STATUS, 1, W)],
        2 * 16 + 1,
    ));
    assert_eq!(e, Error::EmptyChain { head: 0 });
}

#[test]
fn indirect_table_outside_memory() {
    let m = mem();
    let e = err(parse_table(
        &m,
        &config(),
        &[(0, desc(4 * REGION, 64, INDIRECT))],
        0,
    ));
    assert_eq!(e, Error::EmptyChain { head: 0 });
}

#[test]
fn indirect_chain_longer_than_the_queue() {
    let n = QSIZE as usize + 4;
    let mut d: Vec<_> = (0..n - 1)
        .map(|i| desc_next(HDR + i as u64, 1, NEXT, i as u16 + 1))
        .collect();
    d.push(desc(STATUS, 1, W));
    let e = err(parse_indirect(&config(), T_FLUSH, &d, n as u32 * 16));
    assert_eq!(
        e,
        Error::ChainTooLong {
            descriptors: n,
            max: QSIZE
        }
    );
}

#[test]
fn only_readable_descriptors() {
    let rejected = parse(T_IN, 0, &[desc(HDR, 16, 0), desc(STATUS, 1, 0)])
        .err()
        .expect("rejected");
    assert_eq!(
        rejected.error(),
        &Error::StatusNotWritable {
            addr: STATUS,
            len: 1
        }
    );
    assert_eq!(
        rejected.complete(None),
        Used { head: 0, len: 0 },
        "no status byte: used length 0"
    );
}

#[test]
fn device_readable_status_descriptor() {
    assert_eq!(
        err(parse(
            T_IN,
            0,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, 0)]
        )),
        Error::StatusNotWritable {
            addr: STATUS,
            len: 1
        }
    );
}

#[test]
fn empty_status_descriptor() {
    assert_eq!(
        err(parse(
            T_IN,
            0,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 0, W)]
        )),
        Error::StatusEmpty { addr: STATUS }
    );
}

#[test]
fn status_outside_memory() {
    assert_eq!(
        err(parse(
            T_IN,
            0,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(8 * REGION, 1, W)]
        )),
        Error::StatusOutsideMemory {
            addr: 8 * REGION,
            len: 1
        }
    );
}

#[test]
fn status_address_wraps() {
    let addr = u64::MAX - 1;
    assert_eq!(
        err(parse(
            T_IN,
            0,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(addr, 4, W)]
        )),
        Error::StatusOutsideMemory { addr, len: 4 }
    );
}

#[test]
fn readable_after_writable() {
    let rejected = parse(
        T_OUT,
        0,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, W),
            desc(DATA, 512, 0),
            desc(STATUS, 1, W),
        ],
    )
    .err()
    .expect("rejected");
    assert_eq!(
        rejected.error(),
        &Error::ReadableAfterWritable { position: 2 }
    );
    assert_eq!(rejected.status_addr(), Some(GuestAddress(STATUS)));
}

// ---------------------------------------------------------------- header and buffers

/// A refusal keeps the header's type when the header was read before the broken rule
/// (for the caller's per-type counts), and has none when it was not.
#[test]
fn a_refusal_keeps_the_type_its_header_gave() {
    let kind = |p: Parsed| match p {
        Ok(r) => panic!("expected a refusal, parsed {:?}", r.op()),
        Err(r) => r.kind(),
    };
    assert_eq!(
        kind(parse(T_IN, CAPACITY, &read_req(512))),
        Some(RequestType::In),
        "a read past the end is still a read"
    );
    assert_eq!(
        kind(parse(T_OUT, 0, &read_req(512))),
        Some(RequestType::Out),
        "a write with its data in the wrong direction"
    );
    assert_eq!(
        kind(parse(99, 0, &[desc(HDR, 16, 0), desc(STATUS, 1, W)])),
        Some(RequestType::Unsupported(99))
    );
    assert_eq!(
        kind(parse(T_IN, 0, &[desc(HDR, 8, 0), desc(STATUS, 1, W)])),
        None,
        "header too short: no type was read"
    );
    assert_eq!(
        kind(parse(T_IN, 0, &[desc(HDR, 16, 0), desc(STATUS, 1, 0)])),
        None,
        "no status byte: refused before the header"
    );
}

#[test]
fn header_too_short() {
    assert_eq!(
        err(parse(T_IN, 0, &[desc(HDR, 8, 0), desc(STATUS, 1, W)])),
        Error::HeaderTooShort { len: 8 }
    );
}

#[test]
fn header_too_short_over_two_descriptors() {
    assert_eq!(
        err(parse(
            T_IN,
            0,
            &[desc(HDR, 7, 0), desc(HDR + 7, 8, 0), desc(STATUS, 1, W)]
        )),
        Error::HeaderTooShort { len: 15 }
    );
}

#[test]
fn no_readable_descriptor_at_all() {
    assert_eq!(
        err(parse(T_IN, 0, &[desc(DATA, 512, W), desc(STATUS, 1, W)])),
        Error::HeaderTooShort { len: 0 }
    );
}

#[test]
fn header_outside_memory() {
    assert_eq!(
        err(parse(
            T_IN,
            0,
            &[desc(4 * REGION, 16, 0), desc(STATUS, 1, W)]
        )),
        Error::GuestMemory {
            addr: 4 * REGION,
            len: 16
        }
    );
}

#[test]
fn data_outside_memory() {
    assert_eq!(
        err(parse(
            T_IN,
            0,
            &[
                desc(HDR, 16, 0),
                desc(2 * REGION, 512, W),
                desc(STATUS, 1, W)
            ]
        )),
        Error::GuestMemory {
            addr: 2 * REGION,
            len: 512
        }
    );
}

#[test]
fn data_running_off_the_end_of_memory() {
    let addr = 2 * REGION - 256;
    assert_eq!(
        err(parse(
            T_OUT,
            0,
            &[desc(HDR, 16, 0), desc(addr, 512, 0), desc(STATUS, 1, W)]
        )),
        Error::GuestMemory { addr, len: 512 }
    );
}

#[test]
fn data_address_wraps() {
    let addr = u64::MAX - 255;
    assert_eq!(
        err(parse(
            T_IN,
            0,
            &[desc(HDR, 16, 0), desc(addr, 512, W), desc(STATUS, 1, W)]
        )),
        Error::GuestMemory { addr, len: 512 }
    );
}

#[test]
fn read_with_device_readable_data() {
    assert_eq!(
        err(parse(
            T_IN,
            0,
            &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)]
        )),
        Error::DataDirection {
            kind: RequestType::In
        }
    );
}

#[test]
fn write_with_device_writable_data() {
    assert_eq!(
        err(parse(
            T_OUT,
            0,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)]
        )),
        Error::DataDirection {
            kind: RequestType::Out
        }
    );
}

#[test]
fn get_id_with_device_readable_data() {
    assert_eq!(
        err(parse(
            T_GET_ID,
            0,
            &[desc(HDR, 16, 0), desc(DATA, 20, 0), desc(STATUS, 1, W)]
        )),
        Error::DataDirection {
            kind: RequestType::GetId
        }
    );
}

#[test]
fn discard_with_device_writable_data() {
    assert_eq!(
        err(parse(
            T_DISCARD,
            0,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 16, 0),
                desc(DATA + 0x100, 16, W),
                desc(STATUS, 1, W)
            ]
        )),
        Error::DataDirection {
            kind: RequestType::Discard
        }
    );
}

#[test]
fn read_without_data() {
    assert_eq!(
        err(parse(T_IN, 0, &[desc(HDR, 16, 0), desc(STATUS, 1, W)])),
        Error::NoData {
            kind: RequestType::In
        }
    );
}

#[test]
fn read_with_zero_length_data() {
    assert_eq!(
        err(parse(T_IN, 0, &read_req(0))),
        Error::NoData {
            kind: RequestType::In
        }
    );
}

#[test]
fn write_without_data() {
    assert_eq!(
        err(parse(T_OUT, 0, &[desc(HDR, 16, 0), desc(STATUS, 1, W)])),
        Error::NoData {
            kind: RequestType::Out
        }
    );
}

// ---------------------------------------------------------------- sectors

#[test]
fn length_not_a_multiple_of_512() {
    assert_eq!(
        err(parse(T_IN, 0, &read_req(1000))),
        Error::Misaligned {
            sector: 0,
            len: 1000,
            block_size: 512
        }
    );
}

#[test]
fn length_not_a_multiple_of_4k_blocks() {
    assert_eq!(
        err(parse_with(
            &config_with(false, 4096),
            T_IN,
            0,
            &read_req(512)
        )),
        Error::Misaligned {
            sector: 0,
            len: 512,
            block_size: 4096
        }
    );
}

#[test]
fn sector_not_aligned_to_4k_blocks() {
    assert_eq!(
        err(parse_with(
            &config_with(false, 4096),
            T_IN,
            1,
            &read_req(4096)
        )),
        Error::Misaligned {
            sector: 1,
            len: 4096,
            block_size: 4096
        }
    );
}

#[test]
fn sector_beyond_capacity() {
    assert_eq!(
        err(parse(T_IN, CAPACITY, &read_req(512))),
        Error::OutOfRange {
            sector: CAPACITY,
            len: 512,
            capacity: CAPACITY
        }
    );
}

#[test]
fn a_resized_device_checks_the_new_capacity() {
    let cfg = config();
    cfg.set_size(2 * CAPACITY * 512).expect("whole blocks");
    let r = ok(parse_with(&cfg, T_OUT, CAPACITY, &write_req(512)));
    assert_eq!(
        r.op(),
        &Op::Write {
            offset: CAPACITY * 512
        },
        "past the old end"
    );
    assert_eq!(
        err(parse_with(&cfg, T_IN, 2 * CAPACITY, &read_req(512))),
        Error::OutOfRange {
            sector: 2 * CAPACITY,
            len: 512,
            capacity: 2 * CAPACITY
        },
        "past the new end"
    );
}

#[test]
fn sector_plus_length_crosses_capacity() {
    assert_eq!(
        err(parse(T_IN, CAPACITY - 1, &read_req(1024))),
        Error::OutOfRange {
            sector: CAPACITY - 1,
            len: 1024,
            capacity: CAPACITY
        }
    );
}

#[test]
fn sector_times_512_overflows() {
    let sector = u64::MAX / 256;
    assert_eq!(
        err(parse(T_IN, sector, &read_req(512))),
        Error::SectorOverflow { sector, len: 512 }
    );
}

#[test]
fn sector_offset_plus_length_overflows() {
    // sector * 512 = 2^64 - 512 fits; adding 1024 bytes does not.
    let sector = u64::MAX / 512;
    assert_eq!(
        err(parse(T_IN, sector, &read_req(1024))),
        Error::SectorOverflow { sector, len: 1024 }
    );
}

// ---------------------------------------------------------------- types

#[test]
fn write_on_readonly_device() {
    assert_eq!(
        err(parse_with(
            &config_with(true, 512),
            T_OUT,
            0,
            &write_req(512)
        )),
        Error::ReadOnly {
            kind: RequestType::Out
        }
    );
}

#[test]
fn discard_on_readonly_device() {
    assert_eq!(
        err(parse_segments_with(
            &config_with(true, 512),
            T_DISCARD,
            &[seg(0, 8, 0)]
        )),
        Error::ReadOnly {
            kind: RequestType::Discard
        }
    );
}

#[test]
fn write_zeroes_on_readonly_device() {
    let e = err(parse_segments_with(
        &config_with(true, 512),
        T_WRITE_ZEROES,
        &[seg(0, 8, 0)],
    ));
    assert_eq!(
        e,
        Error::ReadOnly {
            kind: RequestType::WriteZeroes
        }
    );
    assert_eq!(e.status(), S_IOERR);
}

#[test]
fn unknown_type_is_unsupp() {
    let e = err(parse(0x1234, 0, &read_req(512)));
    assert_eq!(e, Error::Unsupported(0x1234));
    assert_eq!(e.status(), S_UNSUPP);
}

#[test]
fn scsi_command_is_unsupp() {
    assert_eq!(err(parse(2, 0, &read_req(512))), Error::Unsupported(2));
}

#[test]
fn rejected_request_with_status_gets_it() {
    let m = mem();
    header_at(&m, HDR, 0x77, 0);
    m.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
    let rejected = parse_in(&m, &config(), &read_req(512))
        .err()
        .expect("rejected");
    assert_eq!(
        rejected.complete(None),
        Used { head: 0, len: 1 },
        "used length: the status byte"
    );
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(STATUS)).expect("status"),
        S_UNSUPP
    );
}

// ---------------------------------------------------------------- segments

#[test]
fn discard_without_segments() {
    assert_eq!(
        err(parse(T_DISCARD, 0, &[desc(HDR, 16, 0), desc(STATUS, 1, W)])),
        Error::NoData {
            kind: RequestType::Discard
        }
    );
}

#[test]
fn segment_payload_not_a_multiple_of_16() {
    let e = err(parse(
        T_DISCARD,
        0,
        &[desc(HDR, 16, 0), desc(DATA, 20, 0), desc(STATUS, 1, W)],
    ));
    assert_eq!(e, Error::SegmentLength { len: 20 });
    assert_eq!(e.status(), S_IOERR);
}

#[test]
fn segment_of_zero_sectors() {
    assert_eq!(
        err(parse_segments(T_DISCARD, &[seg(8, 0, 0)])),
        Error::SegmentEmpty { sector: 8 }
    );
}

#[test]
fn segment_beyond_capacity() {
    assert_eq!(
        err(parse_segments(T_DISCARD, &[seg(CAPACITY, 8, 0)])),
        Error::OutOfRange {
            sector: CAPACITY,
            len: 8 * 512,
            capacity: CAPACITY
        }
    );
}

#[test]
fn segment_crossing_capacity() {
    assert_eq!(
        err(parse_segments(T_WRITE_ZEROES, &[seg(CAPACITY - 8, 16, 0)])),
        Error::OutOfRange {
            sector: CAPACITY - 8,
            len: 16 * 512,
            capacity: CAPACITY
        }
    );
}

#[test]
fn segment_sector_overflows() {
    assert_eq!(
        err(parse_segments(T_DISCARD, &[seg(u64::MAX, 1, 0)])),
        Error::SectorOverflow {
            sector: u64::MAX,
            len: 512
        }
    );
}

#[test]
fn segment_larger_than_max_sectors() {
    assert_eq!(
        err(parse_segments(
            T_WRITE_ZEROES,
            &[seg(0, MAX_DISCARD_SECTORS + 1, 0)]
        )),
        Error::SegmentTooLarge {
            sector: 0,
            sectors: MAX_DISCARD_SECTORS + 1,
            max: MAX_DISCARD_SECTORS
        }
    );
}

#[test]
fn segment_misaligned_on_4k_device() {
    assert_eq!(
        err(parse_segments_with(
            &config_with(false, 4096),
            T_DISCARD,
            &[seg(4, 8, 0)]
        )),
        Error::Misaligned {
            sector: 4,
            len: 4096,
            block_size: 4096
        }
    );
}

#[test]
fn segment_reserved_flags() {
    let e = err(parse_segments(T_WRITE_ZEROES, &[seg(0, 8, 0x80)]));
    assert_eq!(
        e,
        Error::SegmentReservedFlags {
            sector: 0,
            flags: 0x80
        }
    );
    assert_eq!(e.status(), S_UNSUPP);
}

#[test]
fn unmap_flag_on_discard() {
    let e = err(parse_segments(T_DISCARD, &[seg(0, 8, 1)]));
    assert_eq!(e, Error::DiscardUnmap { sector: 0 });
    assert_eq!(e.status(), S_UNSUPP);
}

#[test]
fn bad_second_segment_fails_the_request() {
    assert_eq!(
        err(parse_segments(T_DISCARD, &[seg(0, 8, 0), seg(16, 0, 0)])),
        Error::SegmentEmpty { sector: 16 }
    );
}

#[test]
fn too_many_segments() {
    let segs: Vec<_> = (0..=u64::from(MAX_DISCARD_SEG))
        .map(|i| seg(i * 8, 8, 0))
        .collect();
    assert_eq!(
        err(parse_segments(T_DISCARD, &segs)),
        Error::TooManySegments {
            count: u64::from(MAX_DISCARD_SEG) + 1,
            max: MAX_DISCARD_SEG
        }
    );
}

#[test]
fn segments_outside_memory() {
    assert_eq!(
        err(parse(
            T_DISCARD,
            0,
            &[
                desc(HDR, 16, 0),
                desc(4 * REGION, 16, 0),
                desc(STATUS, 1, W)
            ]
        )),
        Error::GuestMemory {
            addr: 4 * REGION,
            len: 16
        }
    );
}

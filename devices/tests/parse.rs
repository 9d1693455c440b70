//! Request parsing over real guest memory and hand-built descriptor chains: each test
//! breaks one rule and asserts the exact error variant (or the exact parsed request).

use std::sync::Arc;
use std::time::Duration;

use corodev_devices::backend::NullBackend;
use corodev_devices::config::{DeviceConfig, MAX_DISCARD_SEG};
use corodev_devices::request::{Error, Op, Request, S_IOERR, S_UNSUPP};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const W: u16 = 2; // VIRTQ_DESC_F_WRITE
const HDR: u64 = 0x2000;
const STATUS: u64 = 0x3000;
const DATA: u64 = 0x4000;
/// Two 64 KiB regions: [0, 64K) and [64K, 128K), so a buffer can straddle them.
const REGION: u64 = 0x1_0000;

fn mem() -> Arc<GuestMemoryMmap> {
    Arc::new(
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), REGION as usize),
            (GuestAddress(REGION), REGION as usize),
        ])
        .expect("guest memory"),
    )
}

fn config(readonly: bool, block_size: u32) -> DeviceConfig {
    // 1 MiB device = 2048 sectors.
    let disk = NullBackend::new(1 << 20, Duration::ZERO);
    DeviceConfig::new(&disk, 1, 16, block_size, readonly, "serial")
}

fn header(m: &GuestMemoryMmap, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(HDR)).expect("write header");
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// Parses a chain built from `descs` (NEXT flags and indices filled in by the mock).
fn parse_with(
    cfg: &DeviceConfig,
    kind: u32,
    sector: u64,
    descs: &[RawDescriptor],
) -> Result<Request, Error> {
    let m = mem();
    header(&m, kind, sector);
    let vq = MockSplitQueue::new(&*m, 16);
    let chain = vq.build_desc_chain(descs).expect("build chain");
    Request::parse(chain, m.clone(), cfg).map_err(|r| r.error)
}

fn parse(kind: u32, sector: u64, descs: &[RawDescriptor]) -> Result<Request, Error> {
    parse_with(&config(false, 512), kind, sector, descs)
}

fn read_req(len: u32) -> Vec<RawDescriptor> {
    vec![desc(HDR, 16, 0), desc(DATA, len, W), desc(STATUS, 1, W)]
}

#[test]
fn good_read() {
    let r = parse(0, 8, &read_req(4096)).expect("valid");
    assert_eq!(r.op, Op::Read { offset: 4096 });
    assert_eq!(r.data.len(), 1);
    assert_eq!(r.data[0].iov_len, 4096);
}

#[test]
fn header_split_over_two_descriptors_is_legal() {
    let r = parse(
        1,
        2,
        &[
            desc(HDR, 7, 0),
            desc(HDR + 7, 9, 0),
            desc(DATA, 512, 0),
            desc(STATUS, 1, W),
        ],
    )
    .expect("valid");
    assert_eq!(r.op, Op::Write { offset: 1024 });
}

#[test]
fn header_and_data_in_one_descriptor() {
    // Write data directly after the 16 header bytes in the same buffer.
    let r = parse(1, 0, &[desc(HDR, 16 + 512, 0), desc(STATUS, 1, W)]).expect("valid");
    assert_eq!(r.data.len(), 1);
    assert_eq!(r.data[0].iov_len, 512);
}

#[test]
fn buffer_straddling_regions_becomes_two_iovecs() {
    let r = parse(
        0,
        0,
        &[
            desc(HDR, 16, 0),
            desc(REGION - 512, 1024, W),
            desc(STATUS, 1, W),
        ],
    )
    .expect("valid");
    assert_eq!(r.data.len(), 2, "one iovec per memory region");
    assert_eq!(r.data.iter().map(|v| v.iov_len).sum::<usize>(), 1024);
}

#[test]
fn status_shares_a_descriptor_with_read_data() {
    let r = parse(0, 0, &[desc(HDR, 16, 0), desc(DATA, 513, W)]).expect("valid");
    assert_eq!(r.data[0].iov_len, 512, "the last byte is the status");
}

#[test]
fn data_outside_memory() {
    assert_eq!(
        parse(
            0,
            0,
            &[
                desc(HDR, 16, 0),
                desc(2 * REGION, 512, W),
                desc(STATUS, 1, W)
            ]
        )
        .err(),
        Some(Error::GuestMemory {
            addr: 2 * REGION,
            len: 512
        })
    );
}

#[test]
fn data_address_wraps() {
    let addr = u64::MAX - 255;
    assert_eq!(
        parse(
            0,
            0,
            &[desc(HDR, 16, 0), desc(addr, 512, W), desc(STATUS, 1, W)]
        )
        .err(),
        Some(Error::GuestMemory { addr, len: 512 })
    );
}

#[test]
fn header_too_short() {
    assert_eq!(
        parse(0, 0, &[desc(HDR, 8, 0), desc(STATUS, 1, W)]).err(),
        Some(Error::HeaderTooShort { len: 8 })
    );
}

#[test]
fn header_outside_memory() {
    assert_eq!(
        parse(0, 0, &[desc(4 * REGION, 16, 0), desc(STATUS, 1, W)]).err(),
        Some(Error::GuestMemory {
            addr: 4 * REGION,
            len: 16
        })
    );
}

#[test]
fn readable_status_means_no_status() {
    assert_eq!(
        parse(
            0,
            0,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, 0)]
        )
        .err(),
        Some(Error::NoStatus)
    );
}

#[test]
fn status_outside_memory() {
    assert_eq!(
        parse(
            0,
            0,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(8 * REGION, 1, W)]
        )
        .err(),
        Some(Error::StatusOutsideMemory { addr: 8 * REGION })
    );
}

#[test]
fn readable_after_writable() {
    assert_eq!(
        parse(
            1,
            0,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 512, W),
                desc(DATA, 512, 0),
                desc(STATUS, 1, W)
            ]
        )
        .err(),
        Some(Error::ReadableAfterWritable)
    );
}

#[test]
fn read_with_readable_data() {
    assert_eq!(
        parse(
            0,
            0,
            &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)]
        )
        .err(),
        Some(Error::DataDirection { kind: "read" })
    );
}

#[test]
fn write_with_writable_data() {
    assert_eq!(
        parse(
            1,
            0,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)]
        )
        .err(),
        Some(Error::DataDirection { kind: "write" })
    );
}

#[test]
fn zero_length_data() {
    assert_eq!(
        parse(0, 0, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]).err(),
        Some(Error::ZeroLength)
    );
    assert_eq!(parse(0, 0, &read_req(0)).err(), Some(Error::ZeroLength));
}

#[test]
fn misaligned_length() {
    assert_eq!(
        parse(0, 0, &read_req(1000)).err(),
        Some(Error::Misaligned {
            sector: 0,
            len: 1000,
            block_size: 512
        })
    );
}

#[test]
fn misaligned_to_4k_logical_blocks() {
    let cfg = config(false, 4096);
    assert_eq!(
        parse_with(&cfg, 0, 1, &read_req(4096)).err(),
        Some(Error::Misaligned {
            sector: 1,
            len: 4096,
            block_size: 4096
        })
    );
    assert!(parse_with(&cfg, 0, 8, &read_req(4096)).is_ok());
}

#[test]
fn beyond_capacity() {
    assert_eq!(
        parse(0, 2048, &read_req(512)).err(),
        Some(Error::OutOfRange {
            sector: 2048,
            len: 512,
            capacity: 2048
        })
    );
    assert_eq!(
        parse(0, 2047, &read_req(1024)).err(),
        Some(Error::OutOfRange {
            sector: 2047,
            len: 1024,
            capacity: 2048
        })
    );
}

#[test]
fn sector_overflow() {
    let sector = u64::MAX / 256;
    assert_eq!(
        parse(0, sector, &read_req(512)).err(),
        Some(Error::SectorOverflow { sector })
    );
}

#[test]
fn write_on_readonly() {
    let cfg = config(true, 512);
    assert_eq!(
        parse_with(
            &cfg,
            1,
            0,
            &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)]
        )
        .err(),
        Some(Error::ReadOnly)
    );
    assert!(
        parse_with(&cfg, 0, 0, &read_req(512)).is_ok(),
        "reads still work"
    );
}

#[test]
fn unknown_type_is_unsupp() {
    let e = parse(0x1234, 0, &read_req(512)).err().expect("error");
    assert_eq!(e, Error::Unsupported(0x1234));
    assert_eq!(e.status(), S_UNSUPP);
}

#[test]
fn get_id_short_buffer_is_fine() {
    let r = parse(
        8,
        0,
        &[desc(HDR, 16, 0), desc(DATA, 5, W), desc(STATUS, 1, W)],
    )
    .expect("valid");
    assert_eq!(r.op, Op::GetId);
    assert_eq!(r.data[0].iov_len, 5);
}

fn seg(sector: u64, n: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&n.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

fn parse_segments(kind: u32, segs: &[[u8; 16]]) -> Result<Request, Error> {
    let m = mem();
    header(&m, kind, 0);
    let bytes: Vec<u8> = segs.iter().flatten().copied().collect();
    m.write_slice(&bytes, GuestAddress(DATA)).expect("segments");
    let vq = MockSplitQueue::new(&*m, 16);
    let chain = vq
        .build_desc_chain(&[
            desc(HDR, 16, 0),
            desc(DATA, bytes.len() as u32, 0),
            desc(STATUS, 1, W),
        ])
        .expect("chain");
    Request::parse(chain, m.clone(), &config(false, 512)).map_err(|r| r.error)
}

#[test]
fn multi_segment_write_zeroes() {
    let r = parse_segments(13, &[seg(0, 8, 0), seg(100, 4, 1)]).expect("valid");
    match r.op {
        Op::WriteZeroes(s) => {
            assert_eq!(s.len(), 2);
            assert_eq!(
                (s[1].offset, s[1].len, s[1].unmap),
                (100 * 512, 4 * 512, true)
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn segment_rules() {
    assert_eq!(
        parse_segments(11, &[seg(0, 0, 0)]).err(),
        Some(Error::SegmentEmpty { sector: 0 })
    );
    assert_eq!(
        parse_segments(11, &[seg(2040, 16, 0)]).err(),
        Some(Error::OutOfRange {
            sector: 2040,
            len: 16 * 512,
            capacity: 2048
        })
    );
    assert_eq!(
        parse_segments(11, &[seg(0, 8, 1)]).err(),
        Some(Error::SegmentFlags { flags: 1 }),
        "UNMAP on discard is UNSUPP"
    );
    assert_eq!(
        parse_segments(13, &[seg(0, 8, 0x80)]).err(),
        Some(Error::SegmentFlags { flags: 0x80 })
    );
    let too_many: Vec<[u8; 16]> = (0..=u64::from(MAX_DISCARD_SEG))
        .map(|i| seg(i * 8, 8, 0))
        .collect();
    assert_eq!(
        parse_segments(11, &too_many).err(),
        Some(Error::TooManySegments {
            count: u64::from(MAX_DISCARD_SEG) + 1,
            max: MAX_DISCARD_SEG
        })
    );
}

#[test]
fn segment_payload_not_multiple_of_16() {
    let m = mem();
    header(&m, 11, 0);
    let vq = MockSplitQueue::new(&*m, 16);
    let chain = vq
        .build_desc_chain(&[desc(HDR, 16, 0), desc(DATA, 20, 0), desc(STATUS, 1, W)])
        .expect("chain");
    let err = Request::parse(chain, m.clone(), &config(false, 512))
        .err()
        .expect("error")
        .error;
    assert_eq!(err, Error::SegmentLength { len: 20 });
    assert_eq!(err.status(), S_IOERR);
}

#[test]
fn looping_chain_is_truncated() {
    let m = mem();
    header(&m, 0, 0);
    let vq = MockSplitQueue::new(&*m, 16);
    // 0 -> 1 -> 0 -> ...: store by hand, the mock would fix the links.
    vq.desc_table()
        .store(0, RawDescriptor::from(SplitDescriptor::new(HDR, 16, 1, 1)))
        .expect("store");
    vq.desc_table()
        .store(
            1,
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, 1 | W, 0)),
        )
        .expect("store");
    vq.avail().ring().ref_at(0).expect("ring").store(0);
    vq.avail().idx().store(1);
    let mut q: virtio_queue::Queue = vq.create_queue().expect("queue");
    use virtio_queue::QueueOwnedT;
    let chain = q.iter(&*m).expect("iter").next().expect("chain");
    let err = Request::parse(chain, m.clone(), &config(false, 512))
        .err()
        .expect("error")
        .error;
    assert_eq!(err, Error::ChainTruncated);
}

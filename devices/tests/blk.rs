//! The executor over real guest memory: what reaches the backend, what reaches the guest
//! (data, status byte, used length), writethrough flushes, errors confined to one request,
//! dirty-page logging. A recording backend that never parks runs without a scheduler; the
//! null backend with a latency runs in a real coroutine.

mod common;

use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use corodev_devices::backend::{BlockBackend, GuestBuffers, NullBackend};
use corodev_devices::blk::{Served, VirtioBlk};
use corodev_devices::config::{DeviceConfig, DeviceParams};
use corodev_devices::memory::GuestMap;
use corodev_devices::request::{Request, RequestType, Used, WriteLog, S_IOERR, S_OK, S_UNSUPP};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const HDR: u64 = 0x2000;
const STATUS: u64 = 0x3000;
const DATA: u64 = 0x4000;
const SIZE: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Read(u64, u64),
    Write(u64, Vec<u8>),
    Flush,
    Discard(u64, u64),
    WriteZeroes(u64, u64, bool),
}

/// Records every call; reads return `offset + i` as bytes; can be told to fail.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Call>>,
    fail: Mutex<Option<io::ErrorKind>>,
}

impl Recorder {
    fn record(&self, c: Call) -> io::Result<()> {
        self.calls.lock().expect("lock").push(c);
        match *self.fail.lock().expect("lock") {
            Some(kind) => Err(io::Error::from(kind)),
            None => Ok(()),
        }
    }

    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().expect("lock"))
    }

    fn fail_with(&self, kind: Option<io::ErrorKind>) {
        *self.fail.lock().expect("lock") = kind;
    }
}

impl BlockBackend for Recorder {
    fn size(&self) -> u64 {
        SIZE
    }

    fn read_vectored(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        let data: Vec<u8> = (0..bufs.len()).map(|i| (offset + i) as u8).collect();
        bufs.copy_from(&data);
        self.record(Call::Read(offset, bufs.len()))
    }

    fn write_vectored(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        let mut data = vec![0u8; bufs.len() as usize];
        bufs.copy_to(&mut data);
        self.record(Call::Write(offset, data))
    }

    fn flush(&self) -> io::Result<()> {
        self.record(Call::Flush)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(Call::Discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.record(Call::WriteZeroes(offset, len, may_unmap))
    }
}

fn mem<B: vm_memory::bitmap::NewBitmap>() -> Arc<GuestMemoryMmap<B>> {
    Arc::new(
        GuestMemoryMmap::<B>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory"),
    )
}

/// Runs `r` on a device over `disk`; `writeback` is the guest's cache choice (without it
/// every write is followed by a flush).
fn execute<B: Bitmap + 'static, D: BlockBackend + 'static>(
    r: Request<B>,
    disk: &Arc<D>,
    writeback: bool,
) -> Used {
    let cfg = config("");
    if writeback {
        cfg.ack_features(1 << VIRTIO_BLK_F_FLUSH);
    }
    assert_eq!(cfg.writeback(), writeback);
    VirtioBlk::new(cfg, disk.clone()).execute(r).used
}

fn config(serial: &str) -> DeviceConfig {
    DeviceConfig::build(DeviceParams {
        queue_size: 16,
        serial: serial.as_bytes().to_vec(),
        ..DeviceParams::for_backend(&Recorder::default())
    })
    .expect("valid device")
}

/// Writes the header and a 0xff status canary, then parses the chain.
fn request<B: Bitmap + 'static>(
    m: &Arc<GuestMemoryMmap<B>>,
    cfg: &DeviceConfig,
    kind: u32,
    sector: u64,
    descs: &[RawDescriptor],
) -> Request<B> {
    m.write_slice(&header(kind, 0, sector), GuestAddress(HDR))
        .expect("header");
    m.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
    let vq = MockSplitQueue::new(&**m, 16);
    let chain = vq.build_desc_chain(descs).expect("chain");
    match Request::parse(chain, GuestMap::new(m.clone()), cfg) {
        Ok(r) => r,
        Err(r) => panic!("rejected: {}", r.error()),
    }
}

fn status<B: Bitmap + 'static>(m: &GuestMemoryMmap<B>) -> u8 {
    m.read_obj(GuestAddress(STATUS)).expect("status")
}

#[test]
fn read_fills_guest_buffers() {
    let m = mem::<()>();
    let disk = Arc::new(Recorder::default());
    let r = request(
        &m,
        &config(""),
        T_IN,
        2,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, W),
            desc(DATA + 0x1000, 512, W),
            desc(STATUS, 1, W),
        ],
    );
    assert_eq!(
        execute(r, &disk, true),
        Used { head: 0, len: 1025 },
        "used: data + status"
    );
    assert_eq!(status(&m), S_OK);
    assert_eq!(disk.calls(), vec![Call::Read(1024, 1024)]);
    let mut second = [0u8; 512];
    m.read_slice(&mut second, GuestAddress(DATA + 0x1000))
        .expect("read");
    assert_eq!(
        second[0],
        (1024u64 + 512) as u8,
        "continues in the next buffer"
    );
}

#[test]
fn write_hands_guest_bytes_to_the_backend() {
    let m = mem::<()>();
    m.write_slice(&[7u8; 512], GuestAddress(DATA))
        .expect("data");
    let disk = Arc::new(Recorder::default());
    let r = request(
        &m,
        &config(""),
        T_OUT,
        4,
        &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
    );
    assert_eq!(
        execute(r, &disk, true),
        Used { head: 0, len: 1 },
        "used: status only"
    );
    assert_eq!(status(&m), S_OK);
    assert_eq!(disk.calls(), vec![Call::Write(2048, vec![7; 512])]);
}

#[test]
fn writethrough_write_is_flushed_before_completion() {
    let m = mem::<()>();
    let disk = Arc::new(Recorder::default());
    let r = request(
        &m,
        &config(""),
        T_OUT,
        0,
        &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
    );
    execute(r, &disk, false);
    assert_eq!(
        disk.calls(),
        vec![Call::Write(0, vec![0; 512]), Call::Flush]
    );
}

#[test]
fn writethrough_write_zeroes_is_flushed() {
    let m = mem::<()>();
    m.write_slice(&seg(8, 2, 0), GuestAddress(DATA))
        .expect("segment");
    let disk = Arc::new(Recorder::default());
    let r = request(
        &m,
        &config(""),
        T_WRITE_ZEROES,
        0,
        &[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)],
    );
    assert_eq!(execute(r, &disk, false), Used { head: 0, len: 1 });
    assert_eq!(
        disk.calls(),
        vec![Call::WriteZeroes(4096, 1024, false), Call::Flush]
    );
}

#[test]
fn discard_segments_in_order() {
    let m = mem::<()>();
    let p = segments(&[seg(64, 8, 0), seg(8, 16, 0)]);
    m.write_slice(&p, GuestAddress(DATA)).expect("segments");
    let disk = Arc::new(Recorder::default());
    let r = request(
        &m,
        &config(""),
        T_DISCARD,
        0,
        &[desc(HDR, 16, 0), desc(DATA, 32, 0), desc(STATUS, 1, W)],
    );
    assert_eq!(execute(r, &disk, false), Used { head: 0, len: 1 });
    assert_eq!(
        disk.calls(),
        vec![Call::Discard(64 * 512, 4096), Call::Discard(4096, 8192)],
        "no flush after a discard"
    );
}

#[test]
fn flush() {
    let m = mem::<()>();
    let disk = Arc::new(Recorder::default());
    let r = request(
        &m,
        &config(""),
        T_FLUSH,
        0,
        &[desc(HDR, 16, 0), desc(STATUS, 1, W)],
    );
    assert_eq!(execute(r, &disk, true), Used { head: 0, len: 1 });
    assert_eq!(status(&m), S_OK);
    assert_eq!(disk.calls(), vec![Call::Flush]);
}

fn get_id(serial: &str, buf_len: u32) -> (Vec<u8>, Used) {
    let m = mem::<()>();
    m.write_slice(&[0xaa; 64], GuestAddress(DATA))
        .expect("canary");
    let r = request(
        &m,
        &config(serial),
        T_GET_ID,
        0,
        &[desc(HDR, 16, 0), desc(DATA, buf_len, W), desc(STATUS, 1, W)],
    );
    let used = execute(r, &Arc::new(Recorder::default()), true);
    assert_eq!(status(&m), S_OK);
    let mut out = vec![0u8; 64];
    m.read_slice(&mut out, GuestAddress(DATA)).expect("read");
    (out, used)
}

#[test]
fn get_id_of_exactly_20_bytes_has_no_nul() {
    let (out, used) = get_id("ABCDEFGHIJKLMNOPQRST", 32);
    assert_eq!(&out[..20], b"ABCDEFGHIJKLMNOPQRST");
    assert_eq!(out[20], 0xaa, "nothing past 20 bytes");
    assert_eq!(used, Used { head: 0, len: 21 });
}

#[test]
fn get_id_of_a_short_serial_is_nul_padded() {
    let (out, used) = get_id("abc", 20);
    assert_eq!(&out[..3], b"abc");
    assert!(out[3..20].iter().all(|&b| b == 0));
    assert_eq!(used, Used { head: 0, len: 21 });
}

#[test]
fn get_id_into_a_short_buffer_writes_what_fits() {
    let (out, used) = get_id("ABCDEFGHIJKLMNOPQRST", 5);
    assert_eq!(&out[..5], b"ABCDE");
    assert_eq!(out[5], 0xaa);
    assert_eq!(used, Used { head: 0, len: 6 });
}

/// What `execute` tells its caller to count: data bytes moved by reads and writes, none
/// for a failure or for a type that moves no disk data (GET_ID copies the serial).
#[test]
fn served_counts_the_data_bytes_moved_and_the_status() {
    let m = mem::<()>();
    let disk = Arc::new(Recorder::default());
    let cfg = config("");
    cfg.ack_features(1 << VIRTIO_BLK_F_FLUSH);
    let blk = VirtioBlk::new(cfg, disk.clone());
    let read = [desc(HDR, 16, 0), desc(DATA, 1024, W), desc(STATUS, 1, W)];
    let write = [desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)];
    let outcome = |r| {
        let s: Served = blk.execute(r);
        (s.kind, s.bytes, s.status, s.rejected)
    };
    let req = |t, d: &[RawDescriptor]| request(&m, blk.config(), t, 0, d);
    assert_eq!(
        outcome(req(T_IN, &read)),
        (Some(RequestType::In), 1024, S_OK, false)
    );
    assert_eq!(
        outcome(req(T_OUT, &write)),
        (Some(RequestType::Out), 512, S_OK, false)
    );
    let id = [desc(HDR, 16, 0), desc(DATA, 20, W), desc(STATUS, 1, W)];
    assert_eq!(
        outcome(req(T_GET_ID, &id)),
        (Some(RequestType::GetId), 0, S_OK, false)
    );
    disk.fail_with(Some(io::ErrorKind::Other));
    assert_eq!(
        outcome(req(T_IN, &read)),
        (Some(RequestType::In), 0, S_IOERR, false),
        "a failed read moved nothing the guest can use"
    );
}

#[test]
fn backend_error_fails_only_that_request() {
    let m = mem::<()>();
    let disk = Arc::new(Recorder::default());
    let cfg = config("");
    let read = [desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)];
    disk.fail_with(Some(io::ErrorKind::Other));
    let r = request(&m, &cfg, T_IN, 0, &read);
    assert_eq!(
        execute(r, &disk, true),
        Used { head: 0, len: 1 },
        "no data reported written"
    );
    assert_eq!(status(&m), S_IOERR);
    disk.fail_with(None);
    let r = request(&m, &cfg, T_IN, 0, &read);
    assert_eq!(execute(r, &disk, true), Used { head: 0, len: 513 });
    assert_eq!(status(&m), S_OK);
}

#[test]
fn failed_writethrough_flush_is_ioerr() {
    struct FlushFails;
    impl BlockBackend for FlushFails {
        fn size(&self) -> u64 {
            SIZE
        }
        fn read_vectored(&self, _: &GuestBuffers<'_>, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn write_vectored(&self, _: &GuestBuffers<'_>, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
        fn discard(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
            Ok(())
        }
    }
    let m = mem::<()>();
    let r = request(
        &m,
        &config(""),
        T_OUT,
        0,
        &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
    );
    assert_eq!(
        execute(r, &Arc::new(FlushFails), false),
        Used { head: 0, len: 1 }
    );
    assert_eq!(status(&m), S_IOERR);
}

#[test]
fn serve_answers_a_rejected_request_with_its_status() {
    let m = mem::<()>();
    m.write_slice(&header(0x99, 0, 0), GuestAddress(HDR))
        .expect("header");
    m.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
    let vq = MockSplitQueue::new(&*m, 16);
    let chain = vq
        .build_desc_chain(&[desc(HDR, 16, 0), desc(STATUS, 1, W)])
        .expect("chain");
    let disk = Arc::new(Recorder::default());
    let served = VirtioBlk::new(config(""), disk.clone()).serve(chain, GuestMap::new(m.clone()));
    assert_eq!(
        served,
        Served {
            used: Used { head: 0, len: 1 },
            kind: Some(RequestType::Unsupported(0x99)),
            bytes: 0,
            status: S_UNSUPP,
            rejected: true,
        },
        "what the caller counts: an unsupported type, refused"
    );
    assert_eq!(status(&m), S_UNSUPP);
    assert!(disk.calls().is_empty(), "no I/O for a rejected request");
}

#[test]
fn serve_without_a_status_byte_writes_nothing() {
    let m = mem::<()>();
    let vq = MockSplitQueue::new(&*m, 16);
    let chain = vq
        .build_desc_chain(&[desc(HDR, 16, 0), desc(STATUS, 1, 0)])
        .expect("chain");
    m.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
    let disk = Arc::new(Recorder::default());
    let served = VirtioBlk::new(config(""), disk).serve(chain, GuestMap::new(m.clone()));
    assert_eq!(served.used, Used { head: 0, len: 0 });
    assert_eq!(
        (served.kind, served.rejected),
        (None, true),
        "refused before the header was read: no type to count it under"
    );
    assert_eq!(status(&m), 0xff, "untouched");
}

/// A dirty log that records what it is told, while `on`.
#[derive(Default)]
struct Marks {
    on: bool,
    marked: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl WriteLog for Marks {
    fn logging(&self) -> bool {
        self.on
    }
    fn mark(&self, gpa: u64, len: u64) {
        self.marked.lock().unwrap().push((gpa, len));
    }
}

/// Runs `r` (writeback) on a device that records its writes in `log`; returns the marks.
fn execute_logged(r: Request<()>, on: bool) -> Vec<(u64, u64)> {
    let log = Arc::new(Marks {
        on,
        ..Marks::default()
    });
    let cfg = config("");
    cfg.ack_features(1 << VIRTIO_BLK_F_FLUSH);
    VirtioBlk::new(cfg, Arc::new(Recorder::default()))
        .with_write_log(log.clone())
        .execute(r);
    let marked = log.marked.lock().unwrap().clone();
    marked
}

#[test]
fn read_records_the_guest_memory_it_wrote() {
    let m = mem::<()>();
    let r = request(
        &m,
        &config(""),
        T_IN,
        0,
        &[desc(HDR, 16, 0), desc(DATA, 8192, W), desc(STATUS, 1, W)],
    );
    assert_eq!(
        execute_logged(r, true),
        vec![(DATA, 8192), (STATUS, 1)],
        "the data buffer, then the status byte"
    );
}

#[test]
fn write_records_only_its_status_byte() {
    let m = mem::<()>();
    let r = request(
        &m,
        &config(""),
        T_OUT,
        0,
        &[desc(HDR, 16, 0), desc(DATA, 4096, 0), desc(STATUS, 1, W)],
    );
    assert_eq!(
        execute_logged(r, true),
        vec![(STATUS, 1)],
        "the device only read the data"
    );
}

#[test]
fn nothing_is_recorded_while_logging_is_off() {
    let m = mem::<()>();
    let r = request(
        &m,
        &config(""),
        T_IN,
        0,
        &[desc(HDR, 16, 0), desc(DATA, 4096, W), desc(STATUS, 1, W)],
    );
    assert_eq!(execute_logged(r, false), vec![]);
}

#[test]
fn null_backend_latency_parks_the_coroutine() {
    let sched = coro::Scheduler::default();
    let done = Rc::new(Cell::new(None));
    let d = done.clone();
    sched
        .spawn(move || {
            let m = mem::<()>();
            let disk = Arc::new(NullBackend::new(SIZE, Duration::from_millis(20)));
            m.write_slice(&[9u8; 512], GuestAddress(DATA))
                .expect("data");
            let r = request(
                &m,
                &config(""),
                T_IN,
                0,
                &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
            );
            let start = Instant::now();
            let used = execute(r, &disk, true);
            let mut got = [1u8; 512];
            m.read_slice(&mut got, GuestAddress(DATA)).expect("read");
            assert_eq!(got, [0; 512], "null reads are zeroes");
            assert_eq!(status(&m), S_OK);
            d.set(Some((used, start.elapsed())));
        })
        .expect("spawn");
    assert_eq!(sched.run_until_idle().expect("run"), 0);
    let (used, took) = done.get().expect("task finished");
    assert_eq!(used, Used { head: 0, len: 513 });
    assert!(took >= Duration::from_millis(20), "slept {took:?}");
}

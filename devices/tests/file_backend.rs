//! The file backend on a real file through io_uring, inside a real coroutine scheduler.

use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::path::Path;
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use corodev_devices::backend::{BlockBackend, FileBackend, GuestBuffers, ResizeError};
use corodev_devices::memory::GuestMap;

mod common;
use common::{iov, run_in_task};

fn image(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).expect("temp");
    f.write_all(bytes).expect("write");
    f
}

#[test]
fn read_write_discard_zero_roundtrip() {
    let content: Vec<u8> = (0..16384u32).map(|i| (i * 7) as u8).collect();
    let img = image(&content);
    let disk = FileBackend::open(img.path(), false, false).expect("open");
    assert_eq!(disk.size(), 16384);
    run_in_task(move || {
        let mut a = vec![0u8; 1000];
        let mut b = vec![0u8; 3096];
        let v = [iov(&mut a), iov(&mut b)];
        // SAFETY: both buffers are on the heap (not a coroutine stack), outlive `bufs` and are
        // only used through it meanwhile.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.read_vectored(&bufs, 4096).expect("read");
        assert_eq!(a[..], content[4096..5096]);
        assert_eq!(b[..], content[5096..8192]);
        // Write it back at offset 0, then zero and discard ranges.
        disk.write_vectored(&bufs, 0).expect("write");
        disk.flush().expect("flush");
        disk.write_zeroes(8192, 4096, false).expect("write zeroes");
        disk.discard(12288, 4096).expect("discard");
        let mut all = vec![0xffu8; 16384];
        let v = [iov(&mut all)];
        // SAFETY: as above.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.read_vectored(&bufs, 0).expect("read all");
        assert_eq!(all[..4096], content[4096..8192]);
        assert!(
            all[8192..].iter().all(|&x| x == 0),
            "zeroed and discarded ranges read as 0"
        );
    });
}

#[test]
fn read_past_end_of_file_is_zero_filled() {
    let img = image(&[9u8; 1024]);
    let disk = FileBackend::open(img.path(), true, false).expect("open");
    assert!(disk.is_read_only());
    run_in_task(move || {
        let mut buf = vec![0xffu8; 4096];
        let v = [iov(&mut buf)];
        // SAFETY: the buffer is on the heap (not a coroutine stack) and outlives `bufs`.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.read_vectored(&bufs, 512).expect("read");
        assert!(buf[..512].iter().all(|&x| x == 9));
        assert!(buf[512..].iter().all(|&x| x == 0));
    });
}

#[test]
fn direct_io_with_misaligned_buffers_uses_bounce() {
    let content: Vec<u8> = (0..8192u32).map(|i| (i * 13) as u8).collect();
    let img = image(&content);
    let disk = match FileBackend::open(img.path(), false, true) {
        Ok(d) => d,
        // Some file systems (tmpfs) refuse O_DIRECT; the target dir is a real disk here.
        Err(e) => panic!("O_DIRECT open failed on {}: {e}", img.path().display()),
    };
    run_in_task(move || {
        // 1 byte into a heap buffer: not 512-aligned, which O_DIRECT would refuse.
        let mut raw = vec![0u8; 4096 + 1];
        let v = [libc::iovec {
            iov_base: raw[1..].as_mut_ptr().cast(),
            iov_len: 4096,
        }];
        // SAFETY: the buffer is on the heap (not a coroutine stack) and outlives `bufs`.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.read_vectored(&bufs, 4096).expect("bounced read");
        assert_eq!(raw[1..], content[4096..]);
        disk.write_vectored(&bufs, 0).expect("bounced write");
        let mut back = vec![0u8; 4097];
        let v = [libc::iovec {
            iov_base: back[1..].as_mut_ptr().cast(),
            iov_len: 4096,
        }];
        // SAFETY: as above.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.read_vectored(&bufs, 0).expect("read back");
        assert_eq!(back[1..], content[4096..]);
    });
}

#[test]
fn a_grown_file_serves_past_its_old_end() {
    let img = image(&[7u8; 4096]);
    let disk = FileBackend::open(img.path(), false, false).expect("open");
    disk.resize(3 * 4096).expect("grow");
    assert_eq!(disk.size(), 3 * 4096);
    assert_eq!(
        std::fs::metadata(img.path()).expect("stat").len(),
        3 * 4096,
        "the file itself grew"
    );
    run_in_task(move || {
        let mut data = vec![0x5au8; 4096];
        let v = [iov(&mut data)];
        // SAFETY: the buffer is on the heap (not a coroutine stack) and outlives `bufs`.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.write_vectored(&bufs, 2 * 4096)
            .expect("write past the old end");
        let mut back = vec![0xffu8; 3 * 4096];
        let v = [iov(&mut back)];
        // SAFETY: as above.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.read_vectored(&bufs, 0).expect("read");
        assert!(back[..4096].iter().all(|&b| b == 7), "old data kept");
        assert!(
            back[4096..8192].iter().all(|&b| b == 0),
            "new blocks read zero"
        );
        assert!(
            back[8192..].iter().all(|&b| b == 0x5a),
            "written past the old end"
        );
    });
}

#[test]
fn a_read_only_file_is_not_resized() {
    let img = image(&[0u8; 4096]);
    let disk = FileBackend::open(img.path(), true, false).expect("open");
    assert!(matches!(disk.resize(8192), Err(ResizeError::ReadOnly)));
    assert_eq!(disk.size(), 4096);
    assert_eq!(std::fs::metadata(img.path()).expect("stat").len(), 4096);
}

#[test]
fn write_to_readonly_file_fails_cleanly() {
    let img = image(&[0u8; 4096]);
    let disk = FileBackend::open(img.path(), true, false).expect("open");
    run_in_task(move || {
        let mut buf = vec![1u8; 512];
        let v = [iov(&mut buf)];
        // SAFETY: the buffer is on the heap (not a coroutine stack) and outlives `bufs`.
        let bufs = unsafe { GuestBuffers::new(&v) };
        let err = disk
            .write_vectored(&bufs, 0)
            .expect_err("a write through a read-only descriptor");
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EBADF),
            "EBADF from a read-only descriptor: {err:?}"
        );
    });
    let on_disk = std::fs::read(img.path()).expect("read image");
    assert_eq!(on_disk, vec![0u8; 4096], "the failed write changed nothing");
}

/// A loop device, detached on drop (needs root, as CI has).
struct Loop {
    dev: String,
    _file: Option<tempfile::NamedTempFile>,
}

impl Loop {
    /// Over a fresh sparse temp file of `size` bytes.
    fn new(size: u64) -> Loop {
        Loop::with_args(size, &[])
    }

    /// Over a fresh sparse temp file of `size` bytes, with extra `losetup` arguments.
    fn with_args(size: u64, args: &[&str]) -> Loop {
        let file = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).expect("temp");
        file.as_file().set_len(size).expect("size");
        let mut lo = Loop::over(file.path(), args);
        lo._file = Some(file);
        lo
    }

    /// Over an existing `backing` file, with extra `losetup` arguments.
    fn over(backing: &Path, args: &[&str]) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .args(args)
            .arg(backing)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup failed (this test needs root and loop devices): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Loop { dev, _file: None }
    }

    fn path(&self) -> &Path {
        Path::new(&self.dev)
    }

    /// A `queue/` attribute of the device in sysfs.
    fn queue_attr(&self, name: &str) -> String {
        let dev = self.dev.trim_start_matches("/dev/");
        std::fs::read_to_string(format!("/sys/block/{dev}/queue/{name}"))
            .expect("sysfs queue attribute")
            .trim()
            .to_owned()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A file system mounted on a fresh directory, unmounted on drop (needs root). Declare it
/// before the loop devices over its files so that they are detached first.
struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    fn new(fstype: &str, source: &str, options: &str) -> Mount {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", fstype, "-o", options, source])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t {fstype} failed (needs root)");
        Mount { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a test failed with a descriptor open): detach it now, the kernel
            // finishes once the last user is gone, so no mount outlives the test.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

#[test]
fn block_device_size_io_discard_and_zeroes() {
    let lo = Loop::new(8 << 20);
    let disk = FileBackend::open(lo.path(), false, true).expect("open loop");
    assert_eq!(disk.size(), 8 << 20, "size from BLKGETSIZE64");
    assert!(
        matches!(disk.resize(16 << 20), Err(ResizeError::BlockDevice)),
        "a block device's size is the device's"
    );
    assert_eq!(disk.size(), 8 << 20);
    assert!(disk.topology().physical_block_size >= 512);
    run_in_task(move || {
        let mut data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let v = [iov(&mut data)];
        // SAFETY: the buffer is on the heap (not a coroutine stack) and outlives `bufs`.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.write_vectored(&bufs, 0).expect("write");
        disk.write_zeroes(0, 4096, false).expect("zero range");
        disk.discard(8192, 4096).expect("discard");
        disk.flush().expect("flush");
        let mut back = vec![0xffu8; 65536];
        let v = [iov(&mut back)];
        // SAFETY: as above.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.read_vectored(&bufs, 0).expect("read");
        let orig: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        assert!(back[..4096].iter().all(|&b| b == 0), "zeroed");
        assert_eq!(back[4096..8192], orig[4096..8192]);
        assert!(
            back[8192..12288].iter().all(|&b| b == 0),
            "punched hole reads zero"
        );
        assert_eq!(back[12288..], orig[12288..]);
    });
}

#[test]
fn file_identity_and_topology() {
    let img = image(&[0u8; 8192]);
    let buffered = FileBackend::open(img.path(), false, false).expect("open");
    assert!(!buffered.is_block_device());
    assert!(!buffered.is_read_only());
    assert!(buffered.writeback_cache());
    let t = buffered.topology();
    assert_eq!(t.logical_block_size, 512);
    assert!(t.physical_block_size.is_power_of_two() && t.physical_block_size >= 512);
    let direct = FileBackend::open(img.path(), false, true).expect("open O_DIRECT");
    assert_eq!(direct.topology().logical_block_size, 512);
}

#[test]
fn more_iovecs_than_the_kernel_takes_at_once() {
    // 2500 one-sector iovecs: readv/writev refuse more than 1024 per call.
    const N: usize = 2500;
    let content: Vec<u8> = (0..N * 512).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
    let img = image(&vec![0u8; N * 512]);
    let disk = FileBackend::open(img.path(), false, false).expect("open");
    run_in_task(move || {
        let mut src = content.clone();
        let v: Vec<_> = src.chunks_mut(512).map(iov).collect();
        // SAFETY: `src` is on the heap (not a coroutine stack), outlives `bufs` and is only
        // used through it meanwhile.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.write_vectored(&bufs, 0).expect("write");
        let mut back = vec![0u8; N * 512];
        let v: Vec<_> = back.chunks_mut(512).rev().map(iov).collect();
        // SAFETY: as above.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.read_vectored(&bufs, 0).expect("read");
        // The iovecs were in reverse order: chunk i of the file landed in chunk N-1-i.
        for (i, chunk) in back.chunks(512).rev().enumerate() {
            assert_eq!(chunk, &content[i * 512..(i + 1) * 512], "sector {i}");
        }
    });
}

#[test]
fn direct_io_bounce_in_chunks_and_past_end_of_file() {
    // 3 MiB + 512 bytes, misaligned, so the bounce path takes several chunks; the file
    // ends 1 KiB before the request does.
    let len = (3 << 20) + 512;
    let content: Vec<u8> = (0..len - 1024).map(|i| (i % 253) as u8).collect();
    let img = image(&content);
    let disk = FileBackend::open(img.path(), false, true).expect("open O_DIRECT");
    run_in_task(move || {
        let mut raw = vec![0xeeu8; len + 1];
        let v = [libc::iovec {
            iov_base: raw[1..].as_mut_ptr().cast(),
            iov_len: len,
        }];
        // SAFETY: the buffer is on the heap (not a coroutine stack) and outlives `bufs`.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.read_vectored(&bufs, 0).expect("bounced read");
        assert_eq!(raw[1..len - 1023], content[..]);
        assert!(
            raw[len - 1023..].iter().all(|&b| b == 0),
            "past EOF reads 0"
        );
    });
}

#[test]
fn write_zeroes_that_may_unmap() {
    let img = image(&[0x11u8; 16384]);
    let disk = FileBackend::open(img.path(), false, false).expect("open");
    run_in_task(move || {
        disk.write_zeroes(4096, 8192, true).expect("punch");
        let mut all = vec![0xffu8; 16384];
        let v = [iov(&mut all)];
        // SAFETY: the buffer is on the heap (not a coroutine stack) and outlives `bufs`.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.read_vectored(&bufs, 0).expect("read");
        assert!(all[..4096].iter().all(|&b| b == 0x11));
        assert!(all[4096..12288].iter().all(|&b| b == 0));
        assert!(all[12288..].iter().all(|&b| b == 0x11));
    });
    assert_eq!(
        std::fs::metadata(img.path()).expect("stat").len(),
        16384,
        "KEEP_SIZE"
    );
}

/// Whole requests, parsed from a descriptor chain over guest memory whose data buffer
/// straddles two memory regions, executed on a file in a coroutine.
#[test]
fn requests_through_guest_memory_to_a_file() {
    use corodev_devices::blk::VirtioBlk;
    use corodev_devices::config::{DeviceConfig, DeviceParams};
    use corodev_devices::request::{Request, Used, S_OK};
    use std::sync::Arc;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const REGION: u64 = 0x1_0000;
    let img = image(&[0u8; 1 << 20]);
    let disk = FileBackend::open(img.path(), false, false).expect("open");
    let cfg = DeviceConfig::build(DeviceParams {
        queue_size: 16,
        ..DeviceParams::for_backend(&disk)
    })
    .expect("valid");
    assert!(!cfg.writeback(), "FLUSH not negotiated: writes are flushed");
    let blk = VirtioBlk::new(cfg, Arc::new(disk));
    run_in_task(move || {
        let m = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[
                (GuestAddress(0), REGION as usize),
                (GuestAddress(REGION), REGION as usize),
            ])
            .expect("memory"),
        );
        let d = |addr, len, flags| RawDescriptor::from(Descriptor::new(addr, len, flags, 0));
        let run = |kind: u32, data_flags: u16| {
            m.write_slice(&corodev_testkit::header(kind, 0, 100), GuestAddress(0x2000))
                .expect("header");
            let vq = MockSplitQueue::new(&*m, 16);
            let chain = vq
                .build_desc_chain(&[
                    d(0x2000, 16, 0),
                    d(REGION - 4096, 8192, data_flags),
                    d(0x3000, 1, 2),
                ])
                .expect("chain");
            let req =
                Request::parse(chain, GuestMap::new(m.clone()), blk.config()).unwrap_or_else(|r| {
                    panic!("rejected: {}", r.error());
                });
            assert_eq!(req.iovecs().len(), 2, "one iovec per region");
            let used = blk.execute(req).used;
            assert_eq!(
                m.read_obj::<u8>(GuestAddress(0x3000)).expect("status"),
                S_OK
            );
            used
        };
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 31 % 256) as u8).collect();
        m.write_slice(&pattern, GuestAddress(REGION - 4096))
            .expect("data");
        assert_eq!(run(1, 0), Used { head: 0, len: 1 }, "write");
        m.write_slice(&[0u8; 8192], GuestAddress(REGION - 4096))
            .expect("clear");
        assert_eq!(run(0, 2), Used { head: 0, len: 8193 }, "read");
        let mut back = vec![0u8; 8192];
        m.read_slice(&mut back, GuestAddress(REGION - 4096))
            .expect("read back");
        assert_eq!(back, pattern);
    });
    let on_disk = std::fs::read(img.path()).expect("read image");
    assert_eq!(
        on_disk[100 * 512..100 * 512 + 8192],
        (0..8192u32)
            .map(|i| (i * 31 % 256) as u8)
            .collect::<Vec<_>>()[..]
    );
}

/// What a second coroutine saw while `op` ran in the same scheduler.
#[derive(Debug)]
struct Progress {
    /// How long `op` took.
    op: Duration,
    /// The longest the ticker went without running while `op` was in flight.
    longest_stall: Duration,
    /// How often the ticker ran while `op` was in flight.
    ticks: usize,
}

/// Runs `op` in a coroutine next to a ticker that sleeps 1 ms in a loop: a backend call
/// that blocks the worker thread instead of parking shows as one stall as long as itself.
fn run_next_to_ticker(op: impl FnOnce() + 'static) -> Progress {
    let sched = coro::Scheduler::default();
    let done = Rc::new(Cell::new(false));
    let ticks = Rc::new(RefCell::new(Vec::new()));
    let span = Rc::new(Cell::new(None));
    let (d, t) = (done.clone(), ticks.clone());
    sched
        .spawn(move || {
            while !d.get() {
                t.borrow_mut().push(Instant::now());
                coro::io::sleep(Duration::from_millis(1));
            }
        })
        .expect("spawn ticker");
    let (d, sp) = (done.clone(), span.clone());
    sched
        .spawn(move || {
            let start = Instant::now();
            op();
            sp.set(Some((start, Instant::now())));
            d.set(true);
        })
        .expect("spawn op");
    assert_eq!(sched.run_until_idle().expect("run"), 0);
    let (start, end) = span.get().expect("op finished");
    let mut points = vec![start];
    points.extend(ticks.borrow().iter().filter(|&&t| t > start && t < end));
    points.push(end);
    Progress {
        op: end - start,
        longest_stall: points
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default(),
        ticks: points.len() - 2,
    }
}

/// Writes `fill` into `len` bytes at each of `offsets`, through the backend.
fn fill_at(disk: &FileBackend, offsets: &[u64], len: usize, fill: u8) {
    for &at in offsets {
        let mut buf = vec![fill; len];
        let v = [iov(&mut buf)];
        // SAFETY: the buffer is on the heap (not a coroutine stack) and outlives `bufs`.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.write_vectored(&bufs, at).expect("write");
    }
}

/// Whether `len` bytes at each of `offsets` read as zeroes through the backend.
fn zero_at(disk: &FileBackend, offsets: &[u64], len: usize) -> bool {
    offsets.iter().all(|&at| {
        let mut buf = vec![0xffu8; len];
        let v = [iov(&mut buf)];
        // SAFETY: the buffer is on the heap (not a coroutine stack) and outlives `bufs`.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.read_vectored(&bufs, at).expect("read");
        buf.iter().all(|&b| b == 0)
    })
}

/// A file of `len` bytes, sparse, at `path`.
fn sparse_file(path: &Path, len: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(len))
        .expect("backing file");
}

/// ramfs has no `fallocate` at all, so a loop device over a ramfs file offers neither
/// WRITE ZEROES nor discard: `fallocate(PUNCH_HOLE)` on it fails with EOPNOTSUPP, the
/// branch where the backend used to issue a synchronous BLKZEROOUT ioctl that froze every
/// coroutine of the thread for the whole zeroing.
#[test]
fn write_zeroes_on_a_device_without_write_zeroes_keeps_the_thread_running() {
    const LEN: u64 = 256 << 20;
    let fs = Mount::new("ramfs", "ramfs", "mode=0700");
    sparse_file(&fs.path().join("disk"), LEN);
    let lo = Loop::over(&fs.path().join("disk"), &[]);
    assert_eq!(
        lo.queue_attr("write_zeroes_max_bytes"),
        "0",
        "precondition: the loop device has no WRITE ZEROES"
    );
    let disk = Rc::new(FileBackend::open(lo.path(), false, true).expect("open"));
    let spots = [0, LEN / 2, LEN - 65536];
    let d = disk.clone();
    run_in_task(move || fill_at(&d, &spots, 65536, 0x5a));
    let d = disk.clone();
    let p = run_next_to_ticker(move || d.write_zeroes(0, LEN, true).expect("write zeroes"));
    eprintln!("{p:?}");
    assert!(
        p.longest_stall * 2 < p.op,
        "the ticker stalled while the range was zeroed: {p:?}"
    );
    assert!(p.ticks > 1, "the ticker ran during the zeroing: {p:?}");
    let d = disk.clone();
    run_in_task(move || assert!(zero_at(&d, &spots, 65536), "range reads as zeroes"));
}

/// Same device: without unmapping, and a discard, which the device cannot do and which
/// virtio lets us ignore.
#[test]
fn zero_range_and_discard_on_a_device_without_write_zeroes() {
    const LEN: u64 = 16 << 20;
    let fs = Mount::new("ramfs", "ramfs", "mode=0700");
    sparse_file(&fs.path().join("disk"), LEN);
    let lo = Loop::over(&fs.path().join("disk"), &[]);
    assert_eq!(lo.queue_attr("discard_max_bytes"), "0", "precondition");
    let disk = FileBackend::open(lo.path(), false, true).expect("open");
    run_in_task(move || {
        fill_at(&disk, &[0, 1 << 20], 65536, 0x5a);
        disk.write_zeroes(0, 1 << 20, false).expect("zero range");
        assert!(zero_at(&disk, &[0], 65536));
        disk.discard(1 << 20, 1 << 20)
            .expect("unsupported discard is ignored");
        assert!(!zero_at(&disk, &[1 << 20], 65536), "the data stays");
    });
}

/// An image file on ramfs, which has no `fallocate`: zeroes are written from a buffer in
/// chunks, each its own io_uring write, so the thread keeps serving other coroutines.
#[test]
fn write_zeroes_on_a_file_system_without_fallocate_writes_chunks() {
    const LEN: u64 = 128 << 20;
    let fs = Mount::new("ramfs", "ramfs", "mode=0700");
    let path = fs.path().join("img");
    sparse_file(&path, LEN);
    let disk = Rc::new(FileBackend::open(&path, false, false).expect("open"));
    let spots = [0, LEN / 2, LEN - 65536];
    let d = disk.clone();
    run_in_task(move || fill_at(&d, &spots, 65536, 0x5a));
    let d = disk.clone();
    let p = run_next_to_ticker(move || d.write_zeroes(0, LEN, false).expect("write zeroes"));
    eprintln!("{p:?}");
    assert!(p.longest_stall * 2 < p.op, "ticker stalled: {p:?}");
    assert!(p.ticks > 1, "the ticker ran during the zeroing: {p:?}");
    let d = disk.clone();
    run_in_task(move || assert!(zero_at(&d, &spots, 65536), "range reads as zeroes"));
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), LEN);
}

/// A writeback error is reported by one fdatasync only (the kernel's errseq); the data it
/// lost stays lost, so every later flush must fail too, or a guest that retries its flush
/// (or flushed from another queue) believes unwritten data is durable.
///
/// The loop device's backing file lives on a 1 MiB tmpfs but is 16 MiB long: writes land
/// in the loop device's page cache and succeed, and writeback fails once tmpfs is full.
#[test]
fn flush_errors_are_sticky() {
    let fs = Mount::new("tmpfs", "tmpfs", "size=1M,mode=0700");
    sparse_file(&fs.path().join("disk"), 16 << 20);
    let lo = Loop::over(&fs.path().join("disk"), &[]);
    let disk = FileBackend::open(lo.path(), false, false).expect("open buffered");
    let results = Rc::new(RefCell::new(Vec::new()));
    let r = results.clone();
    run_in_task(move || {
        fill_at(&disk, &[0], 4 << 20, 0xa5);
        r.borrow_mut().push(disk.flush());
        r.borrow_mut().push(disk.flush());
        // Data that fits (tmpfs still holds the first MiB): the disk stays failed anyway.
        fill_at(&disk, &[0], 4096, 0x5a);
        r.borrow_mut().push(disk.flush());
    });
    let results = results.take();
    eprintln!("{results:?}");
    let errno = |i: usize| results[i].as_ref().err().and_then(io::Error::raw_os_error);
    assert_eq!(errno(0), Some(libc::EIO), "writeback past the full tmpfs");
    assert_eq!(errno(1), Some(libc::EIO), "a second flush still fails");
    assert_eq!(
        errno(2),
        Some(libc::EIO),
        "a flush after new writes still fails"
    );
}

/// Writes one logical block (as the backend's topology states it) at the second logical
/// block, from buffers at three alignments, and reads each back: the guest may issue any
/// request at the granularity the topology advertises, so each must work.
fn io_at_the_advertised_granularity(disk: &FileBackend) {
    let lbs = disk.topology().logical_block_size as usize;
    let mut raw = vec![0u8; 4 * 4096 + lbs];
    let aligned = raw.as_ptr().align_offset(4096);
    // A page-aligned buffer, one that is only 512-aligned, and one that is not aligned.
    for (i, skew) in [0usize, 512, 1].into_iter().enumerate() {
        let at = aligned + 4096 + skew;
        let pattern: Vec<u8> = (0..lbs).map(|b| (b % 251) as u8 ^ i as u8).collect();
        raw[at..at + lbs].copy_from_slice(&pattern);
        let v = [iov(&mut raw[at..at + lbs])];
        // SAFETY: `raw` is on the heap (not a coroutine stack), outlives `bufs` and is only
        // used through it meanwhile.
        let bufs = unsafe { GuestBuffers::new(&v) };
        let offset = (lbs * (i + 1)) as u64;
        if let Err(e) = disk.write_vectored(&bufs, offset) {
            panic!("write of {lbs} bytes at {offset} from a buffer skewed by {skew}: {e:?}");
        }
        raw[at..at + lbs].fill(0);
        let v = [iov(&mut raw[at..at + lbs])];
        // SAFETY: as above.
        let bufs = unsafe { GuestBuffers::new(&v) };
        disk.read_vectored(&bufs, offset).expect("read back");
        assert_eq!(raw[at..at + lbs], pattern[..], "skew {skew}");
    }
}

/// A 4096-byte-sector block device under O_DIRECT: the logical block size is the device's.
#[test]
fn direct_io_on_a_4k_sector_block_device() {
    let lo = Loop::with_args(8 << 20, &["--sector-size", "4096"]);
    assert_eq!(lo.queue_attr("logical_block_size"), "4096", "precondition");
    let disk = FileBackend::open(lo.path(), false, true).expect("open O_DIRECT");
    assert_eq!(disk.topology().logical_block_size, 4096);
    assert!(disk.topology().physical_block_size >= 4096);
    run_in_task(move || io_at_the_advertised_granularity(&disk));
}

/// An image file under O_DIRECT on a file system on a 4096-byte-sector disk: the kernel
/// refuses 512-byte-granular direct I/O there (statx's DIOALIGN says 4096), so the backend
/// must not advertise or assume 512.
#[test]
fn direct_io_on_a_file_on_a_4k_sector_disk() {
    let lo = Loop::with_args(64 << 20, &["--sector-size", "4096"]);
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(lo.path())
        .status()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(status.success(), "mkfs.ext4");
    let fs = Mount::new("ext4", &lo.dev, "rw");
    let path = fs.path().join("img");
    std::fs::write(&path, vec![0x33u8; 1 << 20]).expect("image");
    let disk = FileBackend::open(&path, false, true).expect("open O_DIRECT");
    let lbs = disk.topology().logical_block_size;
    run_in_task(move || io_at_the_advertised_granularity(&disk));
    assert_eq!(
        lbs, 4096,
        "logical block size of an O_DIRECT file on a 4K disk"
    );
}

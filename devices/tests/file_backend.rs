//! The file backend on a real file through io_uring, inside a real coroutine scheduler.

use std::cell::Cell;
use std::io::Write;
use std::rc::Rc;

use corodev_devices::backend::{BlockBackend, FileBackend, GuestBuffers};

fn run_in_task(f: impl FnOnce() + 'static) {
    let sched = coro::Scheduler::default();
    let done = Rc::new(Cell::new(false));
    let d = done.clone();
    sched
        .spawn(move || {
            f();
            d.set(true);
        })
        .expect("spawn");
    assert_eq!(sched.run_until_idle().expect("run"), 0);
    assert!(done.get(), "task must finish");
}

fn image(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).expect("temp");
    f.write_all(bytes).expect("write");
    f
}

fn iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
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
        // SAFETY: both buffers outlive `bufs` and are only used through it meanwhile.
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
        // SAFETY: the buffer outlives `bufs`.
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
        // SAFETY: the buffer outlives `bufs`.
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
fn write_to_readonly_file_fails_cleanly() {
    let img = image(&[0u8; 4096]);
    let disk = FileBackend::open(img.path(), true, false).expect("open");
    run_in_task(move || {
        let mut buf = vec![1u8; 512];
        let v = [iov(&mut buf)];
        // SAFETY: the buffer outlives `bufs`.
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

/// A loop device over a temp file, detached on drop (needs root, as CI has).
struct Loop {
    dev: String,
    _file: tempfile::NamedTempFile,
}

impl Loop {
    fn new(size: u64) -> Loop {
        let file = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).expect("temp");
        file.as_file().set_len(size).expect("size");
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file.path())
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup failed (this test needs root and loop devices): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Loop { dev, _file: file }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

#[test]
fn block_device_size_io_discard_and_zeroes() {
    let lo = Loop::new(8 << 20);
    let disk = FileBackend::open(std::path::Path::new(&lo.dev), false, true).expect("open loop");
    assert_eq!(disk.size(), 8 << 20, "size from BLKGETSIZE64");
    assert!(disk.topology().physical_block_size >= 512);
    run_in_task(move || {
        let mut data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let v = [iov(&mut data)];
        // SAFETY: the buffer outlives `bufs`.
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
        // SAFETY: `src` outlives `bufs` and is only used through it meanwhile.
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
        // SAFETY: the buffer outlives `bufs`.
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
        // SAFETY: the buffer outlives `bufs`.
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
            let req = Request::parse(chain, m.clone(), blk.config()).unwrap_or_else(|r| {
                panic!("rejected: {}", r.error());
            });
            assert_eq!(req.iovecs().len(), 2, "one iovec per region");
            let used = blk.execute(req);
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

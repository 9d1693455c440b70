//! The RBD backend against a real single-node Ceph cluster (scripts/ceph-cluster.sh, about
//! 15 s to bring up, torn down at the end), inside a real coroutine scheduler: every
//! request parks its task until librbd's callback posts the result into the task's ring.
//! One cluster for the whole file: each check below is labelled.
//!
//! Needs root and Ceph 16.2 (scripts/install-deps.sh).

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corodev_devices::backend::{BlockBackend, GuestBuffers, RbdBackend, RbdError, RbdOptions};

mod common;
use common::{iov, run_in_task};

const MIB: u64 = 1 << 20;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("devices/ has a parent")
        .to_path_buf()
}

/// The cluster, torn down on drop.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn up() -> Cluster {
        let base = workspace().join("target/ceph");
        std::fs::create_dir_all(&base).expect("target/ceph");
        let dir = base.join(format!("devices-{}", std::process::id()));
        let out = Command::new("bash")
            .arg(workspace().join("scripts/ceph-cluster.sh"))
            .arg("up")
            .arg(&dir)
            .env(
                "CEPH_MON_PORT",
                (40000 + std::process::id() % 20000).to_string(),
            )
            .output()
            .expect("run scripts/ceph-cluster.sh");
        let cluster = Cluster {
            conf: dir.join("ceph.conf"),
            dir,
        };
        assert!(
            out.status.success(),
            "ceph-cluster.sh up failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }

    fn rbd(&self, args: &[&str]) {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("run rbd");
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn opts(&self, pool: &str, image: &str, readonly: bool) -> RbdOptions {
        RbdOptions {
            pool: pool.into(),
            image: image.into(),
            namespace: None,
            conf: Some(self.conf.clone()),
            id: None,
            readonly,
            cache: true,
            connect_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(10),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(workspace().join("scripts/ceph-cluster.sh"))
            .arg("down")
            .arg(&self.dir)
            .status();
    }
}

#[test]
fn rbd_backend_against_a_real_cluster() {
    let cluster = Cluster::up();
    cluster.rbd(&["create", "--size", "16M", "rbd/t"]);

    // Errors name what was typed, as values.
    match RbdBackend::open(&cluster.opts("nopool", "t", false)) {
        Err(RbdError::NoPool { pool }) => assert_eq!(pool, "nopool"),
        other => panic!("bad pool: {:?}", other.err()),
    }
    match RbdBackend::open(&cluster.opts("rbd", "nope", false)) {
        Err(RbdError::NoImage { pool, image, .. }) => {
            assert_eq!((&*pool, &*image), ("rbd", "nope"))
        }
        other => panic!("bad image: {:?}", other.err()),
    }

    // The pool's and the image's own settings count: write-around set on either is refused
    // with the command that removes it, and the image's rbd_cache decides the write cache.
    cluster.rbd(&["create", "--size", "16M", "rbd/cfg"]);
    for (level, set, fix) in [
        (
            "image",
            ["config", "image", "set", "rbd/cfg"],
            "rbd config image remove rbd/cfg rbd_cache_policy",
        ),
        (
            "pool",
            ["config", "pool", "set", "rbd"],
            "rbd config pool remove rbd rbd_cache_policy",
        ),
    ] {
        let mut args = set.to_vec();
        args.extend(["rbd_cache_policy", "writearound"]);
        cluster.rbd(&args);
        match RbdBackend::open(&cluster.opts("rbd", "cfg", false)) {
            Err(e @ RbdError::WriteAround { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains(&format!(
                        "its {level} configuration sets rbd_cache_policy=writearound"
                    )) && text.contains(fix),
                    "{text}"
                );
                let fix: Vec<&str> = fix.split_whitespace().skip(1).collect();
                cluster.rbd(&fix);
            }
            other => panic!("write-around on the {level}: {:?}", other.err()),
        }
    }
    let cfg = RbdBackend::open(&cluster.opts("rbd", "cfg", false)).expect("open once removed");
    assert!(cfg.writeback_cache());
    drop(cfg);
    cluster.rbd(&["config", "image", "set", "rbd/cfg", "rbd_cache", "false"]);
    let cfg = RbdBackend::open(&cluster.opts("rbd", "cfg", false)).expect("open");
    assert!(
        !cfg.writeback_cache(),
        "the image's rbd_cache=false makes a write-through device"
    );
    drop(cfg);

    let disk = Arc::new(RbdBackend::open(&cluster.opts("rbd", "t", false)).expect("open"));
    assert_eq!(disk.size(), 16 * MIB, "capacity from the image");
    assert!(!disk.is_read_only());
    assert!(disk.writeback_cache(), "rbd_cache defaults to on");

    let content: Vec<u8> = (0..MIB as u32)
        .map(|i| (i.wrapping_mul(7) >> 3) as u8)
        .collect();
    let d = disk.clone();
    let c = content.clone();
    run_in_task(move || {
        // Write 1 MiB from two iovecs at 4 KiB, flush, read it back in three.
        let (mut a, mut b) = (c[..1000].to_vec(), c[1000..].to_vec());
        let v = [iov(&mut a), iov(&mut b)];
        // SAFETY: heap buffers that outlive `bufs` and are only used through it meanwhile.
        let bufs = unsafe { GuestBuffers::new(&v) };
        d.write_vectored(&bufs, 4096).expect("write");
        d.flush().expect("flush");
        let (mut x, mut y, mut z) = (
            vec![0u8; 4096],
            vec![0u8; 512],
            vec![0u8; MIB as usize - 4608],
        );
        let v = [iov(&mut x), iov(&mut y), iov(&mut z)];
        // SAFETY: as above.
        let bufs = unsafe { GuestBuffers::new(&v) };
        d.read_vectored(&bufs, 4096).expect("read");
        let got: Vec<u8> = [x, y, z].concat();
        assert!(got == c, "read back what was written");

        // Write zeroes (thick and unmapping) and discard.
        d.write_zeroes(4096, 4096, false)
            .expect("write zeroes, thick");
        d.write_zeroes(8192, 4096, true)
            .expect("write zeroes, may unmap");
        d.discard(12288, 4096).expect("discard");
        let mut all = vec![0xffu8; 16384];
        let v = [iov(&mut all)];
        // SAFETY: as above.
        let bufs = unsafe { GuestBuffers::new(&v) };
        d.read_vectored(&bufs, 4096).expect("read zeroed");
        assert!(
            all[..8192].iter().all(|&x| x == 0),
            "zeroed ranges read as 0"
        );
        // The discarded 4 KiB may keep its data: librbd skips discards below
        // rbd_discard_granularity_bytes (64 KiB), which virtio allows (a discard is a hint).
    });

    // Many requests in flight at once from one worker: each parks on its own slot.
    let d = disk.clone();
    let sched = coro::Scheduler::default();
    let ok = Rc::new(Cell::new(0));
    for i in 0..32u64 {
        let (d, ok) = (d.clone(), ok.clone());
        sched
            .spawn(move || {
                let mut buf = vec![i as u8; 4096];
                let v = [iov(&mut buf)];
                // SAFETY: as above.
                let bufs = unsafe { GuestBuffers::new(&v) };
                d.write_vectored(&bufs, 2 * MIB + i * 4096).expect("write");
                let mut back = vec![0u8; 4096];
                let v = [iov(&mut back)];
                // SAFETY: as above.
                let bufs = unsafe { GuestBuffers::new(&v) };
                d.read_vectored(&bufs, 2 * MIB + i * 4096).expect("read");
                assert!(back.iter().all(|&x| x == i as u8), "request {i}");
                ok.set(ok.get() + 1);
            })
            .expect("spawn");
    }
    assert_eq!(sched.run_until_idle().expect("run"), 0);
    assert_eq!(ok.get(), 32, "32 concurrent requests completed");
    drop(sched);
    drop(d);

    // Read-only: opened read-only, writes refused by librbd.
    let ro = Arc::new(RbdBackend::open(&cluster.opts("rbd", "t", true)).expect("open ro"));
    assert!(ro.is_read_only());
    run_in_task(move || {
        let mut buf = vec![1u8; 4096];
        let v = [iov(&mut buf)];
        // SAFETY: as above.
        let bufs = unsafe { GuestBuffers::new(&v) };
        let e = ro
            .write_vectored(&bufs, 0)
            .expect_err("write to a read-only image");
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        ro.read_vectored(&bufs, 4096)
            .expect("read from a read-only image");
    });
    drop(disk);

    // Queue depth 1 latency through the whole path (librbd, its callback thread, MSG_RING,
    // the scheduler): printed for the notes, not asserted (a shared CI machine).
    let disk = Arc::new(RbdBackend::open(&cluster.opts("rbd", "t", false)).expect("open"));
    let d = disk.clone();
    run_in_task(move || {
        let mut buf = vec![7u8; 4096];
        let v = [iov(&mut buf)];
        // SAFETY: as above.
        let bufs = unsafe { GuestBuffers::new(&v) };
        for (what, write) in [("write", true), ("read", false)] {
            let n = 200u64;
            let t0 = Instant::now();
            for i in 0..n {
                let at = 4 * MIB + (i % 256) * 4096;
                if write {
                    d.write_vectored(&bufs, at).expect("write");
                } else {
                    d.read_vectored(&bufs, at).expect("read");
                }
            }
            let us = t0.elapsed().as_micros() as u64 / n;
            eprintln!("rbd qd1 4k {what}: {us} us per request ({n} requests)");
        }
    });
    drop(disk);

    // A cluster that stops answering: requests fail (ETIMEDOUT, IOERR for the guest) after
    // the op timeout instead of parking for ever, and succeed again once it is back.
    let mut opts = cluster.opts("rbd", "t", false);
    opts.op_timeout = Duration::from_secs(3);
    let disk = Arc::new(RbdBackend::open(&opts).expect("open"));
    let osd = Stopped::osd(&cluster.dir);
    let d = disk.clone();
    run_in_task(move || {
        let mut buf = vec![0u8; 4096];
        let v = [iov(&mut buf)];
        // SAFETY: as above.
        let bufs = unsafe { GuestBuffers::new(&v) };
        let t0 = Instant::now();
        // Never read before on this handle: nothing cached, the read must reach the OSD.
        let e = d
            .read_vectored(&bufs, 12 * MIB)
            .expect_err("read from a stopped OSD");
        let took = t0.elapsed();
        eprintln!("rbd read with the OSD stopped failed after {took:?}: {e}");
        assert_eq!(e.raw_os_error(), Some(libc::ETIMEDOUT));
        assert!(
            (Duration::from_millis(2500)..Duration::from_secs(15)).contains(&took),
            "failed after {took:?} with a 3 s op timeout"
        );
        drop(osd); // SIGCONT
        d.read_vectored(&bufs, 12 * MIB)
            .expect("read once the OSD is back");
        d.write_vectored(&bufs, 12 * MIB)
            .expect("write once the OSD is back");
        d.flush().expect("flush once the OSD is back");
    });

    // A write the cache acknowledged while the OSD is stopped is never lost behind a
    // successful flush: with the OSD away past the op timeout, a flush fails; once it is
    // back, a flush succeeds and the write is in the image (read through a new handle,
    // which has no cache). librbd's write-around cache dropped that write and then let the
    // flush succeed, since no write was in flight when it arrived.
    let d = disk.clone();
    let dir = cluster.dir.clone();
    run_in_task(move || {
        let mut first = vec![0x11u8; 64 << 10];
        let mut second = vec![0x22u8; 64 << 10];
        let v1 = [iov(&mut first)];
        let v2 = [iov(&mut second)];
        // SAFETY: as above.
        let (b1, b2) = unsafe { (GuestBuffers::new(&v1), GuestBuffers::new(&v2)) };
        d.write_vectored(&b1, 13 * MIB)
            .expect("write before the outage");
        let osd = Stopped::osd(&dir);
        d.write_vectored(&b2, 14 * MIB)
            .expect("the cache takes a write while the OSD is stopped");
        // Past the op timeout: the cache's write of it to the OSD has failed by now.
        std::thread::sleep(Duration::from_secs(5));
        let e = d
            .flush()
            .expect_err("a flush cannot succeed while the OSD is stopped");
        eprintln!("flush with the OSD stopped: {e}");
        assert_eq!(e.raw_os_error(), Some(libc::ETIMEDOUT));
        drop(osd); // SIGCONT
        d.flush()
            .expect("a flush succeeds once the OSD is back (nothing left unwritten)");
    });
    drop(disk);

    // Without librbd's cache (`--direct`) the device writes through: a completed write is
    // on the OSDs before any flush, here written through one handle without a flush and
    // read through another.
    let mut opts = cluster.opts("rbd", "t", false);
    opts.cache = false;
    let direct = Arc::new(RbdBackend::open(&opts).expect("open without the cache"));
    assert!(
        !direct.writeback_cache(),
        "cache off: a write-through device"
    );
    let d = direct.clone();
    run_in_task(move || {
        let mut buf = vec![0x33u8; 64 << 10];
        let v = [iov(&mut buf)];
        // SAFETY: as above.
        let bufs = unsafe { GuestBuffers::new(&v) };
        d.write_vectored(&bufs, 15 * MIB)
            .expect("write without the cache");
    });

    let disk = Arc::new(RbdBackend::open(&cluster.opts("rbd", "t", false)).expect("reopen"));
    let d = disk.clone();
    run_in_task(move || {
        for (at, byte) in [(13 * MIB, 0x11u8), (14 * MIB, 0x22u8), (15 * MIB, 0x33u8)] {
            let mut buf = vec![0u8; 64 << 10];
            let v = [iov(&mut buf)];
            // SAFETY: as above.
            let bufs = unsafe { GuestBuffers::new(&v) };
            d.read_vectored(&bufs, at).expect("read back");
            assert!(
                buf.iter().all(|&b| b == byte),
                "the write at {} MiB (acknowledged before a successful flush, or written through) is in the image",
                at / MIB
            );
        }
    });
}

/// The cluster's OSD, stopped with SIGSTOP until dropped (SIGCONT), even if a check fails.
struct Stopped(libc::pid_t);

impl Stopped {
    fn osd(dir: &Path) -> Stopped {
        let pidfile = dir.join("run/osd.0.pid");
        let pid: libc::pid_t = std::fs::read_to_string(&pidfile)
            .expect("OSD pid file")
            .trim()
            .parse()
            .expect("a pid");
        // SAFETY: a signal to the OSD this test's cluster started; no memory involved.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGSTOP) },
            0,
            "SIGSTOP the OSD"
        );
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as in `osd`.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

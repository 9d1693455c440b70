//! The NVMe test environment of issue 16 (userspace NVMe backend over VFIO), proved before
//! the backend exists: a TCG guest with QEMU's intel-iommu hands its emulated NVMe
//! controller to vfio-pci and a userspace program drives it through the `vfio-ioctls`
//! crate (`nvme-probe`: registers, DMA, MSI-X), and corodev inside the guest serves that controller's namespace to
//! a verifying frontend (`verify-load`), whose writes the host then finds in the NVMe
//! backing file. [`verified_load_through_corodev`] is the check the NVMe backend's test
//! will run with `--backend nvme --pci $NVME_BDF` on [`Bind::Vfio`].
//!
//! The NVMe backend's own tests run `nvme-load` (integration/src/bin/nvme-load.rs) in the
//! guest: many requests in flight on two queues, buffers that must be bounced, FLUSH,
//! DISCARD and WRITE_ZEROES; the host then checks the backing file and, through QEMU's
//! trace events, the commands the controller received.

use integration::console::GuestLine;
use integration::frontend::pattern;
use integration::nvme::{boot, guest_bin, Bind, NvmeGuest, NvmeRun};
use integration::server::corodev_musl_bin;
use integration::workload::Workload;
use integration::GuestRun;

/// What QEMU 7.2's emulated controller reports (hw/nvme/ctrl.c, nvme_init_ctrl): CAP with
/// MQES 0x7ff, CQR 1, TO 0xf (7.5 s), the NVM, CSI-supported and admin-only command set
/// bits (CSS 0xc1), MPSMAX 4 and the doorbell stride left 0; VS NVME_SPEC_VER, 1.4.0. The
/// serial is the one scripts/nvme-guest.sh gives the device.
#[test]
fn vfio_pci_takes_the_controller_and_a_vfio_ioctls_program_drives_it() {
    let guest = NvmeGuest {
        bins: vec![guest_bin("nvme-probe")],
        ..NvmeGuest::new(Bind::Vfio, "nvme-probe $NVME_BDF")
    };
    let size = guest.disk_size;
    let out = boot(&guest);
    let info = out.run.info();
    assert_eq!(info.get("driver"), "vfio-pci", "{}", out.run.console);
    assert!(
        !info.get("group").is_empty(),
        "an IOMMU group: {}",
        out.run.console
    );
    let r = out.run.expect_pass();
    for (key, want) in [
        ("mqes", "2047"),
        ("cqr", "1"),
        ("dstrd", "0"),
        ("to", "15"),
        ("css", "0xc1"),
        ("mpsmin", "0"),
        ("mpsmax", "4"),
        ("vs", "0x10400"),
        ("vs_major", "1"),
        ("vs_minor", "4"),
        ("vs_tertiary", "0"),
        ("bar0_mmap", "yes"),
        ("sn", "corodev-nvme"),
        ("nn", "256"),
        ("ns1_lbads", "9"),
        // Each of the two Identify commands raised MSI-X vector 0 on the eventfd.
        ("msix_irqs", "2"),
    ] {
        assert_eq!(r.get(key), want, "{key} in {:?}", r.fields);
    }
    // Identify came back by DMA into the buffer mapped at IOVA = its virtual address,
    // the namespace as large as the backing file.
    assert_eq!(r.num("ns1_nsze"), size / 512);
    // A user address is above 39 bits: what needs intel-iommu's aw-bits=48.
    let iova = u64::from_str_radix(r.get("iova").trim_start_matches("0x"), 16)
        .unwrap_or_else(|e| panic!("iova {:?}: {e}", r.get("iova")));
    assert!(iova >= 1 << 39, "IOVA {iova:#x} would fit a 39-bit IOMMU");
}

/// corodev (the static musl build) serves the NVMe namespace inside the guest to
/// `verify-load` (16 chunks of 64 KiB across the whole device, the first at 0 and the last
/// at its end, flushed, read back and compared); the daemon must exit 0 on SIGTERM. Then
/// the host reads each chunk from the NVMe backing file and compares it with the pattern
/// from the seed it chose, and the guest's md5 with the file's.
fn verified_load_through_corodev(bind: Bind, corodev_args: &str) {
    verified_load(bind, corodev_args, "", "");
}

/// [`verified_load_through_corodev`] with `before` run in the guest's shell ahead of the
/// load (e.g. a background job that disturbs the controller) and `load_args` added to
/// verify-load's; returns the guest's run for further checks.
fn verified_load(bind: Bind, corodev_args: &str, before: &str, load_args: &str) -> GuestRun {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64;
    let daemon = format!("corodev --socket $SOCK {corodev_args}");
    let frontend = format!("{before}verify-load $SOCK --seed {seed} {load_args}");
    let guest = NvmeGuest {
        daemon: Some(&daemon),
        bins: vec![corodev_musl_bin(), guest_bin("verify-load")],
        ..NvmeGuest::new(bind, &frontend)
    };
    let size = guest.disk_size;
    let out = boot(&guest);
    let r = out.run.expect_pass();
    assert_eq!(r.get("daemon"), "exit0");
    // A reset the test causes is logged as an error; nothing else may be.
    let errors: Vec<&str> = out
        .run
        .console
        .lines()
        .filter(|l| l.contains("ERROR]") && !l.contains("resetting the controller"))
        .collect();
    assert!(
        errors.is_empty(),
        "the daemon logged errors: {errors:?}\n{}",
        out.run.console
    );
    assert_eq!(r.num("capacity"), size, "the namespace's size");
    assert_eq!(r.num("seed"), seed);
    let chunk = r.num("chunk") as usize;
    let offsets: Vec<u64> = r
        .get("offsets")
        .split(',')
        .map(|o| o.parse().unwrap_or_else(|e| panic!("offset {o:?}: {e}")))
        .collect();
    assert_eq!(offsets.len() as u64, r.num("writes"));
    assert_eq!(offsets.first(), Some(&0));
    assert_eq!(
        offsets.last(),
        Some(&(size - chunk as u64)),
        "the last chunk ends the disk"
    );
    let mut md5 = md5::Context::new();
    for (i, &off) in offsets.iter().enumerate() {
        let got = out.disk.read(off, chunk);
        assert!(
            got == pattern(seed.wrapping_add(i as u64), chunk),
            "chunk {i} at {off} of the NVMe backing file is not what the guest wrote"
        );
        md5.consume(&got);
    }
    assert_eq!(format!("{:x}", md5.finalize()), r.get("md5"));
    out.run
}

/// The harness end to end while the NVMe backend does not exist: the controller stays on
/// the kernel's nvme driver and corodev's file backend serves /dev/nvme0n1.
#[test]
fn corodev_serves_the_nvme_namespace_and_the_backing_file_holds_the_writes() {
    verified_load_through_corodev(Bind::Kernel, "--disk $NVME_BLK");
}

/// The NVMe backend itself: corodev takes the controller through VFIO (the guest's
/// controller on vfio-pci) and serves its namespace; every chunk the frontend wrote is in
/// the backing file.
#[test]
fn the_nvme_backend_serves_the_namespace_from_userspace() {
    verified_load_through_corodev(Bind::Vfio, "--backend nvme --pci $NVME_BDF");
}

/// A controller reset under the backend, in the middle of a load: the guest resets the
/// PCI function (function-level reset through sysfs, as a failing drive or an operator
/// would) while verify-load writes 400 chunks of 128 KiB one after another. The command in
/// flight never completes; the waiting worker's health check finds the controller
/// disabled, resets it, re-creates its queue pair and submits the command again, so the
/// load finishes with every chunk where it belongs and no request failed.
#[test]
fn a_controller_reset_during_the_load_is_recovered_and_nothing_is_lost() {
    let run = verified_load(
        Bind::Vfio,
        "--backend nvme --pci $NVME_BDF",
        "(sleep 0.4; echo 1 > /sys/bus/pci/devices/$NVME_BDF/reset) & ",
        "--count 400 --chunk 131072",
    );
    assert!(
        run.console
            .contains("it is no longer enabled (reset under us); resetting the controller"),
        "the reset was seen:\n{}",
        run.console
    );
    assert!(
        run.console
            .contains("controller reset; requests in flight are submitted again"),
        "{}",
        run.console
    );
}

/// A controller still on the kernel's driver is refused at start with one line that says
/// which driver has it and the exact commands that hand it to vfio-pci; it never listens.
#[test]
fn a_controller_not_on_vfio_pci_is_refused_with_the_commands_to_bind_it() {
    let guest = NvmeGuest {
        daemon: Some("corodev --socket $SOCK --backend nvme --pci $NVME_BDF"),
        bins: vec![corodev_musl_bin()],
        ..NvmeGuest::new(Bind::Kernel, "true")
    };
    let out = boot(&guest);
    // The guest's init gives up before the frontend: the daemon never listened.
    let r = out.run.result().expect("a result line");
    assert!(!r.passed(), "{}", out.run.console);
    assert!(
        r.get("detail").starts_with("daemon-no-socket"),
        "{}",
        out.run.console
    );
    let bdf = out.run.info().get("bdf").to_owned();
    let want = format!(
        "corodev: error: PCI device {bdf} is bound to driver 'nvme', not vfio-pci; as root: \
         modprobe vfio-pci; echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind; \
         echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; \
         echo {bdf} > /sys/bus/pci/drivers_probe"
    );
    assert!(
        out.run.console.contains(&want),
        "expected the line\n{want}\nin:\n{}",
        out.run.console
    );
}

/// Boots the NVMe guest with corodev's NVMe backend (`--backend nvme --pci $NVME_BDF` and
/// `corodev_args`) and `nvme-load ARGS` as the frontend; expects a pass, the daemon's exit
/// 0 at SIGTERM and no error in its log.
fn nvme_load(corodev_args: &str, args: &str, mem_mib: u32, trace: Vec<&str>) -> NvmeRun {
    let daemon = format!("corodev --socket $SOCK --backend nvme --pci $NVME_BDF {corodev_args}");
    let frontend = format!("nvme-load {args}");
    let guest = NvmeGuest {
        daemon: Some(&daemon),
        bins: vec![corodev_musl_bin(), guest_bin("nvme-load")],
        mem_mib,
        trace,
        ..NvmeGuest::new(Bind::Vfio, &frontend)
    };
    let out = boot(&guest);
    let r = out.run.expect_pass();
    assert_eq!(r.get("daemon"), "exit0", "{}", out.run.console);
    assert!(
        !out.run.console.contains("ERROR]"),
        "the daemon logged an error:\n{}",
        out.run.console
    );
    out
}

/// A seed from the clock: each run writes other data at other places.
fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

/// The fio-style verify workload through two virtqueues served by two worker threads (two
/// NVMe I/O queue pairs): 1500 writes at random 4 KiB-aligned offsets, 4 KiB to 1 MiB
/// (above QEMU's 512 KiB MDTS, so split), up to 96 in flight per queue (more than the
/// backend's 64 command slots per queue pair, so requests wait for slots), then the whole
/// device read back the same way and compared in the guest. The host rebuilds the image
/// from the seed and finds it in the backing file, byte for byte.
#[test]
fn many_requests_on_two_queues_land_in_the_backing_file_byte_for_byte() {
    let seed = seed();
    let writes = 1500;
    let out = nvme_load(
        "--num-queues 2 --threads 2 --queue-size 512",
        &format!("verify $SOCK --seed {seed} --writes {writes} --queues 2 --depth 96"),
        1024,
        Vec::new(),
    );
    let r = out.run.expect_pass();
    assert_eq!(r.num("seed"), seed);
    assert_eq!(r.num("writes"), writes);
    assert!(
        r.num("max_inflight") > 64 && r.num("read_max_inflight") > 64,
        "more requests in flight on a queue than the backend has command slots: {:?}",
        r.fields
    );
    let work = Workload::new(seed, r.num("capacity"), writes as usize);
    let want = work.image();
    let got = out.disk.read(0, want.len());
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        let writer = work.last_writer(at as u64);
        panic!(
            "byte {at} of the NVMe backing file is {:#04x}, want {:#04x}; last written by \
             {writer:?} (None: never written, must be zero)",
            got[at], want[at]
        );
    }
    assert_eq!(format!("{:x}", md5::compute(&got)), r.get("md5"));
}

/// Data in pieces a PRP list cannot point at (512-byte pieces mid-page, a first piece at
/// an odd address, a middle piece ending mid-page, 1 MiB in ragged pieces: nvme-load's
/// LAYOUTS) must go through the backend's bounce buffers: the guest reads each back
/// through the same pieces and through one buffer, and the host finds it in the file.
#[test]
fn buffers_a_prp_list_cannot_describe_are_bounced_intact() {
    let seed = seed();
    let out = nvme_load("", &format!("bounce $SOCK --seed {seed}"), 512, Vec::new());
    let r = out.run.expect_pass();
    let layouts: Vec<&str> = r.get("layouts").split(',').collect();
    let lens: Vec<usize> = r
        .get("lens")
        .split(',')
        .map(|l| l.parse().unwrap_or_else(|e| panic!("len {l:?}: {e}")))
        .collect();
    assert_eq!(layouts.len(), 4, "{:?}", r.fields);
    assert_eq!(lens, [4096, 8192, 256 << 10, 1 << 20]);
    for (i, (name, &len)) in layouts.iter().zip(&lens).enumerate() {
        let offset = i as u64 * (2 << 20);
        let got = out.disk.read(offset, len);
        let want = pattern(seed.wrapping_add(i as u64), len);
        if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!("layout {name}: byte {at} of its {len} at {offset} in the file differs");
        }
    }
}

/// `OFFSET+LEN` ranges of an nvme-load field.
fn ranges(r: &GuestLine, key: &str) -> Vec<(u64, u64)> {
    r.get(key)
        .split(',')
        .map(|p| {
            let (o, n) = p.split_once('+').unwrap_or_else(|| panic!("{key}: {p:?}"));
            (o.parse().expect("offset"), n.parse().expect("length"))
        })
        .collect()
}

/// FLUSH, DISCARD and WRITE_ZEROES on the NVMe backend, seen from both ends. A 1 MiB
/// region is written and flushed, two ranges discarded (one request, two segments) and
/// two zeroed (one with `unmap`), then flushed again; the guest reads zeroes in those
/// ranges and the data around them. The controller (QEMU's trace) must have received
/// one Flush per FLUSH (its write cache is volatile, so FLUSH must reach it), one
/// Deallocate per discarded range and one Write Zeroes per zeroed range, at exactly those
/// blocks (512 bytes). The backing file then holds zeroes in all four ranges: Write Zeroes
/// guarantees it, and so does Deallocate here (QEMU 7.2 reports DLFEAT 1, "reads as
/// zeroes", and with the drive's discard=unmap punches a hole in the file) — and the data
/// everywhere else in the region, nothing outside it.
#[test]
fn flush_discard_and_write_zeroes_reach_the_controller_and_the_file() {
    let seed = seed();
    let out = nvme_load(
        "",
        &format!("trim $SOCK --seed {seed}"),
        512,
        vec![
            "pci_nvme_flush_ns",
            "pci_nvme_dsm_deallocate",
            "pci_nvme_write",
        ],
    );
    let r = out.run.expect_pass();
    let console = &out.run.console;
    let flushes = console.matches("pci_nvme_flush_ns").count() as u64;
    assert_eq!(
        flushes,
        r.num("flushes"),
        "Flush commands the controller got"
    );
    let discards = ranges(r, "discards");
    let zeroes = ranges(r, "zeroes");
    let blocks = |v: &[(u64, u64)]| -> Vec<(u64, u64)> {
        v.iter().map(|&(o, n)| (o / 512, n / 512)).collect()
    };
    let deallocated: Vec<(u64, u64)> = console
        .lines()
        .filter_map(|l| {
            let rest = l.split("pci_nvme_dsm_deallocate slba ").nth(1)?;
            let (slba, nlb) = rest.split_once(" nlb ")?;
            Some((slba.trim().parse().ok()?, nlb.trim().parse().ok()?))
        })
        .collect();
    assert_eq!(
        deallocated,
        blocks(&discards),
        "Deallocate ranges (slba, nlb)"
    );
    let zeroed: Vec<(u64, u64)> = console
        .lines()
        .filter(|l| l.contains("'NVME_NVM_CMD_WRITE_ZEROES'"))
        .filter_map(|l| {
            let nlb = l.split(" nlb ").nth(1)?.split(' ').next()?.parse().ok()?;
            let lba = l.split(" lba 0x").nth(1)?.trim();
            Some((u64::from_str_radix(lba, 16).ok()?, nlb))
        })
        .collect();
    assert_eq!(zeroed, blocks(&zeroes), "Write Zeroes ranges (slba, nlb)");

    let (region, len) = (r.num("region"), r.num("len") as usize);
    let mut want = pattern(seed, len);
    for &(o, n) in discards.iter().chain(&zeroes) {
        want[(o - region) as usize..(o - region + n) as usize].fill(0);
    }
    let got = out.disk.read(region, len);
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        let off = region + at as u64;
        let what = if discards.iter().any(|&(o, n)| (o..o + n).contains(&off)) {
            "discarded, must read as zero"
        } else if zeroes.iter().any(|&(o, n)| (o..o + n).contains(&off)) {
            "write-zeroed, must read as zero"
        } else {
            "written data next to the ranges"
        };
        panic!(
            "byte {off} of the file ({what}) is {:#04x}, want {:#04x}",
            got[at], want[at]
        );
    }
    let size = std::fs::metadata(&out.disk.path)
        .expect("the backing file")
        .len();
    for (from, to) in [(0, region), (region + len as u64, size)] {
        assert!(
            out.disk
                .read(from, (to - from) as usize)
                .iter()
                .all(|&b| b == 0),
            "nothing written outside the region: bytes {from}..{to}"
        );
    }
}

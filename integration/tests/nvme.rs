//! The NVMe test environment of issue 16 (userspace NVMe backend over VFIO), proved before
//! the backend exists: a TCG guest with QEMU's intel-iommu hands its emulated NVMe
//! controller to vfio-pci and a userspace program drives it through the `vfio-ioctls`
//! crate (`nvme-probe`: registers, DMA, MSI-X), and corodev inside the guest serves that controller's namespace to
//! a verifying frontend (`verify-load`), whose writes the host then finds in the NVMe
//! backing file. [`verified_load_through_corodev`] is the check the NVMe backend's test
//! will run with `--backend nvme --pci $NVME_BDF` on [`Bind::Vfio`].

use integration::frontend::pattern;
use integration::nvme::{boot, guest_bin, Bind, NvmeGuest};
use integration::server::corodev_musl_bin;
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

//! Feasibility probe for corodev's NVMe-over-VFIO backend, run inside the NVMe test guest
//! (`scripts/nvme-guest.sh`, integration/tests/nvme.rs): opens one PCI function already
//! bound to vfio-pci through the `vfio-ioctls` crate (legacy container and group, type1
//! IOMMU), reads BAR0's CAP and VS registers both with `pread` on the device fd and
//! through an `mmap` of BAR0, DMA-maps a memfd buffer at IOVA = its virtual address
//! (what the backend does with guest memory), and proves the mapping works by making the
//! controller DMA through it: admin queues in that buffer, Identify Controller and
//! Identify Namespace 1 polled to completion, each of which must also raise MSI-X vector 0
//! on an eventfd (interrupt delivery through the IOMMU's interrupt remapping). Prints one line of fields,
//! which the guest's init puts on its result line (scripts/nvme-guest-init.sh),
//!
//! `cap=0x.. mqes=.. cqr=.. dstrd=.. to=.. css=0x.. mpsmin=.. mpsmax=.. vs=0x.. vs_major=..
//!  vs_minor=.. vs_tertiary=.. bar0_size=.. bar0_mmap=yes iova=0x.. sn=.. mn=.. nn=..
//!  ns1_nsze=.. ns1_lbads=.. msix_irqs=..`
//!
//! or `detail=..` and exit status 1. Values never contain blanks.
//!
//! Boundary: a probe, not a driver. It leaves the controller disabled and the buffer
//! unmapped; queue setup beyond the admin pair, interrupts and I/O are the backend's.
//!
//! Usage: `nvme-probe DDDD:BB:DD.F`

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioOps};
use vmm_sys_util::eventfd::EventFd;

/// NVMe 1.4 controller registers (section 3.1, "Register Definition"), byte offsets in BAR0.
const REG_CAP: usize = 0x00;
const REG_VS: usize = 0x08;
const REG_CC: usize = 0x14;
const REG_CSTS: usize = 0x1c;
const REG_AQA: usize = 0x24;
const REG_ASQ: usize = 0x28;
const REG_ACQ: usize = 0x30;
/// PCI configuration space: the Command register and its Memory Space and Bus Master bits.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Doorbells start here; SQ y's tail is at 0x1000 + 2y * (4 << CAP.DSTRD), CQ y's head one
/// stride later.
const DOORBELLS: usize = 0x1000;

/// Admin queue depth: two commands are all the probe sends.
const ADMIN_DEPTH: usize = 8;
const PAGE: usize = 4096;
/// The DMA buffer: page 0 the admin SQ, page 1 the admin CQ, page 2 Identify Controller's
/// data, page 3 Identify Namespace's.
const DMA_LEN: usize = 4 * PAGE;

/// Why the probe failed; each variant carries what is needed to tell where.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("usage: nvme-probe DDDD:BB:DD.F (a PCI function bound to vfio-pci)")]
    Usage,
    #[error("VFIO container (/dev/vfio/vfio, type1 v2 IOMMU): {0}")]
    Container(VfioError),
    #[error("VFIO device {path}: {source}")]
    Device { path: PathBuf, source: VfioError },
    #[error("BAR0 of {size} bytes is too small for the registers and admin doorbells")]
    Bar0TooSmall { size: u64 },
    #[error("BAR0 is not mmap-able (region flags {flags:#x})")]
    Bar0NotMappable { flags: u32 },
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("pread CAP {pread:#x} differs from the mmap read {mmap:#x}")]
    CapMismatch { pread: u64, mmap: u64 },
    #[error("DMA map of {len} bytes at IOVA {iova:#x}: {source}")]
    DmaMap {
        iova: u64,
        len: usize,
        source: VfioError,
    },
    #[error("DMA unmap at IOVA {iova:#x}: {source}")]
    DmaUnmap { iova: u64, source: VfioError },
    #[error("CSTS.RDY did not become {want} within {ms} ms (CSTS {csts:#x})")]
    ReadyTimeout { want: u32, ms: u64, csts: u32 },
    #[error("controller fatal status (CSTS {csts:#x})")]
    Fatal { csts: u32 },
    #[error("admin command {opcode:#x} got no completion within {ms} ms")]
    CommandTimeout { opcode: u8, ms: u64 },
    #[error("enabling MSI-X vector 0 on an eventfd: {0}")]
    Msix(VfioError),
    #[error("admin command {opcode:#x} completed but raised no MSI-X interrupt within {ms} ms")]
    NoInterrupt { opcode: u8, ms: u64 },
    #[error("admin command {opcode:#x} failed: status field {status:#x}")]
    CommandFailed { opcode: u8, status: u16 },
}

/// BAR0 mapped into this process: every register access is a volatile access of its width,
/// as the NVMe spec requires for MMIO (no merged or torn accesses).
struct Bar0 {
    ptr: *mut u8,
    len: usize,
}

impl Bar0 {
    fn map(dev: &VfioDevice, len: usize) -> Result<Bar0, ProbeError> {
        let flags = dev.get_region_flags(VFIO_PCI_BAR0_REGION_INDEX);
        if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(ProbeError::Bar0NotMappable { flags });
        }
        let offset = libc::off_t::try_from(dev.get_region_offset(VFIO_PCI_BAR0_REGION_INDEX))
            .expect("vfio-pci region offsets fit off_t (index << 40)");
        // SAFETY: a new shared mapping of the device fd at BAR0's region offset; the kernel
        // checks offset and length against the region and its mmap-able areas; the result
        // is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                dev.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(ProbeError::Os {
                what: "mmap BAR0",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Bar0 {
            ptr: ptr.cast(),
            len,
        })
    }

    fn read32(&self, off: usize) -> u32 {
        assert!(
            off % 4 == 0 && off + 4 <= self.len,
            "BAR0 read32 at {off:#x}"
        );
        // SAFETY: in bounds and aligned (checked above) of a live mapping owned by self.
        unsafe { self.ptr.add(off).cast::<u32>().read_volatile() }
    }

    fn read64(&self, off: usize) -> u64 {
        assert!(
            off % 8 == 0 && off + 8 <= self.len,
            "BAR0 read64 at {off:#x}"
        );
        // SAFETY: in bounds and aligned (checked above) of a live mapping owned by self.
        unsafe { self.ptr.add(off).cast::<u64>().read_volatile() }
    }

    fn write32(&self, off: usize, value: u32) {
        assert!(
            off % 4 == 0 && off + 4 <= self.len,
            "BAR0 write32 at {off:#x}"
        );
        // SAFETY: in bounds and aligned (checked above) of a live mapping owned by self.
        unsafe { self.ptr.add(off).cast::<u32>().write_volatile(value) }
    }

    /// A 64-bit register as two 32-bit writes, low half first (what Linux's nvme driver
    /// does with lo_hi_writeq for ASQ and ACQ).
    fn write64(&self, off: usize, value: u64) {
        self.write32(off, value as u32);
        self.write32(off + 4, (value >> 32) as u32);
    }
}

impl Drop for Bar0 {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` made; nothing refers to it after drop.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Memory the controller reads and writes by DMA: a shared mapping of a memfd, the kind of
/// memory the backend maps (a vhost-user frontend's guest RAM is one), so the probe proves
/// that type1 pins it. Only raw-pointer volatile accesses touch it (never a reference), as
/// `VfioOps::vfio_dma_map` requires.
struct DmaBuf {
    ptr: *mut u8,
    len: usize,
}

impl DmaBuf {
    fn new(len: usize) -> Result<DmaBuf, ProbeError> {
        let os = |what| move |source| ProbeError::Os { what, source };
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"nvme-probe-dma".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(os("size the memfd"))?;
        // SAFETY: a new shared mapping of our memfd, `len` bytes as just sized; the result is
        // checked. The mapping outlives `file` (closing an fd does not unmap).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(ProbeError::Os {
                what: "mmap the DMA buffer",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(DmaBuf {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The buffer's virtual address, which is also its IOVA.
    fn addr(&self) -> u64 {
        self.ptr as u64
    }

    fn write32(&self, off: usize, value: u32) {
        assert!(off % 4 == 0 && off + 4 <= self.len, "DMA write at {off:#x}");
        // SAFETY: in bounds and aligned of our live mapping; volatile, as the device may
        // access the same memory at any time.
        unsafe { self.ptr.add(off).cast::<u32>().write_volatile(value) }
    }

    fn read32(&self, off: usize) -> u32 {
        assert!(off % 4 == 0 && off + 4 <= self.len, "DMA read at {off:#x}");
        // SAFETY: as in write32.
        unsafe { self.ptr.add(off).cast::<u32>().read_volatile() }
    }

    fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        (off..off + len)
            .map(|i| {
                assert!(i < self.len, "DMA read at {i:#x}");
                // SAFETY: in bounds of our live mapping; volatile as in write32.
                unsafe { self.ptr.add(i).read_volatile() }
            })
            .collect()
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made, after the DMA mapping is gone
        // (main unmaps it first, or the container's close drops it).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The admin queue pair in a [`DmaBuf`] and the state to submit to it and reap from it.
struct Admin<'a> {
    bar: &'a Bar0,
    buf: &'a DmaBuf,
    /// MSI-X vector 0's eventfd: the admin CQ's interrupt.
    irq: &'a EventFd,
    irqs: u64,
    stride: usize,
    timeout: Duration,
    sq_tail: usize,
    cq_head: usize,
    phase: u32,
    next_cid: u16,
}

impl Admin<'_> {
    /// Submits one admin command (a 64-byte SQ entry: `cdw0` opcode, `nsid`, PRP1 and
    /// CDW10) and polls the CQ until its completion arrives, then waits for its interrupt;
    /// returns Err on a non-zero status, or without a completion after `timeout` or an
    /// interrupt 1 s after it. Polls rather than sleeps on the interrupt so that a broken
    /// interrupt path is told apart from a broken DMA path.
    fn run(&mut self, opcode: u8, nsid: u32, prp1: u64, cdw10: u32) -> Result<(), ProbeError> {
        let cid = self.next_cid;
        self.next_cid += 1;
        let sqe = self.sq_tail * 64;
        for dw in 0..16 {
            self.buf.write32(sqe + dw * 4, 0);
        }
        self.buf
            .write32(sqe, u32::from(opcode) | (u32::from(cid) << 16));
        self.buf.write32(sqe + 4, nsid);
        self.buf.write32(sqe + 24, prp1 as u32);
        self.buf.write32(sqe + 28, (prp1 >> 32) as u32);
        self.buf.write32(sqe + 40, cdw10);
        self.sq_tail = (self.sq_tail + 1) % ADMIN_DEPTH;
        // The SQ entry must be in memory before the doorbell write makes it visible.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.bar.write32(DOORBELLS, self.sq_tail as u32);

        let started = Instant::now();
        let cqe = PAGE + self.cq_head * 16;
        loop {
            // CQE dword 3: command id (15:0), phase tag (16), status field (31:17).
            let dw3 = self.buf.read32(cqe + 12);
            if (dw3 >> 16) & 1 == self.phase {
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                self.cq_head += 1;
                if self.cq_head == ADMIN_DEPTH {
                    self.cq_head = 0;
                    self.phase ^= 1;
                }
                self.bar
                    .write32(DOORBELLS + self.stride, self.cq_head as u32);
                let status = (dw3 >> 17) as u16;
                if status != 0 || (dw3 & 0xffff) as u16 != cid {
                    return Err(ProbeError::CommandFailed { opcode, status });
                }
                return self.wait_irq(opcode);
            }
            if started.elapsed() > self.timeout {
                return Err(ProbeError::CommandTimeout {
                    opcode,
                    ms: self.timeout.as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Waits up to 1 s for the admin CQ's interrupt and consumes it.
    fn wait_irq(&mut self, opcode: u8) -> Result<(), ProbeError> {
        let ms = 1000;
        let mut pfd = libc::pollfd {
            fd: self.irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one valid pollfd that lives across the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms as i32) };
        match self.irq.read() {
            Ok(n) if ready == 1 => {
                self.irqs += n;
                Ok(())
            }
            _ => Err(ProbeError::NoInterrupt { opcode, ms }),
        }
    }
}

/// Waits until CSTS.RDY is `want`, for at most CAP.TO (in 500 ms units).
fn wait_ready(bar: &Bar0, want: u32, timeout: Duration) -> Result<(), ProbeError> {
    let started = Instant::now();
    loop {
        let csts = bar.read32(REG_CSTS);
        if csts & 2 != 0 {
            return Err(ProbeError::Fatal { csts });
        }
        if csts & 1 == want {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(ProbeError::ReadyTimeout {
                want,
                ms: timeout.as_millis() as u64,
                csts,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An Identify string field (space padded ASCII) as one word: blanks and '=' become '_'.
fn word(bytes: &[u8]) -> String {
    let s: String = bytes
        .iter()
        .map(|&b| match b {
            b' ' | b'=' => '_',
            0x21..=0x7e => b as char,
            _ => '?',
        })
        .collect();
    s.trim_end_matches('_').to_owned()
}

fn probe(bdf: &str) -> Result<String, ProbeError> {
    let path = PathBuf::from(format!("/sys/bus/pci/devices/{bdf}"));
    let container = Arc::new(VfioContainer::new(None).map_err(ProbeError::Container)?);
    // Opening the device through its group: the group joins the container, which then
    // sets up the type1 v2 IOMMU; vfio-pci resets the function on open.
    let dev =
        VfioDevice::new(&path, container.clone() as Arc<dyn VfioOps>, false).map_err(|source| {
            ProbeError::Device {
                path: path.clone(),
                source,
            }
        })?;

    let bar0_size = dev.get_region_size(VFIO_PCI_BAR0_REGION_INDEX);
    let map_len = 2 * PAGE; // registers and the first doorbells
    if bar0_size < map_len as u64 {
        return Err(ProbeError::Bar0TooSmall { size: bar0_size });
    }
    let mut raw = [0u8; 8];
    dev.region_read(VFIO_PCI_BAR0_REGION_INDEX, &mut raw, REG_CAP as u64);
    let cap_pread = u64::from_le_bytes(raw);
    let bar = Bar0::map(&dev, map_len)?;
    let cap = bar.read64(REG_CAP);
    if cap != cap_pread {
        return Err(ProbeError::CapMismatch {
            pread: cap_pread,
            mmap: cap,
        });
    }
    let vs = bar.read32(REG_VS);

    let mqes = cap & 0xffff;
    let cqr = (cap >> 16) & 1;
    let to = (cap >> 24) & 0xff;
    let dstrd = (cap >> 32) & 0xf;
    let css = (cap >> 37) & 0xff;
    let mpsmin = (cap >> 48) & 0xf;
    let mpsmax = (cap >> 52) & 0xf;
    let stride = 4usize << dstrd;
    let timeout = Duration::from_millis(500 * to.max(1));

    // vfio-pci leaves bus mastering off: without it the controller's DMA goes nowhere and
    // no command ever completes. Memory Space is on already (the pread above worked) but
    // is set too, as a driver must not rely on that.
    let mut cmd = [0u8; 2];
    dev.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut cmd, PCI_COMMAND);
    let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
    dev.region_write(
        VFIO_PCI_CONFIG_REGION_INDEX,
        &cmd.to_le_bytes(),
        PCI_COMMAND,
    );

    // One vector: the admin CQ's (vector 0; admin interrupts are always enabled).
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| ProbeError::Os {
        what: "eventfd",
        source,
    })?;
    dev.enable_msix(vec![&irq]).map_err(ProbeError::Msix)?;

    let buf = DmaBuf::new(DMA_LEN)?;
    let iova = buf.addr();
    // SAFETY: `buf` is our memfd mapping of DMA_LEN bytes, alive until after the unmap
    // below; only volatile raw-pointer accesses touch it (DmaBuf has no references out).
    unsafe { container.vfio_dma_map(iova, DMA_LEN, buf.ptr) }.map_err(|source| {
        ProbeError::DmaMap {
            iova,
            len: DMA_LEN,
            source,
        }
    })?;

    // NVMe 1.4 section 7.6.1, controller initialisation: disable, wait RDY=0, admin queue
    // attributes and addresses, then CC with EN=1, 4 KiB pages (MPS 0), the NVM command set,
    // 64-byte SQ entries (IOSQES 6) and 16-byte CQ entries (IOCQES 4); wait RDY=1.
    bar.write32(REG_CC, 0);
    wait_ready(&bar, 0, timeout)?;
    let depth = (ADMIN_DEPTH - 1) as u32;
    bar.write32(REG_AQA, depth | (depth << 16));
    bar.write64(REG_ASQ, iova);
    bar.write64(REG_ACQ, iova + PAGE as u64);
    bar.write32(REG_CC, 1 | (6 << 16) | (4 << 20));
    wait_ready(&bar, 1, timeout)?;

    let mut admin = Admin {
        bar: &bar,
        buf: &buf,
        irq: &irq,
        irqs: 0,
        stride,
        timeout,
        sq_tail: 0,
        cq_head: 0,
        phase: 1,
        next_cid: 1,
    };
    // Identify (opcode 06h): CNS 1 the controller, CNS 0 namespace NSID.
    admin.run(0x06, 0, iova + 2 * PAGE as u64, 1)?;
    admin.run(0x06, 1, iova + 3 * PAGE as u64, 0)?;
    let ctrl = 2 * PAGE;
    let sn = word(&buf.bytes(ctrl + 4, 20));
    let mn = word(&buf.bytes(ctrl + 24, 40));
    let nn = buf.read32(ctrl + 516);
    let ns = 3 * PAGE;
    let nsze = u64::from(buf.read32(ns)) | (u64::from(buf.read32(ns + 4)) << 32);
    // FLBAS (byte 26) bits 3:0 pick the LBA format; LBAF[n] at 128 + 4n, LBADS in 23:16.
    let flbas = buf.bytes(ns + 26, 1)[0] as usize & 0xf;
    let lbads = (buf.read32(ns + 128 + 4 * flbas) >> 16) & 0xff;

    let msix_irqs = admin.irqs;

    bar.write32(REG_CC, 0);
    wait_ready(&bar, 0, timeout)?;
    dev.disable_msix().map_err(ProbeError::Msix)?;
    container
        .vfio_dma_unmap(iova, DMA_LEN)
        .map_err(|source| ProbeError::DmaUnmap { iova, source })?;

    Ok(format!(
        "cap={cap:#x} mqes={mqes} cqr={cqr} dstrd={dstrd} to={to} css={css:#x} \
         mpsmin={mpsmin} mpsmax={mpsmax} vs={vs:#x} vs_major={} vs_minor={} vs_tertiary={} \
         bar0_size={bar0_size} bar0_mmap=yes iova={iova:#x} sn={sn} mn={mn} nn={nn} \
         ns1_nsze={nsze} ns1_lbads={lbads} msix_irqs={msix_irqs}",
        vs >> 16,
        (vs >> 8) & 0xff,
        vs & 0xff,
    ))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let result = match (args.next(), args.next()) {
        (Some(bdf), None) => probe(&bdf),
        _ => Err(ProbeError::Usage),
    };
    match result {
        Ok(fields) => println!("{fields}"),
        Err(e) => {
            let detail: String = e
                .to_string()
                .chars()
                .map(|c| if c == ' ' || c == '=' { '_' } else { c })
                .collect();
            println!("detail={detail}");
            std::process::exit(1);
        }
    }
}

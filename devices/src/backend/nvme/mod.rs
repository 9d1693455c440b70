//! The NVMe backend: a local NVMe controller driven from userspace through VFIO, as SPDK's
//! bdev_nvme and QEMU's `nvme://` do, with no kernel block layer in between.
//!
//! - [`spec`]: the registers, entries and commands of NVMe 1.4 that are used.
//! - [`pci`]: the PCI function through VFIO (binding check, BAR0, MSI-X).
//! - [`controller`]: reset, admin queue, Identify, queue creation.
//! - [`queue`]: a queue pair's rings; [`io`]: a worker's queue pair and its waiters.
//! - [`prp`]: pointing a command at its data; [`dma`]: DMA memory of the backend's own.
//!
//! **Zero copy.** Guest memory is mapped in the IOMMU when the frontend sends its memory
//! table ([`BlockBackend::guest_memory`]), at IOVA = the address this process maps it at,
//! so a guest buffer's address is its PRP entry. Buffers a PRP list cannot describe (a
//! piece that does not start or end on a page where it must) are copied through the
//! command slot's bounce buffer. The IOMMU is also the guard: the controller can reach
//! guest memory and the backend's own rings and buffers, nothing else of the process.
//!
//! **One queue pair per worker** ([`io`]), created on the worker's first request: no lock
//! on the data path. Completions arrive on the queue's MSI-X vector (an eventfd the worker
//! waits on through io_uring), so an idle disk costs no CPU.

mod controller;
mod dma;
mod io;
mod pci;
mod prp;
mod queue;
mod spec;

use std::io as stdio;
use std::sync::{Arc, Mutex, PoisonError};

use super::{BlockBackend, GuestBuffers, Topology};
use controller::Controller;
use spec::{nvm, Command};

pub use pci::parse_address;

/// Why an NVMe controller cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// No such PCI function.
    #[error("no PCI device {0} (see lspci -D)")]
    NoDevice(String),
    /// The function is bound to another driver (or none).
    #[error(
        "PCI device {address} is bound to driver '{driver}', not vfio-pci; as root: \
         modprobe vfio-pci; echo {address} > /sys/bus/pci/devices/{address}/driver/unbind; \
         echo vfio-pci > /sys/bus/pci/devices/{address}/driver_override; \
         echo {address} > /sys/bus/pci/drivers_probe"
    )]
    NotVfio {
        /// The function.
        address: String,
        /// Its driver now.
        driver: String,
    },
    /// A VFIO operation failed.
    #[error("NVMe {address}: {what}: {detail}")]
    Vfio {
        /// The function.
        address: String,
        /// What was being done.
        what: &'static str,
        /// VFIO's error.
        detail: String,
    },
    /// A system call failed.
    #[error("NVMe {address}: {what}: {source}")]
    Io {
        /// The function.
        address: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: stdio::Error,
    },
    /// The function has too few MSI-X vectors.
    #[error("NVMe {address}: {available} MSI-X vector(s); corodev needs at least 2")]
    Interrupts {
        /// The function.
        address: String,
        /// Vectors it has.
        available: u32,
    },
    /// The controller misbehaves or cannot serve.
    #[error("NVMe {address}: {why}")]
    Controller {
        /// The function.
        address: String,
        /// What is wrong.
        why: String,
    },
}

/// A namespace of an NVMe controller bound to vfio-pci.
pub struct NvmeBackend {
    ctrl: Arc<Controller>,
    size: u64,
    block: u64,
    /// Most bytes one command moves.
    max_transfer: u64,
    /// Guest memory regions mapped for DMA: (address, length).
    mapped: Mutex<Vec<(u64, u64)>>,
}

impl NvmeBackend {
    /// Takes over the controller at PCI `address` (`DDDD:BB:DD.F`, bound to vfio-pci)
    /// and serves its namespace `nsid`.
    pub fn open(address: &str, nsid: u32) -> Result<NvmeBackend, NvmeError> {
        let ctrl = Controller::start(address, nsid)?;
        let block = u64::from(ctrl.namespace.block_size);
        let mdts_pages = match ctrl.identify.mdts {
            0 => usize::MAX,
            m => (ctrl.cap.min_page / spec::PAGE) << m,
        };
        log::info!(
            "NVMe {address}: NVMe {}.{} controller, namespace {nsid}: {} blocks of {block} \
             bytes; {}write cache; discard {}, write zeroes {}",
            ctrl.version.0,
            ctrl.version.1,
            ctrl.namespace.blocks,
            if ctrl.identify.volatile_write_cache {
                "volatile "
            } else {
                "no "
            },
            if ctrl.identify.dsm { "yes" } else { "no" },
            if ctrl.identify.write_zeroes {
                "yes"
            } else {
                "no"
            },
        );
        Ok(NvmeBackend {
            size: ctrl.namespace.blocks * block,
            max_transfer: prp::max_transfer(mdts_pages, block),
            block,
            ctrl,
            mapped: Mutex::new(Vec::new()),
        })
    }

    fn check(&self, offset: u64, len: u64) -> stdio::Result<()> {
        if offset % self.block != 0 || len % self.block != 0 {
            return Err(stdio::Error::new(
                stdio::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} are not whole {}-byte blocks",
                    self.block
                ),
            ));
        }
        Ok(())
    }

    /// Reads or writes `bufs` at `offset`: straight from and into guest memory when a
    /// PRP list can describe it, else through bounce buffers.
    fn transfer(&self, opcode: u8, bufs: &GuestBuffers<'_>, offset: u64) -> stdio::Result<()> {
        let total = bufs.len();
        self.check(offset, total)?;
        let q = io::queue(&self.ctrl)?;
        let nsid = self.ctrl.nsid;
        let segs: smallvec::SmallVec<[(u64, u64); 16]> = bufs
            .iovecs()
            .iter()
            .map(|v| (v.iov_base as u64, v.iov_len as u64))
            .collect();
        let direct = prp::direct(&segs);
        let chunk = if direct {
            self.max_transfer
        } else {
            self.max_transfer.min(io::BOUNCE as u64)
        };
        let mut done = 0;
        while done < total {
            let len = (total - done).min(chunk);
            let lba = (offset + done) / self.block;
            let blocks = (len / self.block) as u32;
            let cmd = Command::rw(opcode, nsid, lba, blocks);
            if direct {
                q.execute(
                    |mem| {
                        // SAFETY: the slot's list page is ours until its command completes.
                        let prps = unsafe { prp::build(&segs, done, len, mem.list, mem.list_iova) };
                        let (p1, p2) = prps.unwrap_or((0, 0));
                        cmd.prps(p1, p2)
                    },
                    |_, _| (),
                )?;
            } else {
                q.execute(
                    |mem| {
                        if opcode == nvm::WRITE {
                            // SAFETY: the slot's bounce buffer is no command's while the
                            // slot is being filled; `len` <= its size.
                            let dst =
                                unsafe { std::slice::from_raw_parts_mut(mem.bounce, len as usize) };
                            bufs.copy_to_at(done, dst);
                        }
                        let segs = [(mem.bounce_iova, BOUNCE_ALIGNED)];
                        // SAFETY: as for the direct case.
                        let prps = unsafe { prp::build(&segs, 0, len, mem.list, mem.list_iova) };
                        let (p1, p2) = prps.unwrap_or((0, 0));
                        cmd.prps(p1, p2)
                    },
                    |mem, c| {
                        if opcode == nvm::READ && c.status == 0 {
                            // SAFETY: the command completed: the controller no longer
                            // writes the bounce buffer, whose first `len` bytes it filled.
                            let src =
                                unsafe { std::slice::from_raw_parts(mem.bounce, len as usize) };
                            bufs.copy_from_at(done, src);
                        }
                    },
                )?;
            }
            done += len;
        }
        Ok(())
    }
}

/// The bounce buffer as one segment, for [`prp::build`].
const BOUNCE_ALIGNED: u64 = io::BOUNCE as u64;

impl BlockBackend for NvmeBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn topology(&self) -> Topology {
        Topology {
            logical_block_size: self.block as u32,
            physical_block_size: self.block as u32,
            min_io_size: 0,
            opt_io_size: 0,
        }
    }

    fn is_block_device(&self) -> bool {
        true
    }

    /// What Identify Controller says: FLUSH reaches the drive only with a volatile cache.
    fn writeback_cache(&self) -> bool {
        self.ctrl.identify.volatile_write_cache
    }

    fn read_vectored(&self, bufs: &GuestBuffers<'_>, offset: u64) -> stdio::Result<()> {
        self.transfer(nvm::READ, bufs, offset)
    }

    fn write_vectored(&self, bufs: &GuestBuffers<'_>, offset: u64) -> stdio::Result<()> {
        self.transfer(nvm::WRITE, bufs, offset)
    }

    fn flush(&self) -> stdio::Result<()> {
        if !self.ctrl.identify.volatile_write_cache {
            return Ok(());
        }
        let q = io::queue(&self.ctrl)?;
        q.execute(|_| Command::new(nvm::FLUSH, self.ctrl.nsid), |_, _| ())
    }

    /// Dataset Management (deallocate), one range of up to 2^32 - 1 blocks per command;
    /// nothing when the controller has no Dataset Management (virtio lets discard be
    /// ignored).
    fn discard(&self, offset: u64, len: u64) -> stdio::Result<()> {
        self.check(offset, len)?;
        if !self.ctrl.identify.dsm {
            return Ok(());
        }
        let q = io::queue(&self.ctrl)?;
        let mut lba = offset / self.block;
        let mut left = len / self.block;
        while left > 0 {
            let blocks = left.min(u64::from(u32::MAX));
            q.execute(
                |mem| {
                    // The range goes in the slot's list page: context attributes, length
                    // in blocks, starting LBA (NVMe 1.4, figure 358).
                    let range = mem.list.cast::<u32>();
                    // SAFETY: the slot's page is ours until the command completes; 4
                    // dwords fit in it.
                    unsafe {
                        range.write_volatile(0);
                        range.add(1).write_volatile(blocks as u32);
                        range.add(2).write_volatile(lba as u32);
                        range.add(3).write_volatile((lba >> 32) as u32);
                    }
                    Command::deallocate(self.ctrl.nsid, 1).prps(mem.list_iova, 0)
                },
                |_, _| (),
            )?;
            lba += blocks;
            left -= blocks;
        }
        Ok(())
    }

    /// Write Zeroes (65536 blocks per command), or zeroed bounce buffers written when the
    /// controller lacks it.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> stdio::Result<()> {
        self.check(offset, len)?;
        let q = io::queue(&self.ctrl)?;
        let nsid = self.ctrl.nsid;
        let per = if self.ctrl.identify.write_zeroes {
            65536 * self.block
        } else {
            self.max_transfer.min(BOUNCE_ALIGNED)
        };
        let mut done = 0;
        while done < len {
            let n = (len - done).min(per);
            let lba = (offset + done) / self.block;
            let blocks = (n / self.block) as u32;
            if self.ctrl.identify.write_zeroes {
                q.execute(
                    |_| Command::write_zeroes(nsid, lba, blocks, may_unmap),
                    |_, _| (),
                )?;
            } else {
                q.execute(
                    |mem| {
                        // SAFETY: the slot's bounce buffer is ours while it is filled.
                        unsafe { std::ptr::write_bytes(mem.bounce, 0, n as usize) };
                        let segs = [(mem.bounce_iova, BOUNCE_ALIGNED)];
                        // SAFETY: the slot's list page is ours until completion.
                        let prps = unsafe { prp::build(&segs, 0, n, mem.list, mem.list_iova) };
                        let (p1, p2) = prps.unwrap_or((0, 0));
                        Command::rw(nvm::WRITE, nsid, lba, blocks).prps(p1, p2)
                    },
                    |_, _| (),
                )?;
            }
            done += n;
        }
        Ok(())
    }

    /// Maps the new regions for DMA at IOVA = their address and unmaps those gone.
    fn guest_memory(&self, regions: &[(u64, u64)]) -> stdio::Result<()> {
        let mut mapped = self.mapped.lock().unwrap_or_else(PoisonError::into_inner);
        let container = &self.ctrl.function.container;
        for &(addr, len) in mapped.iter().filter(|r| !regions.contains(r)) {
            if let Err(e) = container.vfio_dma_unmap(addr, len as usize) {
                log::error!("NVMe: unmapping guest memory at {addr:#x}: {e}");
            }
        }
        mapped.retain(|r| regions.contains(r));
        for &(addr, len) in regions {
            if mapped.contains(&(addr, len)) {
                continue;
            }
            // SAFETY: [addr, addr + len) is a guest memory region this process maps for
            // the frontend; the controller may read and write it as the guest's own
            // devices may, and the daemon only accesses guest memory through volatile or
            // copying accessors. It is unmapped here before the region is.
            unsafe { container.vfio_dma_map(addr, len as usize, addr as *mut u8) }.map_err(
                |e| stdio::Error::other(format!("mapping guest memory at {addr:#x} for DMA: {e}")),
            )?;
            mapped.push((addr, len));
        }
        Ok(())
    }
}

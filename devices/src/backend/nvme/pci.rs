//! The NVMe controller as a PCI function owned through VFIO: the checks that it is bound
//! to `vfio-pci` (with the commands to bind it when it is not), bus mastering, BAR0's
//! registers and doorbells mapped into this process, and MSI-X vectors delivered to
//! eventfds.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};
use vmm_sys_util::eventfd::EventFd;

use super::NvmeError;

/// PCI command register: memory space and bus master enable.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// A PCI address as sysfs spells it, `DDDD:BB:DD.F`.
pub fn parse_address(s: &str) -> Option<String> {
    let (domain, rest) = s.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    let hex = |t: &str, n: usize| t.len() == n && t.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(domain, 4) && hex(bus, 2) && hex(dev, 2) && hex(func, 1)).then(|| s.to_ascii_lowercase())
}

/// The function's sysfs directory, after checking that `vfio-pci` drives it.
fn bound_to_vfio(address: &str) -> Result<PathBuf, NvmeError> {
    let sysfs = Path::new("/sys/bus/pci/devices").join(address);
    if !sysfs.exists() {
        return Err(NvmeError::NoDevice(address.to_owned()));
    }
    let driver = std::fs::read_link(sysfs.join("driver"))
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
    if driver.as_deref() != Some("vfio-pci") {
        return Err(NvmeError::NotVfio {
            address: address.to_owned(),
            driver: driver.unwrap_or_else(|| "none".into()),
        });
    }
    Ok(sysfs)
}

/// BAR0's registers and doorbells, mapped.
pub struct Bar {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: MMIO registers accessed only with volatile reads and writes of naturally
// aligned words; the controller defines what concurrent accesses do.
unsafe impl Send for Bar {}
// SAFETY: see `Send`.
unsafe impl Sync for Bar {}

impl Bar {
    /// Reads the 32-bit register at `offset`.
    pub fn read32(&self, offset: usize) -> u32 {
        assert!(
            offset + 4 <= self.len && offset % 4 == 0,
            "register {offset:#x}"
        );
        // SAFETY: in bounds and aligned (checked), in a live MMIO mapping.
        unsafe { self.ptr.add(offset).cast::<u32>().read_volatile() }
    }

    /// Reads the 64-bit register at `offset` (two dword reads, low first, as the spec
    /// allows for CAP, ASQ and ACQ).
    pub fn read64(&self, offset: usize) -> u64 {
        u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32)
    }

    /// Writes the 32-bit register or doorbell at `offset`.
    pub fn write32(&self, offset: usize, value: u32) {
        assert!(
            offset + 4 <= self.len && offset % 4 == 0,
            "register {offset:#x}"
        );
        // SAFETY: in bounds and aligned (checked), in a live MMIO mapping.
        unsafe { self.ptr.add(offset).cast::<u32>().write_volatile(value) }
    }

    /// Writes the 64-bit register at `offset`, low dword first.
    pub fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made and owns.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The controller's PCI function, opened through VFIO. The device is closed before the
/// container (field order), so its group can leave the container.
pub struct Function {
    /// The VFIO device (regions, interrupts).
    pub device: VfioDevice,
    /// The IOMMU context every DMA mapping goes into.
    pub container: Arc<VfioContainer>,
    /// `DDDD:BB:DD.F`.
    pub address: String,
}

impl Function {
    /// Opens the function at `address` (bound to `vfio-pci`) and turns on memory space
    /// and bus mastering.
    pub fn open(address: &str) -> Result<Function, NvmeError> {
        let sysfs = bound_to_vfio(address)?;
        let vfio = |what: &'static str| {
            let address = address.to_owned();
            move |e: vfio_ioctls::VfioError| NvmeError::Vfio {
                address,
                what,
                detail: e.to_string(),
            }
        };
        let container = Arc::new(VfioContainer::new(None).map_err(vfio("opening /dev/vfio/vfio"))?);
        let device = VfioDevice::new(&sysfs, container.clone() as Arc<dyn VfioOps>, false)
            .map_err(vfio(
                "opening the device (is its IOMMU group viable and not in use?)",
            ))?;
        let f = Function {
            container,
            device,
            address: address.to_owned(),
        };
        let mut cmd = [0u8; 2];
        f.device
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut cmd, PCI_COMMAND);
        let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        f.device.region_write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            &cmd.to_le_bytes(),
            PCI_COMMAND,
        );
        Ok(f)
    }

    /// The CAP register, read through the VFIO region (before BAR0 is mapped: its
    /// doorbell stride says how much to map).
    pub fn read_cap(&self) -> u64 {
        let mut cap = [0u8; 8];
        self.device
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, &mut cap, 0);
        u64::from_le_bytes(cap)
    }

    /// Maps the first `len` bytes of BAR0 (registers and doorbells; the MSI-X table that
    /// may follow stays the kernel's).
    pub fn map_bar0(&self, len: usize) -> Result<Bar, NvmeError> {
        let size = self.device.get_region_size(VFIO_PCI_BAR0_REGION_INDEX) as usize;
        let len = len.min(size);
        let offset = self.device.get_region_offset(VFIO_PCI_BAR0_REGION_INDEX);
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| self.io("mapping BAR0", io::ErrorKind::InvalidData.into()))?;
        // SAFETY: a new shared mapping of the device's BAR0 region through its VFIO
        // descriptor; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&self.device),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(self.io("mapping BAR0", io::Error::last_os_error()));
        }
        Ok(Bar {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Enables up to `wanted` MSI-X vectors, each signalling its own eventfd; returns
    /// them (vector i is element i).
    pub fn enable_msix(&self, wanted: u32) -> Result<Vec<EventFd>, NvmeError> {
        let available = self
            .device
            .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
            .map_or(0, |irq| irq.count);
        let n = wanted.min(available);
        if n < 2 {
            return Err(NvmeError::Interrupts {
                address: self.address.clone(),
                available,
            });
        }
        let fds = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| self.io("creating interrupt eventfds", e))?;
        self.device
            .enable_msix(fds.iter().collect())
            .map_err(|e| NvmeError::Vfio {
                address: self.address.clone(),
                what: "enabling MSI-X",
                detail: e.to_string(),
            })?;
        Ok(fds)
    }

    fn io(&self, what: &'static str, source: io::Error) -> NvmeError {
        NvmeError::Io {
            address: self.address.clone(),
            what,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_sysfs_spelling_only() {
        assert_eq!(
            parse_address("0000:00:04.0").as_deref(),
            Some("0000:00:04.0")
        );
        assert_eq!(
            parse_address("0000:AF:00.1").as_deref(),
            Some("0000:af:00.1")
        );
        for bad in ["00:04.0", "0000:00:04", "0000:00:04.10", "0000:0g:04.0", ""] {
            assert_eq!(parse_address(bad), None, "{bad}");
        }
    }
}

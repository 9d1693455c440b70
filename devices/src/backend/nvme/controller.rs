//! Bringing the controller up and talking to it on its admin queue: reset, admin queue
//! setup, enable within CAP.TO, Identify, the number of I/O queues, and creating and
//! deleting the I/O queue pairs the workers use.
//!
//! Admin commands are rare (start, a worker's first request, a worker's end) and are
//! polled to completion under a mutex, on the calling thread: a worker creating its queue
//! pair blocks its other queues for the few milliseconds that takes (said here, as the
//! backend rules ask).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::dma::DmaBuf;
use super::pci::{Bar, Function};
use super::queue::Rings;
use super::spec::{self, Cap, Command, Completion, IdentifyController, IdentifyNamespace, PAGE};
use super::NvmeError;

/// Entries of the admin queues.
const ADMIN_ENTRIES: u32 = 32;
/// Longest wait for one admin command.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// I/O queue pairs asked of the controller: one per worker thread, and corodev runs at
/// most 64 workers per export.
const MAX_IO_QUEUES: u16 = 64;

/// The admin queue: its rings and a page for data-in commands.
struct Admin {
    rings: Rings,
    page: DmaBuf,
    next_cid: u16,
}

/// A running controller.
///
/// Field order is drop order, and it matters: the BAR mapping and the DMA memory go
/// before the VFIO device and its container (a mapping of the device keeps it open, and
/// the group could not leave its container).
pub struct Controller {
    /// Registers and doorbells.
    pub bar: Bar,
    /// What CAP says.
    pub cap: Cap,
    /// What Identify Controller says.
    pub identify: IdentifyController,
    /// The version it implements (VS: major, minor).
    pub version: (u16, u8),
    /// The namespace served.
    pub nsid: u32,
    /// What Identify Namespace says of it.
    pub namespace: IdentifyNamespace,
    admin: Mutex<Admin>,
    /// I/O queue identifiers not in use.
    free_qids: Mutex<Vec<u16>>,
    /// MSI-X vector i's eventfd (vector 0: admin, unused; vector q: I/O queue q).
    pub interrupts: Vec<EventFd>,
    /// I/O queue pairs the controller granted.
    queue_count: u16,
    /// Counts controller resets: an I/O queue made before the last one is gone.
    generation: AtomicU64,
    /// A reset failed: the controller is not used again.
    failed: AtomicBool,
    /// The PCI function (its IOMMU container maps guest memory too).
    pub function: Function,
}

impl Controller {
    /// Resets and enables the controller at `address`, identifies namespace `nsid` and
    /// reserves its I/O queues.
    pub fn start(address: &str, nsid: u32) -> Result<Arc<Controller>, NvmeError> {
        let function = Function::open(address)?;
        let cap = Cap::parse(function.read_cap());
        // Registers plus a doorbell pair per queue, before any MSI-X table in the BAR.
        let doorbells = 2 * (usize::from(MAX_IO_QUEUES) + 1) * cap.doorbell_stride;
        let bar = function.map_bar0((spec::DOORBELLS + doorbells).div_ceil(PAGE) * PAGE)?;
        let fail = |why: String| NvmeError::Controller {
            address: address.to_owned(),
            why,
        };
        if !cap.nvm_command_set || cap.min_page > PAGE {
            return Err(fail(format!(
                "it lacks the NVM command set or 4 KiB pages (CAP {:#x})",
                bar.read64(spec::REG_CAP)
            )));
        }
        // A previous owner may have left it running: reset it.
        let rings = enable(&bar, &cap, &function)?;
        let page = DmaBuf::new(&function.container, PAGE).map_err(|source| NvmeError::Io {
            address: address.to_owned(),
            what: "allocating the admin page",
            source,
        })?;
        let interrupts = function.enable_msix(u32::from(MAX_IO_QUEUES) + 1)?;
        let mut c = Controller {
            version: {
                let vs = bar.read32(spec::REG_VS);
                ((vs >> 16) as u16, (vs >> 8) as u8)
            },
            function,
            bar,
            cap,
            identify: IdentifyController {
                mdts: 0,
                namespaces: 0,
                dsm: false,
                write_zeroes: false,
                volatile_write_cache: false,
            },
            nsid,
            namespace: IdentifyNamespace {
                blocks: 0,
                block_size: 512,
            },
            admin: Mutex::new(Admin {
                rings,
                page,
                next_cid: 0,
            }),
            free_qids: Mutex::new(Vec::new()),
            interrupts,
            queue_count: 0,
            generation: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        };
        c.identify = IdentifyController::parse(&*c.identify_page(1, 0)?);
        if nsid == 0 || nsid > c.identify.namespaces {
            return Err(fail(format!(
                "it has {} namespace(s); --nvme-namespace {nsid} is not one",
                c.identify.namespaces
            )));
        }
        c.namespace = IdentifyNamespace::parse(&*c.identify_page(0, nsid)?).ok_or_else(|| {
            fail(format!(
                "namespace {nsid} uses a format corodev cannot serve (metadata per block, or a block size outside 512 B-64 KiB)"
            ))
        })?;
        let wanted = MAX_IO_QUEUES.min(c.interrupts.len() as u16 - 1);
        let granted = c.admin(Command::set_queue_count(wanted))?.result;
        let queues = wanted
            .min((granted & 0xffff) as u16 + 1)
            .min((granted >> 16) as u16 + 1);
        c.queue_count = queues;
        *c.free_qids
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = (1..=queues).rev().collect();
        Ok(Arc::new(c))
    }

    /// Runs one admin command to completion; its status must be success. A controller
    /// found disabled or failed is reset first (see [`recover`](Self::recover)).
    pub fn admin(&self, cmd: Command) -> Result<Completion, NvmeError> {
        let mut admin = self.admin.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = self.unhealthy() {
            self.reset(&mut admin, why);
        }
        if self.failed() {
            return Err(self.error("the controller failed and could not be reset".into()));
        }
        self.run_admin(&mut admin, cmd)
    }

    /// Why the controller cannot be serving commands now, from CSTS (one register read).
    pub fn unhealthy(&self) -> Option<&'static str> {
        let csts = self.bar.read32(spec::REG_CSTS);
        if csts == u32::MAX {
            Some("its registers read all ones")
        } else if csts & spec::CSTS_CFS != 0 {
            Some("it reports a fatal status (CSTS.CFS)")
        } else if csts & spec::CSTS_RDY == 0 {
            Some("it is no longer enabled (reset under us)")
        } else {
            None
        }
    }

    fn run_admin(&self, admin: &mut Admin, mut cmd: Command) -> Result<Completion, NvmeError> {
        let cid = admin.next_cid;
        admin.next_cid = admin.next_cid.wrapping_add(1);
        cmd.set_cid(cid);
        admin.rings.submit(&self.bar, &cmd);
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        loop {
            while let Some(c) = admin.rings.pop() {
                admin.rings.release(&self.bar);
                if c.cid != cid {
                    continue; // a late answer to a command that timed out
                }
                if c.status != 0 {
                    return Err(self.error(format!(
                        "admin command {:#04x} failed with status {:#x}",
                        cmd.0[0] & 0xff,
                        c.status
                    )));
                }
                return Ok(c);
            }
            if self.bar.read32(spec::REG_CSTS) & spec::CSTS_CFS != 0 {
                return Err(self.error("the controller reports a fatal status (CSTS.CFS)".into()));
            }
            if Instant::now() > deadline {
                return Err(self.error(format!(
                    "admin command {:#04x} got no answer in {ADMIN_TIMEOUT:?}",
                    cmd.0[0] & 0xff
                )));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Identify with `cns` for `nsid`: the 4 KiB page.
    fn identify_page(&self, cns: u32, nsid: u32) -> Result<Box<[u8; PAGE]>, NvmeError> {
        let iova = self
            .admin
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .page
            .iova();
        self.admin(Command::identify(cns, nsid, iova))?;
        let admin = self.admin.lock().unwrap_or_else(PoisonError::into_inner);
        let mut page = Box::new([0u8; PAGE]);
        // SAFETY: the admin page is PAGE bytes of DMA memory the controller finished
        // writing (its command completed); copied out while the admin lock keeps any
        // other command from reusing it.
        unsafe { std::ptr::copy_nonoverlapping(admin.page.ptr(), page.as_mut_ptr(), PAGE) };
        Ok(page)
    }

    /// How many resets the controller went through (see [`recover`](Self::recover)).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a reset failed: every request fails from then on.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Resets the controller after it stopped answering (`why`), unless that was done
    /// since generation `seen`: disable (which ends every command and all DMA), set the
    /// admin queue up again, enable, ask for the queues again. The I/O queues are then
    /// re-created by their workers, which resubmit what was in flight. If the reset fails
    /// the controller is given up: every request fails from then on, loudly.
    pub fn recover(&self, seen: u64, why: &str) {
        let mut admin = self.admin.lock().unwrap_or_else(PoisonError::into_inner);
        if self.generation() == seen && !self.failed() {
            self.reset(&mut admin, why);
        }
    }

    /// The reset of [`recover`](Self::recover), with the admin queue held.
    fn reset(&self, admin: &mut Admin, why: &str) {
        let address = &self.function.address;
        log::error!("NVMe {address}: {why}; resetting the controller");
        let ok = enable(&self.bar, &self.cap, &self.function).and_then(|rings| {
            admin.rings = rings;
            self.run_admin(admin, Command::set_queue_count(self.queue_count))
                .map(drop)
        });
        match ok {
            Ok(()) => log::info!(
                "NVMe {address}: controller reset; requests in flight are submitted again"
            ),
            Err(e) => {
                self.failed.store(true, Ordering::Release);
                log::error!(
                    "NVMe {address}: the reset failed ({e}); every request of this export fails from now on"
                );
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A free I/O queue identifier, if any is left.
    pub fn take_qid(&self) -> Option<u16> {
        self.free_qids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    /// Returns an I/O queue identifier whose queues were deleted.
    pub fn give_qid(&self, qid: u16) {
        self.free_qids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(qid);
    }

    fn error(&self, why: String) -> NvmeError {
        NvmeError::Controller {
            address: self.function.address.clone(),
            why,
        }
    }

    /// Disables the controller: what it has not done by now it never does.
    pub fn shut_down(&self) {
        self.bar.write32(spec::REG_CC, 0);
        let timeout = Duration::from_millis(self.cap.timeout_ms.max(500));
        if let Err(why) = wait_ready(&self.bar, false, timeout) {
            log::warn!("NVMe {}: {why} while disabling it", self.function.address);
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Disables the controller (ending every command and all its DMA), gives it fresh admin
/// queues and enables it within CAP.TO. Returns the admin queues.
fn enable(bar: &Bar, cap: &Cap, function: &Function) -> Result<Rings, NvmeError> {
    let address = &function.address;
    let fail = |why: &str| NvmeError::Controller {
        address: address.clone(),
        why: why.to_owned(),
    };
    let timeout = Duration::from_millis(cap.timeout_ms.max(500));
    bar.write32(spec::REG_CC, 0);
    wait_ready(bar, false, timeout).map_err(fail)?;
    let rings = Rings::new(
        &function.container,
        cap,
        0,
        ADMIN_ENTRIES.min(cap.max_queue_entries),
    )
    .map_err(|source| NvmeError::Io {
        address: address.clone(),
        what: "allocating the admin queue",
        source,
    })?;
    bar.write32(spec::REG_AQA, spec::aqa(rings.entries()));
    bar.write64(spec::REG_ASQ, rings.sq_iova());
    bar.write64(spec::REG_ACQ, rings.cq_iova());
    bar.write32(spec::REG_CC, spec::CC_ENABLE);
    wait_ready(bar, true, timeout).map_err(fail)?;
    Ok(rings)
}

/// Waits until CSTS.RDY is `ready`, or the controller reports a fatal error, or `timeout`.
fn wait_ready(bar: &Bar, ready: bool, timeout: Duration) -> Result<(), &'static str> {
    let deadline = Instant::now() + timeout;
    loop {
        let csts = bar.read32(spec::REG_CSTS);
        if csts == u32::MAX {
            return Err("the controller's registers read all ones (is it still there?)");
        }
        if (csts & spec::CSTS_RDY != 0) == ready {
            return Ok(());
        }
        if ready && csts & spec::CSTS_CFS != 0 {
            return Err("the controller reports a fatal status (CSTS.CFS)");
        }
        if Instant::now() > deadline {
            return Err(if ready {
                "the controller did not become ready within CAP.TO"
            } else {
                "the controller did not reset within CAP.TO"
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

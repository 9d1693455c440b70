//! A worker's I/O queue pair and the coroutines waiting on it.
//!
//! Each worker thread gets its own submission/completion queue pair, created on its first
//! request and deleted when the thread ends, so the data path takes no lock: a request
//! coroutine takes a command slot, writes its command, rings the doorbell and waits.
//!
//! Waiting: the first waiter becomes the *reaper*. It drains the queue's interrupt
//! eventfd, reaps every posted completion (waking their coroutines), polls the completion
//! queue for up to [`POLL`] when the drive has lately been answering within that time (a
//! fast drive's completion is then taken from memory, saving the interrupt's trip through
//! the kernel and epoll; a slower one would only burn the time), and, if its own command
//! is still out, parks on the eventfd through io_uring (`coro::io::wait_readable`)
//! so the worker sleeps in epoll like for any other I/O: an idle disk costs no CPU. Other
//! waiters just park until the reaper wakes them with their completion. A reaper whose
//! command completes hands the role to a waiter that is still waiting. Draining the eventfd
//! *before* reaping means a completion posted in between still leaves the eventfd set, so
//! no wake-up is lost.
//!
//! **A controller that stops answering.** The reaper's wait also ends every
//! [`CHECK_EVERY`] (a timerfd beside the interrupt eventfd, both behind one epoll
//! descriptor the reaper polls). It then looks at the controller: fatal status, not ready
//! (reset under us), or a command out longer than [`COMMAND_TIMEOUT`] make it reset the
//! controller ([`Controller::recover`]). A reset ends every command and all DMA; each
//! worker then re-creates its queue pair and submits again what it had in flight (a
//! command is tried [`MAX_ATTEMPTS`] times, then fails with an I/O error). If the reset
//! fails, every request fails from then on. A request never hangs.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coro::TaskId;

use super::controller::Controller;
use super::dma::DmaBuf;
use super::queue::Rings;
use super::spec::{admin, Command, Completion, PAGE};

/// Bytes of bounce buffer per command slot: the most one bounced command moves.
pub const BOUNCE: usize = 64 * 1024;
/// Entries per I/O queue (one fewer commands in flight).
const ENTRIES: u32 = 65;
/// Longest a command may stay out once its waiter can no longer park (the scheduler is
/// being torn down): its memory must not be reused before the controller is done.
const ORPHAN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a reaper polls the completion queue before it sleeps on the interrupt: about
/// a flash read's latency. The worker serves nothing else meanwhile, so it is kept short,
/// and it polls only while the queue's recent latency is below it (hybrid polling).
pub const POLL: Duration = Duration::from_micros(20);
/// How often a waiting reaper looks at the controller's health.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A command out longer than this means the controller stopped answering (Linux's nvme
/// driver waits as long).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Submissions of one command (the first and those after controller resets).
pub const MAX_ATTEMPTS: u8 = 3;
/// The status a command gets when it is given up (not one a controller sends).
const GIVEN_UP: u16 = 0x7ff;

/// A command slot's DMA memory: a PRP list page and a bounce buffer.
pub struct SlotMem {
    /// The PRP list page (512 entries).
    pub list: *mut u64,
    /// Its IOVA.
    pub list_iova: u64,
    /// The bounce buffer, [`BOUNCE`] bytes.
    pub bounce: *mut u8,
    /// Its IOVA.
    pub bounce_iova: u64,
}

#[derive(Default)]
struct Slot {
    task: Option<TaskId>,
    done: Option<Completion>,
    /// The command as submitted (resubmitted after a controller reset).
    cmd: Command,
    /// When it was last submitted.
    submitted: Option<Instant>,
    /// How many times it was submitted.
    attempts: u8,
}

/// One worker's queue pair.
pub struct IoQueue {
    ctrl: Arc<Controller>,
    rings: RefCell<Rings>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u16>>,
    waiting_for_slot: RefCell<VecDeque<TaskId>>,
    reaping: Cell<bool>,
    /// Recent submission-to-completion time, nanoseconds (a moving average of 1/8 each).
    latency_ns: Cell<u64>,
    /// The controller generation the rings were created in.
    generation: Cell<u64>,
    /// Readable when the interrupt fires or the health timer expires.
    wakeup: OwnedFd,
    /// The health timer (see the module docs).
    timer: OwnedFd,
    lists: DmaBuf,
    bounce: DmaBuf,
}

thread_local! {
    /// This worker's queue pairs, one per controller (keyed by its address in memory).
    static QUEUES: RefCell<Vec<(usize, Rc<IoQueue>)>> = const { RefCell::new(Vec::new()) };
}

/// The calling thread's queue pair on `ctrl`, created on first use.
pub fn queue(ctrl: &Arc<Controller>) -> io::Result<Rc<IoQueue>> {
    let key = Arc::as_ptr(ctrl) as usize;
    if let Some(q) = QUEUES.with(|qs| {
        qs.borrow()
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, q)| q.clone())
    }) {
        return Ok(q);
    }
    let q = Rc::new(IoQueue::create(ctrl)?);
    QUEUES.with(|qs| qs.borrow_mut().push((key, q.clone())));
    Ok(q)
}

impl IoQueue {
    fn create(ctrl: &Arc<Controller>) -> io::Result<IoQueue> {
        let qid = ctrl.take_qid().ok_or_else(|| {
            io::Error::other(format!(
                "NVMe {}: no I/O queue left for another worker thread",
                ctrl.function.address
            ))
        })?;
        let made = (|| {
            let container = &ctrl.function.container;
            let generation = ctrl.generation();
            let rings = create_rings(ctrl, qid)?;
            let slots = rings.entries() as usize - 1;
            let lists = DmaBuf::new(container, slots * PAGE)?;
            let bounce = DmaBuf::new(container, slots * BOUNCE)?;
            let (wakeup, timer) = wakeup_fds(ctrl.interrupts[usize::from(qid)].as_raw_fd())?;
            Ok(IoQueue {
                ctrl: ctrl.clone(),
                rings: RefCell::new(rings),
                slots: RefCell::new((0..slots).map(|_| Slot::default()).collect()),
                free: RefCell::new((0..slots as u16).rev().collect()),
                waiting_for_slot: RefCell::new(VecDeque::new()),
                reaping: Cell::new(false),
                latency_ns: Cell::new(0),
                generation: Cell::new(generation),
                wakeup,
                timer,
                lists,
                bounce,
            })
        })();
        if made.is_err() {
            ctrl.give_qid(qid);
        }
        made
    }

    fn slot_mem(&self, cid: u16) -> SlotMem {
        let i = usize::from(cid);
        SlotMem {
            // SAFETY: `cid` < slots, and `lists` holds one page per slot.
            list: unsafe { self.lists.ptr().add(i * PAGE) }.cast(),
            list_iova: self.lists.iova() + (i * PAGE) as u64,
            // SAFETY: `cid` < slots, and `bounce` holds BOUNCE bytes per slot.
            bounce: unsafe { self.bounce.ptr().add(i * BOUNCE) },
            bounce_iova: self.bounce.iova() + (i * BOUNCE) as u64,
        }
    }

    /// Runs one command: `build` makes it given its slot's memory (and may fill the
    /// bounce buffer), `finish` sees the completion and the slot's memory before the slot
    /// is reused (to copy a bounced read out). A completion with an error status is an
    /// I/O error.
    pub fn execute<R>(
        &self,
        build: impl FnOnce(&SlotMem) -> Command,
        finish: impl FnOnce(&SlotMem, &Completion) -> R,
    ) -> io::Result<R> {
        if self.ctrl.failed() {
            return Err(io::Error::other(format!(
                "NVMe {}: the controller failed and could not be reset",
                self.ctrl.function.address
            )));
        }
        self.follow_resets();
        let cid = self.acquire();
        let mem = self.slot_mem(cid);
        let mut cmd = build(&mem);
        cmd.set_cid(cid);
        {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[usize::from(cid)];
            slot.task = Some(coro::current_task());
            slot.cmd = cmd;
            slot.submitted = Some(Instant::now());
            slot.attempts = 1;
        }
        self.rings.borrow_mut().submit(&self.ctrl.bar, &cmd);
        let Some(done) = self.wait(cid) else {
            // The controller never answered: the slot stays taken (its memory may still
            // be written) and the request fails.
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "NVMe command got no completion",
            ));
        };
        let result = finish(&mem, &done);
        self.release(cid);
        if done.status != 0 {
            return Err(io::Error::other(format!(
                "NVMe command {:#04x} failed with status {:#x}",
                cmd.0[0] & 0xff,
                done.status
            )));
        }
        Ok(result)
    }

    fn acquire(&self) -> u16 {
        loop {
            if let Some(cid) = self.free.borrow_mut().pop() {
                return cid;
            }
            self.waiting_for_slot
                .borrow_mut()
                .push_back(coro::current_task());
            coro::park();
        }
    }

    fn release(&self, cid: u16) {
        let next_reaper = {
            let mut slots = self.slots.borrow_mut();
            slots[usize::from(cid)].task = None;
            // Still-waiting commands need a reaper once this one (maybe it) leaves.
            if self.reaping.get() {
                None
            } else {
                slots.iter().find_map(|s| s.task)
            }
        };
        self.free.borrow_mut().push(cid);
        if let Some(t) = self.waiting_for_slot.borrow_mut().pop_front() {
            coro::wake(t);
        }
        if let Some(t) = next_reaper {
            coro::wake(t);
        }
    }

    /// Waits for slot `cid`'s completion (see the module docs); `None` if it never came.
    fn wait(&self, cid: u16) -> Option<Completion> {
        let irq = self.ctrl.interrupts[usize::from(self.rings.borrow().qid)].as_raw_fd();
        let check = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: CHECK_EVERY.as_secs() as _,
                tv_nsec: libc::c_long::from(CHECK_EVERY.subsec_nanos() as i32),
            },
        };
        loop {
            if let Some(c) = self.slots.borrow_mut()[usize::from(cid)].done.take() {
                return Some(c);
            }
            if self.reaping.get() {
                coro::park();
                continue;
            }
            self.reaping.set(true);
            drain(irq);
            self.reap();
            self.poll();
            let parked = if self.slots.borrow()[usize::from(cid)].done.is_none() {
                // SAFETY: arms our own timerfd with a valid itimerspec.
                unsafe {
                    libc::timerfd_settime(self.timer.as_raw_fd(), 0, &check, std::ptr::null_mut())
                };
                coro::io::wait_readable(self.wakeup.as_raw_fd())
            } else {
                Ok(())
            };
            self.reaping.set(false);
            self.reap();
            if parked.is_err() {
                // This coroutine can no longer park (its scheduler is going away): poll.
                return self.poll_orphan(cid);
            }
            if drain(self.timer.as_raw_fd()) {
                self.check_health();
            }
        }
    }

    fn poll_orphan(&self, cid: u16) -> Option<Completion> {
        let deadline = Instant::now() + ORPHAN_TIMEOUT;
        while Instant::now() < deadline {
            self.reap();
            if let Some(c) = self.slots.borrow_mut()[usize::from(cid)].done.take() {
                return Some(c);
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        None
    }

    /// Polls the completion queue for up to [`POLL`], reaping what arrives, if the drive
    /// has lately been answering within it.
    fn poll(&self) {
        if self.latency_ns.get() > POLL.as_nanos() as u64 {
            return;
        }
        let start = Instant::now();
        while start.elapsed() < POLL {
            if self.rings.borrow().has_completion() {
                self.reap();
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// The controller's health, when the timer fired: see the module docs.
    fn check_health(&self) {
        let overdue = self.slots.borrow().iter().any(|s| {
            s.task.is_some()
                && s.done.is_none()
                && s.submitted.is_some_and(|t| t.elapsed() > COMMAND_TIMEOUT)
        });
        let why = self
            .ctrl
            .unhealthy()
            .or(overdue.then_some("a command got no completion in 30 s"));
        if let Some(why) = why {
            self.ctrl.recover(self.generation.get(), why);
        }
        self.follow_resets();
    }

    /// After a controller reset (by any worker): new rings for this queue pair, and every
    /// command in flight submitted again (or failed after [`MAX_ATTEMPTS`]).
    fn follow_resets(&self) {
        let generation = self.ctrl.generation();
        if generation == self.generation.get() {
            return;
        }
        self.generation.set(generation);
        let qid = self.rings.borrow().qid;
        let rings = if self.ctrl.failed() {
            None
        } else {
            // The controller's reset deleted this pair; deleting again is harmless.
            let _ = self
                .ctrl
                .admin(Command::delete_queue(admin::DELETE_SQ, qid));
            let _ = self
                .ctrl
                .admin(Command::delete_queue(admin::DELETE_CQ, qid));
            match create_rings(&self.ctrl, qid) {
                Ok(r) => Some(r),
                Err(e) => {
                    log::error!("NVMe: re-creating I/O queue {qid} after a reset: {e}");
                    None
                }
            }
        };
        let mut slots = self.slots.borrow_mut();
        let Some(rings) = rings else {
            for slot in slots
                .iter_mut()
                .filter(|s| s.task.is_some() && s.done.is_none())
            {
                give_up(slot);
            }
            return;
        };
        let mut rings_now = self.rings.borrow_mut();
        // The old rings are freed here: the reset stopped every access to them.
        *rings_now = rings;
        for slot in slots
            .iter_mut()
            .filter(|s| s.task.is_some() && s.done.is_none())
        {
            if slot.attempts >= MAX_ATTEMPTS {
                give_up(slot);
                continue;
            }
            slot.attempts += 1;
            slot.submitted = Some(Instant::now());
            rings_now.submit(&self.ctrl.bar, &slot.cmd);
        }
    }

    /// Takes every posted completion, marking its slot done and waking its coroutine.
    fn reap(&self) {
        let mut rings = self.rings.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        let mut any = false;
        while let Some(c) = rings.pop() {
            any = true;
            match slots.get_mut(usize::from(c.cid)) {
                Some(slot) if slot.task.is_some() => {
                    if let Some(t) = slot.submitted {
                        let ns = t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u64;
                        let avg = self.latency_ns.get();
                        self.latency_ns.set(avg - avg / 8 + ns / 8);
                    }
                    slot.done = Some(c);
                    if let Some(t) = slot.task {
                        coro::wake(t);
                    }
                }
                _ => log::warn!(
                    "NVMe {}: completion for command {} that is not outstanding",
                    self.ctrl.function.address,
                    c.cid
                ),
            }
        }
        if any {
            rings.release(&self.ctrl.bar);
        }
    }
}

/// Empties an eventfd or timerfd (non-blocking); whether it had fired.
fn drain(fd: RawFd) -> bool {
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live local buffer from our descriptor.
    unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) == 8 }
}

/// Ends a command that will not complete: an I/O error for its request.
fn give_up(slot: &mut Slot) {
    slot.done = Some(Completion {
        result: 0,
        sq_head: 0,
        cid: 0,
        phase: false,
        status: GIVEN_UP,
    });
    if let Some(t) = slot.task {
        coro::wake(t);
    }
}

/// New rings for I/O queue `qid`, created on the controller (completion queue first).
fn create_rings(ctrl: &Controller, qid: u16) -> io::Result<Rings> {
    let entries = ENTRIES.min(ctrl.cap.max_queue_entries);
    let rings = Rings::new(&ctrl.function.container, &ctrl.cap, qid, entries)?;
    let to_io = |e: super::NvmeError| io::Error::other(e.to_string());
    ctrl.admin(Command::create_cq(qid, entries, rings.cq_iova(), qid))
        .map_err(to_io)?;
    if let Err(e) = ctrl.admin(Command::create_sq(qid, entries, rings.sq_iova())) {
        let _ = ctrl.admin(Command::delete_queue(admin::DELETE_CQ, qid));
        return Err(to_io(e));
    }
    Ok(rings)
}

/// An epoll descriptor readable when `irq` fires or the returned timerfd expires.
fn wakeup_fds(irq: RawFd) -> io::Result<(OwnedFd, OwnedFd)> {
    let owned = |fd: libc::c_int| {
        if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            // SAFETY: a descriptor just created by the kernel for us alone.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
    };
    // SAFETY: plain system calls with valid flags; results checked by `owned`.
    let epoll = owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    // SAFETY: as above.
    let timer = owned(unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    })?;
    for fd in [irq, timer.as_raw_fd()] {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: adds a live descriptor to our epoll set with a valid event.
        if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((epoll, timer))
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        let qid = self.rings.borrow().qid;
        let deleted = self
            .ctrl
            .admin(Command::delete_queue(admin::DELETE_SQ, qid))
            .and_then(|_| {
                self.ctrl
                    .admin(Command::delete_queue(admin::DELETE_CQ, qid))
            });
        match deleted {
            Ok(_) => self.ctrl.give_qid(qid),
            // The queue id is not reused: the controller may still own those queues.
            Err(e) => log::error!("NVMe: deleting I/O queue {qid}: {e}"),
        }
    }
}

//! io_uring for coroutines: submit an operation, park, resume with its result.
//!
//! Each operation gets a slot keyed by the SQE's `user_data`. The calling task parks until
//! the scheduler has reaped the CQE, posted its result into the slot and woken the task. By
//! default submissions are not sent one by one: they sit in the submission queue until the
//! scheduler has run every ready task, then go to the kernel in a single `io_uring_enter`.
//! A ring made with [`Ring::submit_each`] sends each operation as it is queued instead (see
//! there for when that wins).
//!
//! The ring signals an eventfd on every completion so an outside epoll loop (the vhost-user
//! worker) can sleep on it alongside guest kicks.
//!
//! Memory the kernel reads or writes after the calling task parked must not lie on a
//! coroutine stack: with [`StackMode::Shared`](crate::StackMode::Shared) a parked task's
//! stack bytes are copied away and the stack is reused by other tasks. With batched
//! submission an SQE sits in the submission queue until the scheduler's pass ends, long
//! after its task parked, and the kernel reads the iovec array or the timespec only then.
//! So, by type rather than by convention:
//! - the kernel-visible arguments (iovec array, timespec) are copied into the ring's op
//!   slot, heap memory the ring owns until the completion (reused from slot to slot, so the
//!   hot path allocates nothing); the caller's array may live anywhere;
//! - data buffers are [`IoBuf`]s, whose safe constructors only take heap-owned storage and
//!   whose `unsafe` one ([`IoBuf::from_raw`], for guest memory) states the rule; in shared
//!   mode every buffer is also checked against the current shared stack (two compares per
//!   buffer) and refused with [`Error::BufferOnSharedStack`].
//!
//! Buffers stay valid until the caller is resumed, which happens only after the completion
//! (an `IoBuf` borrows its storage for the call). The scheduler's `Drop` cancels the
//! operations in flight (see [`Ring::cancel_on_drop`]) and then waits for
//! every one of their completions before unwinding any task, so dropping a scheduler cannot
//! free memory the kernel still writes to. That wait survives signals (`EINTR`); should it
//! fail for real, the tasks are leaked rather than unwound.
//!
//! Completion-queue overflow: every parked task can have an operation in flight, so more
//! completions than the CQ holds can be outstanding. The kernel then keeps the extra CQEs on
//! an overflow list (`IORING_SQ_CQ_OVERFLOW`; with `IORING_FEAT_NODROP` none are lost) and
//! moves them to the CQ only inside a later `io_uring_enter` with `GETEVENTS`. Reaping checks
//! that flag (shared memory, no syscall) and flushes, so completions never wait for an
//! unrelated submission; the CQ is also made larger than the SQ to make overflow rare.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use io_uring::{opcode, squeue, types, EnterFlags, IoUring};
use slab::Slab;

use crate::sched::{self, TaskId};
use crate::shared_stack;
use crate::Error;

/// CQ entries per SQ entry. `io_uring_setup`'s default is 2; a task can keep an operation in
/// flight while the SQ is refilled many times, so completions outnumber SQ slots. A larger CQ
/// makes overflow (and its flush syscall) rare; 16 bytes a CQE keeps it cheap.
const CQ_PER_SQ: u32 = 4;

/// The kernel's limit on CQ entries (`IORING_MAX_CQ_ENTRIES`); asking for more is `EINVAL`.
const MAX_CQ_ENTRIES: u32 = 65536;

/// `user_data` of the cancel-everything request sent on drop. Never a slot key: the slab
/// would need `usize::MAX` entries.
const CANCEL_KEY: u64 = u64::MAX;

/// Iovecs an op slot holds inline; longer arrays go to the slot's reusable `Vec`.
const INLINE_IOVECS: usize = 8;

/// Op-slot storage kept for reuse after completions: enough for a queue's worth of
/// operations in flight; beyond it finished slots' storage is freed.
const SPARE_ARGS_MAX: usize = 1024;

/// The memory an SQE points the kernel to, owned by its op slot until the completion. Boxed
/// so that its address stays put while the slab of slots grows.
struct OpArgs {
    iov_inline: [libc::iovec; INLINE_IOVECS],
    iov_spill: Vec<libc::iovec>,
    timespec: types::Timespec,
}

impl OpArgs {
    fn new() -> Box<OpArgs> {
        Box::new(OpArgs {
            iov_inline: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; INLINE_IOVECS],
            iov_spill: Vec::new(),
            timespec: types::Timespec::new(),
        })
    }

    /// Copies `bufs` into this slot; returns the copy for the SQE.
    fn iovecs(&mut self, bufs: &[IoBuf<'_>]) -> *const libc::iovec {
        if bufs.len() <= INLINE_IOVECS {
            for (dst, b) in self.iov_inline.iter_mut().zip(bufs) {
                *dst = b.iov;
            }
            self.iov_inline.as_ptr()
        } else {
            self.iov_spill.clear();
            self.iov_spill.extend(bufs.iter().map(|b| b.iov));
            self.iov_spill.as_ptr()
        }
    }
}

struct Op {
    task: TaskId,
    result: Option<i32>,
    /// What the kernel may still read: kept until the slot is removed after completion.
    args: Box<OpArgs>,
}

/// One buffer of a vectored operation ([`readv`], [`writev`]): memory that is not on a
/// coroutine stack and stays valid for the borrow `'a`, which covers the whole operation.
///
/// The safe constructors take heap-owned storage (a `Vec<u8>`'s or a `Box<[u8]>`'s
/// contents); raw memory, such as guest memory, needs [`from_raw`](Self::from_raw). A
/// coroutine's stack cannot be used: under [`StackMode::Shared`](crate::StackMode::Shared)
/// a parked coroutine's stack bytes belong to another coroutine while the kernel reads or
/// writes them.
///
/// ```compile_fail
/// let mut on_stack = [0u8; 512];
/// // A stack array is not a Vec: there is no safe way to make it an I/O buffer.
/// let buf = coro::io::IoBuf::from_vec(&mut on_stack);
/// ```
///
/// ```
/// let mut heap = vec![0u8; 512];
/// let buf = coro::io::IoBuf::from_vec(&mut heap);
/// assert_eq!(buf.len(), 512);
/// ```
#[repr(transparent)]
pub struct IoBuf<'a> {
    iov: libc::iovec,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> IoBuf<'a> {
    /// The initialised contents of `v` (`v.len()` bytes), which live on the heap.
    pub fn from_vec(v: &'a mut Vec<u8>) -> IoBuf<'a> {
        // SAFETY: a `Vec<u8>`'s buffer is a heap allocation (never a coroutine stack) of at
        // least `len` bytes, borrowed mutably for `'a`.
        unsafe { IoBuf::from_raw(v.as_mut_ptr(), v.len()) }
    }

    /// The contents of a boxed slice, which live on the heap.
    pub fn from_boxed(b: &'a mut Box<[u8]>) -> IoBuf<'a> {
        // SAFETY: a `Box<[u8]>` is a heap allocation of `len` bytes, borrowed mutably for
        // `'a`.
        unsafe { IoBuf::from_raw(b.as_mut_ptr(), b.len()) }
    }

    /// `len` bytes at `base`.
    ///
    /// # Safety
    /// The memory must be valid for reads and writes of `len` bytes for `'a`, which must
    /// last until the operation using it completes, and nothing else may access it while
    /// an operation reads into it. It must not be on a coroutine stack (a local of a
    /// coroutine, or anything it points into): under shared stacks those bytes belong to
    /// another coroutine while the caller is parked. In shared mode a buffer in the current
    /// shared stack is refused at run time; a buffer in a pooled coroutine's stack is not
    /// detected.
    pub unsafe fn from_raw(base: *mut u8, len: usize) -> IoBuf<'a> {
        IoBuf {
            iov: libc::iovec {
                iov_base: base.cast(),
                iov_len: len,
            },
            _borrow: PhantomData,
        }
    }

    /// The buffer's length in bytes.
    pub fn len(&self) -> usize {
        self.iov.iov_len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.iov.iov_len == 0
    }

    /// The buffer's start address.
    pub fn as_ptr(&self) -> *const u8 {
        self.iov.iov_base.cast()
    }

    /// Drops the first `n` bytes (after a short transfer).
    ///
    /// # Panics
    /// If `n` exceeds the length.
    pub fn advance(&mut self, n: usize) {
        assert!(n <= self.iov.iov_len, "advance past the end of an IoBuf");
        // SAFETY: `n <= len`, so the new base stays inside (or one past) the same buffer.
        self.iov.iov_base = unsafe { self.iov.iov_base.cast::<u8>().add(n) }.cast();
        self.iov.iov_len -= n;
    }
}

impl std::fmt::Debug for IoBuf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("base", &self.iov.iov_base)
            .field("len", &self.iov.iov_len)
            .finish()
    }
}

/// Refuses buffers inside the shared stack the caller runs on (no check on an owned stack).
fn check_off_shared_stack(bufs: &[IoBuf<'_>]) -> io::Result<()> {
    let Some((lo, hi)) = shared_stack::current_range() else {
        return Ok(());
    };
    for b in bufs {
        let base = b.iov.iov_base as usize;
        if base < hi && base.saturating_add(b.iov.iov_len) > lo {
            return Err(Error::BufferOnSharedStack {
                base,
                len: b.iov.iov_len,
                stack_bottom: lo,
                stack_top: hi,
            }
            .into());
        }
    }
    Ok(())
}

/// An io_uring plus the bookkeeping that maps completions back to parked tasks.
pub struct Ring {
    uring: IoUring,
    eventfd: OwnedFd,
    ops: Slab<Op>,
    /// Storage of finished op slots, reused so that an operation allocates nothing. Kept
    /// boxed: a slot's `OpArgs` must not move while the kernel may read it, and moving the
    /// box into and out of the slab moves only the pointer.
    #[allow(clippy::vec_box)]
    spare_args: Vec<Box<OpArgs>>,
    /// SQEs pushed but not yet submitted.
    queued: usize,
    /// Submit every operation as soon as it is queued (see [`Ring::submit_each`]).
    submit_each: bool,
    /// Cancel the operations in flight before draining (see [`Ring::cancel_on_drop`]).
    cancel_on_drop: bool,
}

impl Ring {
    /// A ring with `entries` submission slots (and four times as many completion slots, at
    /// most 65536) and a fresh non-blocking eventfd.
    pub fn new(entries: u32) -> Result<Ring, Error> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::last_os("eventfd"));
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        Ring::with_eventfd(entries, unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// A ring that signals the given eventfd on completions (e.g. one already registered
    /// with an epoll loop before the worker thread created its scheduler).
    pub fn with_eventfd(entries: u32, eventfd: OwnedFd) -> Result<Ring, Error> {
        // At least `entries`: the kernel refuses a CQ smaller than the SQ.
        let cq_entries = entries
            .saturating_mul(CQ_PER_SQ)
            .min(MAX_CQ_ENTRIES)
            .max(entries);
        let uring = IoUring::builder()
            .setup_cqsize(cq_entries)
            .build(entries)
            .map_err(Error::os("io_uring_setup"))?;
        uring
            .submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(Error::os("io_uring_register"))?;
        Ok(Ring {
            uring,
            eventfd,
            ops: Slab::new(),
            spare_args: Vec::new(),
            queued: 0,
            submit_each: false,
            cancel_on_drop: true,
        })
    }

    /// With `yes`, every operation goes to the kernel as soon as a task queues it, one
    /// `io_uring_enter` each, rather than with the rest of the scheduler's batch.
    ///
    /// Batching saves system calls, which is what counts when operations complete inside
    /// the call (page-cache hits). For I/O that reaches a device (O_DIRECT) it can cost
    /// more than it saves: a batch is dispatched to the device together, completes
    /// together, and its submitter then refills the queue in lockstep, leaving the device
    /// idle in between; submitting each operation keeps the device's queue full.
    pub fn submit_each(mut self, yes: bool) -> Ring {
        self.submit_each = yes;
        self
    }

    /// With `yes` (the default), dropping the scheduler first asks the kernel to cancel every
    /// operation in flight (`IORING_OP_ASYNC_CANCEL` matching any request), so that a
    /// disconnect does not wait out a parked timer or a read nobody will answer. Either way
    /// the drop waits for each operation's completion (cancelled or not) before it frees the
    /// tasks that own their buffers. With `false` the operations run to completion instead,
    /// e.g. writes that should land even though nobody will see their result.
    pub fn cancel_on_drop(mut self, yes: bool) -> Ring {
        self.cancel_on_drop = yes;
        self
    }

    /// The completion eventfd, for an outside epoll loop to sleep on (after it fires,
    /// [`Scheduler::on_completion_event`](crate::Scheduler::on_completion_event) clears it).
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Operations pushed and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Queues the entry that `build` makes for `task`, handing it the new slot's argument
    /// storage to point the SQE at; returns the slot key.
    fn push(
        &mut self,
        task: TaskId,
        build: impl FnOnce(&mut OpArgs) -> squeue::Entry,
    ) -> io::Result<usize> {
        let mut args = self.spare_args.pop().unwrap_or_else(OpArgs::new);
        let entry = build(&mut args);
        let key = self.ops.insert(Op {
            task,
            result: None,
            args,
        });
        let entry = entry.user_data(key as u64);
        loop {
            // SAFETY: what `entry` points to is either in the slot's `args`, owned by the
            // ring until the slot is removed after the completion, or an `IoBuf`, which is
            // off coroutine stacks and borrowed by the parked caller until the completion
            // (see the module docs).
            let pushed = unsafe { self.uring.submission().push(&entry) };
            match pushed {
                Ok(()) => {
                    self.queued += 1;
                    // A failed early submit leaves the entry queued; the scheduler's batch
                    // submit retries it and reports the error.
                    if self.submit_each && self.uring.submit().is_ok() {
                        self.queued = 0;
                    }
                    return Ok(key);
                }
                Err(_) => {
                    // Submission queue full: flush it now rather than fail the request.
                    if let Err(e) = self.uring.submit() {
                        // The SQE never reached the queue, so nothing reads the arguments.
                        let op = self.ops.remove(key);
                        self.recycle(op.args);
                        // Wrapped, so the caller can tell "never reached the kernel" (no
                        // raw errno) from the operation's own result (a storage backend
                        // makes a failed fsync's errno sticky; this must not be).
                        return Err(Error::os("io_uring_enter")(e).into());
                    }
                    self.queued = 0;
                }
            }
        }
    }

    /// Sends queued SQEs to the kernel; true if there were any.
    pub(crate) fn submit(&mut self) -> io::Result<bool> {
        if self.queued == 0 {
            return Ok(false);
        }
        self.uring.submit()?;
        self.queued = 0;
        Ok(true)
    }

    /// Records the results of completed operations and calls `wake` with each owner;
    /// returns whether there were any.
    ///
    /// Completions the kernel parked on its overflow list are flushed into the CQ and reaped
    /// too: nothing else would bring them in, since the worker enters the kernel only to
    /// submit, and the eventfd is not guaranteed to fire again for them. Without overflow this
    /// costs one load of the SQ flags, no syscall.
    pub(crate) fn reap(&mut self, mut wake: impl FnMut(TaskId)) -> bool {
        let mut any = false;
        loop {
            for cqe in self.uring.completion() {
                if let Some(op) = self.ops.get_mut(cqe.user_data() as usize) {
                    op.result = Some(cqe.result());
                    wake(op.task);
                    any = true;
                }
            }
            // The CQ is empty now, so the flush has room; stop when it brings nothing.
            if !self.uring.submission().cq_overflow()
                || self.flush_overflow().is_err()
                || self.uring.completion().is_empty()
            {
                return any;
            }
        }
    }

    /// Moves overflowed completions into the CQ: an `io_uring_enter` with `GETEVENTS` that
    /// submits nothing (queued SQEs stay for the scheduler's batch) and waits for nothing.
    fn flush_overflow(&self) -> io::Result<usize> {
        // SAFETY: no submissions and no argument pointer; `GETEVENTS` with
        // `min_complete == 0` only flushes the overflow list and returns.
        unsafe {
            self.uring
                .submitter()
                .enter::<libc::sigset_t>(0, 0, EnterFlags::GETEVENTS.bits(), None)
        }
    }

    /// Whether completions are waiting, in the completion queue or on the kernel's overflow
    /// list (userspace checks, no syscall), for callers that poll instead of sleeping on the
    /// eventfd. Overflow counts: the eventfd is not guaranteed to fire again for those
    /// completions, so a poll loop that ignored them could go back to epoll with requests
    /// stranded.
    pub fn has_completions(&mut self) -> bool {
        !self.uring.completion().is_empty() || self.uring.submission().cq_overflow()
    }

    /// Resets the eventfd's counter after an epoll wake-up, so level-triggered epoll does
    /// not report it again. Completions are reaped independently of the counter.
    pub fn clear_eventfd(&self) {
        let mut counter = 0u64;
        // SAFETY: reading 8 bytes into a u64 from our own non-blocking eventfd; EAGAIN
        // (nothing to clear) is fine.
        unsafe { libc::read(self.eventfd.as_raw_fd(), (&raw mut counter).cast(), 8) };
    }

    /// Blocks until at least `want` completions are available (submitting queued SQEs).
    pub(crate) fn wait(&self, want: usize) -> io::Result<()> {
        match self.uring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits for every operation in flight, discarding results (used on scheduler drop),
    /// after asking the kernel to cancel them unless [`cancel_on_drop`](Self::cancel_on_drop)
    /// is off.
    ///
    /// A signal interrupts the wait (`EINTR`, when its handler lacks `SA_RESTART`); that is
    /// no reason to stop waiting, since the operations are still in flight. Only another
    /// error ends the wait early; it is returned, and the caller must then not free anything
    /// an operation may still write to.
    pub(crate) fn drain(&mut self) -> io::Result<()> {
        if self.cancel_on_drop && self.pending() {
            self.cancel_all();
        }
        while self.pending() {
            match self.uring.submit_and_wait(1) {
                Ok(_) => self.queued = 0,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
            for cqe in self.uring.completion() {
                if let Some(op) = self.ops.get_mut(cqe.user_data() as usize) {
                    op.result = Some(cqe.result());
                }
            }
        }
        Ok(())
    }

    /// Whether some operation has not completed yet.
    fn pending(&self) -> bool {
        self.ops.iter().any(|(_, op)| op.result.is_none())
    }

    /// Queues a request that cancels every operation in flight; [`drain`](Self::drain)'s
    /// wait submits it behind the queued SQEs, which are thus cancelled too. Best effort:
    /// if it cannot be queued, or the kernel cannot match any request (before 5.19: its CQE
    /// says `EINVAL`), the drain simply waits for the operations to finish on their own.
    fn cancel_all(&mut self) {
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL_KEY);
        for _ in 0..2 {
            // SAFETY: a cancel request points to no memory.
            if unsafe { self.uring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Submission queue full: send it to make room.
            if self.uring.submit().is_err() {
                return;
            }
            self.queued = 0;
        }
    }

    fn take_result(&mut self, key: usize) -> Option<i32> {
        match self.ops.get(key) {
            Some(Op {
                result: Some(r), ..
            }) => {
                let r = *r;
                let op = self.ops.remove(key);
                self.recycle(op.args);
                Some(r)
            }
            _ => None,
        }
    }

    /// Keeps a completed slot's storage for the next operation.
    fn recycle(&mut self, args: Box<OpArgs>) {
        if self.spare_args.len() < SPARE_ARGS_MAX {
            self.spare_args.push(args);
        }
    }
}

/// Submits the entry `build` makes (pointing into the op slot's storage it is handed) from
/// the current task, parks until it completes, returns the raw result.
fn submit_and_park(build: impl FnOnce(&mut OpArgs) -> squeue::Entry) -> io::Result<i32> {
    let key = sched::with_active(|s| {
        let task = s.current();
        // A failure to create the ring travels as an `io::Error` wrapping the `Error`.
        s.with_ring(|ring| ring.push(task, build))?
    })?;
    loop {
        let done = sched::with_active(|s| {
            s.ring
                .borrow_mut()
                .as_mut()
                .and_then(|r| r.take_result(key))
        });
        if let Some(res) = done {
            return Ok(res);
        }
        sched::park();
    }
}

fn to_result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

/// The iovec count for an SQE, after refusing buffers on the caller's shared stack.
fn check_bufs(bufs: &[IoBuf<'_>]) -> io::Result<u32> {
    check_off_shared_stack(bufs)?;
    u32::try_from(bufs.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Reads into `bufs` from `fd` at `offset`; returns bytes read (short at end of file).
///
/// The array `bufs` is copied into the operation's slot, so it may be a local; the buffers
/// it describes are written by the kernel after this task parks.
///
/// # Errors
/// The operation's errno; [`Error::BufferOnSharedStack`] (as `InvalidInput`) for a buffer
/// in the shared stack the caller runs on.
pub fn readv(fd: RawFd, bufs: &[IoBuf<'_>], offset: u64) -> io::Result<usize> {
    let n = check_bufs(bufs)?;
    let res = submit_and_park(|args| {
        opcode::Readv::new(types::Fd(fd), args.iovecs(bufs), n)
            .offset(offset)
            .build()
    })?;
    to_result(res)
}

/// Writes `bufs` to `fd` at `offset`; returns bytes written.
///
/// As for [`readv`]: the array is copied, the buffers are read by the kernel after this
/// task parks.
///
/// # Errors
/// As for [`readv`].
pub fn writev(fd: RawFd, bufs: &[IoBuf<'_>], offset: u64) -> io::Result<usize> {
    let n = check_bufs(bufs)?;
    let res = submit_and_park(|args| {
        opcode::Writev::new(types::Fd(fd), args.iovecs(bufs), n)
            .offset(offset)
            .build()
    })?;
    to_result(res)
}

/// `fsync` (or `fdatasync` when `datasync`) of `fd`.
pub fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    let mut op = opcode::Fsync::new(types::Fd(fd));
    if datasync {
        op = op.flags(types::FsyncFlags::DATASYNC);
    }
    to_result(submit_and_park(|_| op.build())?).map(drop)
}

/// `fallocate(fd, mode, offset, len)`: preallocate, punch holes, zero ranges.
pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let res = submit_and_park(|_| {
        opcode::Fallocate::new(types::Fd(fd), len)
            .offset(offset)
            .mode(mode)
            .build()
    })?;
    to_result(res).map(drop)
}

/// Parks the current task for `d`, using an io_uring timeout so that the same eventfd that
/// reports I/O completions also reports timer expiry. The timespec lives in the op slot:
/// the kernel reads it at submission, which may come after this task parked.
pub fn sleep(d: Duration) {
    // -ETIME is the normal expiry; any other outcome (e.g. no ring) still ends the sleep.
    let _ = submit_and_park(|args| {
        args.timespec = types::Timespec::new()
            .sec(d.as_secs())
            .nsec(d.subsec_nanos());
        opcode::Timeout::new(&args.timespec).build()
    });
}

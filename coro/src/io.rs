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
//! Remote completions ([`remote`]): a library that completes I/O on its own threads (librbd)
//! parks the task on an op slot with no SQE of ours behind it. The library's callback hands
//! the slot's [`Completer`] the result, which posts it into this ring's completion queue with
//! `IORING_OP_MSG_RING` (Linux 5.18) from a small ring of the callback's thread. The CQE
//! arrives like any other: the same eventfd fires, the same reaping wakes the task, the same
//! drain on scheduler drop waits for it. Nothing new runs on the worker thread.
//!
//! Completion-queue overflow: every parked task can have an operation in flight, so more
//! completions than the CQ holds can be outstanding. The kernel then keeps the extra CQEs on
//! an overflow list (`IORING_SQ_CQ_OVERFLOW`; with `IORING_FEAT_NODROP` none are lost) and
//! moves them to the CQ only inside a later `io_uring_enter` with `GETEVENTS`. Reaping checks
//! that flag (shared memory, no syscall) and flushes, so completions never wait for an
//! unrelated submission; the CQ is also made larger than the SQ to make overflow rare.

use std::cell::RefCell;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
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

/// Marks the `user_data` of a remote completion ([`Completer`]): bits 32..62 hold the slot's
/// generation, bits 0..32 its key. Ordinary operations' `user_data` is the bare slot key, far
/// below this bit. [`CANCEL_KEY`] has it set too and is told apart first.
const REMOTE_TAG: u64 = 1 << 62;
/// The generation bits of a remote completion's `user_data` (30 bits, shifted down).
const REMOTE_GEN_MASK: u32 = (1 << 30) - 1;

/// Submission entries of a completer thread's own ring: it sends one message at a time.
const COMPLETER_RING_ENTRIES: u32 = 4;
/// Attempts to post a remote completion before giving up (each failure is a transient
/// resource shortage of the kernel's: memory for the CQE or for the completer's ring).
const COMPLETE_ATTEMPTS: u32 = 5;

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
    /// What the kernel (or, for a remote op, the library) may still read: kept until the
    /// slot is removed after completion.
    args: Box<OpArgs>,
    /// A remote op's generation, which its completion must carry: a stale message for a
    /// reused slot (its first owner gave up before starting the I/O) is ignored.
    remote_gen: Option<u32>,
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
    /// A duplicate of the ring's descriptor that [`Completer`]s target, made on the first
    /// remote op. Each completer holds it, so the ring's file outlives every completion
    /// addressed to it: the number cannot be closed and reused for another ring whose slots
    /// a late message would then complete.
    remote_fd: Option<Arc<OwnedFd>>,
    /// The last remote op's generation.
    remote_gen: u32,
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
            remote_fd: None,
            remote_gen: 0,
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
            remote_gen: None,
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
                if let Some(task) = post(&mut self.ops, cqe.user_data(), cqe.result()) {
                    wake(task);
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
                post(&mut self.ops, cqe.user_data(), cqe.result());
            }
        }
        Ok(())
    }

    /// Reserves a slot for a remote op of `task` over `bufs` (copied into the slot).
    fn reserve_remote(
        &mut self,
        task: TaskId,
        bufs: &[IoBuf<'_>],
    ) -> io::Result<(usize, RemoteOp)> {
        let ring = match &self.remote_fd {
            Some(fd) => fd.clone(),
            None => {
                let fd = self.uring.as_raw_fd();
                // SAFETY: F_DUPFD_CLOEXEC on our own live descriptor; the result is checked.
                let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
                if dup < 0 {
                    return Err(Error::last_os("fcntl(F_DUPFD_CLOEXEC)").into());
                }
                // SAFETY: `dup` is a fresh descriptor nothing else owns.
                let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(dup) });
                self.remote_fd = Some(fd.clone());
                fd
            }
        };
        let key = self.ops.vacant_key();
        let Ok(key32) = u32::try_from(key) else {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "too many operations in flight for a remote completion key",
            ));
        };
        let iovcnt = bufs.len();
        let mut args = self.spare_args.pop().unwrap_or_else(OpArgs::new);
        let iov = args.iovecs(bufs);
        self.remote_gen = self.remote_gen.wrapping_add(1) & REMOTE_GEN_MASK;
        let gen = self.remote_gen;
        let inserted = self.ops.insert(Op {
            task,
            result: None,
            args,
            remote_gen: Some(gen),
        });
        debug_assert_eq!(inserted, key);
        let completer = Completer {
            ring,
            user_data: REMOTE_TAG | (u64::from(gen) << 32) | u64::from(key32),
            armed: true,
        };
        Ok((
            key,
            RemoteOp {
                iov,
                iovcnt,
                completer,
            },
        ))
    }

    /// Frees a reserved remote slot whose I/O never started.
    fn abandon_remote(&mut self, key: usize) {
        if self.ops.contains(key) {
            let op = self.ops.remove(key);
            self.recycle(op.args);
        }
    }

    /// Whether some operation (remote ones included) has not completed yet.
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

/// Records the result a CQE carries in its slot; returns the task to wake. A remote
/// completion whose generation does not match its slot's is stale and ignored.
fn post(ops: &mut Slab<Op>, user_data: u64, result: i32) -> Option<TaskId> {
    let (key, gen) = if user_data != CANCEL_KEY && user_data & REMOTE_TAG != 0 {
        let gen = (user_data >> 32) as u32 & REMOTE_GEN_MASK;
        ((user_data & u64::from(u32::MAX)) as usize, Some(gen))
    } else {
        (user_data as usize, None)
    };
    let op = ops.get_mut(key)?;
    if op.remote_gen != gen {
        return None;
    }
    op.result = Some(result);
    Some(op.task)
}

/// Submits the entry `build` makes (pointing into the op slot's storage it is handed) from
/// the current task, parks until it completes, returns the raw result.
fn submit_and_park(build: impl FnOnce(&mut OpArgs) -> squeue::Entry) -> io::Result<i32> {
    let key = sched::with_active(|s| {
        let task = s.current();
        // A failure to create the ring travels as an `io::Error` wrapping the `Error`.
        s.with_ring(|ring| ring.push(task, build))?
    })?;
    Ok(park_for_result(key))
}

/// Parks the current task until op slot `key` has its result, and takes it.
fn park_for_result(key: usize) -> i32 {
    loop {
        let done = sched::with_active(|s| {
            s.ring
                .borrow_mut()
                .as_mut()
                .and_then(|r| r.take_result(key))
        });
        if let Some(res) = done {
            return res;
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

/// Parks until `fd` is readable (a one-shot `IORING_OP_POLL_ADD` for `POLLIN`): for a
/// completion source that signals an eventfd (a device interrupt through VFIO), which the
/// caller then reads without blocking.
///
/// # Errors
/// The poll's errno.
pub fn wait_readable(fd: RawFd) -> io::Result<()> {
    let res =
        submit_and_park(|_| opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build())?;
    to_result(res).map(|_| ())
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

/// A remote op's start: the slot's copy of the buffers' iovec array, and the completer that
/// finishes the op. See [`remote`].
pub struct RemoteOp {
    iov: *const libc::iovec,
    iovcnt: usize,
    completer: Completer,
}

impl RemoteOp {
    /// The iovec array of the buffers passed to [`remote`]: a copy in the op's slot, owned by
    /// the ring until the completion has been delivered and the task resumed (or until the
    /// start fails), so a library may keep reading it while the task is parked (librbd reads
    /// a read's iovec array only when the data arrives).
    pub fn iovecs(&self) -> (*const libc::iovec, usize) {
        (self.iov, self.iovcnt)
    }

    /// The completer, for the library's callback (the iovec pointer stays valid as above).
    pub fn into_completer(self) -> Completer {
        self.completer
    }
}

/// Posts the result of one remote op into its task's ring, from any thread. `Send`: it is
/// meant to travel to the thread that learns of the completion.
///
/// Dropped without [`complete`](Self::complete) (a callback that unwinds), it completes
/// with `ECANCELED`, so the task is never left parked for good; [`disarm`](Self::disarm)
/// drops it silently when the op never started.
#[derive(Debug)]
pub struct Completer {
    ring: Arc<OwnedFd>,
    user_data: u64,
    armed: bool,
}

impl Completer {
    /// Delivers `result` (an errno as `-errno`, or a non-negative count) to the parked task.
    ///
    /// One `io_uring_enter` on a ring of the calling thread (made on its first use, kept
    /// until the thread exits). Transient kernel shortages are retried a few times.
    ///
    /// # Errors
    /// The error of the last attempt when the message could not be posted: the task then
    /// stays parked (the caller should log it loudly: a request is stuck).
    pub fn complete(mut self, result: i32) -> io::Result<()> {
        self.armed = false;
        send_msg_ring(self.ring.as_raw_fd(), self.user_data, result)
    }

    /// Drops the completer without delivering anything: for a start that failed before the
    /// library took the op (the task learns of the failure from [`remote`]'s start result).
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if self.armed {
            // Nothing to report to: the best that can be done is to not strand the task.
            let _ = send_msg_ring(self.ring.as_raw_fd(), self.user_data, -libc::ECANCELED);
        }
    }
}

thread_local! {
    /// The calling thread's ring for posting remote completions.
    static COMPLETER_RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Sends one `IORING_OP_MSG_RING` data message to the ring `target` and waits for the
/// source CQE (the message is posted at submission for rings without `DEFER_TASKRUN`, so
/// the wait does not sleep).
fn send_msg_ring(target: RawFd, user_data: u64, result: i32) -> io::Result<()> {
    let mut last = io::Error::from(io::ErrorKind::Other);
    for attempt in 0..COMPLETE_ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(1 << attempt));
        }
        let sent = COMPLETER_RING.try_with(|cell| {
            let mut slot = cell.borrow_mut();
            let ring = match &mut *slot {
                Some(r) => r,
                None => slot.insert(IoUring::new(COMPLETER_RING_ENTRIES)?),
            };
            msg_ring_once(ring, target, user_data, result)
        });
        let outcome = match sent {
            Ok(r) => r,
            // The thread is exiting and its ring is gone: use a ring for this one message.
            Err(_) => IoUring::new(COMPLETER_RING_ENTRIES)
                .and_then(|mut r| msg_ring_once(&mut r, target, user_data, result)),
        };
        match outcome {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// `user_data` of the message SQE on the sending ring (what its own CQE carries).
const SOURCE_KEY: u64 = 0;

fn msg_ring_once(ring: &mut IoUring, target: RawFd, user_data: u64, result: i32) -> io::Result<()> {
    let entry = opcode::MsgRingData::new(types::Fd(target), result, user_data, None)
        .build()
        .user_data(SOURCE_KEY);
    // Leftovers of an earlier failed attempt must not be taken for this message's answer.
    while ring.completion().next().is_some() {}
    // SAFETY: a MSG_RING data message points to no memory.
    unsafe { ring.submission().push(&entry) }
        .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        // Only the sender's own CQE answers (a message to this very ring lands here too).
        if let Some(cqe) = ring.completion().find(|c| c.user_data() == SOURCE_KEY) {
            return match cqe.result() {
                r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                _ => Ok(()),
            };
        }
    }
}

/// Runs an operation that a library completes on its own threads: reserves an op slot,
/// hands `start` a [`RemoteOp`] (the slot's copy of `bufs`' iovec array and a
/// [`Completer`]), parks until the completer has posted the result, and returns it.
///
/// `start` submits the operation and gives the completer to the library's callback; it
/// returns `Err` only if the operation was not started, after which nothing may use the
/// iovec array or complete (disarm the completer or drop it: a late completion of a
/// given-up slot is ignored by its generation, never mistaken for another op's).
///
/// The buffers follow [`IoBuf`]'s rules: valid until the completion, not on a coroutine
/// stack (checked against the shared stack in shared mode).
///
/// # Errors
/// `start`'s error; [`Error::BufferOnSharedStack`] (as `InvalidInput`) for a buffer on the
/// caller's shared stack; a failure to create the ring or duplicate its descriptor.
///
/// # Panics
/// Outside a task of a running scheduler.
pub fn remote(
    bufs: &[IoBuf<'_>],
    start: impl FnOnce(RemoteOp) -> io::Result<()>,
) -> io::Result<i32> {
    check_off_shared_stack(bufs)?;
    let (key, op) = sched::with_active(|s| {
        let task = s.current();
        s.with_ring(|ring| ring.reserve_remote(task, bufs))?
    })?;
    if let Err(e) = start(op) {
        sched::with_active(|s| {
            if let Some(ring) = s.ring.borrow_mut().as_mut() {
                ring.abandon_remote(key);
            }
        });
        return Err(e);
    }
    Ok(park_for_result(key))
}

/// Whether this kernel can post remote completions (`IORING_OP_MSG_RING`, Linux 5.18): a
/// message sent from a ring to itself. For a backend to refuse to start with a clear error
/// rather than strand its first request.
///
/// # Errors
/// The kernel's answer: `EINVAL` for an unknown opcode, or a ring that cannot be created.
pub fn check_remote_completions() -> io::Result<()> {
    const PROBE_KEY: u64 = 1;
    let mut ring = IoUring::new(COMPLETER_RING_ENTRIES)?;
    let fd = ring.as_raw_fd();
    let entry = opcode::MsgRingData::new(types::Fd(fd), 7, PROBE_KEY, None)
        .build()
        .user_data(SOURCE_KEY);
    // SAFETY: a MSG_RING data message points to no memory.
    unsafe { ring.submission().push(&entry) }
        .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
    let (mut sent, mut arrived) = (None, false);
    // Both CQEs are posted at submission when the opcode works; when it does not, only the
    // sender's (an error) comes, so wait for one at a time, never for the two.
    for _ in 0..2 {
        ring.submit_and_wait(1)?;
        for cqe in ring.completion() {
            match cqe.user_data() {
                SOURCE_KEY => sent = Some(cqe.result()),
                PROBE_KEY => arrived = cqe.result() == 7,
                _ => {}
            }
        }
        if matches!(sent, Some(r) if r < 0) || (sent.is_some() && arrived) {
            break;
        }
    }
    match sent {
        Some(r) if r < 0 => Err(io::Error::from_raw_os_error(-r)),
        Some(_) if arrived => Ok(()),
        _ => Err(io::Error::other("IORING_OP_MSG_RING posted no message")),
    }
}

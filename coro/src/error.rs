//! The crate's error type, for everything that sets up or drives coroutines: mapping a
//! stack, spawning a task, creating and submitting to the io_uring.
//!
//! The I/O operations in [`crate::io`] (`readv`, `fsync`, ...) keep returning [`io::Error`]:
//! their failures are the operation's own errno, which storage code maps to a virtio status by
//! kind. Should the ring have to be created during such an operation and fail, the
//! [`Error`] travels inside that `io::Error` (see the `From` impl below).

use std::io;

/// Why a coroutine, a task or an io_uring could not be set up or driven.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed. `call` names it because the errno alone does not say what ran
    /// out: `ENOMEM` from `mmap` (a stack) and from `io_uring_setup` (locked memory for a
    /// ring) call for different fixes.
    #[error("{call} failed: {source}")]
    Os {
        /// The system call or libc function that failed, e.g. `"mmap"`.
        call: &'static str,
        /// Its error, with the errno.
        #[source]
        source: io::Error,
    },
    /// A stack of `requested` usable bytes cannot be mapped: rounded up to whole pages, it
    /// does not fit in the address space (`usize`).
    #[error("coroutine stack size of {requested} bytes is too large")]
    StackTooLarge {
        /// The stack size asked for through [`Builder::stack_size`](crate::Builder::stack_size).
        requested: usize,
    },
    /// The scheduler's task table would need slot `slot`, beyond the 32-bit index that a
    /// [`TaskId`](crate::TaskId) holds. The task is not created.
    #[error("too many tasks: slot {slot} does not fit in a task id")]
    TooManyTasks {
        /// The first free slot of the task table.
        slot: usize,
    },
    /// A backend name that is not one of [`Backend::ALL`]'s (from [`Backend`]'s `FromStr`).
    ///
    /// [`Backend`]: crate::Backend
    /// [`Backend::ALL`]: crate::Backend::ALL
    #[error("unknown coroutine backend '{name}': use fast, sigaltstack, ucontext or thread")]
    UnknownBackend {
        /// The name as given.
        name: String,
    },
    /// The backend cannot run in this build (`ucontext` where libc has no ucontext).
    #[error("coroutine backend {backend} is not available in this build: {why}")]
    BackendUnavailable {
        /// The backend's name.
        backend: &'static str,
        /// Why, and what to use instead.
        why: &'static str,
    },
    /// A stack mode name that is neither `pooled` nor `shared` (from [`StackMode`]'s
    /// `FromStr`).
    ///
    /// [`StackMode`]: crate::StackMode
    #[error("unknown coroutine stack mode '{name}': use 'pooled' or 'shared'")]
    UnknownStackMode {
        /// The name as given.
        name: String,
    },
    /// `mode` cannot be used with `backend`: a shared stack needs a backend that
    /// [switches by register](crate::Backend::switches_by_register), whose parked context is
    /// exactly the bytes below one saved stack pointer.
    #[error(
        "stack mode {mode:?} needs a register-switch coroutine backend (fast or sigaltstack \
         on x86_64), not {backend:?}: use one of those or the pooled stack mode"
    )]
    StackModeUnsupported {
        /// The backend asked for, as [`effective`](crate::Backend::effective) here.
        backend: crate::Backend,
        /// The stack mode asked for.
        mode: crate::StackMode,
    },
    /// A coroutine was to be created from a coroutine running on the shared stack it would
    /// use: its start (or its first resume from there) would overwrite the running frames.
    #[error(
        "cannot create a coroutine on the shared stack of {stack_size} bytes from a \
         coroutine running on it: create it outside coroutines, or use another stack size or \
         the pooled stack mode"
    )]
    SharedStackInUse {
        /// The stack size (the shared stack's key) asked for.
        stack_size: usize,
    },
    /// An I/O buffer lies in the shared stack the calling coroutine runs on: the stack's
    /// bytes belong to another coroutine while the caller is parked, so the kernel would
    /// read or write the wrong memory.
    #[error(
        "I/O buffer at {base:#x} ({len} bytes) lies in the shared coroutine stack \
         [{stack_bottom:#x}, {stack_top:#x}): use heap or guest memory"
    )]
    BufferOnSharedStack {
        /// Start of the refused buffer.
        base: usize,
        /// Its length.
        len: usize,
        /// Lowest usable address of the shared stack.
        stack_bottom: usize,
        /// Top of the shared stack (exclusive).
        stack_top: usize,
    },
}

impl Error {
    /// `Error::Os` for `call` with the thread's current errno; call right after the failure.
    pub(crate) fn last_os(call: &'static str) -> Error {
        Error::Os {
            call,
            source: io::Error::last_os_error(),
        }
    }

    /// For `map_err`: wraps an `io::Error` that `call` returned.
    pub(crate) fn os(call: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Os { call, source }
    }
}

/// For callers whose own functions return `io::Result` (the daemon's worker setup uses `?`
/// on [`Ring::with_eventfd`](crate::io::Ring::with_eventfd)). The kind is the OS error's for
/// [`Error::Os`]; the `Error` itself stays reachable through [`io::Error::get_ref`] and
/// [`io::Error::into_inner`], so nothing is flattened into a string.
impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Os { source, .. } => source.kind(),
            Error::StackTooLarge { .. }
            | Error::UnknownBackend { .. }
            | Error::BackendUnavailable { .. }
            | Error::UnknownStackMode { .. }
            | Error::StackModeUnsupported { .. }
            | Error::BufferOnSharedStack { .. } => io::ErrorKind::InvalidInput,
            Error::TooManyTasks { .. } | Error::SharedStackInUse { .. } => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// A task the scheduler could not start ([`Scheduler::spawn`](crate::Scheduler::spawn)),
/// with its job handed back unrun: whatever the job owns (a request to answer, a buffer to
/// return) is still the caller's to dispose of, without the caller keeping a copy of it
/// for every task that did start.
pub struct SpawnError<F> {
    /// Why the task could not start.
    pub error: Error,
    /// The job, never run.
    pub job: F,
}

impl<F> std::fmt::Debug for SpawnError<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpawnError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<F> std::fmt::Display for SpawnError<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot start a task: {}", self.error)
    }
}

impl<F> std::error::Error for SpawnError<F> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<F> From<SpawnError<F>> for Error {
    fn from(e: SpawnError<F>) -> Error {
        e.error
    }
}

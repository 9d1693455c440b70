//! The RBD backend: an image in a Ceph cluster, through librbd's asynchronous API.
//!
//! Every request parks its coroutine until librbd completes it, like the file backend's
//! io_uring I/O. librbd completes requests on its own threads, while the request's task
//! lives on a worker's single-threaded `coro::Scheduler`; the bridge is
//! [`coro::io::remote`]: the task reserves an op slot in its worker's io_uring, the librbd
//! callback posts the result into that ring with `IORING_OP_MSG_RING`, and the worker's
//! ordinary completion reaping (same eventfd, same CQ) wakes the task. Why that rather than
//! `rbd_set_image_notification` + `rbd_poll_io_events` (an eventfd per image, polled by the
//! worker): an image's eventfd is per image handle, so either every worker shares one
//! handle and one eventfd (and the worker that polls must forward other workers'
//! completions across threads: a second wake-up mechanism), or each worker opens its own
//! handle, and then a guest FLUSH on one queue does not flush the writes another queue
//! left in another handle's librbd cache, and the handles of one process take the image's
//! exclusive lock from each other on every write. With MSG_RING one handle serves every
//! worker and each completion goes straight to the ring of the task that waits for it.
//! ARCHITECTURE.md ("The RBD backend") has the whole comparison.
//!
//! One cluster connection ([`Cluster`]) per process and one image handle per export,
//! shared by the export's workers (librbd's image handle takes concurrent asynchronous
//! requests from several threads; its requests are queued to its own threads).
//!
//! Failures: a cluster that cannot be reached at start fails [`RbdBackend::open`] after
//! `client_mount_timeout`; a cluster lost while running fails requests with `ETIMEDOUT`
//! (IOERR for the guest) after `rados_osd_op_timeout`, and requests succeed again once it
//! is back.
//!
//! Write cache: with `rbd_cache` on, librbd's write-around policy (the default since Ceph
//! 15) is replaced by its write-back cache. Write-around acknowledges a write before the
//! OSDs have it, and when that write then fails it is dropped and its error handed to at
//! most one later flush, and to none if no write is in flight when the flush arrives
//! (`WriteAroundObjectDispatch::flush` passes such a flush straight down): a flush could
//! succeed over a lost write. The write-back cache (`ObjectCacher`) keeps a write that
//! failed dirty and writes it again, so a flush fails while the cluster is away and
//! succeeds once everything before it is on the OSDs. That is why flush errors are not
//! sticky here, unlike the file backend's (the kernel drops pages it failed to write).

mod ffi;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coro::io::{Completer, IoBuf};
use smallvec::SmallVec;

use super::{BlockBackend, GuestBuffers, ResizeError};

/// What to open and how to reach the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdOptions {
    /// Pool name.
    pub pool: String,
    /// Image name.
    pub image: String,
    /// RADOS namespace within the pool (`None`: the default namespace).
    pub namespace: Option<String>,
    /// Ceph configuration file (`None`: librados's search, `$CEPH_CONF` then
    /// `/etc/ceph/ceph.conf`).
    pub conf: Option<PathBuf>,
    /// Client name without `client.` (`None`: `admin`).
    pub id: Option<String>,
    /// Open the image read-only.
    pub readonly: bool,
    /// Use librbd's cache (as configured; see the module docs for its policy). `false`
    /// sets `rbd_cache = false`: writes complete once the OSDs have them.
    pub cache: bool,
    /// How long connecting to the monitors may take before start-up fails.
    pub connect_timeout: Duration,
    /// How long one request may wait for the OSDs before it fails (IOERR).
    pub op_timeout: Duration,
}

/// Why an RBD image cannot be served. Each names what the user typed.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// librados or librbd cannot be loaded (not installed, or a broken installation).
    #[error("--backend rbd: cannot load {library}: {source}; install Ceph's client library (Debian: apt-get install librbd1)")]
    LoadLibrary {
        /// The file the loader looked for (`librados.so.2`, `librbd.so.1`).
        library: &'static str,
        /// The loader's message (`dlerror`).
        source: libloading::Error,
    },
    /// The library loaded but lacks a function the backend calls.
    #[error("--backend rbd: {library} has no function {symbol}{}; the RBD backend needs librbd {}.{} (Ceph 16.2) or newer (Debian: apt-get install librbd1)", dl_suffix(.source), ffi::MIN_LIBRBD.0, ffi::MIN_LIBRBD.1)]
    MissingSymbol {
        /// The library's file name.
        library: &'static str,
        /// The function's name.
        symbol: &'static str,
        /// The loader's message (`dlerror`); `None` when the symbol exists but is null.
        source: Option<libloading::Error>,
    },
    /// The installed librbd is older than the API this build was written against.
    #[error("librbd {found_major}.{found_minor}.{found_extra} is too old: the RBD backend needs librbd {}.{} (Ceph 16.2) or newer", ffi::MIN_LIBRBD.0, ffi::MIN_LIBRBD.1)]
    LibraryTooOld {
        /// Major version found.
        found_major: i32,
        /// Minor version found.
        found_minor: i32,
        /// Extra version found.
        found_extra: i32,
    },
    /// The kernel cannot post completions across rings.
    #[error("the RBD backend needs IORING_OP_MSG_RING (Linux 5.18 or newer) to deliver librbd's completions: {0}")]
    NoRemoteCompletions(#[source] io::Error),
    /// A name contains a NUL byte and cannot reach librados.
    #[error("{what} '{value}' contains a NUL byte")]
    Nul {
        /// Which option.
        what: &'static str,
        /// Its value (lossy).
        value: String,
    },
    /// `rados_create` failed.
    #[error("cannot create a Ceph client{}: {source}", id_suffix(.id))]
    Create {
        /// `--ceph-id`.
        id: Option<String>,
        /// librados's error.
        source: io::Error,
    },
    /// The configuration file cannot be read.
    #[error("cannot read Ceph configuration {}: {source}", .path.as_ref().map_or("(default search: $CEPH_CONF, /etc/ceph/ceph.conf)".into(), |p| p.display().to_string()))]
    Conf {
        /// `--ceph-conf`.
        path: Option<PathBuf>,
        /// librados's error.
        source: io::Error,
    },
    /// A configuration option was refused.
    #[error("cannot set Ceph option {option}={value}: {source}")]
    ConfSet {
        /// Option name.
        option: &'static str,
        /// Value.
        value: String,
        /// librados's error.
        source: io::Error,
    },
    /// The monitors did not answer, or refused our key.
    #[error("cannot connect to the Ceph cluster{} within {timeout_s} s: {source}; check the monitors are up and the keyring", id_suffix(.id))]
    Connect {
        /// `--ceph-id`.
        id: Option<String>,
        /// The connect timeout.
        timeout_s: u64,
        /// librados's error.
        source: io::Error,
    },
    /// No such pool.
    #[error("Ceph pool '{pool}' does not exist")]
    NoPool {
        /// `--rbd-pool`.
        pool: String,
    },
    /// The pool exists but cannot be used.
    #[error("cannot open Ceph pool '{pool}': {source}")]
    Pool {
        /// `--rbd-pool`.
        pool: String,
        /// librados's error.
        source: io::Error,
    },
    /// No such image in the pool (and namespace).
    #[error("RBD image '{image}' does not exist in pool '{pool}'{}", ns_suffix(.namespace))]
    NoImage {
        /// `--rbd-pool`.
        pool: String,
        /// `--rbd-namespace`.
        namespace: Option<String>,
        /// `--rbd-image`.
        image: String,
    },
    /// The pool's or the image's own configuration asks for librbd's write-around cache
    /// (see the module docs).
    #[error("RBD image '{image}' in pool '{pool}'{}: its {level} configuration sets rbd_cache_policy=writearound, which can let a flush succeed over a write it lost; remove it ({fix}) or pass --direct to serve the image without librbd's cache", ns_suffix(.namespace))]
    WriteAround {
        /// `--rbd-pool`.
        pool: String,
        /// `--rbd-namespace`.
        namespace: Option<String>,
        /// `--rbd-image`.
        image: String,
        /// "pool" or "image".
        level: &'static str,
        /// The `rbd config ... remove` command that undoes it.
        fix: String,
    },
    /// The image exists but cannot be opened (or sized).
    #[error("cannot open RBD image '{image}' in pool '{pool}'{}: {source}", ns_suffix(.namespace))]
    Image {
        /// `--rbd-pool`.
        pool: String,
        /// `--rbd-namespace`.
        namespace: Option<String>,
        /// `--rbd-image`.
        image: String,
        /// librbd's error.
        source: io::Error,
    },
}

fn id_suffix(id: &Option<String>) -> String {
    id.as_ref()
        .map_or_else(String::new, |id| format!(" as client.{id}"))
}

fn dl_suffix(e: &Option<libloading::Error>) -> String {
    e.as_ref().map_or_else(String::new, |e| format!(" ({e})"))
}

fn ns_suffix(ns: &Option<String>) -> String {
    ns.as_ref()
        .map_or_else(String::new, |ns| format!(", namespace '{ns}'"))
}

/// A librados/librbd return value (`-errno`) as an error.
fn errno(r: c_int) -> io::Error {
    io::Error::from_raw_os_error(r.saturating_neg())
}

fn cstring(what: &'static str, value: &str) -> Result<CString, RbdError> {
    CString::new(value).map_err(|_| RbdError::Nul {
        what,
        value: value.to_owned(),
    })
}

/// Checks the librbd loaded at run time against [`ffi::MIN_LIBRBD`], loading librados and
/// librbd first if no RBD image was opened yet.
pub fn check_librbd() -> Result<(i32, i32, i32), RbdError> {
    let lib = ffi::Api::load()?;
    let (mut major, mut minor, mut extra) = (0, 0, 0);
    // SAFETY: rbd_version writes three ints through the pointers, which point at locals.
    unsafe { (lib.rbd_version)(&mut major, &mut minor, &mut extra) };
    let (min_major, min_minor) = ffi::MIN_LIBRBD;
    // A new major version may have changed what these declarations assume.
    if major != min_major || minor < min_minor {
        return Err(RbdError::LibraryTooOld {
            found_major: major,
            found_minor: minor,
            found_extra: extra,
        });
    }
    Ok((major, minor, extra))
}

/// A connection to a Ceph cluster (`rados_t`), shut down when the last user drops it.
pub struct Cluster {
    handle: ffi::rados_t,
    /// The loaded libraries' functions.
    lib: &'static ffi::Api,
}

// SAFETY: librados cluster handles are thread-safe: the library serialises access to its
// state internally, and nothing here mutates the handle after `connect`.
unsafe impl Send for Cluster {}
// SAFETY: as for `Send`; shared use only reads configuration and opens I/O contexts.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Connects as `opts.id` with `opts.conf`, giving up after `opts.connect_timeout`, and
    /// arms `opts.op_timeout` for every later request. Loads librados and librbd first if
    /// no RBD image was opened yet.
    pub fn connect(opts: &RbdOptions) -> Result<Arc<Cluster>, RbdError> {
        let lib = ffi::Api::load()?;
        let id = opts
            .id
            .as_deref()
            .map(|i| cstring("--ceph-id", i))
            .transpose()?;
        let mut handle: ffi::rados_t = ptr::null_mut();
        // SAFETY: `handle` is a local the call fills; `id` is NUL-terminated or NULL.
        let r = unsafe {
            (lib.rados_create)(&mut handle, id.as_ref().map_or(ptr::null(), |c| c.as_ptr()))
        };
        if r < 0 {
            return Err(RbdError::Create {
                id: opts.id.clone(),
                source: errno(r),
            });
        }
        // From here `cluster`'s drop shuts the handle down on every error path.
        let cluster = Cluster { handle, lib };
        let path = match &opts.conf {
            Some(p) => Some(cstring("--ceph-conf", &p.to_string_lossy())?),
            None => None,
        };
        // SAFETY: a live handle; `path` is NUL-terminated or NULL (default search).
        let r = unsafe {
            (lib.rados_conf_read_file)(handle, path.as_ref().map_or(ptr::null(), |c| c.as_ptr()))
        };
        if r < 0 {
            return Err(RbdError::Conf {
                path: opts.conf.clone(),
                source: errno(r),
            });
        }
        let connect_s = opts.connect_timeout.as_secs().max(1);
        let op_s = opts.op_timeout.as_secs().max(1);
        // client_mount_timeout bounds rados_connect; the monitor timeout bounds the
        // monitor round trips of opening a pool and an image; the OSD timeout bounds each
        // I/O, so a lost cluster turns into errors rather than requests parked for ever.
        cluster.set("client_mount_timeout", &connect_s.to_string())?;
        cluster.set("rados_mon_op_timeout", &connect_s.to_string())?;
        cluster.set("rados_osd_op_timeout", &op_s.to_string())?;
        if !opts.cache {
            cluster.set("rbd_cache", "false")?;
            // Without a cache librbd may send the guest's buffers as they are: the
            // request's task, and with it the guest's descriptors, stays parked until the
            // OSDs have the data. A cache would keep referring to them after completing
            // the write, so with one librbd copies (and turns zero copy off itself).
            cluster.set("rbd_disable_zero_copy_writes", "false")?;
        }
        // A request is dispatched by the worker that submits it, not handed to librbd's
        // dispatch thread: one thread wake-up less per request (measured: 15-40 us of CPU
        // per 4 KiB request less at QD1, BENCHMARKS.md). The worker does not block on the
        // cluster either way: librbd's dispatch queues what must wait (the exclusive lock,
        // a refresh) and only takes in-memory locks.
        cluster.set("rbd_non_blocking_aio", "false")?;
        // See the module docs: never write-around (also with the cache off here, for an
        // image whose own settings turn it on).
        if cluster.get(c"rbd_cache_policy").as_deref() == Some("writearound") {
            cluster.set("rbd_cache_policy", "writeback")?;
        }
        // librbd's guess for guests that never flush (write through until the first
        // flush) is not needed: the device writes through by itself for a driver that did
        // not negotiate flushes or turned the write cache off (a flush after each write).
        cluster.set("rbd_cache_writethrough_until_flush", "false")?;
        // SAFETY: a live, configured handle.
        let r = unsafe { (lib.rados_connect)(handle) };
        if r < 0 {
            return Err(RbdError::Connect {
                id: opts.id.clone(),
                timeout_s: connect_s,
                source: errno(r),
            });
        }
        Ok(Arc::new(cluster))
    }

    fn set(&self, option: &'static str, value: &str) -> Result<(), RbdError> {
        let o = cstring(option, option)?;
        let v = cstring(option, value)?;
        // SAFETY: a live handle and two NUL-terminated strings, copied by librados.
        let r = unsafe { (self.lib.rados_conf_set)(self.handle, o.as_ptr(), v.as_ptr()) };
        if r < 0 {
            return Err(RbdError::ConfSet {
                option,
                value: value.to_owned(),
                source: errno(r),
            });
        }
        Ok(())
    }

    /// A configuration value as librados sees it (file, environment, our settings).
    fn get(&self, option: &CStr) -> Option<String> {
        let mut buf = [0 as c_char; 256];
        // SAFETY: a live handle; librados writes at most `buf.len()` bytes, NUL included.
        let r = unsafe {
            (self.lib.rados_conf_get)(self.handle, option.as_ptr(), buf.as_mut_ptr(), buf.len())
        };
        if r < 0 {
            return None;
        }
        // SAFETY: on success the buffer holds a NUL-terminated string.
        let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
        Some(s.to_string_lossy().into_owned())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle is live, and every I/O context made from it was destroyed
        // first (each holds an `Arc<Cluster>`).
        unsafe { (self.lib.rados_shutdown)(self.handle) };
    }
}

/// An open RBD image.
pub struct RbdBackend {
    /// The loaded libraries' functions.
    lib: &'static ffi::Api,
    image: ffi::rbd_image_t,
    ioctx: ffi::rados_ioctx_t,
    /// Kept so the connection outlives the image and its I/O context.
    _cluster: Arc<Cluster>,
    /// Changed only by [`BlockBackend::resize`].
    size: AtomicU64,
    readonly: bool,
    /// Whether librbd's cache holds writes until a flush (`rbd_cache`).
    writeback: bool,
}

// SAFETY: librbd image handles take asynchronous requests from any thread (the library
// locks its image state and queues requests to its own threads); the I/O context is only
// used by librbd through the image after opening it.
unsafe impl Send for RbdBackend {}
// SAFETY: as for `Send`: every method only submits requests through the handle.
unsafe impl Sync for RbdBackend {}

impl RbdBackend {
    /// Connects to the cluster and opens the image (read-only when `opts.readonly`).
    pub fn open(opts: &RbdOptions) -> Result<RbdBackend, RbdError> {
        check_librbd()?;
        coro::io::check_remote_completions().map_err(RbdError::NoRemoteCompletions)?;
        let cluster = Cluster::connect(opts)?;
        RbdBackend::open_in(cluster, opts)
    }

    /// Opens the image on an existing connection (one connection per process).
    pub fn open_in(cluster: Arc<Cluster>, opts: &RbdOptions) -> Result<RbdBackend, RbdError> {
        let lib = cluster.lib;
        let pool = cstring("--rbd-pool", &opts.pool)?;
        let image_name = cstring("--rbd-image", &opts.image)?;
        let namespace = opts
            .namespace
            .as_deref()
            .map(|n| cstring("--rbd-namespace", n))
            .transpose()?;
        let mut ioctx: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: a connected cluster handle, a NUL-terminated name, a local to fill.
        let r = unsafe { (lib.rados_ioctx_create)(cluster.handle, pool.as_ptr(), &mut ioctx) };
        if r == -libc::ENOENT {
            return Err(RbdError::NoPool {
                pool: opts.pool.clone(),
            });
        }
        if r < 0 {
            return Err(RbdError::Pool {
                pool: opts.pool.clone(),
                source: errno(r),
            });
        }
        let image_err = |source: io::Error| {
            if source.raw_os_error() == Some(libc::ENOENT) {
                RbdError::NoImage {
                    pool: opts.pool.clone(),
                    namespace: opts.namespace.clone(),
                    image: opts.image.clone(),
                }
            } else {
                RbdError::Image {
                    pool: opts.pool.clone(),
                    namespace: opts.namespace.clone(),
                    image: opts.image.clone(),
                    source,
                }
            }
        };
        if let Some(ns) = &namespace {
            // SAFETY: a live I/O context and a NUL-terminated string librados copies.
            unsafe { (lib.rados_ioctx_set_namespace)(ioctx, ns.as_ptr()) };
        }
        let mut image: ffi::rbd_image_t = ptr::null_mut();
        // SAFETY: a live I/O context, a NUL-terminated name, a local to fill, no snapshot.
        let r = unsafe {
            if opts.readonly {
                (lib.rbd_open_read_only)(ioctx, image_name.as_ptr(), &mut image, ptr::null())
            } else {
                (lib.rbd_open)(ioctx, image_name.as_ptr(), &mut image, ptr::null())
            }
        };
        if r < 0 {
            // SAFETY: the I/O context is live and nothing uses it any more.
            unsafe { (lib.rados_ioctx_destroy)(ioctx) };
            return Err(image_err(errno(r)));
        }
        // From here `backend`'s drop closes the image and the I/O context.
        let mut backend = RbdBackend {
            lib,
            image,
            ioctx,
            _cluster: cluster,
            size: AtomicU64::new(0),
            readonly: opts.readonly,
            writeback: false,
        };
        // The pool's and the image's own settings (`rbd config pool|image set`) override
        // the client's: the cache as the image applies it decides the write cache the
        // guest sees, and a write-around policy set there is refused (module docs).
        let config = backend
            .config(&["rbd_cache", "rbd_cache_policy"])
            .map_err(image_err)?;
        let cache = config[0].as_ref().is_some_and(|(v, _)| v == "true");
        if let (true, Some((policy, source))) = (cache, &config[1]) {
            if policy == "writearound" {
                let (level, fix) = if *source == ffi::RBD_CONFIG_SOURCE_IMAGE {
                    let ns = opts
                        .namespace
                        .as_deref()
                        .map_or(String::new(), |n| format!("{n}/"));
                    (
                        "image",
                        format!(
                            "rbd config image remove {}/{ns}{} rbd_cache_policy",
                            opts.pool, opts.image
                        ),
                    )
                } else {
                    (
                        "pool",
                        format!("rbd config pool remove {} rbd_cache_policy", opts.pool),
                    )
                };
                return Err(RbdError::WriteAround {
                    pool: opts.pool.clone(),
                    namespace: opts.namespace.clone(),
                    image: opts.image.clone(),
                    level,
                    fix,
                });
            }
        }
        backend.writeback = cache;
        let mut size = 0u64;
        // SAFETY: an open image and a local to fill.
        let r = unsafe { (lib.rbd_get_size)(backend.image, &mut size) };
        if r < 0 {
            return Err(image_err(errno(r)));
        }
        backend.size = AtomicU64::new(size);
        Ok(backend)
    }

    /// The values of `names` as the open image applies them, with where each comes from
    /// (`None`: not listed).
    fn config(
        &self,
        names: &[&str],
    ) -> Result<Vec<Option<(String, ffi::rbd_config_source_t)>>, io::Error> {
        let mut max: c_int = 0;
        // SAFETY: an open image; with no array librbd only reports the count needed.
        let r = unsafe { (self.lib.rbd_config_image_list)(self.image, ptr::null_mut(), &mut max) };
        if r != -libc::ERANGE && r < 0 {
            return Err(errno(r));
        }
        let len = usize::try_from(max).unwrap_or(0);
        let mut options: Vec<ffi::rbd_config_option_t> = (0..len)
            .map(|_| ffi::rbd_config_option_t {
                name: ptr::null_mut(),
                value: ptr::null_mut(),
                source: 0,
            })
            .collect();
        // SAFETY: an open image and an array of `max` entries, which librbd fills (each
        // string allocated by it) and `rbd_config_image_list_cleanup` frees below.
        let r =
            unsafe { (self.lib.rbd_config_image_list)(self.image, options.as_mut_ptr(), &mut max) };
        if r < 0 {
            return Err(errno(r));
        }
        let filled = usize::try_from(max).unwrap_or(0).min(options.len());
        let found = names
            .iter()
            .map(|want| {
                options[..filled].iter().find_map(|o| {
                    // SAFETY: librbd filled `name` and `value` with NUL-terminated strings
                    // that live until the cleanup below.
                    let (name, value) =
                        unsafe { (CStr::from_ptr(o.name), CStr::from_ptr(o.value)) };
                    (name.to_bytes() == want.as_bytes())
                        .then(|| (value.to_string_lossy().into_owned(), o.source))
                })
            })
            .collect();
        // SAFETY: the array librbd filled, with the count it reported.
        unsafe { (self.lib.rbd_config_image_list_cleanup)(options.as_mut_ptr(), max) };
        Ok(found)
    }

    /// Runs one librbd request from the calling coroutine and parks until it completes.
    /// `submit` starts it with the slot's iovec array and the completion it must use;
    /// it returns librbd's submission result.
    fn aio(
        &self,
        bufs: &[IoBuf<'_>],
        submit: impl FnOnce(*const libc::iovec, c_int, ffi::rbd_completion_t) -> c_int,
    ) -> io::Result<()> {
        let res = coro::io::remote(bufs, |op| {
            let (iov, n) = op.iovecs();
            let n = c_int::try_from(n).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let arg = Box::into_raw(Box::new(Waiter {
                completer: op.into_completer(),
                lib: self.lib,
            }));
            let mut c: ffi::rbd_completion_t = ptr::null_mut();
            // SAFETY: `arg` is a live heap pointer that `on_complete` takes back exactly once
            // (librbd calls a completion's callback once); `c` is a local to fill.
            let r = unsafe {
                (self.lib.rbd_aio_create_completion)(arg.cast(), Some(on_complete), &mut c)
            };
            if r < 0 {
                // SAFETY: librbd refused the completion, so it never saw `arg`: ours again.
                unsafe { Box::from_raw(arg) }.completer.disarm();
                return Err(errno(r));
            }
            let r = submit(iov, n, c);
            if r < 0 {
                // SAFETY: a refused request never completes, so neither the completion nor
                // `arg` is used by librbd any more.
                unsafe {
                    (self.lib.rbd_aio_release)(c);
                    Box::from_raw(arg).completer.disarm();
                }
                return Err(errno(r));
            }
            Ok(())
        })?;
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        Ok(())
    }
}

/// What a request hands librbd as its completion's argument: how to wake the parked
/// request, and the functions to read and release the completion with (the callback has
/// no backend to take them from).
struct Waiter {
    completer: Completer,
    lib: &'static ffi::Api,
}

/// librbd's completion callback, on one of librbd's threads: hands the result to the
/// parked request's ring.
///
/// # Safety
/// `arg` must be the `Box<Waiter>` pointer that [`RbdBackend::aio`] gave to this
/// completion, and `c` that completion; librbd calls this once per completion.
unsafe extern "C" fn on_complete(c: ffi::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: per this function's contract, `arg` is our box, taken back once.
    let waiter = unsafe { Box::from_raw(arg.cast::<Waiter>()) };
    let Waiter { completer, lib } = *waiter;
    // SAFETY: `c` is the completing request's completion, released only here.
    let r = unsafe {
        let r = (lib.rbd_aio_get_return_value)(c);
        (lib.rbd_aio_release)(c);
        r
    };
    // Reads return their length, which may not fit an i32 CQE result: only the sign is
    // needed.
    let result = if r < 0 {
        i32::try_from(r).unwrap_or(-libc::EIO)
    } else {
        0
    };
    if let Err(e) = completer.complete(result) {
        log::error!("rbd: cannot deliver a request's completion to its worker ({e}); the request stays pending");
    }
}

impl Drop for RbdBackend {
    fn drop(&mut self) {
        // SAFETY: the image and I/O context are live; the backend is dropped only once no
        // request uses it (every worker drained its requests), and librbd's close waits for
        // anything of its own still in flight.
        unsafe {
            (self.lib.rbd_close)(self.image);
            (self.lib.rados_ioctx_destroy)(self.ioctx);
        }
    }
}

/// The buffers as a slice for [`coro::io::remote`], inline up to 8.
fn io_bufs<'a>(bufs: &GuestBuffers<'a>) -> SmallVec<[IoBuf<'a>; 8]> {
    bufs.io_bufs().collect()
}

impl BlockBackend for RbdBackend {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// `rbd_resize`, synchronous (a control thread calls this, not a worker). The image's
    /// size as other clients see it changes too: librbd tells them through the header's
    /// watch.
    fn resize(&self, new_size: u64) -> Result<(), ResizeError> {
        if self.readonly {
            return Err(ResizeError::ReadOnly);
        }
        // SAFETY: an open, writable image; librbd locks its image state against the
        // requests other threads submit meanwhile.
        let r = unsafe { (self.lib.rbd_resize)(self.image, new_size) };
        if r < 0 {
            return Err(ResizeError::Storage(errno(r)));
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.readonly
    }

    /// librbd's cache setting (`rbd_cache`, default on): with it, a write completes in the
    /// client's memory and only a flush makes it durable, so the guest must flush.
    /// Per-pool or per-image overrides of `rbd_cache` are not seen here; the answer then
    /// errs on the safe side only if the global setting is on.
    fn writeback_cache(&self) -> bool {
        self.writeback
    }

    /// Irrelevant here: an RBD request puts no SQE on the worker's ring (librbd queues it
    /// to its own threads at once, and its completion arrives as a MSG_RING CQE).
    fn submit_each_io(&self) -> bool {
        false
    }

    fn read_vectored(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        let iov = io_bufs(bufs);
        self.aio(&iov, |iov, n, c| {
            // SAFETY: an open image, the slot's iovec array (valid until the
            // completion) and a fresh completion.
            unsafe { (self.lib.rbd_aio_readv)(self.image, iov, n, offset, c) }
        })
    }

    fn write_vectored(&self, bufs: &GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        let iov = io_bufs(bufs);
        self.aio(&iov, |iov, n, c| {
            // SAFETY: as for reads; librbd reads the guest's buffers (copying them at
            // submission, or, zero copy without the cache, until the completion) before
            // the completion.
            unsafe { (self.lib.rbd_aio_writev)(self.image, iov, n, offset, c) }
        })
    }

    /// `rbd_aio_flush`: every write acknowledged before it is on the OSDs, or an error
    /// (see the module docs on why a later flush may succeed again). Without the cache
    /// every write completed only once the OSDs had it, so there is nothing to flush; the
    /// device then writes through and would otherwise follow each write with a flush.
    fn flush(&self) -> io::Result<()> {
        if !self.writeback {
            return Ok(());
        }
        self.aio(&[], |_, _, c| {
            // SAFETY: an open image and a fresh completion.
            unsafe { (self.lib.rbd_aio_flush)(self.image, c) }
        })
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.aio(&[], |_, _, c| {
            // SAFETY: an open image and a fresh completion.
            unsafe { (self.lib.rbd_aio_discard)(self.image, offset, len, c) }
        })
    }

    /// Without `may_unmap` the zeroes are written thick
    /// (`RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`), as QEMU's rbd driver does: the guest did
    /// not allow the range to be deallocated.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let flags = if may_unmap {
            0
        } else {
            ffi::RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        };
        self.aio(&[], |_, _, c| {
            // SAFETY: an open image and a fresh completion.
            unsafe { (self.lib.rbd_aio_write_zeroes)(self.image, offset, len, c, flags, 0) }
        })
    }
}

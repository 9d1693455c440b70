//! Hand-written declarations of the part of librados and librbd the RBD backend uses, and
//! their loading at run time ([`Api::load`]).
//!
//! Why by hand: the registry's librbd crates are years stale, and bindgen at build time
//! would pull libclang into every build for some thirty lines. The declarations follow
//! Debian 12's `/usr/include/rados/librados.h` (librados 3.0) and `/usr/include/rbd/librbd.h`
//! (librbd 1.16, Ceph 16.2 "Pacific"); [`MIN_LIBRBD`] is checked at start with
//! `rbd_version`, so a library older than the API written here down refuses to start with
//! a clear error instead of misbehaving. Only asynchronous I/O is declared: nothing here
//! may block a worker thread on the cluster.
//!
//! Why at run time (`dlopen`) rather than linked: linking put librbd, librados,
//! libceph-common and their C++ dependencies (about 15 MiB of RSS) into every corodev
//! process, also those serving a file or null export, and a corodev binary would not start
//! at all on a host without Ceph's libraries. Now they are mapped only by the first RBD
//! open, and a missing library is an error of that export, not of the process. Once
//! loaded they stay loaded for the life of the process: librbd's threads (messenger,
//! completions) run its code until the process exits, so nothing here ever unloads them.
//!
//! Everything in [`Api`] is `unsafe` to call; the safe wrappers live in the parent module,
//! which states at each call why its pointers are valid.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::os::unix::{Library as UnixLibrary, RTLD_LOCAL, RTLD_NOW};
use libloading::Library;

use super::RbdError;

/// A cluster handle (`rados_t`).
pub type rados_t = *mut c_void;
/// A pool I/O context (`rados_ioctx_t`).
pub type rados_ioctx_t = *mut c_void;
/// An open image (`rbd_image_t`).
pub type rbd_image_t = *mut c_void;
/// An asynchronous request's completion (`rbd_completion_t`).
pub type rbd_completion_t = *mut c_void;
/// Called by librbd, on one of its own threads, when a request completes.
pub type rbd_callback_t = Option<unsafe extern "C" fn(cb: rbd_completion_t, arg: *mut c_void)>;

/// `rbd_aio_write_zeroes` flag: allocate the zeroed range rather than deallocate it.
pub const RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1 << 0;

/// Where an image's configuration value comes from (`rbd_config_source_t`).
pub type rbd_config_source_t = c_int;
/// Set on the image (`rbd config image set`).
pub const RBD_CONFIG_SOURCE_IMAGE: rbd_config_source_t = 2;

/// One configuration option of an open image, as librbd applies it (`rbd_config_option_t`).
#[repr(C)]
pub struct rbd_config_option_t {
    /// Option name, NUL-terminated.
    pub name: *mut c_char,
    /// Its value, NUL-terminated.
    pub value: *mut c_char,
    /// Where the value comes from.
    pub source: rbd_config_source_t,
}

/// The oldest librbd whose API matches these declarations: (major, minor).
pub const MIN_LIBRBD: (c_int, c_int) = (1, 16);

/// librados's file name as its package installs it (the soname: ABI 2).
pub const LIBRADOS: &str = "librados.so.2";
/// librbd's file name as its package installs it (the soname: ABI 1).
pub const LIBRBD: &str = "librbd.so.1";

/// A library opened by [`open`], never closed.
struct Loaded {
    /// Its file name, for errors.
    name: &'static str,
    lib: &'static Library,
}

/// The two libraries, as `api!`'s groups name them.
struct Libraries {
    rados: Loaded,
    rbd: Loaded,
}

/// Declares [`Api`], one function pointer field per C function, under the library that
/// exports it, and `Api::resolve`, which fills each field with the symbol of the field's
/// own name (`stringify!`) from that library: a field cannot be filled with another
/// function than the one it is named after, so each field's type only has to match the C
/// declaration of its name.
macro_rules! api {
    ($(
        $lib:ident {
            $(
                $(#[$doc:meta])*
                fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;
            )*
        }
    )*) => {
        /// The librados and librbd functions the backend calls, resolved once per process.
        pub struct Api {
            $($(
                $(#[$doc])*
                pub $name: unsafe extern "C" fn($($arg: $ty),*) $(-> $ret)?,
            )*)*
        }

        impl Api {
            /// Looks every function up in `libs`.
            fn resolve(libs: &Libraries) -> Result<Api, RbdError> {
                Ok(Api {
                    $($(
                        // SAFETY: the field's type is `unsafe extern "C" fn` with the
                        // parameters and return type of the C declaration of the same
                        // name in the group's header, translated as the comment on the
                        // invocation says; the library stays loaded for ever (`open`).
                        $name: unsafe {
                            symbol(&libs.$lib, concat!(stringify!($name), "\0"))?
                        },
                    )*)*
                })
            }
        }
    };
}

// Each group's functions with their types as `/usr/include/rados/librados.h` (group
// `rados`) and `/usr/include/rbd/librbd.h` (group `rbd`) declare them: same parameter
// order, `T *` as `*mut T`, `const T *` as `*const T`, `int` as `c_int`, `uint64_t` as
// `u64`, `size_t` as `usize`, `ssize_t` as `isize`, a `void` return as none, and the
// handles (`rados_t`, `rados_ioctx_t`, `rbd_image_t`, `rbd_completion_t`) as the `void *`
// they are typedefs of. `const char * const id` is `*const c_char` (the second `const`
// is the parameter's own, invisible to the caller).
api! {
    rados {
        /// `id` is the client name without `client.` (NULL: `admin`).
        fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
        /// `path` NULL: the default search (`$CEPH_CONF`, `/etc/ceph/ceph.conf`, ...).
        fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
        fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
        fn rados_conf_get(
            cluster: rados_t,
            option: *const c_char,
            buf: *mut c_char,
            len: usize,
        ) -> c_int;
        fn rados_connect(cluster: rados_t) -> c_int;
        fn rados_shutdown(cluster: rados_t);
        fn rados_ioctx_create(
            cluster: rados_t,
            pool_name: *const c_char,
            ioctx: *mut rados_ioctx_t,
        ) -> c_int;
        fn rados_ioctx_destroy(io: rados_ioctx_t);
        /// `nspace` NULL or empty: the default namespace.
        fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
    }
    rbd {
        fn rbd_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
        fn rbd_open(
            io: rados_ioctx_t,
            name: *const c_char,
            image: *mut rbd_image_t,
            snap_name: *const c_char,
        ) -> c_int;
        fn rbd_open_read_only(
            io: rados_ioctx_t,
            name: *const c_char,
            image: *mut rbd_image_t,
            snap_name: *const c_char,
        ) -> c_int;
        fn rbd_close(image: rbd_image_t) -> c_int;
        fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
        /// Synchronous: returns once the image has the new size (shrinking deletes the
        /// objects past the end first).
        fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
        /// Every option as the open image applies it; `-ERANGE` and the count needed in
        /// `max_options` when `options` is too short.
        fn rbd_config_image_list(
            image: rbd_image_t,
            options: *mut rbd_config_option_t,
            max_options: *mut c_int,
        ) -> c_int;
        /// Frees what a successful `rbd_config_image_list` filled in.
        fn rbd_config_image_list_cleanup(options: *mut rbd_config_option_t, max_options: c_int);

        fn rbd_aio_create_completion(
            cb_arg: *mut c_void,
            complete_cb: rbd_callback_t,
            c: *mut rbd_completion_t,
        ) -> c_int;
        fn rbd_aio_get_return_value(c: rbd_completion_t) -> isize;
        fn rbd_aio_release(c: rbd_completion_t);

        /// The iovec array is read when the data arrives, not only at submission: it must
        /// stay valid until the completion.
        fn rbd_aio_readv(
            image: rbd_image_t,
            iov: *const libc::iovec,
            iovcnt: c_int,
            off: u64,
            c: rbd_completion_t,
        ) -> c_int;
        fn rbd_aio_writev(
            image: rbd_image_t,
            iov: *const libc::iovec,
            iovcnt: c_int,
            off: u64,
            c: rbd_completion_t,
        ) -> c_int;
        fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
        fn rbd_aio_discard(image: rbd_image_t, off: u64, len: u64, c: rbd_completion_t) -> c_int;
        fn rbd_aio_write_zeroes(
            image: rbd_image_t,
            off: u64,
            len: usize,
            c: rbd_completion_t,
            zero_flags: c_int,
            op_flags: c_int,
        ) -> c_int;
    }
}

/// The process's [`Api`], set by the first successful [`Api::load`].
static API: OnceLock<Api> = OnceLock::new();

impl Api {
    /// The functions, loading librados and librbd on the first call. A failure is not
    /// remembered: a later open (a config reload, `export-add`) tries again, e.g. once the
    /// library is installed.
    pub fn load() -> Result<&'static Api, RbdError> {
        if let Some(api) = API.get() {
            return Ok(api);
        }
        let libs = Libraries {
            rados: open(LIBRADOS)?,
            rbd: open(LIBRBD)?,
        };
        let api = Api::resolve(&libs)?;
        // Two threads that load at once both get here; the loser's `api` is dropped (it is
        // only pointers) and its libraries stay open like the winner's, the same objects.
        Ok(API.get_or_init(|| api))
    }
}

/// Opens `name` with the dynamic loader's search (`ld.so.conf`, `LD_LIBRARY_PATH`) and
/// keeps it open for the life of the process: the handle is leaked, never closed, so
/// neither librbd's threads nor a copied function pointer can outlive its code.
///
/// `RTLD_NOW`: every symbol librbd itself needs is bound here, so a broken installation (a
/// librbd newer than its libceph-common) fails at this open with the loader's message,
/// not with a lazy-binding abort in the middle of a request. `RTLD_LOCAL`: its symbols do
/// not become visible to anything else the process loads.
fn open(name: &'static str) -> Result<Loaded, RbdError> {
    // SAFETY: running the library's initialisers is what linking it did before main; they
    // are safe to run later too, as QEMU's block-rbd module and Python's rbd module (both
    // loaded with dlopen) show. Its termination routines never run early: it is never
    // unloaded (leaked below).
    let lib =
        unsafe { UnixLibrary::open(Some(name), RTLD_NOW | RTLD_LOCAL) }.map_err(|source| {
            RbdError::LoadLibrary {
                library: name,
                source,
            }
        })?;
    Ok(Loaded {
        name,
        lib: Box::leak(Box::new(Library::from(lib))),
    })
}

/// The function `name` (NUL-terminated) of `lib`, as `F`.
///
/// # Safety
/// `F` must be the `unsafe extern "C" fn` type of `name`'s C declaration. (The pointer
/// stays valid for ever: `lib` is never unloaded, see [`open`].)
unsafe fn symbol<F: Copy>(lib: &Loaded, name: &'static str) -> Result<F, RbdError> {
    let missing = |source| RbdError::MissingSymbol {
        library: lib.name,
        symbol: name.trim_end_matches('\0'),
        source,
    };
    // SAFETY: `Option<F>`, for the function pointer type `F` of the caller's contract, is
    // one pointer whose null is `None`: the symbol's address is read as it is, and a null
    // address (which `dlsym` may return without an error) becomes `None`, not a null `F`.
    let found =
        unsafe { lib.lib.get::<Option<F>>(name.as_bytes()) }.map_err(|e| missing(Some(e)))?;
    (*found).ok_or_else(|| missing(None))
}

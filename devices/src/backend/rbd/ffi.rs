//! Hand-written declarations of the part of librados and librbd the RBD backend uses.
//!
//! Why by hand: the registry's librbd crates are years stale, and bindgen at build time
//! would pull libclang into every build for some thirty lines. The declarations follow
//! Debian 12's `/usr/include/rados/librados.h` (librados 3.0) and `/usr/include/rbd/librbd.h`
//! (librbd 1.16, Ceph 16.2 "Pacific"); [`MIN_LIBRBD`] is checked at start with
//! `rbd_version`, so a library older than the API written here down refuses to start with
//! a clear error instead of misbehaving. Only asynchronous I/O is declared: nothing here
//! may block a worker thread on the cluster.
//!
//! Everything is `unsafe` to call; the safe wrappers live in the parent module, which
//! states at each call why its pointers are valid.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void};

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

#[link(name = "rados")]
extern "C" {
    /// `id` is the client name without `client.` (NULL: `admin`).
    pub fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    /// `path` NULL: the default search (`$CEPH_CONF`, `/etc/ceph/ceph.conf`, ...).
    pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_conf_get(
        cluster: rados_t,
        option: *const c_char,
        buf: *mut c_char,
        len: usize,
    ) -> c_int;
    pub fn rados_connect(cluster: rados_t) -> c_int;
    pub fn rados_shutdown(cluster: rados_t);
    pub fn rados_ioctx_create(
        cluster: rados_t,
        pool_name: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    pub fn rados_ioctx_destroy(io: rados_ioctx_t);
    /// `nspace` NULL or empty: the default namespace.
    pub fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
}

#[link(name = "rbd")]
extern "C" {
    pub fn rbd_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
    pub fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: rbd_image_t) -> c_int;
    pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    /// Synchronous: returns once the image has the new size (shrinking deletes the
    /// objects past the end first).
    pub fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
    /// Every option as the open image applies it; `-ERANGE` and the count needed in
    /// `max_options` when `options` is too short.
    pub fn rbd_config_image_list(
        image: rbd_image_t,
        options: *mut rbd_config_option_t,
        max_options: *mut c_int,
    ) -> c_int;
    /// Frees what a successful `rbd_config_image_list` filled in.
    pub fn rbd_config_image_list_cleanup(options: *mut rbd_config_option_t, max_options: c_int);

    pub fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_get_return_value(c: rbd_completion_t) -> isize;
    pub fn rbd_aio_release(c: rbd_completion_t);

    /// The iovec array is read when the data arrives, not only at submission: it must
    /// stay valid until the completion.
    pub fn rbd_aio_readv(
        image: rbd_image_t,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_writev(
        image: rbd_image_t,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
    pub fn rbd_aio_discard(image: rbd_image_t, off: u64, len: u64, c: rbd_completion_t) -> c_int;
    pub fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        off: u64,
        len: usize,
        c: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
}

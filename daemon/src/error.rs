//! Errors that stop the daemon (startup and connection setup). Guest faults never reach
//! here: they end one request with an error status.

use std::io;
use std::path::PathBuf;

/// Why the daemon cannot start or serve.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk image does not exist or cannot be opened.
    #[error("cannot open disk {0}: {1}; check the path and permissions")]
    OpenDisk(PathBuf, io::Error),
    /// The disk size is not a whole number of logical blocks.
    #[error("disk {path} is {size} bytes, not a multiple of the {block_size}-byte block size; resize it (e.g. qemu-img resize) or use --block-size 512")]
    DiskSize {
        /// Disk path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The configured logical block size.
        block_size: u32,
    },
    /// The disk is empty.
    #[error("disk {0} is empty; give it a size (e.g. truncate -s 1G {0})")]
    DiskEmpty(PathBuf),
    /// Another daemon accepts connections on the socket.
    #[error("socket {0} is in use by a running daemon; stop it or choose another --socket path")]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket.
    #[error("{0} exists and is not a socket; remove it or choose another --socket path")]
    SocketNotASocket(PathBuf),
    /// The socket cannot be created.
    #[error("cannot listen on socket {0}: {1}")]
    Socket(PathBuf, io::Error),
    /// Setting up a vhost-user connection failed.
    #[error("vhost-user setup failed: {0}")]
    Vhost(String),
    /// An OS resource (eventfd, thread) could not be created.
    #[error("{0}: {1}")]
    Os(&'static str, io::Error),
}

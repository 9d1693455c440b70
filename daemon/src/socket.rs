//! The listening socket: refuse a live one, replace a stale one.
//!
//! A socket file left behind by a daemon that crashed would make `bind` fail with
//! EADDRINUSE, so an operator would have to delete it by hand after every crash. We probe it
//! instead: if a connect succeeds another daemon is serving it and we refuse to start; if
//! the connect is refused nobody listens and the file is removed.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use vhost::vhost_user::Listener;

use crate::error::Error;

fn socket_error(path: &Path, source: io::Error) -> Error {
    Error::Socket {
        path: path.to_owned(),
        source,
    }
}

/// Binds `path` for vhost-user, after checking it is not in use.
pub fn bind(path: &Path) -> Result<Listener, Error> {
    bind_unix(path, None).map(Listener::from)
}

/// Binds a listening unix socket at `path`, after checking it is not in use; with
/// `mode`, the socket file has those permissions before it appears at `path`.
pub fn bind_unix(path: &Path, mode: Option<std::fs::Permissions>) -> Result<UnixListener, Error> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(Error::SocketNotASocket(path.to_owned()));
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(Error::SocketInUse(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("replacing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(|e| socket_error(path, e))?;
            }
            Err(e) => return Err(socket_error(path, e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_error(path, e)),
    }
    // Bind under a temporary name and rename into place, so the socket file appears only
    // once it accepts connections: a frontend (or a test, or systemd) that waits for the
    // file never sees ECONNREFUSED from a bound-but-not-listening socket.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| socket_error(path, e))?;
    let placed = match mode {
        Some(mode) => std::fs::set_permissions(&tmp, mode),
        None => Ok(()),
    }
    .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(socket_error(path, e));
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_live_replaces_stale_rejects_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = dir.path().join("live.sock");
        let _keep = UnixListener::bind(&live).expect("bind");
        assert!(matches!(bind(&live), Err(Error::SocketInUse(_))));

        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).expect("bind"));
        assert!(stale.exists(), "a closed listener leaves its file behind");
        assert!(bind(&stale).is_ok());

        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        assert!(matches!(bind(&file), Err(Error::SocketNotASocket(_))));
        assert_eq!(std::fs::read(&file).expect("read"), b"x", "nothing is lost");
    }
}

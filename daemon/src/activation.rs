//! Socket activation: the vhost-user socket handed over by systemd (or any activator that
//! speaks the `LISTEN_FDS` protocol, such as `systemd-socket-activate`) instead of one we
//! bind ourselves.
//!
//! Why: a socket unit owns the socket, so it outlives the daemon. While corodev restarts
//! (an upgrade, a crash and `Restart=`), a QEMU with `reconnect=1` finds the socket still
//! there, its connect is queued by the kernel, and the next corodev accepts it: the guest
//! never sees the disk go away.
//!
//! Sockets are matched to exports **by name** (`LISTEN_FDNAMES`, the socket unit's
//! `FileDescriptorName=`), not by position, so that one process serving several exports
//! (a `--config` file's) takes each export's socket from the same set, by the export's
//! name (`name`/`--name`, default: the socket file's name without its extension). One
//! socket without a name (an activator that sets no `LISTEN_FDNAMES`) is taken by the
//! first export that asks. The registry ([`crate::exports`]) keeps a claimed socket for
//! the life of the process, so an export restarted by a reload serves it again.
//!
//! Boundary: this module checks what it is given (a listening `AF_UNIX` stream socket,
//! bound to the `--socket` path) and returns it. It never unlinks or replaces the socket
//! file: the activator owns it.
//!
//! The `LISTEN_*` variables are left in the environment (removing them is only sound before
//! any thread starts, and corodev starts no other programs that could inherit them).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// The name systemd gives a passed descriptor when none was configured.
const UNNAMED: &str = "unknown";

/// Listening sockets passed by the activator, each with its name, not yet claimed.
pub struct Activated {
    fds: Vec<(OwnedFd, String)>,
}

impl Activated {
    /// The sockets passed to this process (`LISTEN_PID` is ours), or `None` when the
    /// process was not socket-activated. The descriptors are made close-on-exec.
    pub fn from_env() -> Result<Option<Activated>, Error> {
        let fds: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()
            .map_err(Error::ActivationEnv)?
            .collect();
        if fds.is_empty() {
            return Ok(None);
        }
        let fds = fds
            .into_iter()
            .map(|(fd, name)| {
                // SAFETY: the activator passed `fd` to this process for it to own
                // (sd_listen_fds(3)); `listen_fds_with_names` checked LISTEN_PID is ours and
                // is called once, so nothing else in the process owns or closes it.
                (unsafe { OwnedFd::from_raw_fd(fd) }, name)
            })
            .collect();
        Ok(Some(Activated { fds }))
    }

    /// The names of the sockets not yet claimed.
    pub fn names(&self) -> Vec<&str> {
        self.fds.iter().map(|(_, n)| n.as_str()).collect()
    }

    /// Claims the socket of export `name`, which must be a listening unix stream socket
    /// bound to `path` (the `--socket` the export is configured with).
    pub fn take(&mut self, name: &str, path: &Path) -> Result<UnixListener, Error> {
        let index = match self.fds.iter().position(|(_, n)| n == name) {
            Some(i) => i,
            None if self.fds.len() == 1 && self.fds[0].1 == UNNAMED => 0,
            None => {
                return Err(Error::ActivationNoSocket {
                    name: name.to_owned(),
                    names: self.names().join(":"),
                })
            }
        };
        let (fd, _) = self.fds.remove(index);
        check_listening_unix_stream(&fd).map_err(|what| Error::ActivationNotListening {
            name: name.to_owned(),
            what,
        })?;
        let listener = UnixListener::from(fd);
        check_bound(name, &listener, path)?;
        // An activator may pass it non-blocking (NonBlocking=yes); the accept loop blocks.
        listener
            .set_nonblocking(false)
            .map_err(|source| Error::Socket {
                path: path.to_owned(),
                source,
            })?;
        Ok(listener)
    }
}

/// `Ok` if the activated socket of export `name` is bound to `path` (the export's socket).
pub(crate) fn check_bound(name: &str, listener: &UnixListener, path: &Path) -> Result<(), Error> {
    let bound = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_owned));
    if same_file(bound.as_deref(), path) {
        Ok(())
    } else {
        Err(Error::ActivationPath {
            name: name.to_owned(),
            bound: bound.map_or_else(|| "no path".into(), |p| p.display().to_string()),
            socket: path.to_owned(),
        })
    }
}

/// Whether `bound` (the activated socket's address) names the same file as `socket`.
/// Compared after resolving both: the unit may say `/run/corodev/x.sock` and the
/// command line `/var/run/corodev/x.sock`.
fn same_file(bound: Option<&Path>, socket: &Path) -> bool {
    let Some(bound) = bound else {
        return false;
    };
    let resolve = |p: &Path| -> Option<PathBuf> { std::fs::canonicalize(p).ok() };
    match (resolve(bound), resolve(socket)) {
        (Some(a), Some(b)) => a == b,
        _ => bound == socket,
    }
}

/// `Ok` for a listening `AF_UNIX` `SOCK_STREAM` socket; otherwise what it is instead.
fn check_listening_unix_stream(fd: &OwnedFd) -> Result<(), String> {
    let raw = fd.as_raw_fd();
    let get = |opt| sockopt(raw, opt).map_err(|e| format!("not a socket: {e}"));
    let domain = get(libc::SO_DOMAIN)?;
    if domain != libc::AF_UNIX {
        return Err(format!("address family {domain}, not AF_UNIX"));
    }
    if get(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err("not a stream socket (ListenDatagram/ListenSequentialPacket?)".into());
    }
    if get(libc::SO_ACCEPTCONN)? == 0 {
        return Err("not listening (Accept=yes passes connections, not the socket)".into());
    }
    Ok(())
}

/// An integer `SOL_SOCKET` option of `fd`.
fn sockopt(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` is the size of `value`, as
    // getsockopt requires for an integer option; a bad `fd` only makes it fail.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn owned(l: impl Into<OwnedFd>) -> OwnedFd {
        l.into()
    }

    #[test]
    fn takes_by_name_and_checks_kind_and_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.sock");
        let b = dir.path().join("b.sock");
        let mut act = Activated {
            fds: vec![
                (owned(UnixListener::bind(&a).expect("bind")), "a".into()),
                (owned(UnixListener::bind(&b).expect("bind")), "b".into()),
            ],
        };
        assert!(matches!(
            act.take("c", &a),
            Err(Error::ActivationNoSocket { ref names, .. }) if names == "a:b"
        ));
        assert!(matches!(
            act.take("b", &a),
            Err(Error::ActivationPath { .. })
        ));
        assert_eq!(
            act.names(),
            vec!["a"],
            "a refused socket is not offered again"
        );
        assert!(act.take("a", &a).is_ok());
    }

    #[test]
    fn refuses_a_datagram_socket_and_takes_one_unnamed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("d.sock");
        let mut act = Activated {
            fds: vec![(owned(UnixDatagram::bind(&d).expect("bind")), UNNAMED.into())],
        };
        assert!(matches!(
            act.take("vm1", &d),
            Err(Error::ActivationNotListening { ref what, .. }) if what.contains("not a stream")
        ));
        let l = dir.path().join("l.sock");
        let mut act = Activated {
            fds: vec![(owned(UnixListener::bind(&l).expect("bind")), UNNAMED.into())],
        };
        assert!(
            act.take("vm1", &l).is_ok(),
            "one unnamed socket is the export's"
        );
    }
}

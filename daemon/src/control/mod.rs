//! The control socket (`--control PATH`): a QMP-shaped JSON API ([`protocol`]) through
//! which an operator or a management layer asks the running daemon what it serves and
//! changes it ([`commands`]); `corodev ctl` is its client ([`crate::ctl`]).
//!
//! It runs on tokio, on a thread of its own with a single-threaded runtime: the control
//! plane waits on sockets and timers, which is what tokio is for; the data path (worker
//! threads, coroutines, io_uring) never touches tokio. Commands that block (opening a
//! disk, draining an export) run on tokio's blocking pool, so one slow command does not
//! hold up other clients or the events.
//!
//! A session: greeting; `qmp_capabilities` (anything else first is refused, as QMP
//! refuses it); then one request at a time, each answered in order, with events
//! ([`crate::events`]) written between answers. Malformed JSON, unknown commands and bad
//! arguments are answered with a structured error; the session and the daemon go on. A
//! line longer than [`protocol::MAX_LINE`] ends that session only.
//!
//! The socket is created mode 0600 (the daemon's user); under systemd, a socket unit
//! may pass it instead (`FileDescriptorName=control`), with its own mode and group.

pub mod commands;
pub mod protocol;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, Semaphore};

use crate::error::Error;
use commands::Context;
use protocol::{CommandError, MAX_LINE};

/// Most control clients served at once; more wait in the listen backlog until one leaves.
const MAX_SESSIONS: usize = 16;

/// The control socket's name under socket activation (`FileDescriptorName=`).
pub const ACTIVATION_NAME: &str = "control";

/// The control socket, serving on its own thread. Dropping it removes a socket file this
/// process bound (an activated one is its activator's); the thread ends with the process.
pub struct ControlServer {
    bound: Option<PathBuf>,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Some(path) = &self.bound {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds the control socket at `path`, mode 0600 (a live socket there is refused, a stale
/// one replaced, as for export sockets).
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, Error> {
    crate::socket::bind_unix(path, Some(std::fs::Permissions::from_mode(0o600)))
}

/// Serves the control API on `listener` (bound at `path`; `activated`: passed by the
/// activator, which owns the file) on a new thread.
pub fn spawn(
    listener: std::os::unix::net::UnixListener,
    path: &Path,
    activated: bool,
    ctx: Context,
) -> Result<ControlServer, Error> {
    let os = |what| move |source| Error::Os { what, source };
    listener
        .set_nonblocking(true)
        .map_err(os("making the control socket non-blocking"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(MAX_SESSIONS)
        .build()
        .map_err(os("starting the control plane's runtime"))?;
    let display = path.display().to_string();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            runtime.block_on(async move {
                match UnixListener::from_std(listener) {
                    Ok(listener) => accept_loop(listener, Arc::new(ctx)).await,
                    Err(e) => log::error!("control socket {display}: {e}; the control API is off"),
                }
            })
        })
        .map_err(os("starting the control thread"))?;
    log::info!("control API listening on {}", path.display());
    Ok(ControlServer {
        bound: (!activated).then(|| path.to_owned()),
    })
}

async fn accept_loop(listener: UnixListener, ctx: Arc<Context>) {
    let sessions = Arc::new(Semaphore::new(MAX_SESSIONS));
    loop {
        let Ok(permit) = sessions.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(stream, ctx).await {
                        log::debug!("control session ended: {e}");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                log::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// What a session reads next: a request line, or nothing more.
enum Input {
    Line(Vec<u8>),
    TooLong,
    Closed,
}

/// Reads up to the end of the next line into `line`. Cancel-safe (the session drops it
/// when an event is to be written): what was read so far stays in `line`.
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<Input> {
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(if line.is_empty() {
                Input::Closed
            } else {
                Input::Line(std::mem::take(line))
            });
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if line.len() + take > MAX_LINE + 1 {
            return Ok(Input::TooLong);
        }
        line.extend_from_slice(&chunk[..take]);
        reader.consume(take);
        if done {
            return Ok(Input::Line(std::mem::take(line)));
        }
    }
}

async fn write_line(
    stream: &mut tokio::net::unix::OwnedWriteHalf,
    value: &Value,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    bytes.extend_from_slice(b"\r\n");
    stream.write_all(&bytes).await
}

async fn session(stream: UnixStream, ctx: Arc<Context>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    write_line(&mut write, &protocol::greeting()).await?;
    // Subscribed at negotiation; `None` before it (and if the channel ever closed).
    let mut events: Option<broadcast::Receiver<crate::events::Event>> = None;
    let mut negotiated = false;
    let mut partial = Vec::new();
    loop {
        let input = tokio::select! {
            input = read_request(&mut reader, &mut partial) => input?,
            event = next_event(&mut events) => {
                match event {
                    Ok(e) => write_line(&mut write, &protocol::event(&e)).await?,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        log::warn!("control client too slow: {n} event(s) not delivered");
                    }
                    Err(broadcast::error::RecvError::Closed) => events = None,
                }
                continue;
            }
        };
        let line = match input {
            Input::Closed => return Ok(()),
            Input::TooLong => {
                let err = CommandError::generic(format!(
                    "request line longer than {MAX_LINE} bytes; closing the connection"
                ));
                return write_line(&mut write, &protocol::answer(Err(err), None)).await;
            }
            Input::Line(line) => line,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // The command whose successful answer this is, for what follows it.
        let mut succeeded = None;
        let reply = match protocol::parse(&line) {
            Err((err, id)) => protocol::answer(Err(err), id),
            Ok(req) if !negotiated => {
                let id = req.id.clone();
                let result = if req.execute == "qmp_capabilities" {
                    negotiated = true;
                    events = Some(ctx.exports.events().subscribe());
                    Ok(serde_json::json!({}))
                } else {
                    Err(CommandError::not_found(
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    ))
                };
                protocol::answer(result, id)
            }
            Ok(req) => {
                let id = req.id.clone();
                let execute = req.execute.clone();
                let ctx = ctx.clone();
                let result = tokio::task::spawn_blocking(move || commands::run(&ctx, req))
                    .await
                    .unwrap_or_else(|e| {
                        log::error!("control command failed: {e} (a bug; please report it)");
                        Err(CommandError::generic(
                            "the command failed inside the daemon",
                        ))
                    });
                if result.is_ok() {
                    succeeded = Some(execute);
                }
                protocol::answer(result, id)
            }
        };
        write_line(&mut write, &reply).await?;
        if let Some(execute) = succeeded {
            commands::after_answer(&ctx, &execute);
        }
    }
}

/// The next event of a negotiated session; never, before negotiation.
async fn next_event(
    events: &mut Option<broadcast::Receiver<crate::events::Event>>,
) -> Result<crate::events::Event, broadcast::error::RecvError> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

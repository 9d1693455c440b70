//! Driving corodev's control API from tests: `corodev ctl` as an operator runs it
//! ([`ctl`]), and a raw connection for what no well-behaved client sends ([`RawSession`]).
//! A QMP-speaking client is [`crate::Qmp`]: the control API is QMP-shaped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::corodev_bin;

/// What `corodev ctl` did: exit code, stdout, stderr.
#[derive(Debug)]
pub struct CtlOutput {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// The answer, pretty JSON.
    pub stdout: String,
    /// The error line, if any.
    pub stderr: String,
}

impl CtlOutput {
    /// The answer as JSON, asserting the command succeeded.
    pub fn json(&self) -> Value {
        assert_eq!(self.code, 0, "corodev ctl failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("corodev ctl printed no JSON ({e}): {}", self.stdout))
    }
}

/// Runs `corodev ctl --control <control> <args>`.
pub fn ctl(control: &Path, args: &[&str]) -> CtlOutput {
    let out = Command::new(corodev_bin())
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run corodev ctl");
    CtlOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A control connection that sends lines exactly as given.
pub struct RawSession {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl RawSession {
    /// Connects and returns the session with the greeting read.
    pub fn connect(control: &Path) -> (RawSession, Value) {
        let stream = UnixStream::connect(control)
            .unwrap_or_else(|e| panic!("connect {}: {e}", control.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut s = RawSession {
            writer: stream,
            reader,
        };
        let greeting = s.read().expect("a greeting");
        (s, greeting)
    }

    /// Sends `bytes` and a newline, and returns the next line (`None`: the daemon closed
    /// the connection). The daemon may answer and hang up before it has read everything
    /// (a line over its limit): a write refused by a closed connection is not an error,
    /// the answer already sent still is read.
    pub fn send(&mut self, bytes: &[u8]) -> Option<Value> {
        let sent = self
            .writer
            .write_all(bytes)
            .and_then(|()| self.writer.write_all(b"\n"));
        match sent {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => panic!("sending to the control socket: {e}"),
        }
        self.read()
    }

    /// The next line, as JSON; `None` at end of stream.
    pub fn read(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}")),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading the control socket: {e}"),
        }
    }
}

//! A minimal QMP client (QEMU Machine Protocol, JSON lines over a unix socket): connect,
//! negotiate capabilities, run a command and get its `return` value or its `error`.
//! Asynchronous events that arrive meanwhile are kept ([`Qmp::events`]). Boundary: the
//! protocol; what the commands mean for a migration is [`crate::migration`]'s.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long one command may take to answer. QEMU answers QMP from its main loop, which a
/// migration's final stage holds for its downtime, so this is generous.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A QMP connection in command mode (capabilities negotiated).
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    events: Vec<Value>,
}

/// Why a QMP command did not return a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpError {
    /// QEMU answered `{"error": {"class": ..., "desc": ...}}`.
    Command {
        /// The error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's own words.
        desc: String,
    },
    /// The connection broke, timed out or carried something that is not QMP.
    Transport(String),
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QmpError::Command { class, desc } => write!(f, "{desc} ({class})"),
            QmpError::Transport(why) => write!(f, "QMP connection: {why}"),
        }
    }
}

impl Qmp {
    /// Connects to the QMP socket at `path`, waiting up to `timeout` for QEMU to create it,
    /// reads the greeting and enters command mode (`qmp_capabilities`).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(QmpError::Transport(format!(
                        "cannot connect to {} within {timeout:?}: {e}",
                        path.display()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let transport = |e: std::io::Error| QmpError::Transport(e.to_string());
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(transport)?;
        let reader = BufReader::new(stream.try_clone().map_err(transport)?);
        let mut qmp = Qmp {
            writer: stream,
            reader,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Transport(format!(
                "expected the QMP greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| QmpError::Transport(format!("sending {command}: {e}")))?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                return Err(QmpError::Command {
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            return Err(QmpError::Transport(format!(
                "unexpected reply to {command}: {reply}"
            )));
        }
    }

    /// Runs `command`; panics with QEMU's reason if it fails (for commands a test relies
    /// on).
    pub fn run(&mut self, command: &str, arguments: Option<Value>) -> Value {
        self.execute(command, arguments)
            .unwrap_or_else(|e| panic!("QMP {command}: {e}"))
    }

    /// The asynchronous events received so far (e.g. `MIGRATION`, `STOP`, `RESUME`).
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| QmpError::Transport(format!("reading: {e}")))?;
        if n == 0 {
            return Err(QmpError::Transport("QEMU closed the connection".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| QmpError::Transport(format!("not JSON ({e}): {line:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU on a socket: greets, then answers each line from `replies` in turn.
    fn fake_qemu(replies: Vec<&'static str>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .expect("greet");
            for reply in replies {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                s.write_all(reply.as_bytes()).expect("reply");
            }
        });
        (dir, path)
    }

    #[test]
    fn returns_values_errors_and_keeps_events() {
        let (_dir, path) = fake_qemu(vec![
            "{\"return\": {}}\n",
            "{\"event\": \"STOP\", \"timestamp\": {}}\n{\"return\": {\"status\": \"active\"}}\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Migration disabled: x\"}}\n",
        ]);
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).expect("connect");
        let r = q.execute("query-migrate", None).expect("returns");
        assert_eq!(r["status"], "active");
        assert_eq!(q.events().len(), 1);
        assert_eq!(q.events()[0]["event"], "STOP");
        let e = q
            .execute("migrate", Some(json!({"uri": "tcp:127.0.0.1:1"})))
            .expect_err("an error reply");
        assert_eq!(
            e,
            QmpError::Command {
                class: "GenericError".into(),
                desc: "Migration disabled: x".into()
            }
        );
        assert!(matches!(
            q.execute("query-status", None),
            Err(QmpError::Transport(_))
        ));
    }
}

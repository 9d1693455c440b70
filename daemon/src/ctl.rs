//! `corodev ctl`: the control API's client for people and scripts. It connects to the
//! control socket, negotiates, sends one command and prints its `return` value as JSON
//! on stdout (exit 0), or the error's class and description on stderr (exit 1).
//!
//! Arguments are `KEY=VALUE` pairs: a VALUE that is a JSON number, boolean, array, object
//! or quoted string is sent as that JSON, anything else (`null` included: it is a backend's
//! name) as a string (`name=vm1 size=2G backend=null`); quote a number as JSON to send it
//! as a string (`serial='"1234"'`). Events that arrive before the
//! answer are skipped: this client answers one question.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Map, Value};

/// Why `corodev ctl` failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// No daemon listens there.
    #[error("cannot connect to {path}: {source}; is corodev running with --control {path}?")]
    Connect {
        /// The control socket.
        path: PathBuf,
        /// What connect said.
        source: std::io::Error,
    },
    /// The conversation broke off.
    #[error("control socket {path}: {source}")]
    Io {
        /// The control socket.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The daemon said something that is not the control protocol.
    #[error("control socket {path}: unexpected reply: {reply}")]
    Protocol {
        /// The control socket.
        path: PathBuf,
        /// What it said.
        reply: String,
    },
    /// An argument not of the form KEY=VALUE.
    #[error("argument '{0}' is not KEY=VALUE (e.g. name=vm1)")]
    BadArgument(String),
    /// The command failed; the daemon says why.
    #[error("{class}: {desc}")]
    Command {
        /// QMP's error class.
        class: String,
        /// The daemon's description.
        desc: String,
    },
}

/// Turns `KEY=VALUE` pairs into a command's arguments (see the module docs).
pub fn arguments(pairs: &[String]) -> Result<Map<String, Value>, CtlError> {
    pairs
        .iter()
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| CtlError::BadArgument(pair.clone()))?;
            let value = match serde_json::from_str(value) {
                Ok(Value::Null) | Err(_) => Value::String(value.to_owned()),
                Ok(json) => json,
            };
            Ok((key.to_owned(), value))
        })
        .collect()
}

/// Runs `command` with `arguments` on the daemon whose control socket is `path`, waiting
/// at most `timeout` for each reply. Returns the command's `return` value.
pub fn run(
    path: &Path,
    command: &str,
    arguments: Map<String, Value>,
    timeout: Duration,
) -> Result<Value, CtlError> {
    let io = |source| CtlError::Io {
        path: path.to_owned(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(|source| CtlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut writer = stream.try_clone().map_err(io)?;
    let mut reader = BufReader::new(stream);
    let greeting = read_reply(path, &mut reader)?;
    if greeting.get("QMP").is_none() {
        return Err(CtlError::Protocol {
            path: path.to_owned(),
            reply: greeting.to_string(),
        });
    }
    let mut ask = |execute: &str, arguments: Map<String, Value>, id: u64| {
        let mut line = json!({"execute": execute, "arguments": arguments, "id": id}).to_string();
        line.push('\n');
        writer.write_all(line.as_bytes()).map_err(io)?;
        loop {
            let reply = read_reply(path, &mut reader)?;
            if reply.get("event").is_some() {
                continue;
            }
            if reply.get("id") != Some(&json!(id)) {
                return Err(CtlError::Protocol {
                    path: path.to_owned(),
                    reply: reply.to_string(),
                });
            }
            return answer_of(path, reply);
        }
    };
    ask("qmp_capabilities", Map::new(), 1)?;
    ask(command, arguments, 2)
}

fn read_reply(path: &Path, reader: &mut impl BufRead) -> Result<Value, CtlError> {
    let mut line = String::new();
    let n = reader.read_line(&mut line).map_err(|source| CtlError::Io {
        path: path.to_owned(),
        source,
    })?;
    if n == 0 {
        return Err(CtlError::Io {
            path: path.to_owned(),
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    }
    serde_json::from_str(&line).map_err(|_| CtlError::Protocol {
        path: path.to_owned(),
        reply: line.trim_end().to_owned(),
    })
}

fn answer_of(path: &Path, mut reply: Value) -> Result<Value, CtlError> {
    if let Some(value) = reply.get_mut("return") {
        return Ok(value.take());
    }
    let error = reply.get("error");
    let field = |name| {
        error
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    match (field("class"), field("desc")) {
        (Some(class), Some(desc)) => Err(CtlError::Command { class, desc }),
        _ => Err(CtlError::Protocol {
            path: path.to_owned(),
            reply: reply.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_json_when_they_parse_and_strings_otherwise() {
        let args = arguments(&[
            "name=vm1".into(),
            "size=1073741824".into(),
            "readonly=true".into(),
            "serial=\"42\"".into(),
            "note=a=b".into(),
            "backend=null".into(),
        ])
        .expect("parses");
        assert_eq!(
            Value::Object(args),
            json!({"name": "vm1", "size": 1073741824u64, "readonly": true, "serial": "42", "note": "a=b", "backend": "null"})
        );
        assert!(matches!(
            arguments(&["vm1".into()]),
            Err(CtlError::BadArgument(a)) if a == "vm1"
        ));
        assert!(matches!(
            arguments(&["=x".into()]),
            Err(CtlError::BadArgument(_))
        ));
    }
}

//! The control socket's wire format, shaped like QEMU's QMP so that an operator's QMP
//! tooling and habits carry over: one JSON object per line each way; the server greets
//! with `{"QMP": ...}`; a client sends `{"execute": NAME, "arguments": {...}, "id": ANY}`
//! and gets `{"return": ...}` or `{"error": {"class", "desc"}}`, with its `id` echoed;
//! events arrive as `{"event", "data", "timestamp"}` lines between answers.
//!
//! Everything here is pure (bytes in, JSON out) so that every malformed input has a unit
//! test; the session loop is [`super`]'s.

use serde_json::{json, Map, Value};

use crate::events::Event;

/// Longest request line accepted. Nothing legitimate comes near it (an `export-add` is a
/// few hundred bytes); a longer line ends the session, since the rest of it cannot be
/// told apart from the next request.
pub const MAX_LINE: usize = 64 * 1024;

/// QMP's error classes, as clients match on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Bad input or a failed command; `desc` says which.
    GenericError,
    /// No such command, or not before/again after capability negotiation.
    CommandNotFound,
}

impl ErrorClass {
    fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }
}

/// A failed request: its class and one line saying what is wrong and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandError {
    /// QMP's class.
    pub class: ErrorClass,
    /// What went wrong, and the fix.
    pub desc: String,
}

impl CommandError {
    /// A [`ErrorClass::GenericError`].
    pub fn generic(desc: impl Into<String>) -> CommandError {
        CommandError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A [`ErrorClass::CommandNotFound`].
    pub fn not_found(desc: impl Into<String>) -> CommandError {
        CommandError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

/// One request, as parsed from its line.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The command's name.
    pub execute: String,
    /// Its arguments: an object, empty when none were given.
    pub arguments: Map<String, Value>,
    /// Echoed in the answer, whatever it is.
    pub id: Option<Value>,
}

/// Parses one request line. A failure keeps whatever `id` could be read, so that even a
/// malformed request's error is matched to it.
pub fn parse(line: &[u8]) -> Result<Request, (CommandError, Option<Value>)> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        (
            CommandError::generic(format!("JSON parse error: {e}")),
            None,
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err((
            CommandError::generic("QMP input must be a JSON object"),
            None,
        ));
    };
    let id = obj.remove("id");
    let fail = |desc: String| Err((CommandError::generic(desc), id.clone()));
    if let Some(key) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "arguments"))
    {
        return fail(format!(
            "QMP input member '{key}' is unexpected: a request has execute, arguments and id"
        ));
    }
    let execute = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return fail("QMP input member 'execute' must be a string".into()),
        None => return fail("QMP input lacks member 'execute'".into()),
    };
    let arguments = match obj.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(args)) => args,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into()),
    };
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

/// The greeting, the first line a client reads.
pub fn greeting() -> Value {
    json!({"QMP": {
        "version": {"package": concat!("corodev ", env!("CARGO_PKG_VERSION"))},
        "capabilities": [],
    }})
}

/// The answer to a request with `id`.
pub fn answer(result: Result<Value, CommandError>, id: Option<Value>) -> Value {
    let mut reply = match result {
        Ok(value) => json!({ "return": value }),
        Err(e) => json!({"error": {"class": e.class.name(), "desc": e.desc}}),
    };
    if let (Some(id), Value::Object(obj)) = (id, &mut reply) {
        obj.insert("id".into(), id);
    }
    reply
}

/// An event's line, stamped with the time it is sent (QMP's `timestamp`).
pub fn event(event: &Event) -> Value {
    let mut value = serde_json::to_value(event).unwrap_or_else(|_| json!({}));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    if let Value::Object(obj) = &mut value {
        obj.insert(
            "timestamp".into(),
            json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()}),
        );
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(line: &str) -> (String, Option<Value>) {
        let (e, id) = parse(line.as_bytes()).expect_err("refused");
        assert_eq!(e.class, ErrorClass::GenericError);
        (e.desc, id)
    }

    #[test]
    fn a_request_with_and_without_arguments_and_id() {
        let r = parse(br#"{"execute":"export-del","arguments":{"name":"vm1"},"id":7}"#)
            .expect("parses");
        assert_eq!(r.execute, "export-del");
        assert_eq!(r.arguments.get("name"), Some(&json!("vm1")));
        assert_eq!(r.id, Some(json!(7)));
        let r = parse(br#"{"execute":"query-exports"}"#).expect("parses");
        assert!(r.arguments.is_empty());
        assert_eq!(r.id, None);
    }

    #[test]
    fn each_malformed_request_says_what_is_wrong_and_keeps_its_id() {
        assert!(error_of("{").0.starts_with("JSON parse error: "));
        assert_eq!(error_of("[1]").0, "QMP input must be a JSON object");
        assert_eq!(
            error_of(r#"{"id":"a"}"#),
            ("QMP input lacks member 'execute'".into(), Some(json!("a")))
        );
        assert_eq!(
            error_of(r#"{"execute":1,"id":2}"#),
            (
                "QMP input member 'execute' must be a string".into(),
                Some(json!(2))
            )
        );
        assert_eq!(
            error_of(r#"{"execute":"x","arguments":[]}"#).0,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            error_of(r#"{"execute":"x","argument":{}}"#).0,
            "QMP input member 'argument' is unexpected: a request has execute, arguments and id"
        );
    }

    #[test]
    fn answers_echo_the_id_and_name_the_class() {
        assert_eq!(
            answer(Ok(json!({})), Some(json!("x"))),
            json!({"return": {}, "id": "x"})
        );
        assert_eq!(
            answer(
                Err(CommandError::not_found(
                    "The command nope has not been found"
                )),
                None
            ),
            json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}})
        );
    }

    #[test]
    fn events_carry_a_timestamp() {
        let line = event(&Event::ExportDeleted { name: "a".into() });
        assert_eq!(line["event"], "EXPORT_DELETED");
        assert_eq!(line["data"]["name"], "a");
        assert!(line["timestamp"]["seconds"].as_u64().is_some_and(|s| s > 0));
    }
}

//! The control API's commands: each takes typed arguments (an unknown or mistyped
//! argument is refused, naming it) and calls the same registry functions the config file
//! and the signals use ([`Exports`], [`Shutdown`]), so that a control client can do
//! nothing the daemon's other paths cannot. Commands block (a hard `export-del` waits for
//! the export's requests in flight): the session runs them off its event loop.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::protocol::{CommandError, Request};
use crate::export_config::{ExportConfig, SizeArg};
use crate::exports::{self, Exports, Origin};
use crate::shutdown::Shutdown;

/// What the commands act on.
pub struct Context {
    /// The running exports.
    pub exports: Arc<Exports>,
    /// The daemon's end.
    pub shutdown: Arc<Shutdown>,
}

/// Every command, in the order `query-commands` lists them.
const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-exports",
    "query-stats",
    "export-add",
    "export-del",
    "export-resize",
    "shutdown",
];

/// Runs one negotiated request (`qmp_capabilities` is the session's).
pub fn run(ctx: &Context, req: Request) -> Result<Value, CommandError> {
    let Request {
        execute, arguments, ..
    } = req;
    match execute.as_str() {
        "qmp_capabilities" => Err(CommandError::not_found(
            "Capabilities negotiation is already complete, command ignored",
        )),
        "query-commands" => {
            args::<NoArgs>(&execute, arguments)?;
            Ok(Value::Array(
                COMMANDS.iter().map(|c| json!({ "name": c })).collect(),
            ))
        }
        "query-exports" => {
            args::<NoArgs>(&execute, arguments)?;
            Ok(json!(ctx.exports.list()))
        }
        "query-stats" => {
            let QueryStats { name } = args(&execute, arguments)?;
            let mut stats = ctx.exports.stats();
            if let Some(name) = name {
                stats.retain(|s| s.export == name);
                if stats.is_empty() {
                    return Err(no_such_export(&name));
                }
            }
            Ok(json!(stats))
        }
        "export-add" => export_add(ctx, args(&execute, arguments)?),
        "export-del" => export_del(ctx, args(&execute, arguments)?),
        "export-resize" => export_resize(ctx, args(&execute, arguments)?),
        "shutdown" => {
            // Only checked here: the session begins the shutdown once this answer is
            // written ([`after_answer`]), so the client reads it before the daemon exits.
            args::<NoArgs>(&execute, arguments)?;
            Ok(json!({}))
        }
        other => Err(CommandError::not_found(format!(
            "The command {other} has not been found: query-commands lists them"
        ))),
    }
}

/// What `execute` still does once its successful answer is on the socket: `shutdown` ends
/// the daemon then, not before (QEMU's `quit` answers first too). Begun any earlier, the
/// daemon could exit before the session wrote the answer, and the client would read only
/// a closed connection.
pub fn after_answer(ctx: &Context, execute: &str) {
    if execute == "shutdown" && ctx.shutdown.begin("command") {
        log::info!("control: shutdown requested; shutting down");
    }
}

/// A command that takes no arguments.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

/// `query-stats`'s arguments: one export, or every one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryStats {
    #[serde(default)]
    name: Option<String>,
}

/// `export-del`'s arguments.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportDel {
    name: String,
    #[serde(default)]
    mode: DelMode,
}

/// `export-resize`'s arguments.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportResize {
    name: String,
    /// Bytes, or a size such as "2G".
    size: SizeArg,
}

/// How `export-del` treats a connected frontend.
#[derive(Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum DelMode {
    /// Serve it until it disconnects by itself; then delete (`EXPORT_DELETED`).
    #[default]
    Safe,
    /// Answer its requests in flight, then hang up on it, and delete.
    Hard,
}

/// Reads `arguments` as `T`, refusing unknown and mistyped members by name.
fn args<T: DeserializeOwned>(
    command: &str,
    arguments: Map<String, Value>,
) -> Result<T, CommandError> {
    serde_path_to_error::deserialize(Value::Object(arguments)).map_err(|e| {
        let path = e.path().to_string();
        let what = e.into_inner();
        if path == "." {
            CommandError::generic(format!("{command}: bad arguments: {what}"))
        } else {
            CommandError::generic(format!("{command}: argument '{path}': {what}"))
        }
    })
}

/// `export-add`: the arguments are an `[[exports]]` table of the config file, as JSON,
/// validated and opened by the same code; the export then runs until `export-del`.
fn export_add(ctx: &Context, config: ExportConfig) -> Result<Value, CommandError> {
    let spec = config.validate().map_err(|errors| {
        CommandError::generic(
            errors
                .0
                .iter()
                .map(|e| format!("{}: {}", e.key, e.problem))
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let name = spec.name.clone();
    let prepared = exports::prepare(spec)
        .map_err(|e| CommandError::generic(format!("{}: {e}", exports::error_key(&e))))?;
    ctx.exports
        .add(prepared, Origin::Control)
        .map_err(|e| CommandError::generic(e.to_string()))?;
    log::info!("control: export {name} added");
    Ok(json!({}))
}

/// `export-del`.
fn export_del(ctx: &Context, del: ExportDel) -> Result<Value, CommandError> {
    let found = match del.mode {
        DelMode::Safe => ctx.exports.retire(&del.name),
        DelMode::Hard => ctx.exports.remove(&del.name),
    };
    if found {
        Ok(json!({}))
    } else {
        Err(no_such_export(&del.name))
    }
}

/// `export-resize`: grows the export's storage and tells its guest (see
/// [`Exports::resize`]); returns the old and new size.
fn export_resize(ctx: &Context, r: ExportResize) -> Result<Value, CommandError> {
    let size = r
        .size
        .bytes()
        .map_err(|e| CommandError::generic(format!("export-resize: argument 'size': {e}")))?;
    let (old, new) = ctx
        .exports
        .resize(&r.name, size)
        .map_err(|e| CommandError::generic(e.to_string()))?;
    log::info!(
        "control: export {} resized from {old} to {new} bytes",
        r.name
    );
    Ok(json!({ "old-size": old, "size": new }))
}

fn no_such_export(name: &str) -> CommandError {
    CommandError::generic(format!(
        "no export named '{name}': query-exports lists them"
    ))
}

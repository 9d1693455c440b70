//! The daemon's log: one line per event on stderr, at the level `--log-level` (or the
//! config file's `[daemon] log-level`) names, else as `RUST_LOG` says, else `info`.
//!
//! Under systemd, stderr is the journal (`JOURNAL_STREAM` names it): each line then starts
//! with its syslog priority (`<3>` error ... `<7>` debug, sd-daemon(3)), so `journalctl
//! -p warning` filters by level, and carries no timestamp, since the journal stamps every
//! line itself. Elsewhere lines carry a timestamp and the level.
//!
//! A level given by flag or file can change while the daemon runs (SIGHUP with a new
//! `log-level` in the file): the logger lets every record through and the level is the
//! `log` crate's global maximum, which is one atomic.

use std::io::Write;
use std::os::unix::fs::MetadataExt;

use serde::Deserialize;

/// How much to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Failures only.
    Error,
    /// Failures and what an operator should look at.
    Warn,
    /// Also each export's and connection's life (the default).
    Info,
    /// Also per-message detail, for debugging.
    Debug,
    /// Everything.
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(l: LogLevel) -> log::LevelFilter {
        match l {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// Starts logging at `level`, or as `RUST_LOG` says without one (see the module docs).
pub fn init(level: Option<LogLevel>) {
    let mut builder = match level {
        Some(_) => {
            let mut b = env_logger::Builder::new();
            b.filter_level(log::LevelFilter::Trace);
            b
        }
        None => env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")),
    };
    if stderr_is_journal() {
        builder.format(|buf, record| {
            writeln!(
                buf,
                "<{}>{}",
                syslog_priority(record.level()),
                record.args()
            )
        });
    } else {
        builder.format_target(false);
    }
    builder.init();
    if let Some(level) = level {
        set_level(level);
    }
}

/// Changes the level of a logger started with one.
pub fn set_level(level: LogLevel) {
    log::set_max_level(level.into());
}

/// sd-daemon(3)'s prefix for `level`.
fn syslog_priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` is its
/// `DEVICE:INODE` (a child that inherited the variable but not the stream must not
/// prefix its lines).
fn stderr_is_journal() -> bool {
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = var.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(m) => dev.parse() == Ok(m.dev()) && ino.parse() == Ok(m.ino()),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_are_syslogs() {
        assert_eq!(syslog_priority(log::Level::Error), 3);
        assert_eq!(syslog_priority(log::Level::Warn), 4);
        assert_eq!(syslog_priority(log::Level::Info), 6);
        assert_eq!(syslog_priority(log::Level::Debug), 7);
    }
}

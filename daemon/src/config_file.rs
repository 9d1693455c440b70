//! The `--config` file: a TOML list of exports, each an `[[exports]]` table with the
//! export flags' names as keys (see `daemon/systemd/example.toml`).
//!
//! Reading one yields every problem at once, each named by its key path
//! (`exports[1].queue-size: ...`): each export is validated by the same
//! [`ExportConfig::validate`] as the flags, then the exports against each other (names and
//! sockets unique, no disk written by two exports). A TOML syntax or type error stops the
//! parse and is one line with its line and column. Opening the disks is
//! [`crate::exports::prepare`]'s; [`check`] does both, for `check-config` and startup.
//!
//! Boundary: reads the file; opens disks only through [`check`]; never binds, locks or
//! serves.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cli::DaemonArgs;
use crate::error::Error;
use crate::export_config::{Backend, ExportConfig, ExportSpec, Problem};
use crate::exports::{prepare, Prepared};

/// The file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ConfigFile {
    #[serde(default)]
    daemon: DaemonArgs,
    #[serde(default)]
    exports: Vec<ExportConfig>,
}

/// A validated file: the daemon's settings and its exports (`T`: as validated, or
/// prepared).
#[derive(Debug)]
pub struct Config<T> {
    /// The `[daemon]` table (empty when absent).
    pub daemon: DaemonArgs,
    /// The `[[exports]]`, in file order.
    pub exports: Vec<T>,
}

/// What is wrong with one key of the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyProblem {
    /// The export's own settings.
    #[error(transparent)]
    Export(#[from] Problem),
    /// The file has no `[[exports]]`.
    #[error("no exports: add an [[exports]] table with at least a socket")]
    NoExports,
    /// A name or socket another export has.
    #[error("{value} is already used by exports[{first}]")]
    Duplicate {
        /// The value, as displayed.
        value: String,
        /// The export that has it first.
        first: usize,
    },
    /// A disk another export writes, or writes while another reads it.
    #[error(
        "{disk} is already exported by exports[{first}]; only read-only exports may share a disk"
    )]
    SharedDisk {
        /// The disk.
        disk: PathBuf,
        /// The export that has it first.
        first: usize,
    },
    /// Opening the disk or making the device of it failed.
    #[error(transparent)]
    Prepare(Error),
}

/// One problem, at its key path.
#[derive(Debug)]
pub struct KeyError {
    /// Which export (`None`: the file's top level).
    pub export: Option<usize>,
    /// The key (`queue-size`), or the top-level key.
    pub key: &'static str,
    /// What is wrong.
    pub problem: KeyProblem,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.export {
            Some(i) => write!(f, "exports[{i}].{}: {}", self.key, self.problem),
            None => write!(f, "{}: {}", self.key, self.problem),
        }
    }
}

/// Why a config file cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What reading said.
        source: std::io::Error,
    },
    /// Not TOML, or not the shape of a config file (an unknown key, a wrong type).
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message, on one line.
        message: String,
    },
    /// Every problem of the exports, one per line.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<KeyError>),
}

impl ConfigError {
    /// One line per problem, as `check-config` prints them.
    pub fn lines(&self) -> Vec<String> {
        self.to_string().lines().map(str::to_owned).collect()
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Parses `text` (the contents of `path`) and validates every export; the daemon's
/// settings and the exports in file order, or every problem.
pub fn parse(path: &Path, text: &str) -> Result<Config<ExportSpec>, ConfigError> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map_or((1, 1), |s| line_column(text, s.start));
        ConfigError::Syntax {
            path: path.to_owned(),
            line,
            column,
            message: e.message().replace('\n', " ").trim().to_owned(),
        }
    })?;
    let mut errors = Vec::new();
    if file.exports.is_empty() {
        errors.push(KeyError {
            export: None,
            key: "exports",
            problem: KeyProblem::NoExports,
        });
    }
    let mut specs = Vec::new();
    for (i, export) in file.exports.iter().enumerate() {
        match export.validate() {
            Ok(spec) => specs.push((i, spec)),
            Err(e) => errors.extend(e.0.into_iter().map(|e| KeyError {
                export: Some(i),
                key: e.key,
                problem: e.problem.into(),
            })),
        }
    }
    errors.extend(conflicts(&specs));
    // Reported in file order, each export's keys in the order validation found them.
    errors.sort_by_key(|e| e.export.map_or(0, |i| i + 1));
    if errors.is_empty() {
        Ok(Config {
            daemon: file.daemon,
            exports: specs.into_iter().map(|(_, s)| s).collect(),
        })
    } else {
        Err(ConfigError::Invalid(errors))
    }
}

/// Names, sockets and written disks that two exports share (the later one is at fault).
fn conflicts(specs: &[(usize, ExportSpec)]) -> Vec<KeyError> {
    let mut errors = Vec::new();
    for (n, (i, spec)) in specs.iter().enumerate() {
        let earlier = &specs[..n];
        if let Some((first, _)) = earlier.iter().find(|(_, s)| s.name == spec.name) {
            errors.push(KeyError {
                export: Some(*i),
                key: "name",
                problem: KeyProblem::Duplicate {
                    value: format!("{:?}", spec.name),
                    first: *first,
                },
            });
        }
        if let Some((first, _)) = earlier
            .iter()
            .find(|(_, s)| same_path(&s.socket, &spec.socket))
        {
            errors.push(KeyError {
                export: Some(*i),
                key: "socket",
                problem: KeyProblem::Duplicate {
                    value: spec.socket.display().to_string(),
                    first: *first,
                },
            });
        }
        if let Backend::File { disk, .. } = &spec.backend {
            let shared = earlier.iter().find(|(_, s)| match &s.backend {
                Backend::File { disk: d, .. } => {
                    same_path(d, disk) && !(s.readonly && spec.readonly)
                }
                Backend::Null { .. } | Backend::Rbd(_) | Backend::Nvme { .. } => false,
            });
            if let Some((first, _)) = shared {
                errors.push(KeyError {
                    export: Some(*i),
                    key: "disk",
                    problem: KeyProblem::SharedDisk {
                        disk: disk.clone(),
                        first: *first,
                    },
                });
            }
        }
    }
    errors
}

/// The same file: equal as written, or both resolving to one file.
fn same_path(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// Reads and validates `path`.
pub fn load(path: &Path) -> Result<Config<ExportSpec>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Prepares every export of `specs` that `wanted` selects (opens its disk, builds its
/// device): the prepared exports, or every failure at its key path (`specs` index).
pub fn prepare_all(
    specs: &[ExportSpec],
    wanted: impl Fn(&ExportSpec) -> bool,
) -> Result<Vec<Prepared>, ConfigError> {
    let mut prepared = Vec::new();
    let mut errors = Vec::new();
    for (i, spec) in specs.iter().enumerate().filter(|(_, s)| wanted(s)) {
        match prepare(spec.clone()) {
            Ok(p) => prepared.push(p),
            Err(e) => errors.push(KeyError {
                export: Some(i),
                key: crate::exports::error_key(&e),
                problem: KeyProblem::Prepare(e),
            }),
        }
    }
    if errors.is_empty() {
        Ok(prepared)
    } else {
        Err(ConfigError::Invalid(errors))
    }
}

/// Everything short of serving: reads and validates `path`, opens every disk and builds
/// every device. What `check-config` reports and what startup starts from.
pub fn check(path: &Path) -> Result<Config<Prepared>, ConfigError> {
    let config = load(path)?;
    Ok(Config {
        exports: prepare_all(&config.exports, |_| true)?,
        daemon: config.daemon,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        parse(Path::new("c.toml"), text)
            .expect_err("must be refused")
            .lines()
    }

    const TWO: &str = r#"
[[exports]]
name = "vm1"
socket = "/run/corodev/vm1.sock"
disk = "/var/lib/corodev/images/vm1/disk.raw"
num-queues = 2

[[exports]]
socket = "/run/corodev/scratch.sock"
backend = "null"
size = "1G"
readonly = true
stack-size = 524288
"#;

    #[test]
    fn two_exports_parse_with_defaults_and_both_size_spellings() {
        let specs = parse(Path::new("c.toml"), TWO).expect("valid").exports;
        assert_eq!(specs.len(), 2);
        assert_eq!((specs[0].name.as_str(), specs[0].num_queues), ("vm1", 2));
        assert_eq!(specs[0].queue_size, 256, "the flag's default");
        assert_eq!(specs[1].name, "scratch", "named after its socket file");
        assert_eq!(
            specs[1].backend,
            Backend::Null {
                size: 1 << 30,
                latency: std::time::Duration::ZERO
            }
        );
        assert_eq!(specs[1].stack_size, 512 << 10);
        assert!(specs[1].readonly);
    }

    #[test]
    fn every_problem_with_its_key_path() {
        let text = r#"
[[exports]]
name = "vm1"
socket = "/s/a.sock"
disk = "/d/a"
queue-size = 100

[[exports]]
socket = "/s/b.sock"
backend = "null"
threads = 3
disk = "/d/b"

[[exports]]
name = "vm1"
socket = "/s/a.sock"
disk = "/d/a"
block-size = 1024
"#;
        assert_eq!(
            lines(text),
            [
                "exports[0].queue-size: 100 is not a power of two between 2 and 32768: use e.g. 128 or 256",
                "exports[1].disk: not used with backend null: drop it or use backend file",
                "exports[1].size: required with backend null, e.g. 1G",
                "exports[1].threads: 3 is more than num-queues 1: a thread serves whole queues",
                "exports[2].block-size: 1024 is not a supported block size: use 512 or 4096",
            ]
        );
        let dup = r#"
[[exports]]
name = "vm1"
socket = "/s/a.sock"
disk = "/d/a"
[[exports]]
name = "vm1"
socket = "/s/a.sock"
disk = "/d/a"
[[exports]]
socket = "/s/c.sock"
disk = "/d/a"
readonly = true
[[exports]]
socket = "/s/d.sock"
backend = "null"
size = 4096
"#;
        assert_eq!(
            lines(dup),
            [
                r#"exports[1].name: "vm1" is already used by exports[0]"#,
                "exports[1].socket: /s/a.sock is already used by exports[0]",
                "exports[1].disk: /d/a is already exported by exports[0]; only read-only exports may share a disk",
                "exports[2].disk: /d/a is already exported by exports[0]; only read-only exports may share a disk",
            ]
        );
    }

    #[test]
    fn the_example_file_is_valid() {
        let specs = parse(
            Path::new("example.toml"),
            include_str!("../systemd/example.toml"),
        )
        .expect("daemon/systemd/example.toml must stay valid");
        let names: Vec<_> = specs.exports.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["vm1", "vm1-data", "scratch", "vm2"]);
        assert_eq!(
            specs.daemon,
            DaemonArgs {
                control: Some("/run/corodev/control.sock".into()),
                log_level: Some(crate::logging::LogLevel::Info),
                metrics: None,
            }
        );
    }

    #[test]
    fn the_daemon_table_is_checked_like_the_exports() {
        let text = "[daemon]\nlog-level = \"debug\"\n[[exports]]\nsocket = \"/s\"\nbackend = \"null\"\nsize = 1024\n";
        let config = parse(Path::new("c.toml"), text).expect("valid");
        assert_eq!(
            config.daemon.log_level,
            Some(crate::logging::LogLevel::Debug)
        );
        assert_eq!(config.daemon.control, None);
        let bad = lines("[daemon]\nlog-level = \"loud\"\n[[exports]]\nsocket = \"/s\"\n");
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(
            bad[0]
                .starts_with("c.toml:2:13: unknown variant `loud`, expected one of `off`, `error`"),
            "{bad:?}"
        );
        let unknown = lines("[daemon]\nsocket = \"/s\"\n");
        assert!(
            unknown[0].starts_with(
                "c.toml:2:1: unknown field `socket`, expected one of `control`, `log-level`, `metrics`"
            ),
            "{unknown:?}"
        );
        let metrics = |v: &str| {
            let text = format!("[daemon]\nmetrics = {v}\n[[exports]]\nsocket = \"/s\"\nbackend = \"null\"\nsize = 1024\n");
            parse(Path::new("c.toml"), &text).map(|c| c.daemon.metrics)
        };
        let loopback = Some("127.0.0.1:9400".parse().unwrap());
        assert_eq!(metrics("9400").ok(), Some(loopback), "a bare port");
        assert_eq!(metrics("\"9400\"").ok(), Some(loopback));
        assert_eq!(
            metrics("\"[::]:9400\"").ok(),
            Some(Some("[::]:9400".parse().unwrap()))
        );
        let bad = lines("[daemon]\nmetrics = \"localhost:9400\"\n");
        assert!(
            bad[0].starts_with("c.toml:2:11: expected a port (e.g. 9400, on 127.0.0.1) or IP:PORT"),
            "{bad:?}"
        );
    }

    #[test]
    fn read_only_exports_share_a_disk() {
        let text = r#"
[[exports]]
socket = "/s/a.sock"
disk = "/d/a"
readonly = true
[[exports]]
socket = "/s/b.sock"
disk = "/d/a"
readonly = true
"#;
        assert!(parse(Path::new("c.toml"), text).is_ok());
    }

    #[test]
    fn syntax_and_shape_errors_are_one_line_with_line_and_column() {
        let syntax = lines("[[exports]]\nsocket = \"/s\"\ndisk = \n");
        assert_eq!(syntax.len(), 1, "{syntax:?}");
        assert!(syntax[0].starts_with("c.toml:3:"), "{syntax:?}");
        let unknown = lines("[[exports]]\nsocket = \"/s\"\nqueue_size = 128\n");
        assert_eq!(unknown.len(), 1, "{unknown:?}");
        assert!(
            unknown[0].starts_with("c.toml:3:1: unknown field `queue_size`, expected one of"),
            "{unknown:?}"
        );
        let typed = lines("[[exports]]\nsocket = \"/s\"\nnum-queues = \"two\"\n");
        assert_eq!(typed.len(), 1, "{typed:?}");
        assert!(typed[0].starts_with("c.toml:3:14: "), "{typed:?}");
        assert_eq!(
            lines(""),
            ["exports: no exports: add an [[exports]] table with at least a socket"]
        );
    }
}

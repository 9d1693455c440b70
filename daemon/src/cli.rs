//! The command line: one export from flags, several from `--config FILE`, or
//! `check-config FILE`.
//!
//! The export's flags are [`ExportConfig`]'s, the same settings a config file's
//! `[[exports]]` table has, validated by the same [`ExportConfig::validate`] before any
//! file or socket is touched; clap itself checks only their types and which flags go
//! together.

use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::Deserialize;

use crate::logging::LogLevel;

pub use crate::export_config::{
    BackendKind, CoroutineBackend, ExportConfig, LockMode, SizeArg, StackMode,
};

/// Examples printed after `--help`.
const EXAMPLES: &str = "\
Examples:
  # Serve a raw image; attach QEMU with
  #   -chardev socket,id=c0,path=/run/corodev/vm1.sock
  #   -device vhost-user-blk-pci,chardev=c0,num-queues=2
  #   -object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem
  corodev --socket /run/corodev/vm1.sock --disk /var/lib/images/vm1.raw --num-queues 2

  # A block device with O_DIRECT, read-only, with a serial number
  corodev --socket /run/corodev/ro.sock --disk /dev/vg0/data --direct --readonly --serial DATA01

  # A 4 GiB null device for benchmarks (reads zeroes, discards writes)
  corodev --socket /tmp/null.sock --backend null --size 4G

  # An RBD image in a Ceph cluster, as client.vm1 with a cluster's own configuration
  corodev --socket /run/corodev/vm2.sock --backend rbd --rbd-pool rbd --rbd-image vm2 \
      --ceph-conf /etc/ceph/ceph.conf --ceph-id vm1

  # Several exports from one file (SIGHUP reloads it), and checking such a file
  corodev --config /etc/corodev/exports.toml
  corodev check-config /etc/corodev/exports.toml

  # Ask a running daemon (started with --control /run/corodev/control.sock)
  corodev ctl --control /run/corodev/control.sock query-exports
  corodev ctl --control /run/corodev/control.sock export-del name=vm1 mode=hard";

// One export from flags, or several from `--config FILE` (not both: an export flag with
// `--config` is refused, naming the flag; see `Cli::from_args`).
/// corodev: a vhost-user-blk daemon whose every guest request is a stackful coroutine.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// What to do other than serve.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Serve the exports of this TOML file (see daemon/systemd/example.toml) instead of
    /// the one the flags describe. SIGHUP reads it again: added exports start, removed
    /// ones stop once their frontend is served, changed ones restart.
    #[arg(long, value_name = "FILE", conflicts_with = "once")]
    pub config: Option<PathBuf>,

    /// The one export, from flags.
    #[command(flatten)]
    pub export: ExportConfig,

    /// Settings of the daemon itself, whatever its exports come from.
    #[command(flatten)]
    pub daemon: DaemonArgs,

    /// Serve one connection, then exit (default: listen again after each disconnect).
    #[arg(long)]
    pub once: bool,
}

/// The daemon's own settings (not an export's): flags, or a config file's `[daemon]`
/// table (a flag wins over the file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DaemonArgs {
    /// Serve the control API (QMP-shaped JSON; `corodev ctl` is its client) on a unix
    /// socket at PATH, mode 0600. Under socket activation, a socket named `control` is
    /// used instead (it must be bound at PATH).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Log level (default: as RUST_LOG says, else info). Under systemd each line carries
    /// its syslog priority for the journal.
    #[arg(long, value_enum, value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,

    /// Serve every export's request statistics in Prometheus's text format at
    /// http://ADDR/metrics: IP:PORT, or a bare PORT for 127.0.0.1:PORT. Off by default.
    #[arg(long, value_name = "ADDR", value_parser = crate::metrics::parse_addr)]
    #[serde(deserialize_with = "crate::metrics::deserialize_addr")]
    pub metrics: Option<std::net::SocketAddr>,
}

impl DaemonArgs {
    /// These settings (flags), with the file's where a flag was not given.
    pub fn over(self, file: DaemonArgs) -> DaemonArgs {
        DaemonArgs {
            control: self.control.or(file.control),
            log_level: self.log_level.or(file.log_level),
            metrics: self.metrics.or(file.metrics),
        }
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a config file without serving it: prints every problem, each with its key
    /// (exports[1].queue-size: ...), and exits 1; or one line and exits 0.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Send one command to a running daemon's control API and print its answer as JSON:
    /// query-exports, query-stats [name=N], query-commands, export-add KEY=VALUE...,
    /// export-del name=N [mode=safe|hard], export-resize name=N size=BYTES|2G, shutdown.
    Ctl {
        /// The daemon's control socket (its --control PATH).
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Longest wait for each answer, in seconds (a hard export-del waits for the
        /// export's requests in flight).
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        timeout: u64,
        /// The command.
        command: String,
        /// Its arguments, KEY=VALUE (VALUE is JSON if it parses as JSON, else a string).
        args: Vec<String>,
    },
}

impl Cli {
    /// Parses `args` (the program's name first), refusing an export flag given with
    /// `--config` with one error naming it (clap's own conflict with a group would list
    /// every export flag).
    pub fn from_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Cli::command().try_get_matches_from(args)?;
        let cli = Cli::from_arg_matches(&matches)?;
        if cli.config.is_none() {
            return Ok(cli);
        }
        let export = ExportConfig::augment_args(clap::Command::new("export"));
        let given = export
            .get_arguments()
            .find(|a| matches.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine));
        match given.and_then(|a| a.get_long()) {
            None => Ok(cli),
            // One line: the usage clap would add lists no export flags to choose from.
            Some(long) => Err(clap::Error::raw(
                ErrorKind::ArgumentConflict,
                format!(
                    "--{long} is an export flag, and --config FILE describes every export: \
                     put it in the file's [[exports]] table, or drop --config\n"
                ),
            )),
        }
    }

    /// What the command line asks for.
    pub fn mode(self) -> Mode {
        match (self.command, self.config) {
            (Some(Command::CheckConfig { file }), _) => Mode::Check(file),
            (
                Some(Command::Ctl {
                    control,
                    timeout,
                    command,
                    args,
                }),
                _,
            ) => Mode::Ctl {
                control,
                timeout: std::time::Duration::from_secs(timeout),
                command,
                args,
            },
            (None, Some(file)) => Mode::ConfigFile {
                file,
                daemon: self.daemon,
            },
            (None, None) => Mode::Flags {
                export: Box::new(self.export),
                once: self.once,
                daemon: self.daemon,
            },
        }
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Mode {
    /// Serve the one export the flags describe.
    Flags {
        /// The export (boxed: it is most of the command line).
        export: Box<ExportConfig>,
        /// `--once`.
        once: bool,
        /// The daemon's own settings.
        daemon: DaemonArgs,
    },
    /// Serve the exports of a config file.
    ConfigFile {
        /// The file.
        file: PathBuf,
        /// The daemon's own settings.
        daemon: DaemonArgs,
    },
    /// `check-config FILE`.
    Check(PathBuf),
    /// `ctl`: one command to a running daemon.
    Ctl {
        /// Its control socket.
        control: PathBuf,
        /// Longest wait per answer.
        timeout: std::time::Duration,
        /// The command.
        command: String,
        /// Its KEY=VALUE arguments.
        args: Vec<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::error::ErrorKind> {
        Cli::from_args(std::iter::once("corodev").chain(args.iter().copied())).map_err(|e| e.kind())
    }

    #[test]
    fn flag_defaults_are_the_config_files() {
        let cli = parse(&["--socket", "/s"]).expect("parses");
        assert_eq!(
            cli.export,
            ExportConfig {
                socket: Some("/s".into()),
                ..ExportConfig::default()
            },
            "a key left out of an [[exports]] table means what the flag left out means"
        );
    }

    #[test]
    fn modes() {
        assert!(matches!(
            parse(&["--socket", "/s", "--disk", "d", "--once"]).map(Cli::mode),
            Ok(Mode::Flags { once: true, .. })
        ));
        assert!(matches!(
            parse(&["--config", "f.toml"]).map(Cli::mode),
            Ok(Mode::ConfigFile { file, .. }) if file == std::path::Path::new("f.toml")
        ));
        assert!(matches!(
            parse(&["--config", "f.toml", "--control", "/c"]).map(Cli::mode),
            Ok(Mode::ConfigFile { daemon, .. }) if daemon.control == Some("/c".into())
        ));
        assert!(matches!(
            parse(&["ctl", "--control", "/c", "export-del", "name=a"]).map(Cli::mode),
            Ok(Mode::Ctl { control, command, args, .. })
                if control == std::path::Path::new("/c") && command == "export-del" && args == ["name=a"]
        ));
        assert!(matches!(
            parse(&["check-config", "f.toml"]).map(Cli::mode),
            Ok(Mode::Check(f)) if f == std::path::Path::new("f.toml")
        ));
        assert_eq!(
            parse(&[]).err(),
            Some(clap::error::ErrorKind::MissingRequiredArgument),
            "--socket or --config"
        );
    }

    #[test]
    fn config_file_and_export_flags_are_one_or_the_other() {
        for flag in [
            &["--socket", "/s"][..],
            &["--disk", "d"],
            &["--queue-size", "128"],
            &["--readonly"],
            &["--once"],
        ] {
            let args = [&["--config", "f.toml"][..], flag].concat();
            assert_eq!(
                parse(&args).err(),
                Some(clap::error::ErrorKind::ArgumentConflict),
                "{flag:?}"
            );
        }
        assert_eq!(
            parse(&["--disk", "d", "check-config", "f"]).err(),
            Some(clap::error::ErrorKind::ArgumentConflict)
        );
        let err = Cli::from_args(["corodev", "--config", "f", "--queue-size", "128"])
            .expect_err("refused");
        assert_eq!(
            err.to_string().lines().next(),
            Some(
                "error: --queue-size is an export flag, and --config FILE describes every \
                 export: put it in the file's [[exports]] table, or drop --config"
            )
        );
    }

    #[test]
    fn metrics_is_a_daemon_flag_for_both_modes() {
        let flags = parse(&["--socket", "/s", "--metrics", "9400"]).expect("parses");
        assert_eq!(
            flags.daemon.metrics,
            Some("127.0.0.1:9400".parse().unwrap())
        );
        let file = parse(&["--config", "f.toml", "--metrics", "[::]:9400"]).expect("parses");
        assert_eq!(file.daemon.metrics, Some("[::]:9400".parse().unwrap()));
        assert_eq!(
            parse(&["--socket", "/s"]).expect("parses").daemon.metrics,
            None
        );
        let err = Cli::from_args(["corodev", "--socket", "/s", "--metrics", "localhost:1"])
            .expect_err("not an IP");
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert_eq!(
            err.to_string().lines().next(),
            Some(
                "error: invalid value 'localhost:1' for '--metrics <ADDR>': expected a port \
                 (e.g. 9400, on 127.0.0.1) or IP:PORT (e.g. 0.0.0.0:9400, [::1]:9400)"
            )
        );
    }

    #[test]
    fn values_are_typed_by_clap_and_judged_by_validation() {
        assert!(parse(&["--socket", "/s", "--queue-size", "abc"]).is_err());
        let cli = parse(&["--socket", "/s", "--disk", "d", "--queue-size", "100"])
            .expect("a number parses");
        let err = cli.export.validate().expect_err("not a power of two");
        assert_eq!(
            err.to_string(),
            "--queue-size: 100 is not a power of two between 2 and 32768: use e.g. 128 or 256"
        );
        assert!(parse(&["--socket", "/s", "--stack-mode", "stacked"]).is_err());
    }
}

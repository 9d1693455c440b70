//! Command-line options and their validation.
//!
//! Everything a user can get wrong is checked here, before any file or socket is touched,
//! and reported as one line naming the option, the problem and the fix.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

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
  corodev --socket /tmp/null.sock --backend null --size 4G";

/// Storage behind the virtio-blk device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// A raw image file or block device, through io_uring.
    File,
    /// Reads return zeroes, writes are discarded (benchmarks, tests).
    Null,
}

/// Coroutine context-switch implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CoroutineBackend {
    /// Register-only switch, no syscall (x86_64; elsewhere falls back to ucontext).
    Fast,
    /// glibc swapcontext on every switch (portable; for debugging and comparison).
    Ucontext,
}

/// corodev: a vhost-user-blk daemon whose every guest request is a stackful coroutine.
#[derive(Debug, Parser)]
#[command(version, about, after_help = EXAMPLES)]
pub struct Cli {
    /// vhost-user socket to listen on (a stale socket file is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// Raw image file or block device to export (required for --backend file).
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,

    /// Storage backend.
    #[arg(long, value_enum, default_value_t = BackendKind::File)]
    pub backend: BackendKind,

    /// Size of a null device, in bytes or with a K/M/G/T suffix (binary units).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Fixed latency added to every null-backend request, in microseconds.
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub null_latency_us: u64,

    /// Export read-only: the guest sees VIRTIO_BLK_F_RO and writes fail.
    #[arg(long)]
    pub readonly: bool,

    /// Open the disk with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,

    /// Number of virtqueues offered to the guest (1-64).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Worker threads serving the queues (default: min(num-queues, CPU cores)).
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: Option<u16>,

    /// Maximum virtqueue size: a power of two from 1 to 32768.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Serial number returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    #[arg(long, value_name = "S", default_value = "corodev", value_parser = parse_serial)]
    pub serial: String,

    /// Logical block size the guest sees.
    #[arg(long, value_name = "512|4096", default_value_t = 512, value_parser = parse_block_size)]
    pub block_size: u32,

    /// Coroutine stack size, in bytes or with a K/M suffix (minimum 32K).
    #[arg(long, value_name = "BYTES", default_value = "256K", value_parser = parse_stack_size)]
    pub stack_size: u64,

    /// Coroutine context-switch implementation.
    #[arg(long, value_enum, default_value_t = CoroutineBackend::Fast)]
    pub coroutine_backend: CoroutineBackend,

    /// Poll the queues for up to this many microseconds after the last request before
    /// sleeping (0: never poll). Each worker adapts its window within this limit to how
    /// soon work comes back: polling saves the guest's kicks and our wake-ups under load,
    /// and stops costing CPU when the next request is further away than this.
    #[arg(long, value_name = "US", default_value_t = 32, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub poll_us: u64,

    /// Serve one connection, then exit (default: listen again after each disconnect).
    #[arg(long)]
    pub once: bool,
}

/// Parses `4096`, `64K`, `1M`, `10G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size: use a number of bytes, e.g. 4096 or 1G"))?;
    let mult: u64 = match suffix.to_ascii_uppercase().as_str() {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => {
            return Err(format!(
                "unknown size suffix '{suffix}' in '{s}': use K, M, G or T"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number: use a power of two such as 128 or 256"))?;
    if n == 0 || n > 32768 || !n.is_power_of_two() {
        return Err(format!(
            "{n} is not a power of two between 1 and 32768: use e.g. 128 or 256"
        ));
    }
    u16::try_from(n).map_err(|_| format!("{n} is too large: the maximum is 32768"))
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!(
            "'{s}' is not a supported block size: use 512 or 4096"
        )),
    }
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err(format!(
            "serial '{s}' is {} bytes; virtio-blk allows at most 20",
            s.len()
        ));
    }
    Ok(s.to_owned())
}

fn parse_stack_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n < coro::MIN_STACK_SIZE as u64 {
        return Err(format!(
            "stack size {n} is below the minimum of {} bytes: use at least 32K",
            coro::MIN_STACK_SIZE
        ));
    }
    if n > 64 << 20 {
        return Err(format!("stack size {n} is above 64M: use e.g. 256K or 1M"));
    }
    Ok(n)
}

impl Cli {
    /// Checks combinations of options that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        match self.backend {
            BackendKind::File => {
                if self.disk.is_none() {
                    return Err("--disk PATH is required with --backend file (or use --backend null --size BYTES)".into());
                }
                if self.size.is_some() {
                    return Err(
                        "--size is only for --backend null; a file's size is its own".into(),
                    );
                }
            }
            BackendKind::Null => {
                let Some(size) = self.size else {
                    return Err("--backend null needs --size BYTES, e.g. --size 1G".into());
                };
                if size == 0 || size % u64::from(self.block_size) != 0 {
                    return Err(format!(
                        "--size {size} is not a positive multiple of the block size {}",
                        self.block_size
                    ));
                }
                if self.disk.is_some() {
                    return Err(
                        "--disk is not used with --backend null: drop it or use --backend file"
                            .into(),
                    );
                }
            }
        }
        if let Some(t) = self.threads {
            if t > self.num_queues {
                return Err(format!(
                    "--threads {t} is more than --num-queues {}: a thread serves whole queues",
                    self.num_queues
                ));
            }
        }
        Ok(())
    }

    /// Worker threads to run: `--threads`, or one per queue up to the number of CPUs.
    pub fn worker_threads(&self) -> u16 {
        self.threads.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            self.num_queues.min(u16::try_from(cpus).unwrap_or(u16::MAX))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        let mut all = vec!["corodev", "--socket", "/tmp/s"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
        cli.validate()?;
        Ok(cli)
    }

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("1X").unwrap_err().contains("suffix"));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn queue_size_must_be_power_of_two() {
        assert!(parse(&["--disk", "d", "--queue-size", "100"])
            .unwrap_err()
            .contains("not a power of two"));
        assert!(parse(&["--disk", "d", "--queue-size", "65536"]).is_err());
        assert!(parse(&["--disk", "d", "--queue-size", "0"]).is_err());
        assert_eq!(
            parse(&["--disk", "d", "--queue-size", "1024"]).map(|c| c.queue_size),
            Ok(1024)
        );
    }

    #[test]
    fn backend_needs_its_options() {
        assert!(parse(&[]).unwrap_err().contains("--disk PATH is required"));
        assert!(parse(&["--backend", "null"])
            .unwrap_err()
            .contains("--size"));
        assert!(parse(&["--backend", "null", "--size", "1000"])
            .unwrap_err()
            .contains("multiple of the block size"));
        assert!(parse(&["--backend", "null", "--size", "1M"]).is_ok());
    }

    #[test]
    fn block_size_serial_threads() {
        assert!(parse(&["--disk", "d", "--block-size", "1024"])
            .unwrap_err()
            .contains("512 or 4096"));
        assert!(parse(&["--disk", "d", "--serial", "123456789012345678901"])
            .unwrap_err()
            .contains("at most 20"));
        assert!(parse(&["--disk", "d", "--threads", "2"])
            .unwrap_err()
            .contains("more than --num-queues"));
        assert!(parse(&["--disk", "d", "--stack-size", "4K"])
            .unwrap_err()
            .contains("minimum"));
    }
}

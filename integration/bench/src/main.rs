//! `corodev-bench`: a load generator for vhost-user-blk servers (corodev,
//! qemu-storage-daemon, ...), built on libblkio's `virtio-blk-vhost-user` driver so that the
//! frontend under the measurement shares no code with corodev.
//!
//! It connects, negotiates `--queues` virtqueues, maps one shared-memory region for all I/O
//! buffers (vhost-user servers can only reach memory the frontend has mapped into them),
//! runs one client thread per queue with `--iodepth` requests in flight, and reports IOPS,
//! bandwidth, latency percentiles and errors, as text or as one JSON object.
//!
//! `--verify` adds three phases around the timed one when needed: a fill that writes the
//! pattern of [`pattern`] over the region (only when the workload reads), the timed run
//! (reads are checked, writes stamp a new generation), and a read-back of every block
//! whose contents are known. Only the timed phase counts towards the performance numbers.
//!
//! Exit status: 0 on success, 1 on any error (one line on stderr), including I/O errors or
//! verify mismatches during the run (after the report is printed).

#![deny(
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks,
    clippy::missing_safety_doc
)]
#![warn(missing_docs)]

mod error;
mod pattern;
mod worker;

use std::process::ExitCode;
use std::ptr::NonNull;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blkio::Blkio;
use clap::{Parser, ValueEnum};
use corodev_units::parse_size;
use hdrhistogram::Histogram;

use crate::error::Error;
use crate::worker::{IoFailure, Order, Plan, SlotBufs, Stop, Worker};

/// libblkio places each read or write in this many descriptors (header, data, status) and
/// never uses indirect descriptors, so a queue of N descriptors holds N / 3 requests.
const DESCRIPTORS_PER_REQUEST: u64 = 3;
/// `--verify` keeps 5 bytes per block; this caps it at about 160 MiB.
const MAX_VERIFY_BLOCKS: u64 = 1 << 25;

const EXAMPLES: &str = "\
Examples:
  # 4K random reads at queue depth 32 for 10 s against qemu-storage-daemon or corodev
  corodev-bench --socket /tmp/vhost.sock --rw randread --bs 4K --iodepth 32 --runtime 10

  # Data check: 2 queues of mixed I/O over the first 64 MiB, then read everything back
  corodev-bench --socket /tmp/vhost.sock --rw mixed --mix-read 50 --queues 2 --iodepth 16 \\
      --size 64M --ios 100000 --verify";

/// Access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Uniformly random reads.
    Randread,
    /// Uniformly random writes.
    Randwrite,
    /// Uniformly random, --mix-read percent reads.
    Mixed,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Mixed => "mixed",
        }
    }
}

/// Load generator for vhost-user-blk servers, on libblkio's virtio-blk-vhost-user driver.
#[derive(Debug, Parser)]
#[command(version, about, after_help = EXAMPLES)]
struct Args {
    /// vhost-user socket of the server.
    #[arg(long, value_name = "PATH")]
    socket: String,

    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,

    /// Percentage of reads for --rw mixed [default: 70].
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u8).range(0..=100))]
    mix_read: Option<u8>,

    /// Request size in bytes, K/M suffixes allowed (binary units).
    #[arg(long, value_name = "BYTES", default_value = "4K", value_parser = parse_size)]
    bs: u64,

    /// Requests in flight per queue.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65536))]
    iodepth: u32,

    /// Virtqueues, one client thread each; each queue works on its own slice of the region.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    queues: u32,

    /// Seconds to run [default: 5].
    #[arg(long, value_name = "SECS", value_parser = parse_seconds, conflicts_with = "ios")]
    runtime: Option<f64>,

    /// Run this many I/Os in total (split across the queues) instead of for --runtime.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    ios: Option<u64>,

    /// Bytes of the device to use, from offset 0 [default: the device capacity].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    size: Option<u64>,

    /// Virtqueue size (descriptors, a power of two); each request takes 3 [default: libblkio's 256].
    #[arg(long, value_name = "N", value_parser = parse_queue_size)]
    queue_size: Option<u32>,

    /// Check data: stamp every write with its offset and a generation, check every read,
    /// and read back all written blocks at the end (costs time proportional to --size).
    #[arg(long)]
    verify: bool,

    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(v),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

fn parse_queue_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n.is_power_of_two() && n <= 32768 => Ok(n),
        _ => Err(format!("'{s}' is not a power of two from 1 to 32768")),
    }
}

/// Formats a byte count the way it was probably typed (4K, 128K, 1M).
fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

fn prop<T>(property: &'static str, r: blkio::Result<T>) -> Result<T, Error> {
    r.map_err(|source| Error::Property { property, source })
}

/// A run id for the verify pattern: differs between runs so old data cannot pass as new.
fn run_id() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() ^ d.as_secs() as u32);
    nanos ^ std::process::id().rotate_left(16)
}

/// Runs `plan_for(worker)` on every worker, each on its own thread, and waits for all.
fn phase(
    workers: &mut [Worker],
    plan_for: impl Fn(&Worker) -> Plan + Sync,
) -> Result<Vec<worker::PhaseResult>, Error> {
    std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter_mut()
            .map(|w| {
                let plan = plan_for(w);
                let queue = w.index;
                (queue, s.spawn(move || w.run(&plan)))
            })
            .collect();
        handles
            .into_iter()
            .map(|(queue, h)| h.join().map_err(|_| Error::Panicked { queue })?)
            .collect()
    })
}

/// What a run measured.
struct Report {
    json: serde_json::Value,
    text: String,
    io_errors: u64,
    mismatches: u64,
}

/// Connects, plans, runs the phases and reports: each step is one function below, in the
/// order it happens.
fn run(args: &Args) -> Result<Report, Error> {
    let Connected {
        blkio: mut b,
        queue_size,
    } = connect(args)?;
    let layout = plan(args, &b)?;
    let mut workers = start_workers(&mut b, args, &layout)?;

    let mix = Mix::of(args);
    let fill_seconds = fill_phase(&mut workers, args, &mix)?;
    let results = timed_phase(&mut workers, args, &mix)?;
    let readback = readback_phase(&mut workers, args)?;
    let totals = totals(&results, &workers, readback.io_errors)?;
    // The buffers must go before the driver: the workers own the queues that use them.
    drop(workers);
    drop(b);

    Ok(report(
        args,
        &Measured {
            queue_size,
            blocks: layout.blocks,
            read_pct: mix.read_pct,
            totals,
            fill_seconds,
            readback_seconds: readback.seconds,
        },
    ))
}

/// A connected driver with its queues configured, not yet started.
struct Connected {
    blkio: Blkio,
    /// The virtqueue size in effect (`--queue-size` or libblkio's default).
    queue_size: u32,
}

/// Connects to `--socket` and configures `--queues` queues big enough for `--iodepth`.
fn connect(args: &Args) -> Result<Connected, Error> {
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(Error::Driver)?;
    prop("path", b.set_str("path", &args.socket))?;
    b.connect().map_err(|source| Error::Connect {
        socket: args.socket.clone(),
        source,
    })?;

    let offered = prop("max-queues", b.get_i32("max-queues"))?;
    if i64::from(args.queues) > i64::from(offered) {
        return Err(Error::TooManyQueues {
            requested: args.queues,
            offered,
        });
    }
    prop("num-queues", b.set_i32("num-queues", args.queues as i32))?;
    if let Some(qs) = args.queue_size {
        prop("queue-size", b.set_i32("queue-size", qs as i32))?;
    }
    let queue_size = prop("queue-size", b.get_i32("queue-size"))?.max(0) as u32;
    let needed = u64::from(args.iodepth) * DESCRIPTORS_PER_REQUEST;
    if needed > u64::from(queue_size) {
        return Err(Error::QueueTooSmall {
            iodepth: args.iodepth,
            needed,
            queue_size,
            suggested: needed.next_power_of_two(),
        });
    }
    Ok(Connected {
        blkio: b,
        queue_size,
    })
}

/// The part of the device the run covers.
struct Layout {
    /// `--bs` blocks in `--size` (or the capacity).
    blocks: u64,
    /// Blocks each queue works on: queue i owns `[i * per_queue, (i + 1) * per_queue)`.
    per_queue: u64,
}

/// Checks `--bs` and `--size` against what the device reports and splits its blocks
/// between the queues.
fn plan(args: &Args, b: &Blkio) -> Result<Layout, Error> {
    let capacity = prop("capacity", b.get_u64("capacity"))?;
    let block_size = prop("request-alignment", b.get_i32("request-alignment"))?.max(1) as u64;
    if args.bs == 0 || args.bs % block_size != 0 {
        return Err(Error::Misaligned {
            bs: args.bs,
            block_size,
        });
    }
    let max_segment = prop("max-segment-len", b.get_i32("max-segment-len"))?.max(0) as u64;
    if max_segment != 0 && args.bs > max_segment {
        return Err(Error::SegmentTooLarge {
            bs: args.bs,
            max: max_segment,
        });
    }
    let size = args.size.unwrap_or(capacity);
    if size > capacity {
        return Err(Error::SizeBeyondCapacity { size, capacity });
    }
    let blocks = size / args.bs;
    let per_queue = blocks / u64::from(args.queues);
    if per_queue < u64::from(args.iodepth) {
        return Err(Error::TooFewBlocks {
            blocks,
            bs: args.bs,
            queues: args.queues,
            iodepth: args.iodepth,
        });
    }
    if args.verify && blocks > MAX_VERIFY_BLOCKS {
        return Err(Error::VerifyTooLarge {
            blocks,
            max: MAX_VERIFY_BLOCKS,
        });
    }
    Ok(Layout { blocks, per_queue })
}

/// Starts the driver, maps one buffer region for all queues and makes one worker per queue.
fn start_workers(b: &mut Blkio, args: &Args, layout: &Layout) -> Result<Vec<Worker>, Error> {
    let outcome = b.start().map_err(Error::Start)?;
    if outcome.queues.len() != args.queues as usize {
        return Err(Error::QueueCount {
            requested: args.queues,
            got: outcome.queues.len(),
        });
    }

    // One region for every queue's slots: each region costs the server a memory slot and
    // an mmap, and some servers allow only a few (VHOST_USER_GET_MAX_MEM_SLOTS).
    let too_large = || Error::BuffersTooLarge {
        queues: args.queues,
        iodepth: args.iodepth,
        bs: args.bs,
    };
    let slot_len = usize::try_from(args.bs).map_err(|_| too_large())?;
    let queue_len = slot_len
        .checked_mul(args.iodepth as usize)
        .ok_or_else(too_large)?;
    let align = prop("mem-region-alignment", b.get_u64("mem-region-alignment"))?;
    let align = usize::try_from(align).map_err(|_| too_large())?.max(4096);
    let len = queue_len
        .checked_mul(args.queues as usize)
        .and_then(|l| l.checked_next_multiple_of(align))
        .ok_or_else(too_large)?;
    let region = b
        .alloc_mem_region(len)
        .map_err(|source| Error::AllocBuffers { len, source })?;
    b.map_mem_region(&region).map_err(Error::MapBuffers)?;
    let base = NonNull::new(region.addr as *mut u8).ok_or(Error::AllocBuffers {
        len,
        source: blkio::Error::new(
            blkio::Errno::FAULT,
            "libblkio returned a null memory region",
        ),
    })?;

    let run = args.verify.then(run_id);
    let per_queue = layout.per_queue;
    Ok(outcome
        .queues
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            // SAFETY: the region is `len >= queues * queue_len` bytes, mapped read-write by
            // alloc_mem_region; queue i gets bytes [i * queue_len, (i + 1) * queue_len), which
            // no other worker touches; libblkio keeps the region mapped while any Blkioq
            // (owned by the worker together with these buffers) lives.
            let bufs =
                unsafe { SlotBufs::new(base.add(i * queue_len), slot_len, args.iodepth as usize) };
            Worker::new(i, q, bufs, (i as u64 * per_queue, per_queue), args.bs, run)
        })
        .collect())
}

/// The timed phase's workload: `--rw` (and `--mix-read`) as an order and a read share.
struct Mix {
    order: Order,
    /// Percentage of requests that read.
    read_pct: u8,
}

impl Mix {
    fn of(args: &Args) -> Mix {
        let (order, read_pct) = match args.rw {
            Rw::Read => (Order::Sequential, 100),
            Rw::Write => (Order::Sequential, 0),
            Rw::Randread => (Order::Random, 100),
            Rw::Randwrite => (Order::Random, 0),
            Rw::Mixed => (Order::Random, args.mix_read.unwrap_or(70)),
        };
        Mix { order, read_pct }
    }
}

/// `--verify`'s fill, when the workload reads: writes the pattern over every block so the
/// timed reads have something to check. Returns its seconds (0 when skipped).
fn fill_phase(workers: &mut [Worker], args: &Args, mix: &Mix) -> Result<f64, Error> {
    let mut fill_seconds = 0.0;
    if args.verify && mix.read_pct > 0 {
        let t = Instant::now();
        let fill = phase(workers, |w| Plan {
            order: Order::Sequential,
            read_pct: 0,
            stop: Stop::After(w.blocks()),
            known_only: false,
        })?;
        fill_seconds = t.elapsed().as_secs_f64();
        if let Some(IoFailure { offset, ret, .. }) = fill.iter().find_map(|r| r.first_io_error) {
            let errors: u64 = fill.iter().map(|r| r.io_errors).sum();
            eprintln!(
                "corodev-bench: verify fill: {errors} write(s) failed, first at byte {offset} (errno {})",
                -ret
            );
        }
    }
    Ok(fill_seconds)
}

/// The measured phase: `mix` until `--runtime` passes or `--ios` are done (split across
/// the queues, the first `ios % queues` queues doing one more).
fn timed_phase(
    workers: &mut [Worker],
    args: &Args,
    mix: &Mix,
) -> Result<Vec<worker::PhaseResult>, Error> {
    let queues = u64::from(args.queues);
    let deadline = Instant::now() + Duration::from_secs_f64(args.runtime.unwrap_or(5.0));
    phase(workers, |w| Plan {
        order: mix.order,
        read_pct: mix.read_pct,
        stop: match args.ios {
            Some(n) => Stop::After(n / queues + u64::from((w.index as u64) < n % queues)),
            None => Stop::At(deadline),
        },
        known_only: false,
    })
}

/// What `--verify`'s read-back took and how many of its reads failed.
struct ReadBack {
    seconds: f64,
    io_errors: u64,
}

/// `--verify`'s read-back: reads (and so checks) every block whose contents are known.
fn readback_phase(workers: &mut [Worker], args: &Args) -> Result<ReadBack, Error> {
    let mut readback = ReadBack {
        seconds: 0.0,
        io_errors: 0,
    };
    if args.verify {
        let t = Instant::now();
        let rb = phase(workers, |w| Plan {
            order: Order::Sequential,
            read_pct: 100,
            stop: Stop::After(w.known_blocks()),
            known_only: true,
        })?;
        readback.seconds = t.elapsed().as_secs_f64();
        readback.io_errors = rb.iter().map(|r| r.io_errors).sum();
    }
    Ok(readback)
}

/// The timed phase summed over the queues, with the verify results of the whole run.
struct Totals {
    ios: u64,
    /// Failed requests of the timed phase and the read-back.
    io_errors: u64,
    /// From the first queue's start to the last queue's finish.
    seconds: f64,
    /// Latencies of every queue, in ns.
    hist: Histogram<u64>,
    /// Reads whose data was checked.
    checked: u64,
    mismatches: u64,
}

/// Sums the timed phase's results and the workers' verify results; prints each verify
/// mismatch and the first I/O error on stderr.
fn totals(
    results: &[worker::PhaseResult],
    workers: &[Worker],
    readback_errors: u64,
) -> Result<Totals, Error> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let (mut ios, mut io_errors) = (0u64, readback_errors);
    let mut first_error = None;
    for r in results {
        ios += r.ios;
        io_errors += r.io_errors;
        first_error = first_error.or(r.first_io_error);
        hist.add(&r.hist)?;
    }
    let started = results.iter().map(|r| r.started).min();
    let finished = results.iter().map(|r| r.finished).max();
    let seconds = match (started, finished) {
        (Some(s), Some(f)) => f.duration_since(s).as_secs_f64(),
        _ => 0.0,
    };
    let (mut checked, mut mismatches) = (0u64, 0u64);
    for w in workers {
        if let Some(v) = w.verify_result() {
            checked += v.checked;
            mismatches += v.mismatches;
            for m in v.details {
                eprintln!("corodev-bench: verify: queue {}: {m}", w.index);
            }
        }
    }
    if let Some(IoFailure {
        is_read,
        offset,
        ret,
    }) = first_error
    {
        eprintln!(
            "corodev-bench: first I/O error: {} at byte {offset} failed with errno {}",
            if is_read { "read" } else { "write" },
            -ret
        );
    }
    Ok(Totals {
        ios,
        io_errors,
        seconds,
        hist,
        checked,
        mismatches,
    })
}

/// Everything the report shows.
struct Measured {
    queue_size: u32,
    blocks: u64,
    read_pct: u8,
    totals: Totals,
    fill_seconds: f64,
    readback_seconds: f64,
}

/// The report as one JSON object and as text (same numbers).
fn report(args: &Args, m: &Measured) -> Report {
    let Totals {
        ios,
        io_errors,
        seconds,
        ref hist,
        checked,
        mismatches,
    } = m.totals;
    let (queue_size, blocks, read_pct) = (m.queue_size, m.blocks, m.read_pct);
    let (fill_seconds, readback_seconds) = (m.fill_seconds, m.readback_seconds);
    let iops = if seconds > 0.0 {
        ios as f64 / seconds
    } else {
        0.0
    };
    let mib_s = iops * args.bs as f64 / f64::from(1 << 20);
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let (p50, p99, p999) = (us(0.5), us(0.99), us(0.999));
    let mut json = serde_json::json!({
        "rw": args.rw.name(),
        "bs": args.bs,
        "iodepth": args.iodepth,
        "queues": args.queues,
        "queue_size": queue_size,
        "size": blocks * args.bs,
        "seconds": seconds,
        "ios": ios,
        "iops": iops,
        "mib_s": mib_s,
        "lat_p50_us": p50,
        "lat_p99_us": p99,
        "lat_p999_us": p999,
        "lat_mean_us": hist.mean() / 1000.0,
        "lat_max_us": hist.max() as f64 / 1000.0,
        "errors": io_errors + mismatches,
        "io_errors": io_errors,
        "verify": args.verify,
    });
    if args.rw == Rw::Mixed {
        json["mix_read"] = read_pct.into();
    }
    let mut text = format!(
        "{} {} x QD{} x {} queue(s), {seconds:.2} s: {iops:.0} IOPS, {mib_s:.1} MiB/s; \
         latency us p50 {p50:.1} p99 {p99:.1} p99.9 {p999:.1}; errors {}",
        args.rw.name(),
        human(args.bs),
        args.iodepth,
        args.queues,
        io_errors + mismatches
    );
    if args.verify {
        json["verify_reads_checked"] = checked.into();
        json["verify_mismatches"] = mismatches.into();
        json["verify_fill_seconds"] = fill_seconds.into();
        json["verify_readback_seconds"] = readback_seconds.into();
        text += &format!(
            "\nverify: {checked} reads checked, {mismatches} mismatches \
             (fill {fill_seconds:.1} s, read-back {readback_seconds:.1} s)"
        );
    }
    Report {
        json,
        text,
        io_errors,
        mismatches,
    }
}

/// Clap's message on one line: its first paragraph (which names the offending argument),
/// without the usage and "try --help" paragraphs.
fn one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let msg = rendered.split("\n\n").next().unwrap_or(&rendered);
    let msg = msg.trim().strip_prefix("error: ").unwrap_or(msg.trim());
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("corodev-bench: {}", one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    if args.mix_read.is_some() && args.rw != Rw::Mixed {
        eprintln!("corodev-bench: --mix-read applies only to --rw mixed");
        return ExitCode::FAILURE;
    }
    let report = match run(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("corodev-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!("{}", report.json);
    } else {
        println!("{}", report.text);
    }
    if report.io_errors + report.mismatches > 0 {
        let e = Error::DataErrors {
            io_errors: report.io_errors,
            mismatches: report.mismatches,
        };
        eprintln!("corodev-bench: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_size_must_be_a_power_of_two() {
        assert_eq!(parse_queue_size("1024"), Ok(1024));
        assert!(parse_queue_size("1000").is_err());
        assert!(parse_queue_size("65536").is_err());
    }

    #[test]
    fn runtime_must_be_positive() {
        assert_eq!(parse_seconds("0.5"), Ok(0.5));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("nan").is_err());
    }

    #[test]
    fn ios_and_runtime_conflict() {
        let e = Args::try_parse_from(["b", "--socket", "s", "--ios", "5", "--runtime", "1"])
            .expect_err("conflict");
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn clap_errors_fit_one_line() {
        let e = Args::try_parse_from(["b"]).expect_err("socket missing");
        let line = one_line(&e);
        assert!(!line.contains('\n'));
        assert!(line.contains("--socket"), "{line}");
    }
}

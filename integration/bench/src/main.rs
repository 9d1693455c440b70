//! `corodev-bench`: drives a vhost-user-blk server (corodev, qemu-storage-daemon, ...) with
//! libblkio's `virtio-blk-vhost-user` driver, an independent frontend implementation, and
//! reports IOPS, bandwidth, latency percentiles and errors.
//!
//! One client thread per queue keeps `--iodepth` requests in flight. I/O buffers live in a
//! memory region mapped through libblkio (vhost-user needs them in shared memory).
//! `--verify` first writes a pattern derived from each block's offset over the region,
//! then checks every read against it (and writes keep writing that same pattern, so
//! concurrent reads stay checkable).

use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;

/// Access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
    /// Random, `--mix-read` percent reads.
    Mixed,
}

#[derive(Debug, Parser)]
#[command(about = "vhost-user-blk load generator (libblkio frontend)")]
struct Args {
    /// vhost-user socket of the server.
    #[arg(long)]
    socket: String,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Percentage of reads for --rw mixed.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    mix_read: u8,
    /// Block size in bytes (K/M suffixes allowed).
    #[arg(long, default_value = "4K", value_parser = corodev::cli::parse_size)]
    bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    iodepth: u32,
    /// Queues (one client thread each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    queues: u32,
    /// Seconds to run (ignored when --ios is given).
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Stop after this many I/Os per queue instead of after --runtime.
    #[arg(long)]
    ios: Option<u64>,
    /// Bytes of the device to use, from offset 0 (default: all of it).
    #[arg(long, value_parser = corodev::cli::parse_size)]
    size: Option<u64>,
    /// Virtqueue size to negotiate (default: the driver's).
    #[arg(long)]
    queue_size: Option<i32>,
    /// Check data: write a per-block pattern first, verify every read.
    #[arg(long)]
    verify: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("libblkio: {0}")]
    Blkio(String),
    #[error("{0}")]
    Config(String),
    #[error("verify failed: {0}")]
    Verify(String),
}

fn blk<T>(r: blkio::Result<T>, what: &str) -> Result<T, Error> {
    r.map_err(|e| Error::Blkio(format!("{what}: {}", e.message())))
}

/// The pattern byte `i` of the block at `offset` holds (depends on the offset only).
fn fill_pattern(buf: &mut [u8], offset: u64) {
    let mut x = offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What one queue's thread measured.
struct QueueResult {
    ios: u64,
    errors: u64,
    hist: Histogram<u64>,
    verify_failures: u64,
}

/// A slot's buffer: a window into the libblkio memory region.
struct Slot {
    buf: *mut u8,
    started: Instant,
    offset: u64,
    is_read: bool,
}

struct Job {
    rw: Rw,
    mix_read: u8,
    bs: u64,
    iodepth: u32,
    blocks: u64,
    deadline: Option<Instant>,
    ios: Option<u64>,
    verify: bool,
}

fn run_queue(
    q: &mut Blkioq,
    job: &Job,
    bufs: *mut u8,
    seed: u64,
    stop: &AtomicU64,
) -> Result<QueueResult, Error> {
    let bs = job.bs as usize;
    let mut rng = Rng(seed | 1);
    let mut seq = seed % job.blocks.max(1);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| Error::Config(format!("histogram: {e}")))?;
    let mut slots: Vec<Slot> = (0..job.iodepth as usize)
        // SAFETY: the region holds iodepth * bs bytes for this queue, starting at `bufs`.
        .map(|i| Slot {
            buf: unsafe { bufs.add(i * bs) },
            started: Instant::now(),
            offset: 0,
            is_read: true,
        })
        .collect();
    let (mut issued, mut done, mut errors, mut verify_failures) = (0u64, 0u64, 0u64, 0u64);
    let mut submit = |q: &mut Blkioq, i: usize, slots: &mut [Slot], rng: &mut Rng| {
        let block = match job.rw {
            Rw::Read | Rw::Write => {
                seq = (seq + 1) % job.blocks;
                seq
            }
            _ => rng.next() % job.blocks,
        };
        let is_read = match job.rw {
            Rw::Read | Rw::Randread => true,
            Rw::Write | Rw::Randwrite => false,
            Rw::Mixed => rng.next() % 100 < u64::from(job.mix_read),
        };
        let s = &mut slots[i];
        s.offset = block * job.bs;
        s.is_read = is_read;
        s.started = Instant::now();
        if is_read {
            q.read(s.offset, s.buf, bs, i, ReqFlags::empty());
        } else {
            if job.verify {
                // SAFETY: the slot's buffer is bs bytes of the mapped region, idle now.
                fill_pattern(
                    unsafe { std::slice::from_raw_parts_mut(s.buf, bs) },
                    s.offset,
                );
            }
            q.write(s.offset, s.buf, bs, i, ReqFlags::empty());
        }
    };
    for i in 0..slots.len() {
        submit(q, i, &mut slots, &mut rng);
        issued += 1;
    }
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..slots.len()).map(|_| MaybeUninit::uninit()).collect();
    let mut expect = vec![0u8; bs];
    let mut in_flight = slots.len() as u64;
    while in_flight > 0 {
        let n = blk(q.do_io(&mut completions, 1, None, None), "do_io")?;
        let now = Instant::now();
        let more = stop.load(Ordering::Relaxed) == 0
            && job.deadline.is_none_or(|d| now < d)
            && job.ios.is_none_or(|max| issued < max);
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            let i = c.user_data;
            in_flight -= 1;
            done += 1;
            let s = &slots[i];
            let _ = hist.record((now - s.started).as_nanos().max(1) as u64);
            if c.ret != 0 {
                errors += 1;
            } else if job.verify && s.is_read {
                fill_pattern(&mut expect, s.offset);
                // SAFETY: the read into this slot's buffer has completed.
                let got = unsafe { std::slice::from_raw_parts(s.buf, bs) };
                if got != &expect[..] {
                    verify_failures += 1;
                }
            }
            if more {
                submit(q, i, &mut slots, &mut rng);
                issued += 1;
                in_flight += 1;
            }
        }
    }
    Ok(QueueResult {
        ios: done,
        errors,
        hist,
        verify_failures,
    })
}

fn run(args: &Args) -> Result<serde_json::Value, Error> {
    let mut b = blk(Blkio::new("virtio-blk-vhost-user"), "create")?;
    blk(b.set_str("path", &args.socket), "path")?;
    blk(b.connect(), &format!("connect to {}", args.socket))?;
    let max_queues = blk(b.get_i32("max-queues"), "max-queues")?;
    if args.queues as i32 > max_queues {
        return Err(Error::Config(format!(
            "--queues {} but the server offers {max_queues}",
            args.queues
        )));
    }
    blk(b.set_i32("num-queues", args.queues as i32), "num-queues")?;
    if let Some(qs) = args.queue_size {
        blk(b.set_i32("queue-size", qs), "queue-size")?;
    }
    let capacity = blk(b.get_u64("capacity"), "capacity")?;
    let size = args.size.unwrap_or(capacity).min(capacity);
    if args.bs == 0 || args.bs % 512 != 0 || size < args.bs {
        return Err(Error::Config(format!(
            "--bs {} must be a multiple of 512 and at most the size {size}",
            args.bs
        )));
    }
    let outcome = blk(b.start(), "start")?;
    let per_queue = args.bs as usize * args.iodepth as usize;
    let align = blk(b.get_u64("mem-region-alignment"), "mem-region-alignment")? as usize;
    let len = (per_queue * args.queues as usize).next_multiple_of(align.max(4096));
    let region = blk(b.alloc_mem_region(len), "alloc_mem_region")?;
    blk(b.map_mem_region(&region), "map_mem_region")?;
    let base = region.addr as *mut u8;
    let blocks = size / args.bs;

    let mut queues = outcome.queues;
    if args.verify {
        // Lay down the pattern over the whole region once, with queue 0.
        let q = queues
            .first_mut()
            .ok_or_else(|| Error::Config("no queue".into()))?;
        let job = Job {
            rw: Rw::Write,
            mix_read: 0,
            bs: args.bs,
            iodepth: args.iodepth,
            blocks,
            deadline: None,
            ios: Some(blocks),
            verify: true,
        };
        let r = run_queue(q, &job, base, 0, &AtomicU64::new(0))?;
        if r.errors > 0 {
            return Err(Error::Verify(format!(
                "{} errors while writing the pattern",
                r.errors
            )));
        }
    }
    let started = Instant::now();
    let deadline = args
        .ios
        .is_none()
        .then(|| started + Duration::from_secs_f64(args.runtime));
    let stop = Arc::new(AtomicU64::new(0));
    let results: Vec<Result<QueueResult, Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .enumerate()
            .map(|(qi, q)| {
                let job = Job {
                    rw: args.rw,
                    mix_read: args.mix_read,
                    bs: args.bs,
                    iodepth: args.iodepth,
                    blocks,
                    deadline,
                    ios: args.ios,
                    verify: args.verify,
                };
                // SAFETY: each queue gets its own disjoint per_queue-byte window of the region.
                let bufs = unsafe { base.add(qi * per_queue) } as usize;
                let stop = stop.clone();
                s.spawn(move || {
                    run_queue(
                        q,
                        &job,
                        bufs as *mut u8,
                        0x1234_5678 + qi as u64 * 7919,
                        &stop,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Config("client thread panicked".into())))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| Error::Config(e.to_string()))?;
    let (mut ios, mut errors, mut vfail) = (0, 0, 0);
    for r in results {
        let r = r?;
        ios += r.ios;
        errors += r.errors;
        vfail += r.verify_failures;
        hist.add(&r.hist)
            .map_err(|e| Error::Config(format!("histogram: {e}")))?;
    }
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);
    let iops = ios as f64 / elapsed;
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let report = serde_json::json!({
        "rw": format!("{:?}", args.rw).to_lowercase(),
        "bs": args.bs,
        "iodepth": args.iodepth,
        "queues": args.queues,
        "seconds": elapsed,
        "ios": ios,
        "iops": iops,
        "mib_s": iops * args.bs as f64 / (1 << 20) as f64,
        "lat_us": { "p50": us(0.5), "p99": us(0.99), "p999": us(0.999), "mean": hist.mean() / 1000.0 },
        "errors": errors,
        "verify_failures": vfail,
    });
    if vfail > 0 {
        return Err(Error::Verify(format!(
            "{vfail} reads returned data that was never written: {report}"
        )));
    }
    Ok(report)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(r) => {
            if args.json {
                println!("{r}");
            } else {
                println!(
                    "{} bs={} qd={} queues={}: {:.0} IOPS, {:.1} MiB/s, lat p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, errors {}",
                    r["rw"].as_str().unwrap_or("?"), args.bs, args.iodepth, args.queues,
                    r["iops"].as_f64().unwrap_or(0.0), r["mib_s"].as_f64().unwrap_or(0.0),
                    r["lat_us"]["p50"].as_f64().unwrap_or(0.0), r["lat_us"]["p99"].as_f64().unwrap_or(0.0),
                    r["lat_us"]["p999"].as_f64().unwrap_or(0.0), r["errors"]
                );
            }
            if r["errors"].as_u64().unwrap_or(1) > 0 {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("corodev-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

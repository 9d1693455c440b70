//! Per-export, per-queue request statistics: counts by type, bytes, errors, requests in
//! flight and a latency histogram, counted on the data path and read as a
//! [`ExportStatsSnapshot`] (what `query-stats` returns, and what `--metrics` encodes).
//!
//! **Cost on the data path.** Each queue is served by one worker thread at a time (the
//! queue map of a connection is fixed, and an export serves one connection after
//! another: [`crate::server::serve_on`] joins a connection's worker threads before it
//! accepts the next, which also orders one writer's stores before the next one's), so
//! each [`QueueStats`] has a single writer: a counter is bumped with a relaxed load and a
//! relaxed store, not a locked read-modify-write, and readers (a scrape, on another
//! thread) see each counter whole, at most a few requests behind.
//! The struct is aligned to 128 bytes (two cache lines: Intel's adjacent-line prefetcher
//! pairs them), so two queues' workers never write to one line. No lock, no allocation,
//! no syscall; the clock is read once per popped batch and once per pass of completions.
//!
//! Boundary: what a request did is [`corodev_devices::blk::Served`]'s; the worker calls
//! [`QueueStats::started`] and [`QueueStats::completed`]. Encoding for Prometheus is
//! [`crate::metrics`]'s; nothing here knows about it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use corodev_devices::blk::Served;
use corodev_devices::request::{RequestType, S_OK, S_UNSUPP};
use serde::Serialize;

/// Upper bounds of the latency buckets in microseconds: powers of two from 8 µs to
/// 1,048,576 µs (about 1 s); a last bucket, without bound, takes the slower ones.
/// Powers of two make finding a bucket a division by a constant and a leading-zeros
/// count, and cover five decades with 18 buckets.
pub const BUCKET_BOUNDS_US: [u64; 18] = {
    let mut b = [0; 18];
    let mut i = 0;
    while i < b.len() {
        b[i] = 8 << i;
        i += 1;
    }
    b
};

/// Buckets, the unbounded one included.
const BUCKETS: usize = BUCKET_BOUNDS_US.len() + 1;

/// The request types counted apart (virtio-blk's, plus one for everything else).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `VIRTIO_BLK_T_IN`.
    Read,
    /// `VIRTIO_BLK_T_OUT`.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
    /// `VIRTIO_BLK_T_GET_ID`.
    GetId,
    /// An unsupported type, or a chain refused before its header could be read.
    Other,
}

impl Op {
    /// Every op, in the order of the counters.
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Discard,
        Op::WriteZeroes,
        Op::GetId,
        Op::Other,
    ];

    /// Its name in snapshots and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write-zeroes",
            Op::GetId => "get-id",
            Op::Other => "other",
        }
    }

    fn of(kind: Option<RequestType>) -> Op {
        match kind {
            Some(RequestType::In) => Op::Read,
            Some(RequestType::Out) => Op::Write,
            Some(RequestType::Flush) => Op::Flush,
            Some(RequestType::Discard) => Op::Discard,
            Some(RequestType::WriteZeroes) => Op::WriteZeroes,
            Some(RequestType::GetId) => Op::GetId,
            Some(RequestType::Unsupported(_)) | None => Op::Other,
        }
    }
}

/// Adds `n` to a counter that only the calling thread writes (see the module docs): no
/// locked instruction. Wrapping, as Prometheus counters may.
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
}

/// The latency bucket of a request that took `ns` nanoseconds: the first whose bound is
/// at least `ns`, or the unbounded last one.
fn bucket(ns: u64) -> usize {
    // Bounds are 8000 ns << i: the index is ceil(log2(ceil(ns / 8000))).
    let units = ns.div_ceil(8000);
    let index = if units <= 1 {
        0
    } else {
        (u64::BITS - (units - 1).leading_zeros()) as usize
    };
    index.min(BUCKETS - 1)
}

/// One queue's counters. Written by the worker serving the queue, read by anyone.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct QueueStats {
    /// Completed requests, by [`Op`] (indexed as [`Op::ALL`]).
    requests: [AtomicU64; Op::ALL.len()],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// IOERR from executing: the backend failed, or no coroutine could be started.
    io_errors: AtomicU64,
    /// IOERR from validation: a malformed request.
    invalid: AtomicU64,
    /// UNSUPP: an unsupported type or flag.
    unsupported: AtomicU64,
    /// Requests popped from the ring (in flight: this minus those completed).
    started: AtomicU64,
    /// Completed requests by latency bucket (not cumulative).
    latency: [AtomicU64; BUCKETS],
    latency_sum_ns: AtomicU64,
}

impl QueueStats {
    /// `n` requests were popped from the ring.
    pub fn started(&self, n: u64) {
        bump(&self.started, n);
    }

    /// A request finished as `served` says, `took` after it was popped.
    pub fn completed(&self, served: &Served, took: Duration) {
        let op = Op::of(served.kind);
        bump(&self.requests[op as usize], 1);
        if served.status == S_OK {
            match op {
                Op::Read => bump(&self.bytes_read, served.bytes),
                Op::Write => bump(&self.bytes_written, served.bytes),
                _ => {}
            }
        } else if served.status == S_UNSUPP {
            bump(&self.unsupported, 1);
        } else if served.rejected {
            bump(&self.invalid, 1);
        } else {
            bump(&self.io_errors, 1);
        }
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        bump(&self.latency[bucket(ns)], 1);
        bump(&self.latency_sum_ns, ns);
    }

    /// The counters as they are now. Each is read whole; they are not read at one
    /// instant, so a request completing meanwhile may be in one and not another.
    pub fn snapshot(&self, queue: usize) -> QueueStatsSnapshot {
        let load = |c: &AtomicU64| c.load(Relaxed);
        let requests = std::array::from_fn(|i| load(&self.requests[i]));
        let completed: u64 = requests.iter().sum();
        let counts: [u64; BUCKETS] = std::array::from_fn(|i| load(&self.latency[i]));
        QueueStatsSnapshot {
            queue,
            requests: RequestCounts::from_array(requests),
            bytes_read: load(&self.bytes_read),
            bytes_written: load(&self.bytes_written),
            errors: ErrorCounts {
                io: load(&self.io_errors),
                invalid: load(&self.invalid),
                unsupported: load(&self.unsupported),
            },
            // Read after the completions, so a request popped meanwhile only adds.
            in_flight: load(&self.started).saturating_sub(completed),
            latency: Latency {
                count: counts.iter().sum(),
                sum_ns: load(&self.latency_sum_ns),
                buckets: counts
                    .iter()
                    .enumerate()
                    .map(|(i, &count)| Bucket {
                        le_us: BUCKET_BOUNDS_US.get(i).copied(),
                        count,
                    })
                    .collect(),
            },
        }
    }
}

/// The counters of one export: one [`QueueStats`] per queue. Made when the export
/// starts and kept by the registry for as long as it runs, so they go on counting over
/// frontend reconnects; an export restarted with new settings (a reload) starts from
/// zero, sized by its new queue count (Prometheus reads that as a counter reset).
#[derive(Debug)]
pub struct ExportStats {
    queues: Box<[QueueStats]>,
}

impl ExportStats {
    /// Zeroed counters for `num_queues` queues.
    pub fn new(num_queues: usize) -> ExportStats {
        ExportStats {
            queues: (0..num_queues).map(|_| QueueStats::default()).collect(),
        }
    }

    /// Queue `queue`'s counters (`None` beyond the export's queues).
    pub fn queue(&self, queue: usize) -> Option<&QueueStats> {
        self.queues.get(queue)
    }

    /// A snapshot of every queue, under the export's name.
    pub fn snapshot(&self, export: &str) -> ExportStatsSnapshot {
        ExportStatsSnapshot {
            export: export.to_owned(),
            queues: self
                .queues
                .iter()
                .enumerate()
                .map(|(q, s)| s.snapshot(q))
                .collect(),
        }
    }
}

/// One export's statistics, as `query-stats` returns them (JSON, kebab-case keys) and
/// `--metrics` exposes them. Every counter counts from the export's start (not the
/// frontend's connection) and only goes up, except `in-flight`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExportStatsSnapshot {
    /// The export's name.
    pub export: String,
    /// One entry per virtqueue, in queue order.
    pub queues: Vec<QueueStatsSnapshot>,
}

/// One virtqueue's statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct QueueStatsSnapshot {
    /// The queue's index (0-based, as the guest numbers its virtqueues).
    pub queue: usize,
    /// Completed requests by type, whatever their status.
    pub requests: RequestCounts,
    /// Bytes read from the disk into the guest by successful reads.
    pub bytes_read: u64,
    /// Bytes written from the guest to the disk by successful writes (write-zeroes and
    /// discard ranges are not counted: no data crosses).
    pub bytes_written: u64,
    /// Requests answered with an error status, by cause; each failed request is in
    /// exactly one.
    pub errors: ErrorCounts,
    /// Requests popped from the ring and not yet answered.
    pub in_flight: u64,
    /// Time from popping a request to publishing its answer.
    pub latency: Latency,
}

/// Completed requests by type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RequestCounts {
    /// Reads.
    pub read: u64,
    /// Writes.
    pub write: u64,
    /// Flushes.
    pub flush: u64,
    /// Discards.
    pub discard: u64,
    /// Write-zeroes.
    pub write_zeroes: u64,
    /// Serial number requests.
    pub get_id: u64,
    /// Unsupported types, and chains refused before their header could be read.
    pub other: u64,
}

impl RequestCounts {
    fn from_array([read, write, flush, discard, write_zeroes, get_id, other]: [u64; 7]) -> Self {
        RequestCounts {
            read,
            write,
            flush,
            discard,
            write_zeroes,
            get_id,
            other,
        }
    }

    /// Each op with its count, in [`Op::ALL`]'s order.
    pub fn by_op(&self) -> [(Op, u64); 7] {
        [
            (Op::Read, self.read),
            (Op::Write, self.write),
            (Op::Flush, self.flush),
            (Op::Discard, self.discard),
            (Op::WriteZeroes, self.write_zeroes),
            (Op::GetId, self.get_id),
            (Op::Other, self.other),
        ]
    }

    /// All requests.
    pub fn total(&self) -> u64 {
        self.by_op().iter().map(|(_, n)| n).sum()
    }
}

/// Failed requests by cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ErrorCounts {
    /// IOERR because the storage failed (or the request could not be started).
    pub io: u64,
    /// IOERR because the request was malformed (refused before any I/O; the device's
    /// log says why).
    pub invalid: u64,
    /// UNSUPP: a request type or flag the device does not support.
    pub unsupported: u64,
}

/// A latency histogram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Latency {
    /// Requests measured (the sum of the buckets' counts).
    pub count: u64,
    /// Their latencies added up, in nanoseconds.
    pub sum_ns: u64,
    /// Buckets in increasing order of bound. Not cumulative: each counts the requests
    /// slower than the previous bound and at most as slow as its own.
    pub buckets: Vec<Bucket>,
}

/// One latency bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Bucket {
    /// Upper bound in microseconds (inclusive); `null` for the last bucket, which has
    /// none.
    pub le_us: Option<u64>,
    /// Requests in this bucket.
    pub count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use corodev_devices::request::{Used, S_IOERR};

    fn served(kind: Option<RequestType>, bytes: u64, status: u8, rejected: bool) -> Served {
        Served {
            used: Used { head: 0, len: 1 },
            kind,
            bytes,
            status,
            rejected,
        }
    }

    #[test]
    fn buckets_are_inclusive_powers_of_two_from_8_us() {
        assert_eq!(BUCKET_BOUNDS_US[0], 8);
        assert_eq!(BUCKET_BOUNDS_US[17], 1_048_576);
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(8_000), 0, "a bound belongs to its own bucket");
        assert_eq!(bucket(8_001), 1);
        assert_eq!(bucket(16_000), 1);
        assert_eq!(bucket(16_001), 2);
        assert_eq!(bucket(1_048_576_000), 17);
        assert_eq!(bucket(1_048_576_001), 18, "past the last bound: unbounded");
        assert_eq!(bucket(u64::MAX), 18);
        for (i, &us) in BUCKET_BOUNDS_US.iter().enumerate() {
            assert_eq!(bucket(us * 1000), i, "{us} us");
            assert_eq!(bucket(us * 1000 + 1), i + 1, "just over {us} us");
        }
    }

    #[test]
    fn a_request_counts_once_by_type_bytes_status_and_latency() {
        let q = QueueStats::default();
        q.started(6);
        let read = Some(RequestType::In);
        q.completed(&served(read, 4096, S_OK, false), Duration::from_micros(5));
        q.completed(
            &served(Some(RequestType::Out), 512, S_OK, false),
            Duration::from_micros(100),
        );
        q.completed(&served(read, 0, S_IOERR, false), Duration::from_secs(2));
        q.completed(&served(read, 0, S_IOERR, true), Duration::ZERO);
        q.completed(
            &served(Some(RequestType::Unsupported(99)), 0, S_UNSUPP, true),
            Duration::ZERO,
        );
        let s = q.snapshot(3);
        assert_eq!(s.queue, 3);
        assert_eq!(
            s.requests.by_op().map(|(op, n)| (op.name(), n)),
            [
                ("read", 3),
                ("write", 1),
                ("flush", 0),
                ("discard", 0),
                ("write-zeroes", 0),
                ("get-id", 0),
                ("other", 1)
            ]
        );
        assert_eq!((s.bytes_read, s.bytes_written), (4096, 512));
        assert_eq!(
            s.errors,
            ErrorCounts {
                io: 1,
                invalid: 1,
                unsupported: 1
            }
        );
        assert_eq!(s.in_flight, 1, "6 popped, 5 answered");
        assert_eq!(s.latency.count, 5);
        assert_eq!(s.latency.count, s.requests.total());
        assert_eq!(s.latency.sum_ns, 2_000_105_000);
        let count = |le: Option<u64>| {
            s.latency
                .buckets
                .iter()
                .find(|b| b.le_us == le)
                .map(|b| b.count)
        };
        assert_eq!(count(Some(8)), Some(3), "5 us and the two at 0");
        assert_eq!(count(Some(128)), Some(1), "100 us");
        assert_eq!(count(None), Some(1), "2 s");
        assert_eq!(s.latency.buckets.len(), 19);
    }

    #[test]
    fn snapshot_json_has_kebab_case_keys() {
        let stats = ExportStats::new(2);
        stats
            .queue(1)
            .expect("queue 1")
            .completed(&served(None, 0, S_IOERR, true), Duration::ZERO);
        assert!(stats.queue(2).is_none());
        let json = serde_json::to_value(stats.snapshot("vm1")).expect("serializes");
        assert_eq!(json["export"], "vm1");
        let q1 = &json["queues"][1];
        assert_eq!(q1["queue"], 1);
        assert_eq!(q1["requests"]["other"], 1);
        assert_eq!(q1["requests"]["write-zeroes"], 0);
        assert_eq!(q1["errors"]["invalid"], 1);
        assert_eq!(q1["bytes-read"], 0);
        assert_eq!(q1["in-flight"], 0);
        assert_eq!(q1["latency"]["sum-ns"], 0);
        assert_eq!(q1["latency"]["buckets"][0]["le-us"], 8);
        assert_eq!(
            q1["latency"]["buckets"][18]["le-us"],
            serde_json::Value::Null
        );
        assert_eq!(json["queues"][0]["requests"]["other"], 0);
    }
}

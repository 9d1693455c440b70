//! The one error type of corodev-bench: everything that stops a run or makes it fail.
//!
//! I/O errors and verify mismatches during a run are results, counted in the report; only
//! after the report is printed does [`Error::DataErrors`] turn them into a failing exit
//! status. Every other variant ends the run before any numbers exist.

use std::time::Duration;

/// Why corodev-bench could not run, or why the run it made failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libblkio refused to create its driver (it is compiled in, so this means a libblkio bug).
    #[error("libblkio cannot create the virtio-blk-vhost-user driver: {0}")]
    Driver(#[source] blkio::Error),

    /// The socket is missing, nobody listens, or the server lacks a vhost-user feature
    /// libblkio requires (REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS).
    #[error("cannot connect to {socket}: {source}")]
    Connect {
        socket: String,
        #[source]
        source: blkio::Error,
    },

    /// Reading or setting a libblkio property failed (e.g. a queue size that is not a power
    /// of two).
    #[error("libblkio property {property}: {source}")]
    Property {
        property: &'static str,
        #[source]
        source: blkio::Error,
    },

    /// More client queues were asked for than the server offers.
    #[error("--queues {requested}, but the server offers only {offered}")]
    TooManyQueues { requested: u32, offered: i32 },

    /// libblkio would hold back requests in its own backlog, so the server would never see
    /// the requested depth; refusing is better than reporting a depth that did not happen.
    #[error(
        "--iodepth {iodepth} needs {needed} descriptors per queue (libblkio puts every request \
         in 3: header, data, status; it uses no indirect descriptors), but the queue size is \
         {queue_size}: pass --queue-size {suggested} (and let the server accept it)"
    )]
    QueueTooSmall {
        iodepth: u32,
        needed: u64,
        queue_size: u32,
        suggested: u64,
    },

    /// The block size is not a multiple of the device's logical block size.
    #[error("--bs {bs} is not a multiple of the device's block size {block_size}")]
    Misaligned { bs: u64, block_size: u64 },

    /// libblkio sends each buffer as one segment; a server that limits segment length
    /// (VIRTIO_BLK_F_SIZE_MAX) would fail every request.
    #[error("--bs {bs} exceeds the server's maximum segment length {max}")]
    SegmentTooLarge { bs: u64, max: u64 },

    /// `--size` asks for more than the device has.
    #[error("--size {size} exceeds the device capacity {capacity}")]
    SizeBeyondCapacity { size: u64, capacity: u64 },

    /// Each queue owns a slice of the region and needs a block per request in flight.
    #[error(
        "the region holds {blocks} blocks of {bs} bytes: each of the {queues} queue(s) needs at \
         least --iodepth {iodepth}; raise --size or lower --bs/--iodepth/--queues"
    )]
    TooFewBlocks {
        blocks: u64,
        bs: u64,
        queues: u32,
        iodepth: u32,
    },

    /// `--verify` keeps 5 bytes of state per block in memory.
    #[error("--verify would track {blocks} blocks, more than {max}: limit the region with --size")]
    VerifyTooLarge { blocks: u64, max: u64 },

    /// The buffer region size overflows.
    #[error("--queues {queues} x --iodepth {iodepth} x --bs {bs} bytes of buffers is too large")]
    BuffersTooLarge { queues: u32, iodepth: u32, bs: u64 },

    /// Setting up the virtqueues failed; typically the server rejected the queue size.
    #[error("cannot start the device (does the server accept this queue size?): {0}")]
    Start(#[source] blkio::Error),

    /// libblkio returned fewer queues than requested.
    #[error("asked libblkio for {requested} queues, got {got}")]
    QueueCount { requested: u32, got: usize },

    /// The shared-memory buffer region could not be created.
    #[error("cannot allocate {len} bytes of I/O buffers in shared memory: {source}")]
    AllocBuffers {
        len: usize,
        #[source]
        source: blkio::Error,
    },

    /// The server refused the buffer region (VHOST_USER_ADD_MEM_REG).
    #[error("cannot map the I/O buffers into the server: {0}")]
    MapBuffers(#[source] blkio::Error),

    /// Waiting for completions failed (the eventfd or the ring broke).
    #[error("queue {queue}: waiting for completions failed: {source}")]
    DoIo {
        queue: usize,
        #[source]
        source: blkio::Error,
    },

    /// Nothing completed for a long time: libblkio does not watch the socket, so a server
    /// that hangs or dies would otherwise leave the client waiting forever.
    #[error(
        "queue {queue}: no request completed for {} s with {in_flight} in flight (server hung or gone?)",
        timeout.as_secs()
    )]
    Stalled {
        queue: usize,
        in_flight: usize,
        timeout: Duration,
    },

    /// A completion carried a slot number this client never used: libblkio or the server
    /// corrupted the ring.
    #[error("queue {queue}: completion for unknown request slot {slot}")]
    UnknownCompletion { queue: usize, slot: usize },

    /// A client thread panicked (a bug in corodev-bench).
    #[error("client thread of queue {queue} panicked")]
    Panicked { queue: usize },

    /// The latency histogram could not be created (bad bounds: a bug).
    #[error("latency histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),

    /// Per-queue histograms could not be merged (different bounds: a bug).
    #[error("merging latency histograms: {0}")]
    HistogramMerge(#[from] hdrhistogram::AdditionError),

    /// The run completed, but requests failed or returned wrong data.
    #[error("{io_errors} I/O error(s), {mismatches} verify mismatch(es)")]
    DataErrors { io_errors: u64, mismatches: u64 },
}

//! The NVMe backend's workloads, run inside the NVMe test guest (`scripts/nvme-guest.sh`,
//! integration/tests/nvme.rs, scripts/bench-nvme.sh) against corodev serving the
//! namespace there; static (musl), since the guest has no libc. Where `verify-load` moves
//! one request at a time, these keep many in flight, build buffers a PRP list cannot
//! describe, and send FLUSH, DISCARD and WRITE_ZEROES; the host then checks the NVMe
//! backing file.
//!
//! Modes (each prints one line of `key=value` fields, or `detail=<why>` and exit status 1):
//! - `verify SOCK --seed S [--writes N] [--queues Q] [--depth D]`: the
//!   [`integration::workload`] writes of the seed, up to D in flight on each of Q
//!   virtqueues (never two overlapping ones), a FLUSH, then the whole device read back
//!   the same way and compared with the image the writes leave. Prints `max_inflight=`
//!   and `read_max_inflight=` (the most requests in flight on one queue while writing,
//!   and while reading) and `md5=` (of that image).
//! - `bounce SOCK --seed S`: the [`LAYOUTS`], data split in pieces a PRP list cannot
//!   point at; each written, read back through the same pieces and through one buffer.
//! - `trim SOCK --seed S`: a 1 MiB region written, FLUSH, DISCARD of two ranges, WRITE_ZEROES
//!   of two (one with `unmap`), FLUSH; read back: zeroes there, the data elsewhere.
//! - `bench SOCK --rw randread|randwrite --seconds T [--depth D] [--pid P]`: random 4 KiB
//!   requests at queue depth D for T seconds; `iops=`, and `cpu_us_per_io=` from the
//!   daemon's utime+stime (/proc/P/stat; P defaults to the process named corodev).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use integration::frontend::*;
use integration::workload::{Workload, MAX_WRITE};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;

/// virtio-blk feature bits the modes need offered (virtio 1.2, 5.2.3).
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

/// Descriptors per request slot of the concurrent modes: header, up to 3 data pieces,
/// status.
const DESCS: u16 = 5;
/// Most entries per virtqueue of the concurrent modes (room for 102 slots of [`DESCS`]);
/// each uses the smallest power of two its depth fits, so that `bench` at depth 32 (256)
/// needs no `--queue-size` beyond corodev's default.
const QUEUE_SIZE: u16 = 512;
/// Where the concurrent modes put request headers (16 bytes) and status bytes: 32 bytes
/// per slot, after the rings (64 KiB per queue).
const HDR_AREA: u64 = 1 << 20;
/// Where slot buffers start: [`MAX_WRITE`] bytes per slot.
const SLOT_DATA: u64 = 2 << 20;

fn usage() -> ! {
    eprintln!(
        "usage: nvme-load verify|bounce|trim|bench SOCKET [--seed S] [--writes N] \
         [--queues Q] [--depth D] [--rw randread|randwrite] [--seconds T] [--pid P]"
    );
    std::process::exit(2)
}

/// Options of every mode; each mode reads those it uses.
struct Opts {
    seed: u64,
    writes: usize,
    queues: usize,
    depth: u16,
    rw: String,
    seconds: u64,
    pid: Option<u32>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(mode), Some(socket)) = (args.next(), args.next()) else {
        usage()
    };
    let mut o = Opts {
        seed: 1,
        writes: 2000,
        queues: 2,
        depth: 96,
        rw: "randread".to_owned(),
        seconds: 10,
        pid: None,
    };
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        let mut num = || value().parse::<u64>().unwrap_or_else(|_| usage());
        match a.as_str() {
            "--seed" => o.seed = num(),
            "--writes" => o.writes = num() as usize,
            "--queues" => o.queues = num() as usize,
            "--depth" => o.depth = num().try_into().unwrap_or_else(|_| usage()),
            "--seconds" => o.seconds = num(),
            "--pid" => o.pid = Some(num().try_into().unwrap_or_else(|_| usage())),
            "--rw" => o.rw = value(),
            _ => usage(),
        }
    }
    if o.queues == 0 || o.writes == 0 || o.depth == 0 || o.depth > QUEUE_SIZE / DESCS {
        usage();
    }
    let socket = std::path::Path::new(&socket);
    match mode.as_str() {
        "verify" => verify(socket, &o),
        "bounce" => bounce(socket, o.seed),
        "trim" => trim(socket, o.seed),
        "bench" => bench(socket, &o),
        _ => usage(),
    }
}

/// The device's size in bytes, from the virtio-blk config space (capacity in sectors).
fn capacity(fe: &mut TestFrontend) -> u64 {
    let (_, cfg) = fe
        .fe
        .get_config(0, 8, VhostUserConfigFlags::empty(), &[0; 8])
        .unwrap_or_else(|e| exit_with_detail(&format!("GET_CONFIG: {e}")));
    u64::from_le_bytes(cfg[..8].try_into().expect("8 bytes asked for")) * 512
}

/// A request the concurrent modes put in a slot.
#[derive(Clone, Copy, Debug)]
struct Io {
    kind: u32,
    offset: u64,
    len: u64,
    /// Which write of the workload (for a write), for the failure message.
    index: usize,
}

/// Many requests in flight on several virtqueues: each queue's slot `s` owns descriptors
/// `DESCS * s ..`, a header and status byte in [`HDR_AREA`] and a buffer in
/// [`SLOT_DATA`].
struct Flights {
    fe: TestFrontend,
    depth: u16,
    free: Vec<Vec<u16>>,
    /// Per queue: head -> (slot, request).
    out: Vec<HashMap<u16, (u16, Io)>>,
    max_inflight: usize,
    done: u64,
}

impl Flights {
    fn connect(socket: &std::path::Path, queues: usize, depth: u16) -> Flights {
        let mem = SLOT_DATA as usize + queues * usize::from(depth) * MAX_WRITE as usize;
        let qsize = (depth * DESCS).next_power_of_two();
        let fe = TestFrontend::connect_mem(socket, queues, qsize, mem).unwrap_or_else(|e| {
            exit_with_detail(&format!("cannot connect to {}: {e}", socket.display()))
        });
        Flights {
            fe,
            depth,
            free: (0..queues).map(|_| (0..depth).rev().collect()).collect(),
            out: (0..queues).map(|_| HashMap::new()).collect(),
            max_inflight: 0,
            done: 0,
        }
    }

    fn slot_index(&self, q: usize, slot: u16) -> u64 {
        (q * usize::from(self.depth) + usize::from(slot)) as u64
    }

    fn buffer(&self, q: usize, slot: u16) -> u64 {
        SLOT_DATA + self.slot_index(q, slot) * MAX_WRITE
    }

    fn status_addr(&self, q: usize, slot: u16) -> u64 {
        HDR_AREA + 32 * self.slot_index(q, slot) + 16
    }

    fn in_flight(&self) -> impl Iterator<Item = &Io> {
        self.out.iter().flat_map(|m| m.values().map(|(_, io)| io))
    }

    /// Puts `io` in slot `slot` of queue `q` (a write's data already in
    /// [`buffer`](Self::buffer)), not yet published. Data of 12 KiB or more goes as three
    /// page-aligned pieces, so the backend builds PRP lists from several segments.
    fn stage(&mut self, q: usize, slot: u16, io: Io) -> u16 {
        let hdr = HDR_AREA + 32 * self.slot_index(q, slot);
        let buf = self.buffer(q, slot);
        self.fe.mem.write(hdr, &header(io.kind, 0, io.offset / 512));
        self.fe.mem.write(hdr + 16, &[0xff]);
        let pieces: Vec<(u64, u64)> = if io.len >= 12288 {
            let a = (io.len / 3) & !4095;
            vec![(buf, a), (buf + a, a), (buf + 2 * a, io.len - 2 * a)]
        } else {
            vec![(buf, io.len)]
        };
        let head = DESCS * slot;
        let flags = if io.kind == T_IN {
            VIRTQ_DESC_F_WRITE
        } else {
            0
        };
        let mut descs = vec![(head, Desc::new(hdr, 16, VIRTQ_DESC_F_NEXT, head + 1))];
        for (i, &(addr, len)) in pieces.iter().enumerate() {
            let at = head + 1 + i as u16;
            descs.push((
                at,
                Desc::new(addr, len as u32, flags | VIRTQ_DESC_F_NEXT, at + 1),
            ));
        }
        let last = head + 1 + pieces.len() as u16;
        descs.push((last, Desc::new(hdr + 16, 1, VIRTQ_DESC_F_WRITE, 0)));
        self.fe.put_descs(q, &descs);
        self.out[q].insert(head, (slot, io));
        self.max_inflight = self.max_inflight.max(self.out[q].len());
        head
    }

    /// Takes every completion posted (waiting up to 10 s for one if `block`), checks its
    /// status and hands each finished request with its buffer to `check`.
    fn reap(&mut self, block: bool, check: &mut impl FnMut(&TestFrontend, Io, u64)) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut any = false;
            for q in 0..self.out.len() {
                while let Some(used) = self.fe.wait_used(q, Duration::ZERO) {
                    let head = u16::try_from(used.id).unwrap_or(u16::MAX);
                    let Some((slot, io)) = self.out[q].remove(&head) else {
                        panic!("queue {q}: used element {used:?} for no request in flight");
                    };
                    let st = self.fe.mem.read(self.status_addr(q, slot), 1)[0];
                    if st != S_OK {
                        exit_with_detail(&format!("{io:?} on queue {q}: status {st}"));
                    }
                    check(&self.fe, io, self.buffer(q, slot));
                    self.free[q].push(slot);
                    self.done += 1;
                    any = true;
                }
            }
            if any || !block {
                return;
            }
            if Instant::now() > deadline {
                exit_with_detail(&format!(
                    "no completion in 10 s with {} requests in flight",
                    self.in_flight().count()
                ));
            }
            let mut fds: Vec<libc::pollfd> = self
                .fe
                .queues
                .iter()
                .map(|q| libc::pollfd {
                    fd: q.call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: polling valid pollfds of our own eventfds, `fds.len()` of them.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            for q in &self.fe.queues {
                let _ = q.call.read();
            }
        }
    }

    /// Runs `ios`, request `n` on queue `n % queues`, as many at once as slots allow. A
    /// request may pass earlier ones still waiting, but never one it overlaps, nor does it
    /// go out while a request it overlaps is in flight: overlapping requests run in list
    /// order, so the outcome does not depend on completion order. Each round's requests
    /// are published together, one kick per queue, so that the server finds them all at
    /// once rather than one per kick (what lets more than 64 be in flight on a queue).
    fn run(
        &mut self,
        ios: &[Io],
        mut fill: impl FnMut(&TestFrontend, Io, u64),
        mut check: impl FnMut(&TestFrontend, Io, u64),
    ) {
        /// How far past the first request not yet submitted to look for ones to submit.
        const WINDOW: usize = 1024;
        let queues = self.out.len();
        let mut submitted = vec![false; ios.len()];
        let mut start = 0;
        loop {
            let mut heads: Vec<Vec<u16>> = vec![Vec::new(); queues];
            let mut waiting: Vec<Io> = Vec::new();
            for n in start..ios.len().min(start + WINDOW) {
                if submitted[n] {
                    continue;
                }
                let io = ios[n];
                let q = n % queues;
                let clash = |o: &Io| io.offset < o.offset + o.len && o.offset < io.offset + io.len;
                if self.in_flight().any(clash) || waiting.iter().any(clash) {
                    waiting.push(io);
                    continue;
                }
                let Some(slot) = self.free[q].pop() else {
                    waiting.push(io);
                    continue;
                };
                fill(&self.fe, io, self.buffer(q, slot));
                heads[q].push(self.stage(q, slot, io));
                submitted[n] = true;
            }
            for (q, h) in heads.iter().enumerate() {
                if !h.is_empty() {
                    self.fe.publish_heads(q, h);
                }
            }
            while start < ios.len() && submitted[start] {
                start += 1;
            }
            if start == ios.len() && self.in_flight().next().is_none() {
                return;
            }
            self.reap(true, &mut check);
        }
    }
}

/// The fio-style verify workload (module docs).
fn verify(socket: &std::path::Path, o: &Opts) {
    let mut f = Flights::connect(socket, o.queues, o.depth);
    let capacity = capacity(&mut f.fe);
    let work = Workload::new(o.seed, capacity, o.writes);
    let started = Instant::now();
    let writes: Vec<Io> = work
        .writes
        .iter()
        .enumerate()
        .map(|(index, w)| Io {
            kind: T_OUT,
            offset: w.offset,
            len: w.len,
            index,
        })
        .collect();
    f.run(
        &writes,
        |fe, io, buf| fe.mem.write(buf, &work.writes[io.index].data()),
        |_, _, _| (),
    );
    let write_s = started.elapsed().as_secs_f64();
    let max_inflight = f.max_inflight;
    if f.fe.features & F_FLUSH == 0 {
        exit_with_detail("the server does not offer VIRTIO_BLK_F_FLUSH");
    }
    let st = f.fe.run(0, T_FLUSH, 0, &[]);
    if st != S_OK {
        exit_with_detail(&format!("flush: status {st}"));
    }
    // Every byte read back, in pieces of the writes' sizes, again many in flight.
    let image = work.image();
    let mut reads = Vec::new();
    let mut offset = 0;
    for w in work.writes.iter().cycle() {
        if offset >= capacity {
            break;
        }
        let len = w.len.min(capacity - offset);
        reads.push(Io {
            kind: T_IN,
            offset,
            len,
            index: reads.len(),
        });
        offset += len;
    }
    f.max_inflight = 0;
    f.run(
        &reads,
        |fe, io, buf| fe.mem.write(buf, &vec![0xa5; io.len as usize]),
        |fe, io, buf| {
            let got = fe.mem.read(buf, io.len as usize);
            let want = &image[io.offset as usize..(io.offset + io.len) as usize];
            if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
                let at = io.offset + i as u64;
                let writer = work.last_writer(at).map(|(n, w)| format!("{n} {w:?}"));
                exit_with_detail(&format!(
                    "byte {at} read back {:#04x}, want {:#04x} (last written by write {})",
                    got[i],
                    want[i],
                    writer.as_deref().unwrap_or("none: zero")
                ));
            }
        },
    );
    println!(
        "capacity={capacity} seed={} writes={} queues={} depth={} max_inflight={max_inflight} \
         read_max_inflight={} requests={} write_s={write_s:.1} md5={:x}",
        o.seed,
        work.writes.len(),
        o.queues,
        o.depth,
        f.max_inflight,
        f.done,
        md5::compute(&image)
    );
}

/// Pieces of guest memory (address, length) a request's data is split into, laid out
/// from `base`: what each layout of [`LAYOUTS`] describes.
type Pieces = Vec<(u64, u32)>;

/// Data layouts a PRP list cannot describe, so the backend must bounce them, and why each:
/// - `sectors`: eight 512-byte pieces at offset 0x200 of every other page (4 KiB): the
///   first piece does not end on a page, the others do not start on one;
/// - `odd-address`: a first piece at a byte address not dword-aligned (PRP entries must
///   be), 8 KiB in all;
/// - `middle-off-page`: 256 KiB whose middle piece ends mid-page: four bounce chunks of
///   64 KiB, their boundaries inside pieces;
/// - `ragged-1m`: 1 MiB in nine pieces of sizes that are multiples of 512 but not of 4096:
///   sixteen bounce chunks and more than the controller's MDTS.
const LAYOUTS: [&str; 4] = ["sectors", "odd-address", "middle-off-page", "ragged-1m"];

fn layout(name: &str, base: u64) -> Pieces {
    let page = |n: u64| base + n * 4096;
    let mut p: Pieces = match name {
        "sectors" => (0..8).map(|i| (page(2 * i) + 0x200, 512)).collect(),
        "odd-address" => vec![(page(0) + 1, 4095), (page(2), 4097)],
        "middle-off-page" => vec![
            (page(0) + 0x800, 0x800),
            (page(2), 0x10200),
            (page(40), 0x40000 - 0x800 - 0x10200),
        ],
        "ragged-1m" => {
            let sizes = [
                0x1200u32, 0x2e00, 0x20600, 0x400, 0x3fa00, 0x21000, 0x600, 0x5a00,
            ];
            let mut at = page(0) + 0x600;
            let mut v = Vec::new();
            for s in sizes {
                v.push((at, s));
                at = (at + u64::from(s) + 4096 + 0x200) & !0x1ff;
            }
            let used: u32 = sizes.iter().sum();
            v.push((at, (1 << 20) - used));
            v
        }
        _ => unreachable!("LAYOUTS names only these"),
    };
    p.retain(|&(_, len)| len > 0);
    p
}

/// Writes `data` into the pieces, in order.
fn scatter(fe: &TestFrontend, pieces: &Pieces, data: &[u8]) {
    let mut at = 0;
    for &(addr, len) in pieces {
        fe.mem.write(addr, &data[at..at + len as usize]);
        at += len as usize;
    }
}

/// The pieces' bytes, in order.
fn gather(fe: &TestFrontend, pieces: &Pieces) -> Vec<u8> {
    pieces
        .iter()
        .flat_map(|&(addr, len)| fe.mem.read(addr, len as usize))
        .collect()
}

/// The bounce-path mode (module docs): layout `i` goes to byte `i * 2 MiB` with
/// `pattern(seed + i)`.
fn bounce(socket: &std::path::Path, seed: u64) {
    let mut fe = TestFrontend::connect(socket, 1, 256)
        .unwrap_or_else(|e| exit_with_detail(&format!("cannot connect: {e}")));
    let mut lens = Vec::new();
    for (i, name) in LAYOUTS.iter().enumerate() {
        let pieces = layout(name, DATA_BASE);
        let len: u32 = pieces.iter().map(|p| p.1).sum();
        assert_eq!(len % 512, 0, "test bug: layout {name} is not whole sectors");
        let offset = i as u64 * (2 << 20);
        let data = pattern(seed.wrapping_add(i as u64), len as usize);
        scatter(&fe, &pieces, &data);
        let st = fe.run(0, T_OUT, offset / 512, &pieces);
        if st != S_OK {
            exit_with_detail(&format!("write of layout {name}: status {st}"));
        }
        scatter(&fe, &pieces, &vec![0x5a; len as usize]);
        let st = fe.run(0, T_IN, offset / 512, &pieces);
        if st != S_OK {
            exit_with_detail(&format!("bounced read of layout {name}: status {st}"));
        }
        if let Some(at) = first_difference(&gather(&fe, &pieces), &data) {
            exit_with_detail(&format!(
                "layout {name}: byte {at} read back through the same pieces differs"
            ));
        }
        let one = DATA_BASE + (6 << 20);
        fe.mem.write(one, &vec![0x5a; len as usize]);
        let st = fe.run(0, T_IN, offset / 512, &[(one, len)]);
        if st != S_OK {
            exit_with_detail(&format!("direct read of layout {name}: status {st}"));
        }
        if let Some(at) = first_difference(&fe.mem.read(one, len as usize), &data) {
            exit_with_detail(&format!(
                "layout {name}: byte {at} read back into one buffer differs"
            ));
        }
        lens.push(len.to_string());
    }
    println!(
        "seed={seed} layouts={} lens={}",
        LAYOUTS.join(","),
        lens.join(",")
    );
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Where the trim mode works: a 1 MiB region at 8 MiB, and the ranges in it (offset from
/// the region, length) it discards and zeroes; `unmap` set on the second write zeroes.
const TRIM_REGION: u64 = 8 << 20;
const DISCARDS: [(u64, u64); 2] = [(128 << 10, 128 << 10), (384 << 10, 64 << 10)];
const ZEROES: [(u64, u64, u32); 2] = [(640 << 10, 128 << 10, 0), (896 << 10, 32 << 10, 1)];

/// The flush / discard / write-zeroes mode (module docs). DISCARD sends both ranges in one
/// request (two segments); each WRITE_ZEROES is its own request.
fn trim(socket: &std::path::Path, seed: u64) {
    let mut fe = TestFrontend::connect(socket, 1, 256)
        .unwrap_or_else(|e| exit_with_detail(&format!("cannot connect: {e}")));
    for (bit, name) in [
        (F_FLUSH, "FLUSH"),
        (F_DISCARD, "DISCARD"),
        (F_WRITE_ZEROES, "WRITE_ZEROES"),
    ] {
        if fe.features & bit == 0 {
            exit_with_detail(&format!("the server does not offer VIRTIO_BLK_F_{name}"));
        }
    }
    let len = 1u64 << 20;
    let mut want = pattern(seed, len as usize);
    fe.mem.write(DATA_BASE, &want);
    let st = fe.run(0, T_OUT, TRIM_REGION / 512, &[(DATA_BASE, len as u32)]);
    if st != S_OK {
        exit_with_detail(&format!("write: status {st}"));
    }
    let mut flushes = 0;
    let mut flush = |fe: &mut TestFrontend| {
        let st = fe.run(0, T_FLUSH, 0, &[]);
        if st != S_OK {
            exit_with_detail(&format!("flush: status {st}"));
        }
        flushes += 1;
    };
    flush(&mut fe);
    let segs: Vec<[u8; 16]> = DISCARDS
        .iter()
        .map(|&(off, n)| segment((TRIM_REGION + off) / 512, (n / 512) as u32, 0))
        .collect();
    let table = DATA_BASE + (2 << 20);
    fe.mem.write(table, &segments(&segs));
    let st = fe.run(0, T_DISCARD, 0, &[(table, 16 * segs.len() as u32)]);
    if st != S_OK {
        exit_with_detail(&format!("discard: status {st}"));
    }
    for &(off, n, flags) in &ZEROES {
        fe.mem.write(
            table,
            &segment((TRIM_REGION + off) / 512, (n / 512) as u32, flags),
        );
        let st = fe.run(0, T_WRITE_ZEROES, 0, &[(table, 16)]);
        if st != S_OK {
            exit_with_detail(&format!("write zeroes at {off}: status {st}"));
        }
    }
    flush(&mut fe);
    for (off, n) in DISCARDS.iter().copied().chain(ZEROES.map(|z| (z.0, z.1))) {
        want[off as usize..(off + n) as usize].fill(0);
    }
    fe.mem.write(DATA_BASE, &vec![0x5a; len as usize]);
    let st = fe.run(0, T_IN, TRIM_REGION / 512, &[(DATA_BASE, len as u32)]);
    if st != S_OK {
        exit_with_detail(&format!("read back: status {st}"));
    }
    if let Some(at) = first_difference(&fe.mem.read(DATA_BASE, len as usize), &want) {
        exit_with_detail(&format!("byte {at} of the region read back differs"));
    }
    let ranges = |v: &mut dyn Iterator<Item = (u64, u64)>| {
        v.map(|(o, n)| format!("{}+{n}", TRIM_REGION + o))
            .collect::<Vec<_>>()
            .join(",")
    };
    println!(
        "seed={seed} region={TRIM_REGION} len={len} flushes={flushes} discards={} zeroes={}",
        ranges(&mut DISCARDS.iter().copied()),
        ranges(&mut ZEROES.iter().map(|z| (z.0, z.1)))
    );
}

/// utime + stime of process `pid`, in clock ticks (fields 14 and 15 of /proc/PID/stat,
/// counted after the parenthesised command name, which may hold blanks).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| exit_with_detail(&format!("/proc/{pid}/stat: {e}")));
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() != 2 {
        exit_with_detail(&format!("/proc/{pid}/stat: no utime and stime in {stat:?}"));
    }
    f[0] + f[1]
}

/// The process whose command name is `corodev`.
fn find_daemon() -> u32 {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "corodev")
        })
        .unwrap_or_else(|| exit_with_detail("no corodev process"))
}

/// The benchmark mode (module docs): one queue, `depth` 4 KiB requests always in flight at
/// random aligned offsets (the next submitted as each completes).
fn bench(socket: &std::path::Path, o: &Opts) {
    let kind = match o.rw.as_str() {
        "randread" => T_IN,
        "randwrite" => T_OUT,
        _ => usage(),
    };
    let pid = o.pid.unwrap_or_else(find_daemon);
    let mut f = Flights::connect(socket, 1, o.depth);
    let blocks = capacity(&mut f.fe) / 4096;
    let mut x = o.seed | 1;
    let mut next_io = |index| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Io {
            kind,
            offset: (x % blocks) * 4096,
            len: 4096,
            index,
        }
    };
    for slot in 0..o.depth {
        let buf = f.buffer(0, slot);
        f.fe.mem
            .write(buf, &pattern(o.seed.wrapping_add(u64::from(slot)), 4096));
    }
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu0 = cpu_ticks(pid);
    let started = Instant::now();
    let until = started + Duration::from_secs(o.seconds);
    let mut n = 0;
    while Instant::now() < until {
        let mut heads = Vec::new();
        while let Some(slot) = f.free[0].pop() {
            heads.push(f.stage(0, slot, next_io(n)));
            n += 1;
        }
        if !heads.is_empty() {
            f.fe.publish_heads(0, &heads);
        }
        f.reap(true, &mut |_, _, _| ());
    }
    while f.in_flight().next().is_some() {
        f.reap(true, &mut |_, _, _| ());
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - cpu0) as f64 / hz;
    println!(
        "rw={} depth={} seconds={secs:.1} ios={} iops={:.0} daemon_cpu_s={cpu:.2} \
         cpu_us_per_io={:.1}",
        o.rw,
        o.depth,
        f.done,
        f.done as f64 / secs,
        cpu * 1e6 / f.done as f64
    );
}

//! Verifying load for a vhost-user-blk server, through the test frontend: writes `--count`
//! chunks of `--chunk` bytes of pseudo-random data (chunk i is [`pattern`]`(seed + i)`) at
//! offsets spread evenly across the whole device, the first at 0 and the last ending at its
//! capacity; then a flush; then reads every chunk back and compares. Built static (musl) it
//! runs inside the NVMe test guest (`scripts/nvme-guest.sh`, integration/tests/nvme.rs)
//! against corodev running there, and after the guest powers off the host checks that the
//! NVMe backing file holds the same bytes.
//!
//! Prints one line of fields: `capacity=<bytes> chunk=<bytes> writes=<n> seed=<s>
//! offsets=<o0,o1,..> md5=<md5 of the chunks in order>`, or `detail=<why>` and exit
//! status 1 (a request failed or a chunk read back differs). A protocol error of the server
//! (a bad used element) panics, as in every test frontend.
//!
//! Usage: `verify-load SOCKET [--chunk BYTES] [--count N] [--seed S]` (defaults 64 KiB, 16,
//! a seed from /dev/urandom).

use std::io::Read;

use integration::frontend::*;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;

/// Where chunks are written from and read into: [`DATA_BASE`] and 4 MiB above it, both
/// below [`REQ_AREA`], so a chunk is at most 4 MiB.
const WRITE_BUF: u64 = DATA_BASE;
const READ_BUF: u64 = DATA_BASE + (4 << 20);
const MAX_CHUNK: u64 = 4 << 20;

fn usage() -> ! {
    eprintln!("usage: verify-load SOCKET [--chunk BYTES] [--count N] [--seed S]");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(socket) = args.next() else { usage() };
    let (mut chunk, mut count, mut seed) = (64u64 << 10, 16u64, None);
    while let Some(a) = args.next() {
        let mut value = || -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage())
        };
        match a.as_str() {
            "--chunk" => chunk = value(),
            "--count" => count = value(),
            "--seed" => seed = Some(value()),
            _ => usage(),
        }
    }
    if chunk == 0 || chunk % 4096 != 0 || chunk > MAX_CHUNK || count < 2 {
        usage();
    }
    let seed = seed.unwrap_or_else(|| {
        let mut b = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .unwrap_or_else(|e| exit_with_detail(&format!("/dev/urandom: {e}")));
        u64::from_le_bytes(b)
    });

    let mut fe = TestFrontend::connect(socket.as_ref(), 1, 256)
        .unwrap_or_else(|e| exit_with_detail(&format!("cannot connect to {socket}: {e}")));
    // virtio-blk config space: capacity, in 512-byte sectors, at offset 0.
    let (_, cfg) = fe
        .fe
        .get_config(0, 8, VhostUserConfigFlags::empty(), &[0; 8])
        .unwrap_or_else(|e| exit_with_detail(&format!("GET_CONFIG: {e}")));
    let capacity = u64::from_le_bytes(cfg[..8].try_into().expect("8 bytes asked for")) * 512;
    if capacity < chunk * count {
        exit_with_detail(&format!(
            "capacity {capacity} is less than {count} chunks of {chunk}"
        ));
    }
    // Evenly spread, 4 KiB aligned, the first at 0 and the last ending at the capacity:
    // the device's first and last blocks are both written.
    let span = capacity - chunk;
    let offsets: Vec<u64> = (0..count)
        .map(|i| (span * i / (count - 1)) & !4095)
        .collect();

    let data = |i: u64| pattern(seed.wrapping_add(i), chunk as usize);
    for (i, &off) in offsets.iter().enumerate() {
        fe.mem.write(WRITE_BUF, &data(i as u64));
        let st = fe.run(0, T_OUT, off / 512, &[(WRITE_BUF, chunk as u32)]);
        if st != S_OK {
            exit_with_detail(&format!("write of chunk {i} at {off}: status {st}"));
        }
    }
    let st = fe.run(0, T_FLUSH, 0, &[]);
    if st != S_OK {
        exit_with_detail(&format!("flush: status {st}"));
    }
    let mut md5 = md5::Context::new();
    for (i, &off) in offsets.iter().enumerate() {
        fe.mem.write(READ_BUF, &vec![0u8; chunk as usize]);
        let st = fe.run(0, T_IN, off / 512, &[(READ_BUF, chunk as u32)]);
        if st != S_OK {
            exit_with_detail(&format!("read of chunk {i} at {off}: status {st}"));
        }
        let want = data(i as u64);
        if fe.mem.read(READ_BUF, chunk as usize) != want {
            exit_with_detail(&format!("chunk {i} at {off} read back differs"));
        }
        md5.consume(&want);
    }
    let list: Vec<String> = offsets.iter().map(u64::to_string).collect();
    println!(
        "capacity={capacity} chunk={chunk} writes={count} seed={seed} offsets={} md5={:x}",
        list.join(","),
        md5.finalize()
    );
}

//! A frontend that adds a memory region and publishes requests in it right away must have
//! them served: libblkio maps its I/O buffers (one ADD_MEM_REG, answered) just after
//! starting the rings, then submits its first batch at once. corodev popped that batch
//! with the memory map it had read before the pop, from before the new region, and
//! refused every request of the batch as "outside guest memory" (I/O errors in the
//! client). Two daemons with two clients starting at once on a 2-vCPU machine hit it in
//! about 1 start in 20.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration::server::corodev_bin;

/// Starts, each against a fresh null-backend daemon.
const ROUNDS: usize = 40;
/// Daemons (and clients) at once: the contention that widens the window.
const PAIRS: usize = 2;

fn daemon(socket: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("daemon log");
    Command::new(corodev_bin())
        .args(["--socket", socket.to_str().expect("utf-8 path")])
        .args(["--backend", "null", "--size", "1G", "--num-queues", "1"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start corodev")
}

fn wait_for(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_first_batch_after_a_memory_region_is_added_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    for round in 0..ROUNDS {
        let mut daemons = Vec::new();
        let mut sockets = Vec::new();
        for i in 0..PAIRS {
            let socket = dir.path().join(format!("{round}.{i}.sock"));
            daemons.push(daemon(&socket, &dir.path().join(format!("{i}.log"))));
            sockets.push(socket);
        }
        let clients: Vec<Child> = sockets
            .iter()
            .map(|socket| {
                wait_for(socket);
                Command::new(env!("CARGO_BIN_EXE_corodev-bench"))
                    .args(["--socket", socket.to_str().expect("utf-8 path")])
                    .args([
                        "--rw",
                        "randread",
                        "--bs",
                        "4K",
                        "--iodepth",
                        "32",
                        "--runtime",
                        "0.3",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start corodev-bench")
            })
            .collect();
        let outputs: Vec<_> = clients
            .into_iter()
            .map(|c| c.wait_with_output().expect("corodev-bench"))
            .collect();
        for d in &mut daemons {
            d.kill().expect("kill corodev");
            d.wait().expect("reap corodev");
        }
        for (i, out) in outputs.iter().enumerate() {
            let log =
                std::fs::read_to_string(dir.path().join(format!("{i}.log"))).unwrap_or_default();
            assert!(
                out.status.success(),
                "round {round}, client {i}: {}\ndaemon log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                log.lines().take(5).collect::<Vec<_>>().join("\n")
            );
            assert!(
                !log.contains("outside guest memory"),
                "round {round}, daemon {i} refused buffers:\n{log}"
            );
        }
    }
}

//! Fuzzes the vhost-user message stream: one corodev server runs in this process (null
//! backend, its real connection loop); each input is written to a fresh connection as
//! raw protocol bytes, then the connection is half-closed. Whatever the bytes say, the
//! server must close or answer and then accept the next connection: a crash, a hang (the
//! next connect times out) or an abort is a finding.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use corodev::connection::WorkerConfig;
use corodev::server::{serve, ServerConfig, Stop};
use corodev_devices::backend::NullBackend;
use corodev_devices::config::{DeviceConfig, DeviceParams};
use libfuzzer_sys::fuzz_target;

fn server() -> &'static PathBuf {
    static SOCKET: OnceLock<PathBuf> = OnceLock::new();
    SOCKET.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let socket = dir.join("fuzz.sock");
        let disk = Arc::new(NullBackend::new(64 << 20, Duration::ZERO));
        let device = DeviceConfig::build(DeviceParams {
            num_queues: 2,
            queue_size: 64,
            serial: b"fuzz".to_vec(),
            ..DeviceParams::for_backend(&*disk)
        })
        .expect("valid device");
        let cfg = ServerConfig {
            socket: socket.clone(),
            disk,
            device,
            workers: WorkerConfig {
                threads: 1,
                coroutine_backend: coro::Backend::Fast,
                stack_size: coro::DEFAULT_STACK_SIZE,
                poll: Duration::ZERO,
            },
            once: false,
        };
        std::thread::spawn(move || serve(&cfg, &Stop::default()).expect("server"));
        while !socket.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        socket
    })
}

fuzz_target!(|data: &[u8]| {
    let socket = server();
    let mut s = UnixStream::connect(socket).expect("server must accept (it died or hung)");
    s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let _ = s.write_all(data);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut buf = [0u8; 4096];
    for _ in 0..64 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
});

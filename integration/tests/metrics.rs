//! `--metrics`: a real guest's I/O as Prometheus scrapes it (bytes, requests by type,
//! the latency histogram's count, nothing left in flight), counters that go on over a
//! second guest's connection, failed requests counted by cause (hand-built requests through
//! a protocol-level frontend), `[daemon] metrics` in a config file covering every export's
//! queues, and the two ways the flag is refused (a value that is no address, an address in
//! use), each with one line naming `--metrics`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use integration::frontend::{TestFrontend, DATA_BASE, S_IOERR, S_OK, S_UNSUPP, T_IN, T_OUT};
use integration::{corodev_bin, Daemon, Image, TEST_IMAGE_SIZE};

const MIB: f64 = (1 << 20) as f64;

/// The `pattern` guest writes 4 MiB with `oflag=direct`, then reads them back with
/// `iflag=direct`.
const PATTERN_BYTES: f64 = 4.0 * MIB;

/// `GET /metrics` from `addr`: asserts a 200 in the text format and returns the samples,
/// by `name{labels}` as written.
fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let mut stream = TcpStream::connect(addr).expect("connect to --metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response to the close");
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').expect("a sample is name and value");
            (key.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

/// One sample of export `vm1`'s queue 0: `metric` with `extra` labels after the export's.
fn sample(s: &BTreeMap<String, f64>, metric: &str, extra: &str) -> f64 {
    let key = format!("{metric}{{export=\"vm1\",queue=\"0\"{extra}}}");
    *s.get(&key)
        .unwrap_or_else(|| panic!("{key} is not in the scrape: {s:#?}"))
}

/// Requests answered, every type added up.
fn requests(s: &BTreeMap<String, f64>) -> f64 {
    [
        "read",
        "write",
        "flush",
        "discard",
        "write-zeroes",
        "get-id",
        "other",
    ]
    .iter()
    .map(|op| sample(s, "corodev_requests_total", &format!(",op=\"{op}\"")))
    .sum()
}

/// Where `daemon` serves its metrics: the address it logs.
fn metrics_addr(daemon: &Daemon) -> SocketAddr {
    let line = daemon
        .wait_log_line("metrics: serving http://", Duration::from_secs(10))
        .expect("the metrics address is logged");
    let url = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .expect("http://ADDR/metrics");
    url.parse().expect("an address")
}

#[test]
fn a_guests_io_is_counted_and_scraped_and_counting_goes_on_over_reconnects() {
    let image = Image::new(64 << 20);
    // A bare port: 127.0.0.1, and 0 lets the kernel choose a free one (from the log).
    let mut daemon = Daemon::corodev(&image, &["--name", "vm1", "--metrics", "0"]);
    let addr = metrics_addr(&daemon);
    assert!(addr.ip().is_loopback(), "a bare port listens on 127.0.0.1");

    let idle = scrape(addr);
    assert_eq!(requests(&idle), 0.0, "no guest yet");
    assert_eq!(sample(&idle, "corodev_in_flight", ""), 0.0);

    daemon.assert_pattern_lands(&image);
    let first = scrape(addr);
    let written = sample(&first, "corodev_bytes_total", ",direction=\"write\"");
    let read = sample(&first, "corodev_bytes_total", ",direction=\"read\"");
    assert!(written >= PATTERN_BYTES, "bytes written {written}");
    assert!(
        read >= PATTERN_BYTES,
        "bytes read {read} (the read-back and the boot's)"
    );
    assert!(sample(&first, "corodev_requests_total", ",op=\"write\"") > 0.0);
    assert!(sample(&first, "corodev_requests_total", ",op=\"read\"") > 0.0);
    assert_eq!(
        sample(&first, "corodev_request_duration_seconds_count", ""),
        requests(&first),
        "every answered request is in the histogram once"
    );
    assert_eq!(
        sample(
            &first,
            "corodev_request_duration_seconds_bucket",
            ",le=\"+Inf\""
        ),
        requests(&first),
        "the +Inf bucket is cumulative: all of them"
    );
    assert_eq!(
        sample(&first, "corodev_in_flight", ""),
        0.0,
        "nothing in flight once the guest is off"
    );
    for cause in ["io", "invalid", "unsupported"] {
        assert_eq!(
            sample(
                &first,
                "corodev_errors_total",
                &format!(",cause=\"{cause}\"")
            ),
            0.0,
            "{cause} errors from a well-behaved guest"
        );
    }

    // The next guest is a new connection to the same export: its I/O adds to the counts.
    daemon.assert_pattern_lands(&image);
    let second = scrape(addr);
    let written_again = sample(&second, "corodev_bytes_total", ",direction=\"write\"");
    assert!(
        written_again >= written + PATTERN_BYTES,
        "{written_again} after {written}: the export's counters outlive a connection"
    );
    assert_eq!(
        sample(&second, "corodev_request_duration_seconds_count", ""),
        requests(&second)
    );
    assert_eq!(sample(&second, "corodev_in_flight", ""), 0.0);
    daemon.sigterm();
    assert!(daemon
        .wait_exit(Duration::from_secs(30))
        .expect("exits on SIGTERM")
        .success());
}

#[test]
fn failed_requests_are_counted_by_cause() {
    let image = Image::new(TEST_IMAGE_SIZE);
    let mut daemon = Daemon::corodev(
        &image,
        &["--queue-size", "128", "--name", "vm1", "--metrics", "0"],
    );
    let addr = metrics_addr(&daemon);
    let mut fe = TestFrontend::connect(daemon.socket(), 1, 128).expect("connect");
    let block = [(DATA_BASE, 4096)];
    assert_eq!(fe.run(0, T_IN, 0, &block), S_OK);
    assert_eq!(fe.run(0, T_OUT, 8, &block), S_OK);
    assert_eq!(fe.run(0, 99, 0, &[]), S_UNSUPP, "an unknown type");
    assert_eq!(
        fe.run(0, T_IN, 1 << 40, &[(DATA_BASE, 512)]),
        S_IOERR,
        "a read past the end"
    );
    daemon.assert_alive();
    let s = scrape(addr);
    let op = |op: &str| sample(&s, "corodev_requests_total", &format!(",op=\"{op}\""));
    assert_eq!((op("read"), op("write"), op("other")), (2.0, 1.0, 1.0));
    let cause = |c: &str| sample(&s, "corodev_errors_total", &format!(",cause=\"{c}\""));
    assert_eq!(
        (cause("io"), cause("invalid"), cause("unsupported")),
        (0.0, 1.0, 1.0),
        "the read past the end was refused as invalid, the unknown type as unsupported"
    );
    assert_eq!(
        (
            sample(&s, "corodev_bytes_total", ",direction=\"read\""),
            sample(&s, "corodev_bytes_total", ",direction=\"write\"")
        ),
        (4096.0, 4096.0),
        "only the successful requests' data"
    );
    assert_eq!(
        sample(&s, "corodev_request_duration_seconds_count", ""),
        4.0
    );
    assert_eq!(sample(&s, "corodev_in_flight", ""), 0.0);
}

/// Config-file mode: `[daemon] metrics` serves every export, each queue of each labelled.
#[test]
fn a_config_files_daemon_table_serves_every_exports_queues() {
    let dir = tempfile::Builder::new()
        .prefix("corodev-metrics-")
        .tempdir()
        .expect("tempdir");
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let config = dir.path().join("exports.toml");
    let export = |name: &str, socket: &std::path::Path, queues: u32| {
        format!(
            "[[exports]]\nname = \"{name}\"\nsocket = \"{}\"\nbackend = \"null\"\nsize = \"1M\"\nnum-queues = {queues}\n",
            socket.display()
        )
    };
    std::fs::write(
        &config,
        format!(
            "[daemon]\nmetrics = 0\n\n{}{}",
            export("vm-a", &sa, 1),
            export("vm-b", &sb, 2)
        ),
    )
    .expect("write the config");
    let mut daemon = Daemon::with_config(&config, &[&sa, &sb], &[]);
    let s = scrape(metrics_addr(&daemon));
    let series: Vec<&str> = s
        .keys()
        .filter_map(|k| k.strip_prefix("corodev_in_flight"))
        .collect();
    assert_eq!(
        series,
        [
            r#"{export="vm-a",queue="0"}"#,
            r#"{export="vm-b",queue="0"}"#,
            r#"{export="vm-b",queue="1"}"#
        ],
        "one series per queue of each export"
    );
    daemon.sigterm();
    assert!(daemon
        .wait_exit(Duration::from_secs(30))
        .expect("exits on SIGTERM")
        .success());
}

/// Runs corodev on `image` with `--metrics value`; returns its exit code and stderr.
fn refused(image: &Image, value: &str) -> (Option<i32>, String) {
    let dir = tempfile::Builder::new()
        .prefix("corodev-metrics-")
        .tempdir()
        .expect("tempdir");
    let socket = dir.path().join("vm.sock");
    let out = Command::new(corodev_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("--disk")
        .arg(&image.path)
        .args(["--metrics", value])
        .env("RUST_LOG", "off")
        .output()
        .expect("run corodev");
    assert!(!socket.exists(), "a refused start leaves no socket");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_value_that_is_no_address_is_a_usage_error() {
    let image = Image::new(1 << 20);
    let (code, stderr) = refused(&image, "localhost:9400");
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr.lines().next(),
        Some(
            "error: invalid value 'localhost:9400' for '--metrics <ADDR>': expected a port \
             (e.g. 9400, on 127.0.0.1) or IP:PORT (e.g. 0.0.0.0:9400, [::1]:9400)"
        )
    );
}

#[test]
fn an_address_in_use_stops_the_start_with_one_line() {
    let image = Image::new(1 << 20);
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address");
    let (code, stderr) = refused(&image, &addr.port().to_string());
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "corodev: error: --metrics {addr}: cannot listen: Address already in use (os error 98); \
             choose another port or address (a bare port means 127.0.0.1:PORT)\n"
        )
    );
}

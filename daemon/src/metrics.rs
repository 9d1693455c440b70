//! `--metrics ADDR`: the exports' request statistics ([`crate::stats`]) in Prometheus's
//! text exposition format (version 0.0.4) at `GET /metrics`.
//!
//! The counters are read and encoded when a scrape arrives (a [`Collector`] over the
//! snapshots), so the data path knows nothing of Prometheus. Encoding is the Prometheus
//! project's own crate (`prometheus-client`). Metrics, each labelled `export` and
//! `queue`:
//!
//! | name | type | more labels |
//! |---|---|---|
//! | `corodev_requests_total` | counter | `op`: read, write, flush, discard, write-zeroes, get-id, other |
//! | `corodev_bytes_total` | counter | `direction`: read, write |
//! | `corodev_errors_total` | counter | `cause`: io, invalid, unsupported |
//! | `corodev_in_flight` | gauge | |
//! | `corodev_request_duration_seconds` | histogram | `le` |
//!
//! The server runs on a current-thread tokio runtime on its own thread (the control
//! plane runs on tokio; the data path never does). It answers one request per connection
//! and closes it: a hand-written HTTP/1.1 responder of a few lines, because one
//! read-only endpoint needs no HTTP crate. The address is bound before the thread starts,
//! so a bad or busy one stops the daemon at startup with one line.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::Error;
use crate::stats::{ExportStatsSnapshot, QueueStatsSnapshot};

/// The content type of the plain-text answers other than the metrics.
const PLAIN: &str = "text/plain; charset=utf-8";

/// The longest request head read; a longer one is answered 431.
const MAX_HEAD: usize = 8192;

/// How long a client may take to send its request head: a connection that sends nothing
/// must not be kept for ever.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses `--metrics`: `HOST:PORT` (`[::1]:9400` for IPv6), or a bare port, which means
/// 127.0.0.1:PORT (metrics are not published beyond the host unless asked for).
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse().map_err(|_| {
        "expected a port (e.g. 9400, on 127.0.0.1) or IP:PORT (e.g. 0.0.0.0:9400, [::1]:9400)"
            .to_owned()
    })
}

/// Reads a config file's `[daemon] metrics` as [`parse_addr`] reads the flag: a port
/// (`metrics = 9400`, or as a string) or `"IP:PORT"`.
pub fn deserialize_addr<'de, D>(d: D) -> Result<Option<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Addr;
    impl serde::de::Visitor<'_> for Addr {
        type Value = SocketAddr;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a port (e.g. 9400, on 127.0.0.1) or \"IP:PORT\"")
        }
        fn visit_u64<E: serde::de::Error>(self, port: u64) -> Result<SocketAddr, E> {
            parse_addr(&port.to_string()).map_err(E::custom)
        }
        fn visit_i64<E: serde::de::Error>(self, port: i64) -> Result<SocketAddr, E> {
            parse_addr(&port.to_string()).map_err(E::custom)
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<SocketAddr, E> {
            parse_addr(s).map_err(E::custom)
        }
    }
    d.deserialize_any(Addr).map(Some)
}

/// Binds `addr` and serves `GET /metrics` from it on a thread of its own for the rest of
/// the process, encoding what `stats` returns at each scrape. Returns the address bound
/// (port 0 picks a free one).
pub fn spawn<F>(addr: SocketAddr, stats: F) -> Result<SocketAddr, Error>
where
    F: Fn() -> Vec<ExportStatsSnapshot> + Send + Sync + 'static,
{
    let failed = |source| Error::Metrics { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(failed)?;
    let bound = listener.local_addr().map_err(failed)?;
    listener.set_nonblocking(true).map_err(failed)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|source| Error::Os {
            what: "starting the metrics server's runtime",
            source,
        })?;
    let stats = Arc::new(stats);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        log::error!("metrics: cannot serve on {bound}: {e}");
                        return;
                    }
                };
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            let stats = stats.clone();
                            tokio::spawn(async move { answer(stream, &*stats).await });
                        }
                        // Out of descriptors, say: the next scrape may find some.
                        Err(e) => {
                            log::warn!("metrics: accepting a connection: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        })
        .map_err(|source| Error::Os {
            what: "starting the metrics thread",
            source,
        })?;
    log::info!("metrics: serving http://{bound}/metrics");
    Ok(bound)
}

/// Reads one request head from `stream`, answers it and closes the connection.
async fn answer(mut stream: TcpStream, stats: &(dyn Fn() -> Vec<ExportStatsSnapshot> + Sync)) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break true;
        }
        if head.len() > MAX_HEAD {
            break false;
        }
        match tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => head.extend_from_slice(&buf[..n]),
        }
    };
    let response = if complete {
        respond(&head, stats)
    } else {
        reply(
            "431 Request Header Fields Too Large",
            PLAIN,
            "",
            "request head too long\n",
        )
    };
    // A client that went away needs no answer.
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The response to a complete request head.
fn respond(head: &[u8], stats: &(dyn Fn() -> Vec<ExportStatsSnapshot> + Sync)) -> String {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next());
    let path = target.and_then(|t| t.split(|&b| b == b'?').next());
    if method != b"GET" {
        return reply(
            "405 Method Not Allowed",
            PLAIN,
            "Allow: GET\r\n",
            "only GET /metrics\n",
        );
    }
    if path != Some(b"/metrics") {
        return reply("404 Not Found", PLAIN, "", "not found: try GET /metrics\n");
    }
    match encode(stats()) {
        Ok(body) => reply("200 OK", prometheus_text::CONTENT_TYPE, "", &body),
        Err(std::fmt::Error) => reply(
            "500 Internal Server Error",
            PLAIN,
            "",
            "encoding the metrics failed\n",
        ),
    }
}

/// A whole HTTP/1.1 response that closes the connection. `extra`: more header lines,
/// each ending in CRLF.
fn reply(status: &str, content_type: &str, extra: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
}

/// `snapshots` in the Prometheus text format (version 0.0.4).
pub fn encode(snapshots: Vec<ExportStatsSnapshot>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshots(snapshots)));
    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

/// The snapshots of one scrape, as a collector.
#[derive(Debug)]
struct Snapshots(Vec<ExportStatsSnapshot>);

/// A metric's labels: export, queue, and the metric's own.
type Labels = Vec<(&'static str, String)>;

impl Snapshots {
    /// Every queue of every export, with its `export` and `queue` labels.
    fn queues(&self) -> impl Iterator<Item = (Labels, &QueueStatsSnapshot)> {
        self.0.iter().flat_map(|e| {
            e.queues.iter().map(|q| {
                let labels = vec![("export", e.export.clone()), ("queue", q.queue.to_string())];
                (labels, q)
            })
        })
    }

    /// One counter family with a row per queue and value of `rows`, labelled `key`.
    fn counter<'a, R>(
        &'a self,
        encoder: &mut DescriptorEncoder,
        (name, help, key): (&str, &str, &'static str),
        rows: R,
    ) -> Result<(), std::fmt::Error>
    where
        R: Fn(&'a QueueStatsSnapshot) -> Vec<(&'static str, u64)>,
    {
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, q) in self.queues() {
            for (value, n) in rows(q) {
                let mut labels = labels.clone();
                labels.push((key, value.to_owned()));
                metric
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        Ok(())
    }
}

impl Collector for Snapshots {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.counter(
            &mut encoder,
            ("corodev_requests", "Requests answered, by type", "op"),
            |q| {
                q.requests
                    .by_op()
                    .iter()
                    .map(|&(op, n)| (op.name(), n))
                    .collect()
            },
        )?;
        self.counter(
            &mut encoder,
            (
                "corodev_bytes",
                "Data bytes moved by successful reads and writes",
                "direction",
            ),
            |q| vec![("read", q.bytes_read), ("write", q.bytes_written)],
        )?;
        self.counter(
            &mut encoder,
            (
                "corodev_errors",
                "Requests answered with an error: io (IOERR, the storage failed), invalid (IOERR, malformed request), unsupported (UNSUPP)",
                "cause",
            ),
            |q| {
                vec![
                    ("io", q.errors.io),
                    ("invalid", q.errors.invalid),
                    ("unsupported", q.errors.unsupported),
                ]
            },
        )?;
        let mut gauge = encoder.encode_descriptor(
            "corodev_in_flight",
            "Requests popped from the ring and not yet answered",
            None,
            MetricType::Gauge,
        )?;
        for (labels, q) in self.queues() {
            gauge.encode_family(&labels)?.encode_gauge(&q.in_flight)?;
        }
        let mut histogram = encoder.encode_descriptor(
            "corodev_request_duration_seconds",
            "Time from popping a request to publishing its answer",
            None,
            MetricType::Histogram,
        )?;
        for (labels, q) in self.queues() {
            // The encoder makes the counts cumulative.
            let buckets: Vec<(f64, u64)> = q
                .latency
                .buckets
                .iter()
                .map(|b| (b.le_us.map_or(f64::INFINITY, |us| us as f64 / 1e6), b.count))
                .collect();
            histogram
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(
                    q.latency.sum_ns as f64 / 1e9,
                    q.latency.count,
                    &buckets,
                    None,
                )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{ExportStats, BUCKET_BOUNDS_US};
    use corodev_devices::blk::Served;
    use corodev_devices::request::{RequestType, Used, S_IOERR, S_OK};
    use std::collections::BTreeMap;
    use std::io::{Read, Write};

    /// The samples of an exposition, by `name{labels}` exactly as written.
    fn samples(text: &str) -> BTreeMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (key, value) = l.rsplit_once(' ').expect("name and value");
                (key.to_owned(), value.parse().expect("a number"))
            })
            .collect()
    }

    fn example() -> Vec<ExportStatsSnapshot> {
        let stats = ExportStats::new(2);
        let q1 = stats.queue(1).expect("queue 1");
        let served = |kind, bytes, status| Served {
            used: Used { head: 0, len: 1 },
            kind: Some(kind),
            bytes,
            status,
            rejected: false,
        };
        q1.started(4);
        q1.completed(
            &served(RequestType::Out, 8192, S_OK),
            Duration::from_micros(20),
        );
        q1.completed(
            &served(RequestType::In, 4096, S_OK),
            Duration::from_micros(3),
        );
        q1.completed(&served(RequestType::In, 0, S_IOERR), Duration::from_secs(3));
        vec![stats.snapshot("vm1")]
    }

    #[test]
    fn bare_port_is_loopback() {
        assert_eq!(parse_addr("9400"), Ok("127.0.0.1:9400".parse().unwrap()));
        assert_eq!(parse_addr("0.0.0.0:80"), Ok("0.0.0.0:80".parse().unwrap()));
        assert_eq!(parse_addr("[::1]:9400"), Ok("[::1]:9400".parse().unwrap()));
        for bad in ["", "localhost:9400", "70000", "1.2.3.4"] {
            assert!(parse_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exposition_names_labels_and_cumulative_buckets() {
        let text = encode(example()).expect("encodes");
        for family in [
            "# TYPE corodev_requests_total counter",
            "# TYPE corodev_bytes_total counter",
            "# TYPE corodev_errors_total counter",
            "# TYPE corodev_in_flight gauge",
            "# TYPE corodev_request_duration_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == family), "{family} in\n{text}");
        }
        let s = samples(&text);
        let at = |k: &str| *s.get(k).unwrap_or_else(|| panic!("{k} in\n{text}"));
        let q1 = r#"export="vm1",queue="1""#;
        assert_eq!(
            at(&format!("corodev_requests_total{{{q1},op=\"read\"}}")),
            2.0
        );
        assert_eq!(
            at(&format!("corodev_requests_total{{{q1},op=\"write\"}}")),
            1.0
        );
        assert_eq!(
            at(r#"corodev_requests_total{export="vm1",queue="0",op="read"}"#),
            0.0,
            "an idle queue is there too"
        );
        assert_eq!(
            at(&format!("corodev_bytes_total{{{q1},direction=\"write\"}}")),
            8192.0
        );
        assert_eq!(
            at(&format!("corodev_bytes_total{{{q1},direction=\"read\"}}")),
            4096.0
        );
        assert_eq!(
            at(&format!("corodev_errors_total{{{q1},cause=\"io\"}}")),
            1.0
        );
        assert_eq!(at(&format!("corodev_in_flight{{{q1}}}")), 1.0);
        let bucket = |le: &str| {
            at(&format!(
                "corodev_request_duration_seconds_bucket{{{q1},le=\"{le}\"}}"
            ))
        };
        assert_eq!(bucket("8e-06"), 1.0, "3 us");
        assert_eq!(bucket("1.6e-05"), 1.0, "cumulative");
        assert_eq!(bucket("3.2e-05"), 2.0, "20 us added");
        assert_eq!(bucket("1.048576"), 2.0);
        assert_eq!(bucket("+Inf"), 3.0, "3 s only in +Inf");
        assert_eq!(
            at(&format!("corodev_request_duration_seconds_count{{{q1}}}")),
            3.0
        );
        let sum = at(&format!("corodev_request_duration_seconds_sum{{{q1}}}"));
        assert!((sum - 3.000023).abs() < 1e-9, "{sum}");
        let buckets = s
            .keys()
            .filter(|k| {
                k.starts_with("corodev_request_duration_seconds_bucket{export=\"vm1\",queue=\"1\"")
            })
            .count();
        assert_eq!(
            buckets,
            BUCKET_BOUNDS_US.len() + 1,
            "every bound, and +Inf once"
        );
    }

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut stream = std::net::TcpStream::connect(addr).expect("connects");
        stream.write_all(request.as_bytes()).expect("sends");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("reads to the close");
        response
    }

    #[test]
    fn serves_get_metrics_only() {
        let addr = spawn("127.0.0.1:0".parse().unwrap(), example).expect("binds");
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let (head, body) = ok.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        assert_eq!(body, encode(example()).expect("encodes"));
        let not_found = get(addr, "GET / HTTP/1.1\r\n\r\n");
        assert!(not_found.starts_with("HTTP/1.1 404 "), "{not_found}");
        let post = get(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("\r\nAllow: GET\r\n"), "{post}");
        // No end of head within the limit (and nothing past what the server reads, which
        // would make its close a reset).
        let endless = "a".repeat(MAX_HEAD + 808);
        assert!(get(addr, &endless).starts_with("HTTP/1.1 431 "));
    }

    #[test]
    fn an_address_in_use_fails_at_once_naming_the_flag() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        let addr = taken.local_addr().expect("address");
        let err = spawn(addr, Vec::new).expect_err("in use");
        assert!(
            err.to_string()
                .starts_with(&format!("--metrics {addr}: cannot listen: ")),
            "{err}"
        );
    }
}

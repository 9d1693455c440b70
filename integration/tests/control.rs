//! The control API (`--control PATH`, `corodev ctl`) against a running corodev: malformed
//! input answered with structured errors while the session and the daemon stay up;
//! `export-add` starting an export a real guest then writes to; `export-del` in safe mode
//! letting that guest finish (its socket gone at once, `EXPORT_DELETED` when it leaves)
//! and in hard mode cutting a guest off; `shutdown` ending the daemon as SIGTERM does.
//!
//! Always corodev: qemu-storage-daemon's QMP has other commands.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration::control::{ctl, RawSession};
use integration::{Daemon, Guest, Image, Qmp, Vm};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(20);

/// A temp dir under /tmp (socket paths must be short) for control and export sockets.
fn dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("corodev-ctl-")
        .tempdir()
        .expect("tempdir")
}

/// corodev serving `image` (export `blk`) with its control API at `control`.
fn daemon_with_control(image: &Image, control: &Path) -> Daemon {
    let control = control.to_str().expect("utf-8 path");
    let d = Daemon::corodev(image, &["--control", control]);
    d.wait_socket(Path::new(control), true);
    d
}

fn error_of(reply: Option<Value>) -> (String, String) {
    let reply = reply.expect("an answer, not a closed connection");
    let err = reply
        .get("error")
        .unwrap_or_else(|| panic!("an error, got {reply}"));
    (
        err["class"].as_str().expect("class").to_owned(),
        err["desc"].as_str().expect("desc").to_owned(),
    )
}

#[test]
fn malformed_input_gets_a_structured_error_and_the_session_and_daemon_stay_up() {
    let d = dir();
    let image = Image::new(8 * MIB);
    let control = d.path().join("control.sock");
    let mut daemon = daemon_with_control(&image, &control);
    let mode = std::fs::metadata(&control)
        .expect("control socket")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "only the daemon's user may control it"
    );

    let (mut s, greeting) = RawSession::connect(&control);
    assert!(greeting["QMP"]["version"]["package"]
        .as_str()
        .is_some_and(|p| p.starts_with("corodev ")));
    assert_eq!(
        error_of(s.send(br#"{"execute":"query-exports"}"#)),
        (
            "CommandNotFound".into(),
            "Expecting capabilities negotiation with 'qmp_capabilities'".into()
        )
    );
    assert_eq!(
        s.send(br#"{"execute":"qmp_capabilities","id":1}"#),
        Some(json!({"return": {}, "id": 1}))
    );
    let (class, desc) = error_of(s.send(b"{bad"));
    assert_eq!(class, "GenericError");
    assert!(desc.starts_with("JSON parse error: "), "{desc}");
    assert_eq!(
        error_of(s.send(b"[1,2]")).1,
        "QMP input must be a JSON object"
    );
    assert_eq!(
        error_of(s.send(br#"{"execute":"frobnicate"}"#)),
        (
            "CommandNotFound".into(),
            "The command frobnicate has not been found: query-commands lists them".into()
        )
    );
    let reply = s
        .send(br#"{"execute":"export-del","arguments":{"name":7},"id":"x"}"#)
        .expect("an answer");
    assert_eq!(reply["id"], "x", "the id is echoed on errors too");
    assert_eq!(
        reply["error"]["desc"],
        "export-del: argument 'name': invalid type: integer `7`, expected a string"
    );
    assert_eq!(
        error_of(s.send(br#"{"execute":"export-del","arguments":{"name":"nope"}}"#)).1,
        "no export named 'nope': query-exports lists them"
    );
    assert_eq!(
        error_of(s.send(br#"{"execute":"query-stats","arguments":{"name":"nope"}}"#)).1,
        "no export named 'nope': query-exports lists them"
    );
    let stats = s.send(br#"{"execute":"query-stats"}"#).expect("an answer");
    assert_eq!(stats["return"][0]["export"], "blk", "{stats}");
    assert_eq!(
        error_of(s.send(
            br#"{"execute":"export-add","arguments":{"socket":"/tmp/x.sock","queue-size":100,"disk":"/nonexistent"}}"#
        ))
        .1,
        "queue-size: 100 is not a power of two between 2 and 32768: use e.g. 128 or 256"
    );
    let exports = s
        .send(br#"{"execute":"query-exports"}"#)
        .expect("an answer");
    assert_eq!(
        exports["return"][0]["name"], "blk",
        "the same session still serves: {exports}"
    );

    // A line past the limit ends that session only.
    let long = vec![b'x'; 70 * 1024];
    assert_eq!(
        error_of(s.send(&long)).1,
        "request line longer than 65536 bytes; closing the connection"
    );
    assert_eq!(s.read(), None, "then the daemon hangs up");
    let mut qmp = Qmp::connect(&control, WAIT).expect("a new session");
    assert_eq!(qmp.run("query-exports", None)[0]["state"], "listening");
    daemon.assert_alive();

    // The client's own errors: one line each, exit status 1.
    let out = ctl(&control, &["frobnicate"]);
    assert_eq!(
        (out.code, out.stderr.trim_end()),
        (
            1,
            "corodev ctl: error: CommandNotFound: The command frobnicate has not been found: query-commands lists them"
        )
    );
    let out = ctl(&control, &["export-del", "blk"]);
    assert_eq!(
        (out.code, out.stderr.trim_end()),
        (
            1,
            "corodev ctl: error: argument 'blk' is not KEY=VALUE (e.g. name=vm1)"
        )
    );
    let missing = d.path().join("missing.sock");
    let out = ctl(&missing, &["query-exports"]);
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr.trim_end(),
        format!(
            "corodev ctl: error: cannot connect to {0}: No such file or directory (os error 2); is corodev running with --control {0}?",
            missing.display()
        )
    );
}

/// Boots the restart workload (verified O_DIRECT writers for `seconds`) on `socket` and
/// returns once the writers run.
fn start_writers(socket: &Path, seconds: &'static str) -> Vm {
    let mut guest = Guest::test("restart");
    guest.arg = Some(seconds);
    guest.mem_mib = 512; // the writers keep a copy of their 64 MiB in guest memory
    guest.timeout = Duration::from_secs(300);
    let vm = Vm::start(socket, &guest);
    wait_for(Duration::from_secs(180), || {
        vm.console().contains("CORODEV-PROGRESS")
    })
    .unwrap_or_else(|| panic!("the guest never started its writers:\n{}", vm.console()));
    vm
}

/// Polls `cond` every 100 ms until it holds (`Some`) or `timeout` passes (`None`).
fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<()> {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(())
}

fn export<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|e| e["name"] == name)
}

fn progress_lines(vm: &Vm) -> usize {
    vm.console().matches("CORODEV-PROGRESS").count()
}

#[test]
fn an_added_export_serves_a_guest_and_a_safe_delete_lets_it_finish() {
    let d = dir();
    let (first, added) = (Image::new(8 * MIB), Image::new(128 * MIB));
    let control = d.path().join("control.sock");
    let mut daemon = daemon_with_control(&first, &control);
    let socket: PathBuf = d.path().join("added.sock");
    let out = ctl(
        &control,
        &[
            "export-add",
            "name=added",
            &format!("socket={}", socket.display()),
            &format!("disk={}", added.path.display()),
            "num-queues=2",
        ],
    );
    assert_eq!(out.json(), json!({}), "export-add returns nothing");
    assert!(socket.exists(), "listening once export-add returns");
    let mut qmp = Qmp::connect(&control, WAIT).expect("control session");
    let list = qmp.run("query-exports", None);
    let info = export(&list, "added").unwrap_or_else(|| panic!("listed: {list}"));
    assert_eq!(info["origin"], "control");
    assert_eq!(info["backend"], "file");
    assert_eq!(info["size"], 128 * MIB);
    assert_eq!(info["num-queues"], 2);
    assert_eq!(info["state"], "listening");
    assert_eq!(
        export(&list, "blk").expect("the flag export")["origin"],
        "config"
    );

    let vm = start_writers(&socket, "20");
    let list = qmp.run("query-exports", None);
    assert_eq!(export(&list, "added").expect("listed")["state"], "serving");

    // Safe delete: no new frontend can connect, the connected one is served on.
    assert_eq!(
        qmp.run("export-del", Some(json!({"name": "added"}))),
        json!({})
    );
    assert!(!socket.exists(), "the socket goes at once");
    let list = qmp.run("query-exports", None);
    assert_eq!(
        export(&list, "added").expect("still listed")["state"],
        "deleting"
    );
    let before = progress_lines(&vm);
    wait_for(Duration::from_secs(60), || progress_lines(&vm) > before + 2).unwrap_or_else(|| {
        panic!(
            "the guest kept no progress after the safe delete:\n{}",
            vm.console()
        )
    });
    // The counters see the guest's writes (query-stats shares the metrics' counters).
    let stats = qmp.run("query-stats", Some(json!({"name": "added"})));
    let queues = stats[0]["queues"].as_array().expect("per-queue stats");
    assert_eq!(queues.len(), 2, "one entry per queue: {stats}");
    let sum = |key: &str| -> u64 {
        queues
            .iter()
            .map(|q| q.pointer(key).and_then(Value::as_u64).expect(key))
            .sum()
    };
    assert!(
        sum("/bytes-written") > 0 && sum("/requests/write") > 0,
        "{stats}"
    );
    assert_eq!(sum("/errors/io"), 0, "{stats}");
    let run = vm.wait();
    let r = run.expect_pass();
    assert_eq!(r.get("errors"), "0");
    assert_eq!(
        added.md5(r.num("offset"), r.num("length") as usize),
        r.get("md5"),
        "every write the guest made before and after the delete is on the image"
    );

    // Its frontend gone, the export is too, and every session was told.
    wait_for(WAIT, || {
        export(&qmp.run("query-exports", None), "added").is_none()
    })
    .unwrap_or_else(|| panic!("still listed after its guest left:\n{}", daemon.log_text()));
    assert!(
        qmp.events()
            .iter()
            .any(|e| e["event"] == "EXPORT_DELETED" && e["data"]["name"] == "added"),
        "EXPORT_DELETED was sent: {:?}",
        qmp.events()
    );
    assert!(daemon.log_text().contains("export added: deleted"));
    // The name is free again.
    let again = ctl(
        &control,
        &[
            "export-add",
            "name=added",
            &format!("socket={}", socket.display()),
            "backend=null",
            "size=1M",
        ],
    );
    assert_eq!(again.json(), json!({}));
    daemon.assert_alive();
}

#[test]
fn a_hard_delete_cuts_the_guest_off_and_shutdown_ends_the_daemon() {
    let d = dir();
    let (first, added) = (Image::new(8 * MIB), Image::new(128 * MIB));
    let control = d.path().join("control.sock");
    let mut daemon = daemon_with_control(&first, &control);
    let socket = d.path().join("added.sock");
    let mut qmp = Qmp::connect(&control, WAIT).expect("control session");
    qmp.run(
        "export-add",
        Some(json!({"name": "added", "socket": socket, "disk": added.path})),
    );
    let mut vm = start_writers(&socket, "120");
    let t0 = Instant::now();
    assert_eq!(
        qmp.run("export-del", Some(json!({"name": "added", "mode": "hard"}))),
        json!({})
    );
    assert!(
        t0.elapsed() < WAIT,
        "a hard delete waits only for the requests in flight"
    );
    assert!(!socket.exists());
    assert!(export(&qmp.run("query-exports", None), "added").is_none());
    assert!(qmp
        .events()
        .iter()
        .any(|e| e["event"] == "EXPORT_DELETED" && e["data"]["name"] == "added"));
    let log = daemon.log_text();
    assert!(
        log.contains("export added: connection 1: frontend disconnected"),
        "the frontend was hung up on; log:\n{log}"
    );
    vm.kill();

    // `shutdown`: the SIGTERM path; the daemon exits 0 and removes its sockets.
    assert_eq!(qmp.run("shutdown", None), json!({}));
    let status = daemon.wait_exit(WAIT).expect("exits after shutdown");
    assert!(status.success(), "{status}");
    assert!(!control.exists(), "the control socket is removed at exit");
    assert!(!daemon.socket.exists(), "and the export's");
}

/// A request's latency in the statistics runs from its pop to its own completion, also when
/// completions arrive one by one while the worker sleeps. Two flushes held 200 ms each by
/// the null backend, the second published 100 ms after the first: each took at least 200 ms.
/// (Regression: the completion time is read once per pass and was not cleared when the
/// completion event resumed requests, so the second flush was stamped with the first one's
/// time and counted at about 100 ms.)
#[test]
fn a_requests_latency_runs_to_its_own_completion() {
    const HELD: Duration = Duration::from_millis(200);
    let dir = dir();
    let control = dir.path().join("control.sock");
    let control_arg = control.to_str().expect("utf-8 path");
    let held_us = HELD.as_micros().to_string();
    let daemon = Daemon::corodev_null(&[
        "--control",
        control_arg,
        "--null-latency-us",
        &held_us,
        "--queue-size",
        "16",
    ]);
    let mut fe =
        integration::frontend::TestFrontend::connect(daemon.socket(), 1, 16).expect("connect");
    let first = fe.put_flush(0, 0);
    fe.publish(0, first);
    std::thread::sleep(HELD / 2);
    let second = fe.put_flush(0, 1);
    fe.publish(0, second);
    for _ in 0..2 {
        fe.wait_used(0, WAIT).expect("a flush answered");
    }
    let stats = ctl(&control, &["query-stats"]).json();
    let queue = &stats[0]["queues"][0];
    let count = queue.pointer("/latency/count").and_then(Value::as_u64);
    let sum_ns = queue.pointer("/latency/sum-ns").and_then(Value::as_u64);
    assert_eq!(count, Some(2), "{stats}");
    let held_ns = u64::try_from(HELD.as_nanos()).expect("fits");
    assert!(
        sum_ns.is_some_and(|s| s >= 2 * held_ns),
        "two requests held {HELD:?} each are counted as {sum_ns:?} ns in all: {stats}"
    );
}

/// `shutdown` is answered before the daemon ends, however quickly it can end (a null
/// export, no frontend: nothing to drain). The shutdown used to begin inside the command,
/// so the daemon could exit before the session wrote the answer; the client then read only
/// a closed connection (seen once, in `a_hard_delete_cuts_the_guest_off_and_shutdown_ends_the_daemon`;
/// not reproduced by this test in 50 rounds against that code: a race).
#[test]
fn shutdown_is_answered_before_the_daemon_exits() {
    for round in 0..20 {
        let dir = dir();
        let control = dir.path().join("control.sock");
        let control_arg = control.to_str().expect("utf-8 path");
        let mut daemon = Daemon::corodev_null(&["--control", control_arg]);
        let mut qmp = Qmp::connect(&control, WAIT).expect("control session");
        let answer = qmp.execute("shutdown", None);
        assert!(
            matches!(&answer, Ok(v) if *v == json!({})),
            "round {round}: shutdown answered {answer:?}"
        );
        let status = daemon.wait_exit(WAIT).expect("exits after shutdown");
        assert!(status.success(), "round {round}: {status}");
    }
}

//! The guest's verdict: the `CORODEV-BEGIN`, `CORODEV-INFO` and `CORODEV-RESULT` lines
//! `scripts/guest-init.sh` prints on the serial console, parsed into fields, and a run's
//! summary and pass/fail check. Boundary: text in, values out; the VM that produced the
//! text is [`crate::Vm`].

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

/// Which `CORODEV-*` line a [`GuestLine`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// `CORODEV-BEGIN name= boot_s=`: init reached the test (`boot_s` = kernel uptime).
    Begin,
    /// `CORODEV-INFO ...`: the device as the guest kernel sees it.
    Info,
    /// `CORODEV-RESULT name= status=PASS|FAIL [detail=] ... test_s=`: the verdict.
    Result,
}

/// One `CORODEV-BEGIN`, `CORODEV-INFO` or `CORODEV-RESULT` line: its `key=value` fields.
#[derive(Debug, Clone)]
pub struct GuestLine {
    /// Which marker the line starts with.
    pub kind: LineKind,
    /// The line's `key=value` words.
    pub fields: HashMap<String, String>,
}

impl GuestLine {
    /// A field's value, or "" if absent.
    pub fn get(&self, key: &str) -> &str {
        self.fields.get(key).map_or("", String::as_str)
    }

    /// A field parsed as a number; panics naming the field if absent or malformed (for
    /// tests: the guest always prints the fields its test documents).
    pub fn num(&self, key: &str) -> u64 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("guest field {key}={:?} is not a number", self.get(key)))
    }

    /// Whether this is a result line with `status=PASS`.
    pub fn passed(&self) -> bool {
        self.kind == LineKind::Result && self.get("status") == "PASS"
    }
}

/// What a guest printed.
#[derive(Debug)]
pub struct GuestRun {
    /// The test that was asked for.
    pub test: String,
    /// Serial console plus run-vm.sh's messages.
    pub console: String,
    /// The `CORODEV-*` lines, in order.
    pub results: Vec<GuestLine>,
    /// Wall time from spawning run-vm.sh to its exit.
    pub elapsed: Duration,
    /// run-vm.sh's exit status (None if the harness had to kill it).
    pub status: Option<ExitStatus>,
    /// Whether the guest hit its time limit.
    pub timed_out: bool,
    /// Why the harness stopped the VM early (the server died), if it did.
    pub aborted: Option<String>,
    /// The server's log after the run, when booted through [`Daemon::boot`].
    pub server_log: Option<String>,
}

impl GuestRun {
    fn line(&self, kind: LineKind) -> Option<&GuestLine> {
        self.results.iter().find(|l| l.kind == kind)
    }

    /// The test's result line, if the guest got that far.
    pub fn result(&self) -> Option<&GuestLine> {
        self.line(LineKind::Result)
    }

    /// The test's result line; panics with the console (and the server's log) if there is
    /// none or it failed.
    pub fn expect_pass(&self) -> &GuestLine {
        let Some(r) = self.result() else {
            panic!(
                "guest test {} printed no result{}{}",
                self.test,
                match (&self.aborted, self.timed_out) {
                    (Some(why), _) => format!(" ({why})"),
                    (None, true) => " (timed out)".to_owned(),
                    (None, false) => String::new(),
                },
                self.transcript()
            );
        };
        assert!(
            r.passed(),
            "guest test {} failed: {}{}",
            self.test,
            r.get("detail"),
            self.transcript()
        );
        assert_eq!(r.get("name"), self.test, "result of another test?");
        r
    }

    /// Console and server log, for failure messages.
    fn transcript(&self) -> String {
        let mut t = format!("\n--- console ---\n{}", self.console);
        if let Some(log) = &self.server_log {
            t.push_str(&format!("--- server log ---\n{log}"));
        }
        t
    }

    /// The guest's `CORODEV-INFO` line (device as the guest kernel sees it).
    pub fn info(&self) -> &GuestLine {
        self.line(LineKind::Info)
            .unwrap_or_else(|| panic!("guest printed no info{}", self.transcript()))
    }

    /// Seconds from kernel start to the test (the guest's uptime), if it got there.
    pub fn boot_secs(&self) -> Option<f64> {
        self.line(LineKind::Begin)?.get("boot_s").parse().ok()
    }

    /// Seconds the test itself took inside the guest.
    pub fn test_secs(&self) -> Option<f64> {
        self.result()?.get("test_s").parse().ok()
    }

    /// One line: test, verdict, wall time, guest boot and test time.
    pub fn summary(&self) -> String {
        let verdict = match self.result() {
            Some(r) => r.get("status").to_owned(),
            None if self.aborted.is_some() => "ABORTED (server exited)".to_owned(),
            None if self.timed_out => "TIMEOUT".to_owned(),
            None => match self.status {
                Some(s) => format!("NO-RESULT ({})", describe(s)),
                None => "NO-RESULT (killed)".to_owned(),
            },
        };
        let secs = |s: Option<f64>| s.map_or("?".to_owned(), |s| format!("{s:.1}"));
        format!(
            "guest {}: {verdict} in {:.1} s wall (guest boot {} s, test {} s)",
            self.test,
            self.elapsed.as_secs_f64(),
            secs(self.boot_secs()),
            secs(self.test_secs())
        )
    }
}

fn describe(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => s.to_string(),
    }
}

/// Parses `CORODEV-BEGIN|INFO|RESULT k=v ...` lines from a console log. Lines may carry
/// console noise before the marker (escape sequences, a kernel message without newline).
pub fn parse_results(console: &str) -> Vec<GuestLine> {
    console
        .lines()
        .filter_map(|line| {
            let start = line.find("CORODEV-")?;
            let mut words = line[start..].split_whitespace();
            let kind = match words.next()? {
                "CORODEV-BEGIN" => LineKind::Begin,
                "CORODEV-INFO" => LineKind::Info,
                "CORODEV-RESULT" => LineKind::Result,
                _ => return None,
            };
            let fields = words
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            Some(GuestLine { kind, fields })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines_amid_console_noise() {
        let log = "[    1.0] boot\n\x1b[2JCORODEV-BEGIN name=pattern boot_s=5.1\n\
                   CORODEV-INFO size=8 ro=0\r\nCORODEV-DONE\n\
                   CORODEV-RESULT name=pattern status=PASS md5=ab test_s=0.8\n";
        let r = parse_results(log);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].kind, LineKind::Begin);
        assert_eq!(r[1].get("size"), "8");
        assert_eq!(r[1].get("ro"), "0");
        assert_eq!(r[2].get("status"), "PASS");
        assert!(r[2].passed());
        assert_eq!(r[2].get("md5"), "ab");
        assert_eq!(r[2].get("missing"), "");
        let run = GuestRun {
            test: "pattern".into(),
            console: log.into(),
            results: r,
            elapsed: Duration::from_secs(7),
            status: None,
            timed_out: false,
            aborted: None,
            server_log: None,
        };
        assert_eq!(run.boot_secs(), Some(5.1));
        assert_eq!(run.test_secs(), Some(0.8));
        assert_eq!(run.expect_pass().get("md5"), "ab");
    }

    #[test]
    fn a_failed_result_is_not_a_pass() {
        let r = parse_results("CORODEV-RESULT name=fio status=FAIL detail=verify\n");
        assert!(!r[0].passed());
        assert_eq!(r[0].get("detail"), "verify");
    }
}

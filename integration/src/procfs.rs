//! What the harness reads about a server process from /proc: whether it listens on a
//! unix socket yet, how much CPU it has used, and what it holds (open fds, threads,
//! mappings, memory) for the tests that check a closed connection left nothing behind.
//! Boundary: reading /proc only; the process itself is [`crate::Daemon`]'s.

/// Whether process `pid` holds a listening unix socket: one of its fds is a socket whose
/// inode /proc/net/unix lists with `__SO_ACCEPTCON` in the flags column.
pub(crate) fn has_listening_unix_socket(pid: u32) -> bool {
    const SO_ACCEPTCON: u32 = 1 << 16;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return true; // no /proc: fall back to the socket file alone
    };
    let listening: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(cols.get(3)?, 16).ok()?;
            (flags & SO_ACCEPTCON != 0).then_some(*cols.get(6)?)
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .is_some_and(|inode| listening.contains(&inode))
        })
    })
}

/// CPU seconds (user + system) process `pid` has used so far, from `/proc/<pid>/stat`.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("server /proc stat");
    // Fields after the ")" closing the command name start at field 3: utime is 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Entries of `/proc/<pid>/<dir>` (`fd`: open descriptors, `task`: threads); 0 once the
/// process is gone.
pub(crate) fn count_entries(pid: u32, dir: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{dir}")).map_or(0, |d| d.flatten().count())
}

/// Lines of `/proc/<pid>/maps` that contain `needle` (a mapped file's name).
pub(crate) fn mappings_of(pid: u32, needle: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmSize`, ...); 0 if absent.
pub(crate) fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_its_own_listening_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let _listener =
            std::os::unix::net::UnixListener::bind(dir.path().join("s.sock")).expect("bind");
        assert!(has_listening_unix_socket(std::process::id()));
        assert!(!has_listening_unix_socket(u32::MAX), "no such process");
    }

    #[test]
    fn reads_its_own_resources() {
        let me = std::process::id();
        assert!(count_entries(me, "fd") >= 3, "stdin, stdout, stderr");
        assert!(count_entries(me, "task") >= 1);
        assert_eq!(count_entries(u32::MAX, "task"), 0, "no such process");
        assert!(status_kib(me, "VmRSS") > 0);
        assert!(status_kib(me, "VmSize") >= status_kib(me, "VmRSS"));
        assert!(!mappings_of(me, "[stack]").is_empty());
    }
}

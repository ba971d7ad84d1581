//! The tracers under test: tcptrace (any build) and tcpstates, run as
//! child processes, and what they print.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::sys::{SIGINT, SIGKILL, check_interrupted, kill};

/// Where Debian's libbpf-tools puts tcpstates.
pub(super) const TCPSTATES: &str = "/usr/sbin/tcpstates";

const STOP_LIMIT: Duration = Duration::from_secs(60);

/// Pids of tcptrace and tcpstates processes but `ours`.
pub(super) fn other_tracers(ours: Option<i32>) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| Some(pid as i32) != ours)
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| matches!(c.trim(), "tcptrace" | "tcpstates"))
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// tcpstates, installing libbpf-tools with apt when it is missing.
pub(super) fn find_tcpstates() -> Option<PathBuf> {
    let path = PathBuf::from(TCPSTATES);
    if path.exists() {
        return Some(path);
    }
    if !crate::which("apt-get") {
        return None;
    }
    eprintln!("xtask: installing libbpf-tools (for tcpstates)");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "libbpf-tools"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (ok && path.exists()).then_some(path)
}

/// A file removed on drop.
pub(super) struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A tracer process, killed on drop if it is still running.
pub(super) struct Tracer {
    pub child: Child,
    stderr: mpsc::Receiver<String>,
    /// Its stderr so far.
    pub lines: Vec<String>,
}

impl Tracer {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The stderr lines so far, waiting up to `limit` for one that starts
    /// with `prefix` (None: just collect).
    pub fn wait_line(&mut self, prefix: Option<&str>, limit: Duration) -> Result<bool> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .stderr
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) => {
                    let hit = prefix.is_some_and(|p| line.starts_with(p));
                    self.lines.push(line);
                    if hit {
                        return Ok(true);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(false),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            check_interrupted()?;
            if Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }

    /// SIGINT, then wait for the exit and all of stderr.
    pub fn stop(mut self) -> Result<Vec<String>> {
        // SAFETY: kill with a pid we started and have not reaped.
        unsafe { kill(self.pid(), SIGINT) };
        let deadline = Instant::now() + STOP_LIMIT;
        loop {
            if let Some(st) = self.child.try_wait()? {
                self.wait_line(None, Duration::from_secs(5))?;
                if !st.success() {
                    bail!(
                        "the tracer exited with {st}: {}",
                        self.lines.join("\n").trim()
                    );
                }
                return Ok(std::mem::take(&mut self.lines));
            }
            if Instant::now() > deadline {
                bail!("the tracer did not stop within {STOP_LIMIT:?} of SIGINT");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: our child, not yet reaped.
            unsafe { kill(self.pid(), SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

pub(super) fn spawn_tracer(mut cmd: Command) -> Result<Tracer> {
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let err = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(Tracer {
        child,
        stderr: rx,
        lines: Vec::new(),
    })
}

/// What tcptrace's last line says.
#[derive(Debug, PartialEq)]
pub(crate) struct StatsLine {
    pub shown: u64,
    pub filtered: u64,
    pub lost: u64,
    /// Absent from older versions' line.
    pub missed: Option<u64>,
    /// Sockets with gaps (the clause is absent when there are none).
    pub gaps: u64,
}

/// "tcptrace: N transitions shown[ (...)], F filtered, L lost[, M missed by
/// the kernel][, G sockets with gaps]"
pub(crate) fn parse_stats_line(line: &str) -> Option<StatsLine> {
    let rest = line.strip_prefix("tcptrace: ")?;
    let words: Vec<&str> = rest.split([' ', ',']).filter(|w| !w.is_empty()).collect();
    let mut shown = None;
    let mut filtered = None;
    let mut lost = None;
    let mut missed = None;
    let mut gaps = None;
    for pair in words.windows(2) {
        let n = pair[0].parse::<u64>().ok();
        match pair[1] {
            "transitions" | "transition" => shown = shown.or(n),
            "filtered" => filtered = filtered.or(n),
            "lost" => lost = lost.or(n),
            "missed" => missed = missed.or(n),
            // "N existing sockets" pairs N with "existing", not "sockets".
            "sockets" | "socket" => gaps = gaps.or(n),
            _ => {}
        }
    }
    Some(StatsLine {
        shown: shown?,
        filtered: filtered?,
        lost: lost?,
        missed,
        gaps: gaps.unwrap_or(0),
    })
}

/// tcpstates lines whose local or remote port is `port`. Counted from the
/// end of the line: `... LADDR LPORT RADDR RPORT OLD -> NEW MS` (a process
/// name may hold spaces).
pub(super) fn count_tcpstates_lines(path: &Path, port: u16) -> Result<u64> {
    let port = port.to_string();
    let f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut n = 0;
    let mut reader = BufReader::with_capacity(1 << 20, f);
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() >= 8 && words[words.len() - 3] == "->" {
            let lport = words[words.len() - 7];
            let rport = words[words.len() - 5];
            if lport == port || rport == port {
                n += 1;
            }
        }
        line.clear();
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_line() {
        let line = |shown, filtered, lost, missed, gaps| {
            Some(StatsLine {
                shown,
                filtered,
                lost,
                missed,
                gaps,
            })
        };
        assert_eq!(
            parse_stats_line("tcptrace: 23 transitions shown, 4 filtered, 1 lost"),
            line(23, 4, 1, None, 0)
        );
        assert_eq!(
            parse_stats_line(
                "tcptrace: 5 transitions shown, 0 filtered, 0 lost, 7 missed by the kernel"
            ),
            line(5, 0, 0, Some(7), 0)
        );
        assert_eq!(parse_stats_line("tcptrace: tracing port 1"), None);
        assert_eq!(
            parse_stats_line(
                "tcptrace: 9 transitions shown (2 delivered twice by the kernel, shown once), \
                 3 existing sockets, 0 filtered, 0 lost, 1 missed by the kernel, \
                 35 sockets with gaps"
            ),
            line(9, 0, 0, Some(1), 35)
        );
        assert_eq!(
            parse_stats_line(
                "tcptrace: 1 transition shown, 1 existing socket, 0 filtered, 0 lost, \
                 0 missed by the kernel, 1 socket with gaps"
            ),
            line(1, 0, 0, Some(0), 1)
        );
    }
}

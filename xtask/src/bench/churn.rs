//! The workload: `tt-churn` in a network namespace of its own, with BPF
//! statistics on for the last part of the run only.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::Options;
use super::stats::{BpfStats, RATE_UNTIL, STATS_FROM};
use super::sys::run_quiet;

/// A network namespace with loopback up, deleted on drop.
pub(crate) struct Netns(pub(crate) String);

impl Netns {
    pub(crate) fn new(name: String) -> Result<Netns> {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run_quiet(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns(name);
        run_quiet(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// What tt-churn reports of one run.
pub(super) struct Churn {
    pub connections: u64,
    pub seconds: f64,
    /// Connections made before [`RATE_UNTIL`] of the run, and when that was.
    pub mark_connections: u64,
    pub mark_seconds: f64,
    pub expected: u64,
    pub failed_connects: u64,
}

/// Runs `churn` (tt-churn, from `root`) in `ns` for `seconds`, as `opts`
/// say.
pub(super) fn run_churn(
    churn: &Path,
    root: &Path,
    opts: &Options,
    ns: &Netns,
    seconds: f64,
) -> Result<Churn> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(churn)
        .args(["--mode", &opts.mode, "--seconds", &seconds.to_string()])
        .args(["--mark", &(seconds * RATE_UNTIL).to_string()])
        .args(["--port", &opts.port.to_string()])
        .args(["--clients", &opts.clients.to_string()])
        .args(["--acceptors", &opts.acceptors.to_string()])
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start tt-churn")?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds) + Duration::from_secs(60);
    let stats_from = start + Duration::from_secs_f64(seconds * STATS_FROM);
    let mut stats_on = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if !stats_on && Instant::now() >= stats_from {
            BpfStats::set(true)?;
            stats_on = true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("tt-churn did not finish in time");
        }
        thread::sleep(Duration::from_millis(50));
    };
    BpfStats::set(false)?;
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if !status.success() {
        bail!("tt-churn failed ({status}): {}", stderr.trim());
    }
    let field = |name: &str| -> Result<f64> {
        json_number(&stdout, name)
            .ok_or_else(|| anyhow!("tt-churn printed no {name:?}: {stdout:?}"))
    };
    Ok(Churn {
        connections: field("connections")? as u64,
        seconds: field("seconds")?,
        mark_connections: field("mark_connections")? as u64,
        mark_seconds: field("mark_seconds")?,
        expected: field("expected_transitions")? as u64,
        failed_connects: field("failed_connects")? as u64,
    })
}

/// The number after `"name":` in a flat JSON object.
pub(crate) fn json_number(text: &str, name: &str) -> Option<f64> {
    let key = format!("\"{name}\":");
    let at = text.find(&key)? + key.len();
    let rest = text[at..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | 'E' | '+')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_json() {
        let l = r#"{"connections":12,"seconds":3.5,"expected_transitions":122}"#;
        assert_eq!(json_number(l, "connections"), Some(12.0));
        assert_eq!(json_number(l, "seconds"), Some(3.5));
        assert_eq!(json_number(l, "expected_transitions"), Some(122.0));
        assert_eq!(json_number(l, "missing"), None);
    }
}

//! `tcptrace read` and `tcptrace report` over a recording the bench made,
//! timed, in both formats; and what a recording holds.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};

use super::churn::json_number;
use super::sys::{Rusage, check_interrupted, run_quiet, wait4};
use super::tracer::TempFile;

/// One timed run of `tcptrace read` or `report`.
pub(super) struct Offline {
    /// "binary" or "JSON Lines".
    pub format: &'static str,
    /// "read" or "report".
    pub what: &'static str,
    pub command: String,
    pub events: u64,
    pub bytes: u64,
    pub wall_s: f64,
    pub cpu_s: f64,
    pub maxrss_kb: u64,
    pub ok: bool,
}

impl Offline {
    pub fn eps(&self) -> f64 {
        self.events as f64 / self.wall_s
    }
}

pub(super) fn file_size(p: &Path) -> u64 {
    fs::metadata(p).map_or(0, |m| m.len())
}

/// Events of a recording, from its closing stats record: a JSON object in
/// either format (in the binary one, inside the last chunk).
pub(super) fn recording_events(p: &Path) -> Option<u64> {
    let mut f = File::open(p).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    let tail = String::from_utf8_lossy(&tail);
    let at = tail.rfind("{\"type\":\"stats\"")?;
    json_number(&tail[at..], "events").map(|n| n as u64)
}

/// `tcptrace read` and `tcptrace report` over a binary recording, and over
/// the same events as JSON Lines.
pub(super) fn offline(tcptrace: &Path, rec: &Path) -> Result<Vec<Offline>> {
    let json = TempFile(rec.with_extension("jsonl"));
    let _ = fs::remove_file(&json.0);
    run_quiet(
        Command::new(tcptrace)
            .arg("read")
            .arg(rec)
            .arg("-w")
            .arg(&json.0),
    )?;
    let mut out = Vec::new();
    for (format, file) in [("JSON Lines", &json.0), ("binary", &rec.to_path_buf())] {
        out.extend(offline_one(tcptrace, format, file)?);
    }
    Ok(out)
}

fn offline_one(tcptrace: &Path, format: &'static str, rec: &Path) -> Result<Vec<Offline>> {
    let events =
        recording_events(rec).ok_or_else(|| anyhow!("{} has no stats record", rec.display()))?;
    let bytes = file_size(rec);
    let rec_s = rec.to_string_lossy();
    let runs: [(&'static str, Vec<&str>); 2] = [
        ("read", vec!["read", &rec_s, "--format", "json"]),
        ("report", vec!["report", &rec_s]),
    ];
    let mut out = Vec::new();
    for (what, args) in runs {
        check_interrupted()?;
        // Read the file once so both runs start with it in the page cache.
        let mut f = File::open(rec)?;
        std::io::copy(&mut f, &mut std::io::sink())?;
        let start = Instant::now();
        let mut child = Command::new(tcptrace)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start tcptrace")?;
        let mut err = child.stderr.take().expect("piped");
        let err_reader = thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let mut status = 0;
        let mut ru = Rusage::default();
        // SAFETY: our child; std's Child is not waited on after this.
        let r = unsafe { wait4(child.id() as i32, &mut status, 0, &mut ru) };
        let wall_s = start.elapsed().as_secs_f64();
        if r < 0 {
            bail!("wait4: {}", std::io::Error::last_os_error());
        }
        let stderr = err_reader.join().unwrap_or_default();
        let ok = status == 0;
        if !ok {
            eprintln!(
                "xtask: tcptrace {} failed (status {status:#x}): {}",
                args.join(" "),
                stderr.trim()
            );
        }
        let cpu_s = (ru.utime[0] + ru.stime[0]) as f64 + (ru.utime[1] + ru.stime[1]) as f64 / 1e6;
        out.push(Offline {
            format,
            what,
            command: format!("tcptrace {} > /dev/null", args.join(" ")),
            events,
            bytes,
            wall_s,
            cpu_s,
            maxrss_kb: ru.maxrss_kb.max(0) as u64,
            ok,
        });
    }
    Ok(out)
}

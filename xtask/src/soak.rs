//! `cargo xtask soak --minutes N`: connection churn while tcptrace records,
//! for N minutes, then checks what a long unattended run must keep true:
//! every transition accounted for, memory flat, the recording readable.
//!
//! The recording rotates (256 MiB files, 4 kept): minutes of the machine's
//! fastest churn would otherwise fill the disk.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench::churn::{Netns, json_number};
use crate::bench::sys::kill;
use crate::bench::tracer::{StatsLine, parse_stats_line};

const PORT: u16 = 24690;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// RSS may grow this much from the first half of the run to the second.
const RSS_SLACK_KB: u64 = 4 * 1024;
/// Transitions neither shown nor counted as skipped by the kernel may be at
/// most this share of those expected. At full churn a few in 100,000 are
/// (seen: 348 of 12.1M, 3,094 of 29.9M); where they go is not established
/// (see the README), so the soak shows them rather than hide them.
const UNACCOUNTED_MAX: f64 = 1e-4;

fn rss_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn run(root: &Path, minutes: f64, clients: u32) -> Result<()> {
    let release = root.join("target/release");
    let ns = Netns::new(format!("tcptrace-soak-{}", std::process::id()))?;
    let dir = std::env::temp_dir().join(format!("tcptrace-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // The default format, as a recorder left running under its unit writes.
    let file = dir.join("soak.tcpt");

    let (mut tracer, stderr) = start_tracer(&release, &ns, &file)?;
    let pid = tracer.id();
    eprintln!("xtask: soaking for {minutes} minutes");
    let (churn_json, rss) = churn_sampling_rss(&release, &ns, minutes * 60.0, clients, pid)?;
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: signalling our own child.
    unsafe { kill(pid as i32, 2) };
    let status = tracer.wait()?;
    let stderr = stderr.join().expect("stderr thread");

    let outcome = Outcome::new(&churn_json, &stderr, rss)?;
    let recording = read_back(&release, &dir, &file)?;
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "soak: {minutes} minutes, {} connections",
        json_u64(&churn_json, "connections").unwrap_or(0)
    );
    print_figures(&outcome, &recording, &stderr);
    let failures = failures(&outcome, &recording, status, &stderr);
    if failures.is_empty() {
        println!("soak: PASS");
        Ok(())
    } else {
        bail!("soak failed:\n  {}", failures.join("\n  "))
    }
}

fn json_u64(text: &str, key: &str) -> Option<u64> {
    json_number(text, key).map(|n| n as u64)
}

/// Starts tcptrace recording the namespace's port into rotating files and
/// waits until it traces; the thread gathering its stderr.
fn start_tracer(release: &Path, ns: &Netns, file: &Path) -> Result<(Child, JoinHandle<String>)> {
    let mut tracer = Command::new(release.join("tcptrace"))
        .args([
            "--port",
            &PORT.to_string(),
            "--netns",
            &format!("/run/netns/{}", ns.0),
        ])
        .args([
            "-q",
            "--no-snapshot",
            "--no-timewait",
            "--rotate-size",
            "64M",
            "--rotate-keep",
            "10000",
        ])
        .arg("-w")
        .arg(file)
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start tcptrace")?;
    let (tx, rx) = mpsc::channel();
    let err = tracer.stderr.take().expect("piped");
    let stderr = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.starts_with("tcptrace: tracing") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(60))
        .context("tcptrace did not start")?;
    Ok((tracer, stderr))
}

/// Runs the churn for `seconds`, sampling the tracer's RSS every
/// [`SAMPLE_EVERY`]: what tt-churn printed (JSON) and the samples.
fn churn_sampling_rss(
    release: &Path,
    ns: &Netns,
    seconds: f64,
    clients: u32,
    pid: u32,
) -> Result<(String, Vec<u64>)> {
    let churn = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(release.join("tt-churn"))
        .args([
            "--seconds",
            &seconds.to_string(),
            "--port",
            &PORT.to_string(),
        ])
        .args(["--clients", &clients.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start tt-churn")?;
    let started = Instant::now();
    let mut rss = Vec::new();
    let churn_out = std::thread::spawn(move || churn.wait_with_output());
    while !churn_out.is_finished() {
        std::thread::sleep(SAMPLE_EVERY.min(Duration::from_secs(1)));
        if rss.len() as u64 <= started.elapsed().as_secs() / SAMPLE_EVERY.as_secs() {
            rss.push(rss_kb(pid).unwrap_or(0));
        }
    }
    let churn = churn_out.join().expect("churn thread")?;
    Ok((String::from_utf8_lossy(&churn.stdout).into_owned(), rss))
}

/// The transitions expected, what tcptrace said of them, and its memory.
struct Outcome {
    expected: u64,
    shown: u64,
    lost: u64,
    missed: u64,
    gaps: u64,
    rss: Vec<u64>,
    /// Peak RSS in the first half of the run, and in the second.
    first: u64,
    second: u64,
}

impl Outcome {
    fn new(churn_json: &str, stderr: &str, rss: Vec<u64>) -> Result<Outcome> {
        let expected =
            json_u64(churn_json, "expected_transitions").context("tt-churn said no count")?;
        let StatsLine {
            shown,
            lost,
            missed,
            gaps,
            ..
        } = stderr
            .lines()
            .find_map(parse_stats_line)
            .context("tcptrace printed no stats line")?;
        let missed = missed.unwrap_or(0);
        let half = rss.len() / 2;
        let first = rss[..half.max(1)].iter().copied().max().unwrap_or(0);
        let second = rss[half..].iter().copied().max().unwrap_or(0);
        Ok(Outcome {
            expected,
            shown,
            lost,
            missed,
            gaps,
            rss,
            first,
            second,
        })
    }

    /// Transitions neither shown nor counted as skipped by the kernel.
    fn unaccounted(&self) -> u64 {
        self.expected
            .saturating_sub(self.shown.saturating_add(self.missed))
    }
}

/// The recording, read back whole by `tcptrace report`.
struct ReadBack {
    read: Output,
    /// The transitions it holds, by the report.
    recorded: Option<u64>,
    /// Its newest file ends with the stats record of a clean end.
    clean: bool,
    files: usize,
}

/// The whole rotation set reads back, every transition shown is in it,
/// and its newest file ends with the stats record of a clean end.
fn read_back(release: &Path, dir: &Path, file: &Path) -> Result<ReadBack> {
    let mut set: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().starts_with(&*file.to_string_lossy()))
        .collect();
    set.sort();
    let read = Command::new(release.join("tcptrace"))
        .arg("report")
        .args(&set)
        .args(["--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()?;
    let report = String::from_utf8_lossy(&read.stdout).into_owned();
    let recorded = json_u64(&report, "events");
    let clean = report
        .split_once("\"ended_cleanly\"")
        .is_some_and(|(_, rest)| rest.trim_start_matches([':', ' ']).starts_with("true"));
    Ok(ReadBack {
        read,
        recorded,
        clean,
        files: set.len(),
    })
}

fn print_figures(o: &Outcome, recording: &ReadBack, stderr: &str) {
    let Outcome {
        expected,
        shown,
        lost,
        missed,
        gaps,
        ref rss,
        first,
        second,
    } = *o;
    println!("  expected transitions   {expected}");
    if let Some(line) = stderr
        .lines()
        .find(|l| l.contains(" filtered, ") && l.contains(" lost, "))
    {
        println!("  tcptrace said          {line}");
    }
    println!("  shown                  {shown}");
    println!("  lost (ring full)       {lost}");
    println!("  missed (kernel skip)   {missed}");
    let unaccounted = o.unaccounted();
    println!(
        "  unaccounted            {unaccounted} ({:.4}%)",
        unaccounted as f64 * 100.0 / expected.max(1) as f64
    );
    println!("  sockets with gaps      {gaps} (where the unaccounted ones went missing)");
    println!(
        "  recorded (read back)   {} in {} files",
        recording.recorded.map_or("-".into(), |n| n.to_string()),
        recording.files,
    );
    println!("  RSS max, first half    {} KiB", first);
    println!("  RSS max, second half   {} KiB", second);
    println!("  RSS samples (KiB)      {rss:?}");
}

/// What a long unattended run must keep true, and did not.
fn failures(o: &Outcome, recording: &ReadBack, status: ExitStatus, stderr: &str) -> Vec<String> {
    let Outcome {
        expected,
        shown,
        lost,
        missed,
        first,
        second,
        ..
    } = *o;
    let ReadBack {
        ref read,
        recorded,
        clean,
        ..
    } = *recording;
    let mut failures = Vec::new();
    if !status.success() {
        failures.push(format!("tcptrace exited {status}: {stderr}"));
    }
    if lost != 0 {
        failures.push(format!("{lost} transitions lost: the ring buffer was full"));
    }
    // Not shown + missed > expected: "missed" counts the kernel's skips of
    // the main program, and a skipped transition that the socket callback
    // had already emitted counts there too (the bench's "unaccounted" goes
    // negative by as many): a few in ten million, with every one shown.
    if shown > expected || o.unaccounted() as f64 > expected as f64 * UNACCOUNTED_MAX {
        failures.push(format!(
            "shown {shown} + missed {missed} vs expected {expected}"
        ));
    }
    if second > first + RSS_SLACK_KB {
        failures.push(format!("RSS grew from {first} KiB to {second} KiB"));
    }
    if !read.status.success() || !read.stderr.is_empty() {
        failures.push(format!(
            "the recording did not report cleanly: {}",
            String::from_utf8_lossy(&read.stderr)
        ));
    }
    if recorded != Some(shown) {
        failures.push(format!(
            "the recording holds {recorded:?} transitions, {shown} were shown"
        ));
    }
    if !clean {
        failures.push("the recording does not end with the stats of a clean end".into());
    }
    failures
}

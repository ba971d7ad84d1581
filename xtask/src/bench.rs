//! `cargo xtask bench`: how much tcptrace costs and whether it loses
//! anything at the fastest connection churn this machine reaches, side by
//! side with the same churn untraced and with libbpf-tools `tcpstates`.
//!
//! Each round runs every configuration once, interleaved (untraced,
//! attached, text, record, tcpstates; and record-json, JSON Lines, when
//! asked for), so that a slow period of a noisy VM hits them alike. `attached` is tcptrace with a port filter no churn
//! socket matches: every program runs for every transition and the kernel
//! dispatches them, but nothing is emitted and userspace has nothing to
//! do. Between untraced and text it splits the cost of tracing into the
//! probes' and the events'.
//! Each run: start the tracer, wait until it is attached, run `tt-churn` in
//! a fresh network namespace, wait until the tracer has caught up (its CPU
//! time stops growing), read its BPF program statistics, CPU time and peak
//! RSS from /proc, stop it with SIGINT and read its closing stats line.
//! Then `tcptrace read` and `tcptrace report` go through the largest
//! recording (the default binary format), timed, with their peak RSS from
//! wait4, and through the same events converted to JSON Lines (`tcptrace
//! read -w FILE.jsonl`): the two formats side by side.
//!
//! On 2 CPUs any other work skews everything: a run starts once the machine
//! has been idle for a second, and a run during which another tcptrace or
//! tcpstates was running (their programs run on every transition too) is
//! repeated (`--retries`); what stays disturbed is flagged in the output.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Where Debian's libbpf-tools puts tcpstates.
const TCPSTATES: &str = "/usr/sbin/tcpstates";
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// Time for a deleted namespace's sockets to be freed before the next run.
const SETTLE: Duration = Duration::from_secs(2);
/// tcpstates prints nothing when attached (its stdout is a file, buffered).
const TCPSTATES_START: Duration = Duration::from_secs(1);
const READY_LIMIT: Duration = Duration::from_secs(60);
const STOP_LIMIT: Duration = Duration::from_secs(60);
/// How long a tracer may take to catch up with the ring after the churn.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(20);
/// A run starts once the machine is this idle (other work skews every
/// figure on 2 CPUs), or after QUIET_LIMIT with a warning.
const QUIET_BUSY: f64 = 0.10;
const QUIET_LIMIT: Duration = Duration::from_secs(120);

/// Goals the figures are held against.
const GOAL_RATE_RATIO: f64 = 0.85;
const GOAL_BPF_NS: f64 = 300.0;
const GOAL_USER_NS: f64 = 500.0;
const GOAL_OFFLINE_EPS: f64 = 1e6;
/// The binary recording against JSON Lines, same events: read and report
/// at least this many times as fast...
const GOAL_BINARY_SPEEDUP: f64 = 3.0;
/// ... in at most this many bytes a transition.
const GOAL_BYTES_PER_EVENT: f64 = 64.0;
/// Recording may cost the churn at most this much more than printing text
/// (a share of untraced conn/s).
const GOAL_RECORD_VS_TEXT: f64 = 0.03;
/// "Far ahead of tcpstates": at least this many times its traced rate.
const GOAL_VS_TCPSTATES: f64 = 2.0;

const MODES: [&str; 3] = ["client-closes-first", "server-closes-first", "reset"];
/// `record` writes the default (binary) format; `record-json` JSON Lines
/// (not run unless asked for with --configs: the format before the binary
/// one, for comparison).
/// `NAME@base`: the same configuration with the build of `--against`.
pub const CONFIGS: [&str; 9] = [
    "untraced",
    "attached",
    "attached@base",
    "text",
    "text@base",
    "record",
    "record@base",
    "record-json",
    "tcpstates",
];
/// A change may cost the churn at most this much against the build it is
/// compared with (`--against`), as a share of untraced conn/s.
const GOAL_VS_BASE: f64 = 0.02;
/// The port `attached` filters on: no churn socket uses it (`--port` may
/// not be this one, and the clients' ports are ephemeral), so the programs
/// run for every transition and drop each at the filter.
const UNUSED_PORT: u16 = 9;

pub struct Options {
    pub seconds: f64,
    pub rounds: u32,
    pub mode: String,
    pub json: PathBuf,
    pub port: u16,
    pub clients: u32,
    pub acceptors: u32,
    pub configs: Vec<String>,
    pub retries: u32,
    /// The tcptrace to compare with (`--against REV`, built beforehand).
    pub baseline: Option<PathBuf>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

unsafe extern "C" {
    pub(crate) fn kill(pid: i32, sig: i32) -> i32;
    fn signal(sig: i32, handler: usize) -> usize;
    fn sysconf(name: i32) -> i64;
    fn wait4(pid: i32, status: *mut i32, options: i32, rusage: *mut Rusage) -> i32;
}

const SIGINT: i32 = 2;
const SIGKILL: i32 = 9;
const SC_CLK_TCK: i32 = 2;

/// struct rusage on 64-bit Linux: two timevals, then fourteen longs.
#[repr(C)]
#[derive(Default)]
struct Rusage {
    utime: [i64; 2],
    stime: [i64; 2],
    maxrss_kb: i64,
    rest: [i64; 13],
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// One run of one configuration.
#[derive(Clone, Debug, Default)]
struct Sample {
    config: String,
    round: u32,
    connections: u64,
    seconds: f64,
    /// Connections made before [`RATE_UNTIL`] of the run, and when that was.
    rate_connections: u64,
    rate_seconds: f64,
    expected: u64,
    failed_connects: u64,
    /// Transitions the tracer reported for the churn's port.
    captured: Option<u64>,
    /// Kernel-filtered transitions (other traffic on the host).
    filtered: Option<u64>,
    ring_lost: Option<u64>,
    /// What tcptrace itself says the kernel missed, when it says so.
    reported_missed: Option<u64>,
    /// Sockets tcptrace found with gaps in their history: transitions that
    /// never arrived, whatever the cause.
    gaps: Option<u64>,
    /// Transitions the kernel skipped the tracer for (its programs'
    /// `recursion_misses`) and that nothing recovered: tcptrace's own
    /// figure; tcpstates' program count.
    recursion_misses: Option<u64>,
    /// Runs of tcptrace's programs the kernel skipped whose transition was
    /// emitted anyway (by the catcher, or by the main program when the
    /// catcher was the one skipped): all their `recursion_misses` minus
    /// what tcptrace reports missed.
    caught: Option<u64>,
    /// Programs the tracer holds.
    programs: Option<u64>,
    /// Share of all CPUs busy during the second before the run.
    busy_before: f64,
    /// Other tcptrace or tcpstates processes seen before or right after the
    /// churn (their programs run on every transition too).
    other_tracers: Vec<u32>,
    /// Attempts made for this sample (runs disturbed by other work are
    /// repeated, up to `--retries` times).
    attempts: u32,
    bpf_run_ns: Option<u64>,
    bpf_run_cnt: Option<u64>,
    /// Runs of all the tracer's programs.
    bpf_runs_total: Option<u64>,
    /// What the statistics themselves add to each program run (an empty
    /// program's run time), measured once per bench.
    stats_floor_ns: Option<f64>,
    /// utime + stime of the tracer just before SIGINT.
    cpu_ns: Option<u64>,
    /// ... of which in the kernel (stime).
    sys_ns: Option<u64>,
    /// ... of which spent before it was attached and ready.
    startup_cpu_ns: Option<u64>,
    rss_kb: Option<u64>,
    recording_bytes: Option<u64>,
    recording_events: Option<u64>,
}

impl Sample {
    /// Connections per second before BPF statistics were turned on.
    fn rate(&self) -> f64 {
        self.rate_connections as f64 / self.rate_seconds
    }
    fn missing(&self) -> Option<i64> {
        self.captured.map(|c| self.expected as i64 - c as i64)
    }
    /// Missing transitions neither the ring nor the recursion guard explain.
    fn unaccounted(&self) -> Option<i64> {
        Some(
            self.missing()?
                - self.ring_lost.unwrap_or(0) as i64
                - self.recursion_misses.unwrap_or(0) as i64,
        )
    }
    fn bpf_ns_per_event(&self) -> Option<f64> {
        let cnt = self.bpf_run_cnt.filter(|&c| c > 0)?;
        Some(self.bpf_run_ns? as f64 / cnt as f64)
    }
    /// BPF time per event without the statistics' own cost.
    fn bpf_ns_less_stats(&self) -> Option<f64> {
        let cnt = self.bpf_run_cnt.filter(|&c| c > 0)?;
        let own = self.stats_floor_ns? * self.bpf_runs_total? as f64;
        Some((self.bpf_run_ns? as f64 - own) / cnt as f64)
    }
    fn user_ns_per_event(&self) -> Option<f64> {
        let events = self.captured.filter(|&c| c > 0)?;
        Some(self.cpu_ns? as f64 / events as f64)
    }
    fn sys_ns_per_event(&self) -> Option<f64> {
        let events = self.captured.filter(|&c| c > 0)?;
        Some(self.sys_ns? as f64 / events as f64)
    }
}

struct Offline {
    /// "binary" or "JSON Lines".
    format: &'static str,
    /// "read" or "report".
    what: &'static str,
    command: String,
    events: u64,
    bytes: u64,
    wall_s: f64,
    cpu_s: f64,
    maxrss_kb: u64,
    ok: bool,
}

impl Offline {
    fn eps(&self) -> f64 {
        self.events as f64 / self.wall_s
    }
}

struct Env {
    root: PathBuf,
    tcptrace: PathBuf,
    /// The build the `@base` configurations run.
    baseline: Option<PathBuf>,
    churn: PathBuf,
    tcpstates: Option<PathBuf>,
    clk_tck: u64,
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    if !super::is_root() {
        bail!("the bench loads eBPF programs and creates network namespaces: run it as root");
    }
    if !(opts.seconds >= 1.0 && opts.seconds <= 3600.0) {
        bail!("--seconds must be from 1 to 3600");
    }
    if !(1..=100).contains(&opts.rounds) {
        bail!("--rounds must be from 1 to 100");
    }
    if !MODES.contains(&opts.mode.as_str()) {
        bail!("unknown mode {:?}; known: {}", opts.mode, MODES.join(", "));
    }
    for c in &opts.configs {
        if !CONFIGS.contains(&c.as_str()) {
            bail!("unknown configuration {c:?}; known: {}", CONFIGS.join(", "));
        }
    }
    if opts.baseline.is_none() && opts.configs.iter().any(|c| c.ends_with("@base")) {
        bail!("the @base configurations run the build of --against REV: give one");
    }
    if opts.port == UNUSED_PORT && opts.configs.iter().any(|c| c.starts_with("attached")) {
        bail!(
            "--port {UNUSED_PORT} is the port the attached configuration filters on, which the \
             churn must not use: pick another port"
        );
    }
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe { signal(SIGINT, on_sigint as extern "C" fn(i32) as usize) };
    let env = Env {
        root: root.to_path_buf(),
        // Another build to compare (for example the last release's).
        tcptrace: std::env::var_os("TCPTRACE_BENCH_BIN")
            .map_or_else(|| root.join("target/release/tcptrace"), PathBuf::from),
        baseline: opts.baseline.clone(),
        churn: root.join("target/release/tt-churn"),
        tcpstates: if opts.configs.iter().any(|c| c == "tcpstates") {
            find_tcpstates()
        } else {
            None
        },
        // SAFETY: sysconf has no preconditions.
        clk_tck: match unsafe { sysconf(SC_CLK_TCK) } {
            t if t > 0 => t as u64,
            _ => 100,
        },
    };
    for bin in [&env.tcptrace, &env.churn] {
        if !bin.exists() {
            bail!("{} is missing: build it first", bin.display());
        }
    }
    remove_stale_namespaces();
    let _stats = BpfStats::take()?;
    println!("{}", describe_machine(opts));
    let others = other_tracers(None);
    if !others.is_empty() {
        println!(
            "warning: other tracers are running (pids {others:?}): their programs run on every \
             transition too and skew the figures"
        );
    }

    let mut samples: Vec<Sample> = Vec::new();
    let mut kept: Option<TempFile> = None;
    for round in 1..=opts.rounds {
        for config in CONFIGS {
            if !opts.configs.iter().any(|c| c == config) {
                continue;
            }
            if config == "tcpstates" && env.tcpstates.is_none() {
                continue;
            }
            let mut attempt = 0;
            let (sample, recording) = loop {
                attempt += 1;
                check_interrupted()?;
                thread::sleep(SETTLE);
                let busy = wait_quiet()?;
                let before = other_tracers(None);
                let (mut sample, recording) = run_one(&env, opts, config, round, opts.seconds)
                    .with_context(|| format!("round {round}, {config}"))?;
                sample.busy_before = busy;
                sample.other_tracers.extend(before);
                sample.other_tracers.sort_unstable();
                sample.other_tracers.dedup();
                sample.attempts = attempt;
                let disturbed = busy > QUIET_BUSY || !sample.other_tracers.is_empty();
                if !disturbed || attempt > opts.retries {
                    break (sample, recording);
                }
                println!(
                    "{} -- disturbed by other work, run again",
                    sample_line(&sample, opts.rounds)
                );
            };
            println!("{}", sample_line(&sample, opts.rounds));
            // Keep only the largest binary recording, for the offline
            // measurements (which convert it to JSON Lines themselves).
            if let Some(rec) = recording.filter(|_| config == "record") {
                let size = file_size(&rec.0);
                if kept.as_ref().is_none_or(|k| file_size(&k.0) < size) {
                    kept = Some(rec);
                }
            }
            samples.push(sample);
        }
    }
    if samples.iter().any(|s| s.bpf_run_ns.is_some()) {
        check_interrupted()?;
        match stats_floor(&env, opts) {
            Ok((floor, runs)) => {
                println!(
                    "statistics' own cost: an empty program on the tracepoint measured {floor:.1} \
                     ns per run ({runs} runs)"
                );
                for s in &mut samples {
                    s.stats_floor_ns = Some(floor);
                }
            }
            Err(e) => println!("note: the statistics' own cost was not measured: {e:#}"),
        }
    }
    if env.tcpstates.is_none() && opts.configs.iter().any(|c| c == "tcpstates") {
        println!(
            "note: tcpstates skipped: {TCPSTATES} is missing and libbpf-tools could not be installed"
        );
    }

    check_interrupted()?;
    let offline = if opts.configs.iter().any(|c| c == "record") || kept.is_some() {
        if kept.is_none() {
            eprintln!("xtask: recording a 10 s churn for the offline measurements");
            let (_, rec) = run_one(&env, opts, "record", 0, 10.0)?;
            kept = rec;
        }
        match &kept {
            Some(rec) => offline(&env, &rec.0)?,
            None => Vec::new(),
        }
    } else {
        Vec::new()
    };
    drop(kept);

    let report = summarize(&samples, &offline, opts);
    print!("{}", report.text);
    if let Some(dir) = opts.json.parent() {
        fs::create_dir_all(dir).ok();
    }
    fs::write(&opts.json, report.json)
        .with_context(|| format!("cannot write {}", opts.json.display()))?;
    println!("figures written to {}", opts.json.display());
    Ok(())
}

/// The statistics' own cost per program run, and the runs it was measured
/// over: an empty program on the tracepoint, timed by the same statistics
/// over the same churn, with no tracer.
fn stats_floor(env: &Env, opts: &Options) -> Result<(f64, u64)> {
    let ns = Netns::new(format!("tcptrace-bench-{}", std::process::id()))?;
    let empty = crate::floor::EmptyProgram::attach("inet_sock_set_state")?;
    run_churn(env, opts, &ns, opts.seconds.min(10.0))?;
    let (time, runs) = empty.stats()?;
    if runs == 0 {
        bail!("the empty program never ran");
    }
    Ok((time as f64 / runs as f64, runs))
}

/// CPU time of all CPUs from /proc/stat: (busy, total), in ticks.
fn cpu_ticks() -> Result<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("no cpu line in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// Share of the machine busy over `d`.
fn busy_over(d: Duration) -> Result<f64> {
    let (b0, t0) = cpu_ticks()?;
    thread::sleep(d);
    let (b1, t1) = cpu_ticks()?;
    Ok(if t1 > t0 {
        (b1 - b0) as f64 / (t1 - t0) as f64
    } else {
        0.0
    })
}

/// Namespaces of benches that were killed before they could clean up.
fn remove_stale_namespaces() {
    let Ok(dir) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("tcptrace-bench-") else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Pids of tcptrace and tcpstates processes but `ours`.
fn other_tracers(ours: Option<i32>) -> Vec<u32> {
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

/// Waits until the machine is quiet; returns how busy it was last.
fn wait_quiet() -> Result<f64> {
    let deadline = Instant::now() + QUIET_LIMIT;
    let mut warned = false;
    loop {
        check_interrupted()?;
        let busy = busy_over(Duration::from_secs(1))?;
        if busy <= QUIET_BUSY {
            return Ok(busy);
        }
        if Instant::now() > deadline {
            println!(
                "warning: the machine is {:.0}% busy with other work; measuring anyway (figures skewed)",
                busy * 100.0
            );
            return Ok(busy);
        }
        if !warned {
            eprintln!(
                "xtask: waiting for the machine to be quiet ({:.0}% busy with other work)",
                busy * 100.0
            );
            warned = true;
        }
    }
}

fn describe_machine(opts: &Options) -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "tcptrace bench: {} x {} s per configuration, mode {}, churn {} client + {} acceptor threads \
         on port {}, kernel {}, {cpus} CPUs",
        opts.rounds,
        opts.seconds,
        opts.mode,
        opts.clients,
        opts.acceptors,
        opts.port,
        kernel.trim()
    )
}

/// tcpstates, installing libbpf-tools with apt when it is missing.
fn find_tcpstates() -> Option<PathBuf> {
    let path = PathBuf::from(TCPSTATES);
    if path.exists() {
        return Some(path);
    }
    if !super::which("apt-get") {
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

/// kernel.bpf_stats_enabled, which the bench turns on only for the last
/// part of each churn ([`STATS_FROM`]): run_time_ns and run_cnt are only
/// counted then, and its two clock reads per program run would slow the
/// workload whose rate is measured. Off from the start, restored on drop.
struct BpfStats {
    before: String,
}

/// Where in a churn run BPF statistics start: its last third.
const STATS_FROM: f64 = 2.0 / 3.0;

/// Where in a churn run its rate is taken (from the start to here): before
/// [`STATS_FROM`] by a margin far wider than the churn's start-up, so that
/// the statistics' clock reads never slow the rate measured.
const RATE_UNTIL: f64 = 0.6;

impl BpfStats {
    fn take() -> Result<BpfStats> {
        let before = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("cannot read {BPF_STATS}"))?
            .trim()
            .to_string();
        BpfStats::set(false)?;
        Ok(BpfStats { before })
    }

    fn set(on: bool) -> Result<()> {
        fs::write(BPF_STATS, if on { "1" } else { "0" })
            .with_context(|| format!("cannot write {BPF_STATS}"))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, &self.before);
    }
}

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

/// A file removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A tracer process, killed on drop if it is still running.
struct Tracer {
    child: Child,
    stderr: mpsc::Receiver<String>,
    lines: Vec<String>,
}

impl Tracer {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The stderr lines so far, waiting up to `limit` for one that starts
    /// with `prefix` (None: just collect).
    fn wait_line(&mut self, prefix: Option<&str>, limit: Duration) -> Result<bool> {
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
    fn stop(mut self) -> Result<Vec<String>> {
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

fn spawn_tracer(mut cmd: Command) -> Result<Tracer> {
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

fn run_one(
    env: &Env,
    opts: &Options,
    config: &str,
    round: u32,
    seconds: f64,
) -> Result<(Sample, Option<TempFile>)> {
    let tag = format!("{}-{round}-{config}", std::process::id());
    let port = opts.port.to_string();
    let mut recording = None;
    let mut tcpstates_out = None;
    // The same configuration, run by the build compared with.
    let label = config;
    let (config, tcptrace) = match config.strip_suffix("@base") {
        Some(c) => (c, env.baseline.as_ref().expect("checked in run")),
        None => (config, &env.tcptrace),
    };
    let mut tracer = match config {
        "untraced" => None,
        "attached" => {
            let mut cmd = Command::new(tcptrace);
            cmd.args(["--port", &UNUSED_PORT.to_string()])
                .stdout(Stdio::null());
            Some(spawn_tracer(cmd)?)
        }
        "text" => {
            let mut cmd = Command::new(tcptrace);
            cmd.args(["--port", &port]).stdout(Stdio::null());
            Some(spawn_tracer(cmd)?)
        }
        "record" | "record-json" => {
            // The default format (binary), or JSON Lines by the file name.
            let ext = if config == "record" { "tcpt" } else { "jsonl" };
            let file = TempFile(std::env::temp_dir().join(format!("tcptrace-bench-{tag}.{ext}")));
            let _ = fs::remove_file(&file.0);
            let mut cmd = Command::new(tcptrace);
            cmd.args(["--port", &port, "-q", "-w"])
                .arg(&file.0)
                .stdout(Stdio::null());
            recording = Some(file);
            Some(spawn_tracer(cmd)?)
        }
        "tcpstates" => {
            // Its -L and -D filters must both match, so no one of them
            // selects both ends of a connection: it traces everything and
            // the lines of the churn's port are counted afterwards.
            let file = TempFile(std::env::temp_dir().join(format!("tcptrace-bench-{tag}.txt")));
            let out = File::create(&file.0)
                .with_context(|| format!("cannot create {}", file.0.display()))?;
            let mut cmd = Command::new(env.tcpstates.as_ref().expect("checked"));
            cmd.stdout(out);
            tcpstates_out = Some(file);
            Some(spawn_tracer(cmd)?)
        }
        _ => unreachable!("configurations are checked"),
    };

    let mut startup_cpu = None;
    if let Some(t) = &mut tracer {
        if config == "tcpstates" {
            t.wait_line(None, TCPSTATES_START)?;
        } else if !t.wait_line(Some("tcptrace: tracing"), READY_LIMIT)? {
            bail!(
                "tcptrace did not start tracing: {}",
                t.lines.join("\n").trim()
            );
        }
        if let Some(st) = t.child.try_wait()? {
            bail!("the tracer exited ({st}): {}", t.lines.join("\n").trim());
        }
        startup_cpu = Some(cpu_ns(t.pid(), env.clk_tck)?);
    }

    let churn = {
        let ns = Netns::new(format!("tcptrace-bench-{}", std::process::id()))?;
        run_churn(env, opts, &ns, seconds)?
    };
    let others = other_tracers(tracer.as_ref().map(Tracer::pid));

    let mut sample = Sample {
        config: label.into(),
        round,
        connections: churn.connections,
        seconds: churn.seconds,
        rate_connections: churn.mark_connections,
        rate_seconds: churn.mark_seconds,
        expected: churn.expected,
        failed_connects: churn.failed_connects,
        other_tracers: others,
        ..Sample::default()
    };
    let Some(mut t) = tracer else {
        return Ok((sample, None));
    };

    // Let the tracer catch up with the ring before its CPU time is read.
    let pid = t.pid();
    let mut cpu = cpu_ns(pid, env.clk_tck)?;
    let deadline = Instant::now() + CATCH_UP_LIMIT;
    loop {
        thread::sleep(Duration::from_millis(200));
        check_interrupted()?;
        let now = cpu_ns(pid, env.clk_tck)?;
        if now == cpu || Instant::now() > deadline {
            break;
        }
        cpu = now;
    }
    let prog = prog_stats(pid)?;
    let (user, sys) = cpu_split(pid, env.clk_tck)?;
    sample.cpu_ns = Some(user + sys);
    sample.sys_ns = Some(sys);
    sample.startup_cpu_ns = startup_cpu;
    sample.rss_kb = status_kb(pid, "VmHWM:");
    sample.bpf_run_ns = Some(prog.run_time_ns);
    sample.bpf_run_cnt = Some(prog.run_cnt);
    sample.bpf_runs_total = Some(prog.runs_total);
    sample.programs = Some(prog.programs);
    t.wait_line(None, Duration::ZERO)?;
    let lines = t.stop()?;

    if config == "tcpstates" {
        sample.recursion_misses = Some(prog.recursion_misses);
        let out = tcpstates_out.expect("set for tcpstates");
        sample.captured = Some(count_tcpstates_lines(&out.0, opts.port)?);
        sample.ring_lost = Some(
            lines
                .iter()
                .filter_map(|l| l.strip_prefix("lost "))
                .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                .sum(),
        );
    } else {
        let stats = lines
            .iter()
            .rev()
            .find_map(|l| parse_stats_line(l))
            .ok_or_else(|| {
                anyhow!(
                    "tcptrace printed no stats line: {}",
                    lines.join("\n").trim()
                )
            })?;
        sample.filtered = Some(stats.filtered);
        sample.ring_lost = Some(stats.lost);
        // `attached` captures nothing by design: nothing is missing, and
        // its catcher counts what it drops as filtered, not caught.
        if config != "attached" {
            sample.captured = Some(stats.shown);
            sample.reported_missed = stats.missed;
            sample.gaps = Some(stats.gaps);
            // tcptrace's programs skip each other's nested runs by design;
            // what it reports is what its catcher did not recover.
            let missed = stats.missed.unwrap_or(prog.recursion_misses);
            sample.recursion_misses = Some(missed);
            sample.caught = Some(prog.recursion_misses.saturating_sub(missed));
        }
    }
    if let Some(rec) = &recording {
        sample.recording_bytes = Some(file_size(&rec.0));
        sample.recording_events = recording_events(&rec.0);
    }
    Ok((sample, recording))
}

struct Churn {
    connections: u64,
    seconds: f64,
    mark_connections: u64,
    mark_seconds: f64,
    expected: u64,
    failed_connects: u64,
}

fn run_churn(env: &Env, opts: &Options, ns: &Netns, seconds: f64) -> Result<Churn> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(&env.churn)
        .args(["--mode", &opts.mode, "--seconds", &seconds.to_string()])
        .args(["--mark", &(seconds * RATE_UNTIL).to_string()])
        .args(["--port", &opts.port.to_string()])
        .args(["--clients", &opts.clients.to_string()])
        .args(["--acceptors", &opts.acceptors.to_string()])
        .current_dir(&env.root)
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
            "transitions" => shown = shown.or(n),
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
fn count_tcpstates_lines(path: &Path, port: u16) -> Result<u64> {
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

#[derive(Default)]
struct ProgStats {
    programs: u64,
    /// Summed over the programs.
    run_time_ns: u64,
    recursion_misses: u64,
    /// Of the tracepoint program that ran most: one runs for every
    /// transition (tcptrace's catcher, tcpstates' only program); the reset
    /// programs run at most once per connection. tcptrace's socket callback
    /// runs for other socket events too, so it is not a measure of them.
    run_cnt: u64,
    /// Runs of all of them.
    runs_total: u64,
}

/// The BPF programs a process holds, from /proc/PID/fdinfo: run time of all
/// of them, per run of the busiest.
fn prog_stats(pid: i32) -> Result<ProgStats> {
    let mut s = ProgStats::default();
    let dir = format!("/proc/{pid}/fd");
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        let entry = entry?;
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_string_lossy() != "anon_inode:bpf-prog" {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(text) = fs::read_to_string(&info) else {
            continue;
        };
        s.programs += 1;
        let field = |key: &str| fdinfo_field(&text, key).unwrap_or(0);
        s.run_time_ns += field("run_time_ns");
        s.recursion_misses += field("recursion_misses");
        s.runs_total += field("run_cnt");
        const BPF_PROG_TYPE_SOCK_OPS: u64 = 13;
        if field("prog_type") != BPF_PROG_TYPE_SOCK_OPS {
            s.run_cnt = s.run_cnt.max(field("run_cnt"));
        }
    }
    if s.programs == 0 {
        bail!("process {pid} holds no BPF program");
    }
    Ok(s)
}

/// A number of a BPF program's fdinfo (`run_cnt:\t42`).
pub(crate) fn fdinfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// utime + stime of a process, in ns.
fn cpu_ns(pid: i32, clk_tck: u64) -> Result<u64> {
    cpu_split(pid, clk_tck).map(|(u, s)| u + s)
}

/// (utime, stime) of a process, in ns.
fn cpu_split(pid: i32, clk_tck: u64) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // Fields after the command name (which may hold spaces and parens):
    // state is field 3, utime 14, stime 15.
    let after = &stat[stat.rfind(')').ok_or_else(|| anyhow!("bad {path}"))? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| anyhow!("bad {path}"))
    };
    let ns = |t: u64| t * 1_000_000_000 / clk_tck;
    Ok((ns(ticks(11)?), ns(ticks(12)?)))
}

/// A "Key:   N kB" line of /proc/PID/status.
fn status_kb(pid: i32, key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn file_size(p: &Path) -> u64 {
    fs::metadata(p).map_or(0, |m| m.len())
}

/// Events of a recording, from its closing stats record: a JSON object in
/// either format (in the binary one, inside the last chunk).
fn recording_events(p: &Path) -> Option<u64> {
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
fn offline(env: &Env, rec: &Path) -> Result<Vec<Offline>> {
    let json = TempFile(rec.with_extension("jsonl"));
    let _ = fs::remove_file(&json.0);
    run_quiet(
        Command::new(&env.tcptrace)
            .arg("read")
            .arg(rec)
            .arg("-w")
            .arg(&json.0),
    )?;
    let mut out = Vec::new();
    for (format, file) in [("JSON Lines", &json.0), ("binary", &rec.to_path_buf())] {
        out.extend(offline_one(env, format, file)?);
    }
    Ok(out)
}

fn offline_one(env: &Env, format: &'static str, rec: &Path) -> Result<Vec<Offline>> {
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
        let mut child = Command::new(&env.tcptrace)
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

fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

// ---- figures ----

fn sample_line(s: &Sample, rounds: u32) -> String {
    let mut l = format!(
        "round {}/{rounds} {:<9} {:>7} conn/s, {} connections in {:.2} s, {} transitions expected",
        s.round,
        s.config,
        group(s.rate()),
        group(s.connections as f64),
        s.seconds,
        group(s.expected as f64),
    );
    if !s.other_tracers.is_empty() {
        let _ = write!(l, " [other tracers running: pids {:?}]", s.other_tracers);
    }
    if s.busy_before > QUIET_BUSY {
        let _ = write!(l, " [machine {:.0}% busy before]", s.busy_before * 100.0);
    }
    if s.failed_connects > 0 {
        let _ = write!(l, " ({} failed connects)", s.failed_connects);
    }
    if let Some(c) = s.captured {
        let _ = write!(
            l,
            ", captured {} (missing {}: {} recursion misses, {} ring drops)",
            group(c as f64),
            s.missing().unwrap_or(0),
            s.recursion_misses.unwrap_or(0),
            s.ring_lost.unwrap_or(0)
        );
        if let Some(caught) = s.caught.filter(|&c| c > 0) {
            let _ = write!(l, " ({caught} skipped by the kernel, emitted anyway)");
        }
    }
    if let Some(b) = s.bpf_ns_per_event() {
        let _ = write!(l, ", BPF {b:.0} ns/ev");
    }
    if let Some(u) = s.user_ns_per_event() {
        let _ = write!(
            l,
            ", user {u:.0} ns/ev ({:.0} system)",
            s.sys_ns_per_event().unwrap_or(0.0)
        );
    }
    if let Some(r) = s.rss_kb {
        let _ = write!(l, ", RSS {:.1} MiB", r as f64 / 1024.0);
    }
    l
}

/// 1234567 -> "1,234,567"
fn group(v: f64) -> String {
    let neg = v < 0.0;
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if neg { format!("-{out}") } else { out }
}

#[derive(Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(mut v: Vec<f64>) -> Option<Spread> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

struct Report {
    text: String,
    json: String,
}

type Metric = (
    &'static str,
    fn(&Sample, f64) -> Option<f64>,
    fn(f64) -> String,
);

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}
fn int(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else {
        group(v)
    }
}
fn ns(v: f64) -> String {
    format!("{v:.0}")
}
fn mib(v: f64) -> String {
    format!("{v:.1}")
}
fn frac(v: f64) -> String {
    format!("{:.3}%", v * 100.0)
}

const METRICS: [Metric; 17] = [
    ("conn/s", |s, _| Some(s.rate()), int),
    ("vs untraced", |s, base| Some(s.rate() / base), pct),
    ("expected events", |s, _| Some(s.expected as f64), int),
    ("captured events", |s, _| s.captured.map(|c| c as f64), int),
    (
        "missing (of expected)",
        |s, _| Some(s.missing()? as f64 / s.expected as f64),
        frac,
    ),
    ("  ring drops", |s, _| s.ring_lost.map(|v| v as f64), int),
    (
        "  recursion misses",
        |s, _| s.recursion_misses.map(|v| v as f64),
        int,
    ),
    (
        "  skipped, emitted anyway",
        |s, _| s.caught.map(|v| v as f64),
        int,
    ),
    (
        "  unaccounted",
        |s, _| s.unaccounted().map(|v| v as f64),
        int,
    ),
    ("  sockets with gaps", |s, _| s.gaps.map(|v| v as f64), int),
    ("BPF ns/event", |s, _| s.bpf_ns_per_event(), ns),
    (
        "  less the statistics' cost",
        |s, _| s.bpf_ns_less_stats(),
        ns,
    ),
    ("user CPU ns/event", |s, _| s.user_ns_per_event(), ns),
    ("  of which system", |s, _| s.sys_ns_per_event(), ns),
    (
        "peak RSS MiB",
        |s, _| s.rss_kb.map(|k| k as f64 / 1024.0),
        mib,
    ),
    (
        "recorded events/s",
        |s, _| Some(s.recording_events? as f64 / s.seconds),
        int,
    ),
    (
        "recorded bytes/event",
        |s, _| Some(s.recording_bytes? as f64 / s.recording_events.filter(|&e| e > 0)? as f64),
        ns,
    ),
];

fn summarize(samples: &[Sample], offline: &[Offline], opts: &Options) -> Report {
    let configs: Vec<&str> = CONFIGS
        .iter()
        .copied()
        .filter(|c| samples.iter().any(|s| s.config == *c))
        .collect();
    let of = |c: &str| -> Vec<&Sample> { samples.iter().filter(|s| s.config == c).collect() };
    let base = spread(of("untraced").iter().map(|s| s.rate()).collect()).map(|s| s.median);

    // metric -> config -> spread
    let mut table: BTreeMap<(usize, &str), Spread> = BTreeMap::new();
    for (i, (_, f, _)) in METRICS.iter().enumerate() {
        for c in &configs {
            let vals: Vec<f64> = of(c)
                .iter()
                .filter_map(|s| f(s, base.unwrap_or(f64::NAN)))
                .filter(|v| v.is_finite())
                .collect();
            if let Some(sp) = spread(vals) {
                table.insert((i, c), sp);
            }
        }
    }

    let mut t = String::new();
    let rounds = of(configs.first().copied().unwrap_or("untraced")).len();
    let _ = writeln!(
        t,
        "\nmedian (min to max) over {rounds} rounds of {} s, mode {}",
        opts.seconds, opts.mode
    );
    // Cells first, then each column as wide as its widest cell.
    let mut rows: Vec<(&str, Vec<String>)> = Vec::new();
    for (i, (name, _, fmt)) in METRICS.iter().enumerate() {
        if !configs.iter().any(|c| table.contains_key(&(i, c))) {
            continue;
        }
        let cells = configs
            .iter()
            .map(|c| match table.get(&(i, c)) {
                Some(sp) if rounds > 1 => {
                    format!("{} ({} to {})", fmt(sp.median), fmt(sp.min), fmt(sp.max))
                }
                Some(sp) => fmt(sp.median),
                None => "-".into(),
            })
            .collect();
        rows.push((name, cells));
    }
    let widths: Vec<usize> = configs
        .iter()
        .enumerate()
        .map(|(k, c)| {
            rows.iter()
                .map(|(_, cells)| cells[k].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let _ = write!(t, "{:<22}", "");
    for (c, w) in configs.iter().zip(&widths) {
        let _ = write!(t, "  {c:>w$}");
    }
    t.push('\n');
    for (name, cells) in &rows {
        let _ = write!(t, "{name:<22}");
        for (cell, w) in cells.iter().zip(&widths) {
            let _ = write!(t, "  {cell:>w$}");
        }
        t.push('\n');
    }
    let disturbed: Vec<String> = samples
        .iter()
        .filter(|s| s.busy_before > QUIET_BUSY || !s.other_tracers.is_empty())
        .map(|s| format!("round {} {}", s.round, s.config))
        .collect();
    if !disturbed.is_empty() {
        let _ = writeln!(
            t,
            "warning: still disturbed by other work after retries: {}",
            disturbed.join(", ")
        );
    }
    let _ = writeln!(
        t,
        "conn/s: connections made in the first {:.0}% of each run, before BPF statistics are \
         turned on, / that time (the whole run's figures are in the JSON).\n\
         BPF ns/event: run_time_ns of all the tracer's programs / run_cnt of its state-change \
         program, over the last third of each run (kernel.bpf_stats_enabled=1 only then: it \
         adds two clock reads per program run, which the figure includes and the measured rates \
         are spared; the kernel's own tracepoint work around the programs is not included). \
         \"less the statistics' cost\" takes out those clock reads: an empty program on the \
         same tracepoint, timed the same way over a churn of its own, gives their cost per run, \
         subtracted once for each run of each of the tracer's programs.\n\
         user CPU: utime+stime of the tracer process (start-up included) / captured events.\n\
         missing = expected - captured = ring drops + recursion misses (the kernel skipped the \
         program: counted in its recursion_misses; for tcptrace, those its catcher program did \
         not recover; \"skipped, emitted anyway\" are the other skips of its programs) + unaccounted \
         (transitions the kernel made without running any BPF program or counting a skip; \
         tcptrace finds them as sockets with gaps; tcpstates misses the same ones). tcptrace's ring drops also count the reset \
         annotations it queues (not only transitions), so with drops unaccounted can go \
         negative.\n\
         tcpstates traces every port (its -L and -D filters must both match); its lines for the \
         churn's port are counted.\n\
         attached: tcptrace filtering on a port no churn socket uses, so its programs run for \
         every transition and drop it: what the probes cost the churn before any event is \
         emitted or read.",
        RATE_UNTIL * 100.0
    );

    // Goals.
    let mut goals: Vec<(String, Option<bool>, String)> = Vec::new();
    let get = |metric: &str, c: &str| -> Option<Spread> {
        let i = METRICS.iter().position(|m| m.0 == metric)?;
        table.get(&(i, c)).copied()
    };
    for c in ["text", "record", "record-json"] {
        let runs = of(c);
        if runs.is_empty() {
            continue;
        }
        let perfect = runs
            .iter()
            .filter(|s| s.missing() == Some(0) && s.ring_lost == Some(0))
            .count();
        let missing: i64 = runs.iter().filter_map(|s| s.missing()).sum();
        let rec: u64 = runs.iter().filter_map(|s| s.recursion_misses).sum();
        let ring: u64 = runs.iter().filter_map(|s| s.ring_lost).sum();
        let unacc: i64 = runs.iter().filter_map(|s| s.unaccounted()).sum();
        let gaps: u64 = runs.iter().filter_map(|s| s.gaps).sum();
        goals.push((
            format!("{c}: zero loss (captured == expected, no ring drops)"),
            Some(perfect == runs.len()),
            format!(
                "{perfect}/{} runs exact; {} missing in all: {} ring drops, {} recursion misses, \
                 {} unaccounted ({} sockets seen with gaps)",
                runs.len(),
                group(missing as f64),
                group(ring as f64),
                group(rec as f64),
                group(unacc as f64),
                group(gaps as f64)
            ),
        ));
    }
    for c in ["text", "record", "record-json"] {
        if let Some(r) = get("vs untraced", c) {
            goals.push((
                format!(
                    "{c}: traced >= {:.0}% of untraced conn/s",
                    GOAL_RATE_RATIO * 100.0
                ),
                Some(r.median >= GOAL_RATE_RATIO),
                format!("median {}", pct(r.median)),
            ));
        }
    }
    // The programs' own time: the statistics' clock reads are the
    // instrument's, and both figures are shown.
    for c in ["text", "record", "record-json"] {
        let Some(raw) = get("BPF ns/event", c) else {
            continue;
        };
        let (judged, detail) = match get("  less the statistics' cost", c) {
            Some(b) => (
                b.median,
                format!(
                    "median {:.0} ns without the statistics' own cost ({:.0} ns as measured)",
                    b.median, raw.median
                ),
            ),
            None => (raw.median, format!("median {:.0} ns", raw.median)),
        };
        goals.push((
            format!("{c}: BPF <= {GOAL_BPF_NS:.0} ns/event"),
            Some(judged <= GOAL_BPF_NS),
            detail,
        ));
    }
    if let Some(u) = get("user CPU ns/event", "record") {
        goals.push((
            format!(
                "record: userspace <= {:.1} us CPU/event",
                GOAL_USER_NS / 1000.0
            ),
            Some(u.median <= GOAL_USER_NS),
            format!("median {:.0} ns", u.median),
        ));
    }
    if let (Some(tt), Some(ts)) = (get("conn/s", "text"), get("conn/s", "tcpstates")) {
        let tt_miss = get("missing (of expected)", "text").map_or(f64::NAN, |s| s.median);
        let ts_miss = get("missing (of expected)", "tcpstates").map_or(f64::NAN, |s| s.median);
        goals.push((
            format!(
                "text vs tcpstates: >= {GOAL_VS_TCPSTATES:.0}x its traced conn/s, and fewer missing"
            ),
            Some(tt.median >= GOAL_VS_TCPSTATES * ts.median && tt_miss < ts_miss),
            format!(
                "{:.1}x ({} vs {} conn/s); missing {} vs {}",
                tt.median / ts.median,
                group(tt.median),
                group(ts.median),
                frac(tt_miss),
                frac(ts_miss)
            ),
        ));
    }
    for c in ["attached", "text", "record"] {
        let base = format!("{c}@base");
        if let (Some(now), Some(then)) = (get("vs untraced", c), get("vs untraced", &base)) {
            goals.push((
                format!(
                    "{c}: within {:.0} points of the build compared with",
                    GOAL_VS_BASE * 100.0
                ),
                Some(now.median >= then.median - GOAL_VS_BASE),
                format!(
                    "{c} {} vs {base} {} (medians, same run)",
                    pct(now.median),
                    pct(then.median)
                ),
            ));
        }
    }
    for (c, text, record) in ["record", "record-json"]
        .into_iter()
        .filter_map(|c| Some((c, get("vs untraced", "text")?, get("vs untraced", c)?)))
    {
        goals.push((
            format!(
                "{c}: within {:.0} points of text (share of untraced conn/s)",
                GOAL_RECORD_VS_TEXT * 100.0
            ),
            Some(record.median >= text.median - GOAL_RECORD_VS_TEXT),
            format!(
                "{c} {} vs text {} (medians)",
                pct(record.median),
                pct(text.median)
            ),
        ));
    }
    if let Some(b) = get("recorded bytes/event", "record") {
        goals.push((
            format!("record: <= {GOAL_BYTES_PER_EVENT:.0} bytes/event (default format)"),
            Some(b.median <= GOAL_BYTES_PER_EVENT),
            format!("median {:.1} bytes", b.median),
        ));
    }
    for what in ["read", "report"] {
        let find = |f: &str| offline.iter().find(|o| o.what == what && o.format == f);
        if let (Some(json), Some(bin)) = (find("JSON Lines"), find("binary")) {
            goals.push((
                format!(
                    "offline: {what} of the binary recording >= {GOAL_BINARY_SPEEDUP:.0}x JSON \
                     Lines' events/s"
                ),
                Some(json.ok && bin.ok && bin.eps() >= GOAL_BINARY_SPEEDUP * json.eps()),
                format!(
                    "{:.1}x: {} vs {} events/s ({:.1} vs {:.1} bytes/event)",
                    bin.eps() / json.eps(),
                    group(bin.eps()),
                    group(json.eps()),
                    bin.bytes as f64 / bin.events.max(1) as f64,
                    json.bytes as f64 / json.events.max(1) as f64,
                ),
            ));
        }
    }
    for o in offline {
        goals.push((
            format!("offline: {} >= 1M events/s", o.command),
            Some(o.ok && o.eps() >= GOAL_OFFLINE_EPS),
            format!(
                "{} events/s ({} events, {:.0} MB in {:.2} s wall, {:.2} s CPU), peak RSS {:.1} MiB{}",
                group(o.eps()),
                group(o.events as f64),
                o.bytes as f64 / 1e6,
                o.wall_s,
                o.cpu_s,
                o.maxrss_kb as f64 / 1024.0,
                if o.ok { "" } else { ", FAILED" }
            ),
        ));
    }
    let _ = writeln!(t, "\ngoals");
    if !disturbed.is_empty() {
        let _ = writeln!(
            t,
            "  (computed with runs disturbed by other work, see the warning above: rerun on a \
             quiet machine before trusting them)"
        );
    }
    for (what, ok, detail) in &goals {
        let mark = match ok {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "n/a ",
        };
        let _ = writeln!(t, "  {mark}  {what}: {detail}");
    }

    // JSON.
    let mut j = String::from("{\n");
    let _ = writeln!(
        j,
        "  \"options\": {{\"seconds\": {}, \"rounds\": {}, \"mode\": {}, \"port\": {}, \
         \"clients\": {}, \"acceptors\": {}}},",
        opts.seconds,
        opts.rounds,
        jstr(&opts.mode),
        opts.port,
        opts.clients,
        opts.acceptors
    );
    let _ = writeln!(
        j,
        "  \"kernel\": {},",
        jstr(
            fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        )
    );
    let _ = writeln!(
        j,
        "  \"cpus\": {},",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    j.push_str("  \"samples\": [\n");
    for (k, s) in samples.iter().enumerate() {
        let _ = write!(
            j,
            "    {{\"config\": {}, \"round\": {}, \"connections\": {}, \"seconds\": {}, \
             \"conn_per_s\": {}, \"rate_connections\": {}, \"rate_seconds\": {}, \"expected\": {}, \"failed_connects\": {}, \"captured\": {}, \
             \"filtered\": {}, \"ring_lost\": {}, \"recursion_misses\": {}, \"bpf_run_time_ns\": {}, \
             \"bpf_run_cnt\": {}, \"bpf_ns_per_event\": {}, \"bpf_runs_total\": {}, \
             \"stats_floor_ns\": {}, \"bpf_ns_less_stats\": {}, \"cpu_ns\": {}, \"sys_ns\": {}, \
             \"startup_cpu_ns\": {}, \"user_ns_per_event\": {}, \"peak_rss_kb\": {}, \
             \"recording_bytes\": {}, \"recording_events\": {}, \"reported_missed\": {}, \
             \"gaps\": {}, \"caught\": {}, \"programs\": {}, \"busy_before\": {}, \
             \"other_tracers\": {:?}, \"attempts\": {}}}",
            jstr(&s.config),
            s.round,
            s.connections,
            jnum(s.seconds),
            jnum(s.rate()),
            s.rate_connections,
            jnum(s.rate_seconds),
            s.expected,
            s.failed_connects,
            jopt(s.captured),
            jopt(s.filtered),
            jopt(s.ring_lost),
            jopt(s.recursion_misses),
            jopt(s.bpf_run_ns),
            jopt(s.bpf_run_cnt),
            s.bpf_ns_per_event().map_or("null".into(), jnum),
            jopt(s.bpf_runs_total),
            s.stats_floor_ns.map_or("null".into(), jnum),
            s.bpf_ns_less_stats().map_or("null".into(), jnum),
            jopt(s.cpu_ns),
            jopt(s.sys_ns),
            jopt(s.startup_cpu_ns),
            s.user_ns_per_event().map_or("null".into(), jnum),
            jopt(s.rss_kb),
            jopt(s.recording_bytes),
            jopt(s.recording_events),
            jopt(s.reported_missed),
            jopt(s.gaps),
            jopt(s.caught),
            jopt(s.programs),
            jnum(s.busy_before),
            s.other_tracers,
            s.attempts,
        );
        j.push_str(if k + 1 < samples.len() { ",\n" } else { "\n" });
    }
    j.push_str("  ],\n  \"summary\": {\n");
    for (ci, c) in configs.iter().enumerate() {
        let _ = write!(j, "    {}: {{", jstr(c));
        let mut first = true;
        for (i, (name, _, _)) in METRICS.iter().enumerate() {
            if let Some(sp) = table.get(&(i, c)) {
                if !first {
                    j.push_str(", ");
                }
                first = false;
                let _ = write!(
                    j,
                    "{}: {{\"median\": {}, \"min\": {}, \"max\": {}}}",
                    jstr(name.trim()),
                    jnum(sp.median),
                    jnum(sp.min),
                    jnum(sp.max)
                );
            }
        }
        j.push('}');
        j.push_str(if ci + 1 < configs.len() { ",\n" } else { "\n" });
    }
    j.push_str("  },\n  \"offline\": [\n");
    for (k, o) in offline.iter().enumerate() {
        let _ = write!(
            j,
            "    {{\"format\": {}, \"command\": {}, \"events\": {}, \"bytes\": {}, \"wall_s\": {}, \
             \"cpu_s\": {}, \"events_per_s\": {}, \"peak_rss_kb\": {}, \"ok\": {}}}",
            jstr(o.format),
            jstr(&o.command),
            o.events,
            o.bytes,
            jnum(o.wall_s),
            jnum(o.cpu_s),
            jnum(o.eps()),
            o.maxrss_kb,
            o.ok
        );
        j.push_str(if k + 1 < offline.len() { ",\n" } else { "\n" });
    }
    j.push_str("  ],\n  \"goals\": [\n");
    for (k, (what, ok, detail)) in goals.iter().enumerate() {
        let _ = write!(
            j,
            "    {{\"goal\": {}, \"met\": {}, \"detail\": {}}}",
            jstr(what),
            ok.map_or("null".into(), |b| b.to_string()),
            jstr(detail)
        );
        j.push_str(if k + 1 < goals.len() { ",\n" } else { "\n" });
    }
    j.push_str("  ]\n}\n");
    Report { text: t, json: j }
}

fn jstr(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn jnum(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

fn jopt(v: Option<u64>) -> String {
    v.map_or("null".into(), |v| v.to_string())
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
    }

    #[test]
    fn numbers_in_json() {
        let l = r#"{"connections":12,"seconds":3.5,"expected_transitions":122}"#;
        assert_eq!(json_number(l, "connections"), Some(12.0));
        assert_eq!(json_number(l, "seconds"), Some(3.5));
        assert_eq!(json_number(l, "expected_transitions"), Some(122.0));
        assert_eq!(json_number(l, "missing"), None);
    }

    #[test]
    fn medians() {
        let s = spread(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(spread(vec![1.0, 2.0, 4.0, 3.0]).unwrap().median, 2.5);
    }

    #[test]
    fn grouping() {
        assert_eq!(group(1234567.0), "1,234,567");
        assert_eq!(group(12.0), "12");
        assert_eq!(group(-1234.0), "-1,234");
    }
}

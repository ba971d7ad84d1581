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
//!
//! This module runs the rounds and each run; [`churn`] the workload,
//! [`tracer`] the tracers, [`stats`] the figures and where they come from,
//! [`floor`] the statistics' own cost, [`offline`] read and report over a
//! recording, [`report`] the tables, goals and JSON, [`sys`] the few C
//! calls. They use nothing of this module but [`Options`] and [`CONFIGS`];
//! `floor` reads its figures with `stats`, not through this module.

pub(crate) mod churn;
mod floor;
mod offline;
mod report;
mod stats;
pub(crate) mod sys;
pub(crate) mod tracer;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use churn::{Netns, run_churn};
use floor::EmptyProgram;
use offline::{Offline, file_size, offline, recording_events};
use report::{sample_line, summarize};
use stats::{BpfStats, ProgStats, Sample, cpu_ns, cpu_split, prog_stats, status_kb, wait_quiet};
use sys::check_interrupted;
use tracer::{
    TCPSTATES, TempFile, Tracer, count_tcpstates_lines, find_tcpstates, other_tracers,
    parse_stats_line, spawn_tracer,
};

/// Time for a deleted namespace's sockets to be freed before the next run.
const SETTLE: Duration = Duration::from_secs(2);
/// tcpstates prints nothing when attached (its stdout is a file, buffered).
const TCPSTATES_START: Duration = Duration::from_secs(1);
const READY_LIMIT: Duration = Duration::from_secs(60);
/// How long a tracer may take to catch up with the ring after the churn.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(20);

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
    check_options(opts)?;
    sys::catch_sigint();
    let env = Env::new(root, opts)?;
    remove_stale_namespaces();
    let _stats = BpfStats::take()?;
    println!("{}", describe_machine(opts));
    warn_of_other_tracers();

    let (mut samples, kept) = run_rounds(&env, opts)?;
    if samples.iter().any(|s| s.bpf_run_ns.is_some()) {
        check_interrupted()?;
        measure_stats_floor(&env, opts, &mut samples);
    }
    if env.tcpstates.is_none() && opts.configs.iter().any(|c| c == "tcpstates") {
        println!(
            "note: tcpstates skipped: {TCPSTATES} is missing and libbpf-tools could not be installed"
        );
    }

    check_interrupted()?;
    let offline = offline_figures(&env, opts, kept)?;
    write_report(&samples, &offline, opts)
}

/// The options' ranges, names and combinations.
fn check_options(opts: &Options) -> Result<()> {
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
    Ok(())
}

impl Env {
    /// The binaries the bench runs, which must be built already.
    fn new(root: &Path, opts: &Options) -> Result<Env> {
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
            clk_tck: sys::clk_tck(),
        };
        for bin in [&env.tcptrace, &env.churn] {
            if !bin.exists() {
                bail!("{} is missing: build it first", bin.display());
            }
        }
        Ok(env)
    }
}

fn warn_of_other_tracers() {
    let others = other_tracers(None);
    if !others.is_empty() {
        println!(
            "warning: other tracers are running (pids {others:?}): their programs run on every \
             transition too and skew the figures"
        );
    }
}

/// Every round of every configuration asked for, and the largest binary
/// recording made, kept for the offline measurements.
fn run_rounds(env: &Env, opts: &Options) -> Result<(Vec<Sample>, Option<TempFile>)> {
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
            let (sample, recording) = run_until_undisturbed(env, opts, config, round)?;
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
    Ok((samples, kept))
}

/// One run of a configuration on a quiet machine, made again while other
/// work disturbed it (up to `--retries` times).
fn run_until_undisturbed(
    env: &Env,
    opts: &Options,
    config: &str,
    round: u32,
) -> Result<(Sample, Option<TempFile>)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        check_interrupted()?;
        thread::sleep(SETTLE);
        let busy = wait_quiet()?;
        let before = other_tracers(None);
        let (mut sample, recording) = run_one(env, opts, config, round, opts.seconds)
            .with_context(|| format!("round {round}, {config}"))?;
        sample.busy_before = busy;
        sample.other_tracers.extend(before);
        sample.other_tracers.sort_unstable();
        sample.other_tracers.dedup();
        sample.attempts = attempt;
        if !sample.disturbed() || attempt > opts.retries {
            return Ok((sample, recording));
        }
        println!(
            "{} -- disturbed by other work, run again",
            sample_line(&sample, opts.rounds)
        );
    }
}

/// The statistics' own cost, given to every sample (or a note why not).
fn measure_stats_floor(env: &Env, opts: &Options, samples: &mut [Sample]) {
    match stats_floor(env, opts) {
        Ok((floor, runs)) => {
            println!(
                "statistics' own cost: an empty program on the tracepoint measured {floor:.1} \
                 ns per run ({runs} runs)"
            );
            for s in samples {
                s.stats_floor_ns = Some(floor);
            }
        }
        Err(e) => println!("note: the statistics' own cost was not measured: {e:#}"),
    }
}

/// `read` and `report` over the largest recording, made now (10 s of
/// churn) when `record` was asked for but none was kept.
fn offline_figures(env: &Env, opts: &Options, mut kept: Option<TempFile>) -> Result<Vec<Offline>> {
    if !(opts.configs.iter().any(|c| c == "record") || kept.is_some()) {
        return Ok(Vec::new());
    }
    if kept.is_none() {
        eprintln!("xtask: recording a 10 s churn for the offline measurements");
        let (_, rec) = run_one(env, opts, "record", 0, 10.0)?;
        kept = rec;
    }
    match &kept {
        Some(rec) => offline(&env.tcptrace, &rec.0),
        None => Ok(Vec::new()),
    }
}

/// The tables and goals printed, and the figures written as JSON.
fn write_report(samples: &[Sample], offline: &[Offline], opts: &Options) -> Result<()> {
    let report = summarize(samples, offline, opts);
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
    let empty = EmptyProgram::attach("inet_sock_set_state")?;
    run_churn(&env.churn, &env.root, opts, &ns, opts.seconds.min(10.0))?;
    let (time, runs) = empty.stats()?;
    if runs == 0 {
        bail!("the empty program never ran");
    }
    Ok((time as f64 / runs as f64, runs))
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

fn run_one(
    env: &Env,
    opts: &Options,
    config: &str,
    round: u32,
    seconds: f64,
) -> Result<(Sample, Option<TempFile>)> {
    let tag = format!("{}-{round}-{config}", std::process::id());
    // The same configuration, run by the build compared with.
    let label = config;
    let (config, tcptrace) = match config.strip_suffix("@base") {
        Some(c) => (c, env.baseline.as_ref().expect("checked in run")),
        None => (config, &env.tcptrace),
    };
    let Started {
        mut tracer,
        recording,
        tcpstates_out,
    } = start_tracer(env, opts, config, tcptrace, &tag)?;
    let startup_cpu = match &mut tracer {
        Some(t) => Some(wait_until_tracing(t, config, env.clk_tck)?),
        None => None,
    };

    let churn = {
        let ns = Netns::new(format!("tcptrace-bench-{}", std::process::id()))?;
        run_churn(&env.churn, &env.root, opts, &ns, seconds)?
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
    let Some(t) = tracer else {
        return Ok((sample, None));
    };
    sample.startup_cpu_ns = startup_cpu;
    let (prog, lines) = measure_and_stop(t, env.clk_tck, &mut sample)?;
    if config == "tcpstates" {
        let out = tcpstates_out.expect("set for tcpstates");
        tcpstates_counts(&mut sample, &prog, &out, &lines, opts.port)?;
    } else {
        tcptrace_counts(&mut sample, &prog, &lines, config)?;
    }
    if let Some(rec) = &recording {
        sample.recording_bytes = Some(file_size(&rec.0));
        sample.recording_events = recording_events(&rec.0);
    }
    Ok((sample, recording))
}

/// A configuration's tracer, started, and the files it writes to.
struct Started {
    tracer: Option<Tracer>,
    /// tcptrace's recording (`record`, `record-json`).
    recording: Option<TempFile>,
    /// tcpstates' output.
    tcpstates_out: Option<TempFile>,
}

/// Starts the tracer of a configuration (none for `untraced`).
fn start_tracer(
    env: &Env,
    opts: &Options,
    config: &str,
    tcptrace: &Path,
    tag: &str,
) -> Result<Started> {
    let port = opts.port.to_string();
    let mut recording = None;
    let mut tcpstates_out = None;
    let tracer = match config {
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
    Ok(Started {
        tracer,
        recording,
        tcpstates_out,
    })
}

/// Waits until the tracer is attached; its CPU time until then.
fn wait_until_tracing(t: &mut Tracer, config: &str, clk_tck: u64) -> Result<u64> {
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
    cpu_ns(t.pid(), clk_tck)
}

/// Once the tracer has caught up: its CPU time, peak RSS and programs'
/// statistics into the sample; then it is stopped. Its programs'
/// statistics and the lines it printed.
fn measure_and_stop(
    mut t: Tracer,
    clk_tck: u64,
    sample: &mut Sample,
) -> Result<(ProgStats, Vec<String>)> {
    let pid = t.pid();
    wait_caught_up(pid, clk_tck)?;
    let prog = prog_stats(pid)?;
    let (user, sys) = cpu_split(pid, clk_tck)?;
    sample.cpu_ns = Some(user + sys);
    sample.sys_ns = Some(sys);
    sample.rss_kb = status_kb(pid, "VmHWM:");
    sample.bpf_run_ns = Some(prog.run_time_ns);
    sample.bpf_run_cnt = Some(prog.run_cnt);
    sample.bpf_runs_total = Some(prog.runs_total);
    sample.programs = Some(prog.programs);
    t.wait_line(None, Duration::ZERO)?;
    let lines = t.stop()?;
    Ok((prog, lines))
}

/// Lets the tracer catch up with the ring before its CPU time is read:
/// until that time stops growing, or [`CATCH_UP_LIMIT`].
fn wait_caught_up(pid: i32, clk_tck: u64) -> Result<()> {
    let mut cpu = cpu_ns(pid, clk_tck)?;
    let deadline = Instant::now() + CATCH_UP_LIMIT;
    loop {
        thread::sleep(Duration::from_millis(200));
        check_interrupted()?;
        let now = cpu_ns(pid, clk_tck)?;
        if now == cpu || Instant::now() > deadline {
            return Ok(());
        }
        cpu = now;
    }
}

/// What tcpstates captured (its lines for the churn's port) and lost.
fn tcpstates_counts(
    sample: &mut Sample,
    prog: &ProgStats,
    out: &TempFile,
    lines: &[String],
    port: u16,
) -> Result<()> {
    sample.recursion_misses = Some(prog.recursion_misses);
    sample.captured = Some(count_tcpstates_lines(&out.0, port)?);
    sample.ring_lost = Some(
        lines
            .iter()
            .filter_map(|l| l.strip_prefix("lost "))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum(),
    );
    Ok(())
}

/// What tcptrace's closing stats line says it showed, filtered and lost.
fn tcptrace_counts(
    sample: &mut Sample,
    prog: &ProgStats,
    lines: &[String],
    config: &str,
) -> Result<()> {
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
    Ok(())
}

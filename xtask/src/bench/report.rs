//! What the bench prints: a line per run, then the table of medians and
//! spreads, the goals the figures are held against, and all of it as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::thread;

use super::offline::Offline;
use super::stats::{QUIET_BUSY, RATE_UNTIL, Sample, Spread, spread};
use super::{CONFIGS, Options};

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
/// A change may cost the churn at most this much against the build it is
/// compared with (`--against`), as a share of untraced conn/s.
const GOAL_VS_BASE: f64 = 0.02;

/// metric (index in [`METRICS`]) and configuration -> spread over rounds.
type Table<'a> = BTreeMap<(usize, &'a str), Spread>;
/// (what, met, detail).
type Goal = (String, Option<bool>, String);

/// The line printed after each run.
pub(super) fn sample_line(s: &Sample, rounds: u32) -> String {
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

pub(super) struct Report {
    pub text: String,
    pub json: String,
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

pub(super) fn summarize(samples: &[Sample], offline: &[Offline], opts: &Options) -> Report {
    let configs: Vec<&str> = CONFIGS
        .iter()
        .copied()
        .filter(|c| samples.iter().any(|s| s.config == *c))
        .collect();
    let table = spread_table(samples, &configs);
    let rounds = runs_of(samples, configs.first().copied().unwrap_or("untraced")).len();

    let mut t = String::new();
    write_table(&mut t, &configs, &table, rounds, opts);
    let disturbed = disturbed_runs(samples);
    if !disturbed.is_empty() {
        let _ = writeln!(
            t,
            "warning: still disturbed by other work after retries: {}",
            disturbed.join(", ")
        );
    }
    write_legend(&mut t);

    let goals = goals(samples, &table, offline);
    write_goals(&mut t, &goals, !disturbed.is_empty());

    let json = json(samples, &configs, &table, offline, &goals, opts);
    Report { text: t, json }
}

/// The runs of one configuration, in the order they were made.
fn runs_of<'s>(samples: &'s [Sample], config: &str) -> Vec<&'s Sample> {
    samples.iter().filter(|s| s.config == config).collect()
}

/// Each metric's spread over rounds, for each configuration that has it.
fn spread_table<'a>(samples: &[Sample], configs: &[&'a str]) -> Table<'a> {
    let base = spread(
        runs_of(samples, "untraced")
            .iter()
            .map(|s| s.rate())
            .collect(),
    )
    .map(|s| s.median);
    // metric -> config -> spread
    let mut table: Table = BTreeMap::new();
    for (i, (_, f, _)) in METRICS.iter().enumerate() {
        for c in configs {
            let vals: Vec<f64> = runs_of(samples, c)
                .iter()
                .filter_map(|s| f(s, base.unwrap_or(f64::NAN)))
                .filter(|v| v.is_finite())
                .collect();
            if let Some(sp) = spread(vals) {
                table.insert((i, c), sp);
            }
        }
    }
    table
}

/// The table of medians (and spreads, over more than one round): a row per
/// metric that any configuration has, a column per configuration.
fn write_table(t: &mut String, configs: &[&str], table: &Table, rounds: usize, opts: &Options) {
    let _ = writeln!(
        t,
        "\nmedian (min to max) over {rounds} rounds of {} s, mode {}",
        opts.seconds, opts.mode
    );
    // Cells first, then each column as wide as its widest cell.
    let rows = table_rows(configs, table, rounds);
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
}

/// The table's cells: (metric, a cell per configuration).
fn table_rows(configs: &[&str], table: &Table, rounds: usize) -> Vec<(&'static str, Vec<String>)> {
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
    rows
}

/// "round N CONFIG" of each run still disturbed after its retries.
fn disturbed_runs(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .filter(|s| s.disturbed())
        .map(|s| format!("round {} {}", s.round, s.config))
        .collect()
}

/// What the table's figures mean and where they come from.
fn write_legend(t: &mut String) {
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
}

/// The goals, each marked PASS, MISS or n/a.
fn write_goals(t: &mut String, goals: &[Goal], disturbed: bool) {
    let _ = writeln!(t, "\ngoals");
    if disturbed {
        let _ = writeln!(
            t,
            "  (computed with runs disturbed by other work, see the warning above: rerun on a \
             quiet machine before trusting them)"
        );
    }
    for (what, ok, detail) in goals {
        let mark = match ok {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "n/a ",
        };
        let _ = writeln!(t, "  {mark}  {what}: {detail}");
    }
}

/// The goals the figures are held against: (what, met, detail).
fn goals(samples: &[Sample], table: &Table, offline: &[Offline]) -> Vec<Goal> {
    let mut goals = loss_goals(samples);
    goals.extend(rate_goals(table));
    goals.extend(cpu_goals(table));
    goals.extend(vs_tcpstates_goal(table));
    goals.extend(vs_base_goals(table));
    goals.extend(record_vs_text_goals(table));
    goals.extend(bytes_per_event_goal(table));
    goals.extend(offline_goals(offline));
    goals
}

/// A metric's spread for a configuration, by the metric's name.
fn metric(table: &Table, metric: &str, c: &str) -> Option<Spread> {
    let i = METRICS.iter().position(|m| m.0 == metric)?;
    table.get(&(i, c)).copied()
}

/// Each tracing configuration: every run captured all it expected.
fn loss_goals(samples: &[Sample]) -> Vec<Goal> {
    let mut goals: Vec<Goal> = Vec::new();
    for c in ["text", "record", "record-json"] {
        let runs = runs_of(samples, c);
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
    goals
}

/// Each tracing configuration keeps most of the untraced rate.
fn rate_goals(table: &Table) -> Vec<Goal> {
    let mut goals: Vec<Goal> = Vec::new();
    for c in ["text", "record", "record-json"] {
        if let Some(r) = metric(table, "vs untraced", c) {
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
    goals
}

/// The programs' time per event, and userspace's.
fn cpu_goals(table: &Table) -> Vec<Goal> {
    let mut goals: Vec<Goal> = Vec::new();
    // The programs' own time: the statistics' clock reads are the
    // instrument's, and both figures are shown.
    for c in ["text", "record", "record-json"] {
        let Some(raw) = metric(table, "BPF ns/event", c) else {
            continue;
        };
        let (judged, detail) = match metric(table, "  less the statistics' cost", c) {
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
    if let Some(u) = metric(table, "user CPU ns/event", "record") {
        goals.push((
            format!(
                "record: userspace <= {:.1} us CPU/event",
                GOAL_USER_NS / 1000.0
            ),
            Some(u.median <= GOAL_USER_NS),
            format!("median {:.0} ns", u.median),
        ));
    }
    goals
}

/// text far ahead of tcpstates, and missing less.
fn vs_tcpstates_goal(table: &Table) -> Option<Goal> {
    let (tt, ts) = (
        metric(table, "conn/s", "text")?,
        metric(table, "conn/s", "tcpstates")?,
    );
    let tt_miss = metric(table, "missing (of expected)", "text").map_or(f64::NAN, |s| s.median);
    let ts_miss =
        metric(table, "missing (of expected)", "tcpstates").map_or(f64::NAN, |s| s.median);
    Some((
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
    ))
}

/// Each configuration against the same one run by the build compared with.
fn vs_base_goals(table: &Table) -> Vec<Goal> {
    let mut goals: Vec<Goal> = Vec::new();
    for c in ["attached", "text", "record"] {
        let base = format!("{c}@base");
        if let (Some(now), Some(then)) = (
            metric(table, "vs untraced", c),
            metric(table, "vs untraced", &base),
        ) {
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
    goals
}

/// Recording costs the churn little more than printing text.
fn record_vs_text_goals(table: &Table) -> Vec<Goal> {
    let mut goals: Vec<Goal> = Vec::new();
    for (c, text, record) in ["record", "record-json"].into_iter().filter_map(|c| {
        Some((
            c,
            metric(table, "vs untraced", "text")?,
            metric(table, "vs untraced", c)?,
        ))
    }) {
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
    goals
}

/// The default format's size per transition.
fn bytes_per_event_goal(table: &Table) -> Option<Goal> {
    let b = metric(table, "recorded bytes/event", "record")?;
    Some((
        format!("record: <= {GOAL_BYTES_PER_EVENT:.0} bytes/event (default format)"),
        Some(b.median <= GOAL_BYTES_PER_EVENT),
        format!("median {:.1} bytes", b.median),
    ))
}

/// read and report: the binary format against JSON Lines, and each
/// command's own rate.
fn offline_goals(offline: &[Offline]) -> Vec<Goal> {
    let mut goals: Vec<Goal> = Vec::new();
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
    goals
}

/// Every sample, the summary table and the goals, as JSON.
fn json(
    samples: &[Sample],
    configs: &[&str],
    table: &Table,
    offline: &[Offline],
    goals: &[Goal],
    opts: &Options,
) -> String {
    let mut j = String::from("{\n");
    json_setting(&mut j, opts);
    j.push_str("  \"samples\": [\n");
    json_items(&mut j, samples.iter().map(json_sample));
    j.push_str("  ],\n  \"summary\": {\n");
    json_items(&mut j, configs.iter().map(|c| json_summary(c, table)));
    j.push_str("  },\n  \"offline\": [\n");
    json_items(&mut j, offline.iter().map(json_offline));
    j.push_str("  ],\n  \"goals\": [\n");
    json_items(&mut j, goals.iter().map(json_goal));
    j.push_str("  ]\n}\n");
    j
}

/// Items of a JSON list or object, a line each, commas between them.
fn json_items(j: &mut String, items: impl ExactSizeIterator<Item = String>) {
    let n = items.len();
    for (k, item) in items.enumerate() {
        j.push_str(&item);
        j.push_str(if k + 1 < n { ",\n" } else { "\n" });
    }
}

/// The options, the kernel and the CPUs the bench ran with.
fn json_setting(j: &mut String, opts: &Options) {
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
}

/// One run: its churn and what was captured, then what tracing it cost.
fn json_sample(s: &Sample) -> String {
    let mut o = format!(
        "    {{\"config\": {}, \"round\": {}, \"connections\": {}, \"seconds\": {}, \
         \"conn_per_s\": {}, \"rate_connections\": {}, \"rate_seconds\": {}, \"expected\": {}, \"failed_connects\": {}, \"captured\": {}, \
         \"filtered\": {}, \"ring_lost\": {}, \"recursion_misses\": {}, ",
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
    );
    let _ = write!(
        o,
        "\"bpf_run_time_ns\": {}, \
         \"bpf_run_cnt\": {}, \"bpf_ns_per_event\": {}, \"bpf_runs_total\": {}, \
         \"stats_floor_ns\": {}, \"bpf_ns_less_stats\": {}, \"cpu_ns\": {}, \"sys_ns\": {}, \
         \"startup_cpu_ns\": {}, \"user_ns_per_event\": {}, \"peak_rss_kb\": {}, \
         \"recording_bytes\": {}, \"recording_events\": {}, \"reported_missed\": {}, \
         \"gaps\": {}, \"caught\": {}, \"programs\": {}, \"busy_before\": {}, \
         \"other_tracers\": {:?}, \"attempts\": {}}}",
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
    o
}

/// One configuration's line of the summary: each metric's spread.
fn json_summary(c: &str, table: &Table) -> String {
    let mut j = String::new();
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
    j
}

fn json_offline(o: &Offline) -> String {
    format!(
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
    )
}

fn json_goal((what, ok, detail): &Goal) -> String {
    format!(
        "    {{\"goal\": {}, \"met\": {}, \"detail\": {}}}",
        jstr(what),
        ok.map_or("null".into(), |b| b.to_string()),
        jstr(detail)
    )
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
    fn grouping() {
        assert_eq!(group(1234567.0), "1,234,567");
        assert_eq!(group(12.0), "12");
        assert_eq!(group(-1234.0), "-1,234");
    }
}

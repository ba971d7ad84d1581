//! The figures of a run and where they come from: BPF program statistics
//! (fdinfo, and kernel.bpf_stats_enabled turned on for part of the run),
//! CPU time and memory of a process, how busy the machine is; and the
//! medians and spreads over rounds.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::sys::check_interrupted;

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// A run starts once the machine is this idle (other work skews every
/// figure on 2 CPUs), or after QUIET_LIMIT with a warning.
pub(super) const QUIET_BUSY: f64 = 0.10;
const QUIET_LIMIT: Duration = Duration::from_secs(120);

/// One run of one configuration.
#[derive(Clone, Debug, Default)]
pub(super) struct Sample {
    pub config: String,
    pub round: u32,
    pub connections: u64,
    pub seconds: f64,
    /// Connections made before [`RATE_UNTIL`] of the run, and when that was.
    pub rate_connections: u64,
    pub rate_seconds: f64,
    pub expected: u64,
    pub failed_connects: u64,
    /// Transitions the tracer reported for the churn's port.
    pub captured: Option<u64>,
    /// Kernel-filtered transitions (other traffic on the host).
    pub filtered: Option<u64>,
    pub ring_lost: Option<u64>,
    /// What tcptrace itself says the kernel missed, when it says so.
    pub reported_missed: Option<u64>,
    /// Sockets tcptrace found with gaps in their history: transitions that
    /// never arrived, whatever the cause.
    pub gaps: Option<u64>,
    /// Transitions the kernel skipped the tracer for (its programs'
    /// `recursion_misses`) and that nothing recovered: tcptrace's own
    /// figure; tcpstates' program count.
    pub recursion_misses: Option<u64>,
    /// Runs of tcptrace's programs the kernel skipped whose transition was
    /// emitted anyway (by the catcher, or by the main program when the
    /// catcher was the one skipped): all their `recursion_misses` minus
    /// what tcptrace reports missed.
    pub caught: Option<u64>,
    /// Programs the tracer holds.
    pub programs: Option<u64>,
    /// Share of all CPUs busy during the second before the run.
    pub busy_before: f64,
    /// Other tcptrace or tcpstates processes seen before or right after the
    /// churn (their programs run on every transition too).
    pub other_tracers: Vec<u32>,
    /// Attempts made for this sample (runs disturbed by other work are
    /// repeated, up to `--retries` times).
    pub attempts: u32,
    pub bpf_run_ns: Option<u64>,
    pub bpf_run_cnt: Option<u64>,
    /// Runs of all the tracer's programs.
    pub bpf_runs_total: Option<u64>,
    /// What the statistics themselves add to each program run (an empty
    /// program's run time), measured once per bench.
    pub stats_floor_ns: Option<f64>,
    /// utime + stime of the tracer just before SIGINT.
    pub cpu_ns: Option<u64>,
    /// ... of which in the kernel (stime).
    pub sys_ns: Option<u64>,
    /// ... of which spent before it was attached and ready.
    pub startup_cpu_ns: Option<u64>,
    pub rss_kb: Option<u64>,
    pub recording_bytes: Option<u64>,
    pub recording_events: Option<u64>,
}

impl Sample {
    /// Connections per second before BPF statistics were turned on.
    pub fn rate(&self) -> f64 {
        self.rate_connections as f64 / self.rate_seconds
    }
    pub fn missing(&self) -> Option<i64> {
        self.captured.map(|c| self.expected as i64 - c as i64)
    }
    /// Missing transitions neither the ring nor the recursion guard explain.
    pub fn unaccounted(&self) -> Option<i64> {
        Some(
            self.missing()?
                - self.ring_lost.unwrap_or(0) as i64
                - self.recursion_misses.unwrap_or(0) as i64,
        )
    }
    pub fn bpf_ns_per_event(&self) -> Option<f64> {
        let cnt = self.bpf_run_cnt.filter(|&c| c > 0)?;
        Some(self.bpf_run_ns? as f64 / cnt as f64)
    }
    /// BPF time per event without the statistics' own cost.
    pub fn bpf_ns_less_stats(&self) -> Option<f64> {
        let cnt = self.bpf_run_cnt.filter(|&c| c > 0)?;
        let own = self.stats_floor_ns? * self.bpf_runs_total? as f64;
        Some((self.bpf_run_ns? as f64 - own) / cnt as f64)
    }
    pub fn user_ns_per_event(&self) -> Option<f64> {
        let events = self.captured.filter(|&c| c > 0)?;
        Some(self.cpu_ns? as f64 / events as f64)
    }
    pub fn sys_ns_per_event(&self) -> Option<f64> {
        let events = self.captured.filter(|&c| c > 0)?;
        Some(self.sys_ns? as f64 / events as f64)
    }
    /// Whether other work ran before or during it (so it may be skewed).
    pub fn disturbed(&self) -> bool {
        self.busy_before > QUIET_BUSY || !self.other_tracers.is_empty()
    }
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

/// Waits until the machine is quiet; returns how busy it was last.
pub(super) fn wait_quiet() -> Result<f64> {
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

/// kernel.bpf_stats_enabled, which the bench turns on only for the last
/// part of each churn ([`STATS_FROM`]): run_time_ns and run_cnt are only
/// counted then, and its two clock reads per program run would slow the
/// workload whose rate is measured. Off from the start, restored on drop.
pub(super) struct BpfStats {
    before: String,
}

/// Where in a churn run BPF statistics start: its last third.
pub(super) const STATS_FROM: f64 = 2.0 / 3.0;

/// Where in a churn run its rate is taken (from the start to here): before
/// [`STATS_FROM`] by a margin far wider than the churn's start-up, so that
/// the statistics' clock reads never slow the rate measured.
pub(super) const RATE_UNTIL: f64 = 0.6;

impl BpfStats {
    pub fn take() -> Result<BpfStats> {
        let before = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("cannot read {BPF_STATS}"))?
            .trim()
            .to_string();
        BpfStats::set(false)?;
        Ok(BpfStats { before })
    }

    pub fn set(on: bool) -> Result<()> {
        fs::write(BPF_STATS, if on { "1" } else { "0" })
            .with_context(|| format!("cannot write {BPF_STATS}"))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, &self.before);
    }
}

#[derive(Default)]
pub(super) struct ProgStats {
    pub programs: u64,
    /// Summed over the programs.
    pub run_time_ns: u64,
    pub recursion_misses: u64,
    /// Of the tracepoint program that ran most: one runs for every
    /// transition (tcptrace's catcher, tcpstates' only program); the reset
    /// programs run at most once per connection. tcptrace's socket callback
    /// runs for other socket events too, so it is not a measure of them.
    pub run_cnt: u64,
    /// Runs of all of them.
    pub runs_total: u64,
}

/// The BPF programs a process holds, from /proc/PID/fdinfo: run time of all
/// of them, per run of the busiest.
pub(super) fn prog_stats(pid: i32) -> Result<ProgStats> {
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
pub(super) fn fdinfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// utime + stime of a process, in ns.
pub(super) fn cpu_ns(pid: i32, clk_tck: u64) -> Result<u64> {
    cpu_split(pid, clk_tck).map(|(u, s)| u + s)
}

/// (utime, stime) of a process, in ns.
pub(super) fn cpu_split(pid: i32, clk_tck: u64) -> Result<(u64, u64)> {
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
pub(super) fn status_kb(pid: i32, key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[derive(Clone, Copy)]
pub(super) struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub(super) fn spread(mut v: Vec<f64>) -> Option<Spread> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        let s = spread(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(spread(vec![1.0, 2.0, 4.0, 3.0]).unwrap().median, 2.5);
    }
}

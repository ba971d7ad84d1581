//! tt-hookcost: what tcptrace's owner hooks cost system calls that involve
//! no TCP socket, on loops that do nothing else. `cargo xtask hook-cost`
//! runs it on this machine, and the kernel matrix inside each guest, so the
//! loops are written once.
//!
//! tt-hookcost [--tcptrace PATH] [--seconds S] [--rounds N]
//!             [--loops getppid,close,fork] [--paths auto,syscalls,none]
//!             [--console]
//!
//! Defaults: 1 s, 3 rounds, the getppid and close loops, all three paths.
//!
//! Loops (each call):
//! - getppid: getppid(), which no program hooks: what every system call of
//!   the host pays while a system-call tracepoint is attached;
//! - close: open /dev/null and close it (the close hook runs, on either
//!   path);
//! - fork: fork a child that exits at once, and wait for it.
//!
//! Tracers, each `tcptrace --port 9 -q --no-snapshot --no-timewait` (port 9
//! carries no traffic: every TCP transition is dropped in the kernel, so
//! only the hooks' own cost shows):
//! - auto: the default owner path, named as tcptrace names it at start
//!   (fentry, or system-call tracepoints where the kernel refuses fentry);
//! - syscalls: `--owner-hooks syscalls`, the forced fallback; left out when
//!   the default already took it (the same path twice);
//! - none: `--no-owner-hooks`.
//!
//! Each round measures every loop untraced and under each tracer (one
//! tracer start per round and tracer), the order turned by one each round
//! so that a drift of the machine's speed does not favour one of them.
//! Each rate is taken against the machine's speed at the same moments (see
//! [`sample`]). The figures are medians of the per-round rates; the
//! per-round ratios show the noise. With `--console` one line per loop and
//! tracer also goes to stdout for the kernel matrix to read:
//!
//! @@ hookcost path=fentry loop=getppid untraced=N traced=N rounds=R,R,R
//!
//! (rates in calls per second, medians over the rounds; R each round's
//! traced/untraced in percent, whose median is the figure).
//! Exit status 2 for bad arguments, 1 when tcptrace does not start.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio, exit};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A port no loop uses: tcptrace drops every transition in the kernel.
const QUIET_PORT: &str = "9";

/// How long a tracer may take to attach: a guest under software emulation
/// takes seconds to verify the programs.
const START_TIMEOUT: Duration = Duration::from_secs(120);

struct Loop {
    name: &'static str,
    what: &'static str,
    step: fn(),
    /// The clock its slices are timed by: the thread's CPU time, or for
    /// fork the monotonic clock, as the child's exit (which the exit hook
    /// slows) and the wait for it are not the parent's CPU time.
    clock: libc::clockid_t,
}

const LOOPS: [Loop; 3] = [
    Loop {
        name: "getppid",
        what: "getppid()",
        step: getppid,
        clock: libc::CLOCK_THREAD_CPUTIME_ID,
    },
    Loop {
        name: "close",
        what: "open(/dev/null) + close()",
        step: open_close,
        clock: libc::CLOCK_THREAD_CPUTIME_ID,
    },
    Loop {
        name: "fork",
        what: "fork() + child exit + waitpid()",
        step: fork_wait,
        clock: libc::CLOCK_MONOTONIC,
    },
];

fn getppid() {
    // SAFETY: no arguments, no memory.
    unsafe {
        libc::getppid();
    }
}

fn open_close() {
    // SAFETY: a NUL-terminated path; the descriptor is closed at once.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::close(fd);
        }
    }
}

fn fork_wait() {
    // SAFETY: the child only calls _exit, which is async-signal-safe.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::_exit(0);
        }
        if pid > 0 {
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
}

/// The loops are timed in slices of about this much CPU time, each
/// followed by a slice of arithmetic alone.
const SLICE: f64 = 0.001;

/// One loop's measurement.
#[derive(Clone, Copy)]
struct Sample {
    /// Calls per [`spin`] call: the median over the slices of each slice's
    /// rate over the arithmetic's in the slice after it.
    calls_per_spin: f64,
    /// The arithmetic's median speed, in [`spin`] calls per CPU second.
    spins: f64,
}

/// `clock` in seconds. The thread's CPU time leaves out the time it waited
/// for a CPU shared with other work.
fn now(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// How many times `f` runs in about [`SLICE`] of `clock`.
fn batch(clock: libc::clockid_t, mut f: impl FnMut()) -> u64 {
    let t = now(clock);
    let mut n = 0u64;
    while now(clock) - t < SLICE {
        f();
        n += 1;
    }
    n.max(1)
}

/// How many calls of a loop, and of [`spin`], make one slice; measured
/// once before the rounds.
#[derive(Clone, Copy)]
struct Batches {
    calls: u64,
    spins: u64,
}

fn batches(l: &Loop) -> Batches {
    let mut x = 1u64;
    let b = Batches {
        calls: batch(l.clock, l.step),
        spins: batch(l.clock, || x = spin(x)),
    };
    std::hint::black_box(x);
    b
}

/// `step`'s rate over `seconds`, against the machine's speed at the time.
///
/// Slices are timed in this thread's CPU time (but fork's, see [`Loop`]),
/// which leaves out the waits for a CPU that other work on this machine
/// causes. In a QEMU guest, the
/// waits of the emulator's threads for the host's cores are not seen by
/// the guest's kernel and stay in: there the guest's speed changes from one
/// millisecond to the next, and rates taken seconds apart, untraced then
/// traced, differed by up to a factor of 6 in a loaded 6.12 guest. So each
/// slice of the loop is followed by one of arithmetic that makes no system
/// call, which the hooks cannot slow; a slowdown hits both alike, and the
/// loop's rate over the arithmetic's keeps what the loop itself costs. The
/// median over the slices leaves out the pairs that a wait hit in one half
/// only. The clock is read only between slices: reading it is a system
/// call, which the hooks of the system-call path would slow.
fn sample(l: &Loop, seconds: f64, b: Batches) -> Sample {
    let limit = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut ratios = Vec::new();
    let mut speeds = Vec::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while started.elapsed() < limit {
        let t0 = now(l.clock);
        for _ in 0..b.calls {
            (l.step)();
        }
        let t1 = now(l.clock);
        for _ in 0..b.spins {
            x = spin(x);
        }
        let t2 = now(l.clock);
        if t1 > t0 && t2 > t1 {
            let speed = b.spins as f64 / (t2 - t1);
            ratios.push(b.calls as f64 / (t1 - t0) / speed);
            speeds.push(speed);
        }
    }
    std::hint::black_box(x);
    Sample {
        calls_per_spin: median(&ratios),
        spins: median(&speeds),
    }
}

/// Iterations of the arithmetic per [`spin`] call.
const SPIN: u64 = 64;

/// Arithmetic that makes no system call and touches no memory.
fn spin(mut x: u64) -> u64 {
    for _ in 0..SPIN {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = std::hint::black_box(x);
    }
    x
}

/// The tracers besides the untraced run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tracer {
    Auto,
    Syscalls,
    NoHooks,
}

impl Tracer {
    fn args(self) -> &'static [&'static str] {
        match self {
            Tracer::Auto => &[],
            Tracer::Syscalls => &["--owner-hooks", "syscalls"],
            Tracer::NoHooks => &["--no-owner-hooks"],
        }
    }
}

/// One column of measurements: untraced, or under a tracer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    Untraced,
    Traced(Tracer),
}

/// tcptrace attached, dropping every transition; killed on drop.
struct Attached {
    child: Child,
    /// The owner path its start line named: "fentry", "syscalls", or
    /// "none" (no line: --no-owner-hooks).
    path: String,
}

impl Attached {
    fn start(tcptrace: &PathBuf, tracer: Tracer) -> Attached {
        let mut child = Command::new(tcptrace)
            .args(["--port", QUIET_PORT, "-q", "--no-snapshot", "--no-timewait"])
            .args(tracer.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| die(&format!("cannot start {}: {e}", tcptrace.display())));
        let err = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let mut path = "none".to_string();
        let mut said = Vec::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.starts_with("tcptrace: tracing") => {
                    return Attached { child, path };
                }
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("tcptrace: owners: ") {
                        path = if rest.starts_with("fentry") {
                            "fentry".to_string()
                        } else {
                            "syscalls".to_string()
                        };
                    }
                    said.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    die(&format!(
                        "tcptrace {} did not start tracing within {} s; it said:\n{}",
                        tracer.args().join(" "),
                        START_TIMEOUT.as_secs(),
                        said.join("\n")
                    ))
                }
            }
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Opts {
    tcptrace: PathBuf,
    seconds: f64,
    rounds: u32,
    loops: Vec<&'static Loop>,
    tracers: Vec<Tracer>,
    console: bool,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        tcptrace: std::env::var_os("TCPTRACE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("tcptrace")),
        seconds: 1.0,
        rounds: 3,
        // fork's figure swings with when the child gets a CPU, far more
        // than the exit hook could cost it: asked for by name only.
        loops: LOOPS.iter().filter(|l| l.name != "fork").collect(),
        tracers: vec![Tracer::Auto, Tracer::Syscalls, Tracer::NoHooks],
        console: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| fail(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--tcptrace" => o.tcptrace = PathBuf::from(value()),
            "--seconds" => o.seconds = number(&a, &value(), 0.01, 600.0),
            "--rounds" => o.rounds = number(&a, &value(), 1.0, 1000.0) as u32,
            "--loops" => {
                o.loops = list(&value(), "--loops", |name| {
                    LOOPS.iter().find(|l| l.name == name)
                })
            }
            "--paths" => {
                o.tracers = list(&value(), "--paths", |name| match name {
                    "auto" => Some(Tracer::Auto),
                    "syscalls" => Some(Tracer::Syscalls),
                    "none" => Some(Tracer::NoHooks),
                    _ => None,
                })
            }
            "--console" => o.console = true,
            "-h" | "--help" => {
                println!(
                    "usage: tt-hookcost [--tcptrace PATH] [--seconds S] [--rounds N] \
                     [--loops getppid,close,fork] [--paths auto,syscalls,none] [--console]"
                );
                exit(0);
            }
            _ => fail(&format!("unknown argument {a:?}")),
        }
    }
    o
}

/// A comma-separated list of names, each known to `find`.
fn list<T>(v: &str, flag: &str, find: impl Fn(&str) -> Option<T>) -> Vec<T> {
    let out: Vec<T> = v
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|name| find(name).unwrap_or_else(|| fail(&format!("{flag}: unknown name {name:?}"))))
        .collect();
    if out.is_empty() {
        fail(&format!("{flag} needs at least one name"));
    }
    out
}

fn number(flag: &str, v: &str, min: f64, max: f64) -> f64 {
    match v.parse::<f64>() {
        Ok(n) if (min..=max).contains(&n) => n,
        _ => fail(&format!("{flag} {v:?}: give a number from {min} to {max}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("tt-hookcost: {msg}");
    exit(2)
}

fn die(msg: &str) -> ! {
    eprintln!("tt-hookcost: {msg}");
    exit(1)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    }
}

fn main() {
    let o = parse_args();
    let mut configs = vec![Config::Untraced];
    configs.extend(o.tracers.iter().map(|&t| Config::Traced(t)));
    // samples[config][loop]: one per round.
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); o.loops.len()]; configs.len()];
    let mut paths: Vec<String> = vec![String::new(); configs.len()];
    let mut skip = vec![false; configs.len()];
    let started = Instant::now();
    // The first calls of a fresh process run slower (page faults; in a
    // QEMU guest, code not yet translated): not in the first round.
    let sizes: Vec<Batches> = o
        .loops
        .iter()
        .map(|l| {
            let b = batches(l);
            sample(l, 0.2, b);
            batches(l)
        })
        .collect();
    for round in 0..o.rounds as usize {
        for k in 0..configs.len() {
            // The first round keeps the given order, so that the default
            // path is known before the forced one is measured.
            let c = (k + round) % configs.len();
            if skip[c] {
                continue;
            }
            if configs[c] == Config::Traced(Tracer::Syscalls)
                && let Some(auto) = configs
                    .iter()
                    .position(|&x| x == Config::Traced(Tracer::Auto))
                && paths[auto] == "syscalls"
            {
                // The kernel refused fentry: the default is the fallback.
                skip[c] = true;
                paths[c] = "syscalls".to_string();
                continue;
            }
            let tracer = match configs[c] {
                Config::Untraced => None,
                Config::Traced(t) => Some(Attached::start(&o.tcptrace, t)),
            };
            if let Some(t) = &tracer {
                paths[c] = t.path.clone();
            }
            for (i, l) in o.loops.iter().enumerate() {
                samples[c][i].push(sample(l, o.seconds, sizes[i]));
            }
        }
    }
    // Calls per second of the machine at its usual speed: the median of
    // the arithmetic's speeds over every loop, tracer and round.
    let speeds: Vec<f64> = samples
        .iter()
        .flatten()
        .flatten()
        .map(|s| s.spins)
        .collect();
    let usual = median(&speeds);
    let rates: Vec<Vec<Vec<f64>>> = samples
        .iter()
        .map(|per_loop| {
            per_loop
                .iter()
                .map(|v| v.iter().map(|s| s.calls_per_spin * usual).collect())
                .collect()
        })
        .collect();
    let ratios = |c: usize, i: usize, rates: &[Vec<Vec<f64>>]| -> Vec<String> {
        rates[c][i]
            .iter()
            .zip(&rates[0][i])
            .map(|(t, b)| format!("{:.1}", 100.0 * t / b))
            .collect()
    };
    let label = |c: usize| match configs[c] {
        Config::Untraced => "untraced".to_string(),
        Config::Traced(Tracer::Auto) => paths[c].clone(),
        Config::Traced(Tracer::Syscalls) => format!("{} (forced)", paths[c]),
        Config::Traced(Tracer::NoHooks) => "no owner hooks".to_string(),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "hook cost: {} rounds of {} s per loop and tracer, interleaved ({:.0} s); \
         tcptrace --port {QUIET_PORT} drops every TCP transition in the kernel",
        o.rounds,
        o.seconds,
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        out,
        "rates: slices of {:.0} ms of CPU time, each loop's against arithmetic's after it \
         (a machine that slows slows both), at the arithmetic's usual speed; medians; \
         ratio: the median of the rounds' traced / untraced",
        SLICE * 1000.0
    );
    let _ = writeln!(
        out,
        "{:<8} {:<32} {:<18} {:>12} {:>12} {:>7} {:>9}  per round",
        "loop", "each call", "tcptrace", "untraced /s", "traced /s", "ratio", "added ns"
    );
    for (i, l) in o.loops.iter().enumerate() {
        let bare = median(&rates[0][i]);
        for c in 1..configs.len() {
            if skip[c] {
                continue;
            }
            let traced = median(&rates[c][i]);
            // Each round's traced rate against the untraced one of the
            // same round, taken seconds apart: the median of those ratios
            // is steadier than the ratio of the medians when the
            // machine's speed drifts between rounds.
            let per_round: Vec<f64> = rates[c][i]
                .iter()
                .zip(&rates[0][i])
                .map(|(t, b)| 100.0 * t / b)
                .collect();
            let _ = writeln!(
                out,
                "{:<8} {:<32} {:<18} {:>12.0} {:>12.0} {:>6.1}% {:>9.0}  {}",
                l.name,
                l.what,
                label(c),
                bare,
                traced,
                median(&per_round),
                1e9 / traced - 1e9 / bare,
                ratios(c, i, &rates).join(" ")
            );
        }
    }
    if let Some(c) = skip.iter().position(|&s| s) {
        let _ = writeln!(
            out,
            "(the default took {}: --owner-hooks syscalls is the same path, measured once)",
            paths[c]
        );
    }
    if o.console {
        for (i, l) in o.loops.iter().enumerate() {
            for c in 1..configs.len() {
                if skip[c] {
                    continue;
                }
                let path = match configs[c] {
                    Config::Traced(Tracer::NoHooks) => "none".to_string(),
                    _ => paths[c].clone(),
                };
                let _ = writeln!(
                    out,
                    "@@ hookcost path={path} loop={} untraced={:.0} traced={:.0} rounds={}",
                    l.name,
                    median(&rates[0][i]),
                    median(&rates[c][i]),
                    ratios(c, i, &rates).join(",")
                );
            }
        }
    }
}

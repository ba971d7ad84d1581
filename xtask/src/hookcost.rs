//! `cargo xtask hook-cost`: what following a socket's holders costs the
//! system calls it hooks, on loops that do nothing else.
//!
//! tcptrace hooks close() (to see a descriptor given up while another
//! process still holds the socket), fork and exit, and accept. The churn of
//! `cargo xtask bench` exercises accept; these loops exercise the others,
//! where every call runs a program although no TCP socket is involved:
//! - close: open /dev/null and close it;
//! - fork: fork a child that exits at once, and wait for it.
//!
//! - syscall: getppid(), which no program hooks: what any system call of
//!   the host pays once a system-call tracepoint is enabled.
//!
//! Each loop runs untraced, under `tcptrace --no-owner-hooks` and under
//! tcptrace (both filtering out every TCP transition, so only the hooks'
//! own cost shows), and with `--against BINARY` under that tcptrace too,
//! interleaved over rounds; the figures are medians of the per-round
//! rates, in calls per CPU second of the loop (its children's included).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A port no loop uses: tcptrace drops every transition in the kernel.
const QUIET_PORT: &str = "9";

struct Loop {
    name: &'static str,
    what: &'static str,
    step: fn(),
}

const LOOPS: [Loop; 3] = [
    Loop {
        name: "syscall",
        what: "getppid()",
        step: getppid,
    },
    Loop {
        name: "close",
        what: "open(/dev/null) + close()",
        step: open_close,
    },
    Loop {
        name: "fork",
        what: "fork() + child exit + waitpid()",
        step: fork_wait,
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

/// CPU time this thread and its reaped children have used, in seconds:
/// what the hooks add is charged to the task making the call (the fork
/// loop's exits to the children).
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime and getrusage fill the structs they are given.
    let children = unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9 + children
}

/// Calls of `step` per CPU second, over `seconds` of wall time. Per CPU
/// second rather than per second: on a machine shared with other work
/// the loop's share of a CPU varies far more than what a call costs.
fn rate(step: fn(), seconds: f64) -> f64 {
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    let limit = Duration::from_secs_f64(seconds);
    let mut n: u64 = 0;
    while started.elapsed() < limit {
        for _ in 0..64 {
            step();
        }
        n += 64;
    }
    n as f64 / (cpu_seconds() - cpu_before)
}

/// tcptrace attached, dropping every transition; killed on drop.
struct Attached(Child);

impl Attached {
    fn start(tcptrace: &Path, hooks: bool) -> Result<Attached> {
        let mut child = Command::new(tcptrace)
            .args(["--port", QUIET_PORT, "-q", "--no-snapshot", "--no-timewait"])
            .args((!hooks).then_some("--no-owner-hooks"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", tcptrace.display()))?;
        let err = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.starts_with("tcptrace: tracing") => return Ok(Attached(child)),
                Ok(_) => {}
                Err(_) => bail!("tcptrace did not start tracing within 60 s"),
            }
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(tcptrace: &Path, against: Option<&Path>, seconds: f64, rounds: u32) -> Result<()> {
    println!("hook cost: {rounds} rounds of {seconds} s per loop and configuration, interleaved");
    print!(
        "{:<8} {:<32} {:>12} {:>12} {:>12} {:>7} {:>9}",
        "loop", "each call", "untraced /s", "no hooks /s", "traced /s", "ratio", "added ns"
    );
    if let Some(other) = against {
        print!("  {:>12} {:>7} {:>9}", "against /s", "ratio", "added ns");
        println!();
        println!("(against: {})", other.display());
    } else {
        println!();
    }
    for l in &LOOPS {
        let (mut bare, mut unhooked, mut traced, mut other) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            bare.push(rate(l.step, seconds));
            let mut runs = vec![
                (tcptrace, false, &mut unhooked),
                (tcptrace, true, &mut traced),
            ];
            if let Some(o) = against {
                runs.push((o, true, &mut other));
            }
            for (bin, hooks, rates) in runs {
                let t = Attached::start(bin, hooks)?;
                rates.push(rate(l.step, seconds));
                drop(t);
            }
        }
        let (b, u, t) = (
            median(&mut bare),
            median(&mut unhooked),
            median(&mut traced),
        );
        // Against the untraced loop: the hooks' cost shows as the gap
        // between the no-hooks and traced columns.
        let added_ns = |rate: f64| (1e9 / rate - 1e9 / b).max(0.0);
        print!(
            "{:<8} {:<32} {:>12.0} {:>12.0} {:>12.0} {:>6.1}% {:>9.0}",
            l.name,
            l.what,
            b,
            u,
            t,
            100.0 * t / b,
            added_ns(t)
        );
        if !other.is_empty() {
            let o = median(&mut other);
            print!("  {:>12.0} {:>6.1}% {:>9.0}", o, 100.0 * o / b, added_ns(o));
        }
        println!();
    }
    Ok(())
}

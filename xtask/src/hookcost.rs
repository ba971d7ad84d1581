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
//! Each loop runs untraced and under tcptrace (filtering out every TCP
//! transition, so only the hooks' own cost shows), interleaved over rounds;
//! the figures are medians of the per-round rates.

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

const LOOPS: [Loop; 2] = [
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

/// Calls per second of `step` over `seconds`.
fn rate(step: fn(), seconds: f64) -> f64 {
    let started = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    let mut n: u64 = 0;
    while started.elapsed() < limit {
        for _ in 0..64 {
            step();
        }
        n += 64;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// tcptrace attached, dropping every transition; killed on drop.
struct Attached(Child);

impl Attached {
    fn start(tcptrace: &Path) -> Result<Attached> {
        let mut child = Command::new(tcptrace)
            .args(["--port", QUIET_PORT, "-q", "--no-snapshot", "--no-timewait"])
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

pub fn run(tcptrace: &Path, seconds: f64, rounds: u32) -> Result<()> {
    println!("hook cost: {rounds} rounds of {seconds} s per loop and configuration, interleaved");
    println!(
        "{:<8} {:<34} {:>14} {:>14} {:>8} {:>12}",
        "loop", "each call", "untraced /s", "traced /s", "ratio", "added ns"
    );
    for l in &LOOPS {
        let (mut bare, mut traced) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            bare.push(rate(l.step, seconds));
            let t = Attached::start(tcptrace)?;
            traced.push(rate(l.step, seconds));
            drop(t);
        }
        let (b, t) = (median(&mut bare), median(&mut traced));
        let added_ns = (1e9 / t - 1e9 / b).max(0.0);
        println!(
            "{:<8} {:<34} {:>14.0} {:>14.0} {:>7.1}% {:>12.0}",
            l.name,
            l.what,
            b,
            t,
            100.0 * t / b,
            added_ns
        );
    }
    Ok(())
}

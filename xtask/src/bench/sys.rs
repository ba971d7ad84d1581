//! What the bench needs from the system beside std: signals, the clock
//! tick, wait4's resource usage, and quiet commands. A leaf: every other
//! part of the bench may use it.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

unsafe extern "C" {
    pub(crate) fn kill(pid: i32, sig: i32) -> i32;
    fn signal(sig: i32, handler: usize) -> usize;
    fn sysconf(name: i32) -> i64;
    pub(super) fn wait4(pid: i32, status: *mut i32, options: i32, rusage: *mut Rusage) -> i32;
}

pub(super) const SIGINT: i32 = 2;
pub(super) const SIGKILL: i32 = 9;
const SC_CLK_TCK: i32 = 2;

/// struct rusage on 64-bit Linux: two timevals, then fourteen longs.
#[repr(C)]
#[derive(Default)]
pub(super) struct Rusage {
    pub utime: [i64; 2],
    pub stime: [i64; 2],
    pub maxrss_kb: i64,
    rest: [i64; 13],
}

/// From now on SIGINT (Ctrl-C) only sets a flag, which the bench checks
/// between steps, so that it stops with its tracers, namespaces and BPF
/// statistics cleaned up.
pub(super) fn catch_sigint() {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe { signal(SIGINT, on_sigint as extern "C" fn(i32) as usize) };
}

pub(super) fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Clock ticks per second, the unit of /proc/PID/stat's CPU times.
pub(super) fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { sysconf(SC_CLK_TCK) } {
        t if t > 0 => t as u64,
        _ => 100,
    }
}

pub(super) fn run_quiet(cmd: &mut Command) -> Result<()> {
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

//! `cargo xtask hook-cost`: what following a socket's holders costs system
//! calls that involve no TCP socket, on loops that do nothing else.
//!
//! The loops and the tracers are tt-hookcost's (tests/bin/hookcost.rs),
//! which the kernel matrix also runs inside each guest: getppid() (what
//! every system call of the host pays while a system-call tracepoint is
//! attached) and open+close of /dev/null (the close hook), each
//! untraced, under the default owner path, under
//! `--owner-hooks syscalls` (where the default is fentry) and under
//! `--no-owner-hooks`, interleaved over rounds. Each loop runs in slices of
//! 1 ms of CPU time, each taken against a slice of arithmetic after it (the
//! machine's speed at that moment), the figures medians.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

pub fn run(root: &Path, seconds: f64, rounds: u32, loops: &str) -> Result<()> {
    crate::cargo(&["build", "--release", "--package", "tcptrace"])?;
    crate::cargo(&[
        "build",
        "--release",
        "--package",
        "tcptrace-tests",
        "--bin",
        "tt-hookcost",
    ])?;
    let status = Command::new(root.join("target/release/tt-hookcost"))
        .arg("--tcptrace")
        .arg(root.join("target/release/tcptrace"))
        .args(["--seconds", &seconds.to_string()])
        .args(["--rounds", &rounds.to_string()])
        .args(["--loops", loops])
        .status()
        .context("cannot run tt-hookcost")?;
    if !status.success() {
        bail!("tt-hookcost failed ({status})");
    }
    Ok(())
}

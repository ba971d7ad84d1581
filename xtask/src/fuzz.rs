//! `cargo xtask fuzz`: run tcptrace's cargo-fuzz targets for a while each.
//!
//! A crash leaves its input in tcptrace/fuzz/artifacts/TARGET/; fix the bug,
//! then copy the input to tcptrace/fuzz/regressions/TARGET/, where the unit
//! tests replay it for good.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

pub const TARGETS: [&str; 2] = ["recording", "arguments"];

pub fn run(root: &Path, seconds: u64, targets: &[String]) -> Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("xtask: installing cargo-fuzz");
        crate::status("cargo", &["install", "cargo-fuzz", "--locked"])?;
    }
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    for t in &targets {
        if !TARGETS.contains(t) {
            bail!(
                "no fuzz target {t:?}; the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    let dir = root.join("tcptrace");
    for target in targets {
        std::fs::create_dir_all(dir.join("fuzz/corpus").join(target))?;
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let st = Command::new("cargo")
            .current_dir(&dir)
            .args(["+nightly", "fuzz", "run", "-O", "-a", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-rss_limit_mb=4096")
            .status()
            .with_context(|| format!("cannot run cargo fuzz for {target}"))?;
        if !st.success() {
            bail!(
                "fuzz target {target} found a crash: its input is in tcptrace/fuzz/artifacts/{target}/; \
                 once fixed, keep it in tcptrace/fuzz/regressions/{target}/"
            );
        }
    }
    Ok(())
}

//! Another revision of tcptrace, built beside this one, so that the bench
//! runs both in the same session, interleaved: on a shared, noisy machine
//! only figures from one run compare.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::output;

/// Builds tcptrace at `rev` (a commit, tag or branch) in its own worktree
/// under target/against/, with its target directory, and returns the binary.
/// A second run reuses both.
pub fn build(root: &Path, rev: &str) -> Result<PathBuf> {
    let commit = output(
        "git",
        &["rev-parse", "--verify", &format!("{rev}^{{commit}}")],
    )
    .with_context(|| format!("{rev:?} is not a revision of this repository"))?;
    let commit = commit.trim();
    let against = root.join("target/against");
    let tree = against.join(&commit[..12]);
    if !tree.join("Cargo.toml").exists() {
        let _ = std::fs::remove_dir_all(&tree);
        let _ = Command::new("git").args(["worktree", "prune"]).status();
        let st = Command::new("git")
            .args(["worktree", "add", "--detach"])
            .arg(&tree)
            .arg(commit)
            .status()
            .context("cannot run git worktree")?;
        if !st.success() {
            bail!("git worktree add {} {commit} failed", tree.display());
        }
    }
    // Its own target directory: in one shared between revisions, cargo
    // kept the eBPF object of the revision built before (a base whose
    // userspace then refused the other's object).
    let target = tree.join("target");
    eprintln!(
        "xtask: building tcptrace at {} for the comparison",
        &commit[..12]
    );
    let st = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "--package", "tcptrace"])
        .current_dir(&tree)
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .context("cannot run cargo")?;
    if !st.success() {
        bail!("building tcptrace at {commit} failed");
    }
    Ok(target.join("release/tcptrace"))
}

//! `cargo xtask`: set up, build, run and test tcptrace from a fresh machine.
//!
//! Everything a fresh machine lacks is installed here, not by hand: the
//! nightly toolchain's `rust-src` (the eBPF crate builds `core` itself) and a
//! bpf-linker matching that nightly's LLVM.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod baseline;
mod bench;
mod dist;
mod fuzz;
mod hookcost;
mod kernels;
mod oci;
mod soak;

/// bpf-linker 0.11 and later default to LLVM 23, which this nightly is not.
const BPF_LINKER_VERSION: &str = "0.10.1";
const NIGHTLY: &str = "nightly";

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing, build in release mode and run tcptrace with
    /// the privileges it needs. Arguments after `--` go to tcptrace.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Install what is missing, then check formatting, run clippy, the unit
    /// tests and the real-kernel integration tests (needs root).
    Test {
        /// Extra arguments for the test binaries (a test name filter, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build in release mode and install the binary where `sudo tcptrace`
    /// finds it.
    Install {
        /// Installation prefix; the binary goes to PREFIX/bin.
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
    },
    /// Only install the build prerequisites.
    Setup,
    /// Measure what the owner hooks cost system calls that involve no TCP
    /// socket: getppid, open+close and fork loops, untraced and under each
    /// owner path tcptrace can take here, interleaved (needs root; the
    /// kernel matrix runs the same loops in each guest).
    HookCost {
        /// Seconds per loop, configuration and round.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Loops to run: getppid, close, fork (fork's figure is mostly
        /// noise: when the child gets a CPU).
        #[arg(long, default_value = "getppid,close")]
        loops: String,
    },
    /// Build the release for production hosts in target/dist/: static
    /// x86_64 and aarch64 binaries (musl) with the eBPF object inside, man
    /// pages, completions and a systemd unit, as a tarball and a .deb for
    /// each architecture; and an OCI image archive of the binary for each.
    Dist,
    /// Run the cargo-fuzz targets (recording reader, argument parsers) for
    /// SECONDS each; installs cargo-fuzz if missing.
    Fuzz {
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Churn plus recording for MINUTES, then check: every transition
    /// accounted for, RSS flat, the recording readable (needs root).
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Churn client threads (1 is about 30k connections/s here).
        #[arg(long, default_value_t = 1)]
        clients: u32,
    },
    /// Measure tracing at the machine's fastest connection churn: untraced,
    /// tcptrace (text, recording) and libbpf-tools tcpstates, interleaved;
    /// then `tcptrace read` and `report` throughput (needs root).
    Bench {
        /// Seconds of churn per configuration and round.
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        /// Rounds; each runs every configuration once.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Churn mode: client-closes-first, server-closes-first or reset.
        #[arg(long, default_value = "client-closes-first")]
        mode: String,
        /// Where to write all figures as JSON.
        #[arg(long, value_name = "FILE", default_value = "target/bench.json")]
        json: PathBuf,
        /// The churn's server port (the tracers filter on it).
        #[arg(long, default_value_t = 24680)]
        port: u16,
        /// Churn client threads.
        #[arg(long, default_value_t = 2)]
        clients: u32,
        /// Churn acceptor threads (one listener each).
        #[arg(long, default_value_t = 1)]
        acceptors: u32,
        /// Configurations to run: untraced, attached (tcptrace filtering
        /// out every transition in the kernel: the probes' own cost), text,
        /// record, tcpstates.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "untraced,attached,text,record,tcpstates"
        )]
        configs: Vec<String>,
        /// Times a run disturbed by other work (another tracer, a busy
        /// machine) is repeated.
        #[arg(long, default_value_t = 2)]
        retries: u32,
        /// Also run the attached, text and record configurations with the
        /// tcptrace of this revision (`main`, a commit, a tag), built in
        /// target/against/, interleaved with this build's in the same run.
        #[arg(long, value_name = "REV")]
        against: Option<String>,
    },
    /// Boot Debian 12's kernels under QEMU and run the real-kernel
    /// scenarios there with the static binary (needs root).
    TestKernels {
        /// Debian kernel packages, releases, or 6.1 / 6.12 for the newest
        /// of a series (default: 6.1 and 6.12).
        kernels: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let root = workspace_root();
    env::set_current_dir(&root)?;
    match cli.command {
        Cmd::Setup => setup().map(|()| ExitCode::SUCCESS),
        Cmd::HookCost {
            seconds,
            rounds,
            loops,
        } => {
            setup()?;
            hookcost::run(&root, seconds, rounds, &loops).map(|()| ExitCode::SUCCESS)
        }
        Cmd::Dist => {
            setup()?;
            dist::run(&root).map(|_| ExitCode::SUCCESS)
        }
        Cmd::Run { args } => {
            setup()?;
            cargo(&["build", "--release", "--package", "tcptrace"])?;
            let bin = root.join("target/release/tcptrace");
            Ok(exec_privileged(&bin, &args)?)
        }
        Cmd::Test { args } => {
            setup()?;
            test(&root, &args).map(|()| ExitCode::SUCCESS)
        }
        Cmd::Bench {
            seconds,
            rounds,
            mode,
            json,
            port,
            clients,
            acceptors,
            mut configs,
            retries,
            against,
        } => {
            setup()?;
            let baseline = match &against {
                Some(rev) => {
                    for c in ["attached", "text", "record"] {
                        if configs.iter().any(|k| k == c) {
                            configs.push(format!("{c}@base"));
                        }
                    }
                    Some(baseline::build(&root, rev)?)
                }
                None => None,
            };
            cargo(&[
                "build",
                "--release",
                "--package",
                "tcptrace",
                "--package",
                "tcptrace-tests",
            ])?;
            let opts = bench::Options {
                seconds,
                rounds,
                mode,
                json: root.join(json),
                port,
                clients,
                acceptors,
                configs,
                retries,
                baseline,
            };
            bench::run(&root, &opts).map(|()| ExitCode::SUCCESS)
        }
        Cmd::Install { prefix } => {
            setup()?;
            cargo(&["build", "--release", "--package", "tcptrace"])?;
            install(&root.join("target/release/tcptrace"), &prefix)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fuzz { seconds, targets } => {
            setup()?;
            fuzz::run(&root, seconds, &targets).map(|()| ExitCode::SUCCESS)
        }
        Cmd::Soak { minutes, clients } => {
            setup()?;
            cargo(&[
                "build",
                "--release",
                "--package",
                "tcptrace",
                "--package",
                "tcptrace-tests",
            ])?;
            soak::run(&root, minutes, clients).map(|()| ExitCode::SUCCESS)
        }
        Cmd::TestKernels { kernels } => {
            setup()?;
            kernels::run(&root, &kernels).map(|()| ExitCode::SUCCESS)
        }
    }
}

/// The binary in PREFIX/bin, its man page in PREFIX/share/man/man1, and
/// completions where bash, zsh and fish look for them under PREFIX.
fn install(bin: &Path, prefix: &Path) -> Result<()> {
    let put = |dir: PathBuf, name: &str, content: Option<&[u8]>| -> Result<PathBuf> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let dest = dir.join(name);
        match content {
            Some(bytes) => std::fs::write(&dest, bytes),
            None => std::fs::copy(bin, &dest).map(|_| ()),
        }
        .with_context(|| format!("cannot install {}", dest.display()))?;
        eprintln!("xtask: installed {}", dest.display());
        Ok(dest)
    };
    put(prefix.join("bin"), "tcptrace", None)?;
    let generated = |what: &str| dist::generated(bin, what);
    for (what, page) in [
        ("man", "tcptrace.1"),
        ("man-read", "tcptrace-read.1"),
        ("man-report", "tcptrace-report.1"),
    ] {
        put(prefix.join("share/man/man1"), page, Some(&generated(what)?))?;
    }
    put(
        prefix.join("share/bash-completion/completions"),
        "tcptrace",
        Some(&generated("bash")?),
    )?;
    put(
        prefix.join("share/zsh/site-functions"),
        "_tcptrace",
        Some(&generated("zsh")?),
    )?;
    put(
        prefix.join("share/fish/vendor_completions.d"),
        "tcptrace.fish",
        Some(&generated("fish")?),
    )?;
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Installs the nightly `rust-src` and bpf-linker if they are missing.
fn setup() -> Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"])?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        eprintln!("xtask: installing the nightly toolchain (for the eBPF build)");
        status(
            "rustup",
            &[
                "toolchain",
                "install",
                NIGHTLY,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ],
        )?;
    }
    let components = output(
        "rustup",
        &["component", "list", "--toolchain", NIGHTLY, "--installed"],
    )?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for the nightly toolchain");
        status(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", NIGHTLY],
        )?;
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    let have = linker
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !have.contains(BPF_LINKER_VERSION) {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (about 2 minutes)");
        status(
            "cargo",
            &[
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
            ],
        )?;
    }
    Ok(())
}

/// Debian's chromium renders the HTML report in the tests.
fn ensure_chromium() -> Result<()> {
    if which("chromium") {
        return Ok(());
    }
    if !which("apt-get") || !is_root() {
        bail!(
            "the tests need Debian's chromium (apt-get install chromium) to render the HTML report"
        );
    }
    eprintln!("xtask: installing chromium (for the HTML report test)");
    let _ = status("apt-get", &["update", "-qq"]);
    status("apt-get", &["install", "-y", "-qq", "chromium"])
}

/// nft drops the handshake's last ACK in the Fast Open owner scenario
/// (tests/owners.rs), so that the child waits in SYN_RECV.
fn ensure_nft() -> Result<()> {
    install_missing(
        &[("nftables", Path::new("/usr/sbin/nft").is_file())],
        &["--no-install-recommends"],
        "for the Fast Open owner scenario",
    )
}

/// The fleet's real components: Debian's Prometheus scrapes `--metrics`
/// in tests/otlp.rs (which fails, saying so, where it is missing); skopeo
/// checks the OCI image archive in tests/package.rs.
fn ensure_fleet() -> Result<()> {
    install_missing(
        &[
            ("prometheus", Path::new("/usr/bin/prometheus").is_file()),
            ("skopeo", which("skopeo")),
        ],
        &["--no-install-recommends"],
        "for the fleet's paths",
    )
}

/// The real servers of tests/servers.rs, at the paths the tests run them
/// from (Debian's postgres is outside PATH, under its major version).
fn ensure_servers() -> Result<()> {
    let postgres = || {
        std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|versions| {
            versions
                .flatten()
                .any(|v| v.path().join("bin/postgres").is_file())
        })
    };
    install_missing(
        &[
            ("nginx-light", Path::new("/usr/sbin/nginx").is_file()),
            ("postgresql", postgres() && which("pgbench")),
            ("wrk", which("wrk")),
            ("redis-server", which("redis-server")),
        ],
        &[],
        "to check owners on real servers",
    )
}

/// Installs the Debian packages of `wanted` not marked present, saying
/// what they are `for`.
fn install_missing(wanted: &[(&str, bool)], options: &[&str], what_for: &str) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, present)| !present)
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !which("apt-get") || !is_root() {
        bail!(
            "the tests need Debian's {} (apt-get install {0}) {what_for}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {} ({what_for})", missing.join(", "));
    let _ = status("apt-get", &["update", "-qq"]);
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(options);
    args.extend(&missing);
    status("apt-get", &args)
}

fn test(root: &Path, extra: &[OsString]) -> Result<()> {
    ensure_chromium()?;
    ensure_servers()?;
    ensure_fleet()?;
    ensure_nft()?;
    cargo(&["fmt", "--all", "--", "--check"])
        .context("formatting differs: run `cargo fmt --all`")?;
    cargo(&[
        "clippy",
        "--package",
        "tcptrace-common",
        "--package",
        "tcptrace-core",
        "--package",
        "tcptrace",
        "--package",
        "xtask",
        "--package",
        "tcptrace-tests",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The integration tests run the real binary against the real kernel,
    // and install the release's .deb. The optimized build, as users run it:
    // rows out of time order under full churn once showed only there.
    cargo(&["build", "--release", "--package", "tcptrace"])?;
    let release = dist::run(root)?;
    let mut cmd = Command::new(cargo_bin());
    // The eBPF crate only builds for the BPF target.
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        "tcptrace-ebpf",
        "--no-fail-fast",
        "--",
    ]);
    cmd.args(extra);
    cmd.env("TCPTRACE_BIN", root.join("target/release/tcptrace"));
    cmd.env("TCPTRACE_DEB", &release.deb);
    cmd.env("TCPTRACE_TARBALL", &release.tarball);
    cmd.env("TCPTRACE_ARM64_DEB", &release.arm64_deb);
    cmd.env("TCPTRACE_ARM64_TARBALL", &release.arm64_tarball);
    cmd.env("TCPTRACE_OCI", &release.image);
    cmd.env("TCPTRACE_ARM64_OCI", &release.arm64_image);
    if !is_root() {
        if which("sudo") {
            eprintln!(
                "xtask: the integration tests need root; running the test binaries with sudo"
            );
            cmd.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
        } else {
            bail!(
                "the integration tests load eBPF programs and create network namespaces: run `cargo xtask test` as root"
            );
        }
    }
    let host = tally(cmd);
    // The same scenarios on the kernels users have.
    let matrix = kernels::run(root, &[]);
    host.and(matrix)
}

/// Runs the tests, passing their output through, and ends with one line
/// adding up every test binary's result.
fn tally(mut cmd: Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            // "ok. 3 passed; 0 failed; 1 ignored; ..."
            let words: Vec<&str> = rest
                .split([' ', ';', '.'])
                .filter(|w| !w.is_empty())
                .collect();
            for pair in words.windows(2) {
                let n = pair[0].parse::<u64>().unwrap_or(0);
                match pair[1] {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let st = child.wait()?;
    println!("xtask: {passed} passed, {failed} failed, {ignored} skipped");
    if !st.success() || failed > 0 {
        bail!("tests failed ({st})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Runs tcptrace as root: directly when we are, through sudo otherwise.
fn exec_privileged(bin: &Path, args: &[OsString]) -> Result<ExitCode> {
    let mut cmd = if is_root() {
        Command::new(bin)
    } else if which("sudo") {
        let mut c = Command::new("sudo");
        c.arg(bin);
        c
    } else {
        bail!(
            "tcptrace needs root (CAP_BPF and CAP_PERFMON) and there is no sudo here: \
             run `cargo xtask run` as root, or {} as root",
            bin.display()
        );
    };
    let status = cmd
        .args(args)
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { geteuid() == 0 }
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

fn which(program: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|d| d.join(program).is_file()))
}

fn cargo_bin() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

pub(crate) fn cargo(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(cargo_bin());
    cmd.args(args);
    check(cmd)
}

pub(crate) fn status(program: &str, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    check(cmd)
}

pub(crate) fn check(mut cmd: Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

pub(crate) fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

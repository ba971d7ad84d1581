//! The tcptrace process under test: started with a builder for its flags,
//! stopped the way a user stops it, and what it printed, read back as rows
//! and counters.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::host::TempDir;
use crate::netns::Netns;
use crate::rows::{Life, Row};

/// The tcptrace binary under test: `TCPTRACE_BIN` (set by `cargo xtask
/// test`), else the workspace's debug build.
pub fn tcptrace_bin() -> PathBuf {
    let bin = std::env::var_os("TCPTRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/debug/tcptrace"
            ))
        });
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo xtask test`, or `cargo build -p tcptrace` first",
        bin.display()
    );
    bin
}

/// Flags every tracer under test gets first, from `TCPTRACE_TEST_ARGS`
/// (split at spaces): the kernel matrix runs the owner scenarios again
/// with `--owner-hooks syscalls`, so that one kernel tests both paths.
pub fn test_args() -> Vec<String> {
    std::env::var("TCPTRACE_TEST_ARGS")
        .map(|a| a.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Runs tcptrace to completion (read, report, bad input).
pub fn tcptrace(args: &[&str]) -> Output {
    Output::of(
        Command::new(tcptrace_bin())
            .args(args)
            .output()
            .expect("run tcptrace"),
    )
}

/// tcptrace run as the unprivileged user "nobody" with no capabilities at
/// all, from a copy in `dir` (the build may sit where nobody cannot enter).
pub fn as_nobody(dir: &TempDir, args: &[&str]) -> Output {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.path("tcptrace");
    std::fs::copy(tcptrace_bin(), &bin).expect("copy tcptrace");
    for p in [&dir.0.to_string_lossy().into_owned(), &bin] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    Output::of(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
            .arg(&bin)
            .args(args)
            .output()
            .expect("setpriv"),
    )
}

/// A tcptrace about to start: `Tracer::builder()`, its flags, `start()`.
#[must_use]
pub struct TracerBuilder {
    program: PathBuf,
    args: Vec<String>,
    command: Vec<String>,
    env: Vec<(String, Option<OsString>)>,
    only_caps: Option<Vec<String>>,
    stdout: Option<Stdio>,
}

impl TracerBuilder {
    /// Any flag the builder has no method for.
    pub fn arg(mut self, arg: impl ToString) -> Self {
        self.args.push(arg.to_string());
        self
    }

    pub fn args(self, args: &[&str]) -> Self {
        args.iter().fold(self, |b, a| b.arg(a))
    }

    /// `--port P`.
    pub fn port(self, port: u16) -> Self {
        self.arg("--port").arg(port)
    }

    /// `--port P1,P2,...`.
    pub fn ports(self, ports: &[u16]) -> Self {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        self.arg("--port").arg(list.join(","))
    }

    /// `--netns PATH`: only this namespace's sockets.
    pub fn netns(self, ns: &Netns) -> Self {
        self.arg("--netns").arg(ns.path())
    }

    /// `--format json`.
    pub fn json(self) -> Self {
        self.arg("--format").arg("json")
    }

    /// `--time utc|relative|none|local`.
    pub fn time(self, time: &str) -> Self {
        self.arg("--time").arg(time)
    }

    /// `-w FILE`: record.
    pub fn write(self, file: &str) -> Self {
        self.arg("-w").arg(file)
    }

    /// `-q`: nothing on stdout.
    pub fn quiet(self) -> Self {
        self.arg("-q")
    }

    /// `--no-snapshot`: only what the scenario makes.
    pub fn no_snapshot(self) -> Self {
        self.arg("--no-snapshot")
    }

    /// `--no-timewait`: exact counts, no rows from polling the table.
    pub fn no_timewait(self) -> Self {
        self.arg("--no-timewait")
    }

    /// `--stuck DURATION`.
    pub fn stuck(self, after: &str) -> Self {
        self.arg("--stuck").arg(after)
    }

    /// `-- COMMAND...`: trace while it runs.
    pub fn command(mut self, command: &[&str]) -> Self {
        self.command = command.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Another tcptrace than the one under test (the installed package's).
    pub fn program(mut self, program: &str) -> Self {
        self.program = PathBuf::from(program);
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<OsString>) -> Self {
        self.env.push((key.to_string(), Some(value.into())));
        self
    }

    pub fn env_remove(mut self, key: &str) -> Self {
        self.env.push((key.to_string(), None));
        self
    }

    /// As root holding only the capabilities `caps` (setpriv's names:
    /// "bpf", "perfmon", ...), none inheritable.
    pub fn only_caps(mut self, caps: &[&str]) -> Self {
        self.only_caps = Some(caps.iter().map(|c| c.to_string()).collect());
        self
    }

    /// Its stdout somewhere else than a pipe the tracer reads (a terminal).
    pub fn stdout(mut self, stdout: Stdio) -> Self {
        self.stdout = Some(stdout);
        self
    }

    fn into_command(self) -> (Command, Option<Stdio>) {
        let mut cmd = match &self.only_caps {
            Some(caps) => {
                let bounding: String = caps.iter().map(|c| format!(",+{c}")).collect();
                // Locked memory unlimited where root may raise it, as the
                // systemd unit runs it: kernels before 5.11 count BPF maps
                // against it, and raising it needs a capability the tracer
                // is not given here. (Some machines refuse even root.)
                let mut cmd = Command::new("sh");
                cmd.args(["-c", r#"ulimit -l unlimited 2>/dev/null; exec "$@""#, "sh"])
                    .arg("setpriv")
                    .args(["--inh-caps=-all", "--ambient-caps=-all"])
                    .arg(format!("--bounding-set=-all{bounding}"))
                    .arg("--")
                    .arg(&self.program);
                cmd
            }
            None => Command::new(&self.program),
        };
        if self.program == tcptrace_bin() {
            cmd.args(test_args());
        }
        cmd.args(&self.args);
        if !self.command.is_empty() {
            cmd.arg("--").args(&self.command);
        }
        for (key, value) in &self.env {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        (cmd, self.stdout)
    }

    /// Starts tcptrace and waits until it says it is tracing.
    pub fn start(self) -> Tracer {
        let (mut cmd, stdout) = self.into_command();
        cmd.stdout(stdout.unwrap_or_else(Stdio::piped));
        Tracer::launch(cmd)
    }
}

/// A running tcptrace.
pub struct Tracer {
    child: Reaped,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
    so_far: Arc<Mutex<String>>,
}

/// A child killed and reaped when dropped: a test that fails half-way
/// leaves no tracer behind, whose programs would go on running on every
/// transition of the host (and skew the next test's and the bench's
/// figures).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Tracer {
    /// The tcptrace under test, with no flags yet.
    pub fn builder() -> TracerBuilder {
        TracerBuilder {
            program: tcptrace_bin(),
            args: Vec::new(),
            command: Vec::new(),
            env: Vec::new(),
            only_caps: None,
            stdout: None,
        }
    }

    /// Starts `cmd`, reading its stderr as it comes, until it says it is
    /// tracing.
    fn launch(mut cmd: Command) -> Tracer {
        let args = format!("{cmd:?}");
        let mut child = cmd.stderr(Stdio::piped()).spawn().expect("start tcptrace");
        let out = child.stdout.take();
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            if let Some(out) = out {
                let _ = BufReader::new(out).read_to_string(&mut s);
            }
            s
        });
        let err = child.stderr.take().expect("piped");
        let (ready_tx, ready_rx) = mpsc::channel();
        let so_far = Arc::new(Mutex::new(String::new()));
        let lines = Arc::clone(&so_far);
        let stderr = thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                // Kept before the start is told: a test reads what was
                // said up to the tracing line as soon as start returns.
                let mut all = lines.lock().unwrap_or_else(|p| p.into_inner());
                all.push_str(&line);
                all.push('\n');
                drop(all);
                if line.starts_with("tcptrace: tracing ") {
                    let _ = ready_tx.send(());
                }
            }
            let all = lines.lock().unwrap_or_else(|p| p.into_inner());
            all.clone()
        });
        match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => Tracer {
                child: Reaped(child),
                stdout,
                stderr,
                so_far,
            },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{args} did not start: {}",
                    stderr.join().unwrap_or_default()
                );
            }
        }
    }

    /// What tcptrace has said on stderr until now.
    pub fn stderr_so_far(&self) -> String {
        self.so_far
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits (up to `limit`) until what tcptrace said on stderr satisfies
    /// `ok`; whether it did.
    pub fn wait_for_stderr(&self, limit: Duration, ok: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while !ok(&self.stderr_so_far()) {
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(50));
        }
        true
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Lets in-flight softirq transitions land, then stops tcptrace with
    /// SIGINT, as a user's Ctrl-C would.
    pub fn stop(self) -> Output {
        thread::sleep(Duration::from_millis(300));
        let out = self.signal(libc::SIGINT);
        if out.stderr.contains("skipped the tracer") {
            // The kernel skipped the tracer and nothing recovered the
            // transitions: counts can be short. Say so next to any failure.
            eprintln!("note: {}", out.stderr);
        }
        out
    }

    pub fn signal(self, sig: i32) -> Output {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.0.id() as i32, sig) };
        self.wait()
    }

    /// Waits for tcptrace to exit by itself (`--count`, `--duration`).
    pub fn wait(mut self) -> Output {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = self.child.0.try_wait().expect("wait tcptrace") {
                break st;
            }
            if Instant::now() > deadline {
                panic!("tcptrace did not exit within 30 s");
            }
            thread::sleep(Duration::from_millis(10));
        };
        Output {
            stdout: self.stdout.join().expect("stdout reader"),
            stderr: self.stderr.join().expect("stderr reader"),
            status,
        }
    }
}

/// What a tcptrace run printed.
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub status: ExitStatus,
}

impl Output {
    fn of(out: std::process::Output) -> Output {
        Output {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            status: out.status,
        }
    }

    /// The JSON rows (`--format json`) of transitions the tracepoint
    /// reported: what most scenarios check, exactly.
    pub fn rows(&self) -> Vec<Row> {
        self.all_rows()
            .into_iter()
            .filter(|r| r.origin == "tracepoint")
            .collect()
    }

    /// Every JSON row, snapshot and time-wait table ones included.
    pub fn all_rows(&self) -> Vec<Row> {
        self.stdout.lines().map(Row::parse).collect()
    }

    /// Every line of stdout as untyped JSON: where the keys themselves are
    /// checked, or the lines are not rows (a recording's header).
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect()
    }

    /// The whole of stdout as one JSON document (`report --format json`);
    /// the run must have succeeded.
    pub fn json(&self) -> Value {
        assert!(self.status.success(), "tcptrace failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }

    /// The rows grouped by socket, in order of first appearance.
    pub fn lives(&self) -> Vec<Life> {
        Life::group(self.rows())
    }

    /// Transitions the kernel skipped ("missed by the kernel").
    pub fn missed(&self) -> u64 {
        self.stderr
            .lines()
            .find(|l| is_stats_line(l))
            .and_then(|l| {
                l.split(", ")
                    .find_map(|p| p.strip_suffix(" missed by the kernel")?.parse().ok())
            })
            .unwrap_or_else(|| panic!("no missed count in {:?}", self.stderr))
    }

    /// The final statistics line's numbers: (shown, filtered, lost).
    pub fn stats(&self) -> (u64, u64, u64) {
        let line = self
            .stderr
            .lines()
            .find(|l| is_stats_line(l))
            .unwrap_or_else(|| panic!("no stats line in {:?}", self.stderr));
        // "N transitions shown (M delivered twice by the kernel, shown
        // once), ...": the note's comma separates nothing.
        const NOTE_END: &str = ", shown once)";
        let line = match (line.find(" ("), line.find(NOTE_END)) {
            (Some(a), Some(b)) if a < b => format!("{}{}", &line[..a], &line[b + NOTE_END.len()..]),
            _ => line.to_string(),
        };
        let count = |label: &str| -> u64 {
            line.trim_start_matches("tcptrace: ")
                .split(", ")
                .find_map(|part| {
                    // "1 transition shown", "2 transitions shown".
                    let n = part.strip_suffix(label).or_else(|| {
                        part.strip_suffix(&label.replacen("transitions", "transition", 1))
                    })?;
                    n.trim().parse().ok()
                })
                .unwrap_or_else(|| panic!("no {label:?} in {line:?}"))
        };
        (
            count(" transitions shown"),
            count(" filtered"),
            count(" lost"),
        )
    }

    /// The `origin` of the time-wait rows of this run: `timewait-kernel`
    /// where tcptrace said at start that the kernel reports them
    /// (fentry/fexit), `timewait` where it polls the time-wait table.
    pub fn timewait_origin(&self) -> &'static str {
        if self.timewait_from_kernel() {
            "timewait-kernel"
        } else {
            "timewait"
        }
    }

    /// tcptrace said at start that the kernel reports time-wait sockets.
    pub fn timewait_from_kernel(&self) -> bool {
        self.stderr
            .lines()
            .any(|l| l.starts_with("tcptrace: time-wait: from the kernel"))
    }

    /// The `--stuck` warnings on stderr.
    pub fn stuck_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("tcptrace: stuck: "))
            .collect()
    }
}

/// Whether `line` is tcptrace's closing statistics line.
pub fn is_stats_line(line: &str) -> bool {
    line.starts_with("tcptrace: ") && line.contains(" filtered, ") && line.contains(" lost, ")
}

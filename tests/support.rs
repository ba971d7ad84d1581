//! What the real-kernel tests share: network namespaces that clean up after
//! themselves, the tcptrace process under test, scenario peers, and a view of
//! tcptrace's JSON output grouped by socket.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

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

/// The scenario peer, built next to the test binaries (target/debug).
pub fn peer_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/debug/deps");
    dir.join("tt-peer")
}

/// CLOCK_MONOTONIC now: the clock of tcptrace's `ts_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A port for one test: below the default ephemeral range, so no host
/// connection picks it as its local port, and distinct per test process and
/// test.
pub fn unique_port() -> u16 {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    20000 + ((std::process::id() * 37 + n * 101) % 10000) as u16
}

/// A fresh network namespace with loopback up, deleted on drop (also when
/// the test fails).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = format!(
            "tcptrace-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    /// The namespace's inode, as tcptrace reports it.
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.path())
            .expect("namespace exists")
            .ino()
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Sets a sysctl inside the namespace (net.* sysctls are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        run_ok(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "sh",
            "-c",
            &format!("echo '{value}' > {path}"),
        ]));
    }

    /// Starts `cmd` inside the namespace.
    pub fn spawn(&self, cmd: &mut Command) -> Child {
        let file = std::fs::File::open(format!("/run/netns/{}", self.name))
            .expect("the namespace's bind mount exists");
        let fd = file.as_raw_fd();
        // SAFETY: setns is async-signal-safe; fd stays open until after spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn in namespace");
        drop(file);
        child
    }

    /// Waits (up to 10 s) until no socket of the namespace is in `state`
    /// (as `ss` names it, e.g. `fin-wait-1`): the kernel finishes a close
    /// after the process returned, on a delayed ACK, later when loaded.
    pub fn settle(&self, state: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self
                .spawn(
                    Command::new("ss")
                        .args(["-Htan", "state", state])
                        .stdout(Stdio::piped()),
                )
                .wait_with_output()
                .expect("ss runs");
            if out.stdout.is_empty() || Instant::now() > deadline {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `n` orderly connections to `addr`, one after the other, the client
    /// closing first; returns when both peers are done.
    pub fn connections(&self, addr: &str, n: usize) {
        let n = n.to_string();
        let server = self.peer(&["server", addr, "--mode", "wait-peer-close", "--conns", &n]);
        self.peer(&["client", addr, "--mode", "close", "--repeat", &n])
            .finish();
        server.finish();
    }

    /// Starts the load generator (`tt-churn`) in the namespace for
    /// `seconds` against `port`, with `extra` flags (`--mode reset`, ...).
    pub fn churn(&self, port: u16, seconds: u32, extra: &[&str]) -> Churn {
        let mut cmd = Command::new(peer_bin().with_file_name("tt-churn"));
        cmd.args([
            "--seconds",
            &seconds.to_string(),
            "--port",
            &port.to_string(),
        ])
        .args(extra)
        .stdout(Stdio::piped());
        Churn(self.spawn(&mut cmd))
    }

    /// Starts a scenario peer in the namespace.
    pub fn peer(&self, args: &[&str]) -> Peer {
        let mut cmd = Command::new(peer_bin());
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = self.spawn(&mut cmd);
        let pid = child.id();
        if args.first() == Some(&"server") {
            let mut line = String::new();
            let stdout = child.stdout.as_mut().expect("piped");
            BufReader::new(stdout)
                .read_line(&mut line)
                .expect("read server stdout");
            if line.trim() != "ready" {
                let out = child.wait_with_output().expect("wait");
                panic!(
                    "server {args:?} did not start: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Peer {
            child,
            pid,
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A scenario process with a known pid.
pub struct Peer {
    child: Child,
    pub pid: u32,
    args: Vec<String>,
}

impl Peer {
    /// Ends a peer still holding its sockets (a server that never closes).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the peer; it must have done what it was asked.
    pub fn finish(mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait peer") {
                let mut err = String::new();
                if let Some(e) = self.child.stderr.as_mut() {
                    let _ = e.read_to_string(&mut err);
                }
                assert!(st.success(), "peer {:?} failed ({st}): {err}", self.args);
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("peer {:?} did not finish in 20 s", self.args);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Runs tcptrace to completion (read, report, bad input).
pub fn tcptrace(args: &[&str]) -> Output {
    let out = Command::new(tcptrace_bin())
        .args(args)
        .output()
        .expect("run tcptrace");
    Output {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        status: out.status,
    }
}

/// tcptrace run as the unprivileged user "nobody" with no capabilities at
/// all, from a copy in `dir` (the build may sit where nobody cannot enter).
pub fn as_nobody(dir: &TempDir, args: &[&str]) -> std::process::Output {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.path("tcptrace");
    std::fs::copy(tcptrace_bin(), &bin).expect("copy tcptrace");
    for p in [&dir.0.to_string_lossy().into_owned(), &bin] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(&bin)
        .args(args)
        .output()
        .expect("setpriv")
}

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tcptrace-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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

/// What a tcptrace run printed.
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub status: ExitStatus,
}

impl Tracer {
    /// Starts tcptrace with `args` and waits until it says it is tracing.
    pub fn start(args: &[&str]) -> Tracer {
        let mut cmd = Command::new(tcptrace_bin());
        cmd.args(args);
        Tracer::start_cmd(cmd)
    }

    /// Starts tcptrace recording the rows of `port` into `file`, with
    /// `extra` options.
    pub fn recording(port: u16, file: &str, extra: &[&str]) -> Tracer {
        let port = port.to_string();
        let mut args = vec!["--port", port.as_str(), "-w", file];
        args.extend_from_slice(extra);
        Tracer::start(&args)
    }

    /// Starts tcptrace as root holding only the capabilities `caps`
    /// (setpriv's names: "bpf", "perfmon", ...), none inheritable.
    pub fn start_with_only(caps: &[&str], args: &[&str]) -> Tracer {
        let bounding: String = caps.iter().map(|c| format!(",+{c}")).collect();
        let mut cmd = Command::new("setpriv");
        cmd.args(["--inh-caps=-all", "--ambient-caps=-all"])
            .arg(format!("--bounding-set=-all{bounding}"))
            .arg("--")
            .arg(tcptrace_bin())
            .args(args);
        Tracer::start_cmd(cmd)
    }

    /// Starts a prepared command (tcptrace behind setpriv, say).
    pub fn start_cmd(mut cmd: Command) -> Tracer {
        cmd.stdout(Stdio::piped());
        Tracer::start_keeping_stdout(cmd)
    }

    /// Starts a command whose stdout the caller has set (a terminal, say).
    pub fn start_keeping_stdout(mut cmd: Command) -> Tracer {
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
                if line.starts_with("tcptrace: tracing ") {
                    let _ = ready_tx.send(());
                }
                let mut all = lines.lock().unwrap_or_else(|p| p.into_inner());
                all.push_str(&line);
                all.push('\n');
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

impl Output {
    /// The JSON rows (`--format json`) of transitions the tracepoint
    /// reported: what most scenarios check, exactly.
    pub fn rows(&self) -> Vec<Value> {
        self.all_rows()
            .into_iter()
            .filter(|r| r["origin"] == "tracepoint")
            .collect()
    }

    /// Every JSON row, snapshot and time-wait table ones included.
    pub fn all_rows(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect()
    }

    /// The rows grouped by socket, in order of first appearance.
    pub fn lives(&self) -> Vec<Life> {
        let mut by_sock: BTreeMap<u64, Life> = BTreeMap::new();
        let mut order = Vec::new();
        for row in self.rows() {
            let sock = row["sock"].as_u64().expect("sock is a number");
            by_sock
                .entry(sock)
                .or_insert_with(|| {
                    order.push(sock);
                    Life {
                        sock,
                        rows: Vec::new(),
                    }
                })
                .rows
                .push(row);
        }
        order
            .into_iter()
            .map(|s| by_sock.remove(&s).expect("present"))
            .collect()
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
}

/// Whether `line` is tcptrace's closing statistics line.
pub fn is_stats_line(line: &str) -> bool {
    line.starts_with("tcptrace: ") && line.contains(" filtered, ") && line.contains(" lost, ")
}

/// A running `tt-churn`.
pub struct Churn(Child);

impl Churn {
    /// Waits for the end of the churn; returns how many transitions the
    /// kernel made for its connections, by its own count.
    pub fn expected(self) -> u64 {
        let done = self.0.wait_with_output().expect("tt-churn runs");
        let report = String::from_utf8_lossy(&done.stdout);
        assert!(done.status.success(), "tt-churn failed: {report}");
        serde_json::from_str::<Value>(report.trim())
            .ok()
            .and_then(|v| v["expected_transitions"].as_u64())
            .unwrap_or_else(|| panic!("no expected_transitions in {report:?}"))
    }
}

/// Every row tcptrace showed for one socket.
#[derive(Debug)]
pub struct Life {
    pub sock: u64,
    pub rows: Vec<Value>,
}

impl Life {
    /// The states the socket went through: `CLOSE>SYN_SENT>ESTABLISHED...`.
    pub fn path(&self) -> String {
        let mut s = self.rows[0]["old"].as_str().unwrap_or("?").to_string();
        for r in &self.rows {
            s.push('>');
            s.push_str(r["new"].as_str().unwrap_or("?"));
        }
        s
    }

    /// Milliseconds spent in `state`, from the row that left it.
    pub fn ms_in(&self, state: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r["old"] == state)
            .and_then(|r| r["ms"].as_f64())
    }

    /// The local port once known (a connect reports port 0 first).
    pub fn lport(&self) -> u64 {
        self.rows
            .iter()
            .filter_map(|r| r["lport"].as_u64())
            .max()
            .unwrap_or(0)
    }

    pub fn rport(&self) -> u64 {
        self.rows
            .iter()
            .filter_map(|r| r["rport"].as_u64())
            .max()
            .unwrap_or(0)
    }

    /// Asserts every row names this owner.
    pub fn assert_owner(&self, pid: u32, comm: &str) {
        for r in &self.rows {
            assert_eq!(
                (r["pid"].as_u64(), r["comm"].as_str()),
                (Some(u64::from(pid)), Some(comm)),
                "owner of {} in socket {}: {r}",
                self.path(),
                self.sock
            );
        }
    }
}

/// Finds the one socket that went through exactly `path`.
pub fn life<'a>(lives: &'a [Life], path: &str) -> &'a Life {
    let found: Vec<&Life> = lives.iter().filter(|l| l.path() == path).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one socket going {path}; saw {:?}",
        lives.iter().map(Life::path).collect::<Vec<_>>()
    );
    found[0]
}

/// A pseudo-terminal: hand its terminal side to a process, read what it
/// showed once that process is gone.
pub struct Pty {
    slave: Option<std::os::fd::OwnedFd>,
    reader: JoinHandle<String>,
}

impl Pty {
    pub fn new() -> Pty {
        use std::os::fd::FromRawFd;
        // SAFETY: plain pty calls; the descriptors become ours.
        let (master, slave) = unsafe {
            let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(master >= 0 && libc::grantpt(master) == 0 && libc::unlockpt(master) == 0);
            let name = std::ffi::CStr::from_ptr(libc::ptsname(master)).to_owned();
            let slave = libc::open(
                name.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            );
            assert!(slave >= 0);
            (
                std::fs::File::from_raw_fd(master),
                std::os::fd::OwnedFd::from_raw_fd(slave),
            )
        };
        let reader = thread::spawn(move || {
            let mut all = Vec::new();
            // Ends with EIO once no process has the terminal open.
            let _ = BufReader::new(master).read_to_end(&mut all);
            String::from_utf8_lossy(&all).into_owned()
        });
        Pty {
            slave: Some(slave),
            reader,
        }
    }

    /// The terminal side, for a child's stdout or stderr (once).
    pub fn terminal(&self) -> Stdio {
        let fd = self
            .slave
            .as_ref()
            .expect("terminal still open")
            .try_clone()
            .expect("dup");
        Stdio::from(fd)
    }

    /// Everything shown on the terminal, after its users have exited.
    pub fn screen(mut self) -> String {
        drop(self.slave.take());
        self.reader.join().expect("pty reader")
    }
}

impl Default for Pty {
    fn default() -> Self {
        Pty::new()
    }
}

/// Names of the BPF programs loaded in the kernel, read with the bpf()
/// system call (BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID,
/// BPF_OBJ_GET_INFO_BY_FD), so no bpftool is needed.
pub fn loaded_bpf_programs() -> Vec<String> {
    const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // Offset of `name` in struct bpf_prog_info.
    const NAME_OFFSET: usize = 64;
    let bpf = |cmd: libc::c_long, attr: &mut [u64; 16]| {
        // SAFETY: bpf() with a zero-padded attribute block of 128 bytes.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128) }
    };
    let mut names = Vec::new();
    let mut id: u32 = 0;
    loop {
        let mut attr = [0u64; 16];
        attr[0] = u64::from(id);
        if bpf(BPF_PROG_GET_NEXT_ID, &mut attr) != 0 {
            break;
        }
        id = (attr[0] >> 32) as u32;
        let mut attr = [0u64; 16];
        attr[0] = u64::from(id);
        let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr);
        if fd < 0 {
            continue;
        }
        let mut info = [0u8; 256];
        let mut attr = [0u64; 16];
        attr[0] = fd as u64 | ((info.len() as u64) << 32);
        attr[1] = info.as_mut_ptr() as u64;
        if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) == 0 {
            let raw = &info[NAME_OFFSET..NAME_OFFSET + 16];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(16);
            names.push(String::from_utf8_lossy(&raw[..end]).into_owned());
        }
        // SAFETY: closing the descriptor the kernel just gave us.
        unsafe { libc::close(fd as i32) };
    }
    names
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Debian's chromium, headless, on the page `html` (a path), with `extra`
/// flags (`--dump-dom`, `--screenshot=FILE`).
pub fn chromium(dir: &TempDir, html: &str, extra: &[&str]) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", dir.path("chromium")),
            "--window-size=1000,1400",
        ])
        .args(extra)
        .arg(format!("file://{html}"))
        .output()
        .expect("chromium (Debian's chromium package; cargo xtask test installs it)")
}

/// The page's DOM once chromium ran its scripts.
pub fn chromium_dom(dir: &TempDir, html: &str) -> String {
    String::from_utf8_lossy(&chromium(dir, html, &["--dump-dom"]).stdout).into_owned()
}

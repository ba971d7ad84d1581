//! The scenario peers (`tt-peer`, tests/bin/peer.rs) and the load
//! generator (`tt-churn`), started in a namespace with typed options
//! instead of argument lists.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::host::next_seq;
use crate::netns::Netns;

/// The helper binaries, built next to the test binaries (target/debug).
pub fn peer_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/debug/deps");
    dir.join("tt-peer")
}

/// What a server does with each connection it accepts.
#[derive(Clone, Copy, Debug)]
pub enum ServerMode {
    /// Reads to EOF (the client closes first), holds, closes.
    WaitPeerClose,
    /// Holds, then closes first.
    CloseFirst,
    /// Holds, then aborts with SO_LINGER 0: a reset.
    ResetFirst,
    /// Reads to EOF, holds, answers "pong", closes (the client half-closed).
    ReplyAfterEof,
    /// Reads until the client's reset.
    ExpectReset,
    /// Listens, holds, closes the listener; accepts nothing.
    ListenOnly,
    /// Forks after accept; the child keeps the socket (a leak).
    ForkLeak,
    /// Hands each socket to a receiver process over a Unix socket.
    PassFd,
    /// Accepts and closes in named threads.
    Threads,
    /// Listens, then double-forks a daemon that serves.
    Daemon,
}

/// What a client does once connected.
#[derive(Clone, Copy, Debug)]
pub enum ClientMode {
    /// Holds, then closes first.
    Close,
    /// Reads to EOF (the server closes first), holds, closes.
    WaitEof,
    /// Holds, then aborts with SO_LINGER 0: a reset.
    Reset,
    /// Reads until the server's reset.
    ExpectReset,
    /// Sends, shuts down writing, reads the answer.
    HalfClose,
    /// Expects its connect to be refused.
    Refused,
}

impl ServerMode {
    fn flag(self) -> &'static str {
        match self {
            ServerMode::WaitPeerClose => "wait-peer-close",
            ServerMode::CloseFirst => "close-first",
            ServerMode::ResetFirst => "reset-first",
            ServerMode::ReplyAfterEof => "reply-after-eof",
            ServerMode::ExpectReset => "expect-reset",
            ServerMode::ListenOnly => "listen-only",
            ServerMode::ForkLeak => "fork-leak",
            ServerMode::PassFd => "pass-fd",
            ServerMode::Threads => "threads",
            ServerMode::Daemon => "daemon",
        }
    }
}

impl ClientMode {
    fn flag(self) -> &'static str {
        match self {
            ClientMode::Close => "close",
            ClientMode::WaitEof => "wait-eof",
            ClientMode::Reset => "reset",
            ClientMode::ExpectReset => "expect-reset",
            ClientMode::HalfClose => "half-close",
            ClientMode::Refused => "refused",
        }
    }
}

/// A peer about to start: `ns.server(addr, mode)` or `ns.client(addr,
/// mode)`, then its options, then `start()` (or `run()` to the end).
#[must_use]
pub struct PeerBuilder<'a> {
    ns: &'a Netns,
    server: bool,
    args: Vec<String>,
    /// Run as user nobody rather than root.
    nobody: bool,
}

impl PeerBuilder<'_> {
    /// Runs it as user and group nobody: another user's process, whose
    /// descriptor table only CAP_SYS_PTRACE opens in /proc.
    pub fn as_nobody(mut self) -> Self {
        self.nobody = true;
        self
    }

    fn opt(mut self, flag: &str, value: impl ToString) -> Self {
        self.args.push(flag.to_string());
        self.args.push(value.to_string());
        self
    }

    /// How long the peer waits at its mode's pause.
    pub fn hold_ms(self, ms: u32) -> Self {
        self.opt("--hold-ms", ms)
    }

    /// Waits at the mode's pause until `release` is released (or dropped),
    /// rather than for a fixed time: the test observes what the pause holds
    /// open first, however slow the machine.
    pub fn hold_until(self, release: &Release) -> Self {
        self.opt("--hold-while", release.path.display())
    }

    /// How many connections a server accepts.
    pub fn conns(self, n: usize) -> Self {
        self.opt("--conns", n)
    }

    /// How many connections a client makes, one after the other.
    pub fn repeat(self, n: usize) -> Self {
        self.opt("--repeat", n)
    }

    /// The local address a client connects from (its port left to connect()).
    pub fn bind(self, ip: &str) -> Self {
        self.opt("--bind", ip)
    }

    /// The process name (default tt-server, tt-client).
    pub fn name(self, name: &str) -> Self {
        self.opt("--name", name)
    }

    /// How long a server waits before each accept.
    pub fn delay_accept_ms(self, ms: u32) -> Self {
        self.opt("--delay-accept-ms", ms)
    }

    /// A server leaves connections in its listener's queue until `release`
    /// is released (or dropped).
    pub fn delay_accept_until(self, release: &Release) -> Self {
        self.opt("--delay-accept-while", release.path.display())
    }

    /// The cgroup.procs file the peer moves itself into first.
    pub fn cgroup_procs(self, path: &str) -> Self {
        self.opt("--cgroup-procs", path)
    }

    /// Starts it; a server has its listener up when this returns.
    pub fn start(self) -> Peer {
        // setpriv execs the peer: the pid stays the peer's. (A uid set
        // on the Command would change before the namespace is entered,
        // which only root may.)
        let mut cmd = if self.nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(peer_bin());
            c
        } else {
            Command::new(peer_bin())
        };
        cmd.args(&self.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.ns.spawn(&mut cmd);
        let pid = child.id();
        if self.server {
            let mut line = String::new();
            let stdout = child.stdout.as_mut().expect("piped");
            BufReader::new(stdout)
                .read_line(&mut line)
                .expect("read server stdout");
            if line.trim() != "ready" {
                let out = child.wait_with_output().expect("wait");
                panic!(
                    "server {:?} did not start: {}",
                    self.args,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Peer {
            child,
            pid,
            args: self.args,
        }
    }

    /// Starts it and waits until it has done what it was asked.
    pub fn run(self) {
        self.start().finish()
    }
}

impl Netns {
    /// A server on `addr` in the namespace.
    pub fn server(&self, addr: &str, mode: ServerMode) -> PeerBuilder<'_> {
        PeerBuilder {
            ns: self,
            server: true,
            args: vec!["server".into(), addr.into()],
            nobody: false,
        }
        .opt("--mode", mode.flag())
    }

    /// A client of `addr` in the namespace.
    pub fn client(&self, addr: &str, mode: ClientMode) -> PeerBuilder<'_> {
        PeerBuilder {
            ns: self,
            server: false,
            args: vec!["client".into(), addr.into()],
            nobody: false,
        }
        .opt("--mode", mode.flag())
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

/// A peer a failed test left running is killed with the test: no server
/// outlives it holding a port or a namespace.
impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The end of a peer's pause, in the test's hands: a file that exists until
/// `release()` or drop removes it (tt-peer's `--hold-while`), so a test that
/// fails half-way leaves no peer waiting on it.
pub struct Release {
    path: PathBuf,
}

impl Release {
    pub fn new() -> Release {
        let path = std::env::temp_dir().join(format!(
            "tcptrace-release-{}-{}",
            std::process::id(),
            next_seq()
        ));
        std::fs::write(&path, b"").expect("create the release file");
        Release { path }
    }

    /// Ends the pause of every peer given this release.
    pub fn release(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Default for Release {
    fn default() -> Self {
        Release::new()
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        self.release();
    }
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
        serde_json::from_str::<serde_json::Value>(report.trim())
            .ok()
            .and_then(|v| v["expected_transitions"].as_u64())
            .unwrap_or_else(|| panic!("no expected_transitions in {report:?}"))
    }
}

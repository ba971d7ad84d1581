//! Owners on Debian's own multi-process servers, each in a fresh network
//! namespace: nginx (a daemonizing launcher, a master, two workers, then a
//! reload), PostgreSQL (a postmaster forking a backend per connection) and
//! Redis (threads with names of their own). The truth is what `ss -tanp`
//! shows holding each socket while the load runs, sampled from inside the
//! namespace, and the servers' own logs; never what tcptrace learned.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use tcptrace_tests::ss::in_namespace;
use tcptrace_tests::{
    Holder, LISTENER, Life, Netns, Output, Row, SsSocket, TempDir, Tracer, monotonic_ns, tcptrace,
    thread_names, unique_port, wait_until,
};

/// One run of `ss`, between two instants.
#[derive(Debug)]
struct Sample {
    from_ns: u64,
    to_ns: u64,
    sockets: Vec<SsSocket>,
}

/// `ss -tanpH` run inside the namespace every `every`, from start to
/// finish, while the load is on.
struct SsWatch {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Sample>>,
}

impl SsWatch {
    fn start(ns: &Netns, every: Duration) -> SsWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let path = ns.path();
        let handle = thread::spawn(move || {
            let mut samples = Vec::new();
            // Bounded whatever the test does: no load here lasts a minute.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                let from_ns = monotonic_ns();
                let sockets = in_namespace(&path);
                let to_ns = monotonic_ns();
                samples.push(Sample {
                    from_ns,
                    to_ns,
                    sockets,
                });
                thread::sleep(every);
            }
            samples
        });
        SsWatch { stop, handle }
    }

    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        Seen(self.handle.join().expect("ss sampler"))
    }
}

/// Everything `ss` showed during a run.
struct Seen(Vec<Sample>);

impl Seen {
    /// The processes `ss` showed holding the connection `local`-`peer`
    /// at some sample taken while it lived (between `from_ns` and
    /// `to_ns`).
    fn holders(&self, local: &str, peer: &str, from_ns: u64, to_ns: u64) -> BTreeSet<Holder> {
        self.0
            .iter()
            .filter(|s| s.to_ns >= from_ns && s.from_ns <= to_ns)
            .flat_map(|s| &s.sockets)
            .filter(|k| k.local == local && k.peer == peer)
            .flat_map(|k| k.holders.iter().cloned())
            .collect()
    }

    /// The listener's holders in each sample that shows it.
    fn listener_holders(&self, local: &str) -> Vec<BTreeSet<u32>> {
        self.0
            .iter()
            .filter_map(|s| {
                s.sockets
                    .iter()
                    .find(|k| k.state == "LISTEN" && k.local == local)
                    .map(|k| k.holders.iter().map(|h| h.pid).collect())
            })
            .collect()
    }

    /// Processes holding the listener in every sample: the one that lasts.
    fn listener_always(&self, local: &str) -> BTreeSet<u32> {
        let all = self.listener_holders(local);
        let mut it = all.into_iter();
        let first = it.next().unwrap_or_default();
        it.fold(first, |acc, s| acc.intersection(&s).copied().collect())
    }

    /// When `ss` first showed the connection held by a process, so
    /// accepted (a socket in the listener's queue has no descriptor).
    fn first_held_ns(&self, local: &str, peer: &str, from_ns: u64, to_ns: u64) -> Option<u64> {
        self.0
            .iter()
            .filter(|s| s.to_ns >= from_ns && s.from_ns <= to_ns)
            .find(|s| {
                s.sockets
                    .iter()
                    .any(|k| k.local == local && k.peer == peer && !k.holders.is_empty())
            })
            .map(|s| s.to_ns)
    }

    /// Distinct connections `ss` saw held by a process (time-wait and
    /// orphaned ones have none).
    fn held_connections(&self) -> usize {
        self.0
            .iter()
            .flat_map(|s| &s.sockets)
            .filter(|k| k.state != "LISTEN" && !k.holders.is_empty())
            .map(|k| (&k.local, &k.peer))
            .collect::<BTreeSet<_>>()
            .len()
    }
}

/// Every process in a network namespace, killed when this is dropped:
/// a failed test leaves no server, worker or daemonized leftover behind.
struct Procs<'a> {
    ns: &'a Netns,
    children: Vec<Child>,
}

impl<'a> Procs<'a> {
    fn new(ns: &'a Netns) -> Procs<'a> {
        Procs {
            ns,
            children: Vec::new(),
        }
    }

    /// Starts `cmd` in the namespace; it is killed at the end at the latest.
    fn spawn(&mut self, cmd: &mut Command) -> u32 {
        let child = self.ns.spawn(cmd);
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Waits (bounded) for a child started here to exit; its status.
    fn wait(&mut self, pid: u32, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self
            .children
            .iter_mut()
            .find(|c| c.id() == pid)
            .expect("a child of ours");
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "pid {pid} still runs after {limit:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pids of the processes in the namespace now.
    fn in_namespace(&self) -> Vec<u32> {
        let want = format!("net:[{}]", self.ns.inode());
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/ns/net"))
                    .is_ok_and(|l| l.to_string_lossy() == want)
            })
            .collect()
    }
}

impl Drop for Procs<'_> {
    fn drop(&mut self) {
        for _ in 0..100 {
            let left = self.in_namespace();
            if left.is_empty() {
                break;
            }
            for pid in left {
                // SAFETY: kill on a pid seen in our own namespace.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            thread::sleep(Duration::from_millis(20));
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
}

/// Stops the server process `pid` of this test with its own clean-stop
/// `signal` and waits until it is gone, so that everything it closed is
/// in the tracer's output; then stops the tracer.
fn stop_server_then_tracer(what: &str, pid: u32, signal: i32, tracer: Tracer) -> Output {
    // SAFETY: kill on a pid of a process this test started.
    unsafe { libc::kill(pid as i32, signal) };
    wait_until(&format!("{what} gone"), Duration::from_secs(20), || {
        !alive(pid)
    });
    let out = tracer.stop();
    assert!(out.status.success(), "tcptrace failed: {}", out.stderr);
    out
}

/// JSON rows of `port` in `ns`, without times (two tracers compare),
/// with `extra` flags.
fn tracer(ns: &Netns, port: u16, extra: &[&str]) -> Tracer {
    Tracer::builder()
        .port(port)
        .netns(ns)
        .json()
        .time("none")
        .args(extra)
        .start()
}

/// A socket's rows and where it sat: its two ends as `ss` writes them
/// and the time it lived.
struct Sock<'a> {
    life: &'a Life,
    local: String,
    peer: String,
    from_ns: u64,
    to_ns: u64,
}

impl<'a> Sock<'a> {
    fn new(life: &'a Life) -> Sock<'a> {
        let last = life.rows.last().expect("a row");
        Sock {
            life,
            local: format!("{}:{}", last.laddr, life.lport()),
            peer: format!("{}:{}", last.raddr, life.rport()),
            from_ns: life.rows[0].ts_ns,
            to_ns: if last.new == "CLOSE" {
                last.ts_ns
            } else {
                u64::MAX
            },
        }
    }

    fn first(&self) -> (&str, &str) {
        let r = &self.life.rows[0];
        (r.old.as_deref().unwrap_or("?"), &r.new)
    }

    fn is_listener(&self) -> bool {
        self.first() == ("CLOSE", "LISTEN")
    }

    fn is_accepted(&self) -> bool {
        self.first() == ("LISTEN", "SYN_RECV")
    }

    fn is_client(&self) -> bool {
        self.first() == ("CLOSE", "SYN_SENT")
    }

    /// Rows made while it sat in the listener's queue (the first ones),
    /// and the rest, once a process had accepted it. None is queued after
    /// `ss` saw a process holding it.
    fn queued_then_accepted(&self, seen: &Seen) -> (&'a [Row], &'a [Row]) {
        let rows = &self.life.rows;
        let n = rows.iter().take_while(|r| r.queued == Some(true)).count();
        assert!(
            rows[n..].iter().all(|r| r.queued.is_none()),
            "socket {} {}: a queued row after an accepted one: {rows:#?}",
            self.life.sock,
            self.life.path()
        );
        if let Some(held) = seen.first_held_ns(&self.local, &self.peer, self.from_ns, self.to_ns) {
            for r in &rows[..n] {
                assert!(
                    r.ts_ns <= held,
                    "socket {} {}: queued after ss saw it accepted: {r}",
                    self.life.sock,
                    self.life.path()
                );
            }
        }
        rows.split_at(n)
    }
}

fn pid_of(r: &Row) -> u32 {
    r.pid.unwrap_or_else(|| panic!("no pid in {r}"))
}

/// A connection from this test process, made inside the namespace (setns
/// moves only the thread that calls it).
fn connect_in(ns: &Netns, addr: &str) -> TcpStream {
    let (path, addr) = (ns.path(), addr.to_string());
    thread::spawn(move || {
        let file = std::fs::File::open(path).expect("the namespace");
        // SAFETY: setns on a descriptor we hold, for this thread only.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        c
    })
    .join()
    .expect("connect thread")
}

/// One keep-alive request, read to the end of its answer.
fn http_get(c: &mut TcpStream) -> std::io::Result<()> {
    c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"\r\n\r\nok\n") {
        match c.read(&mut buf)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => got.extend_from_slice(&buf[..n]),
        }
    }
    Ok(())
}

/// The kernel's own record of the transitions on one port, from an ftrace
/// instance on the same tracepoint: which process made each one when it
/// ran in process context (close, connect; not softirq). Removed on drop.
struct Ftrace(String);

impl Ftrace {
    fn start(port: u16) -> Ftrace {
        let dir = format!(
            "/sys/kernel/tracing/instances/tcptrace-servers-{}-{port}",
            std::process::id()
        );
        std::fs::create_dir(&dir).expect("an ftrace instance (tcptrace mounted tracefs)");
        let f = Ftrace(dir);
        // CLOCK_MONOTONIC, tcptrace's clock: events compare by time.
        std::fs::write(format!("{}/trace_clock", f.0), "mono").expect("trace clock");
        let event = format!("{}/events/sock/inet_sock_set_state", f.0);
        std::fs::write(format!("{}/buffer_size_kb", f.0), "8192").expect("buffer size");
        std::fs::write(format!("{event}/filter"), format!("sport == {port}")).expect("filter");
        std::fs::write(format!("{event}/enable"), "1").expect("enable");
        let exits = format!("{}/events/sched/sched_process_exit", f.0);
        std::fs::write(format!("{exits}/filter"), "comm == \"postgres\"").expect("filter");
        std::fs::write(format!("{exits}/enable"), "1").expect("enable");
        f
    }

    fn read(&self) -> Traced {
        let text = std::fs::read_to_string(format!("{}/trace", self.0)).expect("trace");
        let mut traced = Traced::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            // "  postgres-19379   [000] .....   965.040022: inet_sock_set_state: ..."
            let Some((task, rest)) = line.split_once(" [") else {
                continue;
            };
            let pid = task
                .rsplit_once('-')
                .and_then(|(_, p)| p.trim().parse().ok());
            let mut words = rest.split_whitespace();
            let flags = words.nth(1).unwrap_or("");
            let at = words.next().and_then(|w| {
                let (s, us) = w.trim_end_matches(':').split_once('.')?;
                Some(s.parse::<u64>().ok()? * 1_000_000_000 + us.parse::<u64>().ok()? * 1000)
            });
            let field = |name: &str| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .map(|v| v.trim_start_matches("TCP_").to_string())
            };
            let (Some(pid), Some(at)) = (pid, at) else {
                continue;
            };
            if rest.contains(" sched_process_exit: ") {
                if let Some(p) = field("pid=").and_then(|p| p.parse().ok()) {
                    traced.exits.insert(p, at);
                }
                continue;
            }
            let (Some(dport), Some(old), Some(new)) =
                (field("dport="), field("oldstate="), field("newstate="))
            else {
                continue;
            };
            if flags.contains('s') || flags.contains('h') {
                continue;
            }
            let dport = dport.parse().unwrap_or(0);
            traced
                .made
                .entry((dport, old, new))
                .or_default()
                .push((at, pid));
        }
        traced
    }
}

/// What ftrace saw, on CLOCK_MONOTONIC.
#[derive(Default)]
struct Traced {
    /// (remote port, old, new) -> when, and by which process, it was made
    /// in process context. A client port is used again by later
    /// connections: the time tells which one.
    made: BTreeMap<(u64, String, String), Vec<(u64, u32)>>,
    /// When each process of the name asked for ended.
    exits: BTreeMap<u32, u64>,
}

impl Traced {
    /// The process that made `row`'s change in process context, if one did.
    fn maker(&self, rport: u16, row: &Row) -> Option<u32> {
        let key = (
            u64::from(rport),
            row.old.as_deref().unwrap_or("?").to_string(),
            row.new.clone(),
        );
        let at = row.ts_ns;
        // The same tracepoint hit, read on the same clock: microseconds
        // apart at most.
        self.made
            .get(&key)?
            .iter()
            .find(|(t, _)| t.abs_diff(at) < 1_000_000)
            .map(|&(_, pid)| pid)
    }

    fn ended_before(&self, pid: u32, ts_ns: u64) -> bool {
        self.exits.get(&pid).is_some_and(|&t| t < ts_ns)
    }
}

impl Drop for Ftrace {
    fn drop(&mut self) {
        let _ = std::fs::write(
            format!("{}/events/sock/inet_sock_set_state/enable", self.0),
            "0",
        );
        let _ = std::fs::write(
            format!("{}/events/sched/sched_process_exit/enable", self.0),
            "0",
        );
        let _ = std::fs::remove_dir(&self.0);
    }
}

// ---------------------------------------------------------------- nginx

fn nginx_conf(dir: &TempDir, port: u16) -> String {
    let d = dir.0.display();
    let conf = format!(
        "worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    keepalive_timeout 60s;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 \"ok\\n\"; }}
    }}
}}
"
    );
    let path = dir.path("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    path
}

fn nginx(dir: &TempDir, conf: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new("/usr/sbin/nginx");
    cmd.args([
        "-p",
        &dir.path(""),
        "-c",
        conf,
        "-e",
        &dir.path("error.log"),
    ])
    .args(extra)
    .stdin(Stdio::null());
    cmd
}

fn wrk(port: u16, seconds: u32) -> Command {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c8", &format!("-d{seconds}s"), "--timeout", "2s"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdout(Stdio::null());
    cmd
}

#[test]
fn nginx_workers_own_what_they_accept_through_a_reload() {
    let ns = Netns::new();
    let port = unique_port();
    let dir = TempDir::new("nginx");
    let conf = nginx_conf(&dir, port);
    let listen_at = format!("127.0.0.1:{port}");
    let tracer = tracer(&ns, port, &[]);
    let mut procs = Procs::new(&ns);

    let (launcher, master) = start_nginx(&mut procs, &ns, &dir, &conf, &listen_at);
    let watch = SsWatch::start(&ns, Duration::from_millis(100));
    let second_load_ns = load_nginx_through_a_reload(&mut procs, &ns, &dir, &conf, port);
    let seen = watch.finish();
    // A graceful stop, so that the listener's close is traced.
    let out = stop_server_then_tracer("nginx master", master, libc::SIGQUIT, tracer);
    drop(procs);

    let lives = out.lives();
    let socks: Vec<Sock> = lives.iter().map(Sock::new).collect();
    let (listener_always, workers) = nginx_listener_holders(&seen, &listen_at, master);
    assert_nginx_listener_rows(&socks, &lives, &seen, &listen_at, launcher);
    let old_workers = old_nginx_workers(&seen, &listen_at, master, second_load_ns);
    let nginx = NginxHolders {
        listen_at,
        master,
        launcher,
        listener_always,
        workers,
        old_workers,
    };
    let mut accepted = AcceptedTally::default();
    for s in socks.iter().filter(|s| s.is_accepted()) {
        assert_worker_owns_accepted(s, &seen, &nginx, second_load_ns, &mut accepted);
    }
    let (clients, client_matched) = assert_nginx_clients_as_ss_saw(&socks, &seen);
    assert_nginx_totals(&socks, clients, &accepted, &out, launcher);
    let AcceptedTally {
        rows,
        matched,
        queued,
        queued_closes,
        old_worker_closes,
        resets,
        by_worker,
        ..
    } = accepted;
    eprintln!(
        "nginx: {} sockets ({} accepted, {matched} matched against ss, {} clients, {client_matched} matched), {rows} accepted-side rows ({queued} queued, {queued_closes} closed by the client while queued), resets sent by old/new workers {resets:?}, {old_worker_closes} closed first by an old worker, {} ss samples, {} connections held in ss, per worker {by_worker:?}, master {master}, launcher {launcher}",
        socks.len(),
        socks.iter().filter(|s| s.is_accepted()).count(),
        clients,
        seen.0.len(),
        seen.held_connections()
    );
}

/// Starts nginx the usual way: the launcher opens the listener, forks the
/// master and exits. Returns once ss shows the master and two workers on
/// the listener: (launcher, master).
fn start_nginx(
    procs: &mut Procs,
    ns: &Netns,
    dir: &TempDir,
    conf: &str,
    listen_at: &str,
) -> (u32, u32) {
    let launcher = procs.spawn(&mut nginx(dir, conf, &[]));
    let st = procs.wait(launcher, Duration::from_secs(10));
    assert!(
        st.success(),
        "nginx failed: {:?}",
        std::fs::read_to_string(dir.path("error.log"))
    );
    let master: u32 = std::fs::read_to_string(dir.path("nginx.pid"))
        .expect("nginx.pid")
        .trim()
        .parse()
        .expect("a pid");
    wait_until(
        "master and two workers on the listener",
        Duration::from_secs(10),
        || {
            ns.ss()
                .iter()
                .any(|k| k.state == "LISTEN" && k.local == listen_at && k.holders.len() == 3)
        },
    );
    (launcher, master)
}

/// wrk for 2 s; two idle keep-alive connections; wrk again for 3 s, with a
/// reload a second into it, which closes the idle connections; then time
/// for the old workers to leave. When the second load began.
fn load_nginx_through_a_reload(
    procs: &mut Procs,
    ns: &Netns,
    dir: &TempDir,
    conf: &str,
    port: u16,
) -> u64 {
    let listen_at = format!("127.0.0.1:{port}");
    let load = procs.spawn(&mut wrk(port, 2));
    assert!(
        procs.wait(load, Duration::from_secs(15)).success(),
        "wrk failed"
    );
    // Idle keep-alive connections, which the old workers close at once on
    // the reload: the rest of those sockets' lives (the ACK of their FIN,
    // the move to time-wait) happens in softirq, held by no process.
    let mut idle: Vec<TcpStream> = (0..2).map(|_| connect_in(ns, &listen_at)).collect();
    for c in &mut idle {
        http_get(c).expect("a keep-alive answer");
    }
    // The old workers hold what was accepted before this.
    let second_load_ns = monotonic_ns();
    let load = procs.spawn(&mut wrk(port, 3));
    thread::sleep(Duration::from_secs(1));
    let reload = procs.spawn(&mut nginx(dir, conf, &["-s", "reload"]));
    assert!(
        procs.wait(reload, Duration::from_secs(10)).success(),
        "nginx -s reload failed"
    );
    for mut c in idle {
        let mut buf = [0u8; 64];
        assert!(
            matches!(c.read(&mut buf), Ok(0)),
            "the old worker closed the idle connection"
        );
    }
    assert!(
        procs.wait(load, Duration::from_secs(15)).success(),
        "wrk failed"
    );
    // The old workers leave once their connections are gone.
    thread::sleep(Duration::from_millis(500));
    second_load_ns
}

/// ss: the master alone holds the listener throughout (returned), and
/// workers, two before the reload and two after, with it (returned).
fn nginx_listener_holders(
    seen: &Seen,
    listen_at: &str,
    master: u32,
) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let listener_always = seen.listener_always(listen_at);
    assert_eq!(
        listener_always,
        BTreeSet::from([master]),
        "ss: only the master holds the listener throughout"
    );
    let workers: BTreeSet<u32> = seen
        .listener_holders(listen_at)
        .into_iter()
        .flatten()
        .filter(|&p| p != master)
        .collect();
    assert!(
        workers.len() >= 4,
        "ss saw two workers before the reload and two after: {workers:?}"
    );
    (listener_always, workers)
}

/// The listener: opened by the launcher, before it forked; closed by
/// whichever of its holders went last.
fn assert_nginx_listener_rows(
    socks: &[Sock],
    lives: &[Life],
    seen: &Seen,
    listen_at: &str,
    launcher: u32,
) {
    let listeners: Vec<&Sock> = socks.iter().filter(|s| s.is_listener()).collect();
    assert_eq!(
        listeners.len(),
        1,
        "one listener: {:?}",
        lives.iter().map(Life::path).collect::<Vec<_>>()
    );
    assert_eq!(listeners[0].life.path(), LISTENER);
    assert_eq!(
        pid_of(&listeners[0].life.rows[0]),
        launcher,
        "listen() ran in the launcher"
    );
    // On a graceful stop the master and the workers each close their copy:
    // the last to go is one of those holding it before the stop.
    let last_holders = seen.listener_holders(listen_at).pop().unwrap_or_default();
    let closer = pid_of(&listeners[0].life.rows[1]);
    assert!(
        last_holders.contains(&closer),
        "the listener's close names {closer}, ss's last holders {last_holders:?}"
    );
}

/// The two workers ss showed on the listener before the second load.
fn old_nginx_workers(
    seen: &Seen,
    listen_at: &str,
    master: u32,
    second_load_ns: u64,
) -> BTreeSet<u32> {
    let old_workers: BTreeSet<u32> = seen
        .0
        .iter()
        .filter(|s| s.to_ns < second_load_ns)
        .flat_map(|s| &s.sockets)
        .filter(|k| k.state == "LISTEN" && k.local == listen_at)
        .flat_map(|k| k.holders.iter().map(|h| h.pid))
        .filter(|&p| p != master)
        .collect();
    assert_eq!(old_workers.len(), 2, "ss: two workers before the reload");
    old_workers
}

/// nginx's processes as ss showed them.
struct NginxHolders {
    listen_at: String,
    master: u32,
    launcher: u32,
    /// Holding the listener in every sample: the master.
    listener_always: BTreeSet<u32>,
    /// Every worker, before the reload and after.
    workers: BTreeSet<u32>,
    /// The workers before the reload.
    old_workers: BTreeSet<u32>,
}

/// Counts over nginx's accepted sockets.
#[derive(Default)]
struct AcceptedTally {
    rows: usize,
    /// Sockets ss saw held by one worker.
    matched: usize,
    queued: usize,
    queued_closes: usize,
    after_reload: usize,
    old_worker_closes: usize,
    /// Resets sent, by whether an old worker (true) or a new one made them.
    resets: BTreeMap<bool, usize>,
    by_worker: BTreeMap<u32, usize>,
}

/// An accepted socket: queued rows name the listener's owner, and every
/// row after the accept names the worker ss saw holding it.
fn assert_worker_owns_accepted(
    s: &Sock,
    seen: &Seen,
    nginx: &NginxHolders,
    second_load_ns: u64,
    tally: &mut AcceptedTally,
) {
    let listener_always = &nginx.listener_always;
    assert_eq!(s.local, nginx.listen_at);
    let (before, after) = s.queued_then_accepted(seen);
    assert!(
        before.len() >= 2,
        "LISTEN -> SYN_RECV and SYN_RECV -> ESTABLISHED are made before any accept: {:#?}",
        s.life.rows
    );
    for r in before {
        assert!(
            listener_always.contains(&pid_of(r)),
            "a queued row names the listener's owner (ss: {listener_always:?}): {r}"
        );
        assert_eq!(r.comm.as_deref(), Some("nginx"));
    }
    let worker = worker_holding(s, seen, after, &nginx.workers, &mut tally.matched);
    assert!(
        nginx.workers.contains(&worker) && worker != nginx.master && worker != nginx.launcher,
        "ss: a worker holds it"
    );
    let old_workers = &nginx.old_workers;
    for r in after {
        assert_eq!(
            (pid_of(r), r.comm.as_deref()),
            (worker, Some("nginx")),
            "socket {} {}: {r}",
            s.life.sock,
            s.life.path()
        );
        assert!(r.thread.is_none(), "one thread, named as the process: {r}");
        if r.close.as_deref() == Some("reset sent") {
            *tally
                .resets
                .entry(old_workers.contains(&worker))
                .or_default() += 1;
        }
        tally.old_worker_closes +=
            usize::from(r.new == "FIN_WAIT1" && old_workers.contains(&worker));
    }
    tally.rows += s.life.rows.len();
    tally.queued += before.len();
    // wrk's first connection only checks the address: closed before a
    // worker could accept it.
    tally.queued_closes += usize::from(before.len() > 2);
    tally.after_reload += usize::from(s.from_ns > second_load_ns + 1_000_000_000);
    *tally.by_worker.entry(worker).or_default() += 1;
}

/// The worker ss saw holding an accepted socket (counted in `matched`), or
/// for one too short-lived for a sample, the worker its rows name.
fn worker_holding(
    s: &Sock,
    seen: &Seen,
    after: &[Row],
    workers: &BTreeSet<u32>,
    matched: &mut usize,
) -> u32 {
    let held = seen.holders(&s.local, &s.peer, s.from_ns, s.to_ns);
    match held.iter().map(|h| h.pid).collect::<Vec<_>>()[..] {
        [w] => {
            *matched += 1;
            w
        }
        [] => {
            // Too short-lived for a sample: one of the workers, all the same.
            let w = after.first().map(pid_of).unwrap_or(0);
            assert!(
                after.is_empty() || workers.contains(&w),
                "socket {} is owned by a worker ({workers:?}): {:#?}",
                s.life.sock,
                s.life.rows
            );
            w
        }
        _ => panic!(
            "ss shows several holders of {} -> {}: {held:?}",
            s.local, s.peer
        ),
    }
}

/// Every row of a client socket names a process ss saw holding it: the
/// client sockets, and those ss saw held.
fn assert_nginx_clients_as_ss_saw(socks: &[Sock], seen: &Seen) -> (usize, usize) {
    let clients: Vec<&Sock> = socks.iter().filter(|s| s.is_client()).collect();
    let mut client_matched = 0;
    for s in &clients {
        let held = seen.holders(&s.local, &s.peer, s.from_ns, s.to_ns);
        let ours = held.iter().any(|h| h.pid == std::process::id());
        for r in &s.life.rows {
            // Those ss did not see are wrk's first connection, which only
            // checks the address.
            let as_ss_saw = held
                .iter()
                .any(|h| (h.pid, Some(h.comm.as_str())) == (pid_of(r), r.comm.as_deref()))
                || (held.is_empty() && r.comm.as_deref() == Some("wrk"));
            // This test's own idle connections: the watcher's `nsenter ss`,
            // forked from this process, holds copies of its sockets until
            // it execs, and when the test closes one meanwhile, the last
            // copy, and the close the kernel then makes, is nsenter's.
            let closed_by_a_fork_of_ours = ours
                && r.comm.as_deref() == Some("nsenter")
                && matches!(r.new.as_str(), "LAST_ACK" | "FIN_WAIT1");
            assert!(
                as_ss_saw || closed_by_a_fork_of_ours,
                "ss: {held:?}, row {r}"
            );
        }
        client_matched += usize::from(!held.is_empty());
    }
    (clients.len(), client_matched)
}

/// A socket accepted per connection; ss saw the load before and after the
/// reload; old and new workers at work; the launcher named once.
fn assert_nginx_totals(
    socks: &[Sock],
    clients: usize,
    tally: &AcceptedTally,
    out: &Output,
    launcher: u32,
) {
    let AcceptedTally {
        matched,
        old_worker_closes,
        after_reload,
        ref by_worker,
        ..
    } = *tally;
    assert_eq!(
        socks.iter().filter(|s| s.is_accepted()).count(),
        clients,
        "as many accepted sockets as connections made"
    );
    assert!(
        matched >= 16,
        "ss saw at least wrk's 8 connections before and 8 after the reload held: {matched}"
    );
    assert!(
        old_worker_closes >= 2,
        "the old workers closed the idle connections, and their sockets' last rows (softirq) name them: {old_worker_closes}"
    );
    assert!(
        after_reload >= 1 && by_worker.len() >= 3,
        "the new workers accepted connections: {by_worker:?}"
    );
    // No row after the launcher's exit names it.
    let launcher_rows = out.rows().iter().filter(|r| pid_of(r) == launcher).count();
    assert_eq!(launcher_rows, 1, "only the listen() names the launcher");
}

// ----------------------------------------------------------- PostgreSQL

fn postgres_bin(name: &str) -> String {
    let dir = std::fs::read_dir("/usr/lib/postgresql")
        .expect("Debian's postgresql is installed (cargo xtask test installs it)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .find(|d| d.join("postgres").is_file())
        .expect("a postgres under /usr/lib/postgresql/*/bin");
    dir.join(name).to_string_lossy().into_owned()
}

/// `cmd` as the postgres user: PostgreSQL refuses to run as root.
fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        "postgres",
        "--regid",
        "postgres",
        "--init-groups",
        "--",
    ])
    .arg(program);
    cmd
}

/// The backend of each connection, from PostgreSQL's own log
/// (log_connections, each line prefixed by the pid): client port -> pids,
/// in the order the connections came.
fn pg_backends(log: &str) -> BTreeMap<u16, Vec<u32>> {
    let mut by_port: BTreeMap<u16, Vec<u32>> = BTreeMap::new();
    for line in log.lines() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some(port) = rest
            .split_once("connection received: host=127.0.0.1 port=")
            .map(|(_, p)| p.trim())
        else {
            continue;
        };
        if let (Ok(pid), Ok(port)) = (pid.parse(), port.parse()) {
            by_port.entry(port).or_default().push(pid);
        }
    }
    by_port
}

/// A new database cluster in `dir` (owned by postgres, as PostgreSQL
/// requires); its data directory.
fn pg_cluster(dir: &TempDir) -> String {
    let run_ok = |cmd: &mut Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run_ok(
        Command::new("chown").args(["postgres:postgres", &dir.path("")]),
        "chown",
    );
    let data = dir.path("data");
    run_ok(
        as_postgres(&postgres_bin("initdb")).args([
            "-D",
            &data,
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
        ]),
        "initdb",
    );
    data
}

#[test]
fn postgres_backends_own_their_connections_not_the_postmaster() {
    let ns = Netns::new();
    let port = unique_port();
    let dir = TempDir::new("pg");
    let data = pg_cluster(&dir);
    let log = dir.path("postgres.log");
    let recording = dir.path("pgbench.jsonl");
    let listen_at = format!("127.0.0.1:{port}");
    let tracer = tracer(&ns, port, &["-w", &recording]);
    let ftrace = Ftrace::start(port);
    let mut procs = Procs::new(&ns);
    let postmaster = start_postgres(&mut procs, &ns, &dir, &data, &log, port);

    let watch = SsWatch::start(&ns, Duration::from_millis(50));
    let pgbench = run_pgbench(&mut procs, port);
    thread::sleep(Duration::from_millis(300));
    let seen = watch.finish();
    let out = stop_server_then_tracer("postmaster", postmaster, libc::SIGINT, tracer);
    drop(procs);

    let traced = ftrace.read();
    let mut backends = pg_backends(&std::fs::read_to_string(&log).expect("postgres log"));
    let lives = out.lives();
    let socks: Vec<Sock> = lives.iter().map(Sock::new).collect();
    assert_postmaster_listener(&socks, &seen, &listen_at, postmaster);

    let mut tally = BackendTally {
        // Who held each connection last: the report counts it for them.
        held_last: BTreeMap::from([(postmaster, 0)]),
        ..BackendTally::default()
    };
    let mut accepted: Vec<&Sock> = socks.iter().filter(|s| s.is_accepted()).collect();
    accepted.sort_by_key(|s| s.from_ns);
    for s in &accepted {
        let backend = next_backend(&mut backends, s.life.rport(), postmaster);
        assert_backend_owns_accepted(s, &seen, &traced, backend, postmaster, &mut tally);
    }
    assert_pgbench_totals(&socks, &accepted, &backends, pgbench, &tally);

    // The report counts each connection for its backend.
    let processes = assert_report_counts_held_last(&recording, &tally.held_last, postmaster);
    let BackendTally {
        rows,
        matched,
        close_waits,
        postmaster_closes,
        ..
    } = tally;
    eprintln!(
        "postgres: {} connections, {rows} server-side rows, {close_waits} ESTABLISHED -> CLOSE_WAIT, {matched} backends seen holding their socket by ss ({} samples), {postmaster_closes} closes made by the postmaster, {} processes in the report, postmaster {postmaster}",
        accepted.len(),
        seen.0.len(),
        processes
    );
}

/// Starts the postmaster on `port`, logging each connection with the pid
/// of its backend; returns once it listens.
fn start_postgres(
    procs: &mut Procs,
    ns: &Netns,
    dir: &TempDir,
    data: &str,
    log: &str,
    port: u16,
) -> u32 {
    let listen_at = format!("127.0.0.1:{port}");
    let port_s = port.to_string();
    let postmaster = procs.spawn(
        as_postgres(&postgres_bin("postgres"))
            .args([
                "-D",
                data,
                "-h",
                "127.0.0.1",
                "-p",
                &port_s,
                "-k",
                &dir.path(""),
            ])
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .args(["-c", "log_connections=on", "-c", "log_line_prefix=%p "])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file")),
    );
    wait_until("postgres listening", Duration::from_secs(30), || {
        ns.ss()
            .iter()
            .any(|k| k.state == "LISTEN" && k.local == listen_at)
    });
    postmaster
}

/// `pgbench -i`, then a connection per transaction for two seconds; the
/// pids of the two runs.
fn run_pgbench(procs: &mut Procs, port: u16) -> [u32; 2] {
    let port_s = port.to_string();
    let pgbench = |extra: &[&str]| {
        let mut cmd = as_postgres("pgbench");
        cmd.args(["-h", "127.0.0.1", "-p", &port_s, "-U", "postgres"])
            .args(extra)
            .arg("postgres")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    };
    let init = procs.spawn(&mut pgbench(&["-i", "-q", "-s", "1"]));
    assert!(
        procs.wait(init, Duration::from_secs(60)).success(),
        "pgbench -i failed"
    );
    // A connection per transaction, for two seconds.
    let bench = procs.spawn(&mut pgbench(&["-C", "-S", "-T", "2", "-c", "2", "-j", "2"]));
    assert!(
        procs.wait(bench, Duration::from_secs(20)).success(),
        "pgbench -C failed"
    );
    [init, bench]
}

/// ss: the postmaster holds the listener; every row of it names the
/// postmaster.
fn assert_postmaster_listener(socks: &[Sock], seen: &Seen, listen_at: &str, postmaster: u32) {
    assert_eq!(
        seen.listener_always(listen_at),
        BTreeSet::from([postmaster]),
        "ss: the postmaster holds the listener"
    );
    let listeners: Vec<&Sock> = socks.iter().filter(|s| s.is_listener()).collect();
    assert_eq!(listeners.len(), 1);
    assert_eq!(listeners[0].life.path(), LISTENER);
    for r in &listeners[0].life.rows {
        assert_eq!(
            (pid_of(r), r.comm.as_deref()),
            (postmaster, Some("postgres")),
            "{r}"
        );
    }
}

/// The backend PostgreSQL logged for the next connection from
/// `client_port` (taken off the list).
fn next_backend(backends: &mut BTreeMap<u16, Vec<u32>>, client_port: u16, postmaster: u32) -> u32 {
    let list = backends
        .get_mut(&client_port)
        .unwrap_or_else(|| panic!("postgres logged no connection from port {client_port}"));
    assert!(
        !list.is_empty(),
        "more sockets from port {client_port} than logged"
    );
    let backend = list.remove(0);
    assert_ne!(backend, postmaster, "a backend of its own");
    backend
}

/// Counts over the backends' sockets.
#[derive(Default)]
struct BackendTally {
    rows: usize,
    /// Backends ss saw holding their socket.
    matched: usize,
    close_waits: usize,
    postmaster_closes: usize,
    /// Who held each connection last: the report counts it for them.
    held_last: BTreeMap<u32, u64>,
}

/// An accepted socket: queued rows name the postmaster, the rest the
/// backend (or the postmaster where ftrace says it made them), and ss saw
/// none but those two holding it.
fn assert_backend_owns_accepted(
    s: &Sock,
    seen: &Seen,
    traced: &Traced,
    backend: u32,
    postmaster: u32,
    tally: &mut BackendTally,
) {
    let (before, after) = s.queued_then_accepted(seen);
    assert_eq!(
        before.iter().map(|r| r.new.as_str()).collect::<Vec<_>>(),
        ["SYN_RECV", "ESTABLISHED"],
        "queued until the postmaster accepts it: {:#?}",
        s.life.rows
    );
    for r in before {
        assert_eq!(
            pid_of(r),
            postmaster,
            "the listener's owner while queued: {r}"
        );
    }
    for r in s.life.rows.iter() {
        assert_eq!(
            r.comm.as_deref(),
            Some("postgres"),
            "the process's name: {r}"
        );
        assert!(r.thread.is_none(), "one thread, named as the process: {r}");
    }
    let expected = assert_rows_after_accept(s, after, traced, backend, postmaster, tally);
    *tally.held_last.entry(expected).or_default() += 1;
    // ss: the backend holds it (the postmaster too, between its
    // accept and its close after the fork).
    let held: BTreeSet<u32> = seen
        .holders(&s.local, &s.peer, s.from_ns, s.to_ns)
        .iter()
        .map(|h| h.pid)
        .collect();
    assert!(
        held.is_subset(&BTreeSet::from([backend, postmaster])),
        "ss: {held:?} hold {} -> {}, backend {backend}",
        s.local,
        s.peer
    );
    if held.contains(&backend) {
        tally.matched += 1;
    }
    tally.rows += s.life.rows.len();
}

/// The rows after the accept name the backend, unless ftrace says the
/// postmaster made them; who held the socket last.
fn assert_rows_after_accept(
    s: &Sock,
    after: &[Row],
    traced: &Traced,
    backend: u32,
    postmaster: u32,
    tally: &mut BackendTally,
) -> u32 {
    // The backend's, unless the postmaster, slow to close its copy
    // after the fork, dropped the last reference: the kernel then made
    // the close in the postmaster, which held the socket last, and
    // from the backend's exit on (ftrace says when) it held it alone.
    let makers: Vec<Option<u32>> = after
        .iter()
        .map(|r| traced.maker(s.life.rport(), r))
        .collect();
    let postmaster_kept_it = makers.contains(&Some(postmaster));
    assert!(
        traced.exits.contains_key(&backend),
        "ftrace saw backend {backend} end"
    );
    let mut expected = backend;
    for (r, maker) in after.iter().zip(makers) {
        if let Some(maker) = maker {
            assert!(
                [backend, postmaster].contains(&maker),
                "{r} made by {maker}, neither backend {backend} nor the postmaster"
            );
            tally.postmaster_closes += usize::from(maker == postmaster);
            expected = maker;
        } else if postmaster_kept_it && traced.ended_before(backend, r.ts_ns) {
            expected = postmaster;
        }
        assert_eq!(
            pid_of(r),
            expected,
            "socket {} {}: the backend's: {r}",
            s.life.sock,
            s.life.path()
        );
        tally.close_waits += usize::from(r.new == "CLOSE_WAIT");
    }
    expected
}

/// pgbench's sockets are its own; every logged connection was shown; most
/// connections were closed by pgbench first; ss caught a backend.
fn assert_pgbench_totals(
    socks: &[Sock],
    accepted: &[&Sock],
    backends: &BTreeMap<u16, Vec<u32>>,
    [init, bench]: [u32; 2],
    tally: &BackendTally,
) {
    let (close_waits, matched) = (tally.close_waits, tally.matched);
    let clients: Vec<&Sock> = socks.iter().filter(|s| s.is_client()).collect();
    assert_eq!(clients.len(), accepted.len(), "pgbench's sockets");
    for r in clients.iter().flat_map(|s| &s.life.rows) {
        assert!(
            [init, bench].contains(&pid_of(r)) && r.comm.as_deref() == Some("pgbench"),
            "pgbench's: {r}"
        );
    }
    let unmatched: usize = backends.values().map(Vec::len).sum();
    assert_eq!(
        unmatched, 0,
        "postgres logged connections tcptrace did not show: {backends:?}"
    );
    assert!(
        accepted.len() >= 20,
        "pgbench -C made connections: {}",
        accepted.len()
    );
    // pgbench sends its Terminate message and closes at once, so its FIN
    // nearly always comes first and the backend's side goes to CLOSE_WAIT
    // in softirq (the rows the postmaster was once named for). A backend
    // that exits before the FIN arrives closes first: on a loaded machine
    // one connection in nine did.
    let backend_first = accepted
        .iter()
        .filter(|s| s.life.path().contains(">ESTABLISHED>FIN_WAIT1>"))
        .count();
    assert_eq!(
        close_waits + backend_first,
        accepted.len(),
        "each connection closed by pgbench or its backend first"
    );
    assert!(
        close_waits * 2 >= accepted.len(),
        "ESTABLISHED -> CLOSE_WAIT on most connections: {close_waits} of {}",
        accepted.len()
    );
    assert!(
        matched >= 1,
        "ss caught at least one backend holding its connection"
    );
}

/// `tcptrace report` counts each connection for the process that held it
/// last; the processes it lists.
fn assert_report_counts_held_last(
    recording: &str,
    held_last: &BTreeMap<u32, u64>,
    postmaster: u32,
) -> usize {
    let report = tcptrace(&["report", recording, "--format", "json", "--top", "100000"]).json();
    let processes = report["processes"].as_array().expect("processes");
    let connections = |pid: u32| {
        processes
            .iter()
            .find(|p| p["pid"] == pid)
            .and_then(|p| p["connections"].as_u64())
            .unwrap_or(0)
    };
    for (&pid, &n) in held_last {
        assert_eq!(
            connections(pid),
            n,
            "connections of {pid} (postmaster {postmaster}): {processes:#?}"
        );
    }
    processes.len()
}

// ---------------------------------------------------------------- Redis

#[test]
fn redis_rows_all_pass_a_comm_filter_whichever_thread_made_them() {
    let ns = Netns::new();
    let (port, replica_port) = (unique_port(), unique_port());
    let dir = TempDir::new("redis");
    let listen_at = format!("127.0.0.1:{port}");
    let all = tracer(&ns, port, &[]);
    let named = tracer(&ns, port, &["--comm", "redis-server"]);
    let mut procs = Procs::new(&ns);
    let master = start_redis_master(&mut procs, &ns, &dir, port);
    let replica = procs.spawn(&mut redis_server(
        &dir,
        replica_port,
        "replica",
        &["--replicaof", "127.0.0.1", &port.to_string()],
    ));
    let watch = SsWatch::start(&ns, Duration::from_millis(50));
    wait_for_replica_link(&ns, &listen_at, replica);
    let waiting = run_redis_clients(&mut procs, &ns, port);
    let threads: BTreeMap<u32, BTreeSet<String>> = [master, replica]
        .into_iter()
        .map(|p| (p, thread_names(p)))
        .collect();
    thread::sleep(Duration::from_millis(200));
    stop_redis(&mut procs, [replica, master], waiting);
    let seen = watch.finish();
    let (all, named) = stop_both(all, named);
    drop(procs);

    assert_eq!(
        seen.listener_always(&listen_at),
        BTreeSet::from([master]),
        "ss: the master holds its listener"
    );
    let named_lives = named.lives();
    let kept: BTreeSet<_> = named_lives.iter().map(redis_sock_key).collect();
    let lives = all.lives();
    let redis = RedisTruth {
        seen: &seen,
        listen_at: &listen_at,
        master,
        replica,
        threads: &threads,
    };
    let mut tally = RedisTally::default();
    for life in &lives {
        check_redis_socket(life, &redis, &kept, &named_lives, &mut tally);
    }
    assert_comm_filter_kept_them_all(&kept, &named, &tally);
    let RedisTally {
        server_rows,
        with_thread,
        cli_rows,
        thread_seen,
        ..
    } = tally;
    eprintln!(
        "redis: {} sockets, {server_rows} redis-server rows all kept by --comm ({with_thread} made by a thread of another name: {thread_seen:?}), {cli_rows} redis-cli rows, {} ss samples, threads {threads:?}",
        lives.len(),
        seen.0.len()
    );
}

/// The master, listening on `port`.
fn start_redis_master(procs: &mut Procs, ns: &Netns, dir: &TempDir, port: u16) -> u32 {
    let listen_at = format!("127.0.0.1:{port}");
    let master = procs.spawn(&mut redis_server(dir, port, "master", &[]));
    wait_until("redis listening", Duration::from_secs(10), || {
        ns.ss()
            .iter()
            .any(|k| k.state == "LISTEN" && k.local == listen_at)
    });
    master
}

/// A redis-server on `port`, its data in `sub` of `dir`.
fn redis_server(dir: &TempDir, port: u16, sub: &str, extra: &[&str]) -> Command {
    let d = dir.path(sub);
    std::fs::create_dir_all(&d).expect("redis dir");
    let mut cmd = Command::new("redis-server");
    // Background threads busy with an fsync per write, and I/O
    // threads: a close at exit may run in any of them.
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--dir",
        &d,
    ])
    .args([
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ])
    .args([
        "--io-threads",
        "2",
        "--io-threads-do-reads",
        "yes",
        "--daemonize",
        "no",
    ])
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    cmd
}

fn redis_cli(port: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn wait_for_replica_link(ns: &Netns, listen_at: &str, replica: u32) {
    wait_until(
        "the replica's link to its master",
        Duration::from_secs(10),
        || {
            ns.ss().iter().any(|k| {
                k.state == "ESTAB"
                    && k.peer == listen_at
                    && k.holders.iter().any(|h| h.pid == replica)
            })
        },
    );
}

/// Clients that close first, and two that wait (bounded) in BLPOP until
/// the server goes: returns once those two are connected, their pids.
fn run_redis_clients(procs: &mut Procs, ns: &Netns, port: u16) -> Vec<u32> {
    let listen_at = format!("127.0.0.1:{port}");
    for i in 0..5 {
        let c = procs.spawn(&mut redis_cli(port, &["set", &format!("k{i}"), "v"]));
        assert!(
            procs.wait(c, Duration::from_secs(10)).success(),
            "redis-cli set"
        );
    }
    let waiting: Vec<u32> = (0..2)
        .map(|_| procs.spawn(&mut redis_cli(port, &["blpop", "nothing", "20"])))
        .collect();
    wait_until("two clients waiting", Duration::from_secs(10), || {
        ns.ss()
            .iter()
            .filter(|k| k.local == listen_at && k.state == "ESTAB")
            .count()
            >= 3
    });
    waiting
}

/// Stopped the way a service manager stops them: the sockets they still
/// hold close as their threads exit. Then the waiting clients end.
fn stop_redis(procs: &mut Procs, servers: [u32; 2], waiting: Vec<u32>) {
    for pid in servers {
        // SAFETY: kill on a pid of this test's.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        assert!(
            procs.wait(pid, Duration::from_secs(10)).success(),
            "redis {pid} stops"
        );
    }
    for c in waiting {
        procs.wait(c, Duration::from_secs(10));
    }
}

/// Both tracers stopped, each having ended well.
fn stop_both(all: Tracer, named: Tracer) -> (Output, Output) {
    let (all, named) = (all.stop(), named.stop());
    assert!(
        all.status.success() && named.status.success(),
        "tcptrace failed: {} {}",
        all.stderr,
        named.stderr
    );
    (all, named)
}

/// `--comm redis-server` kept the redis-server sockets, every row of them,
/// and nothing else.
fn assert_comm_filter_kept_them_all(
    kept: &BTreeSet<(String, String, String, Vec<u32>)>,
    named: &Output,
    tally: &RedisTally,
) {
    let (server_socks, server_rows) = (tally.server_socks, tally.server_rows);
    assert_eq!(
        kept.len(),
        server_socks,
        "--comm redis-server kept exactly the redis-server sockets"
    );
    assert_eq!(named.rows().len(), server_rows, "and all their rows");
    assert!(
        server_rows >= 5 * 6,
        "the server side of every connection: {server_rows}"
    );
}

/// Each tracer reads its own clock: a socket is told by its ends, the
/// states it went through and who made each step.
fn redis_sock_key(life: &Life) -> (String, String, String, Vec<u32>) {
    let s = Sock::new(life);
    let owners: Vec<u32> = life.rows.iter().map(pid_of).collect();
    (s.local, s.peer, life.path(), owners)
}

/// What the Redis rows are checked against.
struct RedisTruth<'a> {
    seen: &'a Seen,
    listen_at: &'a str,
    master: u32,
    replica: u32,
    /// The servers' threads, by pid.
    threads: &'a BTreeMap<u32, BTreeSet<String>>,
}

/// Counts over the unfiltered tracer's sockets.
#[derive(Default)]
struct RedisTally {
    server_socks: usize,
    server_rows: usize,
    with_thread: usize,
    cli_rows: usize,
    thread_seen: BTreeSet<String>,
}

/// One socket of the unfiltered tracer: a redis-cli's rows name it; a
/// redis-server's name it from whichever thread, and the `--comm` tracer
/// kept them all.
fn check_redis_socket(
    life: &Life,
    redis: &RedisTruth,
    kept: &BTreeSet<(String, String, String, Vec<u32>)>,
    named_lives: &[Life],
    tally: &mut RedisTally,
) {
    let s = Sock::new(life);
    let held = redis.seen.holders(&s.local, &s.peer, s.from_ns, s.to_ns);
    let Some(holder) = redis_holder(&s, &held, redis) else {
        tally.cli_rows += life.rows.len();
        return;
    };
    for h in &held {
        assert_eq!(
            h.pid, holder,
            "ss holders of {} -> {}: {held:?}",
            s.local, s.peer
        );
    }
    if holder != redis.master && holder != redis.replica {
        for r in &life.rows {
            assert_eq!(
                (pid_of(r), r.comm.as_deref()),
                (holder, Some("redis-cli")),
                "{r}"
            );
        }
        tally.cli_rows += life.rows.len();
        return;
    }
    assert_server_rows_from_its_threads(&s, holder, redis, tally);
    assert!(
        kept.contains(&redis_sock_key(life)),
        "--comm redis-server dropped rows of {holder}'s: {:#?}\nkept: {:#?}",
        life.rows,
        named_lives.iter().find(|l| Sock::new(l).peer == s.peer)
    );
    tally.server_rows += life.rows.len();
    tally.server_socks += 1;
}

/// The process holding a socket: the server's side of a client's
/// connection, its listener, the replica's link are held by a
/// redis-server (ss; the short clients' accepted sockets are the
/// master's, the one process accepting). None for a short `redis-cli set`
/// that ss did not see.
fn redis_holder(s: &Sock, held: &BTreeSet<Holder>, redis: &RedisTruth) -> Option<u32> {
    if s.local == redis.listen_at {
        Some(redis.master)
    } else if let [Holder { pid, comm: name }] = &held.iter().cloned().collect::<Vec<_>>()[..] {
        assert!(name == "redis-cli" || *pid == redis.replica, "ss: {held:?}");
        Some(*pid)
    } else {
        assert!(held.is_empty(), "ss: several holders {held:?}");
        // A short `redis-cli set`.
        assert!(
            s.life
                .rows
                .iter()
                .all(|r| r.comm.as_deref() == Some("redis-cli")),
            "{:#?}",
            s.life.rows
        );
        None
    }
}

/// A redis-server's rows after the accept name it, and any thread they
/// name is one of its own, not named as the process.
fn assert_server_rows_from_its_threads(
    s: &Sock,
    holder: u32,
    redis: &RedisTruth,
    tally: &mut RedisTally,
) {
    let life = s.life;
    let (_, after) = if s.is_accepted() {
        s.queued_then_accepted(redis.seen)
    } else {
        (&life.rows[..0], &life.rows[..])
    };
    let threads = redis.threads;
    for r in after {
        assert_eq!(
            (pid_of(r), r.comm.as_deref()),
            (holder, Some("redis-server")),
            "the process's name: {r}"
        );
        if let Some(t) = r.thread.as_deref() {
            assert!(
                t != "redis-server" && threads[&holder].contains(t),
                "thread {t:?} of {holder}: {:?}",
                threads[&holder]
            );
            tally.with_thread += 1;
            tally.thread_seen.insert(t.to_string());
        }
    }
}

/// A window with nothing listening on a port, from the recorded rows
/// alone: from the close that left no listener to the next listen, the
/// connects refused in it, and the time from that listen to the first
/// handshake completed on the port.
#[derive(Debug)]
struct DownWindow {
    start_ns: u64,
    end_ns: u64,
    refused: u64,
    first_connection_ns: Option<u64>,
}

fn down_windows(rows: &[Row], port: u16) -> Vec<DownWindow> {
    let ts = |r: &Row| r.ts_ns;
    let listeners: BTreeSet<u64> = rows
        .iter()
        .filter(|r| r.new == "LISTEN" && r.lport == port)
        .map(|r| r.sock)
        .collect();
    let mut up = 0usize;
    let mut windows: Vec<DownWindow> = Vec::new();
    let mut open: Option<u64> = None;
    for r in rows.iter().filter(|r| listeners.contains(&r.sock)) {
        match (r.old.as_deref(), Some(r.new.as_str())) {
            (_, Some("LISTEN")) => {
                if up == 0
                    && let Some(start_ns) = open.take()
                {
                    windows.push(DownWindow {
                        start_ns,
                        end_ns: ts(r),
                        refused: 0,
                        first_connection_ns: None,
                    });
                }
                up += 1;
            }
            (Some("LISTEN"), Some("CLOSE")) => {
                up -= 1;
                if up == 0 {
                    open = Some(ts(r));
                }
            }
            _ => {}
        }
    }
    for w in &mut windows {
        w.refused = rows
            .iter()
            .filter(|r| {
                r.close.as_deref() == Some("refused")
                    && r.rport == port
                    && (w.start_ns..=w.end_ns).contains(&ts(r))
            })
            .count() as u64;
        w.first_connection_ns = rows
            .iter()
            .filter(|r| r.is("SYN_RECV", "ESTABLISHED") && r.lport == port && ts(r) >= w.end_ns)
            .map(ts)
            .min()
            .map(|t| t - w.end_ns);
    }
    windows
}

/// The report's listener section for `port` agrees with the rows: each
/// window's length, its refused connects and the first connection after
/// it. Returns the windows.
fn assert_report_tells_the_restart(file: &str, port: u16) -> Vec<DownWindow> {
    let read = tcptrace(&["read", "--format", "json", file]);
    assert!(read.status.success(), "{}", read.stderr);
    let rows = read.all_rows();
    let windows = down_windows(&rows, port);
    let report = tcptrace(&["report", "--format", "json", file]).json();
    let section = report["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == port)
        .unwrap_or_else(|| panic!("no listener section for port {port}: {report}"));
    // Windows that ended (the one still down at the end has no "to").
    let down: Vec<&Value> = section["down"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| !d["to"].is_null())
        .collect();
    assert_eq!(down.len(), windows.len(), "{section}\nrows: {windows:?}");
    for (d, w) in down.iter().zip(&windows) {
        let ms = (w.end_ns - w.start_ns) as f64 / 1e6;
        assert!(
            (d["duration_ms"].as_f64().unwrap() - ms).abs() < 1e-3,
            "{d}: {w:?}"
        );
        assert_eq!(d["refused"], w.refused, "{d}: {w:?}");
        match w.first_connection_ns {
            Some(ns) => assert!(
                (d["first_connection_ms"].as_f64().unwrap() - ns as f64 / 1e6).abs() < 1e-3,
                "{d}: {w:?}"
            ),
            None => assert!(d["first_connection_ms"].is_null(), "{d}"),
        }
    }
    let total: u64 = rows
        .iter()
        .filter(|r| r.close.as_deref() == Some("refused") && r.rport == port)
        .count() as u64;
    assert_eq!(section["refused"], total, "{section}");
    windows
}

#[test]
fn nginx_stopped_and_started_under_wrk_is_down_as_the_rows_show() {
    let ns = Netns::new();
    let port = unique_port();
    let dir = TempDir::new("nginx-restart");
    let conf = nginx_conf(&dir, port);
    let recording = dir.path("restart.tcpt");
    let tracer = tracer(&ns, port, &["-q", "-w", &recording]);
    let mut procs = Procs::new(&ns);
    let start = |procs: &mut Procs| {
        let launcher = procs.spawn(&mut nginx(&dir, &conf, &[]));
        assert!(
            procs.wait(launcher, Duration::from_secs(10)).success(),
            "nginx failed: {:?}",
            std::fs::read_to_string(dir.path("error.log"))
        );
    };
    start(&mut procs);
    // Clients the whole time: some find nothing listening.
    let load = procs.spawn(&mut wrk(port, 3));
    thread::sleep(Duration::from_millis(800));
    let stop = procs.spawn(&mut nginx(&dir, &conf, &["-s", "stop"]));
    assert!(procs.wait(stop, Duration::from_secs(10)).success());
    let listen_at = format!("127.0.0.1:{port}");
    wait_until("nginx stopped", Duration::from_secs(10), || {
        !ns.ss()
            .iter()
            .any(|k| k.state == "LISTEN" && k.local == listen_at)
    });
    thread::sleep(Duration::from_millis(200));
    start(&mut procs);
    let _ = procs.wait(load, Duration::from_secs(15));
    let stop = procs.spawn(&mut nginx(&dir, &conf, &["-s", "quit"]));
    let _ = procs.wait(stop, Duration::from_secs(10));
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
    drop(procs);
    let windows = assert_report_tells_the_restart(&recording, port);
    // The restart's window, at least 200 ms long, with clients refused.
    assert!(
        windows
            .iter()
            .any(|w| w.end_ns - w.start_ns >= 200_000_000 && w.refused > 0),
        "{windows:?}"
    );
}

#[test]
fn postgres_restarted_fast_under_pgbench_is_down_as_the_rows_show() {
    let ns = Netns::new();
    let port = unique_port();
    let dir = TempDir::new("pg-restart");
    let data = pg_cluster(&dir);
    let recording = dir.path("restart.tcpt");
    let tracer = tracer(&ns, port, &["-q", "-w", &recording]);
    let mut procs = Procs::new(&ns);
    let port_s = port.to_string();
    let options = format!(
        "-h 127.0.0.1 -p {port} -k {} -c fsync=off -c synchronous_commit=off",
        dir.path("")
    );
    let pg_ctl = |action: &str| {
        let mut cmd = as_postgres(&postgres_bin("pg_ctl"));
        cmd.args(["-D", &data, "-l", &dir.path("pg.log"), "-o", &options, "-w"])
            .args(["-m", "fast", action])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd
    };
    let started = procs.spawn(&mut pg_ctl("start"));
    assert!(
        procs.wait(started, Duration::from_secs(60)).success(),
        "pg_ctl start"
    );
    let pgbench = |extra: &[&str]| {
        let mut cmd = as_postgres("pgbench");
        cmd.args(["-h", "127.0.0.1", "-p", &port_s, "-U", "postgres"])
            .args(extra)
            .arg("postgres")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    };
    let init = procs.spawn(&mut pgbench(&["-i", "-q", "-s", "1"]));
    assert!(
        procs.wait(init, Duration::from_secs(60)).success(),
        "pgbench -i"
    );
    // A connection per transaction; clients that meet the restart give up,
    // so a few run, and the restart comes while they do.
    let bench = procs.spawn(&mut pgbench(&["-C", "-S", "-T", "3", "-c", "4", "-j", "2"]));
    thread::sleep(Duration::from_millis(700));
    let restart = procs.spawn(&mut pg_ctl("restart"));
    assert!(
        procs.wait(restart, Duration::from_secs(60)).success(),
        "pg_ctl restart"
    );
    let _ = procs.wait(bench, Duration::from_secs(20));
    let stop = procs.spawn(&mut pg_ctl("stop"));
    assert!(
        procs.wait(stop, Duration::from_secs(60)).success(),
        "pg_ctl stop"
    );
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
    drop(procs);
    let windows = assert_report_tells_the_restart(&recording, port);
    assert_eq!(windows.len(), 1, "one restart: {windows:?}");
}

//! Owners as `ss -p` sees them: servers whose sockets change hands (a fork
//! that leaks, named threads, SCM_RIGHTS, the listen queue, a cgroup of
//! their own, a daemon's double fork). Each scenario runs in a fresh network
//! namespace; the truth about who holds each socket is `ss -tanpH` run in
//! it while the sockets are alive, and every row of every socket is checked
//! against it: states, pid, process name, "queued", thread name.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;
use tcptrace_tests::{
    CLIENT_CLOSES, ClientMode, Holder, LISTENER, Life, Netns, Output, Peer, Release, Row,
    SERVER_PASSIVE, ServerMode, SsSocket, TempDir, Tracer, TracerBuilder, Want, assert_rows, life,
    tcptrace, thread_names, unique_port, wait_until,
};

/// A server socket still held in CLOSE_WAIT when tracing stopped.
const LEAKED: &str = "LISTEN>SYN_RECV>ESTABLISHED>CLOSE_WAIT";

/// Polls `ss` (up to 10 s) until a socket matches; returns its holders.
fn holders_when(ns: &Netns, what: &str, matches: impl Fn(&SsSocket) -> bool) -> Vec<Holder> {
    ns.wait_for_socket(what, Duration::from_secs(10), matches)
        .holders
}

/// The holders of the one socket in `state` with local port `port`.
fn holders_of(ns: &Netns, state: &str, port: u16) -> Vec<Holder> {
    holders_when(ns, &format!("{state} on port {port}"), |s| {
        s.state == state && s.on_port(port)
    })
}

/// The holders a `--stuck` warning names for the socket with local port
/// `lport` and remote port `rport`: "pid N (comm), pid M (comm), ...".
fn stuck_names(stderr: &str, lport: u16, rport: u16) -> Vec<Holder> {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("tcptrace: stuck: "))
        .filter(|l| l.contains(&format!(":{lport} -> ")) && l.contains(&format!(":{rport} in ")))
        .collect();
    assert_eq!(lines.len(), 1, "one stuck warning for :{lport}: {stderr}");
    let who = lines[0]
        .trim_start_matches("tcptrace: stuck: ")
        .split(", ")
        .take_while(|p| p.starts_with("pid "))
        .map(|p| {
            let (pid, comm) = p
                .trim_start_matches("pid ")
                .split_once(" (")
                .expect("pid N (comm)");
            Holder::new(comm.trim_end_matches(')'), pid.parse().expect("pid"))
        })
        .collect::<BTreeSet<_>>();
    who.into_iter().collect()
}

/// Waits (up to 10 s) until tcptrace has warned about a stuck socket.
fn wait_for_stuck(tracer: &Tracer) {
    let warned = tracer.wait_for_stderr(Duration::from_secs(10), |err| {
        err.contains("tcptrace: stuck: ")
    });
    assert!(warned, "no stuck warning: {}", tracer.stderr_so_far());
}

/// Waits (up to 10 s) until the JSON recording `file` notes `who` as a
/// socket's holder: tcptrace has looked it up, and names it from then on.
fn wait_for_holders_note(file: &str, who: &Holder) {
    let noted = |line: &str| {
        let v: Value = serde_json::from_str(line).unwrap_or_default();
        v["type"] == "holders"
            && v["holders"].as_array().is_some_and(|hs| {
                hs.iter().any(|h| {
                    h["pid"].as_u64() == Some(u64::from(who.pid)) && h["comm"] == *who.comm
                })
            })
    };
    wait_until(
        &format!("a holders note naming {who:?} in {file}"),
        Duration::from_secs(10),
        || std::fs::read_to_string(file).is_ok_and(|text| text.lines().any(noted)),
    );
}

/// `tcptrace report --format json` of a recording.
fn report(file: &str) -> Value {
    tcptrace(&["report", "--format", "json", file]).json()
}

/// The report's still-open table: one socket, in `state`, held by `holders`.
fn assert_still_open(report: &Value, state: &str, lport: u16, holders: &[Holder]) {
    let open = report["still_open"].as_array().expect("still_open");
    assert_eq!(open.len(), 1, "one socket still open: {open:?}");
    let s = &open[0];
    assert_eq!(s["state"], state);
    assert!(
        s["local"].as_str().unwrap().ends_with(&format!(":{lport}")),
        "{s}"
    );
    let mut named: Vec<Holder> = s["holders"]
        .as_array()
        .expect("holders")
        .iter()
        .map(|h| {
            Holder::new(
                h["comm"].as_str().unwrap(),
                h["pid"].as_u64().unwrap() as u32,
            )
        })
        .collect();
    named.sort();
    assert_eq!(named, holders, "still open: {s}");
    assert_eq!(s["pid"].as_u64(), Some(u64::from(holders[0].pid)), "{s}");
}

/// The report's busiest processes, as (pid, comm) -> connections.
fn connections_by_process(report: &Value) -> Vec<(Holder, u64)> {
    let mut out: Vec<(Holder, u64)> = report["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| {
            (
                Holder::new(
                    p["comm"].as_str().unwrap(),
                    p["pid"].as_u64().unwrap() as u32,
                ),
                p["connections"].as_u64().unwrap(),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    out.sort();
    out
}

/// JSON rows of `port` in `ns`, without times (two tracers compare).
fn json_tracer(ns: &Netns, port: u16) -> TracerBuilder {
    Tracer::builder().port(port).netns(ns).json().time("none")
}

fn client_of(ns: &Netns, addr: &str, hold_ms: u32) -> (Peer, Holder) {
    let client = ns.client(addr, ClientMode::Close).hold_ms(hold_ms).start();
    let who = Holder::new("tt-client", client.pid);
    (client, who)
}

/// A socket's holders from ss must be exactly one process.
fn only(holders: Vec<Holder>, what: &str) -> Holder {
    assert_eq!(
        holders.len(),
        1,
        "{what}: one holder in ss, got {holders:?}"
    );
    holders.into_iter().next().unwrap()
}

fn parent_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process alive");
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse().ok())
        .expect("PPid line")
}

#[test]
fn forked_child_leaks_the_socket_and_is_named_for_it() {
    let ns = Netns::new();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let dir = TempDir::new("owners-leak");
    let file = dir.path("leak.jsonl");
    let tracer = json_tracer(&ns, port).stuck("1s").write(&file).start();
    // The child holds the leak until tracing has stopped.
    let leak = Release::new();
    let server = ns
        .server(&addr, ServerMode::ForkLeak)
        .hold_until(&leak)
        .start();
    let parent = only(holders_of(&ns, "LISTEN", port), "listener");
    assert_eq!(parent.pid, server.pid);
    let (client_peer, client) = client_of(&ns, &addr, 300);

    // The client has closed; the child the parent forked keeps the socket.
    let child = only(holders_of(&ns, "CLOSE-WAIT", port), "leaked socket");
    assert_ne!(child.pid, parent.pid);
    assert_eq!(
        parent_of(child.pid),
        parent.pid,
        "the leak is the fork's child"
    );
    client_peer.finish();
    wait_for_stuck(&tracer);
    // Still the child's when the warning came and when tracing stops.
    assert_eq!(only(holders_of(&ns, "CLOSE-WAIT", port), "leak"), child);
    let out = tracer.stop();
    assert!(out.status.success(), "tcptrace failed: {}", out.stderr);
    leak.release();
    server.finish();

    let lives = out.lives();
    assert_eq!(lives.len(), 3, "{lives:?}");
    let listener = life(&lives, "CLOSE>LISTEN");
    assert_rows(listener, &Want::every_row(listener, &parent));
    let c = life(&lives, CLIENT_CLOSES);
    assert_rows(c, &Want::every_row(c, &client));
    let leaked = life(&lives, LEAKED);
    assert_rows(
        leaked,
        &[
            Want::row("LISTEN>SYN_RECV", &parent).queued(),
            Want::row("SYN_RECV>ESTABLISHED", &parent).queued(),
            Want::row("ESTABLISHED>CLOSE_WAIT", &child),
        ],
    );
    assert_eq!(
        stuck_names(&out.stderr, port, c.lport()),
        std::slice::from_ref(&child)
    );

    let report = report(&file);
    assert_still_open(&report, "CLOSE_WAIT", port, std::slice::from_ref(&child));
    let mut want_conns = vec![(client.clone(), 1), (child.clone(), 1)];
    want_conns.sort();
    assert_eq!(connections_by_process(&report), want_conns);
}

#[test]
fn named_threads_keep_the_process_name_and_say_their_own() {
    let ns = Netns::new();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let all = json_tracer(&ns, port).start();
    let by_comm = json_tracer(&ns, port)
        .args(&["--comm", "tt-threads"])
        .start();
    // The closing thread holds the socket until ss has seen it held and the
    // threads named: under the kernel matrix's emulation one ss run can
    // take most of a second, and a fixed 600 ms failed there.
    let closer = Release::new();
    let server = ns
        .server(&addr, ServerMode::Threads)
        .name("tt-threads")
        .hold_until(&closer)
        .start();
    let process = only(holders_of(&ns, "LISTEN", port), "listener");
    assert_eq!(process, Holder::new("tt-threads", server.pid));
    let (client_peer, client) = client_of(&ns, &addr, 300);
    // While the closing thread holds the socket, ss names the process; its
    // threads are called what the scenario named them.
    assert_eq!(
        only(holders_of(&ns, "CLOSE-WAIT", port), "accepted socket"),
        process
    );
    assert_eq!(
        thread_names(server.pid),
        ["tt-acceptor", "tt-closer", "tt-threads"]
            .map(String::from)
            .into(),
    );
    closer.release();
    client_peer.finish();
    server.finish();
    let out = all.stop();
    let filtered = by_comm.stop();
    assert!(out.status.success() && filtered.status.success());

    let lives = out.lives();
    assert_eq!(lives.len(), 3, "{lives:?}");
    let c = life(&lives, CLIENT_CLOSES);
    assert_rows(c, &Want::every_row(c, &client));
    // Listening and closing the listener are the main thread's.
    let listener = life(&lives, LISTENER);
    assert_rows(listener, &Want::every_row(listener, &process));
    let accepted = life(&lives, SERVER_PASSIVE);
    assert_rows(
        accepted,
        &[
            Want::row("LISTEN>SYN_RECV", &process).queued(),
            Want::row("SYN_RECV>ESTABLISHED", &process).queued(),
            Want::row("ESTABLISHED>CLOSE_WAIT", &process),
            Want::row("CLOSE_WAIT>LAST_ACK", &process).thread("tt-closer"),
            Want::row("LAST_ACK>CLOSE", &process),
        ],
    );

    // --comm names the process: it keeps every row of its sockets.
    let kept: Vec<Row> = filtered.rows();
    let server_rows: Vec<Row> = listener
        .rows
        .iter()
        .chain(&accepted.rows)
        .cloned()
        .collect();
    // Another tracer, so other timestamps: the rows' order and content.
    let by_time = |rows: &[Row]| {
        let mut rows = rows.to_vec();
        rows.sort_by_key(|r| r.ts_ns);
        rows.iter().map(Row::without_time).collect::<Vec<_>>()
    };
    assert_eq!(
        by_time(&kept),
        by_time(&server_rows),
        "--comm tt-threads keeps the server's rows, all of them"
    );
}

#[test]
fn socket_passed_over_a_unix_socket_is_named_for_its_receiver() {
    let ns = Netns::new();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let dir = TempDir::new("owners-passfd");
    let file = dir.path("pass.jsonl");
    let tracer = json_tracer(&ns, port).stuck("2s").write(&file).start();
    // The receiver holds the socket until tracing has stopped.
    let receiver_hold = Release::new();
    let server = ns
        .server(&addr, ServerMode::PassFd)
        .hold_until(&receiver_hold)
        .start();
    let sender = only(holders_of(&ns, "LISTEN", port), "listener");
    assert_eq!(sender.pid, server.pid);
    // The client closes once ss has seen the socket handed over.
    let client_hold = Release::new();
    let client_peer = ns
        .client(&addr, ClientMode::Close)
        .hold_until(&client_hold)
        .start();
    let client = Holder::new("tt-client", client_peer.pid);
    let receiver = only(
        holders_when(&ns, "the passed socket held by one process", |s| {
            s.state == "ESTAB"
                && s.on_port(port)
                && s.holders.len() == 1
                && s.holders[0].pid != sender.pid
        }),
        "passed socket",
    );
    assert_eq!(receiver.comm, "tt-receiver");
    // tcptrace learns of the handover only by looking the socket up (in
    // batches, every 250 ms at most): the client's FIN must come after.
    wait_for_holders_note(&file, &receiver);
    client_hold.release();
    client_peer.finish();
    assert_eq!(
        only(holders_of(&ns, "CLOSE-WAIT", port), "passed socket"),
        receiver
    );
    wait_for_stuck(&tracer);
    assert_eq!(
        only(holders_of(&ns, "CLOSE-WAIT", port), "passed socket"),
        receiver
    );
    let out = tracer.stop();
    assert!(out.status.success(), "tcptrace failed: {}", out.stderr);
    receiver_hold.release();
    server.finish();

    let lives = out.lives();
    assert_eq!(lives.len(), 3, "{lives:?}");
    let c = life(&lives, CLIENT_CLOSES);
    assert_rows(c, &Want::every_row(c, &client));
    let listener = life(&lives, LISTENER);
    assert_rows(listener, &Want::every_row(listener, &sender));
    let passed = life(&lives, LEAKED);
    assert_rows(
        passed,
        &[
            Want::row("LISTEN>SYN_RECV", &sender).queued(),
            Want::row("SYN_RECV>ESTABLISHED", &sender).queued(),
            Want::row("ESTABLISHED>CLOSE_WAIT", &receiver),
        ],
    );
    assert_eq!(
        stuck_names(&out.stderr, port, c.lport()),
        std::slice::from_ref(&receiver)
    );
    let report = report(&file);
    assert_still_open(&report, "CLOSE_WAIT", port, std::slice::from_ref(&receiver));
    let mut want_conns = vec![(client.clone(), 1), (receiver.clone(), 1)];
    want_conns.sort();
    assert_eq!(connections_by_process(&report), want_conns);
}

#[test]
fn rows_before_accept_carry_the_listeners_owner_as_queued() {
    let ns = Netns::new();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let tracer = json_tracer(&ns, port).start();
    // The socket waits in the queue, then is held, each until ss has seen
    // it: under the kernel matrix's arm64 emulation a connect, a close and
    // one ss run can take over a second, past any fixed window.
    let (accept, hold) = (Release::new(), Release::new());
    let server = ns
        .server(&addr, ServerMode::WaitPeerClose)
        .delay_accept_until(&accept)
        .hold_until(&hold)
        .start();
    let owner = only(holders_of(&ns, "LISTEN", port), "listener");
    assert_eq!(owner.pid, server.pid);
    // The client connects and closes at once: its socket is in the queue,
    // held by no process, when the FIN turns it CLOSE_WAIT.
    let (client_peer, client) = client_of(&ns, &addr, 0);
    client_peer.finish();
    let in_queue = holders_of(&ns, "CLOSE-WAIT", port);
    assert!(in_queue.is_empty(), "not accepted yet: {in_queue:?}");
    assert_eq!(only(holders_of(&ns, "LISTEN", port), "listener"), owner);
    accept.release();
    // Then accepted: the server's until it closes.
    let accepter = only(
        holders_when(&ns, "the accepted socket", |s| {
            s.state == "CLOSE-WAIT" && s.on_port(port) && !s.holders.is_empty()
        }),
        "accepted",
    );
    assert_eq!(accepter, owner);
    hold.release();
    server.finish();
    let out = tracer.stop();
    assert!(out.status.success(), "tcptrace failed: {}", out.stderr);

    let lives = out.lives();
    assert_eq!(lives.len(), 3, "{lives:?}");
    let c = life(&lives, CLIENT_CLOSES);
    assert_rows(c, &Want::every_row(c, &client));
    let listener = life(&lives, LISTENER);
    assert_rows(listener, &Want::every_row(listener, &owner));
    assert_rows(
        life(&lives, SERVER_PASSIVE),
        &[
            Want::row("LISTEN>SYN_RECV", &owner).queued(),
            Want::row("SYN_RECV>ESTABLISHED", &owner).queued(),
            Want::row("ESTABLISHED>CLOSE_WAIT", &owner).queued(),
            Want::row("CLOSE_WAIT>LAST_ACK", &accepter),
            Want::row("LAST_ACK>CLOSE", &accepter),
        ],
    );
}

/// A cgroup v2 directory of the test's own, removed on drop.
struct TestCgroup {
    dir: PathBuf,
    /// As /proc/PID/cgroup shows it: `/tcptrace-test.slice/NAME.service`.
    path: String,
}

impl TestCgroup {
    fn new(service: &str) -> Option<TestCgroup> {
        TestCgroup::leaf(&format!("{service}.service"))
    }

    /// `/tcptrace-test.slice/LEAF`: a service, or a container's scope.
    fn leaf(leaf: &str) -> Option<TestCgroup> {
        let root = cgroup2_mount()?;
        let path = format!("/tcptrace-test.slice/{leaf}");
        let dir = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).expect("create the test's cgroup");
        Some(TestCgroup { dir, path })
    }

    fn procs(&self) -> String {
        self.dir.join("cgroup.procs").to_string_lossy().into_owned()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
        // The slice only once no other test's service is in it.
        if let Some(slice) = self.dir.parent() {
            let _ = std::fs::remove_dir(slice);
        }
    }
}

/// Where cgroup v2 is mounted, from /proc/self/mountinfo.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mount = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(mount))
    })
}

/// The cgroup v2 path of a process, as the kernel shows it.
fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .expect("process alive")
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .to_string()
}

#[test]
fn unit_and_cgroup_filters_keep_the_service_and_only_it() {
    let service = format!("tt-owner-{}", std::process::id());
    let Some(cg) = TestCgroup::new(&service) else {
        println!("skipped: no cgroup2 mount on this host (/proc/self/mountinfo)");
        return;
    };
    assert!(Path::new(&cg.procs()).exists());
    let ns = Netns::new();
    let ports = (unique_port(), unique_port());
    let dir = TempDir::new("owners-unit");
    let file = dir.path("unit.jsonl");
    let (by_unit, by_cgroup, everything) = start_unit_tracers(&ns, ports, &service, &cg, &file);

    let served = serve_in_and_outside_the_unit(&ns, ports, &cg);
    let unit_out = by_unit.stop();
    let cgroup_out = by_cgroup.stop();
    let all_out = everything.stop();
    for o in [&unit_out, &cgroup_out, &all_out] {
        assert!(o.status.success(), "tcptrace failed: {}", o.stderr);
    }

    // Unfiltered: both servers and both clients, each as ss named them.
    assert_every_row_owned_as_ss_said(&all_out, ports, &served);
    assert_only_the_units_rows_name_it(&all_out, &served.in_unit, &service, &cg);

    // --unit and --cgroup, live: the unit's sockets, every row, nothing else.
    let ours = rows_of_the_unit(&all_out, &served.in_unit);
    assert_live_filters_keep_only(&ours, &unit_out, &cgroup_out);
    // The same filters on the recording: exactly its rows of the unit.
    assert_recording_filters_keep_only(&ours, &file, &service, &cg);
}

/// Tracers of both ports: one by `--unit`, one by `--cgroup`, and one of
/// everything, recording to `file`.
fn start_unit_tracers(
    ns: &Netns,
    (port, other_port): (u16, u16),
    service: &str,
    cg: &TestCgroup,
    file: &str,
) -> (Tracer, Tracer, Tracer) {
    let start = |extra: &[&str]| {
        Tracer::builder()
            .ports(&[port, other_port])
            .netns(ns)
            .json()
            .time("none")
            .args(extra)
            .start()
    };
    let by_unit = start(&["--unit", service]);
    let by_cgroup = start(&["--cgroup", &cg.path]);
    let everything = start(&["-w", file]);
    (by_unit, by_cgroup, everything)
}

/// Who ss saw holding each end of the unit scenario's connections.
struct UnitPeers {
    /// The server in the unit's cgroup, and the one outside it.
    in_unit: Holder,
    outside: Holder,
    /// The clients of each.
    client1: Holder,
    client2: Holder,
}

/// A server in the unit's cgroup on `port`, another outside it on
/// `other_port` (as ss and /proc confirm), a connection to each; all of
/// them finished.
fn serve_in_and_outside_the_unit(
    ns: &Netns,
    (port, other_port): (u16, u16),
    cg: &TestCgroup,
) -> UnitPeers {
    let (addr, other_addr) = (
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{other_port}"),
    );
    let procs = cg.procs();
    let server = ns
        .server(&addr, ServerMode::WaitPeerClose)
        .hold_ms(200)
        .cgroup_procs(&procs)
        .name("tt-unit")
        .start();
    let other = ns
        .server(&other_addr, ServerMode::WaitPeerClose)
        .hold_ms(200)
        .start();
    let in_unit = only(holders_of(ns, "LISTEN", port), "the unit's listener");
    assert_eq!(in_unit.pid, server.pid);
    assert_eq!(cgroup_of(server.pid), cg.path);
    let outside = only(holders_of(ns, "LISTEN", other_port), "the other listener");
    assert_ne!(cgroup_of(other.pid), cg.path);
    let (c1, client1) = client_of(ns, &addr, 100);
    let (c2, client2) = client_of(ns, &other_addr, 100);
    for c in [c1, c2] {
        c.finish();
    }
    server.finish();
    other.finish();
    UnitPeers {
        in_unit,
        outside,
        client1,
        client2,
    }
}

/// The unfiltered tracer's sockets of both servers and both clients, every
/// row owned as ss named its holder.
fn assert_every_row_owned_as_ss_said(
    all_out: &Output,
    (port, other_port): (u16, u16),
    peers: &UnitPeers,
) {
    let lives = all_out.lives();
    assert_eq!(lives.len(), 6, "{lives:?}");
    let on = |p: u16| -> Vec<&Life> { lives.iter().filter(|l| l.lport() == p).collect() };
    for (p, who, client) in [
        (port, &peers.in_unit, &peers.client1),
        (other_port, &peers.outside, &peers.client2),
    ] {
        let server_side = on(p);
        assert_eq!(server_side.len(), 2);
        for l in &server_side {
            if l.path() == LISTENER {
                assert_rows(l, &Want::every_row(l, who));
            } else {
                assert_eq!(l.path(), SERVER_PASSIVE);
                assert_rows(
                    l,
                    &[
                        Want::row("LISTEN>SYN_RECV", who).queued(),
                        Want::row("SYN_RECV>ESTABLISHED", who).queued(),
                        Want::row("ESTABLISHED>CLOSE_WAIT", who),
                        Want::row("CLOSE_WAIT>LAST_ACK", who),
                        Want::row("LAST_ACK>CLOSE", who),
                    ],
                );
            }
        }
        let client_side: Vec<&Life> = lives
            .iter()
            .filter(|l| l.rport() == p && l.path() == CLIENT_CLOSES)
            .collect();
        assert_eq!(client_side.len(), 1);
        assert_rows(client_side[0], &Want::every_row(client_side[0], client));
    }
}

/// The unit and the cgroup are named in the rows of the unit's process,
/// and in no other row.
fn assert_only_the_units_rows_name_it(
    all_out: &Output,
    in_unit: &Holder,
    service: &str,
    cg: &TestCgroup,
) {
    let unit_name = format!("{service}.service");
    for row in all_out.rows() {
        let ours = row.pid == Some(in_unit.pid);
        assert_eq!(
            (
                row.unit.as_deref() == Some(unit_name.as_str()),
                row.cgroup.as_deref() == Some(cg.path.as_str())
            ),
            (ours, ours),
            "unit and cgroup of {row}"
        );
    }
}

/// The unfiltered rows of the unit's process: its listener's and its
/// accepted socket's.
fn rows_of_the_unit(all_out: &Output, in_unit: &Holder) -> Vec<Row> {
    let ours: Vec<Row> = all_out
        .rows()
        .into_iter()
        .filter(|r| r.pid == Some(in_unit.pid))
        .collect();
    assert_eq!(
        ours.len(),
        7,
        "2 of the listener, 5 of the accepted socket: {ours:?}"
    );
    ours
}

/// `--unit` and `--cgroup`, live, printed the unit's rows and only them.
fn assert_live_filters_keep_only(ours: &[Row], unit_out: &Output, cgroup_out: &Output) {
    // Other tracers, so other timestamps and socket ids: the rest agrees.
    let expect: Vec<Row> = ours.iter().map(Row::without_time).collect();
    for (flag, out) in [("--unit", unit_out), ("--cgroup", cgroup_out)] {
        let got: Vec<Row> = out.rows().iter().map(Row::without_time).collect();
        assert_eq!(got, expect, "{flag} live");
    }
}

/// `tcptrace read` with `--unit` or `--cgroup` on the unfiltered recording
/// gives exactly the unit's rows.
fn assert_recording_filters_keep_only(ours: &[Row], file: &str, service: &str, cg: &TestCgroup) {
    for filter in [["--unit", service], ["--cgroup", cg.path.as_str()]] {
        let read = tcptrace(&[
            "read", "--format", "json", "--time", "none", filter[0], filter[1], file,
        ]);
        assert!(read.status.success(), "read failed: {}", read.stderr);
        assert_eq!(read.rows(), ours, "read {filter:?}");
    }
}

#[test]
fn a_daemons_launcher_is_never_named_after_it_exited() {
    let ns = Netns::new();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let tracer = json_tracer(&ns, port).start();
    let launcher = ns
        .server(&addr, ServerMode::Daemon)
        .conns(2)
        .hold_ms(200)
        .start();
    let launcher_pid = launcher.pid;
    launcher.finish();
    let launcher = Holder::new("tt-server", launcher_pid);
    // Once the launcher is gone, only the daemon holds the listener.
    let daemon = only(
        holders_when(&ns, "the listener held by the daemon alone", |s| {
            s.state == "LISTEN"
                && s.on_port(port)
                && s.holders.iter().all(|u| u.comm == "tt-daemon")
        }),
        "listener",
    );
    assert_ne!(daemon.pid, launcher.pid);
    assert!(!Path::new(&format!("/proc/{launcher_pid}")).exists());
    let (c1, client1) = client_of(&ns, &addr, 300);
    c1.finish();
    let (c2, client2) = client_of(&ns, &addr, 300);
    c2.finish();
    // The daemon serves both and exits by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ns.ss().iter().any(|s| s.state == "LISTEN") {
        assert!(Instant::now() < deadline, "the daemon did not exit");
        sleep(Duration::from_millis(20));
    }
    let out = tracer.stop();
    assert!(out.status.success(), "tcptrace failed: {}", out.stderr);

    let lives = out.lives();
    assert_eq!(lives.len(), 5, "{lives:?}");
    assert_rows(
        life(&lives, LISTENER),
        &[
            Want::row("CLOSE>LISTEN", &launcher),
            Want::row("LISTEN>CLOSE", &daemon),
        ],
    );
    for client in [&client1, &client2] {
        let l = lives
            .iter()
            .find(|l| l.rows[0].pid == Some(client.pid))
            .expect("client socket");
        assert_eq!(l.path(), CLIENT_CLOSES);
        assert_rows(l, &Want::every_row(l, client));
    }
    let served: Vec<&Life> = lives
        .iter()
        .filter(|l| l.path() == SERVER_PASSIVE)
        .collect();
    assert_eq!(served.len(), 2);
    for l in served {
        assert_rows(
            l,
            &[
                Want::row("LISTEN>SYN_RECV", &daemon).queued(),
                Want::row("SYN_RECV>ESTABLISHED", &daemon).queued(),
                Want::row("ESTABLISHED>CLOSE_WAIT", &daemon),
                Want::row("CLOSE_WAIT>LAST_ACK", &daemon),
                Want::row("LAST_ACK>CLOSE", &daemon),
            ],
        );
    }
    let launcher_rows = out
        .rows()
        .iter()
        .filter(|r| r.pid == Some(launcher_pid))
        .count();
    assert_eq!(launcher_rows, 1, "only the launcher's own listen names it");
}

#[test]
fn a_containers_sockets_carry_the_name_its_runtime_gave_it() {
    // A cgroup as Docker's systemd driver names a container's, and the
    // runtime's state for it, in a directory tcptrace is pointed at (no
    // container runtime runs here).
    let id = format!(
        "{:0>64x}",
        0xc0ffee_u64 * 1000 + u64::from(std::process::id())
    );
    let Some(cg) = TestCgroup::leaf(&format!("docker-{id}.scope")) else {
        println!("skipped: no cgroup2 mount on this host (/proc/self/mountinfo)");
        return;
    };
    let runtime = TempDir::new("runtime");
    let state = runtime.0.join(format!("var/lib/docker/containers/{id}"));
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("config.v2.json"),
        r#"{"ID":"x","Name":"/web-1"}"#,
    )
    .unwrap();

    let ns = Netns::new();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let dir = TempDir::new("container");
    let file = dir.path("rec.tcpt");
    let start = |args: &[&str]| {
        Tracer::builder()
            .port(port)
            .netns(&ns)
            .args(args)
            .env("TCPTRACE_RUNTIME_ROOT", &runtime.0)
            .start()
    };
    let json = start(&["--format", "json", "-w", &file]);
    let wide = start(&["--wide", "--no-header"]);
    let server = ns
        .server(&addr, ServerMode::WaitPeerClose)
        .cgroup_procs(&cg.procs())
        .start();
    assert_eq!(cgroup_of(server.pid), cg.path);
    let (client, _) = client_of(&ns, &addr, 50);
    client.finish();
    let server_pid = server.pid;
    server.finish();
    let (json, wide) = (json.stop(), wide.stop());

    // Every row the server owns names its container, id and name.
    let owned: Vec<Row> = json
        .rows()
        .into_iter()
        .filter(|r| r.pid == Some(server_pid))
        .collect();
    assert_eq!(owned.len(), 7, "listener 2, child 5: {}", json.stdout);
    for r in &owned {
        assert_eq!(
            (r.container.as_deref(), r.container_name.as_deref()),
            (Some(id.as_str()), Some("web-1")),
            "{r}"
        );
    }
    let text: Vec<&str> = wide
        .stdout
        .lines()
        .filter(|l| l.contains(&format!(" {server_pid} ")))
        .collect();
    assert_eq!(text.len(), 7, "{}", wide.stdout);
    assert!(
        text.iter().all(|l| l.contains("container:web-1")),
        "{}",
        wide.stdout
    );

    // The report names it where the runtime's state is readable.
    let mut cmd = std::process::Command::new(tcptrace_tests::tcptrace_bin());
    cmd.args(["report", "--format", "json", &file])
        .env("TCPTRACE_RUNTIME_ROOT", &runtime.0);
    let out = cmd.output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).expect("report is JSON");
    let server_row = report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == server_pid)
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(server_row["container"], id.as_str());
    assert_eq!(server_row["container_name"], "web-1");
}

/// A listener with TCP Fast Open in `ns`: listens, says so, waits for a
/// line on stdin, closes, says so.
fn fast_open_listener(ns: &Netns, port: u16) -> std::process::Child {
    let script = "import socket, sys\n\
        l = socket.socket()\n\
        l.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)\n\
        l.bind(('127.0.0.1', int(sys.argv[1]))); l.listen(16)\n\
        print('listening', flush=True)\n\
        sys.stdin.readline()\n\
        l.close()\n\
        print('closed', flush=True)\n";
    let mut child = ns.spawn(
        std::process::Command::new("python3")
            .args(["-c", script, &port.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped()),
    );
    assert_eq!(read_line(&mut child), "listening");
    child
}

fn read_line(child: &mut std::process::Child) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().to_owned()
}

#[test]
fn fast_open_children_reset_by_their_listeners_close_name_its_owner() {
    let ns = Netns::new();
    let port = unique_port();
    // 0x207: Fast Open on both sides, with no cookie asked by either.
    ns.sysctl("net.ipv4.tcp_fastopen", "519");
    // The client's handshake ACK is lost: the child its SYN's data made
    // waits in the accept queue in SYN_RECV.
    let rules = format!(
        "add table inet tt\n\
         add chain inet tt in {{ type filter hook input priority 0; }}\n\
         add rule inet tt in tcp dport {port} tcp flags & (syn | ack | fin | rst) == ack drop\n"
    );
    let mut nft = ns.spawn(
        std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped()),
    );
    nft.stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    let status = nft.wait().unwrap();
    assert!(status.success(), "nft in the namespace");
    let tracer = json_tracer(&ns, port).start();
    let mut server = fast_open_listener(&ns, port);
    let owner = only(holders_of(&ns, "LISTEN", port), "listener");
    assert_eq!(owner.pid, server.id());
    let client = "import socket, sys, time\n\
        c = socket.socket()\n\
        c.sendto(b'hello', socket.MSG_FASTOPEN, ('127.0.0.1', int(sys.argv[1])))\n\
        time.sleep(30)\n";
    let mut client =
        ns.spawn(std::process::Command::new("python3").args(["-c", client, &port.to_string()]));
    // The kernel's view: a child in SYN_RECV, its data in, held by no one.
    let child = holders_when(&ns, "the Fast Open child", |s| {
        s.state == "SYN-RECV" && s.on_port(port)
    });
    assert!(child.is_empty(), "{child:?}");
    // The server closes its listener: the kernel resets the child.
    writeln!(server.stdin.as_mut().unwrap()).unwrap();
    assert_eq!(read_line(&mut server), "closed");
    ns.settle("SYN-RECV");
    let _ = server.wait();
    let _ = client.kill();
    let _ = client.wait();
    let out = tracer.stop();
    assert!(out.status.success(), "tcptrace failed: {}", out.stderr);

    let lives = out.lives();
    let child = life(&lives, "LISTEN>SYN_RECV>CLOSE");
    assert_rows(
        child,
        &[
            Want::row("LISTEN>SYN_RECV", &owner).queued(),
            Want::row("SYN_RECV>CLOSE", &owner).queued(),
        ],
    );
    let reset = child.rows.last().unwrap();
    assert_eq!(reset.close.as_deref(), Some("reset sent"), "{reset}");
}

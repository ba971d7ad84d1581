//! Filters people ask for (a state, an address range), the order rows come
//! out in, and `--stuck` where the tracepoint alone says too little.

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use std::time::Duration;

use tcptrace_tests::{
    CLIENT_CLOSES, ClientMode, Netns, Release, Row, SERVER_PASSIVE, ServerMode, TempDir, Tracer,
    TracerBuilder, is_stats_line, tcptrace, unique_port,
};

/// tcptrace on `port`, JSON rows on stdout and recorded to `file`; no
/// snapshot, so only what the scenario makes shows.
fn recording(port: u16, file: &str) -> TracerBuilder {
    Tracer::builder()
        .port(port)
        .write(file)
        .json()
        .no_snapshot()
}

#[test]
fn a_state_filter_keeps_rows_entering_or_leaving_it_live_and_in_a_recording() {
    let ns = Netns::new();
    let port = unique_port();
    let dir = TempDir::new("state");
    let file = dir.path("rec.jsonl");
    let tracer = recording(port, &file)
        .args(&["--state", "close_wait"])
        .start();
    ns.connections(&format!("127.0.0.1:{port}"), 2);
    ns.settle("last-ack");
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
    // Each server socket's two rows about CLOSE_WAIT, and nothing else.
    let lives = out.lives();
    assert_eq!(lives.len(), 2, "{}", out.stdout);
    for l in &lives {
        assert_eq!(
            l.rows.iter().map(|r| r.change()).collect::<Vec<_>>(),
            ["ESTABLISHED>CLOSE_WAIT", "CLOSE_WAIT>LAST_ACK"],
            "{}",
            out.stdout
        );
    }
    // The whole recording read back with the filter gives the same rows.
    let all = tcptrace(&["read", "--format", "json", &file]);
    assert!(all.status.success(), "{}", all.stderr);
    let read = tcptrace(&["read", "--format", "json", "--state", "CLOSE_WAIT", &file]);
    assert!(read.status.success(), "{}", read.stderr);
    assert_eq!(read.stdout, out.stdout);
    let bad = tcptrace(&["read", "--state", "TIME-WAITING", &file]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        bad.stderr
            .contains("\"TIME-WAITING\" is not a TCP state; the states are ESTABLISHED"),
        "{}",
        bad.stderr
    );
}

#[test]
fn address_filters_pick_connections_by_network_in_either_family() {
    let ns = Netns::new();
    let port = unique_port();
    let dir = TempDir::new("addr");
    let file = dir.path("rec.jsonl");
    let tracer = recording(port, &file).args(&["--raddr", "::1/128"]).start();
    ns.connections(&format!("127.0.0.1:{port}"), 1);
    ns.connections(&format!("[::1]:{port}"), 1);
    ns.settle("fin-wait-1");
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
    // Only the IPv6 connection's sockets have the remote ::1 (the
    // listeners' remote is unspecified).
    let rows = out.rows();
    assert!(!rows.is_empty());
    for r in &rows {
        assert_eq!(r.raddr, "::1", "{r}");
    }
    let lives = out.lives();
    let paths: BTreeSet<String> = lives.iter().map(|l| l.path()).collect();
    assert_eq!(
        paths,
        BTreeSet::from([CLIENT_CLOSES.to_string(), SERVER_PASSIVE.to_string()]),
        "{}",
        out.stdout
    );
    // Offline, by a local network: the recording holds only what was
    // shown, so IPv4 finds nothing and the IPv6 loopback everything.
    let v4 = tcptrace(&["read", "--format", "json", "--laddr", "127.0.0.0/8", &file]);
    assert!(v4.status.success(), "{}", v4.stderr);
    assert_eq!(v4.stdout, "");
    let v6 = tcptrace(&["read", "--format", "json", "--addr", "::1", &file]);
    assert_eq!(v6.stdout, out.stdout);
    let bad = tcptrace(&["read", "--laddr", "10.0.0.0/40", &file]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        bad.stderr
            .contains("\"40\" is not a prefix length for 10.0.0.0; it is 0 to 32"),
        "{}",
        bad.stderr
    );
}

#[test]
fn traced_rows_come_out_in_time_order_and_time_wait_rows_after_their_close() {
    let ns = Netns::new();
    let port = unique_port();
    let dir = TempDir::new("order");
    let file = dir.path("rec.jsonl");
    let tracer = recording(port, &file).start();
    // Connections as fast as the machine makes them, each closing into
    // time-wait, whose table tcptrace reads while the ring keeps bringing
    // transitions that happened before the read.
    ns.churn(port, 2, &["--clients", "1"]).expected();
    ns.settle("fin-wait-1");
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
    let all = out.all_rows();
    let tw = out.timewait_origin();
    let timewait = all.iter().filter(|r| r.origin == tw).count();
    assert!(timewait >= 1000, "{timewait} time-wait rows");
    // The kernel's transitions, in the order they happened (time-wait rows
    // from the kernel's hooks among them; those found by reading the table
    // come later than their moment).
    let traced: Vec<&Row> = all.iter().filter(|r| r.origin != "timewait").collect();
    for (i, w) in traced.windows(2).enumerate() {
        assert!(
            w[0].ts_ns <= w[1].ts_ns,
            "traced row {i} ({}) stamped after the next ({})",
            w[0],
            w[1]
        );
    }
    // A time-wait row carries the kernel's moment, often before rows
    // already out (the read found it later), but never before the rows of
    // its own connection, which it follows.
    let mut last_of_sock: HashMap<u64, u64> = HashMap::new();
    for r in &all {
        if let Some(&before) = last_of_sock.get(&r.sock) {
            assert!(
                before <= r.ts_ns,
                "{r} stamped before its socket's row at {before}"
            );
        } else {
            assert_ne!(r.origin, tw, "{r} before its socket's close");
        }
        last_of_sock.insert(r.sock, r.ts_ns);
    }
    let read = tcptrace(&["read", "--format", "json", &file]);
    assert_eq!(read.stdout, out.stdout, "read keeps the order");
}

/// A python3 process in `ns` that listens with no room in its queue
/// (`listen`), or makes N connects without binding first (`connect N`), and
/// holds them for 10 s; returns once it has done so.
fn holder(ns: &Netns, port: u16, what: &[&str]) -> std::process::Child {
    // A listener with backlog 0 that never accepts takes one connection;
    // the kernel drops the SYNs of the others, which wait in SYN_SENT.
    let script = "import socket, sys, time\n\
        port = int(sys.argv[1])\n\
        held = []\n\
        if sys.argv[2] == 'listen':\n\
        \x20   l = socket.socket(); l.bind(('127.0.0.1', port)); l.listen(0); held.append(l)\n\
        else:\n\
        \x20   for i in range(int(sys.argv[3])):\n\
        \x20       c = socket.socket(); c.setblocking(False)\n\
        \x20       try: c.connect(('127.0.0.1', port))\n\
        \x20       except BlockingIOError: pass\n\
        \x20       held.append(c); time.sleep(0.05)\n\
        print('ready', flush=True)\n\
        time.sleep(10)\n";
    let mut child = ns.spawn(
        Command::new("python3")
            .args(["-c", script, &port.to_string()])
            .args(what)
            .stdout(Stdio::piped()),
    );
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

#[test]
fn a_connect_stuck_in_syn_sent_is_named_with_the_port_the_kernel_chose() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder()
        .json()
        .no_snapshot()
        .port(port)
        .stuck("1s")
        .start();
    let listener = holder(&ns, port, &["listen"]);
    // The first connect fills the queue; the next three processes' wait.
    let mut singles: Vec<_> = (0..4)
        .map(|_| holder(&ns, port, &["connect", "1"]))
        .collect();
    let twins = holder(&ns, port, &["connect", "2"]);
    let waiting: Vec<(String, u32)> = ns
        .ss()
        .into_iter()
        .filter(|s| s.is("SYN-SENT"))
        .map(|s| match &s.holders[..] {
            [one] => (s.local.clone(), one.pid),
            _ => panic!("one process holds each connect: {s:?}"),
        })
        .collect();
    assert_eq!(waiting.len(), 5, "connects waiting: {waiting:?}");
    // Each is warned about a second after its connect.
    tracer.wait_for_stderr(Duration::from_secs(6), |err| {
        err.matches(" in SYN_SENT for ").count() >= 5
    });
    let out = tracer.stop();
    let warned: BTreeSet<(String, u32)> = out
        .stderr
        .lines()
        .filter(|l| l.contains(" in SYN_SENT for "))
        .map(|l| {
            // "tcptrace: stuck: pid N (python3), LOCAL -> REMOTE in ..."
            let pid = l
                .split("pid ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{l}"));
            let local = l
                .split_once("), ")
                .and_then(|(_, r)| r.split(" -> ").next())
                .unwrap()
                .to_string();
            (local, pid)
        })
        .collect();
    // A connect alone in its process is named with its port; the twins,
    // which nothing tells apart, each with both candidates.
    let port_of = |a: &str| a.rsplit(':').next().unwrap().to_string();
    let twin_ports: Vec<String> = waiting
        .iter()
        .filter(|(_, pid)| *pid == twins.id())
        .map(|(a, _)| port_of(a))
        .collect();
    assert_eq!(twin_ports.len(), 2, "{waiting:?}");
    let mut want: BTreeSet<(String, u32)> = waiting
        .iter()
        .filter(|(_, pid)| *pid != twins.id())
        .cloned()
        .collect();
    want.insert((
        format!("127.0.0.1:(one of {}, {})", twin_ports[0], twin_ports[1]),
        twins.id(),
    ));
    assert_eq!(warned, want, "{}\n{}", out.stderr, out.stdout);
    assert_eq!(
        out.stderr
            .lines()
            .filter(|l| l.contains(" in SYN_SENT for "))
            .count(),
        5,
        "{}",
        out.stderr
    );
    for mut p in singles.drain(..).chain([listener, twins]) {
        let _ = p.kill();
        let _ = p.wait();
    }
}

#[test]
fn stuck_names_a_fin_wait2_orphan_that_only_the_time_wait_table_holds() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder()
        .json()
        .no_snapshot()
        .port(port)
        .stuck("1s")
        .start();
    // The client closes; the server sees EOF and keeps its side open until
    // both ends were warned about, however long that takes.
    let addr = format!("127.0.0.1:{port}");
    let open = Release::new();
    let server = ns
        .server(&addr, ServerMode::WaitPeerClose)
        .hold_until(&open)
        .start();
    let client = ns.client(&addr, ClientMode::Close).start();
    let client_pid = client.pid;
    client.finish();
    let _ = tracer.wait_for_stderr(Duration::from_secs(20), |err| {
        err.contains(" in FIN_WAIT2 for ")
            && err
                .lines()
                .any(|l| l.contains(" in CLOSE_WAIT for ") && l.contains("(tt-server)"))
    });
    open.release();
    server.finish();
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
    let client_end = out
        .rows()
        .into_iter()
        .find(|r| r.is("FIN_WAIT2", "CLOSE"))
        .expect("the client's socket closed into time-wait");
    let orphan: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains(" in FIN_WAIT2 for "))
        .collect();
    assert_eq!(orphan.len(), 1, "{}", out.stderr);
    let line = orphan[0];
    assert!(
        line.starts_with(&format!(
            "tcptrace: stuck: no process holds it (closed by pid {client_pid} (tt-client)), 127.0.0.1:{} -> {addr} in FIN_WAIT2",
            client_end.lport
        )),
        "{line}"
    );
    assert!(line.contains("orphaned"), "{line}");
    // The server, meanwhile, sat in CLOSE_WAIT: its own warning.
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains(" in CLOSE_WAIT for ") && l.contains("(tt-server)")),
        "{}",
        out.stderr
    );
}

#[test]
fn counts_of_one_read_as_english() {
    let ns = Netns::new();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    // One socket before tcptrace starts: the listener, kept until tcptrace
    // traces (its start takes seconds under emulation).
    let listening = Release::new();
    let server = ns
        .server(&addr, ServerMode::ListenOnly)
        .hold_until(&listening)
        .start();
    let tracer = Tracer::builder().port(port).netns(&ns).start();
    // Then one transition: the listener closes.
    listening.release();
    server.finish();
    let out = tracer.stop();
    let stats = out
        .stderr
        .lines()
        .find(|l| is_stats_line(l))
        .unwrap_or_else(|| panic!("{}", out.stderr));
    assert!(
        stats.starts_with("tcptrace: 1 transition shown, 1 existing socket, "),
        "{stats}"
    );
    assert_eq!(out.stats().0, 1);
}

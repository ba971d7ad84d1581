//! What the tracepoint alone does not tell, against the real kernel: the
//! sockets that exist before tcptrace starts, and the life of a connection
//! in the kernel's time-wait table after its socket "closed".

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use tcptrace_tests::{
    ClientMode, Netns, Release, Row, ServerMode, TempDir, Tracer, monotonic_ns, tcptrace,
    unique_port,
};

fn of_sock(rows: &[Row], sock: u64) -> Vec<Row> {
    rows.iter().filter(|r| r.sock == sock).cloned().collect()
}

#[test]
fn sockets_that_exist_before_tcptrace_starts_appear_as_snapshot_lines() {
    let ns = Netns::new();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let server = ns
        .server(&addr, ServerMode::WaitPeerClose)
        .hold_ms(100)
        .start();
    // Open until the tracer has looked, however long it takes to start
    // (over 20 s seen under the kernel matrix's arm64 emulation).
    let open = Release::new();
    let client = ns
        .client(&addr, ClientMode::Close)
        .hold_until(&open)
        .start();
    let (spid, cpid) = (server.pid, client.pid);
    ns.wait_for_socket("the connection", Duration::from_secs(30), |s| {
        s.state == "ESTAB" && s.on_port(port) && !s.holders.is_empty()
    });
    let tracer = Tracer::builder()
        .port(port)
        .netns(&ns)
        .json()
        .no_timewait()
        .start();
    open.release();
    client.finish();
    server.finish();
    let out = tracer.stop();
    let rows = out.all_rows();
    let snapshot: Vec<&Row> = rows.iter().filter(|r| r.origin == "snapshot").collect();
    assert_eq!(
        snapshot.len(),
        3,
        "listener, and both ends of the connection: {}",
        out.stdout
    );
    // Listeners first, like netstat.
    assert_eq!(snapshot[0].new, "LISTEN");
    assert!(snapshot[0].owned_by(spid, "tt-server"), "{}", snapshot[0]);
    let client_row = snapshot
        .iter()
        .find(|r| r.rport == port)
        .expect("client end");
    let server_row = snapshot
        .iter()
        .find(|r| r.lport == port && r.new == "ESTABLISHED")
        .unwrap();
    assert!(client_row.owned_by(cpid, "tt-client"), "{client_row}");
    assert!(server_row.owned_by(spid, "tt-server"), "{server_row}");
    for r in &snapshot {
        assert!(r.old.is_none() && r.ms.is_none(), "no transition seen: {r}");
        assert_eq!(r.netns, Some(ns.inode()));
    }
    assert_eq!(client_row.new, "ESTABLISHED");
    // Their first transitions: the same socket ids, time in state unknown.
    let client_life = of_sock(&rows, client_row.sock);
    assert!(
        client_life[1].is("ESTABLISHED", "FIN_WAIT1"),
        "{}",
        client_life[1]
    );
    assert!(client_life[1].ms.is_none(), "{}", client_life[1]);
    assert_eq!(client_life[1].pid, Some(cpid));
    let server_life = of_sock(&rows, server_row.sock);
    assert_eq!(server_life[1].new, "CLOSE_WAIT");
    assert!(server_life[1].ms.is_none());
    assert_eq!(server_life.last().unwrap().new, "CLOSE");
    assert!(server_life.iter().all(|r| r.pid == Some(spid)));
    // --no-snapshot leaves them out.
    let quiet = Tracer::builder().port(port).no_snapshot().json().start();
    assert!(quiet.stop().all_rows().is_empty());
}

#[test]
fn an_active_close_goes_through_time_wait_to_its_end() {
    let ns = Netns::new();
    // One local port, and time-wait reuse after 1 ms: a second connection
    // from the same port takes over the first one's time-wait socket.
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40000");
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
    // Kernels before 6.14 have no such setting: they reuse once the
    // second of the last timestamp has passed, which the pause below
    // outlasts as well.
    if Path::new("/proc/sys/net/ipv4/tcp_tw_reuse_delay").exists() {
        ns.sysctl("net.ipv4.tcp_tw_reuse_delay", "1");
    }
    let dir = TempDir::new("timewait");
    let file = dir.path("tw.jsonl");
    let port = unique_port();
    let tracer = Tracer::builder()
        .port(port)
        .netns(&ns)
        .json()
        .write(&file)
        .start();
    let addr = format!("127.0.0.1:{port}");
    let server = ns.server(&addr, ServerMode::WaitPeerClose).conns(2).start();
    let first = ns.client(&addr, ClientMode::Close).start();
    let first_pid = first.pid;
    first.finish();
    sleep(Duration::from_millis(1500));
    ns.client(&addr, ClientMode::Close).run();
    server.finish();
    sleep(Duration::from_millis(700));
    let out = tracer.stop();
    let rows = out.all_rows();
    let connect = rows
        .iter()
        .find(|r| r.new == "SYN_SENT" && r.pid == Some(first_pid))
        .expect("first connect");
    let life = of_sock(&rows, connect.sock);
    let path: Vec<String> = life
        .iter()
        .map(|r| format!("{} {}", r.change(), r.origin))
        .collect();
    let tw = out.timewait_origin();
    assert_eq!(
        path[3..],
        [
            "FIN_WAIT1>FIN_WAIT2 tracepoint".to_string(),
            "FIN_WAIT2>CLOSE tracepoint".to_string(),
            format!("FIN_WAIT2>TIME_WAIT {tw}"),
            format!("TIME_WAIT>CLOSE {tw}"),
        ],
        "{}",
        out.stdout
    );
    for r in &life[5..] {
        assert!(r.owned_by(first_pid, "tt-client"), "{r}");
        assert_eq!(r.lport, 40000);
    }
    let in_time_wait = life[6].ms.unwrap();
    assert!(
        (1000.0..5000.0).contains(&in_time_wait),
        "TIME_WAIT for {in_time_wait} ms until reused"
    );
    // The second connect took the time-wait socket over inside the
    // connect() call: the end is the kernel's moment, after the connect's
    // SYN_SENT (the kernel's hooks see it) or at it (where the table is
    // polled, the connect is the best time known).
    let second = rows
        .iter()
        .find(|r| r.is("CLOSE", "SYN_SENT") && r.pid != Some(first_pid) && r.rport == port)
        .expect("second connect");
    if out.timewait_from_kernel() {
        let established = rows
            .iter()
            .find(|r| r.is("SYN_SENT", "ESTABLISHED") && r.sock == second.sock)
            .expect("second connection established");
        assert!(
            (second.ts_ns..=established.ts_ns).contains(&life[6].ts_ns),
            "{}\n{second}\n{established}",
            life[6]
        );
    } else {
        assert_eq!(life[6].ts_ns, second.ts_ns, "{}\n{second}", life[6]);
    }
    assert_eq!(life[6].timing, None, "{}", life[6]);
    let entered = life[5].ts_ns;
    assert!(
        (ms_between(entered, life[6].ts_ns) - in_time_wait).abs() < 0.002,
        "{in_time_wait}"
    );
    // Text says where such lines come from; a replay shows them the same.
    let text = tcptrace(&["read", &file]);
    let note = if out.timewait_from_kernel() {
        "time-wait (kernel)"
    } else {
        "time-wait table"
    };
    assert_eq!(
        text.stdout.matches(note).count(),
        rows.iter().filter(|r| r.origin == tw).count()
    );
    let recorded = tcptrace(&["read", &file, "--format", "json"]).all_rows();
    let strip = |r: &Row| Row {
        time: None,
        ..r.clone()
    };
    assert_eq!(
        recorded.iter().map(strip).collect::<Vec<_>>(),
        rows.iter().map(strip).collect::<Vec<_>>()
    );
}

#[test]
fn a_peer_that_never_closes_ends_the_fin_wait2_timeout() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_fin_timeout", "1");
    let port = unique_port();
    let tracer = Tracer::builder().port(port).netns(&ns).json().start();
    let addr = format!("127.0.0.1:{port}");
    let server = ns
        .server(&addr, ServerMode::WaitPeerClose)
        .hold_ms(60000)
        .start();
    let client = ns.client(&addr, ClientMode::Close).start();
    let cpid = client.pid;
    client.finish();
    sleep(Duration::from_millis(2500));
    let out = tracer.stop();
    server.kill();
    let rows = out.all_rows();
    let tw: Vec<&Row> = rows
        .iter()
        .filter(|r| r.origin == out.timewait_origin())
        .collect();
    assert_eq!(tw.len(), 1, "{}", out.stdout);
    assert!(tw[0].is("FIN_WAIT2", "CLOSE"), "{}", tw[0]);
    assert_eq!(tw[0].pid, Some(cpid));
    let waited = tw[0].ms.unwrap();
    assert!(
        (1000.0..2500.0).contains(&waited),
        "FIN_WAIT2 for {waited} ms with tcp_fin_timeout 1"
    );
}

// Time-wait rows carry the kernel's times, where the table is polled
// (kernels that refuse fentry, this project's build machine among them).

/// The rows of the client's connection, the one whose connect `pid` made.
fn client_life(rows: &[Row], pid: u32) -> Vec<Row> {
    let connect = rows
        .iter()
        .find(|r| r.is("CLOSE", "SYN_SENT") && r.pid == Some(pid))
        .expect("the client's connect");
    of_sock(rows, connect.sock)
}

/// The one row of `life` that is `old` -> `new`.
fn change<'a>(life: &'a [Row], old: &str, new: &str) -> &'a Row {
    let found: Vec<&Row> = life.iter().filter(|r| r.is(old, new)).collect();
    assert_eq!(found.len(), 1, "one {old} -> {new} in {life:#?}");
    found[0]
}

/// Milliseconds between two monotonic times.
fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    (to_ns as f64 - from_ns as f64) / 1e6
}

/// The report's time-in-state line for `state`: (count, max ms).
fn report_dwell(report: &serde_json::Value, state: &str) -> (u64, f64) {
    let line = report["dwell"]
        .as_array()
        .expect("dwell lines")
        .iter()
        .find(|d| d["state"] == state)
        .unwrap_or_else(|| panic!("a {state} line in {}", report["dwell"]));
    (
        line["count"].as_u64().unwrap(),
        line["max_ms"].as_f64().unwrap(),
    )
}

/// `name="value"` of one tag of an HTML page.
fn attr<'a>(tag: &'a str, name: &str) -> &'a str {
    let key = format!(" {name}=\"");
    let from = tag.find(&key).unwrap_or_else(|| panic!("{name} in {tag}")) + key.len();
    let len = tag[from..].find('"').expect("closing quote");
    &tag[from..from + len]
}

/// The lifeline segments the HTML draws for socket `sock`: (state, from
/// ns, to ns), read from the data each segment carries.
fn html_segments(page: &str, sock: u64) -> Vec<(String, u64, u64)> {
    page.split("<rect class=\"segment\"")
        .skip(1)
        .map(|tag| &tag[..tag.find('>').expect("tag end")])
        .filter(|tag| attr(tag, "data-sock") == sock.to_string())
        .map(|tag| {
            (
                attr(tag, "data-state").to_owned(),
                attr(tag, "data-from-ns").parse().unwrap(),
                attr(tag, "data-to-ns").parse().unwrap(),
            )
        })
        .collect()
}

/// The sockets-per-state chart's samples of `state`: (time ns, count).
fn html_counts(page: &str, state: &str) -> Vec<(u64, u64)> {
    let line = page
        .split("<polyline class=\"state\"")
        .skip(1)
        .find(|tag| attr(tag, "data-state") == state)
        .unwrap_or_else(|| panic!("a {state} line in the chart"));
    attr(line, "data-counts")
        .split(' ')
        .map(|p| {
            let (t, n) = p.split_once(':').expect("time:count");
            (t.parse().unwrap(), n.parse().unwrap())
        })
        .collect()
}

#[test]
fn client_closes_after_the_peers_fin_the_time_wait_row_takes_the_closes_moment() {
    let ns = Netns::new();
    let dir = TempDir::new("tw-moment");
    let file = dir.path("tw.jsonl");
    let port = unique_port();
    let tracer = Tracer::builder()
        .port(port)
        .netns(&ns)
        .json()
        .write(&file)
        .start();
    let addr = format!("127.0.0.1:{port}");
    // The client shuts down writing, so that its socket waits in FIN_WAIT2
    // (not an orphan): the server's answer and FIN then make the kernel
    // put the connection straight into TIME_WAIT.
    let server = ns.server(&addr, ServerMode::ReplyAfterEof).start();
    let client = ns.client(&addr, ClientMode::HalfClose).start();
    let cpid = client.pid;
    client.finish();
    server.finish();
    // The kernel's own view: a time-wait socket, in TIME_WAIT.
    let server_end = format!(":{port}");
    ns.wait_for_socket(
        "the client's time-wait socket",
        Duration::from_secs(5),
        |s| s.state == "TIME-WAIT" && s.peer.ends_with(&server_end),
    );
    // Two reads of the table, and a margin.
    sleep(Duration::from_millis(800));
    let out = tracer.stop();
    let rows = out.all_rows();
    let life = client_life(&rows, cpid);
    let closed = change(&life, "FIN_WAIT2", "CLOSE");
    let entered = change(&life, "FIN_WAIT2", "TIME_WAIT");
    assert_eq!(closed.origin, "tracepoint");
    // Found in the table or reported by the kernel's hooks: either way
    // the kernel's time.
    assert_eq!(
        (entered.origin.as_str(), entered.timing.as_deref()),
        (out.timewait_origin(), None),
        "the kernel's time: {entered}"
    );
    assert_eq!(entered.ts_ns, closed.ts_ns, "{closed}\n{entered}");
    assert_eq!(entered.ms, closed.ms, "the same time in FIN_WAIT2");
    let fin_wait2_ms = closed.ms.expect("seen entering FIN_WAIT2");
    let fin_wait2_from = change(&life, "FIN_WAIT1", "FIN_WAIT2").ts_ns;
    assert!((ms_between(fin_wait2_from, closed.ts_ns) - fin_wait2_ms).abs() < 0.002);
    // Printed after rows stamped later than it: the read found it later.
    let at = |r: &Row| rows.iter().position(|x| x == r).unwrap();
    assert!(at(entered) > at(closed));

    // The report's time in FIN_WAIT2 is that connection's (the only one
    // to pass through it), counted once.
    let html = dir.path("tw.html");
    let report = tcptrace(&["report", &file, "--format", "json", "--html", &html]);
    assert!(report.status.success(), "{}", report.stderr);
    let (count, max_ms) = report_dwell(&report.json(), "FIN_WAIT2");
    assert_eq!(count, 1);
    // Kept to 3 significant digits, in whole microseconds.
    assert!(
        (max_ms - fin_wait2_ms).abs() <= fin_wait2_ms * 0.001 + 0.001,
        "{max_ms} vs {fin_wait2_ms}"
    );
    // The lifeline: FIN_WAIT2 for that time, then TIME_WAIT from the close.
    let page = std::fs::read_to_string(&html).unwrap();
    let segments = html_segments(&page, closed.sock);
    let fw2 = segments
        .iter()
        .find(|s| s.0 == "FIN_WAIT2")
        .expect("a FIN_WAIT2 segment");
    assert_eq!((fw2.1, fw2.2), (fin_wait2_from, closed.ts_ns));
    let tw_segment = segments.last().unwrap();
    assert_eq!(
        (tw_segment.0.as_str(), tw_segment.1),
        ("TIME_WAIT", closed.ts_ns)
    );
    // One socket in TIME_WAIT from that moment on, not from the read's.
    let counts = html_counts(&page, "TIME_WAIT");
    let first = counts
        .iter()
        .find(|(_, n)| *n > 0)
        .expect("a TIME_WAIT count");
    assert_eq!(*first, (closed.ts_ns, 1), "{counts:?}");
}

#[test]
fn an_orphan_in_fin_wait2_that_gets_the_peers_fin_later_takes_its_timers_moment() {
    let ns = Netns::new();
    // The orphan's FIN_WAIT2 timer (5 s) is not TIME_WAIT's 60 s: the time
    // read back can only come from the TIME_WAIT timer.
    ns.sysctl("net.ipv4.tcp_fin_timeout", "5");
    let port = unique_port();
    let tracer = Tracer::builder().port(port).netns(&ns).json().start();
    let addr = format!("127.0.0.1:{port}");
    // The client closes (its socket is handed to the table in FIN_WAIT2);
    // the server closes 1.5 s later, while reads find it there.
    let server = ns
        .server(&addr, ServerMode::WaitPeerClose)
        .hold_ms(1500)
        .start();
    let client = ns.client(&addr, ClientMode::Close).start();
    let cpid = client.pid;
    client.finish();
    server.finish();
    sleep(Duration::from_millis(800));
    let out = tracer.stop();
    let rows = out.all_rows();
    let life = client_life(&rows, cpid);
    let closed = change(&life, "FIN_WAIT2", "CLOSE");
    let entered = change(&life, "FIN_WAIT2", "TIME_WAIT");
    // Read back from the TIME_WAIT timer where the table is polled; the
    // kernel's hooks see the FIN itself.
    let timing = if out.timewait_from_kernel() {
        None
    } else {
        Some("timer")
    };
    assert_eq!(
        (entered.origin.as_str(), entered.timing.as_deref()),
        (out.timewait_origin(), timing),
        "{entered}"
    );
    // The truth from the other side: the server's FIN left with its
    // CLOSE_WAIT -> LAST_ACK, and reached the client on loopback at once.
    let fin_sent = rows
        .iter()
        .find(|r| r.is("CLOSE_WAIT", "LAST_ACK") && r.lport == port)
        .expect("the server's close");
    let off_ms = ms_between(fin_sent.ts_ns, entered.ts_ns);
    // The timer is read in whole jiffies (4 ms at HZ=250, the matrix's
    // kernels' and this machine's), either way, and the read's own time
    // is known to its length: measured -1.7 to +4.4 ms off here over 12
    // runs.
    assert!(
        (-6.0..6.0).contains(&off_ms),
        "{off_ms} ms after the FIN: {entered}"
    );
    // Time in FIN_WAIT2: from the tracepoint's entry, across the handover.
    let fin_wait2_from = closed.ts_ns - (closed.ms.unwrap() * 1e6).round() as u64;
    let waited = entered.ms.unwrap();
    assert!(
        (ms_between(fin_wait2_from, entered.ts_ns) - waited).abs() < 0.002,
        "{waited}"
    );
    assert!((1400.0..3000.0).contains(&waited), "{waited}");
}

/// Polled path only (tcptrace's sock_diag socket in the namespace is what
/// keeps it alive): the kernel matrix's fentry kernels do not run it, nor
/// does CI anywhere but on the host (it takes 62 s).
#[test]
fn a_time_wait_outlives_its_deleted_namespace_and_ends_after_60_s() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder().port(port).netns(&ns).json().start();
    let addr = format!("127.0.0.1:{port}");
    let server = ns.server(&addr, ServerMode::ReplyAfterEof).start();
    let started = monotonic_ns();
    let client = ns.client(&addr, ClientMode::HalfClose).start();
    let cpid = client.pid;
    client.finish();
    server.finish();
    // `ip netns del`: the name goes, but the namespace lives on while
    // tcptrace's socket in it is open, and so does its time-wait socket.
    // The test holds it too, to watch that socket from outside.
    let held = std::fs::File::open(ns.path()).unwrap();
    let held_path = format!("/proc/{}/fd/{}", std::process::id(), held.as_raw_fd());
    drop(ns);
    // The kernel's TIME_WAIT is 60 s, and a timer that long fires up to
    // 2.048 s late (the timer wheel's granularity at that range, HZ=250;
    // gone 60.3-62.0 s after the close, measured on 8 sockets with `ss`
    // every 5 ms).
    let server_end = format!(":{port}");
    let mut present_at = started;
    let gone_by = loop {
        let asked = monotonic_ns();
        let ss = Command::new("nsenter")
            .arg(format!("--net={held_path}"))
            .args(["ss", "-tanH", "state", "time-wait"])
            .output()
            .unwrap();
        if !String::from_utf8_lossy(&ss.stdout).contains(&server_end) {
            break monotonic_ns();
        }
        present_at = asked;
        assert!(
            asked < started + 70_000_000_000,
            "still in TIME_WAIT after 70 s"
        );
        sleep(Duration::from_millis(50));
    };
    // Then a read of the table finds it gone (every 250 ms, stretched
    // under load).
    sleep(Duration::from_millis(1500));
    let out = tracer.stop();
    let rows = out.all_rows();
    let life = client_life(&rows, cpid);
    let closed = change(&life, "FIN_WAIT2", "CLOSE");
    let entered = change(&life, "FIN_WAIT2", "TIME_WAIT");
    assert_eq!(
        (entered.ts_ns, entered.timing.as_deref()),
        (closed.ts_ns, None)
    );
    let ended = change(&life, "TIME_WAIT", "CLOSE");
    assert_eq!(
        (ended.origin.as_str(), ended.timing.as_deref()),
        ("timewait", Some("poll")),
        "{ended}"
    );
    let in_time_wait = ended.ms.unwrap();
    assert!(
        (ms_between(entered.ts_ns, ended.ts_ns) - in_time_wait).abs() < 0.002,
        "{ended}"
    );
    assert!(
        (60_000.0..62_600.0).contains(&in_time_wait),
        "TIME_WAIT for {in_time_wait} ms"
    );
    // Stamped by the read that found it gone: after `ss` last saw it,
    // before tcptrace stopped.
    assert!(
        (present_at..gone_by + 1_500_000_000).contains(&ended.ts_ns),
        "{ended}: seen at {present_at}, gone by {gone_by}"
    );
}

//! What the tracepoint alone does not tell, against the real kernel: the
//! sockets that exist before tcptrace starts, and the life of a connection
//! in the kernel's time-wait table after its socket "closed".

use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use tcptrace_tests::{ClientMode, Netns, Row, ServerMode, TempDir, Tracer, tcptrace, unique_port};

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
    // Open until the tracer has looked: longer than a tracer takes to
    // start under the kernel matrix's arm64 emulation (over 6 s seen).
    let client = ns.client(&addr, ClientMode::Close).hold_ms(20000).start();
    let (spid, cpid) = (server.pid, client.pid);
    sleep(Duration::from_millis(300));
    let tracer = Tracer::builder()
        .port(port)
        .netns(&ns)
        .json()
        .no_timewait()
        .start();
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

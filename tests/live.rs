//! Live tracing against the real kernel. Each test makes real connections
//! between a server and a client process (known pids, names tt-server and
//! tt-client) in a fresh network namespace, with tcptrace watching, and
//! checks every transition of every socket, its owner and its addresses.

use std::time::{Duration, Instant};

use tcptrace_tests::{
    CLIENT_CLOSES, ClientMode, LISTENER, Netns, Output, Pty, Release, SERVER_PASSIVE, ServerMode,
    Tracer, life, unique_port,
};

struct Run {
    out: Output,
    netns: u64,
    server: u32,
    client: u32,
}

/// Whether this kernel's tcp_send_reset says why (6.1's has no reason
/// field), from the tracepoint's own format.
fn kernel_gives_reset_reasons() -> bool {
    let path = "/sys/kernel/tracing/events/tcp/tcp_send_reset/format";
    let format = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    format
        .lines()
        .any(|l| l.trim_start().starts_with("field:") && l.contains(" reason;"))
}

/// Traces one server and one client on `addr:port`, with the given modes.
fn scenario(
    ip: &str,
    server_mode: ServerMode,
    client_mode: ClientMode,
    hold_ms: u32,
) -> (Run, u16) {
    let ns = Netns::new();
    let port = unique_port();
    let addr = if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    };
    // Only this test's namespace: nothing else on the host can show up.
    let tracer = Tracer::builder()
        .port(port)
        .netns(&ns)
        .json()
        .time("utc")
        .start();
    let server = ns.server(&addr, server_mode).hold_ms(hold_ms).start();
    let client = ns.client(&addr, client_mode).hold_ms(hold_ms).start();
    let (server_pid, client_pid) = (server.pid, client.pid);
    client.finish();
    server.finish();
    let out = tracer.stop();
    assert!(out.status.success(), "tcptrace failed: {}", out.stderr);
    (
        Run {
            out,
            netns: ns.inode(),
            server: server_pid,
            client: client_pid,
        },
        port,
    )
}

#[test]
fn client_closes_first() {
    let (run, port) = scenario(
        "127.0.0.1",
        ServerMode::WaitPeerClose,
        ClientMode::Close,
        150,
    );
    let lives = run.out.lives();
    assert_eq!(
        run.out.rows().len(),
        12,
        "10 for the connection, 2 for the listener"
    );

    let listener = life(&lives, LISTENER);
    listener.assert_owner(run.server, "tt-server");
    assert_eq!(listener.rows[0].laddr, "127.0.0.1");
    assert_eq!(listener.lport(), port);

    let client = life(&lives, CLIENT_CLOSES);
    client.assert_owner(run.client, "tt-client");
    // The kernel reports the connect before choosing the local port.
    assert_eq!(client.rows[0].lport, 0);
    let ephemeral = client.rows[1].lport;
    assert!(ephemeral >= 1024, "ephemeral port {ephemeral}");
    assert!(
        client.rows[1..]
            .iter()
            .all(|r| r.lport == ephemeral && r.rport == port)
    );

    let server = life(&lives, SERVER_PASSIVE);
    server.assert_owner(run.server, "tt-server");
    assert!(
        server
            .rows
            .iter()
            .all(|r| r.lport == port && r.rport == ephemeral)
    );
    assert!(
        server
            .rows
            .iter()
            .all(|r| r.laddr == "127.0.0.1" && r.raddr == "127.0.0.1")
    );

    // The server held the socket in CLOSE_WAIT for 150 ms before closing.
    let close_wait = server.ms_in("CLOSE_WAIT").unwrap();
    assert!(
        (150.0..5000.0).contains(&close_wait),
        "CLOSE_WAIT for {close_wait} ms"
    );
    // Time in state is unknown for a socket's first transition, never 0.
    assert!(client.rows[0].ms.is_none() && server.rows[0].ms.is_none());
    assert_eq!(run.out.stats().0, 12);
    assert_eq!(run.out.stats().2, 0, "nothing lost");
}

#[test]
fn server_closes_first() {
    let (run, _) = scenario(
        "127.0.0.1",
        ServerMode::CloseFirst,
        ClientMode::WaitEof,
        100,
    );
    let lives = run.out.lives();
    assert_eq!(run.out.rows().len(), 12);
    life(&lives, LISTENER).assert_owner(run.server, "tt-server");
    let server = life(
        &lives,
        "LISTEN>SYN_RECV>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE",
    );
    server.assert_owner(run.server, "tt-server");
    let client = life(
        &lives,
        "CLOSE>SYN_SENT>ESTABLISHED>CLOSE_WAIT>LAST_ACK>CLOSE",
    );
    client.assert_owner(run.client, "tt-client");
    let close_wait = client.ms_in("CLOSE_WAIT").unwrap();
    assert!(
        close_wait >= 100.0,
        "client closed 100 ms after EOF, saw {close_wait} ms"
    );
}

#[test]
fn client_resets_with_so_linger_zero() {
    let (run, _) = scenario("127.0.0.1", ServerMode::ExpectReset, ClientMode::Reset, 50);
    let lives = run.out.lives();
    assert_eq!(
        run.out.rows().len(),
        8,
        "6 for the reset connection, 2 for the listener"
    );
    let client = life(&lives, "CLOSE>SYN_SENT>ESTABLISHED>CLOSE");
    client.assert_owner(run.client, "tt-client");
    // The server's socket dies from the reset, in softirq: still its owner.
    let server = life(&lives, "LISTEN>SYN_RECV>ESTABLISHED>CLOSE");
    server.assert_owner(run.server, "tt-server");
    // Who reset whom, from the kernel's reset tracepoints.
    let client_close = client.rows.last().unwrap();
    assert_eq!(
        client_close.close.as_deref(),
        Some("reset sent"),
        "{client_close}"
    );
    // An abortive close goes through tcp_disconnect, which gives the
    // kernel's reason for a reset from the socket's state (on kernels
    // whose tcp_send_reset has a reason at all).
    let want = kernel_gives_reset_reasons().then_some("TCP_STATE");
    assert_eq!(
        client_close.reset_reason.as_deref(),
        want,
        "the kernel's reason: {client_close}"
    );
    let server_close = server.rows.last().unwrap();
    assert_eq!(
        server_close.close.as_deref(),
        Some("reset received"),
        "{server_close}"
    );
    assert!(server_close.reset_reason.is_none());
    // Only the closing rows carry a close reason.
    let annotated = run.out.rows().iter().filter(|r| r.close.is_some()).count();
    assert_eq!(annotated, 2);
}

#[test]
fn server_resets_and_the_text_says_who_reset_whom() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder().port(port).start();
    let addr = format!("127.0.0.1:{port}");
    // Roles swapped: the client waits for EOF, the server aborts. It waits
    // a moment first: a reset that lands before the client's connect()
    // has returned makes connect() itself fail (seen under emulation).
    let server = ns
        .server(&addr, ServerMode::ResetFirst)
        .hold_ms(300)
        .start();
    ns.client(&addr, ClientMode::ExpectReset).run();
    server.finish();
    let out = tracer.stop();
    let closes: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("ESTABLISHED -> CLOSE "))
        .collect();
    assert_eq!(closes.len(), 2, "{}", out.stdout);
    let server_line = closes.iter().find(|l| l.contains("tt-server")).unwrap();
    let client_line = closes.iter().find(|l| l.contains("tt-client")).unwrap();
    if kernel_gives_reset_reasons() {
        assert!(server_line.contains("  reset sent ("), "{server_line}");
    } else {
        assert!(
            server_line.trim_end().ends_with("  reset sent"),
            "{server_line}"
        );
    }
    assert!(
        client_line.trim_end().ends_with("  reset received"),
        "{client_line}"
    );
}

#[test]
fn connection_refused() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder().port(port).json().start();
    let client = ns
        .client(&format!("127.0.0.1:{port}"), ClientMode::Refused)
        .start();
    let pid = client.pid;
    client.finish();
    let out = tracer.stop();
    let lives = out.lives();
    assert_eq!(out.rows().len(), 2);
    let refused = life(&lives, "CLOSE>SYN_SENT>CLOSE");
    refused.assert_owner(pid, "tt-client");
    assert_eq!(refused.rows[1].close.as_deref(), Some("refused"));
    assert_eq!(refused.rport(), port);
}

#[test]
fn listen_then_close() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder().port(port).json().start();
    let addr = format!("0.0.0.0:{port}");
    let server = ns
        .server(&addr, ServerMode::ListenOnly)
        .hold_ms(120)
        .start();
    let pid = server.pid;
    server.finish();
    let out = tracer.stop();
    let lives = out.lives();
    assert_eq!(out.rows().len(), 2);
    let l = life(&lives, LISTENER);
    l.assert_owner(pid, "tt-server");
    assert_eq!(l.rows[0].laddr, "0.0.0.0");
    assert!(l.ms_in("LISTEN").unwrap() >= 120.0);
}

#[test]
fn half_close_with_shutdown_write() {
    // The client shuts down its sending side, then reads the server's answer:
    // its socket stays half-closed until the server closes 400 ms later. (The
    // peer may delay its ACK of our FIN by up to 200 ms, so part of the wait
    // can be in FIN_WAIT1; an orphaned socket would leave FIN_WAIT2 at once.)
    let (run, _) = scenario(
        "127.0.0.1",
        ServerMode::ReplyAfterEof,
        ClientMode::HalfClose,
        400,
    );
    let lives = run.out.lives();
    assert_eq!(run.out.rows().len(), 12);
    let client = life(&lives, CLIENT_CLOSES);
    client.assert_owner(run.client, "tt-client");
    let fin_wait1 = client.ms_in("FIN_WAIT1").unwrap();
    let fin_wait2 = client.ms_in("FIN_WAIT2").unwrap();
    assert!(
        fin_wait1 + fin_wait2 >= 400.0,
        "half-closed for {fin_wait1} + {fin_wait2} ms"
    );
    assert!(
        fin_wait2 >= 150.0,
        "half-closed client waited {fin_wait2} ms in FIN_WAIT2"
    );
    life(&lives, SERVER_PASSIVE).assert_owner(run.server, "tt-server");
}

#[test]
fn ipv6_client_closes_first() {
    let (run, port) = scenario("::1", ServerMode::WaitPeerClose, ClientMode::Close, 20);
    let lives = run.out.lives();
    assert_eq!(run.out.rows().len(), 12);
    for l in &lives {
        assert!(l.rows.iter().all(|r| r.family == "ipv6"), "{:?}", l.rows);
    }
    let client = life(&lives, CLIENT_CLOSES);
    client.assert_owner(run.client, "tt-client");
    assert!(
        client
            .rows
            .iter()
            .all(|r| r.laddr == "::1" && r.raddr == "::1")
    );
    let server = life(&lives, SERVER_PASSIVE);
    assert_eq!(server.lport(), port);
    server.assert_owner(run.server, "tt-server");
}

#[test]
fn port_filter_excludes_other_traffic_on_the_same_host() {
    let ns = Netns::new();
    let (watched, other) = (unique_port(), unique_port());
    let tracer = Tracer::builder().port(watched).json().start();
    for port in [other, watched, other] {
        ns.connections(&format!("127.0.0.1:{port}"), 1);
    }
    let out = tracer.stop();
    assert_eq!(out.rows().len(), 12, "only the watched port's connection");
    for r in out.rows() {
        assert!(r.lport == watched || r.rport == watched, "{r}");
    }
    // The kernel dropped the other port's 24 events before the ring.
    assert!(out.stats().1 >= 24, "{}", out.stderr);
}

#[test]
fn follow_shows_exactly_one_connection_including_its_connect() {
    let ns = Netns::new();
    // One ephemeral port in this namespace, so the followed tuple is known
    // before the connection exists; two clients tell apart by source address.
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40000");
    let port = unique_port();
    let tuple = format!("127.0.0.2:40000,127.0.0.1:{port}");
    let tracer = Tracer::builder().arg("--follow").arg(&tuple).json().start();
    let addr = format!("127.0.0.1:{port}");
    let server = ns.server(&addr, ServerMode::WaitPeerClose).conns(2).start();
    ns.client(&addr, ClientMode::Close).bind("127.0.0.3").run();
    let b = ns
        .client(&addr, ClientMode::Close)
        .bind("127.0.0.2")
        .start();
    let (followed, server_pid) = (b.pid, server.pid);
    b.finish();
    server.finish();
    let out = tracer.stop();
    let lives = out.lives();
    assert_eq!(out.rows().len(), 10, "{}", out.stdout);
    let client = life(&lives, CLIENT_CLOSES);
    client.assert_owner(followed, "tt-client");
    assert_eq!(
        (client.rows[0].laddr.as_str(), client.rows[0].lport),
        ("127.0.0.2", 0)
    );
    assert!(
        client.rows[1..]
            .iter()
            .all(|r| r.laddr == "127.0.0.2" && r.lport == 40000)
    );
    let server = life(&lives, SERVER_PASSIVE);
    server.assert_owner(server_pid, "tt-server");
    assert!(
        server
            .rows
            .iter()
            .all(|r| r.raddr == "127.0.0.2" && r.rport == 40000)
    );
}

#[test]
fn json_rows_carry_every_field_typed() {
    let (run, port) = scenario(
        "127.0.0.1",
        ServerMode::WaitPeerClose,
        ClientMode::Close,
        10,
    );
    // The keys themselves and their JSON types: untyped rows.
    let rows: Vec<serde_json::Value> = run
        .out
        .json_lines()
        .into_iter()
        .filter(|r| r["origin"] == "tracepoint")
        .collect();
    assert_eq!(
        rows.len(),
        run.out.rows().len(),
        "each row also parses typed"
    );
    let keys = [
        "time",
        "ts_ns",
        "sock",
        "pid",
        "comm",
        "family",
        "laddr",
        "lport",
        "raddr",
        "rport",
        "old",
        "new",
        "ms",
        "close",
        "reset_reason",
        "netns",
        "origin",
    ];
    // Present only where they say something: the test's processes run in
    // whatever cgroup the test does, and have one thread each.
    let optional = ["queued", "cgroup", "unit", "container", "thread"];
    let mut last_ts = 0;
    for r in &rows {
        let obj = r.as_object().unwrap();
        let mut have: Vec<&str> = obj
            .keys()
            .map(String::as_str)
            .filter(|k| !optional.contains(k) || *k == "queued")
            .collect();
        have.sort_unstable();
        let mut want = keys.to_vec();
        // The server's child waits in the listener's queue until accept():
        // exactly its handshake rows say so.
        let handshake = r["lport"] == port
            && [("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED")]
                .contains(&(r["old"].as_str().unwrap(), r["new"].as_str().unwrap()));
        if handshake {
            want.push("queued");
            assert_eq!(r["queued"], true, "{r}");
            assert_eq!(r["pid"], run.server, "the listener's owner: {r}");
        }
        want.sort_unstable();
        assert_eq!(have, want, "no kernel address unless asked: {r}");
        assert!(r.get("thread").is_none(), "single-threaded peers: {r}");
        let time = r["time"].as_str().unwrap();
        assert!(
            time.len() == 27 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{time}"
        );
        let ts = r["ts_ns"].as_u64().unwrap();
        assert!(ts >= last_ts, "rows in kernel time order");
        last_ts = ts;
        assert!(r["sock"].as_u64().unwrap() >= 1);
        assert!(
            r["pid"].as_u64() == Some(run.server.into())
                || r["pid"].as_u64() == Some(run.client.into())
        );
        assert!(["tt-server", "tt-client"].contains(&r["comm"].as_str().unwrap()));
        assert_eq!(r["netns"], run.netns, "the test's own namespace");
        assert_eq!(r["family"], "ipv4");
        assert!(r["lport"].is_u64() && r["rport"].is_u64());
        assert!(r["ms"].is_null() || r["ms"].as_f64().unwrap() >= 0.0);
    }
    let first = &rows[0];
    assert_eq!(
        (&first["old"], &first["new"]),
        (&"CLOSE".into(), &"LISTEN".into())
    );
    assert_eq!(first["lport"], port);
}

#[test]
fn text_output_has_a_header_and_aligned_rows() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder().port(port).start();
    let addr = format!("127.0.0.1:{port}");
    let server = ns.server(&addr, ServerMode::WaitPeerClose).start();
    let client = ns.client(&addr, ClientMode::Close).start();
    let (spid, cpid) = (server.pid, client.pid);
    client.finish();
    server.finish();
    let out = tracer.stop();
    // The client's connection may also show up in time-wait.
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| !l.ends_with("time-wait table") && !l.ends_with("time-wait (kernel)"))
        .collect();
    assert_eq!(lines.len(), 13, "{}", out.stdout);
    let header = lines[0];
    for col in [
        "TIME",
        "PID",
        "COMM",
        "LADDR:LPORT",
        "RADDR:RPORT",
        "OLD",
        "NEW",
        "MS",
        "SOCK",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let arrow = header.find("OLD").unwrap() + 3;
    for l in &lines[1..] {
        assert_eq!(l.find(" -> "), Some(arrow), "arrow column in {l:?}");
        let pid: u32 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(pid == spid || pid == cpid, "{l}");
    }
    let connect = lines
        .iter()
        .find(|l| l.contains("CLOSE -> SYN_SENT"))
        .unwrap();
    assert!(connect.contains(&format!("{cpid}  tt-client")), "{connect}");
    let cols: Vec<&str> = connect.split_whitespace().collect();
    assert_eq!(
        cols[3..9],
        [
            "127.0.0.1:0",
            &format!("127.0.0.1:{port}"),
            "CLOSE",
            "->",
            "SYN_SENT",
            "-"
        ][..],
        "{connect}"
    );
}

#[test]
fn count_stops_after_n_transitions() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder()
        .port(port)
        .json()
        .args(&["--count", "3"])
        .start();
    let addr = format!("127.0.0.1:{port}");
    ns.connections(&addr, 1);
    let out = tracer.wait();
    assert!(out.status.success());
    assert_eq!(out.rows().len(), 3);
    assert_eq!(out.stats().0, 3);
}

#[test]
fn duration_stops_by_itself() {
    let started = Instant::now();
    let out = Tracer::builder()
        .port(unique_port())
        .args(&["--duration", "1s"])
        .start()
        .wait();
    assert!(out.status.success());
    let took = started.elapsed().as_secs_f64();
    assert!((1.0..20.0).contains(&took), "{took}");
    assert_eq!(out.stats(), (0, out.stats().1, 0));
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder().port(port).json().start();
    ns.server(&format!("0.0.0.0:{port}"), ServerMode::ListenOnly)
        .run();
    let out = tracer.signal(libc::SIGTERM);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(
        out.rows().len(),
        2,
        "the listener's two transitions were drained"
    );
}

#[test]
fn the_same_tuple_in_two_namespaces_is_two_connections() {
    // Two namespaces, each with one ephemeral port and the same addresses:
    // both connections are 127.0.0.2:40000 -> 127.0.0.1:PORT.
    let (a, b) = (Netns::new(), Netns::new());
    for ns in [&a, &b] {
        ns.sysctl("net.ipv4.ip_local_port_range", "40000 40000");
    }
    let port = unique_port();
    let tuple = format!("127.0.0.2:40000,127.0.0.1:{port}");
    let all = Tracer::builder().port(port).json().start();
    let only_a = Tracer::builder().port(port).netns(&a).json().start();
    // The namespace by its inode number this time.
    let follow_b = Tracer::builder()
        .arg("--follow")
        .arg(&tuple)
        .arg("--netns")
        .arg(b.inode())
        .json()
        .start();
    let addr = format!("127.0.0.1:{port}");
    let mut pids = Vec::new();
    for ns in [&a, &b] {
        let server = ns.server(&addr, ServerMode::WaitPeerClose).start();
        let client = ns
            .client(&addr, ClientMode::Close)
            .bind("127.0.0.2")
            .start();
        pids.push((ns.inode(), server.pid, client.pid));
        client.finish();
        server.finish();
    }
    let (all, only_a, follow_b) = (all.stop(), only_a.stop(), follow_b.stop());

    // Every socket, with its namespace and the owner from that namespace.
    let lives = all.lives();
    assert_eq!(all.rows().len(), 24, "{}", all.stdout);
    assert_eq!(lives.len(), 6);
    for (inode, server, client) in &pids {
        let mine: Vec<_> = lives
            .iter()
            .filter(|l| l.rows[0].netns == Some(*inode))
            .collect();
        assert_eq!(mine.len(), 3, "three sockets in namespace {inode}");
        for l in mine {
            let owner = if l.path().starts_with("CLOSE>SYN_SENT") {
                client
            } else {
                server
            };
            let comm = if owner == client {
                "tt-client"
            } else {
                "tt-server"
            };
            l.assert_owner(*owner, comm);
            assert!(l.rows.iter().all(|r| r.netns == Some(*inode)));
        }
    }
    // --netns selects one namespace.
    let rows = only_a.rows();
    assert_eq!(rows.len(), 12);
    assert!(rows.iter().all(|r| r.netns == Some(a.inode())));
    // --follow with --netns: one connection of the two identical ones.
    let rows = follow_b.rows();
    assert_eq!(rows.len(), 10, "{}", follow_b.stdout);
    assert!(rows.iter().all(|r| r.netns == Some(b.inode())));
}

#[test]
fn a_server_that_never_closes_is_reported_stuck_in_close_wait() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder()
        .port(port)
        .netns(&ns)
        .stuck("1s")
        .json()
        .start();
    let addr = format!("127.0.0.1:{port}");
    let server = ns
        .server(&addr, ServerMode::WaitPeerClose)
        .hold_ms(60000)
        .start();
    let server_pid = server.pid;
    // The server's socket enters CLOSE_WAIT after this instant, and some
    // time before the client has exited and been reaped: under emulation
    // that can take longer than the look-up of its holders.
    let closed = Instant::now();
    ns.client(&addr, ClientMode::Close).run();
    // Not before the threshold...
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        !tracer.stderr_so_far().contains("stuck"),
        "{}",
        tracer.stderr_so_far()
    );
    // ...but soon after it.
    while !tracer.stderr_so_far().contains("stuck:") {
        assert!(
            closed.elapsed().as_secs() < 10,
            "no stuck warning: {}",
            tracer.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(closed.elapsed().as_millis() >= 1000);
    std::thread::sleep(Duration::from_millis(500));
    let out = tracer.stop();
    server.kill();
    // Once each: the server's socket, and the client's connection, which
    // its close left orphaned in FIN_WAIT2 (the filters/ tests check that
    // one).
    let stuck: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("stuck: "))
        .collect();
    assert_eq!(stuck.len(), 2, "{}", out.stderr);
    let line = stuck
        .iter()
        .find(|l| l.contains(" in CLOSE_WAIT "))
        .unwrap_or_else(|| panic!("{}", out.stderr));
    assert!(
        stuck
            .iter()
            .any(|l| l.contains(" in FIN_WAIT2 ") && l.contains("orphaned")),
        "{}",
        out.stderr
    );
    assert!(
        line.contains(&format!("pid {server_pid} (tt-server)")),
        "{line}"
    );
    assert!(
        line.contains(&format!("127.0.0.1:{port} -> 127.0.0.1:")),
        "{line}"
    );
    assert!(line.contains(" in CLOSE_WAIT for 1."), "{line}");
    assert!(
        line.contains("has not called close(): often a descriptor leak"),
        "{line}"
    );
    let summary =
        format!("2 sockets stuck longer than 1s: 1 of pid {server_pid} (tt-server), 1 orphaned");
    assert!(out.stderr.contains(&summary), "{}", out.stderr);
}

#[test]
fn colour_on_a_terminal_and_never_in_a_pipe() {
    let ns = Netns::new();
    let port = unique_port();
    let pty = Pty::new();
    let tty = Tracer::builder()
        .port(port)
        .env_remove("NO_COLOR")
        .env("TERM", "xterm")
        .stdout(pty.terminal())
        .start();
    let piped = Tracer::builder().port(port).start();
    let no_color = Tracer::builder()
        .port(port)
        .args(&["--color", "auto"])
        .env("NO_COLOR", "1")
        .start();
    ns.server(&format!("0.0.0.0:{port}"), ServerMode::ListenOnly)
        .run();
    let _ = tty.stop();
    let screen = pty.screen();
    assert!(screen.contains("\x1b[34mLISTEN\x1b[0m"), "{screen:?}");
    for out in [piped.stop(), no_color.stop()] {
        assert!(out.stdout.contains("CLOSE -> LISTEN"), "{}", out.stdout);
        assert!(
            !out.stdout.contains('\x1b'),
            "no colour in a pipe: {:?}",
            out.stdout
        );
    }
}

/// GET /metrics, the way a Prometheus server would.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    reply
}

#[test]
fn metrics_scraped_during_a_scenario_show_the_right_counters() {
    let ns = Netns::new();
    let (port, metrics_port) = (unique_port(), unique_port());
    let tracer = Tracer::builder()
        .port(port)
        .netns(&ns)
        .arg("--metrics")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .quiet()
        .start();
    let addr = format!("127.0.0.1:{port}");
    let open = Release::new();
    let server = ns
        .server(&addr, ServerMode::WaitPeerClose)
        .hold_until(&open)
        .start();
    ns.client(&addr, ClientMode::Close).run();
    std::thread::sleep(Duration::from_millis(300));
    // During: the server holds its listener and a socket in CLOSE_WAIT.
    let during = scrape(metrics_port);
    assert!(
        during.contains("tcptrace_sockets{state=\"LISTEN\"} 1"),
        "{during}"
    );
    assert!(
        during.contains("tcptrace_sockets{state=\"CLOSE_WAIT\"} 1"),
        "{during}"
    );
    open.release();
    server.finish();
    ns.client(&addr, ClientMode::Refused).run();
    std::thread::sleep(Duration::from_millis(300));
    let after = scrape(metrics_port);
    for line in [
        "tcptrace_transitions_total{old=\"CLOSE\",new=\"SYN_SENT\"} 2",
        "tcptrace_transitions_total{old=\"LISTEN\",new=\"SYN_RECV\"} 1",
        "tcptrace_transitions_total{old=\"CLOSE_WAIT\",new=\"LAST_ACK\"} 1",
        "tcptrace_transitions_total{old=\"SYN_SENT\",new=\"CLOSE\"} 1",
        "tcptrace_resets_total{kind=\"refused\"} 1",
        "tcptrace_resets_total{kind=\"sent\"} 0",
        "tcptrace_lost_events_total{kind=\"ring_full\"} 0",
        "tcptrace_owner_hooks_skipped_total 0",
        "tcptrace_sockets_with_gaps_total 0",
        "# EOF",
    ] {
        assert!(after.contains(line), "want {line:?} in {after}");
    }
    assert!(
        after.contains("tcptrace_owner_path{path=\"fentry\"} 1")
            || after.contains("tcptrace_owner_path{path=\"syscalls\"} 1"),
        "{after}"
    );
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
    // Beside it, the time-wait path the start line named.
    let path = if out.timewait_from_kernel() {
        "kernel"
    } else {
        "polled"
    };
    let line = format!("tcptrace_timewait_path{{path=\"{path}\"}} 1");
    assert!(after.contains(&line), "want {line:?} in {after}");
}

//! A service restarted twice under a steady stream of connects: what the
//! report says the clients found (windows with nothing listening, connects
//! refused in them, connections the closing listener reset, the sockets
//! left in time-wait) against the rows, the restarter's own clock and
//! counts, and `ss`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tcptrace_tests::{
    Netns, Row, TempDir, Tracer, chromium, chromium_dom, peer_bin, svg_chart, tcptrace, unique_port,
};

/// One generation of the service: its pid and what it said.
struct Generation {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
    pid: u64,
    listening_ns: u64,
}

impl Generation {
    fn start(ns: &Netns, addr: &str, serve_ms: u64, hold_ms: u64) -> Generation {
        let mut child = ns.spawn(
            Command::new(restarter())
                .args(["serve", addr, &serve_ms.to_string(), &hold_ms.to_string()])
                .stdout(Stdio::piped()),
        );
        let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let pid = u64::from(child.id());
        let mut g = Generation {
            child,
            lines,
            pid,
            listening_ns: 0,
        };
        g.listening_ns = g.expect("listening");
        g
    }

    /// The number after `word` on the next line it says.
    fn expect(&mut self, word: &str) -> u64 {
        let line = self
            .lines
            .next()
            .expect("the restarter said more")
            .expect("read");
        line.strip_prefix(word)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("expected {word:?}, got {line:?}"))
    }
}

fn restarter() -> std::path::PathBuf {
    peer_bin().with_file_name("tt-restarter")
}

/// What the restarter logged for one restart: the old generation closed,
/// the new one listened.
struct Logged {
    closed_ns: u64,
    listening_ns: u64,
    /// The old listener's accept queue just before it closed.
    queued: u64,
    old_pid: u64,
    new_pid: u64,
}

struct Restarts {
    file: String,
    port: u16,
    logged: Vec<Logged>,
    /// What the client's connect() calls returned: refused ones.
    refused: u64,
    /// `ss -tan state time-wait` inside the namespace at the end.
    time_wait_at_end: u64,
    /// Every generation, in order.
    pids: Vec<u64>,
}

/// Generation 1 serves 700 ms, nothing listens for about 150 ms,
/// generation 2 serves 600 ms, nothing for about 300 ms, generation 3
/// serves past the end; a client connects every millisecond meanwhile.
/// Each generation stops accepting 30 ms before it closes, so that its
/// close resets connections waiting in its queue.
fn restart_twice(dir: &TempDir) -> Restarts {
    let ns = Netns::new();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let file = dir.path("restart.jsonl");
    let tracer = Tracer::builder()
        .port(port)
        .write(&file)
        .json()
        .quiet()
        .start();

    let mut old = Generation::start(&ns, &addr, 700, 30);
    let mut pids = vec![old.pid];
    let client = ns.spawn(
        Command::new(restarter())
            .args(["client", &addr, "2.0", "1000"])
            .stdout(Stdio::piped()),
    );
    let mut logged = Vec::new();
    for (gap_ms, serve_ms) in [(150, 600), (300, 0)] {
        let queued = old.expect("queued");
        let closed_ns = old.expect("closed");
        assert!(old.child.wait().expect("wait").success());
        std::thread::sleep(Duration::from_millis(gap_ms));
        let new = Generation::start(&ns, &addr, serve_ms, 30);
        logged.push(Logged {
            closed_ns,
            listening_ns: new.listening_ns,
            queued,
            old_pid: old.pid,
            new_pid: new.pid,
        });
        pids.push(new.pid);
        old = new;
    }
    let out = client.wait_with_output().expect("client");
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let refused = match said.split_whitespace().collect::<Vec<_>>()[..] {
        ["connects", _, "refused", r] => r.parse().unwrap(),
        _ => panic!("client said {said:?}"),
    };
    // Let the last connections reach TIME_WAIT, and the tracer's reads of
    // the time-wait table (every 250 ms) see them there.
    for state in ["fin-wait-1", "fin-wait-2", "last-ack", "close-wait"] {
        ns.settle(state);
    }
    std::thread::sleep(Duration::from_millis(800));
    let time_wait_at_end = ns.ss_count("TIME-WAIT");
    let traced = tracer.stop();
    assert!(traced.status.success(), "{}", traced.stderr);
    let _ = old.child.kill();
    let _ = old.child.wait();
    Restarts {
        file,
        port,
        logged,
        refused,
        time_wait_at_end,
        pids,
    }
}

/// One restart as the recorded rows show it.
#[derive(Debug)]
struct Window {
    start_ns: u64,
    end_ns: u64,
    refused: u64,
    reset_queued: u64,
    reset_open: u64,
    /// From the new listen to the first handshake completed on it.
    first_connection_ns: u64,
}

/// The rows, as `tcptrace read` gives them back.
fn recorded_rows(file: &str) -> Vec<Row> {
    let out = tcptrace(&["read", file, "--format", "json"]);
    assert!(out.status.success(), "{}", out.stderr);
    out.all_rows()
}

/// The windows with nothing listening on `port`, computed from the rows
/// alone (the listener's CLOSE to the next listen), with what happened in
/// each: refused connects, children of the closing listener reset within
/// a second of its close, the new listener's first connection.
fn windows_from_rows(rows: &[Row], port: u16) -> (Vec<Window>, Vec<u64>) {
    let listens: Vec<(u64, u64)> = rows
        .iter()
        .filter(|r| r.new == "LISTEN" && r.lport == port)
        .map(|r| (r.sock, r.ts_ns))
        .collect();
    let listener_socks: HashSet<u64> = listens.iter().map(|l| l.0).collect();
    let closes: Vec<u64> = rows
        .iter()
        .filter(|r| r.is("LISTEN", "CLOSE") && listener_socks.contains(&r.sock))
        .map(|r| r.ts_ns)
        .collect();
    assert_eq!(
        (listens.len(), closes.len()),
        (3, 2),
        "three listens, two closes"
    );
    // Each child belongs to the listener up when its SYN came.
    let generation = |t: u64| {
        listens
            .iter()
            .rposition(|l| l.1 <= t)
            .expect("after a listen")
    };
    let mut child_of: HashMap<u64, usize> = HashMap::new();
    for r in rows
        .iter()
        .filter(|r| r.is("LISTEN", "SYN_RECV") && r.lport == port)
    {
        child_of.insert(r.sock, generation(r.ts_ns));
    }
    let windows = (0..2)
        .map(|i| {
            let (start_ns, end_ns) = (closes[i], listens[i + 1].1);
            let refused = rows
                .iter()
                .filter(|r| {
                    r.is("SYN_SENT", "CLOSE")
                        && r.close.as_deref() == Some("refused")
                        && r.rport == port
                        && (start_ns..=end_ns).contains(&r.ts_ns)
                })
                .count() as u64;
            let resets: Vec<&Row> = rows
                .iter()
                .filter(|r| {
                    r.new == "CLOSE"
                        && child_of.get(&r.sock) == Some(&i)
                        && (r.close.as_deref() == Some("reset sent")
                            || (r.close.is_none()
                                && ["ESTABLISHED", "CLOSE_WAIT", "SYN_RECV", "FIN_WAIT1"]
                                    .contains(&r.old.as_deref().unwrap())))
                        && (start_ns..=start_ns + 1_000_000_000).contains(&r.ts_ns)
                })
                .collect();
            let reset_queued = resets.iter().filter(|r| r.queued == Some(true)).count() as u64;
            let first = rows
                .iter()
                .filter(|r| {
                    r.is("SYN_RECV", "ESTABLISHED") && child_of.get(&r.sock) == Some(&(i + 1))
                })
                .map(|r| r.ts_ns)
                .min()
                .expect("the new listener accepted connections");
            Window {
                start_ns,
                end_ns,
                refused,
                reset_queued,
                reset_open: resets.len() as u64 - reset_queued,
                first_connection_ns: first - end_ns,
            }
        })
        .collect();
    (windows, listens.iter().map(|l| l.1).collect())
}

fn report_json(file: &str) -> Value {
    let report = tcptrace(&["report", "--format", "json", file]).json();
    // The client's and ss's counts are matched against rows: none may be
    // missing.
    assert_eq!(
        (
            &report["lost_ring"],
            &report["missed_kernel"],
            &report["gaps"]
        ),
        (&0.into(), &0.into(), &0.into()),
        "transitions were lost or skipped by the kernel"
    );
    report
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

#[test]
fn a_service_restarted_twice_under_load_is_down_twice_as_the_rows_show() {
    let dir = TempDir::new("restart");
    let run = restart_twice(&dir);
    let rows = recorded_rows(&run.file);
    let (windows, _) = windows_from_rows(&rows, run.port);
    let report = report_json(&run.file);
    let ports = report["listeners"].as_array().expect("listeners");
    assert_eq!(ports.len(), 1, "one listening port: {ports:?}");
    let port = &ports[0];
    assert_eq!(port["port"], run.port);

    // Three listeners, one per generation, each with its owner.
    let lives = port["listeners"].as_array().unwrap();
    let owners: Vec<u64> = lives.iter().map(|l| l["pid"].as_u64().unwrap()).collect();
    assert_eq!(owners, run.pids);
    assert!(lives.iter().all(|l| l["comm"] == "tt-restarter"));
    assert!(lives[2]["to"].is_null(), "the last one listens at the end");

    let down = port["down"].as_array().unwrap();
    assert_eq!(down.len(), 2, "{down:?}");
    let mut refused_in_windows = 0;
    for ((d, w), logged) in down.iter().zip(&windows).zip(&run.logged) {
        // The rows' window is the restarter's, as its own clock saw it
        // (taken just after close() and listen() returned).
        assert!(
            w.start_ns <= logged.closed_ns && logged.closed_ns - w.start_ns < 5_000_000,
            "{w:?}: closed at {}",
            logged.closed_ns
        );
        assert!(
            w.end_ns <= logged.listening_ns && logged.listening_ns - w.end_ns < 5_000_000,
            "{w:?}: listening at {}",
            logged.listening_ns
        );
        let length = ms(w.end_ns - w.start_ns);
        assert!(
            (d["duration_ms"].as_f64().unwrap() - length).abs() < 1e-6,
            "{d}: {length} ms"
        );
        assert!(w.refused > 0, "connects came in every window: {w:?}");
        assert_eq!(d["refused"], w.refused, "{d}");
        assert_eq!(d["reset_in_queue"], w.reset_queued, "{d}");
        assert_eq!(d["reset_open"], w.reset_open, "{d}");
        // The kernel said at least that many waited in the queue.
        assert!(
            w.reset_queued >= logged.queued,
            "{w:?}, {} queued",
            logged.queued
        );
        assert_eq!(
            (d["old_pid"].as_u64(), d["new_pid"].as_u64()),
            (Some(logged.old_pid), Some(logged.new_pid))
        );
        assert!(
            (d["first_connection_ms"].as_f64().unwrap() - ms(w.first_connection_ns)).abs() < 1e-6,
            "{d}: {w:?}"
        );
        refused_in_windows += w.refused;
    }
    // Every refusal the client got came while nothing listened.
    assert_eq!(refused_in_windows, run.refused);
    assert_eq!(port["refused"], run.refused);

    // The text says the same.
    let text = tcptrace(&["report", &run.file]);
    assert!(text.status.success(), "{}", text.stderr);
    let text = text.stdout;
    let section = &text[text.find("Listeners (").expect("a listener section")..];
    for (w, logged) in windows.iter().zip(&run.logged) {
        let refused = match w.refused {
            1 => "1 connect".to_string(),
            n => format!("{n} connects"),
        };
        let down = format!("{:.3} ms, {refused} refused", ms(w.end_ns - w.start_ns));
        assert!(section.contains(&down), "{down:?} in {section}");
        let handover = format!(
            "{} tt-restarter -> {} tt-restarter, first connection {:.3} ms after the new listen",
            logged.old_pid,
            logged.new_pid,
            ms(w.first_connection_ns)
        );
        assert!(section.contains(&handover), "{handover:?} in {section}");
    }
    assert_eq!(section.matches("\n    DOWN ").count(), 2, "{section}");
    assert_eq!(section.matches("\n    listening ").count(), 3, "{section}");
}

#[test]
fn the_connections_left_in_time_wait_are_still_open_and_counted_by_service() {
    let dir = TempDir::new("restart-tw");
    let run = restart_twice(&dir);
    assert!(
        run.time_wait_at_end > 100,
        "{} in time-wait",
        run.time_wait_at_end
    );
    let report = report_json(&run.file);
    let open = &report["still_open_summary"];
    let service = format!("127.0.0.1:{}", run.port);
    // What ss shows in the namespace: time-wait sockets, nothing else.
    assert_eq!(open["in_time_wait_table"], run.time_wait_at_end, "{open}");
    assert_eq!(open["total"], run.time_wait_at_end, "{open}");
    let by_state = open["by_state"].as_array().unwrap();
    assert_eq!(by_state.len(), 1, "{by_state:?}");
    assert_eq!(by_state[0]["state"], "TIME_WAIT");
    assert_eq!(by_state[0]["time_wait_table"], true);
    let by_service = open["by_service"].as_array().unwrap();
    assert_eq!(
        by_service.len(),
        1,
        "one service, not one row per client port"
    );
    assert_eq!(by_service[0]["service"], service);
    assert_eq!(by_service[0]["count"], run.time_wait_at_end);

    // Entering time-wait: per service, counted as the rows show it (the
    // client side closed first, its FIN_WAIT2 -> CLOSE).
    let rows = recorded_rows(&run.file);
    let entered = rows
        .iter()
        .filter(|r| {
            r.origin == "tracepoint"
                && r.is("FIN_WAIT2", "CLOSE")
                && r.close.is_none()
                && r.rport == run.port
        })
        .count() as u64;
    let tw = report["time_wait"].as_array().unwrap();
    assert_eq!(tw.len(), 1, "{tw:?}");
    assert_eq!(
        (&tw[0]["service"], tw[0]["count"].as_u64()),
        (&service.clone().into(), Some(entered))
    );
    let endpoints = report["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
    assert_eq!(endpoints[0]["endpoint"], service);
    assert_eq!(endpoints[0]["time_wait"], entered);
    assert_eq!(endpoints[0]["refused"], run.refused);

    let text = tcptrace(&["report", &run.file]).stdout;
    let still = format!("Still open at the end: {} sockets", run.time_wait_at_end);
    assert!(text.contains(&still), "{still:?} in {text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("  TIME_WAIT (time-wait table)")
                && l.ends_with(&format!(" {}", run.time_wait_at_end))),
        "{text}"
    );
}

#[test]
fn the_html_report_shows_each_restart_as_a_down_band_with_its_refusals() {
    let dir = TempDir::new("restart-html");
    let run = restart_twice(&dir);
    let rows = recorded_rows(&run.file);
    let (windows, _) = windows_from_rows(&rows, run.port);
    let html = dir.path("report.html");
    let out = tcptrace(&["report", &run.file, "--html", &html]);
    assert!(out.status.success(), "{}", out.stderr);
    let dom = chromium_dom(&dir, &html);
    let chart = |id: &str| svg_chart(&dom, id);
    let band = chart("availability");
    let series = chart("sockets-over-time");
    // The band comes first, above the state chart.
    assert!(dom.find("id=\"availability\"") < dom.find("id=\"sockets-over-time\""));
    assert!(
        band.contains(&format!("data-port=\"{}\"", run.port)),
        "{band}"
    );
    assert_eq!(band.matches("class=\"up\"").count(), 3, "{band}");
    let down: Vec<u64> = band
        .match_indices("class=\"down\" data-refused=\"")
        .map(|(i, m)| {
            let rest = &band[i + m.len()..];
            rest[..rest.find('"').unwrap()].parse().unwrap()
        })
        .collect();
    assert_eq!(
        down,
        windows.iter().map(|w| w.refused).collect::<Vec<_>>(),
        "{band}"
    );
    let marked: u64 = band
        .match_indices("class=\"refused\" data-count=\"")
        .map(|(i, m)| {
            let rest = &band[i + m.len()..];
            rest[..rest.find('"').unwrap()].parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(marked, run.refused, "every refused connect marked in time");
    // One LISTEN socket is readable next to thousands in TIME_WAIT.
    assert!(series.contains("data-scale=\"log\""));
    for state in ["LISTEN", "TIME_WAIT", "ESTABLISHED"] {
        assert!(
            series.contains(&format!("data-state=\"{state}\"")),
            "{state}"
        );
    }
    let png = dir.path("report.png");
    let shot = chromium(&dir, &html, &[&format!("--screenshot={png}")]);
    assert!(shot.status.success());
    assert!(fs::metadata(&png).unwrap().len() > 20_000, "a real picture");
}

//! A fleet's paths, with real components: `--otlp` against a receiver that
//! decodes OTLP with the OpenTelemetry protobuf definitions
//! (tests/bin/otlp_receiver.rs), started late, killed and restarted, or
//! refusing; `read --otlp`; and `--metrics` scraped by Debian's
//! Prometheus, checked with PromQL.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tcptrace_tests::{
    ClientMode, Netns, Output, Row, ServerMode, TempDir, Tracer, TracerBuilder, peer_bin, tcptrace,
    unique_port, wait_until,
};

/// A running tt-otlp-receiver, killed on drop.
struct Receiver {
    child: Child,
    out: String,
}

impl Receiver {
    /// Starts the receiver on 127.0.0.1:`port`, appending to `out`; returns
    /// once it listens.
    fn start(port: u16, out: &str, extra: &[&str]) -> Receiver {
        let bin = peer_bin().with_file_name("tt-otlp-receiver");
        let mut child = Command::new(&bin)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--out", out])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the receiver says it listens");
        assert_eq!(line.trim(), "listening");
        Receiver {
            child,
            out: out.to_string(),
        }
    }

    /// Every record received so far, in arrival order.
    fn records(&self) -> Vec<Value> {
        records(&self.out)
    }

    /// SIGKILL: a collector that dies, mid-request or not.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The complete lines of `file` (the receiver may be writing the last).
fn records(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).expect("the receiver writes JSON"))
        .collect()
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// A record's `tcptrace.seq`.
fn seq(r: &Value) -> u64 {
    r["attributes"]["tcptrace.seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no tcptrace.seq in {r}"))
}

/// The records by sequence number, each exactly once, numbered 1..=n
/// without a gap, all of one run (`service.instance.id`).
fn exactly_once(records: &[Value], n: usize) -> Vec<Value> {
    let runs: std::collections::BTreeSet<String> = records
        .iter()
        .map(|r| r["resource"]["service.instance.id"].to_string())
        .collect();
    assert_eq!(runs.len(), 1, "records of several runs: {runs:?}");
    let mut by_seq: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for r in records {
        by_seq.entry(seq(r)).or_default().push(r);
    }
    let repeated: Vec<u64> = by_seq
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(s, _)| *s)
        .collect();
    assert!(repeated.is_empty(), "records received twice: {repeated:?}");
    let seqs: Vec<u64> = by_seq.keys().copied().collect();
    let want: Vec<u64> = (1..=n as u64).collect();
    assert_eq!(seqs, want, "sequence numbers received");
    by_seq.into_values().map(|v| v[0].clone()).collect()
}

/// The attributes a row's record must carry, from the row tcptrace printed.
fn assert_record_is_row(r: &Value, row: &Row) {
    let a = &r["attributes"];
    let context = format!("record {r}\nrow {row:?}");
    assert_eq!(a["network.transport"], "tcp", "{context}");
    assert_eq!(a["network.type"], row.family.as_str(), "{context}");
    assert_eq!(a["network.local.address"], row.laddr.as_str(), "{context}");
    assert_eq!(a["network.local.port"], u64::from(row.lport), "{context}");
    assert_eq!(a["network.peer.address"], row.raddr.as_str(), "{context}");
    assert_eq!(a["network.peer.port"], u64::from(row.rport), "{context}");
    assert_eq!(
        a["process.pid"].as_u64(),
        row.pid.map(u64::from),
        "{context}"
    );
    assert_eq!(
        a["process.executable.name"].as_str(),
        row.comm.as_deref(),
        "{context}"
    );
    assert_eq!(a["tcp.state.old"].as_str(), row.old.as_deref(), "{context}");
    assert_eq!(a["tcp.state.new"], row.new.as_str(), "{context}");
    assert_eq!(a["tcp.socket"], row.sock, "{context}");
    assert_eq!(
        a["tcp.close.reason"].as_str(),
        row.close.as_deref(),
        "{context}"
    );
    assert_eq!(a["tcp.netns"].as_u64(), row.netns, "{context}");
    assert_eq!(a["tcp.origin"], row.origin.as_str(), "{context}");
    // Time in the old state: the row's milliseconds, to the microsecond.
    let dwell_us = a["tcp.state.old.duration_ns"].as_u64().map(|ns| ns / 1000);
    let ms_us = row.ms.map(|ms| (ms * 1000.0).round() as u64);
    assert_eq!(dwell_us, ms_us, "{context}");
}

/// The resource: tcptrace, this version, this host and its kernel.
fn assert_resource(r: &Value) {
    let res = &r["resource"];
    assert_eq!(res["service.name"], "tcptrace");
    assert_eq!(res["service.version"], env!("CARGO_PKG_VERSION"));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(res["host.name"], host.trim());
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(res["os.version"], release.trim());
    assert!(
        res["service.instance.id"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
}

/// The scenario's rows: the listener's two, ten for each connection's two
/// sockets, two for the refused connect.
const ROWS: usize = 2 + 2 * 10 + 2;

/// Two orderly connections and a refused connect on `port` in `ns`.
fn scenario(ns: &Netns, port: u16, refused: u16) {
    ns.connections(&format!("127.0.0.1:{port}"), 2);
    ns.client(&format!("127.0.0.1:{refused}"), ClientMode::Refused)
        .run();
}

/// A tracer of `ns`'s `port` and `refused`, JSON rows, exact counts.
fn tracer(ns: &Netns, port: u16, refused: u16) -> TracerBuilder {
    Tracer::builder()
        .netns(ns)
        .ports(&[port, refused])
        .no_timewait()
        .json()
}

/// The effective capabilities of `pid`'s thread named `name`, as
/// /proc says.
fn thread_capabilities(pid: u32, name: &str) -> Option<u64> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).ok()?;
        let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
        return u64::from_str_radix(eff.trim(), 16).ok();
    }
    None
}

/// The records the collector acknowledged, as `--metrics` at `addr` says.
fn sent(addr: &str) -> u64 {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://{addr}/metrics")])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("tcptrace_otlp_records_total{result=\"sent\"} "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The closing line's otlp part: (sent, dropped).
fn otlp_stats(out: &Output) -> (u64, u64) {
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains(", otlp: "))
        .unwrap_or_else(|| panic!("no otlp counts in {}", out.stderr));
    let part = line.split(", otlp: ").nth(1).unwrap();
    let n = |label: &str| -> u64 {
        part.split(", ")
            .find_map(|p| p.strip_suffix(label)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} in {line}"))
    };
    (n(" sent"), n(" dropped"))
}

#[test]
fn every_row_shown_arrives_once_with_its_attributes() {
    let dir = TempDir::new("otlp");
    let ns = Netns::new();
    let (port, refused, collector) = (unique_port(), unique_port(), unique_port());
    let receiver = Receiver::start(collector, &dir.path("received.jsonl"), &[]);
    let rec = dir.path("rec.jsonl");
    let t = tracer(&ns, port, refused)
        .write(&rec)
        .args(&["--otlp", &url(collector)])
        .args(&["--otlp-header", "Authorization=Bearer fleet-token"])
        .start();
    scenario(&ns, port, refused);
    // The thread that talks to the network holds no capability, whatever
    // the tracer's own thread keeps.
    assert_eq!(thread_capabilities(t.pid(), "tcptrace-otlp"), Some(0));
    let out = t.stop();
    assert!(out.status.success(), "{}", out.stderr);
    let rows = out.all_rows();
    assert_eq!(rows.len(), ROWS, "{}", out.stdout);
    // Sent before the exit: nothing to wait for.
    let got = exactly_once(&receiver.records(), rows.len());
    let header = &records(&rec)[0];
    let offset = header["clock_offset_ns"].as_i64().unwrap();
    let text = tcptrace(&["read", &rec]);
    let lines: Vec<&str> = text.stdout.lines().skip(1).collect();
    for ((r, row), line) in got.iter().zip(&rows).zip(&lines) {
        assert_record_is_row(r, row);
        assert_resource(r);
        assert_eq!(r["time_unix_nano"], (row.ts_ns as i64 + offset) as u64);
        assert_eq!(r["body"], *line, "the body is the text line");
        assert_eq!(r["headers"]["authorization"], "Bearer fleet-token");
        assert_eq!(r["headers"]["content-encoding"], "gzip");
        assert_eq!(r["request"], "POST /v1/logs HTTP/1.1");
        let warn = row.close.is_some();
        assert_eq!(r["severity_text"], if warn { "WARN" } else { "INFO" });
    }
    // The kernel's time is the wall clock's: within a minute of now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let first = got[0]["time_unix_nano"].as_u64().unwrap();
    assert!(now - first < 60_000_000_000, "{first} vs now {now}");
    assert_eq!(otlp_stats(&out), (rows.len() as u64, 0));
    let stats = records(&rec).pop().unwrap();
    assert_eq!(stats["otlp"]["sent"], rows.len() as u64, "{stats}");
    assert_eq!(stats["otlp"]["dropped"], 0, "{stats}");
}

#[test]
fn a_collector_that_starts_late_gets_every_row_in_order() {
    let dir = TempDir::new("otlp-late");
    let ns = Netns::new();
    let (port, refused, collector) = (unique_port(), unique_port(), unique_port());
    let t = tracer(&ns, port, refused)
        .args(&["--otlp", &url(collector)])
        .args(&["--otlp-spool", &dir.path("spool")])
        .start();
    scenario(&ns, port, refused);
    assert!(
        t.wait_for_stderr(Duration::from_secs(10), |e| e.contains("cannot send to")),
        "{}",
        t.stderr_so_far()
    );
    let receiver = Receiver::start(collector, &dir.path("received.jsonl"), &[]);
    wait_until(
        "the rows reach the late collector",
        Duration::from_secs(20),
        || receiver.records().len() >= ROWS,
    );
    let out = t.stop();
    assert!(out.status.success(), "{}", out.stderr);
    let rows = out.all_rows();
    let got = exactly_once(&receiver.records(), rows.len());
    for (r, row) in got.iter().zip(&rows) {
        assert_record_is_row(r, row);
    }
    assert!(out.stderr.contains("takes records again"), "{}", out.stderr);
    assert_eq!(otlp_stats(&out), (rows.len() as u64, 0));
}

#[test]
fn a_collector_killed_and_restarted_mid_run_loses_nothing() {
    let dir = TempDir::new("otlp-restart");
    let ns = Netns::new();
    let (port, collector) = (unique_port(), unique_port());
    let received = dir.path("received.jsonl");
    let receiver = Receiver::start(collector, &received, &[]);
    let metrics = format!("127.0.0.1:{}", unique_port());
    let t = Tracer::builder()
        .netns(&ns)
        .port(port)
        .no_timewait()
        .json()
        .args(&["--otlp", &url(collector)])
        .args(&["--otlp-spool", &dir.path("spool")])
        .args(&["--metrics", &metrics])
        .start();
    let addr = format!("127.0.0.1:{port}");
    let server = ns.server(&addr, ServerMode::WaitPeerClose).conns(9).start();
    ns.client(&addr, ClientMode::Close).repeat(3).run();
    // The listener's row and three connections' ten, acknowledged: the
    // collector dies between requests. (Killed between taking a request
    // and answering it, it would get that request again: at least once.)
    let first = 1 + 3 * 10;
    wait_until(
        "the first rows are acknowledged",
        Duration::from_secs(10),
        || sent(&metrics) >= first,
    );
    assert_eq!(receiver.records().len(), first as usize);
    receiver.kill();
    // While the collector is dead.
    ns.client(&addr, ClientMode::Close).repeat(3).run();
    std::thread::sleep(Duration::from_millis(1500));
    let receiver = Receiver::start(collector, &received, &[]);
    ns.client(&addr, ClientMode::Close).repeat(3).run();
    server.finish();
    let n = 2 + 9 * 10;
    wait_until("every row arrives", Duration::from_secs(20), || {
        receiver.records().len() >= n
    });
    let out = t.stop();
    assert!(out.status.success(), "{}", out.stderr);
    let rows = out.all_rows();
    assert_eq!(rows.len(), n, "{}", out.stdout);
    let got = exactly_once(&records(&received), n);
    for (r, row) in got.iter().zip(&rows) {
        assert_record_is_row(r, row);
    }
    assert!(out.stderr.contains("takes records again"), "{}", out.stderr);
    assert_eq!(otlp_stats(&out), (n as u64, 0));
}

#[test]
fn a_collector_that_dies_before_answering_gets_that_request_again_and_nothing_else_twice() {
    let dir = TempDir::new("otlp-die");
    let ns = Netns::new();
    let (port, collector) = (unique_port(), unique_port());
    let received = dir.path("received.jsonl");
    let mut dying = Receiver::start(collector, &received, &["--die-after", "1"]);
    let t = Tracer::builder()
        .netns(&ns)
        .port(port)
        .no_timewait()
        .json()
        .args(&["--otlp", &url(collector)])
        .args(&["--otlp-spool", &dir.path("spool")])
        .start();
    let addr = format!("127.0.0.1:{port}");
    let server = ns.server(&addr, ServerMode::WaitPeerClose).conns(4).start();
    ns.client(&addr, ClientMode::Close).repeat(2).run();
    wait_until(
        "the collector dies mid-request",
        Duration::from_secs(10),
        || matches!(dying.child.try_wait(), Ok(Some(_))),
    );
    let taken = records(&received).len();
    assert!(taken > 0);
    let receiver = Receiver::start(collector, &received, &[]);
    ns.client(&addr, ClientMode::Close).repeat(2).run();
    server.finish();
    let n = 2 + 4 * 10;
    wait_until("every row arrives", Duration::from_secs(20), || {
        receiver.records().len() >= n + taken
    });
    let out = t.stop();
    assert!(out.status.success(), "{}", out.stderr);
    let all = records(&received);
    // The request the dead collector took, and only it, came twice, the
    // same records: dropping repeats by tcptrace.seq leaves every row once.
    let (first, rest) = all.split_at(taken);
    assert_eq!(&rest[..taken], first, "the same request, sent again");
    let got = exactly_once(rest, n);
    for (r, row) in got.iter().zip(&out.all_rows()) {
        assert_record_is_row(r, row);
    }
    assert_eq!(otlp_stats(&out), (n as u64, 0));
}

#[test]
fn rows_left_in_the_spool_go_out_with_the_next_run() {
    let dir = TempDir::new("otlp-spool");
    let ns = Netns::new();
    let (port, refused, collector) = (unique_port(), unique_port(), unique_port());
    let spool = dir.path("spool");
    let first = tracer(&ns, port, refused)
        .args(&["--otlp", &url(collector), "--otlp-spool", &spool])
        .start();
    scenario(&ns, port, refused);
    let out = first.stop();
    assert!(out.status.success(), "{}", out.stderr);
    let rows = out.all_rows();
    assert_eq!(otlp_stats(&out), (0, 0));
    assert!(
        out.stderr.contains(&format!(
            "{} waiting in {spool} for the next run",
            rows.len()
        )),
        "{}",
        out.stderr
    );
    let files = std::fs::read_dir(&spool).unwrap().count();
    assert!(files >= 2, "the spool holds {files} files");
    // The next run, with the collector there, sends them first.
    let receiver = Receiver::start(collector, &dir.path("received.jsonl"), &[]);
    let second = tracer(&ns, port, refused)
        .no_snapshot()
        .args(&["--otlp", &url(collector), "--otlp-spool", &spool])
        .start();
    wait_until("the spooled rows arrive", Duration::from_secs(20), || {
        receiver.records().len() >= rows.len()
    });
    let out2 = second.stop();
    assert!(out2.status.success(), "{}", out2.stderr);
    let got = exactly_once(&receiver.records(), rows.len());
    for (r, row) in got.iter().zip(&rows) {
        assert_record_is_row(r, row);
    }
    assert_eq!(otlp_stats(&out2), (rows.len() as u64, 0));
    let left: Vec<PathBuf> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "left in the spool: {left:?}");
}

#[test]
fn what_a_full_spool_cannot_keep_is_counted_and_said() {
    let dir = TempDir::new("otlp-full");
    let ns = Netns::new();
    let (port, collector) = (unique_port(), unique_port());
    // A collector that never takes anything: every request is retried.
    let _receiver = Receiver::start(
        collector,
        &dir.path("received.jsonl"),
        &["--unavailable", "1000000"],
    );
    let spool = dir.path("spool");
    let t = Tracer::builder()
        .netns(&ns)
        .port(port)
        .no_timewait()
        .json()
        .args(&["--otlp", &url(collector)])
        .args(&["--otlp-spool", &spool, "--otlp-spool-size", "4K"])
        .start();
    ns.connections(&format!("127.0.0.1:{port}"), 60);
    let out = t.stop();
    assert!(out.status.success(), "{}", out.stderr);
    let rows = out.all_rows().len() as u64;
    assert_eq!(rows, 2 + 60 * 10);
    let (sent, dropped) = otlp_stats(&out);
    assert_eq!(sent, 0);
    assert!(dropped > 0, "{}", out.stderr);
    assert!(out.stderr.contains("is full"), "{}", out.stderr);
    // Whatever was not dropped waits in the spool: every row accounted for.
    let waiting: u64 = std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".otlp.gz")?.to_string();
            stem.split_once('-')?.1.parse::<u64>().ok()
        })
        .sum();
    assert_eq!(dropped + waiting, rows, "{}", out.stderr);
    let size: u64 = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(size <= 4096, "the spool holds {size} bytes");
}

/// A recording of the scenario, and its rows as `read --format json` prints
/// them.
fn recorded(dir: &TempDir) -> (String, Vec<Row>) {
    let ns = Netns::new();
    let (port, refused) = (unique_port(), unique_port());
    let rec = dir.path("rec.tcpt");
    let t = tracer(&ns, port, refused).write(&rec).quiet().start();
    scenario(&ns, port, refused);
    assert!(t.stop().status.success());
    let read = tcptrace(&["read", &rec, "--format", "json"]);
    (rec, read.stdout.lines().map(Row::parse).collect())
}

#[test]
fn read_ships_every_row_of_a_recording_and_exits_when_acknowledged() {
    let dir = TempDir::new("otlp-read");
    let (rec, rows) = recorded(&dir);
    let collector = unique_port();
    // The first requests are answered 503 with Retry-After: they are sent
    // again, not lost.
    let receiver = Receiver::start(
        collector,
        &dir.path("received.jsonl"),
        &["--unavailable", "2"],
    );
    // By name: the static build resolves it as the collector's service
    // name would be.
    let by_name = format!("http://localhost:{collector}");
    let out = tcptrace(&["read", &rec, "--otlp", &by_name]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(
        out.stderr
            .contains(&format!("{} records sent to ", rows.len())),
        "{}",
        out.stderr
    );
    let got = exactly_once(&receiver.records(), rows.len());
    for (r, row) in got.iter().zip(&rows) {
        assert_record_is_row(r, row);
    }
    // The filters apply as when printing.
    let only = tcptrace(&["read", &rec, "--state", "SYN_SENT", "--format", "json"]);
    let want = only.stdout.lines().count();
    let received = dir.path("filtered.jsonl");
    let port = unique_port();
    let receiver = Receiver::start(port, &received, &[]);
    let out = tcptrace(&["read", &rec, "--state", "SYN_SENT", "--otlp", &url(port)]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(receiver.records().len(), want);
}

#[test]
fn a_collector_that_refuses_is_not_retried_and_the_loss_is_said() {
    let dir = TempDir::new("otlp-refused");
    let (rec, rows) = recorded(&dir);
    let collector = unique_port();
    let _receiver = Receiver::start(collector, &dir.path("received.jsonl"), &["--status", "400"]);
    let out = tcptrace(&["read", &rec, "--otlp", &url(collector)]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("HTTP 400"), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "0 records sent to {}/v1/logs, {} dropped",
            url(collector),
            rows.len()
        )),
        "{}",
        out.stderr
    );
}

#[test]
fn bad_otlp_urls_and_headers_are_refused_with_status_2() {
    for (args, want) in [
        (
            vec!["--otlp", "https://collector:4318"],
            "https is not supported",
        ),
        (vec!["--otlp", "collector:4318"], "has no scheme"),
        (vec!["--otlp", "http://"], "not a URL"),
        (
            vec![
                "--otlp",
                "http://127.0.0.1",
                "--otlp-header",
                "Authorization",
            ],
            "NAME=VALUE",
        ),
        (vec!["--otlp-header", "a=b"], "--otlp"),
    ] {
        let out = tcptrace(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(want), "{args:?}: {}", out.stderr);
    }
    let out = tcptrace(&["read", "/dev/null", "--otlp", "https://x"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
}

/// Debian's Prometheus, on a loopback port, scraping `target` every second.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let bin = "/usr/bin/prometheus";
        assert!(
            std::path::Path::new(bin).is_file(),
            "this test needs Debian's prometheus (apt-get install prometheus; `cargo xtask test` \
             installs it)"
        );
        let dir = TempDir::new("prometheus");
        let config = dir.path("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: tcptrace\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = unique_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={config}"))
            .arg(format!("--storage.tsdb.path={}", dir.path("data")))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// A PromQL query's single value, if it has one.
    fn query(&self, promql: &str) -> Option<f64> {
        let out = Command::new("curl")
            .args(["-sf", "--get"])
            .arg(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .args(["--data-urlencode", &format!("query={promql}")])
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scraping_metrics_counts_the_transitions_shown() {
    let ns = Netns::new();
    let (port, refused, metrics) = (unique_port(), unique_port(), unique_port());
    let target = format!("127.0.0.1:{metrics}");
    let dir = TempDir::new("otlp-prometheus");
    let collector = unique_port();
    let receiver = Receiver::start(collector, &dir.path("received.jsonl"), &[]);
    let t = tracer(&ns, port, refused)
        .args(&["--metrics", &target])
        .args(&["--otlp", &url(collector)])
        .start();
    let prometheus = Prometheus::start(&target);
    wait_until(
        "Prometheus finds the target up",
        Duration::from_secs(30),
        || prometheus.query("up{job=\"tcptrace\"}") == Some(1.0),
    );
    scenario(&ns, port, refused);
    // What tcptrace showed so far: every row of the scenario is out once
    // the peers are done and a round has passed.
    std::thread::sleep(Duration::from_millis(500));
    let shown = ROWS as u32;
    wait_until(
        "sum(tcptrace_transitions_total) reaches the transitions shown",
        Duration::from_secs(20),
        || prometheus.query("sum(tcptrace_transitions_total)") == Some(f64::from(shown)),
    );
    let refused_total = prometheus.query("sum(tcptrace_resets_total{kind=\"refused\"})");
    // The records the collector acknowledged, as Prometheus saw them.
    wait_until(
        "Prometheus sees every record sent",
        Duration::from_secs(20),
        || {
            prometheus.query("tcptrace_otlp_records_total{result=\"sent\"}")
                == Some(f64::from(shown))
        },
    );
    assert_eq!(receiver.records().len(), shown as usize);
    assert_eq!(
        prometheus.query("tcptrace_otlp_records_total{result=\"dropped\"}"),
        Some(0.0)
    );
    let out = t.stop();
    assert!(out.status.success(), "{}", out.stderr);
    let rows = out.rows();
    assert_eq!(rows.len() as u32, shown, "{}", out.stdout);
    assert_eq!(out.stats().0, u64::from(shown));
    let refusals = rows
        .iter()
        .filter(|r| r.close.as_deref() == Some("refused"))
        .count();
    assert_eq!(refused_total, Some(refusals as f64));
}

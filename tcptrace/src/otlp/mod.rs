//! `--otlp URL`: every row shown, as an OpenTelemetry log record, to a
//! collector over OTLP/HTTP (protobuf, gzip).
//!
//! The tracer's loop only renders the row's text and hands it to a
//! bounded channel ([`Exporter::push`] never waits); a thread of its own
//! ([`worker`]) batches, encodes, sends, retries and spools. What cannot
//! be kept is counted ([`OtlpCounts`]) for the closing line, the
//! recording's stats and `--metrics`.

mod http;
mod record;
mod spool;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::anyhow;
use hyper::header::{HeaderName, HeaderValue};
use tokio::sync::mpsc;

use tcptrace_core::model::{Clock, OtlpCounts, Row};
use tcptrace_core::output::{OutputFormat, Printer, Style};

pub use record::Entry;
use spool::Spool;
use worker::Worker;

/// The collector's OTLP/HTTP port.
pub const DEFAULT_PORT: u16 = 4318;
const LOGS_PATH: &str = "/v1/logs";
/// Rows between the tracer and the exporter thread (some 10 MiB at most):
/// a quarter of a second of the fastest churn measured here.
const CHANNEL: usize = 32768;
/// The spool's default bound, in bytes (`--otlp-spool-size`).
pub const DEFAULT_SPOOL_SIZE: u64 = 256 << 20;
/// Where rows wait without `-w` or `--otlp-spool`.
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/tcptrace/otlp-spool";

/// Where to send: the URL as given, and as the request uses it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub uri: hyper::Uri,
    pub shown: String,
}

/// `--otlp URL`: http://HOST[:PORT][/PATH]; port 4318 and path /v1/logs
/// unless given.
pub fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    let s = s.trim();
    let uri: hyper::Uri = s
        .parse()
        .map_err(|e| format!("{s:?} is not a URL ({e}); write it like http://127.0.0.1:4318"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{s:?}: https is not supported (the static build carries no TLS library); send \
                 to the node's own collector over http, such as http://127.0.0.1:4318, and let \
                 it forward with TLS (docs/fleets.md)"
            ));
        }
        Some(other) => {
            return Err(format!(
                "{s:?}: the scheme {other:?} is not OTLP/HTTP; write it like http://127.0.0.1:4318"
            ));
        }
        None => {
            return Err(format!(
                "{s:?} has no scheme; write it like http://{s}{}",
                if s.contains(':') { "" } else { ":4318" }
            ));
        }
    }
    let Some(authority) = uri.authority() else {
        return Err(format!(
            "{s:?} names no host; write it like http://127.0.0.1:4318"
        ));
    };
    if authority.host().is_empty() {
        return Err(format!(
            "{s:?} names no host; write it like http://127.0.0.1:4318"
        ));
    }
    if authority.as_str().contains('@') {
        return Err(format!(
            "{s:?}: credentials in the URL are not sent; give them with --otlp-header \
             'Authorization=Basic ...'"
        ));
    }
    let host_port = match authority.port_u16() {
        Some(0) => return Err(format!("{s:?} has port 0; the collector's port is 1-65535")),
        Some(_) => authority.as_str().to_string(),
        None => format!("{}:{DEFAULT_PORT}", authority.host()),
    };
    let path = match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("") | Some("/") => LOGS_PATH,
        Some(p) => p,
    };
    let full = format!("http://{host_port}{path}");
    let uri = full
        .parse()
        .map_err(|e| format!("{s:?} is not a URL ({e})"))?;
    Ok(Endpoint { uri, shown: full })
}

/// `--otlp-header NAME=VALUE`.
pub fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), String> {
    let Some((name, value)) = s.split_once('=') else {
        return Err(format!(
            "{s:?} is not a header; write it as NAME=VALUE (Authorization=Bearer ...)"
        ));
    };
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("{:?} is not an HTTP header name", name.trim()))?;
    let value = HeaderValue::from_str(value.trim())
        .map_err(|_| format!("the value of {name} holds characters a header cannot carry"))?;
    Ok((name, value))
}

/// How the exporter runs.
#[derive(Clone)]
pub struct Config {
    pub uri: hyper::Uri,
    pub shown: String,
    pub headers: Arc<Vec<(HeaderName, HeaderValue)>>,
    /// The producer waits for room rather than rows being dropped
    /// (`read --otlp`: nothing is lost by waiting).
    pub wait: bool,
}

/// The counts both threads see.
#[derive(Default)]
pub struct Shared {
    sent: AtomicU64,
    dropped: AtomicU64,
    spooled: AtomicU64,
    waiting: AtomicU64,
    /// How long the end may wait for the collector, in milliseconds
    /// (u64::MAX: until everything is acknowledged); set by the finish.
    patience_ms: AtomicU64,
}

impl Shared {
    fn patience(&self) -> Option<Duration> {
        match self.patience_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    pub fn counts(&self) -> OtlpCounts {
        OtlpCounts {
            sent: self.sent.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            spooled: self.spooled.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }
}

/// What became of the rows, once the exporter has stopped.
pub struct Summary {
    pub counts: OtlpCounts,
    /// The spool, when records wait in it for the next run.
    pub spool: Option<String>,
    pub shown: String,
}

impl Summary {
    /// The closing line's part: ", otlp: 10 sent, 0 dropped".
    pub fn stats_part(&self) -> String {
        let c = &self.counts;
        let mut s = format!(", otlp: {} sent, {} dropped", c.sent, c.dropped);
        if c.spooled > 0 || c.waiting > 0 {
            s.push_str(&format!(", {} spooled", c.spooled));
        }
        if let (Some(dir), true) = (&self.spool, c.waiting > 0) {
            s.push_str(&format!(
                ", {} waiting in {dir} for the next run",
                c.waiting
            ));
        }
        s
    }
}

/// The handle the tracer pushes rows into.
pub struct Exporter {
    tx: Option<mpsc::Sender<Entry>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<(OtlpCounts, Option<String>)>>,
    seq: u64,
    shown: String,
    said_behind: AtomicBool,
}

impl Exporter {
    /// Starts the exporter thread; `spool`: the directory where records
    /// wait while the collector is away (None: memory only); `nice`: its
    /// priority, the ring reader's (`--nice`) in a live run.
    pub fn start(
        endpoint: &Endpoint,
        headers: &[(HeaderName, HeaderValue)],
        spool: Option<(&Path, u64)>,
        wait: bool,
        nice: Option<i32>,
    ) -> anyhow::Result<Exporter> {
        let spool = spool
            .map(|(dir, limit)| Spool::open(dir, limit))
            .transpose()?;
        let config = Config {
            uri: endpoint.uri.clone(),
            shown: endpoint.shown.clone(),
            headers: Arc::new(headers.to_vec()),
            wait,
        };
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel(CHANNEL);
        let worker = Worker::new(config, spool, Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name("tcptrace-otlp".into())
            .spawn(move || {
                // As the ring reader: on a busy host, an exporter behind
                // the workload fell behind the rows and dropped most of
                // them (the channel full), while the reader kept up.
                if let Some(n) = nice {
                    let _ = crate::kernel::privileges::prioritize(n);
                }
                // Capabilities are a thread's own: this one talks to the
                // network and needs none, whatever the tracer keeps.
                if let Err(e) = crate::kernel::privileges::drop_all_but(&[]) {
                    log::warn!("otlp: cannot drop capabilities: {e}");
                }
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(worker.run(rx)),
                    Err(e) => {
                        eprintln!("tcptrace: otlp: cannot start the exporter: {e}");
                        (OtlpCounts::default(), None)
                    }
                }
            })
            .map_err(|e| anyhow!("cannot start the OTLP exporter thread: {e}"))?;
        Ok(Exporter {
            tx: Some(tx),
            shared,
            thread: Some(thread),
            seq: 0,
            shown: endpoint.shown.clone(),
            said_behind: AtomicBool::new(false),
        })
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    fn entry(&mut self, row: &Row, time_unix_ns: i64, body: String) -> Entry {
        self.seq += 1;
        Entry {
            row: *row,
            time_unix_ns,
            body,
            seq: self.seq,
        }
    }

    /// Hands a row over without waiting: a full channel (the exporter
    /// thread starved of CPU) drops it, counted.
    pub fn push(&mut self, row: &Row, time_unix_ns: i64, body: String) {
        let e = self.entry(row, time_unix_ns, body);
        let sent = self.tx.as_ref().is_some_and(|tx| tx.try_send(e).is_ok());
        if !sent {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            if !self.said_behind.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "tcptrace: otlp: the exporter fell behind the rows; rows it could not take \
                     are dropped (counted in the stats)"
                );
            }
        }
    }

    /// Hands a row over, waiting for room (outside the runtime only).
    pub fn push_wait(&mut self, row: &Row, time_unix_ns: i64, body: String) {
        let e = self.entry(row, time_unix_ns, body);
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.blocking_send(e).is_ok());
        if !sent {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// No more rows: sends what is left for at most `patience` (None:
    /// until everything is acknowledged), spools the rest, and says what
    /// became of the rows.
    pub fn finish(mut self, patience: Option<Duration>) -> Summary {
        let ms = patience.map_or(u64::MAX, |p| p.as_millis() as u64);
        self.shared.patience_ms.store(ms, Ordering::Relaxed);
        // Closed: the thread takes what is in the channel, then finishes.
        drop(self.tx.take());
        let (mut counts, spool) = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        // Rows the channel refused were counted here, after the thread's
        // last look.
        counts.dropped = counts.dropped.max(self.shared.counts().dropped);
        Summary {
            counts,
            spool,
            shown: self.shown.clone(),
        }
    }
}

/// The live run's side: each row's text line, as the text output shows it,
/// to the exporter.
pub struct Feed {
    pub exporter: Exporter,
    printer: Printer,
    clock: Clock,
    line: Vec<u8>,
}

impl Feed {
    pub fn new(exporter: Exporter, style: Style, clock: Clock) -> Feed {
        Feed {
            exporter,
            printer: Printer::new(body_style(style), clock),
            clock,
            line: Vec::with_capacity(256),
        }
    }

    /// Another recording's clock (`read` of several runs).
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
        self.printer.set_clock(clock);
    }

    /// The row's record, handed over without waiting.
    pub fn push(&mut self, row: &Row) {
        let body = self.body(row);
        let time = self.clock.wall_ns(row.t.ts_ns);
        self.exporter.push(row, time, body);
    }

    /// The row's record, waiting for room.
    pub fn push_wait(&mut self, row: &Row) {
        let body = self.body(row);
        let time = self.clock.wall_ns(row.t.ts_ns);
        self.exporter.push_wait(row, time, body);
    }

    fn body(&mut self, row: &Row) -> String {
        self.line.clear();
        self.printer.row_into(&mut self.line, row);
        while self.line.last() == Some(&b'\n') {
            self.line.pop();
        }
        String::from_utf8_lossy(&self.line).into_owned()
    }
}

/// The text line of the user's style, never coloured.
fn body_style(style: Style) -> Style {
    Style {
        format: OutputFormat::Text,
        color: false,
        ..style
    }
}

/// Where records wait while the collector is away: `--otlp-spool`, else
/// beside the recording, else the default directory.
pub fn spool_dir(flag: Option<&Path>, recording: Option<&Path>) -> PathBuf {
    if let Some(d) = flag {
        return d.to_path_buf();
    }
    if let Some(r) = recording {
        let mut name = r.as_os_str().to_os_string();
        name.push(".otlp-spool");
        return PathBuf::from(name);
    }
    PathBuf::from(DEFAULT_SPOOL_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_take_the_collector_defaults() {
        let e = parse_endpoint("http://collector").unwrap();
        assert_eq!(e.shown, "http://collector:4318/v1/logs");
        let e = parse_endpoint("http://127.0.0.1:9999/").unwrap();
        assert_eq!(e.shown, "http://127.0.0.1:9999/v1/logs");
        let e = parse_endpoint("http://[::1]:4318/otlp/v1/logs").unwrap();
        assert_eq!(e.shown, "http://[::1]:4318/otlp/v1/logs");
    }

    #[test]
    fn bad_urls_name_the_problem() {
        for (url, want) in [
            ("https://collector:4318", "https is not supported"),
            ("collector:4318", "has no scheme"),
            ("grpc://collector", "is not OTLP/HTTP"),
            ("http://", "not a URL"),
            ("http://u:p@collector", "--otlp-header"),
            ("http://collector:0", "port 0"),
            ("http://coll ector", "not a URL"),
        ] {
            let err = parse_endpoint(url).expect_err(url);
            assert!(err.contains(want), "{url}: {err}");
        }
    }

    #[test]
    fn headers_are_name_equals_value() {
        let (n, v) = parse_header("Authorization=Bearer abc=").unwrap();
        assert_eq!(
            (n.as_str(), v.to_str().unwrap()),
            ("authorization", "Bearer abc=")
        );
        assert!(
            parse_header("Authorization")
                .unwrap_err()
                .contains("NAME=VALUE")
        );
        assert!(
            parse_header("bad name=x")
                .unwrap_err()
                .contains("header name")
        );
        assert!(parse_header("x=a\nb").unwrap_err().contains("cannot carry"));
    }
}

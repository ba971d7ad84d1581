//! The exporter thread: rows in from a bounded channel, batched by count
//! and by time, encoded and gzipped, posted one request at a time in
//! order. While the collector is away, requests wait in memory, then in
//! the disk spool; whatever cannot be kept is counted as dropped.
//!
//! One request at a time keeps the order, and a request is sent again
//! byte for byte: a receiver that took it before failing sees the same
//! `tcptrace.seq` values twice and can drop the repeat.

use std::collections::VecDeque;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource;

use tcptrace_core::model::OtlpCounts;

use super::http::{self, HttpClient, Outcome};
use super::record::{self, Encoder, Entry};
use super::spool::Spool;
use super::{Config, Shared};

/// A request holds at most this many records while the collector keeps
/// up...
pub const BATCH_RECORDS: usize = 512;
/// ...and, while a request is in flight (the exporter behind), up to this
/// many encoded bytes: fewer, bigger requests catch up, in order.
const BATCH_BYTES_BEHIND: usize = 4 << 20;
/// ...and waits at most this long for more.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Requests waiting in memory before the spool takes them.
const MEMORY_BATCHES: usize = 32;
const MEMORY_BYTES: usize = 16 << 20;
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
/// Capped low: a collector that comes back is found within seconds, and a
/// failed connect to a local port costs nothing.
const BACKOFF_MAX: Duration = Duration::from_secs(8);

/// One request's worth of records, ready to send.
struct Batch {
    body: Bytes,
    records: u64,
    /// It is the spool's oldest file, removed once done with.
    from_disk: bool,
}

type Pending = Pin<Box<dyn Future<Output = Outcome> + Send>>;

pub struct Worker {
    config: Config,
    client: HttpClient,
    shared: Arc<Shared>,
    /// The current batch: its log records, encoded as they come (each a
    /// ScopeLogs field 2), and how many. Only the envelope's lengths wait
    /// for the last: a request of 4 MiB is never held twice, as prost's
    /// structs and their encoding.
    current: Vec<u8>,
    current_n: usize,
    encoder: Encoder,
    /// The same for every request.
    resource: Resource,
    scope: InstrumentationScope,
    /// A request is in flight: batches grow to BATCH_BYTES_BEHIND.
    busy: bool,
    /// When the current batch goes out however few it holds.
    due: Option<Instant>,
    memory: VecDeque<Batch>,
    memory_bytes: usize,
    spool: Option<Spool>,
    /// Why the collector cannot be reached, while it cannot.
    failing: Option<String>,
    retry_at: Option<Instant>,
    backoff: Duration,
    said_refused: bool,
    said_dropped: bool,
}

impl Worker {
    pub fn new(config: Config, spool: Option<Spool>, shared: Arc<Shared>) -> Worker {
        Worker {
            config,
            client: http::client(),
            resource: record::resource(),
            scope: InstrumentationScope {
                name: "tcptrace".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                ..Default::default()
            },
            shared,
            current: Vec::new(),
            current_n: 0,
            encoder: Encoder::new(),
            busy: false,
            due: None,
            memory: VecDeque::new(),
            memory_bytes: 0,
            spool,
            failing: None,
            retry_at: None,
            backoff: BACKOFF_FIRST,
            said_refused: false,
            said_dropped: false,
        }
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<Entry>) -> (OtlpCounts, Option<String>) {
        let mut head: Option<Batch> = None;
        let mut pending: Option<Pending> = None;
        let mut finishing = false;
        let mut deadline: Option<Instant> = None;
        let mut open = true;
        let mut inbox = Vec::with_capacity(BATCH_RECORDS);
        self.publish(&head);
        loop {
            if pending.is_none() && self.retry_at.is_none_or(|t| Instant::now() >= t) {
                self.retry_at = None;
                if head.is_none() {
                    // What grew while the last request was out goes now
                    // rather than at its deadline.
                    if self.current_n >= BATCH_RECORDS && self.memory.is_empty() {
                        self.seal();
                    }
                    head = self.next_batch();
                }
                if let Some(b) = &head {
                    let (client, uri, headers, body) = (
                        self.client.clone(),
                        self.config.uri.clone(),
                        Arc::clone(&self.config.headers),
                        b.body.clone(),
                    );
                    pending = Some(Box::pin(async move {
                        http::post(&client, &uri, &headers, body).await
                    }));
                }
            }
            if finishing && head.is_none() && self.is_empty() {
                break;
            }
            self.busy = pending.is_some();
            let far = Instant::now() + Duration::from_secs(3600);
            let accepting = open && self.accepting();
            tokio::select! {
                n = rx.recv_many(&mut inbox, BATCH_RECORDS), if accepting => match n {
                    // Taken in bulk: one wake-up per message could not keep
                    // up with a full churn.
                    1.. => {
                        // Observed when taken: one clock read a bulk.
                        let now = record::unix_now_ns();
                        for e in inbox.drain(..) {
                            self.add(&e, now);
                        }
                    }
                    // No more rows: what is left goes out, for as long as
                    // the finish allows.
                    0 => {
                        open = false;
                        finishing = true;
                        deadline = self.shared.patience().map(|p| Instant::now() + p);
                        self.seal();
                        // A collector already away is not waited for.
                        if deadline.is_some() && self.failing.is_some() {
                            break;
                        }
                    }
                },
                _ = sleep_until(self.due.unwrap_or(far)), if self.due.is_some() => self.seal(),
                outcome = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                    pending = None;
                    let failed = self.answered(outcome, &mut head);
                    if failed && finishing && deadline.is_some() {
                        break;
                    }
                }
                _ = sleep_until(self.retry_at.unwrap_or(far)), if pending.is_none() && self.retry_at.is_some() => {}
                _ = sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => break,
            }
            self.publish(&head);
        }
        // Whatever is still in flight is given up on and kept: it may
        // arrive twice (the receiver can tell by tcptrace.seq).
        drop(pending);
        self.seal();
        self.keep_the_rest(head);
        let waiting = self.spool.as_ref().map_or(0, Spool::records);
        self.shared.waiting.store(waiting, Ordering::Relaxed);
        let counts = self.shared.counts();
        let dir = self
            .spool
            .as_ref()
            .filter(|s| !s.is_empty())
            .map(|s| s.dir().display().to_string());
        (counts, dir)
    }

    /// Room for more rows: in wait mode (a recording shipped after the
    /// fact) the reader waits rather than filling memory without bound.
    fn accepting(&self) -> bool {
        !self.config.wait || self.spool.is_some() || self.memory.len() < MEMORY_BATCHES
    }

    fn is_empty(&self) -> bool {
        self.current_n == 0
            && self.memory.is_empty()
            && self.spool.as_ref().is_none_or(Spool::is_empty)
    }

    fn add(&mut self, e: &Entry, observed_ns: u64) {
        let r = self.encoder.record(e, observed_ns);
        encode_key(2, WireType::LengthDelimited, &mut self.current);
        r.encode_length_delimited(&mut self.current)
            .expect("a Vec grows");
        self.current_n += 1;
        if self.current_n == 1 {
            self.due = Some(Instant::now() + BATCH_DELAY);
        }
        let full = if self.busy {
            self.current.len() >= BATCH_BYTES_BEHIND
        } else {
            self.current_n >= BATCH_RECORDS
        };
        if full {
            self.seal();
        }
    }

    /// The current records become one request, queued.
    fn seal(&mut self) {
        self.due = None;
        if self.current.is_empty() {
            return;
        }
        let n = std::mem::take(&mut self.current_n) as u64;
        // Level 1, once over the whole request; the envelope's head and the
        // records go in apart, never copied into one buffer.
        let head = self.envelope_head(self.current.len());
        let mut gz = flate2::write::GzEncoder::new(
            Vec::with_capacity(self.current.len() / 4),
            flate2::Compression::fast(),
        );
        let body = gz
            .write_all(&head)
            .and_then(|()| gz.write_all(&self.current))
            .and_then(|()| gz.finish());
        self.current.clear();
        match body {
            Ok(body) => self.enqueue(Batch {
                body: Bytes::from(body),
                records: n,
                from_disk: false,
            }),
            Err(e) => self.dropped(n, &format!("cannot compress a request: {e}")),
        }
    }

    /// What comes before `records` bytes of encoded log records in their
    /// ExportLogsServiceRequest: the head of one ResourceLogs (field 1),
    /// its Resource, the head of its one ScopeLogs (field 2) and its scope;
    /// the records are that ScopeLogs' field 2.
    fn envelope_head(&self, records: usize) -> Vec<u8> {
        // A message field's key, its length and itself.
        let field = |tag: u32, len: usize| key_len(tag) + encoded_len_varint(len as u64) + len;
        let scope_logs = field(1, self.scope.encoded_len()) + records;
        let resource_logs = field(1, self.resource.encoded_len()) + field(2, scope_logs);
        let mut out = Vec::with_capacity(resource_logs - records + 16);
        encode_key(1, WireType::LengthDelimited, &mut out);
        encode_varint(resource_logs as u64, &mut out);
        encode_key(1, WireType::LengthDelimited, &mut out);
        self.resource
            .encode_length_delimited(&mut out)
            .expect("a Vec grows");
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint(scope_logs as u64, &mut out);
        encode_key(1, WireType::LengthDelimited, &mut out);
        self.scope
            .encode_length_delimited(&mut out)
            .expect("a Vec grows");
        out
    }

    /// Memory while the spool is empty (so that order holds), then the
    /// spool; else the batch is lost, and counted.
    fn enqueue(&mut self, b: Batch) {
        let spooling = self.spool.as_ref().is_some_and(|s| !s.is_empty());
        let room =
            self.memory.len() < MEMORY_BATCHES && self.memory_bytes + b.body.len() <= MEMORY_BYTES;
        if !spooling && (room || self.config.wait) {
            self.memory_bytes += b.body.len();
            self.memory.push_back(b);
            return;
        }
        self.spool_batch(b, false);
    }

    fn spool_batch(&mut self, b: Batch, front: bool) {
        let Some(spool) = &mut self.spool else {
            let why = match &self.failing {
                Some(f) => format!("the collector is unreachable ({f}) and no spool is kept"),
                None => "the queue is full and no spool is kept".into(),
            };
            return self.dropped(b.records, &why);
        };
        let kept = if front {
            spool.push_front(&b.body, b.records)
        } else {
            spool.push(&b.body, b.records)
        };
        match kept {
            Ok(()) => {
                self.shared.spooled.fetch_add(b.records, Ordering::Relaxed);
            }
            Err(why) => self.dropped(b.records, &why),
        }
    }

    /// The next request to send: the oldest in memory, then the spool's.
    fn next_batch(&mut self) -> Option<Batch> {
        if let Some(b) = self.memory.pop_front() {
            self.memory_bytes -= b.body.len();
            return Some(b);
        }
        // A file that cannot be read back is skipped (its records counted
        // as dropped) and the next one taken: none may hold up the rest.
        let mut lost = Vec::new();
        let found = loop {
            let Some(spool) = self.spool.as_mut() else {
                break None;
            };
            if spool.is_empty() {
                break None;
            }
            if let Some((body, records)) = spool.front() {
                break Some(Batch {
                    body: Bytes::from(body),
                    records,
                    from_disk: true,
                });
            }
            match spool.drop_unreadable() {
                Some(f) => lost.push(f),
                None => break None,
            }
        };
        for f in lost {
            let why = format!("{} could not be read back", f.path.display());
            self.dropped(f.records, &why);
        }
        found
    }

    /// Handles the collector's answer to `head`; true when it could not be
    /// reached (the request waits to be sent again).
    fn answered(&mut self, outcome: Outcome, head: &mut Option<Batch>) -> bool {
        let Some(b) = head.take() else {
            return false;
        };
        let done = |w: &mut Worker, b: &Batch| {
            if b.from_disk
                && let Some(s) = &mut w.spool
            {
                s.pop();
            }
        };
        match outcome {
            Outcome::Sent => {
                self.shared.sent.fetch_add(b.records, Ordering::Relaxed);
                done(self, &b);
                self.recovered();
                false
            }
            Outcome::Partial(rejected, why) => {
                let rejected = rejected.min(b.records);
                self.shared
                    .sent
                    .fetch_add(b.records - rejected, Ordering::Relaxed);
                done(self, &b);
                self.recovered();
                self.refused(rejected, &format!("rejected by the collector: {why}"));
                false
            }
            Outcome::Refused(why) => {
                done(self, &b);
                self.recovered();
                self.refused(b.records, &why);
                false
            }
            Outcome::Retry(why, after) => {
                let wait = after.unwrap_or(self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                self.retry_at = Some(Instant::now() + wait);
                if self.failing.is_none() {
                    let kept = match &self.spool {
                        Some(s) => format!("in memory, then in {}", s.dir().display()),
                        None => "in memory (no spool: what does not fit is dropped)".into(),
                    };
                    eprintln!(
                        "tcptrace: otlp: cannot send to {} ({why}); records wait {kept}, sent \
                         again every few seconds",
                        self.config.shown
                    );
                }
                self.failing = Some(why);
                *head = Some(b);
                true
            }
        }
    }

    fn recovered(&mut self) {
        self.backoff = BACKOFF_FIRST;
        if self.failing.take().is_some() {
            eprintln!(
                "tcptrace: otlp: {} takes records again; sending what waited",
                self.config.shown
            );
        }
    }

    /// Records refused for good: counted, and said once.
    fn refused(&mut self, n: u64, why: &str) {
        if n == 0 {
            return;
        }
        self.shared.dropped.fetch_add(n, Ordering::Relaxed);
        if !self.said_refused {
            self.said_refused = true;
            eprintln!(
                "tcptrace: otlp: {} refused {n} records ({why}); refusals are not sent again \
                 and count as dropped",
                self.config.shown
            );
        }
    }

    /// Records that could not be kept: counted, and said once.
    fn dropped(&mut self, n: u64, why: &str) {
        self.shared.dropped.fetch_add(n, Ordering::Relaxed);
        if !self.said_dropped {
            self.said_dropped = true;
            eprintln!("tcptrace: otlp: {n} records dropped: {why} (counted in the stats)");
        }
    }

    /// At the end: what was not sent goes to the spool, oldest first, for
    /// the next run; without a spool it is dropped.
    fn keep_the_rest(&mut self, head: Option<Batch>) {
        let mut rest: Vec<Batch> = head.into_iter().filter(|b| !b.from_disk).collect();
        rest.extend(self.memory.drain(..));
        self.memory_bytes = 0;
        // In front of what the spool holds: these are older.
        for b in rest.into_iter().rev() {
            self.spool_batch(b, true);
        }
    }

    /// Records not acknowledged yet, for the metrics.
    fn publish(&self, head: &Option<Batch>) {
        let n = self.current_n as u64
            + self.memory.iter().map(|b| b.records).sum::<u64>()
            + head
                .as_ref()
                .filter(|b| !b.from_disk)
                .map_or(0, |b| b.records)
            + self.spool.as_ref().map_or(0, Spool::records);
        self.shared.waiting.store(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::logs::v1::{ResourceLogs, ScopeLogs};

    use super::super::record::tests::entries;
    use super::*;

    #[test]
    fn a_request_is_the_one_prost_makes() {
        let config = Config {
            uri: "http://127.0.0.1:4318/v1/logs".parse().unwrap(),
            shown: String::new(),
            headers: Arc::new(Vec::new()),
            wait: false,
        };
        let mut w = Worker::new(config, None, Arc::new(Shared::default()));
        let entries = entries();
        // Each kind after others: what one row leaves in the reused record
        // must not show in the next.
        let rows: Vec<&Entry> = entries.iter().chain(entries.iter().rev()).collect();
        let observed = 1_765_000_000_999_000_000;
        for e in &rows {
            w.add(e, observed);
        }
        w.seal();
        let batch = w.memory.pop_front().expect("sealed");
        assert_eq!(batch.records, rows.len() as u64);
        let mut sent = Vec::new();
        flate2::read::GzDecoder::new(&batch.body[..])
            .read_to_end(&mut sent)
            .unwrap();

        let want = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(w.resource.clone()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "tcptrace".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    log_records: rows
                        .iter()
                        .map(|e| record::log_record(e, observed))
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        assert_eq!(ExportLogsServiceRequest::decode(&sent[..]).unwrap(), want);
        assert_eq!(sent, want.encode_to_vec());
    }
}

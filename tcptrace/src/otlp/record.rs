//! A row as an OTLP log record, and the resource that says where it comes
//! from. Attribute names follow OpenTelemetry's semantic conventions where
//! they have one; the rest are `tcp.*` (docs/fleets.md lists them all).

use std::fmt::Write as _;

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;

use tcptrace_core::cgroup;
use tcptrace_core::model::{Origin, Row, State, Timing};

/// One row on its way to the collector: what the exporter thread needs to
/// build its record.
pub struct Entry {
    pub row: Row,
    /// The row's kernel time on the wall clock, as the text output shows it.
    pub time_unix_ns: i64,
    /// The text line, as the text output shows it (no colour, no newline).
    pub body: String,
    /// Counts the rows of one run from 1: a gap or a repeat at the
    /// receiver shows here.
    pub seq: u64,
}

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn s(key: &str, value: impl Into<String>) -> KeyValue {
    kv(key, Value::StringValue(value.into()))
}

#[cfg(test)]
fn i(key: &str, value: i64) -> KeyValue {
    kv(key, Value::IntValue(value))
}

/// The log record of `e`, observed (handed to the exporter) at
/// `observed_ns`, built afresh: what [`Encoder::record`] must equal (its
/// test checks). Not the exporter's way: allocating its Strings and
/// KeyValues per row doubled a record's cost (docs/performance.md).
#[cfg(test)]
pub fn log_record(e: &Entry, observed_ns: u64) -> LogRecord {
    let row = &e.row;
    let t = &row.t;
    let mut a = Vec::with_capacity(20);
    a.push(s("network.transport", "tcp"));
    a.push(s("network.type", t.family.name()));
    a.push(s("network.local.address", t.local.ip().to_string()));
    a.push(i("network.local.port", i64::from(t.local.port())));
    a.push(s("network.peer.address", t.remote.ip().to_string()));
    a.push(i("network.peer.port", i64::from(t.remote.port())));
    if let Some(o) = &row.owner {
        a.push(i("process.pid", i64::from(o.pid)));
        a.push(s("process.executable.name", o.comm.as_str()));
        if let Some(path) = o.cgroup {
            if let Some(id) = cgroup::container(path) {
                a.push(s("container.id", id));
            } else if let Some(unit) = cgroup::unit(path) {
                a.push(s("tcp.systemd.unit", unit));
            }
        }
    }
    let thread = t.thread.as_str();
    if !thread.is_empty() {
        a.push(s("thread.name", thread));
    }
    if row.origin != Origin::Snapshot {
        a.push(s("tcp.state.old", state_name(t.old).into_owned()));
    }
    a.push(s("tcp.state.new", state_name(t.new).into_owned()));
    if let Some(ns) = row.dwell_ns {
        a.push(i("tcp.state.old.duration_ns", ns as i64));
    }
    a.push(i("tcp.socket", row.sock as i64));
    if let Some(c) = row.close {
        a.push(s("tcp.close.reason", c.name()));
        if let Some(r) = c.reset_reason() {
            a.push(s("tcp.reset.reason", r));
        }
    }
    if t.netns != 0 {
        a.push(i("tcp.netns", i64::from(t.netns)));
    }
    if row.queued {
        a.push(kv("tcp.queued", Value::BoolValue(true)));
    }
    a.push(s("tcp.origin", row.origin.name()));
    if row.timing != Timing::Exact {
        a.push(s("tcp.timing", row.timing.name()));
    }
    a.push(i("tcptrace.seq", e.seq as i64));
    let (severity, text) = if row.close.is_some() {
        (SeverityNumber::Warn, "WARN")
    } else {
        (SeverityNumber::Info, "INFO")
    };
    LogRecord {
        time_unix_nano: u64::try_from(e.time_unix_ns).unwrap_or(0),
        observed_time_unix_nano: observed_ns,
        severity_number: severity as i32,
        severity_text: text.to_string(),
        event_name: "tcp.state_change".to_string(),
        body: Some(AnyValue {
            value: Some(Value::StringValue(e.body.clone())),
        }),
        attributes: a,
        ..Default::default()
    }
}

/// The state's name as the rows show it (a number when the kernel has a
/// state tcptrace does not know).
#[cfg(test)]
fn state_name(st: State) -> std::borrow::Cow<'static, str> {
    match st.name() {
        "" => st.to_string().into(),
        name => name.into(),
    }
}

/// The attributes a record may carry, in the order it carries them.
#[derive(Clone, Copy, PartialEq)]
enum Attr {
    Transport,
    NetworkType,
    LocalAddress,
    LocalPort,
    PeerAddress,
    PeerPort,
    Pid,
    Executable,
    Container,
    Unit,
    Thread,
    StateOld,
    StateNew,
    Dwell,
    Socket,
    CloseReason,
    ResetReason,
    Netns,
    Queued,
    Origin,
    Timing,
    Seq,
}

/// Their keys, by [`Attr`].
const KEYS: [&str; 22] = [
    "network.transport",
    "network.type",
    "network.local.address",
    "network.local.port",
    "network.peer.address",
    "network.peer.port",
    "process.pid",
    "process.executable.name",
    "container.id",
    "tcp.systemd.unit",
    "thread.name",
    "tcp.state.old",
    "tcp.state.new",
    "tcp.state.old.duration_ns",
    "tcp.socket",
    "tcp.close.reason",
    "tcp.reset.reason",
    "tcp.netns",
    "tcp.queued",
    "tcp.origin",
    "tcp.timing",
    "tcptrace.seq",
];

/// Rows as log records, one LogRecord rewritten in place for each: once
/// every kind of row has passed, a record allocates nothing.
pub struct Encoder {
    record: LogRecord,
    /// One KeyValue per [`Attr`], its key written once, while no row
    /// carries it. The attributes a row carries are moved (not copied)
    /// into `record.attributes`, in order, and stay there for as long as
    /// the next rows carry the same: only where a row differs from the
    /// last do they go back. A value's buffer thus stays its attribute's
    /// whichever attributes the rows between carry.
    slots: Vec<KeyValue>,
    /// The slot each of `record.attributes` came from.
    lent: Vec<Attr>,
    /// How many of `record.attributes` this row has written.
    written: usize,
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder {
            record: LogRecord {
                event_name: "tcp.state_change".into(),
                attributes: Vec::with_capacity(KEYS.len()),
                ..Default::default()
            },
            slots: KEYS
                .iter()
                .map(|&key| KeyValue {
                    key: key.into(),
                    ..Default::default()
                })
                .collect(),
            lent: Vec::with_capacity(KEYS.len()),
            written: 0,
        }
    }

    /// The log record of `e`, observed (handed to the exporter) at
    /// `observed_ns`; valid until the next call.
    pub fn record(&mut self, e: &Entry, observed_ns: u64) -> &LogRecord {
        self.written = 0;
        let row = &e.row;
        let t = &row.t;
        let r = &mut self.record;
        r.time_unix_nano = u64::try_from(e.time_unix_ns).unwrap_or(0);
        r.observed_time_unix_nano = observed_ns;
        let (severity, text) = if row.close.is_some() {
            (SeverityNumber::Warn, "WARN")
        } else {
            (SeverityNumber::Info, "INFO")
        };
        r.severity_number = severity as i32;
        r.severity_text.clear();
        r.severity_text.push_str(text);
        text_of(&mut r.body).push_str(&e.body);

        self.str(Attr::Transport, "tcp");
        self.str(Attr::NetworkType, t.family.name());
        let _ = write!(self.text(Attr::LocalAddress), "{}", t.local.ip());
        self.int(Attr::LocalPort, i64::from(t.local.port()));
        let _ = write!(self.text(Attr::PeerAddress), "{}", t.remote.ip());
        self.int(Attr::PeerPort, i64::from(t.remote.port()));
        if let Some(o) = &row.owner {
            self.int(Attr::Pid, i64::from(o.pid));
            self.str(Attr::Executable, &o.comm.as_str());
            if let Some(path) = o.cgroup {
                if let Some(id) = cgroup::container(path) {
                    self.str(Attr::Container, id);
                } else if let Some(unit) = cgroup::unit(path) {
                    self.str(Attr::Unit, unit);
                }
            }
        }
        let thread = t.thread.as_str();
        if !thread.is_empty() {
            self.str(Attr::Thread, &thread);
        }
        if row.origin != Origin::Snapshot {
            self.state(Attr::StateOld, t.old);
        }
        self.state(Attr::StateNew, t.new);
        if let Some(ns) = row.dwell_ns {
            self.int(Attr::Dwell, ns as i64);
        }
        self.int(Attr::Socket, row.sock as i64);
        if let Some(c) = row.close {
            self.str(Attr::CloseReason, c.name());
            if let Some(r) = c.reset_reason() {
                self.str(Attr::ResetReason, r);
            }
        }
        if t.netns != 0 {
            self.int(Attr::Netns, i64::from(t.netns));
        }
        if row.queued {
            self.lend(Attr::Queued).value = Some(AnyValue {
                value: Some(Value::BoolValue(true)),
            });
        }
        self.str(Attr::Origin, row.origin.name());
        if row.timing != Timing::Exact {
            self.str(Attr::Timing, row.timing.name());
        }
        self.int(Attr::Seq, e.seq as i64);
        if self.written < self.lent.len() {
            self.give_back(self.written);
        }
        &self.record
    }

    /// The row carries `a` next: its KeyValue, where the last row had it
    /// or lent from its slot.
    fn lend(&mut self, a: Attr) -> &mut KeyValue {
        let i = self.written;
        self.written += 1;
        if self.lent.get(i) != Some(&a) {
            self.give_back(i);
            self.record
                .attributes
                .push(std::mem::take(&mut self.slots[a as usize]));
            self.lent.push(a);
        }
        &mut self.record.attributes[i]
    }

    /// The record's attributes from the `from`th on go back to their slots.
    fn give_back(&mut self, from: usize) {
        let back = self.record.attributes.drain(from..);
        for (kv, a) in back.zip(self.lent.drain(from..)) {
            self.slots[a as usize] = kv;
        }
    }

    /// `a`'s string value, emptied, to write into.
    fn text(&mut self, a: Attr) -> &mut String {
        text_of(&mut self.lend(a).value)
    }

    fn str(&mut self, a: Attr, value: &str) {
        self.text(a).push_str(value);
    }

    fn int(&mut self, a: Attr, value: i64) {
        match &mut self.lend(a).value {
            Some(AnyValue {
                value: Some(Value::IntValue(v)),
            }) => *v = value,
            other => {
                *other = Some(AnyValue {
                    value: Some(Value::IntValue(value)),
                })
            }
        }
    }

    /// The state's name as the rows show it (a number when the kernel has
    /// a state tcptrace does not know).
    fn state(&mut self, a: Attr, st: State) {
        let s = self.text(a);
        match st.name() {
            "" => {
                let _ = write!(s, "{st}");
            }
            name => s.push_str(name),
        }
    }
}

/// The string buffer of an AnyValue, emptied; made a string value if it
/// was not one (only the first time: a slot's kind never changes).
fn text_of(v: &mut Option<AnyValue>) -> &mut String {
    let any = v.get_or_insert_with(AnyValue::default);
    if !matches!(any.value, Some(Value::StringValue(_))) {
        any.value = Some(Value::StringValue(String::new()));
    }
    let Some(Value::StringValue(s)) = &mut any.value else {
        unreachable!("made a string value above")
    };
    s.clear();
    s
}

/// What every record of this run shares: tcptrace, its version, this run,
/// the host and its kernel.
pub fn resource() -> Resource {
    let uts = uname();
    let mut attributes = vec![
        s("service.name", "tcptrace"),
        s("service.version", env!("CARGO_PKG_VERSION")),
        s("service.instance.id", instance_id()),
        s("host.name", uts.0),
        s("host.arch", arch()),
        s("os.type", "linux"),
        s("os.version", uts.1),
    ];
    attributes.retain(|kv| {
        !matches!(&kv.value, Some(AnyValue { value: Some(Value::StringValue(v)) }) if v.is_empty())
    });
    Resource {
        attributes,
        ..Default::default()
    }
}

/// A run's id, so that a receiver can tell runs on one host apart: with
/// `tcptrace.seq`, the key to drop repeats by.
fn instance_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|u| u.trim().to_string())
        .unwrap_or_else(|_| format!("{}-{}", std::process::id(), unix_now_ns()))
}

/// `host.arch` as the conventions spell it.
fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The host's name and its kernel release.
fn uname() -> (String, String) {
    // SAFETY: uname fills the struct it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return (String::new(), String::new());
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (field(&u.nodename), field(&u.release))
}

pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
pub mod tests {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    use prost::Message;
    use tcptrace_core::model::{Close, Comm, Family, Origin, Row, State, Task, Timing, Transition};

    use super::*;

    fn entry(local: &str, remote: &str, close: Option<Close>, origin: Origin) -> Entry {
        let local: std::net::SocketAddr = local.parse().unwrap();
        let mut owner = Task::new(4242, b"curl");
        owner.cgroup = Some("/system.slice/nginx.service");
        Entry {
            row: Row {
                t: Transition {
                    ts_ns: 5,
                    skaddr: 0xffff_8880_1234_5678,
                    task: owner,
                    thread: Comm::from_bytes(b"worker-1"),
                    old: State::ESTABLISHED,
                    new: State::CLOSE,
                    family: if local.is_ipv4() {
                        Family::V4
                    } else {
                        Family::V6
                    },
                    local,
                    remote: remote.parse().unwrap(),
                    netns: 4026531840,
                },
                sock: 0xffff_8880_1234_5678,
                owner: Some(owner),
                dwell_ns: Some(123_456_789),
                close,
                origin,
                queued: true,
                timing: Timing::Exact,
            },
            time_unix_ns: 1_765_000_000_123_456_789,
            body: "12:00:00.123456 4242 curl ESTABLISHED -> CLOSE \u{e9}".into(),
            seq: 300,
        }
    }

    /// A row of each kind the records differ by.
    pub fn entries() -> Vec<Entry> {
        vec![
            entry(
                "10.0.0.1:443",
                "10.0.0.2:51000",
                Some(Close::ResetReceived),
                Origin::Tracepoint,
            ),
            entry("[::1]:80", "[2001:db8::7]:65535", None, Origin::Snapshot),
            entry(
                "0.0.0.0:0",
                "0.0.0.0:0",
                Some(Close::ResetSent(Some("NOT_SPECIFIED"))),
                Origin::Tracepoint,
            ),
            {
                // No owner, no thread name, a state tcptrace has no name for.
                let mut e = entry("10.0.0.1:1", "10.0.0.2:2", None, Origin::Tracepoint);
                e.row.owner = None;
                e.row.t.thread = Comm::default();
                e.row.t.new = State(99);
                e.row.dwell_ns = None;
                e.row.queued = false;
                e
            },
            {
                // A time-wait row whose end only a read of the table saw.
                let mut e = entry("10.0.0.1:1", "10.0.0.2:2", None, Origin::TimeWait);
                e.row.timing = Timing::Poll;
                e
            },
            {
                // A container's process; no time, no network namespace.
                let mut e = entry("10.0.0.1:1", "10.0.0.2:2", None, Origin::Tracepoint);
                let mut owner = Task::new(7, b"envoy");
                owner.cgroup = Some(
                    "/kubepods.slice/cri-containerd-\
                     0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope",
                );
                e.row.owner = Some(owner);
                e.row.t.netns = 0;
                e.time_unix_ns = -1;
                e.body.clear();
                e
            },
        ]
    }

    #[test]
    fn a_reused_record_is_the_one_built_afresh() {
        let entries = entries();
        let mut enc = Encoder::new();
        // Every kind after every other, so that each slot is lent after
        // rows of each shape.
        for a in &entries {
            for b in &entries {
                for e in [a, b] {
                    let want = log_record(e, 1_765_000_000_999_000_000);
                    let got = enc.record(e, 1_765_000_000_999_000_000);
                    assert_eq!(*got, want);
                    assert_eq!(got.encode_to_vec(), want.encode_to_vec());
                }
            }
        }
    }

    /// Counts the allocations of the thread that counts.
    struct Counting;

    thread_local! {
        static COUNTING: Cell<bool> = const { Cell::new(false) };
        static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    // SAFETY: System's, with a count on the side.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if COUNTING.with(Cell::get) {
                ALLOCATIONS.with(|n| n.set(n.get() + 1));
            }
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if COUNTING.with(Cell::get) {
                ALLOCATIONS.with(|n| n.set(n.get() + 1));
            }
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    #[test]
    fn once_warm_a_record_allocates_nothing() {
        let entries = entries();
        let mut enc = Encoder::new();
        let mut out = Vec::with_capacity(1 << 16);
        for e in &entries {
            let _ = enc.record(e, 1);
        }
        COUNTING.with(|c| c.set(true));
        // The count counts.
        drop(std::hint::black_box(Vec::<u8>::with_capacity(1)));
        assert_eq!(ALLOCATIONS.with(|n| n.replace(0)), 1);
        for _ in 0..3 {
            for e in entries.iter().rev().chain(&entries) {
                enc.record(e, 1).encode_length_delimited(&mut out).unwrap();
            }
        }
        COUNTING.with(|c| c.set(false));
        assert_eq!(ALLOCATIONS.with(Cell::get), 0);
    }
}

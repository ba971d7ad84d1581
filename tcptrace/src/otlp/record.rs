//! A row as an OTLP log record, and the resource that says where it comes
//! from. Attribute names follow OpenTelemetry's semantic conventions where
//! they have one; the rest are `tcp.*` (docs/fleets.md lists them all).

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
#[cfg(test)]
use opentelemetry_proto::tonic::logs::v1::{LogRecord, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;

use tcptrace_core::model::Row;
#[cfg(test)]
use tcptrace_core::{
    cgroup,
    model::{Origin, Timing},
};

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
/// `observed_ns`, as prost's types: what [`wire::log_record`] must encode
/// byte for byte (its test checks).
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
fn state_name(st: tcptrace_core::model::State) -> std::borrow::Cow<'static, str> {
    match st.name() {
        "" => st.to_string().into(),
        name => name.into(),
    }
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

/// Protobuf wire encoding of one log record straight from the row, with
/// the same fields and values as [`log_record`] would give prost: building
/// a LogRecord of owned Strings and KeyValues and encoding it cost most of
/// the exporter's time (allocation, copies, prost's length passes).
pub mod wire {
    use std::io::Write as _;

    use tcptrace_core::cgroup;
    use tcptrace_core::model::{Origin, Timing};

    use super::{Entry, state_name};

    const VARINT: u32 = 0;
    const FIXED64: u32 = 1;
    const LEN: u32 = 2;

    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub fn varint_len(v: u64) -> usize {
        (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
    }

    fn tag(out: &mut Vec<u8>, field: u32, wire: u32) {
        varint(out, u64::from(field << 3 | wire));
    }

    /// A length-delimited field whose payload is `bytes`.
    pub fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
        tag(out, field, LEN);
        varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }

    /// A KeyValue (field 6 of LogRecord) holding a string: prost writes
    /// an empty key or value not at all, and so does this.
    fn kv_str(out: &mut Vec<u8>, key: &str, value: &str) {
        // AnyValue { string_value (1) }; the oneof is written even empty.
        let any = 1 + varint_len(value.len() as u64) + value.len();
        kv_head(out, key, any);
        bytes_field(out, 1, value.as_bytes());
    }

    fn kv_int(out: &mut Vec<u8>, key: &str, value: i64) {
        let any = 1 + varint_len(value as u64);
        kv_head(out, key, any);
        tag(out, 3, VARINT);
        varint(out, value as u64);
    }

    fn kv_bool(out: &mut Vec<u8>, key: &str, value: bool) {
        kv_head(out, key, 2);
        tag(out, 2, VARINT);
        out.push(u8::from(value));
    }

    /// The KeyValue's tag, its length, its key and the head of its value
    /// (an AnyValue of `any` bytes).
    fn kv_head(out: &mut Vec<u8>, key: &str, any: usize) {
        let key_part = if key.is_empty() {
            0
        } else {
            1 + varint_len(key.len() as u64) + key.len()
        };
        let len = key_part + 1 + varint_len(any as u64) + any;
        tag(out, 6, LEN);
        varint(out, len as u64);
        if !key.is_empty() {
            bytes_field(out, 1, key.as_bytes());
        }
        tag(out, 2, LEN);
        varint(out, any as u64);
    }

    /// An address as text, without allocating.
    fn ip_text(ip: std::net::IpAddr, buf: &mut [u8; 64]) -> &str {
        let mut c = std::io::Cursor::new(&mut buf[..]);
        let _ = write!(c, "{ip}");
        let n = c.position() as usize;
        std::str::from_utf8(&buf[..n]).unwrap_or("")
    }

    /// Appends the LogRecord of `e` (its fields, not a tag or length) to
    /// `out`.
    pub fn log_record(out: &mut Vec<u8>, e: &Entry, observed_ns: u64) {
        let row = &e.row;
        let t = &row.t;
        let time = u64::try_from(e.time_unix_ns).unwrap_or(0);
        if time != 0 {
            tag(out, 1, FIXED64);
            out.extend_from_slice(&time.to_le_bytes());
        }
        let (severity, text) = if row.close.is_some() {
            (13u64, "WARN")
        } else {
            (9u64, "INFO")
        };
        tag(out, 2, VARINT);
        varint(out, severity);
        bytes_field(out, 3, text.as_bytes());
        // body: AnyValue { string_value }
        let body = e.body.as_bytes();
        tag(out, 5, LEN);
        varint(out, (1 + varint_len(body.len() as u64) + body.len()) as u64);
        bytes_field(out, 1, body);

        let mut buf = [0u8; 64];
        kv_str(out, "network.transport", "tcp");
        kv_str(out, "network.type", t.family.name());
        kv_str(
            out,
            "network.local.address",
            ip_text(t.local.ip(), &mut buf),
        );
        kv_int(out, "network.local.port", i64::from(t.local.port()));
        kv_str(
            out,
            "network.peer.address",
            ip_text(t.remote.ip(), &mut buf),
        );
        kv_int(out, "network.peer.port", i64::from(t.remote.port()));
        if let Some(o) = &row.owner {
            kv_int(out, "process.pid", i64::from(o.pid));
            kv_str(out, "process.executable.name", &o.comm.as_str());
            if let Some(path) = o.cgroup {
                if let Some(id) = cgroup::container(path) {
                    kv_str(out, "container.id", id);
                } else if let Some(unit) = cgroup::unit(path) {
                    kv_str(out, "tcp.systemd.unit", unit);
                }
            }
        }
        let thread = t.thread.as_str();
        if !thread.is_empty() {
            kv_str(out, "thread.name", &thread);
        }
        if row.origin != Origin::Snapshot {
            kv_str(out, "tcp.state.old", &state_name(t.old));
        }
        kv_str(out, "tcp.state.new", &state_name(t.new));
        if let Some(ns) = row.dwell_ns {
            kv_int(out, "tcp.state.old.duration_ns", ns as i64);
        }
        kv_int(out, "tcp.socket", row.sock as i64);
        if let Some(c) = row.close {
            kv_str(out, "tcp.close.reason", c.name());
            if let Some(r) = c.reset_reason() {
                kv_str(out, "tcp.reset.reason", r);
            }
        }
        if t.netns != 0 {
            kv_int(out, "tcp.netns", i64::from(t.netns));
        }
        if row.queued {
            kv_bool(out, "tcp.queued", true);
        }
        kv_str(out, "tcp.origin", row.origin.name());
        if row.timing != Timing::Exact {
            kv_str(out, "tcp.timing", row.timing.name());
        }
        kv_int(out, "tcptrace.seq", e.seq as i64);
        if observed_ns != 0 {
            tag(out, 11, FIXED64);
            out.extend_from_slice(&observed_ns.to_le_bytes());
        }
        bytes_field(out, 12, b"tcp.state_change");
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn the_wire_encoding_is_prosts() {
        for e in [
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
        ] {
            let mut wire = Vec::new();
            super::wire::log_record(&mut wire, &e, 1_765_000_000_999_000_000);
            assert_eq!(
                wire,
                log_record(&e, 1_765_000_000_999_000_000).encode_to_vec()
            );
        }
    }
}

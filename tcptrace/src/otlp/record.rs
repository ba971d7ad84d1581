//! A row as an OTLP log record, and the resource that says where it comes
//! from. Attribute names follow OpenTelemetry's semantic conventions where
//! they have one; the rest are `tcp.*` (docs/fleets.md lists them all).

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;

use tcptrace_core::cgroup;
use tcptrace_core::model::{Origin, Row};

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

fn i(key: &str, value: i64) -> KeyValue {
    kv(key, Value::IntValue(value))
}

/// The log record of `e`, observed (handed to the exporter) at
/// `observed_ns`.
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
        a.push(s("tcp.state.old", state_name(t.old)));
    }
    a.push(s("tcp.state.new", state_name(t.new)));
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
fn state_name(st: tcptrace_core::model::State) -> String {
    match st.name() {
        "" => st.to_string(),
        name => name.to_string(),
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

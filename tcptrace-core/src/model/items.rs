//! What a recording holds besides rows: its header, the notes about
//! sockets, its closing stats; and [`Item`], one of any of them.

use serde::{Deserialize, Serialize};

use crate::model::{Clock, Row, Spec};
use chrono::{DateTime, Utc};
use std::fs;

/// Version of the recording format, in every header.
pub const FORMAT_VERSION: u32 = 1;

/// One line of a recording.
pub enum Item {
    /// Boxed: items are moved for every row, and a header is twice a row.
    Header(Box<Header>),
    Row(Row),
    /// A socket whose end the kernel never reported.
    Gap(Gap),
    /// Who held a socket when tcptrace looked.
    Holders(HoldersNote),
    Stats(Stats),
}

/// The first line of every file of a recording.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Always "header".
    #[serde(rename = "type")]
    pub kind: String,
    pub format: u32,
    /// Version of the tcptrace that wrote it.
    pub tcptrace: String,
    pub host: String,
    pub kernel: String,
    /// Wall-clock start of the run, RFC 3339 UTC.
    pub start: String,
    /// CLOCK_MONOTONIC at the start (the zero of `--time relative`).
    pub start_ns: u64,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC: wall time of an event is
    /// `ts_ns + clock_offset_ns`.
    pub clock_offset_ns: i64,
    /// Number of this file in a rotation, from 0.
    pub part: u32,
    pub filters: Spec,
}

impl Header {
    pub fn new(clock: Clock, filters: Spec) -> Header {
        let start = DateTime::<Utc>::from_timestamp_nanos(clock.wall_ns(clock.start_ns));
        Header {
            kind: "header".into(),
            format: FORMAT_VERSION,
            tcptrace: env!("CARGO_PKG_VERSION").into(),
            host: read_trimmed("/proc/sys/kernel/hostname"),
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            start: start.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            start_ns: clock.start_ns,
            clock_offset_ns: clock.offset_ns,
            part: 0,
            filters,
        }
    }

    pub fn clock(&self) -> Clock {
        Clock {
            offset_ns: self.clock_offset_ns,
            start_ns: self.start_ns,
        }
    }
}

fn read_trimmed(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A socket whose end the kernel never reported: its address started a
/// new socket while it was last seen in `state`. It closed by `ts_ns`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gap {
    /// Always "gap".
    #[serde(rename = "type")]
    pub kind: String,
    pub sock: u64,
    pub state: String,
    pub ts_ns: u64,
}

/// Who held a socket when tcptrace looked (`ss -p`'s way): written when a
/// socket's holders were found to differ from what its rows said, for
/// `--stuck` warnings, and at the end for every socket still open. Rows of
/// the socket after `ts_ns` carry the first of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HoldersNote {
    /// Always "holders".
    #[serde(rename = "type")]
    pub kind: String,
    pub ts_ns: u64,
    pub sock: u64,
    pub holders: Vec<Holder>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

impl HoldersNote {
    pub fn new(ts_ns: u64, sock: u64, holders: &crate::model::Holders) -> HoldersNote {
        HoldersNote {
            kind: "holders".into(),
            ts_ns,
            sock,
            holders: holders
                .all()
                .map(|t| Holder {
                    pid: t.pid,
                    comm: t.comm.as_str().into_owned(),
                    cgroup: t.cgroup.map(str::to_string),
                })
                .collect(),
        }
    }

    pub fn tasks(&self) -> Vec<crate::model::Task> {
        self.holders
            .iter()
            .map(|h| crate::model::Task {
                pid: h.pid,
                comm: crate::model::Comm::from_bytes(h.comm.as_bytes()),
                cgroup: h.cgroup.as_deref().and_then(crate::cgroup::intern),
            })
            .collect()
    }
}

/// The last line of a recording that ended cleanly.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Always "stats".
    #[serde(rename = "type")]
    pub kind: String,
    /// Transitions recorded, in all files of the run.
    pub events: u64,
    /// Transitions the kernel could not queue (ring buffer full).
    pub lost_ring: u64,
    /// Times the kernel skipped the program (another BPF program was running
    /// on that CPU): transitions never seen.
    #[serde(default)]
    pub missed_kernel: u64,
    /// Transitions the kernel delivered twice, recorded once.
    #[serde(default)]
    pub repeated: u64,
    /// Sockets whose recorded history skips a state: transitions between
    /// them never arrived.
    #[serde(default)]
    pub gaps: u64,
    /// Transitions that could not be written.
    pub lost_output: u64,
    pub duration_s: f64,
    /// With `--otlp`: what became of the rows sent to the collector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp: Option<OtlpCounts>,
    /// How owners were followed: `fentry`, `syscalls` (system-call
    /// tracepoints: every system call of the host paid while tracing) or
    /// `none`; absent in recordings made before it was said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_path: Option<String>,
    /// How time-wait was followed: `kernel`, `polled` or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timewait_path: Option<String>,
}

/// Rows handed to an OTLP collector, by what became of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtlpCounts {
    /// Acknowledged by the collector.
    pub sent: u64,
    /// Lost: a full queue or spool, or refused by the collector.
    pub dropped: u64,
    /// Written to the disk spool while the collector was away (sent
    /// later or still there: `waiting`).
    pub spooled: u64,
    /// Still in the disk spool at the end, for the next run to send.
    pub waiting: u64,
}

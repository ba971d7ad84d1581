//! Analyse: turn a recording into an incident report.
//!
//! One pass, streaming: per-socket state lives only while the socket is
//! open, and time-in-state distributions are histograms, so memory follows
//! the number of sockets open at once, not the length of the recording.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::attribute::{Close, Origin, Row};
use crate::decode::Task;
use crate::fasthash::{FastMap, FastSet};
use crate::filter::Spec;
use crate::record::{Header, Stats};
use crate::replay::Item;
use crate::state::State;

/// How a connection's socket ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// Through the FIN handshake (LAST_ACK, FIN_WAIT2, CLOSING -> CLOSE).
    Orderly,
    ResetSent,
    ResetReceived,
    /// A connect answered by a reset.
    Refused,
    /// Closed while open with no reset seen: a timeout (or a kernel without
    /// the reset tracepoints).
    Aborted,
}

/// How a `-> CLOSE` ended its connection, if it was one.
pub fn ending(r: &Row) -> Option<Ending> {
    if r.t.new != State::CLOSE {
        return None;
    }
    match r.close {
        Some(Close::ResetSent(_)) => return Some(Ending::ResetSent),
        Some(Close::ResetReceived) => return Some(Ending::ResetReceived),
        Some(Close::Refused) => return Some(Ending::Refused),
        None => {}
    }
    match r.t.old {
        State::LAST_ACK | State::FIN_WAIT2 | State::CLOSING | State::TIME_WAIT => {
            Some(Ending::Orderly)
        }
        State::ESTABLISHED
        | State::CLOSE_WAIT
        | State::SYN_RECV
        | State::FIN_WAIT1
        | State::SYN_SENT => Some(Ending::Aborted),
        _ => None,
    }
}

/// The kernel hands a connection to its time-wait table (and reports the
/// socket as closed) from these states.
fn enters_time_wait(old: State, new: State) -> bool {
    new == State::CLOSE && matches!(old, State::FIN_WAIT2 | State::CLOSING)
}

/// How worrying a state left at the end is: the report lists worst first.
fn concern(state: State) -> u8 {
    match state {
        State::CLOSE_WAIT => 0,
        State::LAST_ACK | State::FIN_WAIT2 | State::SYN_SENT | State::SYN_RECV => 1,
        State::FIN_WAIT1 | State::CLOSING => 2,
        State::ESTABLISHED => 3,
        _ => 4,
    }
}

#[derive(Debug)]
struct Open {
    state: State,
    since_ns: u64,
    owner: Option<Task>,
    /// Every holder, when a holders note named them.
    holders: Vec<Task>,
    /// A connection, counted for its owner when it ends (or at the end):
    /// the process that accepted it, not the listener it queued on.
    connection: bool,
    local: SocketAddr,
    remote: SocketAddr,
    /// Key of the endpoint table this socket counts in.
    endpoint: Option<String>,
}

#[derive(Default, Debug, Clone, Serialize)]
pub struct Counts {
    pub opened: u64,
    pub orderly: u64,
    pub reset_sent: u64,
    pub reset_received: u64,
    pub refused: u64,
    pub aborted: u64,
}

impl Counts {
    fn end(&mut self, e: Ending) {
        *match e {
            Ending::Orderly => &mut self.orderly,
            Ending::ResetSent => &mut self.reset_sent,
            Ending::ResetReceived => &mut self.reset_received,
            Ending::Refused => &mut self.refused,
            Ending::Aborted => &mut self.aborted,
        } += 1;
    }

    fn columns(&self) -> [u64; 6] {
        [
            self.opened,
            self.orderly,
            self.reset_sent,
            self.reset_received,
            self.refused,
            self.aborted,
        ]
    }
}

const COUNT_HEADS: [&str; 6] = [
    "opened", "orderly", "rst sent", "rst rcvd", "refused", "aborted",
];

fn count_line(o: &mut String, label: &str, width: usize, values: [String; 6]) {
    let _ = write!(o, "  {label:<width$}");
    for v in values {
        let _ = write!(o, " {v:>8}");
    }
    o.push('\n');
}

#[derive(Default, Clone)]
struct ProcessTally {
    comm: String,
    cgroup: Option<&'static str>,
    transitions: u64,
    connections: u64,
}

/// Everything the report needs, gathered in one pass.
pub struct Analysis {
    headers: Vec<Header>,
    stats: Vec<Stats>,
    events: u64,
    first_ns: Option<u64>,
    last_ns: u64,
    active: Counts,
    passive: Counts,
    /// "local port 6389" / "remote 10.0.0.5:5432" -> counts.
    endpoints: BTreeMap<String, Counts>,
    dwell: BTreeMap<State, Histogram<u64>>,
    open: FastMap<u64, Open>,
    /// Sockets whose end the kernel never reported (gap notes): not open,
    /// whatever order their rows and notes come in.
    ended_unseen: FastSet<u64>,
    processes: FastMap<u32, ProcessTally>,
    time_wait: BTreeMap<String, u64>,
}

impl Default for Analysis {
    fn default() -> Self {
        Analysis::new()
    }
}

impl Analysis {
    pub fn new() -> Analysis {
        Analysis {
            headers: Vec::new(),
            stats: Vec::new(),
            events: 0,
            first_ns: None,
            last_ns: 0,
            active: Counts::default(),
            passive: Counts::default(),
            endpoints: BTreeMap::new(),
            dwell: BTreeMap::new(),
            open: FastMap::default(),
            ended_unseen: FastSet::default(),
            processes: FastMap::default(),
            time_wait: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, item: Item) {
        match item {
            Item::Header(h) => self.headers.push(h),
            Item::Stats(s) => self.stats.push(s),
            Item::Row(r) => self.row(&r),
            Item::Gap(g) => {
                self.ended_unseen.insert(g.sock);
            }
            Item::Holders(h) => {
                if let Some(open) = self.open.get_mut(&h.sock) {
                    open.holders = h.tasks();
                    open.owner = open.holders.first().copied().or(open.owner);
                }
            }
        }
    }

    /// Counts a connection for the process that held it last.
    fn count_connection(&mut self, owner: Option<Task>) {
        if let Some(o) = owner {
            let p = self.processes.entry(o.pid).or_default();
            p.connections += 1;
            if p.comm.is_empty() {
                p.comm = o.comm.as_str().into_owned();
            }
            p.cgroup = p.cgroup.or(o.cgroup);
        }
    }

    fn row(&mut self, r: &Row) {
        let t = &r.t;
        self.first_ns.get_or_insert(t.ts_ns);
        self.last_ns = self.last_ns.max(t.ts_ns);
        if r.origin == Origin::TimeWait {
            // After the socket's CLOSE: only the time spent in TIME_WAIT is
            // new (FIN_WAIT2 was counted from the tracepoint).
            if let (Some(ns), State::TIME_WAIT) = (r.dwell_ns, t.old) {
                self.record_dwell(t.old, ns);
            }
            return;
        }
        if r.origin == Origin::Tracepoint {
            self.events += 1;
        }
        if let (Some(ns), true) = (r.dwell_ns, t.old != State::CLOSE) {
            self.record_dwell(t.old, ns);
        }
        if let Some(o) = &r.owner {
            let p = self.processes.entry(o.pid).or_default();
            p.transitions += 1;
            if p.comm.is_empty() {
                p.comm = o.comm.as_str().into_owned();
            }
            p.cgroup = p.cgroup.or(o.cgroup);
        }

        let opened = match (t.old, t.new) {
            (State::CLOSE, State::SYN_SENT) => Some(false),
            (State::LISTEN, State::SYN_RECV) => Some(true),
            _ => None,
        };
        if let Some(passive) = opened {
            let endpoint = if passive {
                format!("local port {}", t.local.port())
            } else {
                format!("remote {}", t.remote)
            };
            let counts = if passive {
                &mut self.passive
            } else {
                &mut self.active
            };
            counts.opened += 1;
            self.endpoints.entry(endpoint.clone()).or_default().opened += 1;
            self.open.insert(
                r.sock,
                Open {
                    state: t.new,
                    since_ns: t.ts_ns,
                    owner: r.owner,
                    holders: Vec::new(),
                    connection: true,
                    local: t.local,
                    remote: t.remote,
                    endpoint: Some(endpoint),
                },
            );
            return;
        }

        if enters_time_wait(t.old, t.new) {
            *self.time_wait.entry(t.remote.to_string()).or_default() += 1;
        }
        if t.new == State::CLOSE {
            let was = self.open.remove(&r.sock);
            if let Some(o) = was.as_ref().filter(|o| o.connection) {
                self.count_connection(r.owner.or(o.owner));
            }
            if let Some(e) = ending(r) {
                // The side is known from how the socket was opened; a socket
                // opened before the recording counts by its ports.
                let passive = match &was {
                    Some(o) => o
                        .endpoint
                        .as_deref()
                        .is_some_and(|e| e.starts_with("local")),
                    None => t.local.port() < t.remote.port(),
                };
                let counts = if passive {
                    &mut self.passive
                } else {
                    &mut self.active
                };
                counts.end(e);
                if let Some(ep) = was.and_then(|o| o.endpoint) {
                    self.endpoints.entry(ep).or_default().end(e);
                }
            }
            return;
        }
        let entry = self.open.entry(r.sock).or_insert_with(|| Open {
            state: t.new,
            since_ns: t.ts_ns,
            owner: r.owner,
            holders: Vec::new(),
            connection: false,
            local: t.local,
            remote: t.remote,
            endpoint: None,
        });
        entry.state = t.new;
        entry.since_ns = t.ts_ns;
        if r.owner.is_some() {
            // Rows after a holders note carry its owner already.
            entry.owner = r.owner;
            entry.holders.clear();
        }
        entry.local = t.local;
        entry.remote = t.remote;
    }

    fn record_dwell(&mut self, state: State, ns: u64) {
        let h = self.dwell.entry(state).or_insert_with(|| {
            Histogram::new_with_bounds(1, 24 * 3600 * 1_000_000, 3).expect("valid bounds")
        });
        h.saturating_record((ns / 1000).max(1));
    }

    /// The report as a serializable value.
    pub fn report(&self, top: usize) -> Report {
        let wall = |ns: u64| {
            self.headers.first().map(|h| {
                let w = h.clock().wall_ns(ns);
                chrono::DateTime::<chrono::Utc>::from_timestamp_nanos(w)
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            })
        };
        let span_s = self
            .first_ns
            .map_or(0.0, |f| (self.last_ns - f) as f64 / 1e9);
        let clean = !self.stats.is_empty();
        // Ages count to the end of the recording: its stop when it says,
        // else its last transition.
        let end_ns = match (self.headers.first(), self.stats.last()) {
            (Some(h), Some(s)) => self.last_ns.max(h.start_ns + (s.duration_s * 1e9) as u64),
            _ => self.last_ns,
        };
        let mut open: Vec<&Open> = self
            .open
            .iter()
            .filter(|(sock, _)| !self.ended_unseen.contains(sock))
            .map(|(_, o)| o)
            .collect();
        open.sort_by_key(|o| (concern(o.state), o.since_ns));
        // Connections still open count for who holds them at the end.
        let mut tallies = self.processes.clone();
        for o in open.iter().filter(|o| o.connection) {
            if let Some(owner) = o.owner {
                let p = tallies.entry(owner.pid).or_default();
                p.connections += 1;
                if p.comm.is_empty() {
                    p.comm = owner.comm.as_str().into_owned();
                }
            }
        }
        let mut processes: Vec<(&u32, &ProcessTally)> = tallies.iter().collect();
        processes.sort_by_key(|(pid, p)| (std::cmp::Reverse(p.transitions), **pid));
        let mut ports: Vec<(&String, &Counts)> = self.endpoints.iter().collect();
        ports.sort_by_key(|(k, c)| (std::cmp::Reverse(c.opened), (*k).clone()));
        let mut tw: Vec<(&String, &u64)> = self.time_wait.iter().collect();
        tw.sort_by_key(|(k, n)| (std::cmp::Reverse(**n), (*k).clone()));
        Report {
            host: self.headers.first().map(|h| h.host.clone()),
            kernel: self.headers.first().map(|h| h.kernel.clone()),
            files: self.headers.len(),
            filters: self.headers.first().map(|h| h.filters.clone()),
            first: self.first_ns.and_then(wall),
            last: self.first_ns.and_then(|_| wall(self.last_ns)),
            span_s,
            events: self.events,
            ended_cleanly: clean,
            lost_ring: clean.then(|| self.stats.iter().map(|s| s.lost_ring).sum()),
            lost_output: clean.then(|| self.stats.iter().map(|s| s.lost_output).sum()),
            missed_kernel: clean.then(|| self.stats.iter().map(|s| s.missed_kernel).sum()),
            gaps: clean.then(|| self.stats.iter().map(|s| s.gaps).sum()),
            ended_unseen: self.ended_unseen.len() as u64,
            active: self.active.clone(),
            passive: self.passive.clone(),
            endpoints: ports
                .into_iter()
                .take(top)
                .map(|(k, c)| EndpointRow {
                    endpoint: k.clone(),
                    counts: c.clone(),
                })
                .collect(),
            dwell: self
                .dwell
                .iter()
                .map(|(s, h)| DwellRow {
                    state: *s,
                    count: h.len(),
                    p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
                    p90_ms: h.value_at_quantile(0.9) as f64 / 1000.0,
                    p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
                    max_ms: h.max() as f64 / 1000.0,
                })
                .collect(),
            still_open: open
                .into_iter()
                .filter(|o| o.state != State::LISTEN)
                .map(|o| OpenRow {
                    state: o.state,
                    age_s: end_ns.saturating_sub(o.since_ns) as f64 / 1e9,
                    pid: o.owner.map(|t| t.pid),
                    comm: o.owner.map(|t| t.comm.as_str().into_owned()),
                    holders: if o.holders.is_empty() {
                        o.owner.iter().map(HolderRow::of).collect()
                    } else {
                        o.holders.iter().map(HolderRow::of).collect()
                    },
                    local: o.local.to_string(),
                    remote: o.remote.to_string(),
                    meaning: o.state.meaning(),
                })
                .collect(),
            processes: processes
                .into_iter()
                .take(top)
                .map(|(pid, p)| ProcessRow {
                    pid: *pid,
                    comm: p.comm.clone(),
                    unit: p.cgroup.and_then(crate::cgroup::unit).map(str::to_string),
                    container: p
                        .cgroup
                        .and_then(crate::cgroup::container)
                        .map(str::to_string),
                    transitions: p.transitions,
                    connections: p.connections,
                })
                .collect(),
            time_wait: tw
                .into_iter()
                .take(top)
                .map(|(k, n)| TimeWaitRow {
                    remote: k.clone(),
                    count: *n,
                    per_s: if span_s > 0.0 {
                        *n as f64 / span_s
                    } else {
                        0.0
                    },
                })
                .collect(),
        }
    }
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub host: Option<String>,
    pub kernel: Option<String>,
    pub files: usize,
    pub filters: Option<Spec>,
    pub first: Option<String>,
    pub last: Option<String>,
    pub span_s: f64,
    pub events: u64,
    pub ended_cleanly: bool,
    /// Null when no stats object was found (the recording did not end cleanly).
    pub lost_ring: Option<u64>,
    pub lost_output: Option<u64>,
    pub missed_kernel: Option<u64>,
    /// Sockets whose recorded history skips a state.
    pub gaps: Option<u64>,
    /// Sockets the recording notes as ended unseen (left out of still_open).
    pub ended_unseen: u64,
    pub active: Counts,
    pub passive: Counts,
    pub endpoints: Vec<EndpointRow>,
    pub dwell: Vec<DwellRow>,
    pub still_open: Vec<OpenRow>,
    pub processes: Vec<ProcessRow>,
    pub time_wait: Vec<TimeWaitRow>,
}

#[derive(Serialize, Debug)]
pub struct EndpointRow {
    pub endpoint: String,
    #[serde(flatten)]
    pub counts: Counts,
}

#[derive(Serialize, Debug)]
pub struct DwellRow {
    pub state: State,
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Serialize, Debug)]
pub struct OpenRow {
    pub state: State,
    pub age_s: f64,
    /// The owner: the first of `holders`.
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Every process holding the socket at the end, as `ss -p` saw it
    /// (or the owner its rows gave, when the recording did not say).
    pub holders: Vec<HolderRow>,
    pub local: String,
    pub remote: String,
    pub meaning: &'static str,
}

#[derive(Serialize, Debug)]
pub struct HolderRow {
    pub pid: u32,
    pub comm: String,
}

impl HolderRow {
    fn of(t: &Task) -> HolderRow {
        HolderRow {
            pid: t.pid,
            comm: t.comm.as_str().into_owned(),
        }
    }
}

#[derive(Serialize, Debug)]
pub struct ProcessRow {
    pub pid: u32,
    pub comm: String,
    /// The process's systemd unit and container, from its cgroup.
    pub unit: Option<String>,
    pub container: Option<String>,
    pub transitions: u64,
    pub connections: u64,
}

#[derive(Serialize, Debug)]
pub struct TimeWaitRow {
    pub remote: String,
    pub count: u64,
    pub per_s: f64,
}

impl Report {
    pub fn text(&self) -> String {
        let mut o = String::new();
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let _ = writeln!(o, "Recording");
        let _ = writeln!(
            o,
            "  host            {} (kernel {})",
            dash(&self.host),
            dash(&self.kernel)
        );
        let _ = writeln!(
            o,
            "  span            {} .. {} ({:.3} s, {} file{})",
            dash(&self.first),
            dash(&self.last),
            self.span_s,
            self.files,
            if self.files == 1 { "" } else { "s" }
        );
        let _ = writeln!(o, "  transitions     {}", self.events);
        match (self.lost_ring, self.lost_output, self.missed_kernel) {
            (Some(r), Some(w), Some(m)) => {
                let _ = writeln!(
                    o,
                    "  lost            {r} in the ring buffer, {w} at output, {m} skipped by the kernel"
                );
                if let Some(g) = self.gaps.filter(|&g| g > 0) {
                    let _ = writeln!(
                        o,
                        "  gaps            {g} sockets skipped states: transitions between them never arrived"
                    );
                }
            }
            _ => {
                let _ = writeln!(
                    o,
                    "  lost            unknown: the recording did not end cleanly (no stats object)"
                );
            }
        }
        if self.ended_unseen > 0 {
            let _ = writeln!(
                o,
                "  ended unseen    {} socket{} closed without the kernel reporting how; not listed as open",
                self.ended_unseen,
                if self.ended_unseen == 1 { "" } else { "s" }
            );
        }
        if let Some(f) = &self.filters {
            let _ = writeln!(o, "  filters         {}", f.describe());
        }

        let heads = || COUNT_HEADS.map(String::from);
        o.push('\n');
        count_line(&mut o, "Connections", 18, heads());
        for (name, c) in [
            ("active (connect)", &self.active),
            ("passive (accept)", &self.passive),
        ] {
            count_line(&mut o, name, 18, c.columns().map(|v| v.to_string()));
        }
        if !self.endpoints.is_empty() {
            o.push('\n');
            count_line(&mut o, "By endpoint", 30, heads());
            for e in &self.endpoints {
                count_line(
                    &mut o,
                    &e.endpoint,
                    30,
                    e.counts.columns().map(|v| v.to_string()),
                );
            }
        }

        let _ = writeln!(
            o,
            "\nTime in state (ms)      count        p50        p90        p99        max"
        );
        for d in &self.dwell {
            let _ = writeln!(
                o,
                "  {:<16} {:>10} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
                d.state.to_string(),
                d.count,
                d.p50_ms,
                d.p90_ms,
                d.p99_ms,
                d.max_ms
            );
        }

        let _ = writeln!(o, "\nStill open at the end (worst first)");
        if self.still_open.is_empty() {
            let _ = writeln!(o, "  none");
        }
        for s in &self.still_open {
            let owner = if s.holders.is_empty() {
                "- (owner unknown)".to_string()
            } else {
                s.holders
                    .iter()
                    .map(|h| {
                        let mut esc = String::new();
                        crate::format::escape_comm(&h.comm, &mut esc);
                        format!("{} {esc}", h.pid)
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                o,
                "  {:<11} {:>9.3} s  {:<24} {} -> {}  {}",
                s.state.to_string(),
                s.age_s,
                owner,
                s.local,
                s.remote,
                s.meaning
            );
        }

        let _ = writeln!(o, "\nBusiest processes      transitions  connections  unit");
        for p in &self.processes {
            let mut esc = String::new();
            crate::format::escape_comm(&p.comm, &mut esc);
            let mut unit = String::new();
            match (&p.container, &p.unit) {
                (Some(id), _) => unit = format!("container {}", &id[..12.min(id.len())]),
                (None, Some(u)) => crate::format::escape_comm(u, &mut unit),
                (None, None) => unit.push('-'),
            }
            let _ = writeln!(
                o,
                "  {:>7} {:<15} {:>10}  {:>11}  {unit}",
                p.pid, esc, p.transitions, p.connections
            );
        }
        let _ = writeln!(
            o,
            "\nEntering time-wait, by remote endpoint       count      per s"
        );
        if self.time_wait.is_empty() {
            let _ = writeln!(o, "  none");
        }
        for t in &self.time_wait {
            let _ = writeln!(o, "  {:<42} {:>5} {:>10.3}", t.remote, t.count, t.per_s);
        }
        o
    }
}

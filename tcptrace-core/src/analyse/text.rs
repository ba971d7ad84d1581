//! The report as text: `tcptrace report`'s tables, and the listeners'
//! section alone for the summary a traced command's restart ends with.
//!
//! Only layout lives here; every number comes worked out in the `Report`,
//! so the text, the JSON and the HTML page cannot disagree.

use std::fmt::Write as _;

use super::fold::Counts;
use super::report::{DownRow, ListenPort, ListenerRow, OpenRow, ProcessRow, Report, StateCount};
use crate::model::State;
use crate::output::escape_comm;
use crate::words::plural;

const COUNT_HEADS: [&str; 7] = [
    "opened", "orderly", "rst sent", "rst rcvd", "refused", "aborted", "timewait",
];

impl Counts {
    /// In `COUNT_HEADS`' order.
    fn columns(&self) -> [u64; 7] {
        [
            self.opened,
            self.orderly,
            self.reset_sent,
            self.reset_received,
            self.refused,
            self.aborted,
            self.time_wait,
        ]
    }
}

fn count_line(o: &mut String, label: &str, width: usize, values: [String; 7]) {
    let _ = write!(o, "  {label:<width$}");
    for v in values {
        let _ = write!(o, " {v:>8}");
    }
    o.push('\n');
}

/// The listening ports as text: who listened when, and each window with
/// nothing listening (what clients found during a restart).
pub fn listeners_text(report: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "Listeners (what clients found on each listening port)");
    if report.listeners.is_empty() {
        let _ = writeln!(o, "  none seen");
    }
    for p in &report.listeners {
        port_text(&mut o, p);
    }
    o
}

/// One port: a line of totals, then its listeners and down windows
/// interleaved in time.
fn port_text(o: &mut String, p: &ListenPort) {
    let ns = p.netns.map(|n| format!(" (netns {n})")).unwrap_or_default();
    let _ = writeln!(
        o,
        "  port {}{ns}: {}, {}, {} refused in all",
        p.port,
        plural(p.listeners.len() as u64, "listener", "listeners"),
        match p.down.len() {
            0 => "never down".to_string(),
            1 => "down once".to_string(),
            n => format!("down {n} times"),
        },
        plural(p.refused, "connect", "connects"),
    );
    let mut lines: Vec<(f64, String)> = Vec::new();
    for l in &p.listeners {
        lines.push((l.from_s.unwrap_or(f64::MIN), listening_line(l)));
    }
    for d in &p.down {
        // A window starts as its listener ends: after it in the list.
        lines.push((d.from_s.map_or(f64::MIN, |s| s + 1e-12), down_text(d)));
    }
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (_, l) in lines {
        let _ = writeln!(o, "{l}");
    }
}

fn listening_line(l: &ListenerRow) -> String {
    let first = l
        .first_connection_ms
        .map(|ms| format!(", first {ms:.3} ms after listen"))
        .unwrap_or_default();
    format!(
        "    listening  {} .. {}  {}  {}: {}{first}",
        at(&l.from, l.from_s, "(before)"),
        at(&l.to, l.to_s, "(end)"),
        l.addr,
        who(l.pid, &l.comm),
        plural(l.connections, "connection", "connections"),
    )
}

/// A down window: how long, what it refused and reset, and who listened
/// before and after it (on a line of its own).
fn down_text(d: &DownRow) -> String {
    let mut text = format!(
        "    DOWN       {} .. {}  {:.3} ms, {} refused",
        at(&d.from, d.from_s, "(before)"),
        at(&d.to, d.to_s, "(end)"),
        d.duration_ms,
        plural(d.refused, "connect", "connects"),
    );
    if d.reset_in_queue + d.reset_open > 0 {
        let _ = write!(
            text,
            ", {} reset by the closing listener ({} in its queue, {} accepted)",
            plural(d.reset_in_queue + d.reset_open, "connection", "connections"),
            d.reset_in_queue,
            d.reset_open
        );
    }
    if d.old_pid.is_some() || d.new_pid.is_some() {
        let _ = write!(
            text,
            "\n               {} -> {}",
            if d.from_s.is_some() {
                who(d.old_pid, &d.old_comm)
            } else {
                "-".into()
            },
            if d.to_s.is_some() {
                who(d.new_pid, &d.new_comm)
            } else {
                "nothing (still down at the end)".into()
            }
        );
        if let Some(ms) = d.first_connection_ms {
            let _ = write!(text, ", first connection {ms:.3} ms after the new listen");
        }
    }
    text
}

/// Wall time of day when the recording says, else seconds from its start.
fn at(wall: &Option<String>, s: Option<f64>, none: &str) -> String {
    match (wall, s) {
        (Some(w), _) => w
            .split_once('T')
            .map_or(w.clone(), |(_, t)| t.trim_end_matches('Z').to_string()),
        (None, Some(s)) => format!("+{s:.6} s"),
        (None, None) => none.to_string(),
    }
}

fn who(pid: Option<u32>, comm: &Option<String>) -> String {
    match (pid, comm) {
        (Some(p), Some(c)) => {
            let mut esc = String::new();
            escape_comm(c, &mut esc);
            format!("{p} {esc}")
        }
        _ => "- (owner unknown)".into(),
    }
}

impl Report {
    pub fn text(&self) -> String {
        let mut o = String::new();
        self.recording_text(&mut o);
        // What a restart did to the clients comes first.
        o.push('\n');
        o.push_str(&listeners_text(self));
        self.connections_text(&mut o);
        self.dwell_text(&mut o);
        o.push_str(&self.still_open_text());
        self.held_text(&mut o);
        self.processes_text(&mut o);
        self.time_wait_text(&mut o);
        o
    }

    /// Where and when the recording was made, and what it may have missed.
    fn recording_text(&self, o: &mut String) {
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
            "  span            {} .. {} ({:.3} s, {})",
            dash(&self.first),
            dash(&self.last),
            self.span_s,
            plural(self.files as u64, "file", "files")
        );
        let _ = writeln!(o, "  transitions     {}", self.events);
        self.lost_text(o);
        if self.ended_unseen > 0 {
            let _ = writeln!(
                o,
                "  ended unseen    {} closed without the kernel reporting how; not listed as open",
                plural(self.ended_unseen, "socket", "sockets")
            );
        }
        if let Some(f) = &self.filters {
            let _ = writeln!(o, "  filters         {}", f.describe());
        }
    }

    fn lost_text(&self, o: &mut String) {
        let (Some(r), Some(w), Some(m)) = (self.lost_ring, self.lost_output, self.missed_kernel)
        else {
            let _ = writeln!(
                o,
                "  lost            unknown: the recording did not end cleanly (no stats object)"
            );
            return;
        };
        let _ = writeln!(
            o,
            "  lost            {r} in the ring buffer, {w} at output, {m} skipped by the kernel"
        );
        if let Some(g) = self.gaps.filter(|&g| g > 0) {
            let _ = writeln!(
                o,
                "  gaps            {} skipped states: transitions between them never arrived",
                plural(g, "socket", "sockets")
            );
        }
    }

    /// How connections ended, by side and by service.
    fn connections_text(&self, o: &mut String) {
        let heads = || COUNT_HEADS.map(String::from);
        o.push('\n');
        count_line(o, "Connections", 18, heads());
        for (name, c) in [
            ("active (connect)", &self.active),
            ("passive (accept)", &self.passive),
        ] {
            count_line(o, name, 18, c.columns().map(|v| v.to_string()));
        }
        if !self.endpoints.is_empty() {
            o.push('\n');
            count_line(o, "By service (both sides)", 30, heads());
            for e in &self.endpoints {
                count_line(
                    o,
                    &e.endpoint,
                    30,
                    e.counts.columns().map(|v| v.to_string()),
                );
            }
        }
    }

    fn dwell_text(&self, o: &mut String) {
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
    }

    /// Sockets left at the end, counted; then the worst of those processes
    /// hold, one by one.
    fn still_open_text(&self) -> String {
        let mut o = String::new();
        let s = &self.still_open_summary;
        let _ = writeln!(
            o,
            "\nStill open at the end: {}",
            if s.total == 0 {
                "none".to_string()
            } else {
                plural(s.total, "socket", "sockets")
            }
        );
        for c in &s.by_state {
            let _ = writeln!(o, "  {:<36} {:>8}", state_name(c), c.count);
        }
        if s.not_accepted > 0 {
            let _ = writeln!(
                o,
                "  {} not accepted by the process yet (backlog) at their last transition",
                plural(s.not_accepted, "connection", "connections")
            );
        }
        if s.time_wait_not_followed > 0 {
            let _ = writeln!(
                o,
                "  {} entered time-wait; the recording did not follow the time-wait table (not counted)",
                plural(s.time_wait_not_followed, "connection", "connections")
            );
        }
        if !s.by_service.is_empty() {
            let _ = writeln!(o, "  by service");
            for svc in &s.by_service {
                let states: Vec<String> = svc
                    .by_state
                    .iter()
                    .map(|c| format!("{} {}", c.count, state_name(c)))
                    .collect();
                let _ = writeln!(
                    o,
                    "    {:<30} {:>8}  {}",
                    svc.service,
                    svc.count,
                    states.join(", ")
                );
            }
        }
        if !self.still_open.is_empty() {
            let _ = writeln!(o, "  held by processes (worst first)");
        }
        o
    }

    /// The worst sockets processes hold, then how many more there are.
    fn held_text(&self, o: &mut String) {
        for s in &self.still_open {
            held_line(o, s);
        }
        let held = self
            .still_open_summary
            .total
            .saturating_sub(self.still_open_summary.in_time_wait_table);
        if held > self.still_open.len() as u64 {
            let _ = writeln!(
                o,
                "    ... and {} more",
                plural(held - self.still_open.len() as u64, "socket", "sockets")
            );
        }
    }

    fn processes_text(&self, o: &mut String) {
        let _ = writeln!(o, "\nBusiest processes      transitions  connections  unit");
        for p in &self.processes {
            let mut esc = String::new();
            escape_comm(&p.comm, &mut esc);
            let _ = writeln!(
                o,
                "  {:>7} {:<15} {:>10}  {:>11}  {}",
                p.pid,
                esc,
                p.transitions,
                p.connections,
                unit(p)
            );
        }
    }

    fn time_wait_text(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "\nEntering time-wait, by service               count      per s"
        );
        if self.time_wait.is_empty() {
            let _ = writeln!(o, "  none");
        }
        for t in &self.time_wait {
            let _ = writeln!(o, "  {:<42} {:>5} {:>10.3}", t.service, t.count, t.per_s);
        }
    }
}

/// A state left at the end, saying when it is the time-wait table's.
fn state_name(c: &StateCount) -> String {
    if !c.time_wait_table {
        c.state.to_string()
    } else if c.state == State::FIN_WAIT2 {
        "FIN_WAIT2 (orphan, time-wait table)".to_string()
    } else {
        format!("{} (time-wait table)", c.state)
    }
}

/// A socket left open: its state, age, holders, addresses and meaning.
fn held_line(o: &mut String, s: &OpenRow) {
    let owner = if s.holders.is_empty() {
        "- (owner unknown)".to_string()
    } else {
        s.holders
            .iter()
            .map(|h| {
                let mut esc = String::new();
                escape_comm(&h.comm, &mut esc);
                format!("{} {esc}", h.pid)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        o,
        "    {:<11} {:>9.3} s  {:<24} {} -> {}  {}",
        s.state.to_string(),
        s.age_s,
        owner,
        s.local,
        s.remote,
        s.meaning
    );
}

/// A process's container (by name when known) or systemd unit.
fn unit(p: &ProcessRow) -> String {
    let mut unit = String::new();
    match (&p.container, &p.unit) {
        (Some(_), _) if p.container_name.is_some() => {
            unit.push_str("container ");
            escape_comm(p.container_name.as_deref().unwrap_or(""), &mut unit);
        }
        (Some(id), _) => unit = format!("container {}", &id[..12.min(id.len())]),
        (None, Some(u)) => escape_comm(u, &mut unit),
        (None, None) => unit.push('-'),
    }
    unit
}

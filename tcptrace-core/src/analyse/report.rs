//! The report: what the fold kept, turned into plain serializable values.
//!
//! `tcptrace report --format json` prints these types as they are, and the
//! text and HTML renderings read them, so every number is worked out once,
//! here: ages to the recording's end, wall times from its header, the
//! worst sockets first, the "top" tables cut to size.

use std::collections::BTreeMap;

use serde::Serialize;

use super::fold::{
    Analysis, Counts, Open, ProcessTally, TIME_WAIT_SUBSTATE_NS, Window, dwell_histogram,
};
use crate::model::{Spec, State, Stats, Task};

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
    /// Every socket left at the end, counted: `still_open` lists only the
    /// worst of those processes hold.
    pub still_open_summary: StillOpen,
    /// Each local port something listened on: its listeners and the
    /// windows with nothing listening.
    pub listeners: Vec<ListenPort>,
    /// Monotonic times of the first row and of the end, for pictures.
    #[serde(skip)]
    pub first_ns: u64,
    #[serde(skip)]
    pub end_ns: u64,
}

#[derive(Serialize, Debug, Default)]
pub struct StillOpen {
    /// Sockets left at the end, those in the time-wait table included.
    pub total: u64,
    /// Of them, connections in the kernel's time-wait table (their sockets
    /// closed; TIME_WAIT, or FIN_WAIT2 orphans waiting for the peer's FIN).
    pub in_time_wait_table: u64,
    /// Of them, connections waiting in a listener's queue at their last
    /// transition (not accepted by the process yet, as far as rows tell).
    pub not_accepted: u64,
    /// Worst first.
    pub by_state: Vec<StateCount>,
    /// Most first (at most `top`).
    pub by_service: Vec<ServiceOpen>,
    /// Connections that entered time-wait in a recording that did not
    /// follow the time-wait table (`--no-timewait`): not counted, their end
    /// unknown.
    pub time_wait_not_followed: u64,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StateCount {
    pub state: State,
    /// In the kernel's time-wait table rather than a socket a process holds.
    pub time_wait_table: bool,
    pub count: u64,
}

#[derive(Serialize, Debug)]
pub struct ServiceOpen {
    pub service: String,
    pub count: u64,
    pub by_state: Vec<StateCount>,
}

#[derive(Serialize, Debug)]
pub struct ListenPort {
    pub port: u16,
    /// The network namespace's inode; null when not known.
    pub netns: Option<u32>,
    /// Connects refused on this port in all.
    pub refused: u64,
    pub listeners: Vec<ListenerRow>,
    /// Windows with nothing listening on the port, in time order.
    pub down: Vec<DownRow>,
}

#[derive(Serialize, Debug)]
pub struct ListenerRow {
    pub addr: String,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Null: listening before the recording began.
    pub from: Option<String>,
    /// Seconds from the recording's first row.
    pub from_s: Option<f64>,
    /// Null: still listening at the end.
    pub to: Option<String>,
    pub to_s: Option<f64>,
    /// Connections that completed the handshake on it.
    pub connections: u64,
    /// From listen() to the first connection's handshake completing.
    pub first_connection_ms: Option<f64>,
    /// Children reset within a second after it closed: waiting in its
    /// queue, and accepted.
    pub reset_in_queue: u64,
    pub reset_open: u64,
    #[serde(skip)]
    pub from_ns: Option<u64>,
    #[serde(skip)]
    pub to_ns: Option<u64>,
}

#[derive(Serialize, Debug)]
pub struct DownRow {
    /// Null: nothing listened from before the recording (connects were
    /// refused before the first listener came).
    pub from: Option<String>,
    pub from_s: Option<f64>,
    /// Null: still down at the end.
    pub to: Option<String>,
    pub to_s: Option<f64>,
    /// To the end of the recording when still down.
    pub duration_ms: f64,
    /// Connects refused in the window.
    pub refused: u64,
    /// Connections the closing listener reset (in its queue, accepted).
    pub reset_in_queue: u64,
    pub reset_open: u64,
    pub old_pid: Option<u32>,
    pub old_comm: Option<String>,
    pub new_pid: Option<u32>,
    pub new_comm: Option<String>,
    /// From the new listener's listen() to its first connection.
    pub first_connection_ms: Option<f64>,
    #[serde(skip)]
    pub start_ns: Option<u64>,
    #[serde(skip)]
    pub end_ns: Option<u64>,
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
    /// Waiting in its listener's queue at its last transition: no process
    /// had accepted it then.
    pub queued: bool,
    pub meaning: String,
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
    /// Its name, where the runtime's state on this host tells.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    pub transitions: u64,
    pub connections: u64,
}

#[derive(Serialize, Debug)]
pub struct TimeWaitRow {
    /// The service endpoint (listening side's address:port).
    pub service: String,
    pub count: u64,
    pub per_s: f64,
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

/// Sockets left at the end by (worst first, state, in the time-wait table).
type ByState = BTreeMap<(u8, State, bool), u64>;

fn state_counts(m: &ByState) -> Vec<StateCount> {
    m.iter()
        .map(|(&(_, state, time_wait_table), &count)| StateCount {
            state,
            time_wait_table,
            count,
        })
        .collect()
}

impl Analysis {
    /// The report as a serializable value.
    pub fn report(&self, top: usize) -> Report {
        let span_s = self
            .first_ns
            .map_or(0.0, |f| (self.last_ns - f) as f64 / 1e9);
        let clean = !self.stats.is_empty();
        let end_ns = self.end_ns();
        let open = self.left_open();
        let first_ns = self.first_ns.unwrap_or(0);
        let stat = |f: fn(&Stats) -> u64| clean.then(|| self.stats.iter().map(f).sum());
        Report {
            first_ns,
            end_ns,
            listeners: self.listener_report(first_ns, end_ns),
            still_open_summary: self.still_open_summary(&open, top, end_ns),
            host: self.headers.first().map(|h| h.host.clone()),
            kernel: self.headers.first().map(|h| h.kernel.clone()),
            files: self.headers.len(),
            filters: self.headers.first().map(|h| h.filters.clone()),
            first: self.first_ns.and_then(|ns| self.wall(ns)),
            last: self.first_ns.and_then(|_| self.wall(self.last_ns)),
            span_s,
            events: self.events,
            ended_cleanly: clean,
            lost_ring: stat(|s| s.lost_ring),
            lost_output: stat(|s| s.lost_output),
            missed_kernel: stat(|s| s.missed_kernel),
            gaps: stat(|s| s.gaps),
            ended_unseen: self.ended_unseen.len() as u64,
            active: self.active.clone(),
            passive: self.passive.clone(),
            endpoints: self.endpoint_rows(top),
            dwell: self.dwell_rows(),
            processes: self.process_rows(&open, top),
            still_open: open
                .into_iter()
                .filter(|o| o.state != State::LISTEN)
                .take(top)
                .map(|o| OpenRow::of(o, end_ns))
                .collect(),
            time_wait: self.time_wait_rows(top, span_s),
        }
    }

    /// Wall time of a monotonic time, when the recording's header tells.
    fn wall(&self, ns: u64) -> Option<String> {
        self.headers.first().map(|h| {
            let w = h.clock().wall_ns(ns);
            chrono::DateTime::<chrono::Utc>::from_timestamp_nanos(w)
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        })
    }

    /// Ages count to the end of the recording: its stop when it says,
    /// else its last transition.
    fn end_ns(&self) -> u64 {
        match (self.headers.first(), self.stats.last()) {
            (Some(h), Some(s)) => self.last_ns.max(h.start_ns + (s.duration_s * 1e9) as u64),
            _ => self.last_ns,
        }
    }

    /// Sockets open at the end, worst first, longest in that state first.
    fn left_open(&self) -> Vec<&Open> {
        let mut open: Vec<&Open> = self
            .open
            .iter()
            .filter(|(sock, _)| !self.ended_unseen.contains(sock))
            .map(|(_, o)| o)
            .collect();
        open.sort_by_key(|o| (concern(o.state), o.since_ns));
        open
    }

    /// The busiest processes by transitions.
    fn process_rows(&self, open: &[&Open], top: usize) -> Vec<ProcessRow> {
        let mut names = crate::cgroup::ContainerNames::default();
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
        processes
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
                container_name: p.cgroup.and_then(|c| names.of(c)).map(str::to_string),
                transitions: p.transitions,
                connections: p.connections,
            })
            .collect()
    }

    /// The services with the most connections opened.
    fn endpoint_rows(&self, top: usize) -> Vec<EndpointRow> {
        let mut ports: Vec<(&String, &Counts)> = self.endpoints.iter().collect();
        ports.sort_by_key(|(k, c)| (std::cmp::Reverse(c.opened), (*k).clone()));
        ports
            .into_iter()
            .take(top)
            .map(|(k, c)| EndpointRow {
                endpoint: k.clone(),
                counts: c.clone(),
            })
            .collect()
    }

    fn dwell_rows(&self) -> Vec<DwellRow> {
        // Connections still waiting for a time-wait row count with the
        // tracepoint's time in FIN_WAIT2.
        let mut dwell = self.dwell.clone();
        for ns in self.fin_wait2.waiting() {
            dwell
                .entry(State::FIN_WAIT2)
                .or_insert_with(dwell_histogram)
                .saturating_record((ns / 1000).max(1));
        }
        dwell
            .iter()
            .map(|(s, h)| DwellRow {
                state: *s,
                count: h.len(),
                p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
                p90_ms: h.value_at_quantile(0.9) as f64 / 1000.0,
                p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
                max_ms: h.max() as f64 / 1000.0,
            })
            .collect()
    }

    /// The services entering time-wait most.
    fn time_wait_rows(&self, top: usize, span_s: f64) -> Vec<TimeWaitRow> {
        let mut tw: Vec<(&String, &u64)> = self.time_wait.iter().collect();
        tw.sort_by_key(|(k, n)| (std::cmp::Reverse(**n), (*k).clone()));
        tw.into_iter()
            .take(top)
            .map(|(k, n)| TimeWaitRow {
                service: k.clone(),
                count: *n,
                per_s: if span_s > 0.0 {
                    *n as f64 / span_s
                } else {
                    0.0
                },
            })
            .collect()
    }

    /// Sockets left at the end, counted by state and service.
    fn still_open_summary(&self, open: &[&Open], top: usize, end_ns: u64) -> StillOpen {
        let mut summary = StillOpen::default();
        let mut states = ByState::new();
        let mut services: BTreeMap<&str, ByState> = BTreeMap::new();
        let held = open
            .iter()
            .filter(|o| o.state != State::LISTEN)
            .map(|o| (o.state, false, o.service.as_str(), o.queued));
        let followed = self.followed_time_wait;
        // Followed, a connection leaves its substate with a row; without
        // one for longer than a substate lasts, the tracer lost it.
        let in_table = self.in_time_wait.iter().filter(|(sock, w)| {
            !self.ended_unseen.contains(sock)
                && end_ns.saturating_sub(w.since_ns)
                    <= if followed {
                        TIME_WAIT_SUBSTATE_NS
                    } else {
                        2 * TIME_WAIT_SUBSTATE_NS
                    }
        });
        let tw = in_table
            .clone()
            .filter(|_| followed)
            .map(|(_, w)| (w.state, true, w.service.as_str(), false));
        for (state, in_table, service, queued) in held.chain(tw) {
            summary.total += 1;
            summary.in_time_wait_table += u64::from(in_table);
            summary.not_accepted += u64::from(queued);
            // Sockets processes hold before the time-wait table's.
            let key = (concern(state) + u8::from(in_table) * 8, state, in_table);
            *states.entry(key).or_default() += 1;
            *services.entry(service).or_default().entry(key).or_default() += 1;
        }
        if !followed {
            summary.time_wait_not_followed = in_table.count() as u64;
        }
        summary.by_state = state_counts(&states);
        summary.by_service = by_service(&services, top);
        summary
    }

    /// The listening ports: each listener's life and each window with
    /// nothing listening.
    fn listener_report(&self, first_ns: u64, end_ns: u64) -> Vec<ListenPort> {
        self.ports
            .iter()
            .filter(|(_, p)| !p.lives.is_empty())
            .map(|(&(netns, port), p)| ListenPort {
                port,
                netns: (netns != 0).then_some(netns),
                refused: p.refused,
                listeners: p
                    .lives
                    .iter()
                    .map(|&i| self.listener_row(i, first_ns))
                    .collect(),
                down: p
                    .windows
                    .iter()
                    .map(|w| self.down_row(w, first_ns, end_ns))
                    .collect(),
            })
            .collect()
    }

    /// Listener `i`'s life.
    fn listener_row(&self, i: usize, first_ns: u64) -> ListenerRow {
        let rel = |ns: u64| seconds_from(first_ns, ns);
        let l = &self.listeners[i];
        let (pid, comm) = self.listener_owner(Some(i));
        ListenerRow {
            addr: l.addr.to_string(),
            pid,
            comm,
            from: l.from_ns.and_then(|ns| self.wall(ns)),
            from_s: l.from_ns.map(rel),
            to: l.to_ns.and_then(|ns| self.wall(ns)),
            to_s: l.to_ns.map(rel),
            connections: l.connections,
            first_connection_ms: self.first_connection_ms(Some(i)),
            reset_in_queue: l.reset_queued,
            reset_open: l.reset_open,
            from_ns: l.from_ns,
            to_ns: l.to_ns,
        }
    }

    /// A window with nothing listening, with the listeners on either side.
    fn down_row(&self, w: &Window, first_ns: u64, end_ns: u64) -> DownRow {
        let rel = |ns: u64| seconds_from(first_ns, ns);
        let (old_pid, old_comm) = self.listener_owner(w.old);
        let (new_pid, new_comm) = self.listener_owner(w.new);
        let (reset_in_queue, reset_open) = w
            .old
            .map(|i| &self.listeners[i])
            .map_or((0, 0), |l| (l.reset_queued, l.reset_open));
        DownRow {
            from: w.start_ns.and_then(|ns| self.wall(ns)),
            from_s: w.start_ns.map(rel),
            to: w.end_ns.and_then(|ns| self.wall(ns)),
            to_s: w.end_ns.map(rel),
            duration_ms: ms(w
                .end_ns
                .unwrap_or(end_ns)
                .saturating_sub(w.start_ns.unwrap_or(first_ns))),
            refused: w.refused,
            reset_in_queue,
            reset_open,
            old_pid,
            old_comm,
            new_pid,
            new_comm,
            first_connection_ms: self.first_connection_ms(w.new),
            start_ns: w.start_ns,
            end_ns: w.end_ns,
        }
    }

    /// Listener `i`'s owner's pid and command, when known.
    fn listener_owner(&self, i: Option<usize>) -> (Option<u32>, Option<String>) {
        i.and_then(|i| self.listeners[i].owner)
            .map(|t| (t.pid, t.comm.as_str().into_owned()))
            .unzip()
    }

    /// From listener `i`'s listen() to its first child's handshake.
    fn first_connection_ms(&self, i: Option<usize>) -> Option<f64> {
        let l = &self.listeners[i?];
        Some(ms(l.first_ns?.saturating_sub(l.from_ns?)))
    }
}

/// The services with the most sockets left, at most `top`.
fn by_service(services: &BTreeMap<&str, ByState>, top: usize) -> Vec<ServiceOpen> {
    let mut by_service: Vec<ServiceOpen> = services
        .iter()
        .map(|(service, m)| ServiceOpen {
            service: (*service).to_string(),
            count: m.values().sum(),
            by_state: state_counts(m),
        })
        .collect();
    by_service.sort_by(|a, b| b.count.cmp(&a.count).then(a.service.cmp(&b.service)));
    by_service.truncate(top);
    by_service
}

fn seconds_from(first_ns: u64, ns: u64) -> f64 {
    ns.saturating_sub(first_ns) as f64 / 1e9
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl OpenRow {
    /// A socket left open, aged to `end_ns`.
    fn of(o: &Open, end_ns: u64) -> OpenRow {
        OpenRow {
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
            queued: o.queued,
            meaning: if o.queued {
                // Accepting makes no transition: one accepted after
                // its last row still reads as queued.
                format!(
                    "not accepted by the process yet (backlog) at its last transition; \
                     if accepted since: {}",
                    o.state.meaning()
                )
            } else {
                o.state.meaning().to_string()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::analyse::scenario::{analyse, row};
    use crate::model::State;

    #[test]
    fn a_connection_left_in_the_queue_reads_as_backlog_until_someone_holds_it() {
        let rows = [
            row(1, 0, "CLOSE", "LISTEN", ""),
            row(2, 10, "LISTEN", "SYN_RECV", r#","queued":true"#),
            row(2, 11, "SYN_RECV", "ESTABLISHED", r#","queued":true"#),
            row(2, 12, "ESTABLISHED", "CLOSE_WAIT", r#","queued":true"#),
        ];
        let r = analyse(&rows);
        assert_eq!(r.still_open.len(), 1);
        assert!(
            r.still_open[0]
                .meaning
                .starts_with("not accepted by the process yet (backlog)"),
            "{}",
            r.still_open[0].meaning
        );
        assert_eq!(r.still_open_summary.not_accepted, 1);
        let text = r.text();
        assert!(text.contains("Still open at the end: 1 socket\n"), "{text}");
        // Someone holds it: accepted (a queued socket has no descriptor).
        let mut held = rows.to_vec();
        held.push(
            r#"{"type":"holders","ts_ns":13000000,"sock":2,"holders":[{"pid":8,"comm":"worker"}]}"#
                .into(),
        );
        let r = analyse(&held);
        assert!(r.still_open[0].meaning.contains("often a descriptor leak"));
        assert_eq!(r.still_open_summary.not_accepted, 0);
    }

    #[test]
    fn connections_in_the_time_wait_table_are_still_open_when_it_was_followed() {
        let tw = r#","origin":"timewait""#;
        let closed = |sock| row(sock, 10, "FIN_WAIT2", "CLOSE", "");
        let rows = [
            // An orphan: the peer never sends its FIN.
            closed(2),
            closed(3),
            row(3, 300, "FIN_WAIT2", "TIME_WAIT", tw),
            closed(4),
            row(4, 300, "FIN_WAIT2", "TIME_WAIT", tw),
            row(4, 900, "TIME_WAIT", "CLOSE", tw),
        ];
        let r = analyse(&rows);
        let s = &r.still_open_summary;
        assert_eq!((s.total, s.in_time_wait_table), (2, 2));
        let states: Vec<(State, bool, u64)> = s
            .by_state
            .iter()
            .map(|c| (c.state, c.time_wait_table, c.count))
            .collect();
        assert_eq!(
            states,
            [(State::FIN_WAIT2, true, 1), (State::TIME_WAIT, true, 1)]
        );
        assert_eq!(s.by_service.len(), 1, "one service: {:?}", s.by_service);
        assert_eq!(s.by_service[0].service, "127.0.0.1:80");
        assert!(r.still_open.is_empty(), "no process holds them");
        // Without a row from the table, nothing says what became of them.
        let r = analyse(&[closed(2)]);
        assert_eq!(r.still_open_summary.total, 0);
        assert_eq!(r.still_open_summary.time_wait_not_followed, 1);
    }
}

//! Analyse: turn a recording into an incident report.
//!
//! One pass, streaming: per-socket state lives only while the socket is
//! open, and time-in-state distributions are histograms, so memory follows
//! the number of sockets open at once, not the length of the recording.

pub mod html;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::fasthash::{FastMap, FastSet};
use crate::model::Item;
use crate::model::Spec;
use crate::model::State;
use crate::model::Task;
use crate::model::{Close, Origin, Row};
use crate::model::{Header, Stats};

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
    /// Opened by accept (true) or connect (false); None when opened before
    /// the recording.
    passive: Option<bool>,
    /// The service endpoint it counts for (see `Analysis::service`).
    service: String,
    /// Waiting in its listener's queue at its last transition (no process
    /// had accepted it then; rows do not say when it is accepted).
    queued: bool,
}

/// A connection in the kernel's time-wait table, after its socket closed.
#[derive(Debug)]
struct TimeWaitSock {
    /// Its substate: FIN_WAIT2 (waiting for the peer's FIN) or TIME_WAIT.
    state: State,
    /// When it entered that substate.
    since_ns: u64,
    service: String,
}

/// The longest a connection stays in one time-wait substate: TIME_WAIT is
/// 60 s (TCP_TIMEWAIT_LEN), and the kernel hands a FIN_WAIT2 orphan to the
/// time-wait table only for a tcp_fin_timeout of at most that. The tracer
/// reads the table every 250 ms or more: a little slack.
const TIME_WAIT_SUBSTATE_NS: u64 = 62_000_000_000;

/// The restart window after the listener closes in which the children it
/// resets count as reset by that close: the kernel resets queued children
/// inside the close itself, and a process that exits closes its accepted
/// connections right after its listener.
const CLOSE_RESETS_WITHIN_NS: u64 = 1_000_000_000;

/// One listening socket's life.
#[derive(Debug)]
struct Listener {
    addr: SocketAddr,
    owner: Option<Task>,
    /// None: listening before the recording began (a snapshot row).
    from_ns: Option<u64>,
    to_ns: Option<u64>,
    /// The first child to complete its handshake.
    first_ns: Option<u64>,
    connections: u64,
    reset_queued: u64,
    reset_open: u64,
}

/// A local port that something listened on.
#[derive(Debug, Default)]
struct PortTrack {
    /// Indices into `Analysis::listeners`.
    lives: Vec<usize>,
    /// Listeners up now.
    up: u32,
    windows: Vec<Window>,
    refused: u64,
}

/// A time with nothing listening on a port.
#[derive(Debug)]
struct Window {
    /// None: down since before the recording (refused before any listener).
    start_ns: Option<u64>,
    end_ns: Option<u64>,
    refused: u64,
    old: Option<usize>,
    new: Option<usize>,
}

#[derive(Default, Debug, Clone, Serialize)]
pub struct Counts {
    pub opened: u64,
    pub orderly: u64,
    pub reset_sent: u64,
    pub reset_received: u64,
    pub refused: u64,
    pub aborted: u64,
    /// Connections handed to the kernel's time-wait table (our side closed
    /// first).
    pub time_wait: u64,
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

const COUNT_HEADS: [&str; 7] = [
    "opened", "orderly", "rst sent", "rst rcvd", "refused", "aborted", "timewait",
];

fn count_line(o: &mut String, label: &str, width: usize, values: [String; 7]) {
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
    /// Service endpoint ("127.0.0.1:6389": the listening side's address)
    /// -> counts of both sides' sockets.
    endpoints: BTreeMap<String, Counts>,
    dwell: BTreeMap<State, Histogram<u64>>,
    open: FastMap<u64, Open>,
    /// Sockets whose end the kernel never reported (gap notes): not open,
    /// whatever order their rows and notes come in.
    ended_unseen: FastSet<u64>,
    processes: FastMap<u32, ProcessTally>,
    time_wait: BTreeMap<String, u64>,
    /// Connections in the kernel's time-wait table, by socket id.
    in_time_wait: FastMap<u64, TimeWaitSock>,
    /// Whether the recording followed the time-wait table (it has rows
    /// from it).
    followed_time_wait: bool,
    /// When `in_time_wait` is next rid of connections surely gone.
    prune_time_wait_ns: u64,
    listeners: Vec<Listener>,
    /// Listening sockets now up -> index in `listeners`.
    listening: FastMap<u64, usize>,
    /// Children (accepted or queued) -> their listener's index.
    child_of: FastMap<u64, usize>,
    /// (netns, port) of everything that listened, or was refused.
    ports: BTreeMap<(u32, u16), PortTrack>,
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
            in_time_wait: FastMap::default(),
            followed_time_wait: false,
            prune_time_wait_ns: 0,
            listeners: Vec::new(),
            listening: FastMap::default(),
            child_of: FastMap::default(),
            ports: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, item: Item) {
        match item {
            Item::Header(h) => self.headers.push(*h),
            Item::Stats(s) => self.stats.push(s),
            Item::Row(r) => self.row(&r),
            Item::Gap(g) => {
                self.ended_unseen.insert(g.sock);
            }
            Item::Holders(h) => {
                if let Some(open) = self.open.get_mut(&h.sock) {
                    open.holders = h.tasks();
                    open.owner = open.holders.first().copied().or(open.owner);
                    // A socket in the accept queue has no descriptor: one
                    // that processes hold was accepted.
                    if !open.holders.is_empty() {
                        open.queued = false;
                    }
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
        if t.ts_ns >= self.prune_time_wait_ns {
            // Memory follows the kernel's table: a connection whose two
            // substates have both run out is gone, followed or not.
            let now = t.ts_ns;
            self.in_time_wait
                .retain(|_, w| now.saturating_sub(w.since_ns) <= 2 * TIME_WAIT_SUBSTATE_NS);
            self.prune_time_wait_ns = now + 10_000_000_000;
        }
        if r.origin == Origin::TimeWait {
            self.followed_time_wait = true;
            // After the socket's CLOSE: only the time spent in TIME_WAIT is
            // new (FIN_WAIT2 was counted from the tracepoint).
            if let (Some(ns), State::TIME_WAIT) = (r.dwell_ns, t.old) {
                self.record_dwell(t.old, ns);
            }
            // A time-wait socket the snapshot found was open until now.
            let snapshot = self.open.remove(&r.sock);
            if t.new == State::CLOSE {
                self.in_time_wait.remove(&r.sock);
            } else {
                let service = match (self.in_time_wait.remove(&r.sock), snapshot) {
                    (Some(w), _) => w.service,
                    (None, Some(o)) => o.service,
                    (None, None) => self.service(t.netns, t.local, t.remote, None),
                };
                self.in_time_wait.insert(
                    r.sock,
                    TimeWaitSock {
                        state: t.new,
                        since_ns: t.ts_ns,
                        service,
                    },
                );
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
        if t.new == State::LISTEN {
            self.listen(r);
        }
        if t.old == State::SYN_SENT && r.close == Some(Close::Refused) {
            self.refused(t.netns, t.remote);
        }
        if r.origin == Origin::Snapshot && t.new == State::TIME_WAIT {
            let service = self.service(t.netns, t.local, t.remote, None);
            self.in_time_wait.insert(
                r.sock,
                TimeWaitSock {
                    state: t.new,
                    since_ns: t.ts_ns,
                    service,
                },
            );
            return;
        }

        let opened = match (t.old, t.new) {
            (State::CLOSE, State::SYN_SENT) => Some(false),
            (State::LISTEN, State::SYN_RECV) => Some(true),
            _ => None,
        };
        if let Some(passive) = opened {
            if let (true, Some(&l)) = (passive, self.listener_for(t.netns, t.local)) {
                self.child_of.insert(r.sock, l);
            }
            let service = self.service(t.netns, t.local, t.remote, Some(passive));
            let counts = if passive {
                &mut self.passive
            } else {
                &mut self.active
            };
            counts.opened += 1;
            self.endpoints.entry(service.clone()).or_default().opened += 1;
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
                    passive: Some(passive),
                    service,
                    queued: r.queued,
                },
            );
            return;
        }
        if let ((State::SYN_RECV, State::ESTABLISHED), Some(&l)) =
            ((t.old, t.new), self.child_of.get(&r.sock))
        {
            let l = &mut self.listeners[l];
            l.connections += 1;
            l.first_ns.get_or_insert(t.ts_ns);
        }

        if t.new == State::CLOSE {
            if t.old == State::LISTEN {
                self.unlisten(r);
            }
            let was = self.open.remove(&r.sock);
            if let Some(o) = was.as_ref().filter(|o| o.connection) {
                self.count_connection(r.owner.or(o.owner));
            }
            let service = match &was {
                Some(o) => o.service.clone(),
                None => self.service(t.netns, t.local, t.remote, None),
            };
            // The side is known from how the socket was opened; a socket
            // opened before the recording counts by its ports.
            let passive = was
                .as_ref()
                .and_then(|o| o.passive)
                .unwrap_or_else(|| service == t.local.to_string());
            let child_of = self.child_of.remove(&r.sock);
            if let Some(e) = ending(r) {
                let counts = if passive {
                    &mut self.passive
                } else {
                    &mut self.active
                };
                counts.end(e);
                if t.old != State::LISTEN {
                    self.endpoints.entry(service.clone()).or_default().end(e);
                }
                if let (Some(l), Ending::ResetSent | Ending::Aborted) = (child_of, e) {
                    let l = &mut self.listeners[l];
                    if l.to_ns
                        .is_some_and(|to| t.ts_ns.saturating_sub(to) <= CLOSE_RESETS_WITHIN_NS)
                    {
                        if r.queued {
                            l.reset_queued += 1;
                        } else {
                            l.reset_open += 1;
                        }
                    }
                }
            }
            if enters_time_wait(t.old, t.new) && r.close.is_none() {
                let counts = if passive {
                    &mut self.passive
                } else {
                    &mut self.active
                };
                counts.time_wait += 1;
                self.endpoints.entry(service.clone()).or_default().time_wait += 1;
                *self.time_wait.entry(service.clone()).or_default() += 1;
            }
            // As the tracer follows it (timewait.rs): the connection lives
            // on in the time-wait table.
            if r.close.is_none()
                && matches!(t.old, State::FIN_WAIT2 | State::CLOSING | State::FIN_WAIT1)
            {
                self.in_time_wait.insert(
                    r.sock,
                    TimeWaitSock {
                        state: if t.old == State::CLOSING {
                            State::TIME_WAIT
                        } else {
                            State::FIN_WAIT2
                        },
                        since_ns: t.ts_ns,
                        service,
                    },
                );
            }
            return;
        }
        // A socket first seen mid-life (opened before the recording).
        let service = (!self.open.contains_key(&r.sock))
            .then(|| self.service(t.netns, t.local, t.remote, None));
        let entry = self.open.entry(r.sock).or_insert_with(|| Open {
            state: t.new,
            since_ns: t.ts_ns,
            owner: r.owner,
            holders: Vec::new(),
            connection: false,
            local: t.local,
            remote: t.remote,
            passive: None,
            service: service.unwrap_or_default(),
            queued: r.queued,
        });
        entry.state = t.new;
        entry.since_ns = t.ts_ns;
        entry.queued = r.queued;
        if r.owner.is_some() {
            // Rows after a holders note carry its owner already.
            entry.owner = r.owner;
            entry.holders.clear();
        }
        entry.local = t.local;
        entry.remote = t.remote;
    }

    /// The endpoint a socket counts for: the listening side's address and
    /// port, whichever side this socket is. Client ephemeral ports would
    /// give one row per connection.
    fn service(
        &self,
        netns: u32,
        local: SocketAddr,
        remote: SocketAddr,
        passive: Option<bool>,
    ) -> String {
        let local_serves = match passive {
            Some(p) => p,
            None => {
                self.ports
                    .get(&(netns, local.port()))
                    .is_some_and(|p| !p.lives.is_empty())
                    || (!self.ports.contains_key(&(netns, remote.port()))
                        && local.port() < remote.port())
            }
        };
        if local_serves { local } else { remote }.to_string()
    }

    /// The listener now up whose children have local address `local`.
    fn listener_for(&self, netns: u32, local: SocketAddr) -> Option<&usize> {
        let port = self.ports.get(&(netns, local.port()))?;
        let up = || {
            port.lives
                .iter()
                .filter(|&&l| self.listeners[l].to_ns.is_none())
        };
        up().find(|&&l| self.listeners[l].addr.ip() == local.ip())
            .or_else(|| up().find(|&&l| self.listeners[l].addr.ip().is_unspecified()))
            .or_else(|| up().next())
    }

    fn listen(&mut self, r: &Row) {
        let t = &r.t;
        let from_ns = (r.origin == Origin::Tracepoint).then_some(t.ts_ns);
        if self.listening.contains_key(&r.sock) {
            return;
        }
        let i = self.listeners.len();
        self.listeners.push(Listener {
            addr: t.local,
            owner: r.owner,
            from_ns,
            to_ns: None,
            first_ns: None,
            connections: 0,
            reset_queued: 0,
            reset_open: 0,
        });
        self.listening.insert(r.sock, i);
        let port = self.ports.entry((t.netns, t.local.port())).or_default();
        port.lives.push(i);
        port.up += 1;
        if let Some(w) = port.windows.last_mut().filter(|w| w.end_ns.is_none()) {
            w.end_ns = Some(t.ts_ns);
            w.new = Some(i);
        }
    }

    fn unlisten(&mut self, r: &Row) {
        let t = &r.t;
        let i = match self.listening.remove(&r.sock) {
            Some(i) => i,
            None => {
                // Listening since before the recording, which had no
                // snapshot: its close is the first we see of it.
                let i = self.listeners.len();
                self.listeners.push(Listener {
                    addr: t.local,
                    owner: r.owner,
                    from_ns: None,
                    to_ns: None,
                    first_ns: None,
                    connections: 0,
                    reset_queued: 0,
                    reset_open: 0,
                });
                let port = self.ports.entry((t.netns, t.local.port())).or_default();
                port.lives.push(i);
                port.up += 1;
                i
            }
        };
        let l = &mut self.listeners[i];
        l.to_ns = Some(t.ts_ns);
        if l.owner.is_none() {
            l.owner = r.owner;
        }
        let port = self.ports.entry((t.netns, l.addr.port())).or_default();
        port.up = port.up.saturating_sub(1);
        if port.up == 0 {
            port.windows.push(Window {
                start_ns: Some(t.ts_ns),
                end_ns: None,
                refused: 0,
                old: Some(i),
                new: None,
            });
        }
    }

    /// A connect to `remote` refused: counted for that port's window when
    /// something listened on it here.
    fn refused(&mut self, netns: u32, remote: SocketAddr) {
        let listeners = &self.listeners;
        let port = self.ports.entry((netns, remote.port())).or_default();
        // Another host's port of the same number is not ours.
        if !port.lives.is_empty()
            && !port.lives.iter().any(|&l| {
                let a = listeners[l].addr.ip();
                a.is_unspecified() || a == remote.ip()
            })
        {
            return;
        }
        port.refused += 1;
        if port.up > 0 {
            return;
        }
        match port.windows.last_mut().filter(|w| w.end_ns.is_none()) {
            Some(w) => w.refused += 1,
            None => port.windows.push(Window {
                start_ns: None,
                end_ns: None,
                refused: 1,
                old: None,
                new: None,
            }),
        }
    }

    fn record_dwell(&mut self, state: State, ns: u64) {
        let h = self.dwell.entry(state).or_insert_with(|| {
            Histogram::new_with_bounds(1, 24 * 3600 * 1_000_000, 3).expect("valid bounds")
        });
        h.saturating_record((ns / 1000).max(1));
    }

    /// Sockets left at the end, counted by state and service.
    fn still_open_summary(&self, open: &[&Open], top: usize, end_ns: u64) -> StillOpen {
        let mut summary = StillOpen::default();
        let mut states: BTreeMap<(u8, State, bool), u64> = BTreeMap::new();
        let mut services: BTreeMap<&str, BTreeMap<(u8, State, bool), u64>> = BTreeMap::new();
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
        let counts = |m: &BTreeMap<(u8, State, bool), u64>| {
            m.iter()
                .map(|(&(_, state, time_wait_table), &count)| StateCount {
                    state,
                    time_wait_table,
                    count,
                })
                .collect::<Vec<_>>()
        };
        summary.by_state = counts(&states);
        let mut by_service: Vec<ServiceOpen> = services
            .iter()
            .map(|(service, m)| ServiceOpen {
                service: (*service).to_string(),
                count: m.values().sum(),
                by_state: counts(m),
            })
            .collect();
        by_service.sort_by(|a, b| b.count.cmp(&a.count).then(a.service.cmp(&b.service)));
        by_service.truncate(top);
        summary.by_service = by_service;
        summary
    }

    /// The listening ports: each listener's life and each window with
    /// nothing listening.
    fn listener_report(
        &self,
        first_ns: u64,
        end_ns: u64,
        wall: &dyn Fn(u64) -> Option<String>,
    ) -> Vec<ListenPort> {
        let rel = |ns: u64| ns.saturating_sub(first_ns) as f64 / 1e9;
        let ms = |ns: u64| ns as f64 / 1e6;
        let owner = |i: Option<usize>| {
            i.and_then(|i| self.listeners[i].owner)
                .map(|t| (t.pid, t.comm.as_str().into_owned()))
                .unzip()
        };
        let first_connection = |i: Option<usize>| {
            let l = &self.listeners[i?];
            Some(ms(l.first_ns?.saturating_sub(l.from_ns?)))
        };
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
                    .map(|&i| {
                        let l = &self.listeners[i];
                        let (pid, comm) = owner(Some(i));
                        ListenerRow {
                            addr: l.addr.to_string(),
                            pid,
                            comm,
                            from: l.from_ns.and_then(wall),
                            from_s: l.from_ns.map(rel),
                            to: l.to_ns.and_then(wall),
                            to_s: l.to_ns.map(rel),
                            connections: l.connections,
                            first_connection_ms: first_connection(Some(i)),
                            reset_in_queue: l.reset_queued,
                            reset_open: l.reset_open,
                            from_ns: l.from_ns,
                            to_ns: l.to_ns,
                        }
                    })
                    .collect(),
                down: p
                    .windows
                    .iter()
                    .map(|w| {
                        let (old_pid, old_comm) = owner(w.old);
                        let (new_pid, new_comm) = owner(w.new);
                        let (reset_in_queue, reset_open) = w
                            .old
                            .map(|i| &self.listeners[i])
                            .map_or((0, 0), |l| (l.reset_queued, l.reset_open));
                        DownRow {
                            from: w.start_ns.and_then(wall),
                            from_s: w.start_ns.map(rel),
                            to: w.end_ns.and_then(wall),
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
                            first_connection_ms: first_connection(w.new),
                            start_ns: w.start_ns,
                            end_ns: w.end_ns,
                        }
                    })
                    .collect(),
            })
            .collect()
    }

    /// The report as a serializable value.
    pub fn report(&self, top: usize) -> Report {
        let mut names = crate::cgroup::ContainerNames::default();
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
        let first_ns = self.first_ns.unwrap_or(0);
        let still_open_summary = self.still_open_summary(&open, top, end_ns);
        let listeners = self.listener_report(first_ns, end_ns, &wall);
        Report {
            first_ns,
            end_ns,
            listeners,
            still_open_summary,
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
                .take(top)
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
                    container_name: p.cgroup.and_then(|c| names.of(c)).map(str::to_string),
                    transitions: p.transitions,
                    connections: p.connections,
                })
                .collect(),
            time_wait: tw
                .into_iter()
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

/// "1 socket", "2 sockets".
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The listening ports as text: who listened when, and each window with
/// nothing listening (what clients found during a restart).
pub fn listeners_text(report: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "Listeners (what clients found on each listening port)");
    if report.listeners.is_empty() {
        let _ = writeln!(o, "  none seen");
    }
    // Wall time of day when the recording says, else seconds from its start.
    let at = |wall: &Option<String>, s: Option<f64>, none: &str| match (wall, s) {
        (Some(w), _) => w
            .split_once('T')
            .map_or(w.clone(), |(_, t)| t.trim_end_matches('Z').to_string()),
        (None, Some(s)) => format!("+{s:.6} s"),
        (None, None) => none.to_string(),
    };
    let who = |pid: Option<u32>, comm: &Option<String>| match (pid, comm) {
        (Some(p), Some(c)) => {
            let mut esc = String::new();
            crate::output::escape_comm(c, &mut esc);
            format!("{p} {esc}")
        }
        _ => "- (owner unknown)".into(),
    };
    for p in &report.listeners {
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
        // Listeners and windows interleaved in time.
        let mut lines: Vec<(f64, String)> = Vec::new();
        for l in &p.listeners {
            let first = l
                .first_connection_ms
                .map(|ms| format!(", first {ms:.3} ms after listen"))
                .unwrap_or_default();
            lines.push((
                l.from_s.unwrap_or(f64::MIN),
                format!(
                    "    listening  {} .. {}  {}  {}: {}{first}",
                    at(&l.from, l.from_s, "(before)"),
                    at(&l.to, l.to_s, "(end)"),
                    l.addr,
                    who(l.pid, &l.comm),
                    plural(l.connections, "connection", "connections"),
                ),
            ));
        }
        for d in &p.down {
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
            // A window starts as its listener ends: after it in the list.
            lines.push((d.from_s.map_or(f64::MIN, |s| s + 1e-12), text));
        }
        lines.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (_, l) in lines {
            let _ = writeln!(o, "{l}");
        }
    }
    o
}

impl Report {
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
        let name = |c: &StateCount| {
            if !c.time_wait_table {
                c.state.to_string()
            } else if c.state == State::FIN_WAIT2 {
                "FIN_WAIT2 (orphan, time-wait table)".to_string()
            } else {
                format!("{} (time-wait table)", c.state)
            }
        };
        for c in &s.by_state {
            let _ = writeln!(o, "  {:<36} {:>8}", name(c), c.count);
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
                    .map(|c| format!("{} {}", c.count, name(c)))
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
            "  span            {} .. {} ({:.3} s, {})",
            dash(&self.first),
            dash(&self.last),
            self.span_s,
            plural(self.files as u64, "file", "files")
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
                        "  gaps            {} skipped states: transitions between them never arrived",
                        plural(g, "socket", "sockets")
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
                "  ended unseen    {} closed without the kernel reporting how; not listed as open",
                plural(self.ended_unseen, "socket", "sockets")
            );
        }
        if let Some(f) = &self.filters {
            let _ = writeln!(o, "  filters         {}", f.describe());
        }

        // What a restart did to the clients comes first.
        o.push('\n');
        o.push_str(&listeners_text(self));

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
            count_line(&mut o, "By service (both sides)", 30, heads());
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

        o.push_str(&self.still_open_text());
        for s in &self.still_open {
            let owner = if s.holders.is_empty() {
                "- (owner unknown)".to_string()
            } else {
                s.holders
                    .iter()
                    .map(|h| {
                        let mut esc = String::new();
                        crate::output::escape_comm(&h.comm, &mut esc);
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

        let _ = writeln!(o, "\nBusiest processes      transitions  connections  unit");
        for p in &self.processes {
            let mut esc = String::new();
            crate::output::escape_comm(&p.comm, &mut esc);
            let mut unit = String::new();
            match (&p.container, &p.unit) {
                (Some(_), _) if p.container_name.is_some() => {
                    unit.push_str("container ");
                    crate::output::escape_comm(
                        p.container_name.as_deref().unwrap_or(""),
                        &mut unit,
                    );
                }
                (Some(id), _) => unit = format!("container {}", &id[..12.min(id.len())]),
                (None, Some(u)) => crate::output::escape_comm(u, &mut unit),
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
            "\nEntering time-wait, by service               count      per s"
        );
        if self.time_wait.is_empty() {
            let _ = writeln!(o, "  none");
        }
        for t in &self.time_wait {
            let _ = writeln!(o, "  {:<42} {:>5} {:>10.3}", t.service, t.count, t.per_s);
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::read::parse_line;

    /// A row of port 80's service in the recording's JSON.
    fn row(sock: u64, ts_ms: u64, old: &str, new: &str, extra: &str) -> String {
        let (laddr, lport, rport) = if old == "SYN_SENT" || new == "SYN_SENT" {
            ("127.0.0.1", 40000 + sock, 80)
        } else {
            ("127.0.0.1", 80, 40000 + sock)
        };
        format!(
            r#"{{"ts_ns":{},"sock":{sock},"pid":7,"comm":"srv","family":"ipv4","netns":5,"laddr":"{laddr}","lport":{lport},"raddr":"127.0.0.1","rport":{rport},"old":"{old}","new":"{new}","ms":null{extra}}}"#,
            ts_ms * 1_000_000
        )
    }

    fn analyse(lines: &[String]) -> Report {
        let mut a = Analysis::new();
        for l in lines {
            a.add(parse_line(l.as_bytes()).unwrap());
        }
        a.report(10)
    }

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

    #[test]
    fn a_listener_from_before_an_unsnapshotted_recording_still_opens_a_window() {
        let rows = [
            row(1, 100, "LISTEN", "CLOSE", ""),
            row(2, 120, "SYN_SENT", "CLOSE", r#","close":"refused""#),
        ];
        let r = analyse(&rows);
        let p = &r.listeners[0];
        assert_eq!(
            (p.listeners[0].from_s, p.listeners[0].to_s),
            (None, Some(0.0))
        );
        assert_eq!((p.down.len(), p.down[0].refused), (1, 1));
        assert_eq!(p.down[0].to_s, None, "still down at the end");
    }

    #[test]
    fn a_port_is_down_only_when_its_last_listener_closes() {
        // nginx's way: one listener on 0.0.0.0:80, one on [::]:80.
        let v6 = |r: String| {
            r.replace(r#""family":"ipv4""#, r#""family":"ipv6""#)
                .replace(r#""laddr":"127.0.0.1""#, r#""laddr":"::""#)
        };
        let rows = [
            row(1, 0, "CLOSE", "LISTEN", ""),
            v6(row(2, 0, "CLOSE", "LISTEN", "")),
            row(1, 100, "LISTEN", "CLOSE", ""),
            row(3, 110, "SYN_SENT", "CLOSE", r#","close":"refused""#),
            v6(row(2, 120, "LISTEN", "CLOSE", "")),
            row(4, 130, "SYN_SENT", "CLOSE", r#","close":"refused""#),
            v6(row(5, 170, "CLOSE", "LISTEN", "")),
        ];
        let r = analyse(&rows);
        let p = &r.listeners[0];
        assert_eq!(p.listeners.len(), 3);
        assert_eq!(p.down.len(), 1, "{:?}", p.down);
        assert_eq!((p.down[0].duration_ms, p.down[0].refused), (50.0, 1));
        assert_eq!(p.refused, 2, "one refused while a listener was up");
    }

    #[test]
    fn a_restart_is_a_window_with_its_refusals_and_the_owners_on_both_sides() {
        let rows = [
            row(1, 0, "CLOSE", "LISTEN", ""),
            row(1, 100, "LISTEN", "CLOSE", ""),
            row(2, 120, "SYN_SENT", "CLOSE", r#","close":"refused""#),
            row(3, 130, "SYN_SENT", "CLOSE", r#","close":"refused""#),
            row(4, 150, "CLOSE", "LISTEN", "").replace(r#""pid":7"#, r#""pid":9"#),
            row(5, 152, "LISTEN", "SYN_RECV", ""),
            row(5, 153, "SYN_RECV", "ESTABLISHED", ""),
        ];
        let r = analyse(&rows);
        assert_eq!(r.listeners.len(), 1);
        let p = &r.listeners[0];
        assert_eq!((p.port, p.refused, p.listeners.len()), (80, 2, 2));
        let d = &p.down[..];
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].duration_ms, d[0].refused), (50.0, 2));
        assert_eq!((d[0].old_pid, d[0].new_pid), (Some(7), Some(9)));
        assert_eq!(d[0].first_connection_ms, Some(3.0));
        let text = listeners_text(&r);
        assert!(text.contains("50.000 ms, 2 connects refused"), "{text}");
        assert!(
            text.contains("7 srv -> 9 srv, first connection 3.000 ms"),
            "{text}"
        );
    }
}

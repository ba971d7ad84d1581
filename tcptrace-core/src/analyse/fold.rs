//! Folding a recording into an `Analysis`, one item at a time.
//!
//! This is the only stage that sees every row, so it keeps nothing it can
//! let go of: a socket's state lives while the socket is open (or in the
//! kernel's time-wait table), times in state go into histograms, and the
//! listeners' lives and down windows are kept per port. Everything the
//! report says is derived from what is kept here (see `report.rs`).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::finwait2::FinWait2;
use crate::fasthash::{FastMap, FastSet};
use crate::model::Item;
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

#[derive(Debug)]
pub(super) struct Open {
    pub(super) state: State,
    pub(super) since_ns: u64,
    pub(super) owner: Option<Task>,
    /// Every holder, when a holders note named them.
    pub(super) holders: Vec<Task>,
    /// A connection, counted for its owner when it ends (or at the end):
    /// the process that accepted it, not the listener it queued on.
    pub(super) connection: bool,
    pub(super) local: SocketAddr,
    pub(super) remote: SocketAddr,
    /// Opened by accept (true) or connect (false); None when opened before
    /// the recording.
    passive: Option<bool>,
    /// The service endpoint it counts for (see `Analysis::service`).
    pub(super) service: String,
    /// Waiting in its listener's queue at its last transition (no process
    /// had accepted it then; rows do not say when it is accepted).
    pub(super) queued: bool,
}

/// A connection in the kernel's time-wait table, after its socket closed.
#[derive(Debug)]
pub(super) struct TimeWaitSock {
    /// Its substate: FIN_WAIT2 (waiting for the peer's FIN) or TIME_WAIT.
    pub(super) state: State,
    /// When it entered that substate.
    pub(super) since_ns: u64,
    pub(super) service: String,
}

/// The longest a connection stays in one time-wait substate: TIME_WAIT is
/// 60 s (TCP_TIMEWAIT_LEN), and the kernel hands a FIN_WAIT2 orphan to the
/// time-wait table only for a tcp_fin_timeout of at most that. The tracer
/// reads the table every 250 ms or more: a little slack.
pub(super) const TIME_WAIT_SUBSTATE_NS: u64 = 62_000_000_000;

/// The restart window after the listener closes in which the children it
/// resets count as reset by that close: the kernel resets queued children
/// inside the close itself, and a process that exits closes its accepted
/// connections right after its listener.
const CLOSE_RESETS_WITHIN_NS: u64 = 1_000_000_000;

/// One listening socket's life.
#[derive(Debug)]
pub(super) struct Listener {
    pub(super) addr: SocketAddr,
    pub(super) owner: Option<Task>,
    /// None: listening before the recording began (a snapshot row).
    pub(super) from_ns: Option<u64>,
    pub(super) to_ns: Option<u64>,
    /// The first child to complete its handshake.
    pub(super) first_ns: Option<u64>,
    pub(super) connections: u64,
    pub(super) reset_queued: u64,
    pub(super) reset_open: u64,
}

impl Listener {
    /// A listener on `r`'s local address since `from_ns`.
    fn of(r: &Row, from_ns: Option<u64>) -> Listener {
        Listener {
            addr: r.t.local,
            owner: r.owner,
            from_ns,
            to_ns: None,
            first_ns: None,
            connections: 0,
            reset_queued: 0,
            reset_open: 0,
        }
    }
}

/// A local port that something listened on.
#[derive(Debug, Default)]
pub(super) struct PortTrack {
    /// Indices into `Analysis::listeners`.
    pub(super) lives: Vec<usize>,
    /// Listeners up now.
    up: u32,
    pub(super) windows: Vec<Window>,
    pub(super) refused: u64,
}

/// A time with nothing listening on a port.
#[derive(Debug)]
pub(super) struct Window {
    /// None: down since before the recording (refused before any listener).
    pub(super) start_ns: Option<u64>,
    pub(super) end_ns: Option<u64>,
    pub(super) refused: u64,
    pub(super) old: Option<usize>,
    pub(super) new: Option<usize>,
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
}

#[derive(Default, Clone)]
pub(super) struct ProcessTally {
    pub(super) comm: String,
    pub(super) cgroup: Option<&'static str>,
    pub(super) transitions: u64,
    pub(super) connections: u64,
}

/// Everything the report needs, gathered in one pass.
pub struct Analysis {
    pub(super) headers: Vec<Header>,
    pub(super) stats: Vec<Stats>,
    pub(super) events: u64,
    pub(super) first_ns: Option<u64>,
    pub(super) last_ns: u64,
    pub(super) active: Counts,
    pub(super) passive: Counts,
    /// Service endpoint ("127.0.0.1:6389": the listening side's address)
    /// -> counts of both sides' sockets.
    pub(super) endpoints: BTreeMap<String, Counts>,
    pub(super) dwell: BTreeMap<State, Histogram<u64>>,
    pub(super) open: FastMap<u64, Open>,
    /// Sockets whose end the kernel never reported (gap notes): not open,
    /// whatever order their rows and notes come in.
    pub(super) ended_unseen: FastSet<u64>,
    pub(super) processes: FastMap<u32, ProcessTally>,
    pub(super) time_wait: BTreeMap<String, u64>,
    /// Connections in the kernel's time-wait table, by socket id.
    pub(super) in_time_wait: FastMap<u64, TimeWaitSock>,
    /// Whether the recording followed the time-wait table (it has rows
    /// from it).
    pub(super) followed_time_wait: bool,
    /// When `in_time_wait` is next rid of connections surely gone.
    prune_time_wait_ns: u64,
    /// Time in FIN_WAIT2 of connections handed to the time-wait table.
    pub(super) fin_wait2: FinWait2,
    pub(super) listeners: Vec<Listener>,
    /// Listening sockets now up -> index in `listeners`.
    listening: FastMap<u64, usize>,
    /// Children (accepted or queued) -> their listener's index.
    child_of: FastMap<u64, usize>,
    /// (netns, port) of everything that listened, or was refused.
    pub(super) ports: BTreeMap<(u32, u16), PortTrack>,
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
            fin_wait2: FinWait2::default(),
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

    /// The tally of the process `o`, named on first sight.
    fn tally(&mut self, o: &Task) -> &mut ProcessTally {
        let p = self.processes.entry(o.pid).or_default();
        if p.comm.is_empty() {
            p.comm = o.comm.as_str().into_owned();
        }
        p.cgroup = p.cgroup.or(o.cgroup);
        p
    }

    /// Counts a connection for the process that held it last.
    fn count_connection(&mut self, owner: Option<Task>) {
        if let Some(o) = owner {
            self.tally(&o).connections += 1;
        }
    }

    /// The counts of the side a socket is on: accept's or connect's.
    fn side(&mut self, passive: bool) -> &mut Counts {
        if passive {
            &mut self.passive
        } else {
            &mut self.active
        }
    }

    /// One transition, in the order its consequences build on each other:
    /// the clock and the time-wait table first, then what any row tells
    /// (dwell, owner, listeners), then the socket's own life.
    fn row(&mut self, r: &Row) {
        let t = &r.t;
        self.advance_to(t.ts_ns);
        if r.origin.is_time_wait() {
            self.time_wait_row(r);
            return;
        }
        if r.origin == Origin::Tracepoint {
            self.events += 1;
        }
        if t.old != State::CLOSE
            && let Some(ns) = self.fin_wait2.settle(r)
        {
            self.record_dwell(t.old, ns);
        }
        if let Some(o) = &r.owner {
            self.tally(o).transitions += 1;
        }
        if t.new == State::LISTEN {
            self.listen(r);
        }
        if t.old == State::SYN_SENT && r.close == Some(Close::Refused) {
            self.refused(t.netns, t.remote);
        }
        if r.origin == Origin::Snapshot && t.new == State::TIME_WAIT {
            let service = self.service(t.netns, t.local, t.remote, None);
            self.enter_time_wait(r.sock, t.new, t.ts_ns, service);
            return;
        }
        let opened = match (t.old, t.new) {
            (State::CLOSE, State::SYN_SENT) => Some(false),
            (State::LISTEN, State::SYN_RECV) => Some(true),
            _ => None,
        };
        if let Some(passive) = opened {
            self.opened(r, passive);
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
            self.closed(r);
            return;
        }
        self.moved(r);
    }

    /// The recording's span so far, and the time-wait table rid of
    /// connections surely gone.
    fn advance_to(&mut self, now: u64) {
        self.first_ns.get_or_insert(now);
        self.last_ns = self.last_ns.max(now);
        if now >= self.prune_time_wait_ns {
            // Memory follows the kernel's table: a connection whose two
            // substates have both run out is gone, followed or not.
            self.in_time_wait
                .retain(|_, w| now.saturating_sub(w.since_ns) <= 2 * TIME_WAIT_SUBSTATE_NS);
            self.prune_time_wait_ns = now + 10_000_000_000;
        }
        for ns in self.fin_wait2.expired(now) {
            self.record_dwell(State::FIN_WAIT2, ns);
        }
    }

    /// A row from the kernel's time-wait table: the connection moves
    /// between its substates, or leaves the table.
    fn time_wait_row(&mut self, r: &Row) {
        let t = &r.t;
        self.followed_time_wait = true;
        // After the socket's CLOSE: only the time spent in TIME_WAIT is
        // new (FIN_WAIT2 was counted from the tracepoint).
        if let (Some(ns), State::TIME_WAIT) = (r.dwell_ns, t.old) {
            self.record_dwell(t.old, ns);
        }
        // FIN_WAIT2 until the peer's FIN (or the timeout), from the same
        // start as the tracepoint's row, counted instead of it.
        if let Some(ns) = self
            .fin_wait2
            .settle(r)
            .filter(|_| t.old == State::FIN_WAIT2)
        {
            self.record_dwell(t.old, ns);
        }
        // A time-wait socket the snapshot found was open until now.
        let snapshot = self.open.remove(&r.sock);
        if t.new == State::CLOSE {
            self.in_time_wait.remove(&r.sock);
            return;
        }
        let service = match (self.in_time_wait.remove(&r.sock), snapshot) {
            (Some(w), _) => w.service,
            (None, Some(o)) => o.service,
            (None, None) => self.service(t.netns, t.local, t.remote, None),
        };
        self.enter_time_wait(r.sock, t.new, t.ts_ns, service);
    }

    fn enter_time_wait(&mut self, sock: u64, state: State, since_ns: u64, service: String) {
        self.in_time_wait.insert(
            sock,
            TimeWaitSock {
                state,
                since_ns,
                service,
            },
        );
    }

    /// A connection's first row: a connect, or a child of a listener.
    fn opened(&mut self, r: &Row, passive: bool) {
        let t = &r.t;
        if let (true, Some(&l)) = (passive, self.listener_for(t.netns, t.local)) {
            self.child_of.insert(r.sock, l);
        }
        let service = self.service(t.netns, t.local, t.remote, Some(passive));
        self.side(passive).opened += 1;
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
    }

    /// A socket's `-> CLOSE`: how it ended, counted for its side, its
    /// service and its listener; and, closed first by us, its life on in
    /// the time-wait table.
    fn closed(&mut self, r: &Row) {
        let t = &r.t;
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
            self.count_ending(r, e, passive, &service, child_of);
        }
        if enters_time_wait(t.old, t.new) && r.close.is_none() {
            self.side(passive).time_wait += 1;
            self.endpoints.entry(service.clone()).or_default().time_wait += 1;
            *self.time_wait.entry(service.clone()).or_default() += 1;
        }
        // As the tracer follows it (timewait.rs): the connection lives
        // on in the time-wait table.
        if r.close.is_none()
            && matches!(t.old, State::FIN_WAIT2 | State::CLOSING | State::FIN_WAIT1)
        {
            let state = if t.old == State::CLOSING {
                State::TIME_WAIT
            } else {
                State::FIN_WAIT2
            };
            self.enter_time_wait(r.sock, state, t.ts_ns, service);
        }
    }

    /// A connection's ending, for its side and service; a child reset just
    /// after its listener closed counts for that close.
    fn count_ending(
        &mut self,
        r: &Row,
        e: Ending,
        passive: bool,
        service: &str,
        child_of: Option<usize>,
    ) {
        self.side(passive).end(e);
        if r.t.old != State::LISTEN {
            self.endpoints.entry(service.to_owned()).or_default().end(e);
        }
        if let (Some(l), Ending::ResetSent | Ending::Aborted) = (child_of, e) {
            let l = &mut self.listeners[l];
            if l.to_ns
                .is_some_and(|to| r.t.ts_ns.saturating_sub(to) <= CLOSE_RESETS_WITHIN_NS)
            {
                if r.queued {
                    l.reset_queued += 1;
                } else {
                    l.reset_open += 1;
                }
            }
        }
    }

    /// Any other transition: the socket's latest state, owner and
    /// addresses (a socket first seen mid-life was opened before the
    /// recording).
    fn moved(&mut self, r: &Row) {
        let t = &r.t;
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

    /// A listener up on its port, ending the port's down window if one
    /// is open.
    fn listen(&mut self, r: &Row) {
        let t = &r.t;
        let from_ns = (r.origin == Origin::Tracepoint).then_some(t.ts_ns);
        if self.listening.contains_key(&r.sock) {
            return;
        }
        let (i, port) = self.add_listener(r, from_ns);
        if let Some(w) = port.windows.last_mut().filter(|w| w.end_ns.is_none()) {
            w.end_ns = Some(t.ts_ns);
            w.new = Some(i);
        }
        self.listening.insert(r.sock, i);
    }

    /// A new listener's life, counted up on its port: its index, and the
    /// port.
    fn add_listener(&mut self, r: &Row, from_ns: Option<u64>) -> (usize, &mut PortTrack) {
        let i = self.listeners.len();
        self.listeners.push(Listener::of(r, from_ns));
        let port = self.ports.entry((r.t.netns, r.t.local.port())).or_default();
        port.lives.push(i);
        port.up += 1;
        (i, port)
    }

    /// A listener closed; its port's last one opens a down window.
    fn unlisten(&mut self, r: &Row) {
        let t = &r.t;
        let i = match self.listening.remove(&r.sock) {
            Some(i) => i,
            // Listening since before the recording, which had no
            // snapshot: its close is the first we see of it.
            None => self.add_listener(r, None).0,
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
        let h = self.dwell.entry(state).or_insert_with(dwell_histogram);
        h.saturating_record((ns / 1000).max(1));
    }
}

/// Time in one state, in microseconds, up to a day.
pub(super) fn dwell_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 24 * 3600 * 1_000_000, 3).expect("valid bounds")
}

#[cfg(test)]
mod tests {
    use crate::analyse::listeners_text;
    use crate::analyse::scenario::{analyse, row};

    /// Time in FIN_WAIT2 as the report tells it, for one connection
    /// closed by us: (count, max ms).
    fn fin_wait2(rows: &[String]) -> (u64, f64) {
        let r = analyse(rows);
        let d = r
            .dwell
            .iter()
            .find(|d| d.state.name() == "FIN_WAIT2")
            .unwrap();
        (d.count, d.max_ms)
    }

    #[test]
    fn fin_wait2_counts_once_until_the_peers_fin_the_time_wait_table_saw() {
        let ms = |line: String, ms: &str| line.replace(r#""ms":null"#, &format!(r#""ms":{ms}"#));
        let est = row(1, 0, "SYN_SENT", "ESTABLISHED", "");
        let fw1 = ms(row(1, 100, "ESTABLISHED", "FIN_WAIT1", ""), "100");
        let fw2 = ms(row(1, 101, "FIN_WAIT1", "FIN_WAIT2", ""), "1");
        // An orphan: its socket closes at once, the peer's FIN comes 1.5 s
        // later, and the time-wait table's row says so.
        let closed = ms(row(1, 101, "FIN_WAIT2", "CLOSE", ""), "0.005");
        let fin = ms(
            row(
                1,
                1601,
                "FIN_WAIT2",
                "TIME_WAIT",
                r#","origin":"timewait","timing":"timer""#,
            ),
            "1500",
        );
        let lines = [est, fw1, fw2, closed, fin];
        let (count, max) = fin_wait2(&lines);
        assert_eq!(count, 1);
        assert!((1499.0..1501.0).contains(&max), "{max}");
        // Without the table (--no-timewait): until its socket closed.
        assert_eq!(fin_wait2(&lines[..4]), (1, 0.005));
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

//! Time-wait: what happens to a connection after the tracepoint reports its
//! socket closed.
//!
//! When a connection enters time-wait, the kernel moves it to a small
//! time-wait socket and reports the original socket `-> CLOSE` (after our
//! FIN is acknowledged, for an ordinary close()). The connection lives on:
//! in substate FIN_WAIT2 until the peer's FIN (or `tcp_fin_timeout`), then
//! TIME_WAIT for 60 s, until it expires or a new connection reuses it. No
//! tracepoint reports any of that, and fentry/kprobes are not available, so
//! the time-wait table is read with sock_diag (what `ss` uses), filtered by
//! port in the kernel, at an interval that keeps the cost low: the
//! transitions it finds are as precise as that interval.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::system::snapshot::Namespace;
use crate::system::sockdiag::Query;
use tcptrace_core::model::State;
use tcptrace_core::model::monotonic_ns;
use tcptrace_core::model::{Family, Task, Transition};
use tcptrace_core::model::{Origin, Row};

/// The shortest interval between two reads of the time-wait table: the time
/// resolution of the transitions it reports.
pub const RESOLUTION: Duration = Duration::from_millis(250);
/// Reads take at most this share of one CPU: a slow read (100k time-wait
/// sockets on the host) stretches the interval.
const MAX_SHARE: u32 = 20;
/// Connections followed at once, at most.
const MAX_WATCHED: usize = 1 << 16;

struct Watched {
    sock: u64,
    owner: Option<Task>,
    family: Family,
    /// The substate it is known to be in.
    state: State,
    since_ns: u64,
    /// The time-wait socket's cookie, once seen: a socket with the same
    /// addresses but another cookie belongs to a later connection.
    cookie: Option<u64>,
    /// `--stuck` already warned about it in FIN_WAIT2.
    warned: bool,
    /// What the read under way found for its addresses: substate, cookie.
    found: Option<(State, u64)>,
}

/// Keyed by addresses a remote peer chooses, so by a hash seeded afresh
/// each run (foldhash): as fast as the unkeyed one on the per-event path,
/// without letting a peer aim collisions at it.
type Watching = foldhash::HashMap<(u32, SocketAddr, SocketAddr), Watched>;

pub struct TimeWait {
    namespaces: Vec<Namespace>,
    ports: Vec<u16>,
    watched: Watching,
    interval: Duration,
    next: Instant,
    /// Connections not followed: too many at once, or in a namespace
    /// tcptrace could not look into.
    pub missed: u64,
}

impl TimeWait {
    pub fn new(namespaces: Vec<Namespace>, ports: Vec<u16>) -> TimeWait {
        TimeWait {
            namespaces,
            ports,
            watched: Watching::default(),
            interval: RESOLUTION,
            next: Instant::now() + RESOLUTION,
            missed: 0,
        }
    }

    /// Starts following `row`'s connection if it just entered time-wait:
    /// an orderly `-> CLOSE` from FIN_WAIT2, CLOSING or FIN_WAIT1.
    pub fn watch(&mut self, row: &Row) {
        let t = &row.t;
        if row.origin == Origin::Tracepoint
            && t.new == State::CLOSE
            && row.close.is_none()
            && matches!(t.old, State::FIN_WAIT2 | State::CLOSING | State::FIN_WAIT1)
        {
            self.follow(row, t.old);
        }
    }

    /// Follows a time-wait socket the snapshot found, to its end.
    pub fn watch_existing(&mut self, row: &Row) {
        self.follow(row, row.t.new);
    }

    fn follow(&mut self, row: &Row, from: State) {
        let t = &row.t;
        if self.watched.len() >= MAX_WATCHED || !self.namespaces.iter().any(|n| n.inode == t.netns)
        {
            self.missed += 1;
            return;
        }
        // Time in FIN_WAIT2 counts from when the socket entered it, which
        // the row's dwell tells (the tracepoint saw FIN_WAIT1 -> FIN_WAIT2).
        let since_ns = match (row.origin, row.dwell_ns) {
            (Origin::Tracepoint, Some(d)) if from == State::FIN_WAIT2 => t.ts_ns.saturating_sub(d),
            _ => t.ts_ns,
        };
        self.watched.insert(
            (t.netns, t.local, t.remote),
            Watched {
                sock: row.sock,
                owner: row.owner,
                family: t.family,
                state: from,
                since_ns,
                cookie: None,
                warned: false,
                found: None,
            },
        );
    }

    /// A new connection on the same addresses as one in time-wait took over
    /// its time-wait socket (tcp_tw_reuse): that connection's end, as a row
    /// at the time the new one was established.
    pub fn reused(&mut self, row: &Row) -> Option<Row> {
        let t = &row.t;
        if row.origin != Origin::Tracepoint
            || !matches!(
                (t.old, t.new),
                (State::SYN_SENT, State::ESTABLISHED) | (State::LISTEN, State::SYN_RECV)
            )
        {
            return None;
        }
        let w = self.watched.remove(&(t.netns, t.local, t.remote))?;
        Some(ended(&w, t.netns, t.local, t.remote, t.ts_ns))
    }

    /// Connections orphaned in FIN_WAIT2 (closed by their process, the
    /// peer's FIN still to come) for `threshold_ns` or longer, each once: the
    /// row of the state they are stuck in, owner the process that closed.
    pub fn newly_stuck(&mut self, now_ns: u64, threshold_ns: u64) -> Vec<Row> {
        self.watched
            .iter_mut()
            .filter(|(_, w)| {
                w.state == State::FIN_WAIT2
                    && !w.warned
                    && now_ns.saturating_sub(w.since_ns) >= threshold_ns
            })
            .map(|(&(netns, local, remote), w)| {
                w.warned = true;
                let mut row = ended(w, netns, local, remote, now_ns);
                row.t.new = State::FIN_WAIT2;
                row
            })
            .collect()
    }

    /// Whether the table should be read now.
    pub fn due(&self) -> bool {
        !self.watched.is_empty() && Instant::now() >= self.next
    }

    /// Reads the time-wait table of every namespace with connections to
    /// follow, and returns the changes found as rows.
    pub fn poll(&mut self) -> Vec<Row> {
        let started = Instant::now();
        let query = Query {
            states: Query::mask(&[State::FIN_WAIT2, State::TIME_WAIT]),
            ports: self.ports.clone(),
        };
        let mut rows = Vec::new();
        for ns in &mut self.namespaces {
            if !self.watched.keys().any(|(n, _, _)| *n == ns.inode) {
                continue;
            }
            let sockets = match ns.dumper.dump(&query) {
                Ok(sockets) => sockets,
                Err(e) => {
                    log::warn!(
                        "cannot read the time-wait table of namespace {}: {e:#}",
                        ns.inode
                    );
                    continue;
                }
            };
            let inode = ns.inode;
            // The table can hold many more sockets than are followed: each
            // is looked up once, and no map of the whole table is built.
            for s in sockets.iter().filter(|s| s.timewait) {
                if let Some(w) = self.watched.get_mut(&(inode, s.local, s.remote)) {
                    w.found = Some((s.state, s.cookie));
                }
            }
            let now = monotonic_ns();
            self.watched.retain(|(netns, local, remote), w| {
                if *netns != inode {
                    return true;
                }
                // Gone (expired, reused, or timed out in FIN_WAIT2), or
                // replaced by a later connection's time-wait socket.
                let new = match w.found.take() {
                    Some((state, cookie)) if w.cookie.is_none_or(|c| c == cookie) => {
                        w.cookie = Some(cookie);
                        state
                    }
                    _ => State::CLOSE,
                };
                if new == w.state {
                    return true;
                }
                let mut row = ended(w, inode, *local, *remote, now);
                row.t.new = new;
                rows.push(row);
                w.state = new;
                w.since_ns = now;
                new != State::CLOSE
            });
        }
        self.interval = (started.elapsed() * MAX_SHARE).max(RESOLUTION);
        self.next = Instant::now() + self.interval;
        rows.sort_by_key(|r| r.sock);
        rows
    }
}

/// The row of a followed connection leaving its time-wait substate for
/// CLOSE at `ts_ns`.
fn ended(w: &Watched, netns: u32, local: SocketAddr, remote: SocketAddr, ts_ns: u64) -> Row {
    Row {
        t: Transition {
            ts_ns,
            skaddr: 0,
            task: w.owner.unwrap_or_default(),
            thread: Default::default(),
            old: w.state,
            new: State::CLOSE,
            family: w.family,
            local,
            remote,
            netns,
        },
        sock: w.sock,
        owner: w.owner,
        dwell_ns: Some(ts_ns.saturating_sub(w.since_ns)),
        close: None,
        origin: Origin::TimeWait,
        queued: false,
    }
}

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
//! port in the kernel, at an interval that keeps the cost low.
//!
//! The reads come up to that interval late, but the kernel's times can
//! still be had: the time-wait socket is made by the `-> CLOSE` the
//! tracepoint reported (tcp_time_wait, then tcp_done), and sock_diag gives
//! its timer, which is armed for 60 s (TCP_TIMEWAIT_LEN) when it enters
//! TIME_WAIT. A socket made in TIME_WAIT takes that close's moment; one
//! made in FIN_WAIT2 (an orphan still waiting for the peer's FIN) and moved
//! on later takes the moment its timer says, known to the kernel's tick.
//! Its end is seen by the read that finds it gone: known to the interval
//! (the timer cannot say better: a 60 s timer sits in a coarse level of
//! the kernel's timer wheel, and fires up to 2 s after it was due at
//! HZ=250, measured 0.3-2.0 s on this project's machine).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::system::snapshot::Namespace;
use crate::system::sockdiag::Query;
use tcptrace_core::model::State;
use tcptrace_core::model::monotonic_ns;
use tcptrace_core::model::{Family, Task, Transition};
use tcptrace_core::model::{Origin, Row, Timing};

/// The shortest interval between two reads of the time-wait table: the time
/// resolution of the transitions it reports.
pub const RESOLUTION: Duration = Duration::from_millis(250);
/// Reads take at most this share of one CPU: a slow read (100k time-wait
/// sockets on the host) stretches the interval.
const MAX_SHARE: u32 = 20;
/// Connections followed at once, at most.
const MAX_WATCHED: usize = 1 << 16;
/// TCP_TIMEWAIT_LEN: what the kernel arms a time-wait socket's timer for
/// when it enters TIME_WAIT (made in it, or on the peer's FIN).
const TIMEWAIT_LEN_NS: u64 = 60_000_000_000;
/// A time-wait socket whose timer says it entered TIME_WAIT this close to
/// its `-> CLOSE` (plus half the read's length: when the kernel read the
/// timer is known to that) was made in TIME_WAIT by that close. The timer
/// is read in whole jiffies: at HZ=250 and more the time it gives is off by
/// under 4 ms either way (measured -1.7 to +4.4 ms, read included); a
/// coarser kernel errs towards a later entry, which the row then gives as
/// known to the timer.
const SAME_MOMENT_NS: u64 = 5_000_000;

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
    /// What the read under way found for its addresses.
    found: Option<Found>,
    /// When its socket reported `-> CLOSE`: the moment the kernel made the
    /// time-wait socket. None for one the snapshot found.
    closed_ns: Option<u64>,
    /// When a read last found it in `state` (or it was first followed).
    seen_ns: u64,
    /// When a read first found it gone. Its end waits for the next read:
    /// a new connection taking it over may still be in the ring, and its
    /// rows date the end to the microsecond.
    gone_ns: Option<u64>,
}

/// A time-wait socket as a read of the table found it.
#[derive(Clone, Copy)]
struct Found {
    state: State,
    cookie: u64,
    /// Its timer: until the end of TIME_WAIT, or of the FIN_WAIT2 timeout.
    expires_ms: u32,
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
    /// an orderly `-> CLOSE` from FIN_WAIT2, CLOSING or FIN_WAIT1. Returns
    /// the end of an earlier connection on the same addresses, found gone.
    pub fn watch(&mut self, row: &Row) -> Option<Row> {
        let t = &row.t;
        if row.origin == Origin::Tracepoint
            && t.new == State::CLOSE
            && row.close.is_none()
            && matches!(t.old, State::FIN_WAIT2 | State::CLOSING | State::FIN_WAIT1)
        {
            return self.follow(row, t.old);
        }
        None
    }

    /// Follows a time-wait socket the snapshot found, to its end.
    pub fn watch_existing(&mut self, row: &Row) {
        self.follow(row, row.t.new);
    }

    fn follow(&mut self, row: &Row, from: State) -> Option<Row> {
        let t = &row.t;
        if self.watched.len() >= MAX_WATCHED || !self.namespaces.iter().any(|n| n.inode == t.netns)
        {
            self.missed += 1;
            return None;
        }
        // Time in FIN_WAIT2 counts from when the socket entered it, which
        // the row's dwell tells (the tracepoint saw FIN_WAIT1 -> FIN_WAIT2).
        let since_ns = match (row.origin, row.dwell_ns) {
            (Origin::Tracepoint, Some(d)) if from == State::FIN_WAIT2 => t.ts_ns.saturating_sub(d),
            _ => t.ts_ns,
        };
        let closed_ns = (row.origin == Origin::Tracepoint).then_some(t.ts_ns);
        self.watched
            .insert(
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
                    closed_ns,
                    seen_ns: t.ts_ns,
                    gone_ns: None,
                },
            )
            .and_then(|w| gone_end(&w, t.netns, t.local, t.remote))
    }

    /// A new connection on the same addresses as one in time-wait took over
    /// its time-wait socket (tcp_tw_reuse): that connection's end. A
    /// connect takes it over in the call itself, just after its `CLOSE ->
    /// SYN_SENT` (inet_hash_connect), which the established row's time in
    /// SYN_SENT dates; a listener's side, when the SYN came, a handshake
    /// before its first row: known no better than to the poll.
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
        let (ts_ns, timing) = match (t.old, row.dwell_ns) {
            (State::SYN_SENT, Some(d)) => {
                (t.ts_ns.saturating_sub(d).max(w.since_ns), Timing::Exact)
            }
            _ => (t.ts_ns, Timing::Poll),
        };
        let mut end = ended(&w, t.netns, t.local, t.remote, ts_ns);
        end.timing = timing;
        Some(end)
    }

    /// Connections orphaned in FIN_WAIT2 (closed by their process, the
    /// peer's FIN still to come) for `threshold_ns` or longer, each once: the
    /// row of the state they are stuck in, owner the process that closed.
    pub fn newly_stuck(&mut self, now_ns: u64, threshold_ns: u64) -> Vec<Row> {
        self.watched
            .iter_mut()
            .filter(|(_, w)| {
                w.state == State::FIN_WAIT2
                    && w.gone_ns.is_none()
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
            let before = monotonic_ns();
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
            let after = monotonic_ns();
            // When the kernel read the timers, to half the dump's length.
            let read_at = Read {
                at_ns: before + (after - before) / 2,
                within_ns: (after - before) / 2,
            };
            let inode = ns.inode;
            // The table can hold many more sockets than are followed: each
            // is looked up once, and no map of the whole table is built.
            for s in sockets.iter().filter(|s| s.timewait) {
                if let Some(w) = self.watched.get_mut(&(inode, s.local, s.remote)) {
                    w.found = Some(Found {
                        state: s.state,
                        cookie: s.cookie,
                        expires_ms: s.expires_ms,
                    });
                }
            }
            self.watched.retain(|(netns, local, remote), w| {
                if *netns != inode {
                    return true;
                }
                // Gone (expired, reused, reset, timed out in FIN_WAIT2), or
                // replaced by a later connection's time-wait socket: the
                // end is known to lie since the read before.
                let found = w
                    .found
                    .take()
                    .filter(|f| w.cookie.is_none_or(|c| c == f.cookie));
                if let Some(end) = gone_end(w, inode, *local, *remote) {
                    rows.push(end);
                    return false;
                }
                let Some(found) = found else {
                    w.gone_ns = Some(after);
                    return true;
                };
                w.cookie = Some(found.cookie);
                if found.state != w.state {
                    let (ts_ns, timing) = entered(w, found, &read_at);
                    let mut row = ended(w, inode, *local, *remote, ts_ns);
                    row.t.new = found.state;
                    row.timing = timing;
                    rows.push(row);
                    w.state = found.state;
                    w.since_ns = ts_ns;
                }
                w.seen_ns = after;
                true
            });
        }
        self.interval = (started.elapsed() * MAX_SHARE).max(RESOLUTION);
        self.next = Instant::now() + self.interval;
        rows.sort_by_key(|r| (r.t.ts_ns, r.sock));
        rows
    }

    /// The ends of the connections found gone, not yet given: nothing more
    /// will be read.
    pub fn finish(&mut self) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .watched
            .iter()
            .filter_map(|(&(netns, local, remote), w)| gone_end(w, netns, local, remote))
            .collect();
        self.watched.retain(|_, w| w.gone_ns.is_none());
        rows.sort_by_key(|r| (r.t.ts_ns, r.sock));
        rows
    }
}

/// The end of a connection a read found gone, at that read: expired,
/// reset, its FIN_WAIT2 timed out, or taken over by a connection not
/// seen: known only to the poll.
fn gone_end(w: &Watched, netns: u32, local: SocketAddr, remote: SocketAddr) -> Option<Row> {
    let mut row = ended(w, netns, local, remote, w.gone_ns?);
    row.timing = Timing::Poll;
    Some(row)
}

/// When a read of the table took place.
struct Read {
    at_ns: u64,
    /// Give or take.
    within_ns: u64,
}

/// When `w` entered the substate `found` shows, and how well that is
/// known. Made in it: the `-> CLOSE`'s moment (the snapshot's socket, whose
/// close was not seen: the read's). Moved to TIME_WAIT later (the peer's
/// FIN reached an orphan in FIN_WAIT2): when its 60 s timer was armed, no
/// earlier than the read that last saw it in FIN_WAIT2.
fn entered(w: &Watched, found: Found, read: &Read) -> (u64, Timing) {
    let made_in_it = w.seen_ns == w.closed_ns.unwrap_or(0);
    if found.state != State::TIME_WAIT {
        return match w.closed_ns {
            Some(closed) if made_in_it => (closed, Timing::Exact),
            _ => (read.at_ns, Timing::Poll),
        };
    }
    let armed_ns = read
        .at_ns
        .saturating_add(u64::from(found.expires_ms) * 1_000_000)
        .saturating_sub(TIMEWAIT_LEN_NS);
    let slack = SAME_MOMENT_NS + read.within_ns;
    match w.closed_ns {
        Some(closed) if made_in_it && armed_ns <= closed.saturating_add(slack) => {
            (closed, Timing::Exact)
        }
        _ => (
            // Never before it was last seen in FIN_WAIT2, nor after this read.
            armed_ns
                .max(w.seen_ns.max(w.since_ns))
                .min(read.at_ns.max(w.seen_ns)),
            Timing::Timer,
        ),
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
        timing: Timing::Exact,
    }
}

//! Time-wait reported by the kernel (where fentry/fexit load): a closed
//! connection's time-wait socket, made, moved on by the peer's FIN, ended,
//! turned into the rows the polled time-wait table gives elsewhere, with
//! the socket number and owner of the connection's full socket and the
//! kernel's times.
//!
//! The kernel makes the time-wait socket just before it reports the full
//! socket `-> CLOSE` (`tcp_time_wait` then `tcp_done`): the time-wait row
//! goes out right after that `-> CLOSE` row, which carries what the
//! time-wait socket does not (socket number, owner, time in the old state).
//! Connections are keyed by namespace and addresses, which one time-wait
//! socket holds at a time (a new connection takes them over only by ending
//! it), so those found by the snapshot at start are followed too.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::model::{Family, Origin, Row, State, Task, Timing, Transition};

type Key = (u32, SocketAddr, SocketAddr);

/// Made by the kernel, its full socket's `-> CLOSE` row not out yet.
struct Made {
    old: State,
    substate: State,
}

struct Followed {
    sock: u64,
    owner: Option<Task>,
    family: Family,
    state: State,
    since_ns: u64,
    /// `--stuck` already warned about it in FIN_WAIT2.
    warned: bool,
}

/// The connections in time-wait, by namespace and addresses; no cap.
#[derive(Default)]
pub struct KernelTimeWait {
    made: HashMap<Key, Made>,
    followed: HashMap<Key, Followed>,
}

fn key(t: &Transition) -> Key {
    (t.netns, t.local, t.remote)
}

impl KernelTimeWait {
    pub fn new() -> KernelTimeWait {
        KernelTimeWait::default()
    }

    /// The kernel made a time-wait socket (`t.old`: the state its full
    /// socket leaves; `t.new`: its substate).
    pub fn made(&mut self, t: &Transition) {
        self.made.insert(
            key(t),
            Made {
                old: t.old,
                substate: t.new,
            },
        );
    }

    /// A row of the ring, as it goes out: the full socket's `-> CLOSE` of
    /// a connection whose time-wait socket was made gives the row of its
    /// substate (none for an orphan still in FIN_WAIT2, whose state has
    /// not changed), at that moment and with the true time in the old
    /// state; from then on the connection is followed.
    pub fn closed(&mut self, row: &Row) -> Option<Row> {
        let t = &row.t;
        if row.origin != Origin::Tracepoint || t.new != State::CLOSE {
            return None;
        }
        let made = self.made.remove(&key(t))?;
        // Time in FIN_WAIT2 counts from when the socket entered it.
        let entered = t.ts_ns.saturating_sub(row.dwell_ns.unwrap_or(0));
        let mut followed = Followed {
            sock: row.sock,
            owner: row.owner,
            family: t.family,
            state: made.old,
            since_ns: entered,
            warned: false,
        };
        let changed = (made.substate != made.old).then(|| {
            let r = followed.row(key(t), t.ts_ns, made.substate);
            followed.state = made.substate;
            followed.since_ns = t.ts_ns;
            r
        });
        self.followed.insert(key(t), followed);
        changed
    }

    /// A time-wait socket found at start (a snapshot row), followed to its
    /// end like the others.
    pub fn watch_existing(&mut self, row: &Row) {
        self.followed.insert(
            key(&row.t),
            Followed {
                sock: row.sock,
                owner: row.owner,
                family: row.t.family,
                state: row.t.new,
                since_ns: row.t.ts_ns,
                warned: false,
            },
        );
    }

    /// A time-wait socket moved on to TIME_WAIT or ended (`t.new`
    /// CLOSE): the row of the connection it belongs to, if followed.
    pub fn changed(&mut self, t: &Transition) -> Option<Row> {
        let k = key(t);
        let f = self.followed.get_mut(&k)?;
        if f.state == t.new {
            return None;
        }
        let row = f.row(k, t.ts_ns, t.new);
        if t.new == State::CLOSE {
            self.followed.remove(&k);
        } else {
            f.state = t.new;
            f.since_ns = t.ts_ns;
        }
        Some(row)
    }

    /// Connections orphaned in FIN_WAIT2 for `threshold_ns` or longer,
    /// each once, as the polled follower gives them.
    pub fn newly_stuck(&mut self, now_ns: u64, threshold_ns: u64) -> Vec<Row> {
        self.followed
            .iter_mut()
            .filter(|(_, f)| {
                f.state == State::FIN_WAIT2
                    && !f.warned
                    && now_ns.saturating_sub(f.since_ns) >= threshold_ns
            })
            .map(|(&k, f)| {
                f.warned = true;
                f.row(k, now_ns, State::FIN_WAIT2)
            })
            .collect()
    }

    /// Connections in time-wait now.
    pub fn len(&self) -> usize {
        self.followed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.followed.is_empty()
    }
}

impl Followed {
    fn row(&self, (netns, local, remote): Key, ts_ns: u64, new: State) -> Row {
        Row {
            t: Transition {
                ts_ns,
                skaddr: 0,
                task: self.owner.unwrap_or_default(),
                thread: Default::default(),
                old: self.state,
                new,
                family: self.family,
                local,
                remote,
                netns,
            },
            sock: self.sock,
            owner: self.owner,
            dwell_ns: Some(ts_ns.saturating_sub(self.since_ns)),
            close: None,
            origin: Origin::TimeWaitKernel,
            timing: Timing::Exact,
            queued: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: u32 = 4026531840;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn transition(ts_ns: u64, old: State, new: State) -> Transition {
        Transition {
            ts_ns,
            skaddr: 0xffff_8880_0000_1000,
            task: Task::default(),
            thread: Default::default(),
            old,
            new,
            family: Family::V4,
            local: addr(40000),
            remote: addr(8080),
            netns: NS,
        }
    }

    /// The tracepoint's `old -> CLOSE` of the full socket, which entered
    /// `old` `dwell` ns before.
    fn close_row(ts_ns: u64, old: State, dwell: u64) -> Row {
        Row {
            t: transition(ts_ns, old, State::CLOSE),
            sock: 7,
            owner: Some(Task::new(1234, b"curl")),
            dwell_ns: Some(dwell),
            close: None,
            origin: Origin::Tracepoint,
            timing: Timing::Exact,
            queued: false,
        }
    }

    #[test]
    fn the_time_wait_row_follows_the_close_with_its_socket_owner_and_time_in_fin_wait2() {
        let mut tw = KernelTimeWait::new();
        tw.made(&transition(1_000, State::FIN_WAIT2, State::TIME_WAIT));
        let row = tw
            .closed(&close_row(1_004, State::FIN_WAIT2, 300))
            .expect("a TIME_WAIT row");
        assert_eq!((row.t.old, row.t.new), (State::FIN_WAIT2, State::TIME_WAIT));
        assert_eq!((row.t.ts_ns, row.dwell_ns), (1_004, Some(300)));
        assert_eq!((row.sock, row.owner.map(|o| o.pid)), (7, Some(1234)));
        assert_eq!(row.origin, Origin::TimeWaitKernel);
        let end = tw
            .changed(&transition(61_000_001_004, State::TIME_WAIT, State::CLOSE))
            .expect("its end");
        assert_eq!((end.t.old, end.t.new), (State::TIME_WAIT, State::CLOSE));
        assert_eq!(end.dwell_ns, Some(61_000_000_000));
        assert!(tw.is_empty());
    }

    #[test]
    fn an_orphan_in_fin_wait2_shows_no_row_until_the_peers_fin_then_its_whole_fin_wait2() {
        let mut tw = KernelTimeWait::new();
        tw.made(&transition(1_000, State::FIN_WAIT2, State::FIN_WAIT2));
        assert_eq!(tw.closed(&close_row(1_004, State::FIN_WAIT2, 4)), None);
        let fin = tw
            .changed(&transition(5_000, State::FIN_WAIT2, State::TIME_WAIT))
            .expect("the peer's FIN");
        assert_eq!((fin.t.old, fin.t.new), (State::FIN_WAIT2, State::TIME_WAIT));
        assert_eq!(fin.dwell_ns, Some(5_000 - 1_000));
    }

    #[test]
    fn a_close_without_a_time_wait_socket_is_the_end() {
        let mut tw = KernelTimeWait::new();
        assert_eq!(tw.closed(&close_row(1_004, State::FIN_WAIT2, 4)), None);
        assert_eq!(
            tw.changed(&transition(9_000, State::TIME_WAIT, State::CLOSE)),
            None
        );
    }

    #[test]
    fn closing_enters_time_wait_from_closing() {
        let mut tw = KernelTimeWait::new();
        tw.made(&transition(1_000, State::CLOSING, State::TIME_WAIT));
        let row = tw.closed(&close_row(1_002, State::CLOSING, 50)).unwrap();
        assert_eq!((row.t.old, row.t.new), (State::CLOSING, State::TIME_WAIT));
    }

    #[test]
    fn an_orphan_stuck_in_fin_wait2_is_named_once() {
        let mut tw = KernelTimeWait::new();
        tw.made(&transition(1_000, State::FIN_WAIT2, State::FIN_WAIT2));
        tw.closed(&close_row(1_004, State::FIN_WAIT2, 4));
        assert!(tw.newly_stuck(2_000, 5_000).is_empty());
        let stuck = tw.newly_stuck(7_000, 5_000);
        assert_eq!(stuck.len(), 1);
        assert_eq!(stuck[0].t.new, State::FIN_WAIT2);
        assert!(tw.newly_stuck(9_000, 5_000).is_empty());
    }
}

//! Attribute: give each transition its socket id, its owner and the time the
//! socket spent in the state it leaves.
//!
//! The tracepoint runs in whatever task the kernel happens to be in. For
//! connect, listen, close and shutdown that is the socket's owner; for the
//! transitions driven by arriving packets (handshake completion, the peer's
//! FIN, ACKs, resets) it runs in softirq, and the "current" task is whoever
//! was interrupted. So the owner is learned only from process-context
//! transitions and carried to the others; a child socket starts with its
//! listener's owner. Where no owner is known the answer is "unknown", never
//! the interrupted task.
//!
//! Who holds a socket also changes without any transition: accept() hands
//! a queued child to the process that accepts it, a fork gives the child
//! copies of every descriptor, a close() that is not the last reference
//! (the fork's parent, the sender of SCM_RIGHTS) and an exit give them up.
//! The kernel reports each of those as an event of its own, and the
//! holders of each socket follow them, the way `ss -p` would list them.
//! What no event tells (a descriptor received over a Unix socket) is found
//! by looking, when a socket is left with no holder known: see
//! [`Attributor::take_unverified`].
//!
//! The work is split by job, one file each: `repeats` (a change the kernel
//! delivered twice is shown once), `lives` (ids, time in state, and the
//! transitions a socket's history shows were lost), `listeners` (the owner
//! a child starts with), `holders` (descriptors across accept, fork,
//! release and exit) and `stuck` (sockets lingering where they should not,
//! and the count in each state). [`Attributor::observe`] takes each
//! transition through the first four. All of them read the table of
//! sockets followed, which is why [`Attributor`] holds it and composes the
//! rest.

mod holders;
mod listeners;
mod lives;
mod repeats;
mod stuck;
#[cfg(test)]
mod testkit;

use std::collections::hash_map::Entry;

use crate::fasthash::FastMap;
use crate::model::{Origin, Row, State, Transition};

pub use holders::Unverified;
pub use lives::UnseenEnd;

use holders::Holding;
use listeners::Listeners;
use lives::{Lives, Sock};
use repeats::Closes;

/// The sockets seen so far. Memory is bounded by the number of sockets open
/// at once: a socket is forgotten when it reaches CLOSE.
#[derive(Debug, Default)]
pub struct Attributor {
    /// The sockets followed now, by kernel address: every job reads it.
    socks: FastMap<u64, Sock>,
    /// Ids, the snapshot's sockets, received resets, gaps and unseen ends.
    lives: Lives,
    /// The latest closes, to tell a close delivered twice.
    closes: Closes,
    /// Listening sockets, whose owner their children start with.
    listeners: Listeners,
    /// Which process holds which socket, and what needs looking up.
    holding: Holding,
}

/// Whether the task that made this transition owns the socket (see
/// [`tcptrace_common::in_owner_context`]; the program reads pid and comm for
/// exactly these).
pub fn in_owner_context(old: State, new: State) -> bool {
    tcptrace_common::in_owner_context(old.0, new.0)
}

/// The first transition of a socket's life: a new socket leaving CLOSE, or a
/// child socket cloned from its listener.
fn starts_life(old: State, new: State) -> bool {
    old == State::CLOSE || (old == State::LISTEN && new == State::SYN_RECV)
}

impl Attributor {
    pub fn new() -> Attributor {
        Attributor::default()
    }

    /// The row for `t`, or None when `t` is the transition its socket made
    /// last, reported again. A state machine cannot repeat a change (its
    /// state is now the new one), yet under full churn the kernel's
    /// tracepoint delivers about one transition in a million twice, up to
    /// a millisecond apart; tcptrace shows it once. That includes a start
    /// of life with the same addresses, and a close arriving after its
    /// socket is gone (also once a new socket took its address).
    pub fn observe(&mut self, t: &Transition) -> Option<Row> {
        if self.is_late_copy(t) {
            return None;
        }
        if starts_life(t.old, t.new) {
            self.end_unseen_life(t);
        }
        let by_owner = in_owner_context(t.old, t.new);
        if by_owner {
            self.refresh_if_inherited(t.task);
        }
        // One look-up, whether the socket is followed already or new.
        let sock = match self.socks.entry(t.skaddr) {
            Entry::Occupied(o) => {
                self.lives.went_on(o.get(), t);
                o.into_mut()
            }
            Entry::Vacant(v) => {
                let sock = v.insert(self.lives.first_seen(t));
                self.listeners.first_seen(t);
                self.holding.index(t.skaddr, &sock.holders);
                sock
            }
        };
        if by_owner {
            self.holding.owner_acted(sock, t);
        }
        let queued = sock.queued;
        let owner = if queued {
            self.listeners.owner(&self.socks, t)
        } else {
            sock.holders.owner()
        };
        // Again: the listener's owner was read from the same table.
        let sock = self.socks.get_mut(&t.skaddr).expect("inserted above");
        let row = Row {
            t: *t,
            sock: sock.id,
            owner,
            dwell_ns: sock.enter(t),
            close: self.lives.close_cause(t),
            origin: Origin::Tracepoint,
            queued,
            timing: crate::model::Timing::Exact,
        };
        self.listeners.changed(&self.socks, t);
        if t.new == State::CLOSE {
            self.end_life(t);
        }
        Some(row)
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::*;
    use super::*;
    use crate::model::*;

    #[test]
    fn client_closes_first_owners_follow_the_kernel_not_the_interrupted_task() {
        let server = task(100, "server");
        let client = task(200, "client");
        let swapper = task(0, "swapper/0");
        let mut a = Attributor::new();
        let s = |t: &Transition| t.local.to_string();
        let steps = [
            connect_steps(server, client),
            client_closes_steps(server, client, swapper),
        ]
        .concat();
        let rows: Vec<Row> = steps.iter().map(|t| a.observe_row(t)).collect();
        let owners: Vec<(String, Option<u32>, u64)> = rows
            .iter()
            .map(|r| (s(&r.t), r.owner.map(|o| o.pid), r.sock))
            .collect();
        let want = [
            ("0.0.0.0:80", Some(100), 1),
            ("127.0.0.1:0", Some(200), 2),
            ("127.0.0.1:5000", Some(200), 2),
            ("127.0.0.1:80", Some(100), 3),
            ("127.0.0.1:80", Some(100), 3),
            ("127.0.0.1:5000", Some(200), 2),
            ("127.0.0.1:80", Some(100), 3),
            ("127.0.0.1:5000", Some(200), 2),
            ("127.0.0.1:80", Some(100), 3),
            ("127.0.0.1:5000", Some(200), 2),
            ("127.0.0.1:80", Some(100), 3),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(l, p, s)| (l.to_string(), *p, *s))
            .collect();
        assert_eq!(owners, want);
        // Time in the state left: unknown at birth, then exact.
        let dwell: Vec<Option<u64>> = rows.iter().map(|r| r.dwell_ns).collect();
        assert_eq!(
            dwell,
            [
                None,
                None,
                Some(10),
                None,
                Some(0),
                Some(980),
                Some(980),
                Some(10),
                Some(3990),
                Some(4000),
                Some(10)
            ]
        );
        // Both connection sockets are forgotten at CLOSE; the listener stays.
        assert_eq!(a.tracked(), 1);
        // Every state each socket left was one it was seen entering.
        assert_eq!(a.gaps(), 0);
    }

    /// A server listens on :80 and a client connects to it: after the
    /// listen, every transition of the handshake is made on the client's CPU.
    fn connect_steps(server: Task, client: Task) -> Vec<Transition> {
        vec![
            tr(
                0,
                LISTENER,
                server,
                State::CLOSE,
                State::LISTEN,
                "0.0.0.0:80",
                "0.0.0.0:0",
            ),
            tr(
                10,
                CLIENT,
                client,
                State::CLOSE,
                State::SYN_SENT,
                "127.0.0.1:0",
                "127.0.0.1:80",
            ),
            // softirq, running on the client's CPU: the task is the client.
            tr(
                20,
                CLIENT,
                client,
                State::SYN_SENT,
                State::ESTABLISHED,
                "127.0.0.1:5000",
                "127.0.0.1:80",
            ),
            tr(
                30,
                CHILD,
                client,
                State::LISTEN,
                State::SYN_RECV,
                "127.0.0.1:80",
                "127.0.0.1:5000",
            ),
            tr(
                30,
                CHILD,
                client,
                State::SYN_RECV,
                State::ESTABLISHED,
                "127.0.0.1:80",
                "127.0.0.1:5000",
            ),
        ]
    }

    /// The client closes first; the transitions its FINs and ACKs cause
    /// arrive in softirq (swapper), and the server closes its end later.
    fn client_closes_steps(server: Task, client: Task, swapper: Task) -> Vec<Transition> {
        vec![
            tr(
                1000,
                CLIENT,
                client,
                State::ESTABLISHED,
                State::FIN_WAIT1,
                "127.0.0.1:5000",
                "127.0.0.1:80",
            ),
            tr(
                1010,
                CHILD,
                swapper,
                State::ESTABLISHED,
                State::CLOSE_WAIT,
                "127.0.0.1:80",
                "127.0.0.1:5000",
            ),
            tr(
                1010,
                CLIENT,
                swapper,
                State::FIN_WAIT1,
                State::FIN_WAIT2,
                "127.0.0.1:5000",
                "127.0.0.1:80",
            ),
            tr(
                5000,
                CHILD,
                server,
                State::CLOSE_WAIT,
                State::LAST_ACK,
                "127.0.0.1:80",
                "127.0.0.1:5000",
            ),
            tr(
                5010,
                CLIENT,
                swapper,
                State::FIN_WAIT2,
                State::CLOSE,
                "127.0.0.1:5000",
                "127.0.0.1:80",
            ),
            tr(
                5010,
                CHILD,
                swapper,
                State::LAST_ACK,
                State::CLOSE,
                "127.0.0.1:80",
                "127.0.0.1:5000",
            ),
        ]
    }

    #[test]
    fn socket_first_seen_in_softirq_has_no_owner() {
        let mut a = Attributor::new();
        let r = a.observe_row(&tr(
            0,
            CLIENT,
            task(0, "swapper/1"),
            State::ESTABLISHED,
            State::CLOSE_WAIT,
            "10.0.0.1:80",
            "10.0.0.2:999",
        ));
        assert_eq!(r.owner, None);
        assert_eq!(r.dwell_ns, None);
    }

    #[test]
    fn reset_received_keeps_the_owner_learned_at_connect() {
        let mut a = Attributor::new();
        let me = task(7, "curl");
        a.observe_row(&tr(
            0,
            CLIENT,
            me,
            State::CLOSE,
            State::SYN_SENT,
            "1.1.1.1:0",
            "2.2.2.2:80",
        ));
        let r = a.observe_row(&tr(
            5,
            CLIENT,
            task(9, "other"),
            State::SYN_SENT,
            State::CLOSE,
            "1.1.1.1:4",
            "2.2.2.2:80",
        ));
        assert_eq!(r.owner.map(|o| o.pid), Some(7));
    }
}

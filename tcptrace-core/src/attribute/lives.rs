//! Lives: each socket's id, the time it entered its state, how its life
//! ended, and what its history shows was lost on the way.
//!
//! A life runs from a start (leaving CLOSE, or a child cloned from its
//! listener) to its `-> CLOSE`, and the tracepoint fires at every change in
//! between. So a change out of a state the socket was never seen entering,
//! or its address starting a new life before its close was seen, is a gap:
//! a transition that never reached us. Counting them here is the only
//! account of transitions the kernel never handed to BPF.

use std::net::SocketAddr;

use crate::fasthash::{FastMap, FastSet};
use crate::model::{Close, Holders, Origin, Row, State, Transition};

use super::{Attributor, starts_life};

/// A socket followed, from its first transition seen to its `-> CLOSE`.
#[derive(Debug)]
pub(super) struct Sock {
    pub(super) id: u64,
    pub(super) holders: Holders,
    /// A child socket no process has accepted yet: its rows carry its
    /// listener's owner.
    pub(super) queued: bool,
    /// When the socket entered its current state, if we saw that happen.
    pub(super) since_ns: Option<u64>,
    /// Its latest transition (current state, addresses).
    pub(super) last: Transition,
    /// `--stuck` already warned about it in its current state.
    pub(super) warned: bool,
    /// The process that accepted it, until a process acts on it: a fork
    /// then hands it to the child (see [`Attributor::forked`]).
    pub(super) accepted_by: Option<u32>,
}

impl Sock {
    /// The socket made `t`: the time it spent in the state it left, when
    /// it was seen entering it; the clock restarts for the new one.
    pub(super) fn enter(&mut self, t: &Transition) -> Option<u64> {
        let dwell_ns = self.since_ns.map(|s| t.ts_ns.saturating_sub(s));
        self.since_ns = Some(t.ts_ns);
        self.last = *t;
        self.warned = false;
        dwell_ns
    }
}

/// A socket that never reported its way to CLOSE: its address started a new
/// socket while it was last seen in `state`, at `by_ns`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UnseenEnd {
    pub sock: u64,
    pub state: State,
    pub by_ns: u64,
}

/// What the lives need beyond the sockets themselves.
#[derive(Debug, Default)]
pub(super) struct Lives {
    next_id: u64,
    /// Sockets from the start-up snapshot, by (netns, local, remote), until
    /// their first transition tells their kernel address.
    existing: FastMap<(u32, SocketAddr, SocketAddr), (u64, Holders)>,
    /// Sockets a reset was received on, until their `-> CLOSE`.
    reset_received: FastSet<u64>,
    /// Sockets whose history skipped a state: see [`Attributor::gaps`].
    gaps: u64,
    /// Sockets whose end never arrived, until taken.
    unseen_ends: Vec<UnseenEnd>,
}

impl Lives {
    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A socket not followed yet makes `t`.
    pub(super) fn first_seen(&mut self, t: &Transition) -> Sock {
        // A socket from the snapshot keeps its id and holders; the time it
        // entered its state stays unknown.
        let known = if starts_life(t.old, t.new) {
            None
        } else {
            self.existing.remove(&(t.netns, t.local, t.remote))
        };
        // A child's LISTEN -> SYN_RECV fires just before this, in the same
        // softirq: a child first seen here lost it.
        if known.is_none() && (t.old, t.new) == (State::SYN_RECV, State::ESTABLISHED) {
            self.gaps += 1;
        }
        let (id, holders) = match known {
            Some(k) => k,
            None => (self.new_id(), Holders::default()),
        };
        Sock {
            id,
            holders,
            queued: t.old == State::LISTEN && t.new == State::SYN_RECV,
            since_ns: None,
            last: *t,
            warned: false,
            accepted_by: None,
        }
    }

    /// A socket followed makes `t`: leaving a state it was not seen
    /// entering is a gap.
    pub(super) fn went_on(&mut self, sock: &Sock, t: &Transition) {
        self.gaps += u64::from(t.old != sock.last.new);
    }

    /// Why `t` closed its socket, when a reset received says so.
    pub(super) fn close_cause(&mut self, t: &Transition) -> Option<Close> {
        if t.new == State::CLOSE && self.reset_received.remove(&t.skaddr) && t.old != State::LISTEN
        {
            Some(if t.old == State::SYN_SENT {
                Close::Refused
            } else {
                Close::ResetReceived
            })
        } else {
            None
        }
    }
}

impl Attributor {
    /// A socket that existed when tracing started (`t` holds its state in
    /// `new`): gets an id now, and its owner is known to its children and
    /// its first transition.
    pub fn existing(&mut self, t: &Transition, holders: Holders) -> Row {
        let id = self.lives.new_id();
        let owner = holders.owner();
        if t.new == State::LISTEN {
            self.listeners.snapshot_found(t, holders.clone());
        }
        self.lives
            .existing
            .insert((t.netns, t.local, t.remote), (id, holders));
        Row {
            t: *t,
            sock: id,
            owner,
            dwell_ns: None,
            close: None,
            origin: Origin::Snapshot,
            queued: false,
            timing: crate::model::Timing::Exact,
        }
    }

    /// A reset arrived on the socket at `skaddr`: its coming `-> CLOSE` is
    /// its consequence.
    /// Resets are not filtered in the kernel: only the sockets we follow
    /// count, and only until they close.
    pub fn reset_received(&mut self, skaddr: u64) {
        if self.socks.contains_key(&skaddr) {
            self.lives.reset_received.insert(skaddr);
        }
    }

    /// `t` starts a life. A socket address can be reused once the socket is
    /// freed; a start of life on a known address is a new socket, and the
    /// old one's way to CLOSE never arrived.
    pub(super) fn end_unseen_life(&mut self, t: &Transition) {
        if let Some(old) = self.socks.remove(&t.skaddr) {
            self.holding.unindex(t.skaddr, &old.holders);
            self.lives.gaps += 1;
            self.lives.unseen_ends.push(UnseenEnd {
                sock: old.id,
                state: old.last.new,
                by_ns: t.ts_ns,
            });
        }
        self.lives.reset_received.remove(&t.skaddr);
    }

    /// `t` closed its socket: forgotten, but for the close itself, kept to
    /// tell a copy of it.
    pub(super) fn end_life(&mut self, t: &Transition) {
        let gone = self.socks.remove(&t.skaddr);
        self.holding
            .closed(t.skaddr, gone.as_ref().map(|s| &s.holders));
        self.closes.remember(t);
    }

    /// Sockets whose transitions skipped a state: one left a state it was
    /// never seen entering, or its address started a new socket before it
    /// was seen closing. Every socket ends in CLOSE and each change of state
    /// fires the tracepoint, so each gap is at least one transition lost on
    /// the way (ring drops and skipped runs included, which are counted
    /// where they happen, and transitions the kernel never handed to BPF,
    /// which nothing else counts).
    pub fn gaps(&self) -> u64 {
        self.lives.gaps
    }

    /// The sockets found since the last call whose end never arrived.
    pub fn take_unseen_ends(&mut self) -> Vec<UnseenEnd> {
        std::mem::take(&mut self.lives.unseen_ends)
    }
}

#[cfg(test)]
mod tests {
    use crate::attribute::testkit::*;
    use crate::attribute::{Attributor, UnseenEnd};
    use crate::model::*;

    #[test]
    fn a_received_reset_explains_the_close_that_follows_it() {
        let mut a = Attributor::new();
        let me = task(7, "x");
        // Resets on sockets we do not follow are ignored.
        a.reset_received(1);
        let r = a.observe_row(&tr(
            0,
            1,
            me,
            State::CLOSE,
            State::SYN_SENT,
            "1.1.1.1:0",
            "2.2.2.2:80",
        ));
        assert_eq!(r.close, None);
        a.reset_received(1);
        let r = a.observe_row(&tr(
            1,
            1,
            me,
            State::SYN_SENT,
            State::CLOSE,
            "1.1.1.1:4",
            "2.2.2.2:80",
        ));
        assert_eq!(r.close, Some(Close::Refused));
        a.observe_row(&tr(
            2,
            2,
            me,
            State::CLOSE,
            State::SYN_SENT,
            "1.1.1.1:0",
            "2.2.2.2:80",
        ));
        a.observe_row(&tr(
            3,
            2,
            me,
            State::SYN_SENT,
            State::ESTABLISHED,
            "1.1.1.1:5",
            "2.2.2.2:80",
        ));
        a.reset_received(2);
        let r = a.observe_row(&tr(
            4,
            2,
            me,
            State::ESTABLISHED,
            State::CLOSE,
            "1.1.1.1:5",
            "2.2.2.2:80",
        ));
        assert_eq!(r.close, Some(Close::ResetReceived));
        // An abort of ours waits for the reset the kernel sends after it.
        a.observe_row(&tr(
            5,
            3,
            me,
            State::CLOSE,
            State::SYN_SENT,
            "1.1.1.1:0",
            "2.2.2.2:80",
        ));
        a.observe_row(&tr(
            6,
            3,
            me,
            State::SYN_SENT,
            State::ESTABLISHED,
            "1.1.1.1:6",
            "2.2.2.2:80",
        ));
        let r = a.observe_row(&tr(
            7,
            3,
            me,
            State::ESTABLISHED,
            State::CLOSE,
            "1.1.1.1:6",
            "2.2.2.2:80",
        ));
        assert!(may_await_sent_reset(&r));
    }

    #[test]
    fn a_child_first_seen_established_lost_its_start() {
        let mut a = Attributor::new();
        let me = task(9, "server");
        let at = |ts, sk, old, new| tr(ts, sk, me, old, new, "10.0.0.1:80", "10.0.0.2:5000");
        a.observe_row(&at(1, 0xd, State::SYN_RECV, State::ESTABLISHED));
        assert_eq!(a.gaps(), 1);
        // A client whose connect began before tracing did: no gap.
        a.observe_row(&at(2, 0xe, State::SYN_SENT, State::ESTABLISHED));
        assert_eq!(a.gaps(), 1);
    }

    #[test]
    fn reused_socket_address_starts_a_new_socket() {
        let mut a = Attributor::new();
        let me = task(7, "x");
        let r1 = a.observe_row(&tr(
            0,
            9,
            me,
            State::CLOSE,
            State::SYN_SENT,
            "1.1.1.1:0",
            "2.2.2.2:80",
        ));
        // CLOSE of the first life was lost; the address comes back.
        let r2 = a.observe_row(&tr(
            9,
            9,
            me,
            State::CLOSE,
            State::SYN_SENT,
            "1.1.1.1:0",
            "2.2.2.2:81",
        ));
        assert_ne!(r1.sock, r2.sock);
        assert_eq!(r2.dwell_ns, None);
    }

    /// What a loopback client looks like when the kernel processes the
    /// peer's ACK and FIN without handing the transitions to BPF: its life
    /// stops at FIN_WAIT1, then its address is reused.
    #[test]
    fn client_transitions_never_delivered_show_as_gaps() {
        let mut a = Attributor::new();
        let me = task(7, "client");
        let at = |ts, sk, old, new| tr(ts, sk, me, old, new, "1.1.1.1:4000", "2.2.2.2:80");
        let first = a
            .observe_row(&at(1, 0xa, State::CLOSE, State::SYN_SENT))
            .sock;
        for t in [
            at(2, 0xa, State::SYN_SENT, State::ESTABLISHED),
            at(3, 0xa, State::ESTABLISHED, State::FIN_WAIT1),
            // Another socket's whole life: no gap.
            at(4, 0xb, State::CLOSE, State::SYN_SENT),
            at(5, 0xb, State::SYN_SENT, State::CLOSE),
        ] {
            a.observe_row(&t);
        }
        assert_eq!(a.gaps(), 0);
        // FIN_WAIT1 -> FIN_WAIT2 -> CLOSE never came; the address is reused.
        a.observe_row(&at(6, 0xa, State::CLOSE, State::SYN_SENT));
        assert_eq!(a.gaps(), 1);
        assert_eq!(
            a.take_unseen_ends(),
            [UnseenEnd {
                sock: first,
                state: State::FIN_WAIT1,
                by_ns: 6
            }]
        );
        assert!(a.take_unseen_ends().is_empty());
        a.observe_row(&at(7, 0xa, State::SYN_SENT, State::ESTABLISHED));
        a.observe_row(&at(8, 0xa, State::ESTABLISHED, State::FIN_WAIT1));
        // Only FIN_WAIT1 -> FIN_WAIT2 is missing this time.
        let row = a.observe_row(&at(9, 0xa, State::FIN_WAIT2, State::CLOSE));
        assert_eq!(a.gaps(), 2);
        assert_eq!(row.dwell_ns, Some(1), "time since the last state seen");
        // A closed socket's address starting over is an ordinary new life,
        // and a transition delivered twice is a repeat, not a gap.
        a.observe_row(&at(10, 0xa, State::CLOSE, State::SYN_SENT));
        a.observe_row(&at(11, 0xa, State::SYN_SENT, State::ESTABLISHED));
        assert!(
            a.observe(&at(11, 0xa, State::SYN_SENT, State::ESTABLISHED))
                .is_none()
        );
        assert_eq!(a.gaps(), 2);
    }
}

//! Repeats: a change the kernel delivered twice is shown once.
//!
//! A state machine cannot make the same change twice in a row, yet under
//! full churn the tracepoint delivers about one transition in a million
//! twice, up to a millisecond apart. A copy of a live socket's last change
//! is told by the socket itself; a copy of a close arrives when its socket
//! is gone, perhaps once a new socket took its address, so the latest
//! closes are remembered here, in a table sized for that millisecond.

use crate::model::{State, Transition};

use super::{Attributor, starts_life};

/// Sets of [`Closes`]: copies come a few hundred microseconds apart, when a
/// few hundred sockets have closed.
const CLOSE_SETS: usize = 4096;

/// Closes kept per set, the oldest replaced. With one, any of
/// the hundreds of closes between a close and its copy could take its set
/// (one in 30 at full churn), and the copy was shown as a socket of its own.
const CLOSE_WAYS: usize = 8;

/// The latest closes, by address: the second copy of a close the kernel
/// reports twice arrives when the socket is gone.
#[derive(Debug, Default)]
pub(super) struct Closes {
    sets: Vec<CloseSet>,
    /// The way of each set its next close goes in: the oldest (4 KB, where
    /// the sets take 256).
    next: Vec<u8>,
}

/// The [`close_print`]s of one set, in one cache line: every close writes
/// its set, at random, and whole transitions made the table 2 MB, whose cache
/// misses were a fifth of the time spent here at full churn.
#[derive(Clone, Copy, Debug, Default)]
#[repr(align(64))]
struct CloseSet([u64; CLOSE_WAYS]);

/// A close, as much of it as telling a copy needs: a hash of the socket's
/// address, change, addresses and namespace. Never 0, which marks a free
/// way. Two closes alike in 64 bits of a hash by chance, within one set's
/// eight, are too rare to matter: at 200,000 closes a second, about once in
/// 300,000 years.
fn close_print(t: &Transition) -> u64 {
    use std::hash::BuildHasher;
    let hasher = std::hash::BuildHasherDefault::<crate::fasthash::FastHasher>::default();
    hasher
        .hash_one((t.skaddr, t.old, t.new, t.local, t.remote, t.netns))
        .max(1)
}

fn same_addresses(a: &Transition, b: &Transition) -> bool {
    (a.local, a.remote, a.netns) == (b.local, b.remote, b.netns)
}

fn close_set(skaddr: u64) -> usize {
    // Sockets are slab objects of a kilobyte or more: the low bits are
    // alike, and the rest clusters by slab page, so it is mixed.
    ((skaddr >> 10).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 52) as usize % CLOSE_SETS
}

impl Closes {
    /// `t` closed its socket.
    pub(super) fn remember(&mut self, t: &Transition) {
        if self.sets.is_empty() {
            self.sets.resize(CLOSE_SETS, CloseSet::default());
            self.next.resize(CLOSE_SETS, 0);
        }
        // Over the set's oldest: a store, which does not wait for the
        // set's line to come in as reading the set would.
        let at = close_set(t.skaddr);
        let way = usize::from(self.next[at]);
        self.sets[at].0[way] = close_print(t);
        self.next[at] = ((way + 1) % CLOSE_WAYS) as u8;
    }

    /// Whether a close like `t` is among the latest.
    fn holds(&self, t: &Transition) -> bool {
        self.sets
            .get(close_set(t.skaddr))
            .is_some_and(|set| set.0.contains(&close_print(t)))
    }
}

impl Attributor {
    /// A second copy of the last change of the socket now at `t`'s
    /// address (of its start, only with the same addresses: otherwise a new
    /// socket took the address), or of the close of the one before it.
    pub(super) fn is_late_copy(&self, t: &Transition) -> bool {
        let live = self.socks.get(&t.skaddr);
        if live.is_some_and(|s| {
            t.old != t.new
                && (s.last.old, s.last.new) == (t.old, t.new)
                && (!starts_life(t.old, t.new) || same_addresses(&s.last, t))
        }) {
            return true;
        }
        // A live socket making this very change now is no copy: nearly
        // every close, which so never waits for the table's cache miss.
        t.new == State::CLOSE
            && live.is_none_or(|s| s.last.new != t.old || !same_addresses(&s.last, t))
            && self.closes.holds(t)
    }
}

#[cfg(test)]
mod tests {
    use super::close_set;
    use crate::attribute::Attributor;
    use crate::attribute::testkit::*;
    use crate::model::*;

    #[test]
    fn a_transition_delivered_twice_is_a_repeat_but_a_new_life_is_not() {
        let mut a = Attributor::new();
        let client = task(7, "client");
        let connect = tr(
            1,
            0xa,
            client,
            State::CLOSE,
            State::SYN_SENT,
            "10.0.0.1:0",
            "10.0.0.2:80",
        );
        let first = a.observe(&connect).expect("a first transition");
        // The same start again: a copy.
        assert!(
            a.observe(&Transition {
                ts_ns: 2,
                ..connect
            })
            .is_none()
        );
        // A new socket at the address of one whose close was lost goes
        // elsewhere.
        let second = a
            .observe(&Transition {
                ts_ns: 2,
                remote: "10.0.0.3:80".parse().unwrap(),
                ..connect
            })
            .expect("a new life, not a repeat");
        assert_ne!(second.sock, first.sock);
        let established = Transition {
            old: State::SYN_SENT,
            new: State::ESTABLISHED,
            ts_ns: 3,
            local: "10.0.0.1:4000".parse().unwrap(),
            remote: "10.0.0.3:80".parse().unwrap(),
            ..connect
        };
        let row = a.observe(&established).expect("a change of state");
        assert!(
            a.observe(&Transition {
                ts_ns: 4,
                ..established
            })
            .is_none()
        );
        // The repeat left the socket as it was: time in state counts from
        // the first delivery.
        let close = a
            .observe(&Transition {
                old: State::ESTABLISHED,
                new: State::FIN_WAIT1,
                ts_ns: 10,
                ..established
            })
            .expect("a change of state");
        assert_eq!((close.sock, close.dwell_ns), (row.sock, Some(7)));
        // Another socket making the same change is no repeat.
        assert!(
            a.observe(&Transition {
                skaddr: 0xb,
                ..established
            })
            .is_some()
        );
    }

    /// The server side of a churn: the kernel reported a child's last
    /// change twice, the second copy after the socket was gone, and once
    /// after a new child took its address.
    #[test]
    fn a_close_delivered_twice_is_shown_once_even_after_the_address_is_reused() {
        let mut a = Attributor::new();
        let server = task(9, "server");
        let child = |ts, old, new, peer| tr(ts, 0xc, server, old, new, "10.0.0.1:80", peer);
        let peer = "10.0.0.2:5000";
        a.observe_row(&child(1, State::LISTEN, State::SYN_RECV, peer));
        a.observe_row(&child(2, State::SYN_RECV, State::ESTABLISHED, peer));
        a.observe_row(&child(3, State::ESTABLISHED, State::CLOSE_WAIT, peer));
        a.observe_row(&child(4, State::CLOSE_WAIT, State::LAST_ACK, peer));
        let last_ack_close = child(5, State::LAST_ACK, State::CLOSE, peer);
        a.observe_row(&last_ack_close);
        let copy = Transition {
            ts_ns: 6,
            ..last_ack_close
        };
        assert!(a.observe(&copy).is_none(), "a copy after the close");
        let next = "10.0.0.2:5001";
        let reborn = a.observe_row(&child(7, State::LISTEN, State::SYN_RECV, next));
        assert!(a.observe(&copy).is_none(), "a copy after the reuse");
        // The new child was left alone: no gap, and its own changes count.
        let row = a.observe_row(&child(8, State::SYN_RECV, State::ESTABLISHED, next));
        assert_eq!((row.sock, row.dwell_ns), (reborn.sock, Some(1)));
        assert_eq!(a.gaps(), 0);
        // The new child closing the same way is its own close, not a copy.
        a.observe_row(&child(9, State::ESTABLISHED, State::CLOSE_WAIT, next));
        a.observe_row(&child(10, State::CLOSE_WAIT, State::LAST_ACK, next));
        a.observe_row(&child(11, State::LAST_ACK, State::CLOSE, next));
    }

    /// Full churn: hundreds of other sockets close between a close and its
    /// copy, some of them in the same set of remembered closes.
    #[test]
    fn a_close_delivered_twice_is_recognised_after_many_other_closes() {
        fn close(a: &mut Attributor, ts: u64, skaddr: u64, peer: &str) -> Transition {
            let server = task(9, "server");
            let t = |old, new| tr(ts, skaddr, server, old, new, "10.0.0.1:80", peer);
            a.observe_row(&t(State::LISTEN, State::SYN_RECV));
            a.observe_row(&t(State::SYN_RECV, State::ESTABLISHED));
            a.observe_row(&t(State::ESTABLISHED, State::CLOSE_WAIT));
            a.observe_row(&t(State::CLOSE_WAIT, State::LAST_ACK));
            a.observe_row(&t(State::LAST_ACK, State::CLOSE));
            t(State::LAST_ACK, State::CLOSE)
        }
        let mut a = Attributor::new();
        let base = 0xffff_8880_0000_0000u64;
        let first = close(&mut a, 1, base, "10.0.0.2:5000");
        // Three more in the first's set, among 500 others.
        let mut same_set = (1..)
            .map(|i| base + i * 2560)
            .filter(|&sk| close_set(sk) == close_set(base));
        for i in 1..=500u64 {
            let sk = if i % 150 == 0 {
                same_set.next().unwrap()
            } else {
                base + (1 << 40) + i * 2560
            };
            let peer = format!("10.0.1.{}:{}", i % 250, 6000 + i);
            close(&mut a, 1 + i, sk, &peer);
        }
        assert!(
            a.observe(&Transition {
                ts_ns: 600,
                ..first
            })
            .is_none()
        );
    }
}

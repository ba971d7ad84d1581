//! Listeners: a child socket starts with its listener's owner.
//!
//! A child is cloned from its listener in softirq, where the task running is
//! whoever was interrupted, and no process holds it until one accepts it.
//! Until then its rows carry the owner of the listener it came from, found
//! by the child's namespace, port and address. A listener from the
//! start-up snapshot has no kernel address yet; it keeps its own holders
//! until its first transition tells it.

use std::collections::VecDeque;
use std::net::IpAddr;

use crate::fasthash::FastMap;
use crate::model::{Holders, State, Task, Transition};

use super::lives::Sock;

#[derive(Debug)]
struct Listener {
    skaddr: u64,
    addr: IpAddr,
    /// A listener from the snapshot, whose kernel address is not known
    /// (`skaddr` 0), keeps its holders here; the others' are their
    /// socket's.
    holders: Holders,
}

/// Listening sockets by (network namespace, port).
#[derive(Debug, Default)]
pub(super) struct Listeners {
    by_port: FastMap<(u32, u16), Vec<Listener>>,
    /// The listeners closed last, with their owner then: a listener's
    /// close resets the children still in its queue (a Fast Open child in
    /// SYN_RECV, a completed one in ESTABLISHED) just after its own
    /// `LISTEN -> CLOSE`, inside the same call, when the listener is no
    /// longer listed.
    closed: VecDeque<Closed>,
}

#[derive(Debug)]
struct Closed {
    netns: u32,
    port: u16,
    addr: IpAddr,
    owner: Option<Task>,
}

/// Closed listeners remembered: a process closes its listeners one after
/// the other, each one's children right after it.
const CLOSED_KEPT: usize = 8;

/// The owner of listener `l`: its socket's, or, for the snapshot's
/// listener not seen to move yet, its own.
fn owner_of(l: &Listener, socks: &FastMap<u64, Sock>) -> Option<Task> {
    match socks.get(&l.skaddr) {
        Some(s) if l.skaddr != 0 => s.holders.owner(),
        _ => l.holders.owner(),
    }
}

impl Listeners {
    fn add(&mut self, t: &Transition, skaddr: u64, holders: Holders) {
        self.by_port
            .entry((t.netns, t.local.port()))
            .or_default()
            .push(Listener {
                skaddr,
                addr: t.local.ip(),
                holders,
            });
    }

    /// A listener the snapshot found (`t` holds its state in `new`).
    pub(super) fn snapshot_found(&mut self, t: &Transition, holders: Holders) {
        self.add(t, 0, holders);
    }

    /// A socket not followed yet makes `t`. One leaving LISTEN for anything
    /// but a child is the snapshot's listener: it now has an address to
    /// close by, and its holders are its socket's from here on.
    pub(super) fn first_seen(&mut self, t: &Transition) {
        if t.old != State::LISTEN || t.new == State::SYN_RECV {
            return;
        }
        for l in self
            .by_port
            .get_mut(&(t.netns, t.local.port()))
            .into_iter()
            .flatten()
        {
            if l.skaddr == 0 && l.addr == t.local.ip() {
                l.skaddr = t.skaddr;
            }
        }
    }

    /// A socket made `t`: it may start or stop listening.
    pub(super) fn changed(&mut self, socks: &FastMap<u64, Sock>, t: &Transition) {
        if t.new == State::LISTEN {
            self.add(t, t.skaddr, Holders::default());
        } else if t.old == State::LISTEN && t.new != State::SYN_RECV {
            self.forget(socks, t);
        }
    }

    fn forget(&mut self, socks: &FastMap<u64, Sock>, t: &Transition) {
        let key = (t.netns, t.local.port());
        if let Some(list) = self.by_port.get_mut(&key) {
            for l in list.iter().filter(|l| l.skaddr == t.skaddr) {
                if self.closed.len() >= CLOSED_KEPT {
                    self.closed.pop_front();
                }
                self.closed.push_back(Closed {
                    netns: t.netns,
                    port: t.local.port(),
                    addr: l.addr,
                    owner: owner_of(l, socks),
                });
            }
            list.retain(|l| l.skaddr != t.skaddr);
            if list.is_empty() {
                self.by_port.remove(&key);
            }
        }
    }

    /// The owner of the listener a child socket was cloned from: one
    /// listening on the child's port in its network namespace, on its
    /// address or on the wildcard. Several listeners with different owners
    /// (SO_REUSEPORT, or the same port in namespaces the kernel's BTF did
    /// not let us tell apart) make it unknowable from here until the child
    /// is accepted, so unknown.
    /// A queued child whose listener has just closed (the close resets
    /// it) has that listener's owner.
    pub(super) fn owner(&self, socks: &FastMap<u64, Sock>, t: &Transition) -> Option<Task> {
        let serves = |addr: IpAddr| addr == t.local.ip() || addr.is_unspecified();
        let Some(listening) = self.by_port.get(&(t.netns, t.local.port())) else {
            // Only a child already queued: none is born of a closed one.
            if t.old == State::LISTEN {
                return None;
            }
            return self
                .closed
                .iter()
                .rev()
                .find(|c| c.netns == t.netns && c.port == t.local.port() && serves(c.addr))
                .and_then(|c| c.owner);
        };
        let mut owners = listening
            .iter()
            .filter(|l| serves(l.addr))
            .map(|l| owner_of(l, socks));
        let first = owners.next()??;
        owners
            .all(|o| o.is_some_and(|o| o.pid == first.pid))
            .then_some(first)
    }

    /// Process `parent` forked `child`: the child holds the snapshot's
    /// listeners its parent holds. Says whether it got any.
    pub(super) fn forked(&mut self, parent: u32, child: u32) -> bool {
        let mut any = false;
        for l in self.by_port.values_mut().flatten() {
            let as_parent = l.holders.all().find(|t| t.pid == parent).copied();
            if let Some(p) = as_parent {
                l.holders.add(Task { pid: child, ..p });
                any = true;
            }
        }
        any
    }

    /// What process `task.pid` is called, and where it runs, now.
    pub(super) fn refresh(&mut self, task: Task) {
        for l in self.by_port.values_mut().flatten() {
            l.holders.refresh(task);
        }
    }

    /// Process `pid` is exiting: see [`Holders::remove_unless_last`].
    pub(super) fn exited(&mut self, pid: u32) {
        for l in self.by_port.values_mut().flatten() {
            l.holders.remove_unless_last(pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::attribute::Attributor;
    use crate::attribute::testkit::*;
    use crate::model::*;

    #[test]
    fn child_of_ambiguous_listeners_has_no_owner() {
        let mut a = Attributor::new();
        a.observe_row(&tr(
            0,
            1,
            task(1, "a"),
            State::CLOSE,
            State::LISTEN,
            "0.0.0.0:80",
            "0.0.0.0:0",
        ));
        a.observe_row(&tr(
            0,
            2,
            task(2, "b"),
            State::CLOSE,
            State::LISTEN,
            "0.0.0.0:80",
            "0.0.0.0:0",
        ));
        let r = a.observe_row(&tr(
            1,
            3,
            task(3, "c"),
            State::LISTEN,
            State::SYN_RECV,
            "127.0.0.1:80",
            "127.0.0.1:9",
        ));
        assert_eq!(r.owner, None);
        // Once one listener closes, the other one is the only candidate.
        a.observe_row(&tr(
            2,
            2,
            task(2, "b"),
            State::LISTEN,
            State::CLOSE,
            "0.0.0.0:80",
            "0.0.0.0:0",
        ));
        let r = a.observe_row(&tr(
            3,
            4,
            task(3, "c"),
            State::LISTEN,
            State::SYN_RECV,
            "127.0.0.1:80",
            "127.0.0.1:10",
        ));
        assert_eq!(r.owner.map(|o| o.pid), Some(1));
    }

    #[test]
    fn children_reset_by_their_listeners_close_name_its_owner() {
        let mut a = Attributor::new();
        let server = task(100, "server");
        let softirq = task(0, "swapper/0");
        a.observe_row(&tr(
            0,
            LISTENER,
            server,
            State::CLOSE,
            State::LISTEN,
            "0.0.0.0:80",
            "0.0.0.0:0",
        ));
        // A Fast Open child, queued in SYN_RECV (its SYN carried data).
        let queued = a.observe_row(&tr(
            10,
            CHILD,
            softirq,
            State::LISTEN,
            State::SYN_RECV,
            "127.0.0.1:80",
            "127.0.0.1:5000",
        ));
        assert_eq!((queued.owner, queued.queued), (Some(server), true));
        // The server closes its listener; the kernel resets the child
        // inside that close, after the listener's own row.
        a.observe_row(&tr(
            20,
            LISTENER,
            server,
            State::LISTEN,
            State::CLOSE,
            "0.0.0.0:80",
            "0.0.0.0:0",
        ));
        let reset = a.observe_row(&tr(
            20,
            CHILD,
            server,
            State::SYN_RECV,
            State::CLOSE,
            "127.0.0.1:80",
            "127.0.0.1:5000",
        ));
        assert_eq!((reset.owner, reset.queued), (Some(server), true));
        // Another port's child does not inherit it.
        let other = a.observe_row(&tr(
            30,
            CLIENT,
            softirq,
            State::LISTEN,
            State::SYN_RECV,
            "127.0.0.1:81",
            "127.0.0.1:5001",
        ));
        assert_eq!(other.owner, None);
    }

    #[test]
    fn same_port_in_two_namespaces_has_two_owners() {
        let mut a = Attributor::new();
        let mut in_ns = |ns: u32, t: Transition| a.observe_row(&Transition { netns: ns, ..t });
        let listen = |sk, pid| {
            tr(
                0,
                sk,
                task(pid, "srv"),
                State::CLOSE,
                State::LISTEN,
                "0.0.0.0:80",
                "0.0.0.0:0",
            )
        };
        in_ns(10, listen(1, 100));
        in_ns(20, listen(2, 200));
        let child = |sk| {
            tr(
                1,
                sk,
                task(9, "x"),
                State::LISTEN,
                State::SYN_RECV,
                "127.0.0.1:80",
                "127.0.0.1:9",
            )
        };
        assert_eq!(in_ns(10, child(3)).owner.map(|o| o.pid), Some(100));
        assert_eq!(in_ns(20, child(4)).owner.map(|o| o.pid), Some(200));
    }

    #[test]
    fn an_existing_listener_gives_its_owner_to_children_and_keeps_its_id() {
        let mut a = Attributor::new();
        let nginx = task(80, "nginx");
        let mut snap = tr(
            0,
            0,
            Task::default(),
            State(0),
            State::LISTEN,
            "0.0.0.0:80",
            "0.0.0.0:0",
        );
        snap.skaddr = 0;
        let l = a.existing(&snap, Holders::only(nginx));
        assert_eq!(l.origin, Origin::Snapshot);
        let child = a.observe_row(&tr(
            5,
            9,
            task(1, "x"),
            State::LISTEN,
            State::SYN_RECV,
            "10.0.0.1:80",
            "10.0.0.2:5",
        ));
        assert_eq!(child.owner, Some(nginx));
        // Its first transition: same id, time in state unknown.
        let close = a.observe_row(&tr(
            9,
            7,
            nginx,
            State::LISTEN,
            State::CLOSE,
            "0.0.0.0:80",
            "0.0.0.0:0",
        ));
        assert_eq!((close.sock, close.dwell_ns), (l.sock, None));
        // Closed: children no longer inherit it.
        let orphan = a.observe_row(&tr(
            10,
            11,
            task(1, "x"),
            State::LISTEN,
            State::SYN_RECV,
            "10.0.0.1:80",
            "10.0.0.2:6",
        ));
        assert_eq!(orphan.owner, None);
    }

    #[test]
    fn a_launcher_that_exits_after_daemonizing_is_never_the_listeners_owner() {
        let (launcher, master) = (task(30, "nginx"), task(31, "nginx"));
        let mut a = Attributor::new();
        let any = task(0, "swapper/0");
        a.observe_row(&tr(
            0,
            LISTENER,
            launcher,
            State::CLOSE,
            State::LISTEN,
            "0.0.0.0:80",
            "0.0.0.0:0",
        ));
        a.forked(30, 31);
        a.exited(30);
        a.forked(31, 32);
        let child = a.observe_row(&tr(
            9,
            CHILD,
            any,
            State::LISTEN,
            State::SYN_RECV,
            "127.0.0.1:80",
            "127.0.0.1:5000",
        ));
        assert_eq!(child.owner.map(|o| o.pid), Some(master.pid));
        let holders: Vec<u32> = a.holders(LISTENER).unwrap().all().map(|t| t.pid).collect();
        assert_eq!(
            holders,
            [31, 32],
            "the master and its worker, as ss -p lists them"
        );
    }
}

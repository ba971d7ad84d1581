//! Holders: which processes hold each socket, across accept, fork, release
//! and exit.
//!
//! None of these is a transition, and each is reported as an event of its
//! own: accept() hands a queued child to the process that accepts it, a
//! fork gives the child copies of every descriptor, a close() that is not
//! the last reference and an exit give them up. An index of the sockets
//! each process holds makes a fork or an exit cost the sockets involved,
//! not all of them. What no event tells (a descriptor received over a Unix
//! socket) leaves the socket [`Unverified`], to be looked up.

use crate::fasthash::{FastMap, FastSet};
use crate::model::{Holders, Row, Task, Transition};

use super::Attributor;
use super::lives::Sock;

/// A socket whose holders are not known for sure: the one known gave its
/// descriptor up (or exited) and no other is known. `ss -p` tells.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Unverified {
    pub skaddr: u64,
    pub sock: u64,
    pub t: Transition,
}

/// What the holders need beyond the sockets themselves.
#[derive(Debug, Default)]
pub(super) struct Holding {
    /// The sockets each process holds, by thread group id: what a fork
    /// copies and an exit gives up.
    by_pid: FastMap<u32, FastSet<u64>>,
    /// Sockets whose holders need looking up (see [`Unverified`]).
    unverified: FastSet<u64>,
    /// Processes known only from their fork: they hold sockets under the
    /// name and cgroup their parent had then, which an exec, a rename or a
    /// move to another cgroup since may have changed. See
    /// [`Attributor::stale_owner`].
    inherited: FastSet<u32>,
}

impl Holding {
    fn hold(&mut self, pid: u32, skaddr: u64) {
        self.by_pid.entry(pid).or_default().insert(skaddr);
    }

    fn drop_index(&mut self, pid: u32, skaddr: u64) {
        if let Some(set) = self.by_pid.get_mut(&pid) {
            set.remove(&skaddr);
            if set.is_empty() {
                self.by_pid.remove(&pid);
            }
        }
    }

    /// The socket at `skaddr` is held by `holders`.
    pub(super) fn index(&mut self, skaddr: u64, holders: &Holders) {
        for h in holders.all() {
            self.hold(h.pid, skaddr);
        }
    }

    /// The socket at `skaddr` is no longer held by `holders`.
    pub(super) fn unindex(&mut self, skaddr: u64, holders: &Holders) {
        for h in holders.all() {
            self.drop_index(h.pid, skaddr);
        }
    }

    /// The socket's owner made `t` itself (process context): it holds the
    /// socket, first, and a queued child is no longer its listener's.
    pub(super) fn owner_acted(&mut self, sock: &mut Sock, t: &Transition) {
        sock.queued = false;
        sock.accepted_by = None;
        if !sock.holders.contains(t.task.pid) {
            self.hold(t.task.pid, t.skaddr);
        }
        sock.holders.promote(t.task);
    }

    /// The socket at `skaddr` closed (held by `holders`, if it was
    /// followed): nobody holds it, and nothing about it is in doubt.
    pub(super) fn closed(&mut self, skaddr: u64, holders: Option<&Holders>) {
        if let Some(holders) = holders {
            self.unindex(skaddr, holders);
        }
        self.unverified.remove(&skaddr);
    }
}

/// Process `parent`, seen as `as_parent`, forked `child`, which holds a
/// copy of `sock`'s descriptor.
fn fork_sock(sock: &mut Sock, as_parent: Task, parent: u32, child: u32) {
    let copy = Task {
        pid: child,
        ..as_parent
    };
    if sock.accepted_by.take() == Some(parent) {
        // A forking server: the child serves the connection its parent
        // just accepted, while the parent may take a while to close its
        // copy (PostgreSQL's postmaster ran after its backend had served a
        // whole session, 12 ms). A fork for anything else (a helper run on
        // the side) gives way again when the child exits.
        sock.holders.promote(copy);
    } else {
        sock.holders.add(copy);
    }
}

impl Attributor {
    /// A process made a transition itself: if it was known only from its
    /// fork, what it is called now is what it just told.
    pub(super) fn refresh_if_inherited(&mut self, task: Task) {
        if self.holding.inherited.contains(&task.pid) {
            self.refresh_task(task);
        }
    }

    /// accept() returned the socket at `skaddr` to `task`: its owner from
    /// now on, and the only process holding it.
    pub fn accepted(&mut self, skaddr: u64, task: Task) {
        self.refresh_if_inherited(task);
        let Some(sock) = self.socks.get_mut(&skaddr) else {
            return;
        };
        let before = std::mem::replace(&mut sock.holders, Holders::only(task));
        sock.queued = false;
        sock.accepted_by = Some(task.pid);
        self.holding.unindex(skaddr, &before);
        self.holding.hold(task.pid, skaddr);
    }

    /// Process `parent` forked `child`: the child holds copies of every
    /// descriptor, so every socket the parent holds.
    pub fn forked(&mut self, parent: u32, child: u32) {
        let Some(held) = self.holding.by_pid.get(&parent) else {
            if self.listeners.forked(parent, child) {
                self.holding.inherited.insert(child);
            }
            return;
        };
        let held: Vec<u64> = held.iter().copied().collect();
        for skaddr in &held {
            if let Some(sock) = self.socks.get_mut(skaddr) {
                let as_parent = sock.holders.all().find(|t| t.pid == parent).copied();
                let Some(p) = as_parent else { continue };
                fork_sock(sock, p, parent, child);
            }
        }
        self.holding.by_pid.entry(child).or_default().extend(held);
        self.listeners.forked(parent, child);
        self.holding.inherited.insert(child);
    }

    /// The process of `row`'s owner, when it is known only from its fork:
    /// its name and cgroup should be looked up (`/proc`) before the row is
    /// shown, and given to [`Attributor::refresh_task`]. A daemon renames
    /// itself, a socket-activated service execs, right after its fork, and
    /// rows made in softirq before it acts itself would otherwise carry
    /// its parent's name.
    pub fn stale_owner(&self, row: &Row) -> Option<u32> {
        if self.holding.inherited.is_empty() {
            return None;
        }
        row.owner
            .map(|o| o.pid)
            .filter(|pid| self.holding.inherited.contains(pid))
    }

    /// What process `task.pid` is called, and where it runs, now: every
    /// socket it holds says so from here on.
    pub fn refresh_task(&mut self, task: Task) {
        self.holding.inherited.remove(&task.pid);
        self.listeners.refresh(task);
        for skaddr in self.holding.by_pid.get(&task.pid).into_iter().flatten() {
            if let Some(sock) = self.socks.get_mut(skaddr) {
                sock.holders.refresh(task);
            }
        }
    }

    /// Process `pid` closed a descriptor of the socket at `skaddr` that
    /// another reference outlives.
    pub fn released(&mut self, skaddr: u64, pid: u32) {
        let Some(sock) = self.socks.get_mut(&skaddr) else {
            return;
        };
        if sock.holders.remove_unless_last(pid) {
            self.holding.drop_index(pid, skaddr);
        } else {
            // Someone no event named holds it (a descriptor passed over a
            // Unix socket, or a second descriptor of the same process).
            self.holding.unverified.insert(skaddr);
        }
    }

    /// Process `pid` is exiting: it holds nothing any more. A socket it
    /// held alone keeps it as its owner: the socket's close, which its exit
    /// makes, is still its doing; should no close come, someone else holds
    /// it, and the socket is looked up.
    pub fn exited(&mut self, pid: u32) {
        self.holding.inherited.remove(&pid);
        self.listeners.exited(pid);
        let Some(held) = self.holding.by_pid.remove(&pid) else {
            return;
        };
        for skaddr in held {
            let Some(sock) = self.socks.get_mut(&skaddr) else {
                continue;
            };
            if !sock.holders.remove_unless_last(pid) {
                self.holding.unverified.insert(skaddr);
                // Still indexed: a fork before the exit was reported would
                // otherwise miss it.
                self.holding.hold(pid, skaddr);
            }
        }
    }

    /// The sockets whose holders are in doubt, to look up; each is handed
    /// out once per doubt.
    pub fn take_unverified(&mut self) -> Vec<Unverified> {
        let mut out: Vec<Unverified> = self
            .holding
            .unverified
            .drain()
            .filter_map(|skaddr| {
                let s = self.socks.get(&skaddr)?;
                Some(Unverified {
                    skaddr,
                    sock: s.id,
                    t: s.last,
                })
            })
            .collect();
        out.sort_by_key(|u| u.sock);
        out
    }

    /// Every socket followed now, to look up who holds it.
    pub fn open_sockets(&self) -> Vec<Unverified> {
        let mut out: Vec<Unverified> = self
            .socks
            .iter()
            .map(|(&skaddr, s)| Unverified {
                skaddr,
                sock: s.id,
                t: s.last,
            })
            .collect();
        out.sort_by_key(|u| u.sock);
        out
    }

    /// What a look-up (`ss -p`'s way) found holding the socket at
    /// `skaddr`. An empty list changes nothing: the socket may have closed
    /// meanwhile, or be held where we may not look. Returns the holders now
    /// known if they changed.
    pub fn verified(&mut self, skaddr: u64, found: &[Task]) -> Option<Holders> {
        if found.is_empty() {
            return None;
        }
        let sock = self.socks.get_mut(&skaddr)?;
        let mut list: Vec<Task> = found.to_vec();
        // The owner stays first if it still holds the socket.
        if let Some(owner) = sock.holders.owner()
            && let Some(i) = list.iter().position(|t| t.pid == owner.pid)
        {
            let keep = list.remove(i);
            list.insert(
                0,
                Task {
                    cgroup: keep.cgroup.or(owner.cgroup),
                    ..keep
                },
            );
        }
        let now = Holders::from_list(&list);
        if now == sock.holders {
            return None;
        }
        let before = std::mem::replace(&mut sock.holders, now.clone());
        sock.queued = false;
        self.holding.unindex(skaddr, &before);
        self.holding.index(skaddr, &now);
        Some(now)
    }

    /// The holders known of the socket at `skaddr`.
    pub fn holders(&self, skaddr: u64) -> Option<&Holders> {
        self.socks.get(&skaddr).map(|s| &s.holders)
    }
}

#[cfg(test)]
mod tests {
    use crate::attribute::Attributor;
    use crate::attribute::testkit::*;
    use crate::model::*;

    /// A listener of `owner` on :80 and one queued child of it at CHILD.
    fn queued_child(a: &mut Attributor, owner: Task) -> Row {
        let any = task(0, "swapper/0");
        a.observe_row(&tr(
            0,
            LISTENER,
            owner,
            State::CLOSE,
            State::LISTEN,
            "0.0.0.0:80",
            "0.0.0.0:0",
        ));
        a.observe_row(&tr(
            10,
            CHILD,
            any,
            State::LISTEN,
            State::SYN_RECV,
            "127.0.0.1:80",
            "127.0.0.1:5000",
        ));
        a.observe_row(&tr(
            10,
            CHILD,
            any,
            State::SYN_RECV,
            State::ESTABLISHED,
            "127.0.0.1:80",
            "127.0.0.1:5000",
        ))
    }

    fn softirq_close_wait(a: &mut Attributor) -> Row {
        let any = task(0, "swapper/0");
        a.observe_row(&tr(
            50,
            CHILD,
            any,
            State::ESTABLISHED,
            State::CLOSE_WAIT,
            "127.0.0.1:80",
            "127.0.0.1:5000",
        ))
    }

    #[test]
    fn a_worker_that_accepts_owns_the_connection_from_then_on() {
        let (master, worker) = (task(10, "nginx"), task(11, "nginx"));
        let mut a = Attributor::new();
        let queued = queued_child(&mut a, master);
        assert_eq!((queued.owner, queued.queued), (Some(master), true));
        a.accepted(CHILD, worker);
        let after = softirq_close_wait(&mut a);
        assert_eq!((after.owner, after.queued), (Some(worker), false));
        assert_eq!(a.holders(CHILD).unwrap().len(), 1);
    }

    #[test]
    fn a_daemon_renamed_after_its_fork_is_named_as_it_is_now() {
        let (launcher, daemon) = (task(30, "launcher"), task(31, "daemon"));
        let mut a = Attributor::new();
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
        // Known only from the fork: still under the launcher's name, and
        // said to be stale until its current name is given.
        let queued = a.observe_row(&tr(
            10,
            CHILD,
            task(0, "swapper/0"),
            State::LISTEN,
            State::SYN_RECV,
            "127.0.0.1:80",
            "127.0.0.1:5000",
        ));
        assert_eq!(
            queued.owner,
            Some(Task {
                pid: 31,
                ..launcher
            })
        );
        assert_eq!(a.stale_owner(&queued), Some(31));
        a.refresh_task(daemon);
        assert_eq!(a.holders(LISTENER).unwrap().owner(), Some(daemon));
        let next = a.observe_row(&tr(
            10,
            CHILD,
            task(0, "swapper/0"),
            State::SYN_RECV,
            State::ESTABLISHED,
            "127.0.0.1:80",
            "127.0.0.1:5000",
        ));
        assert_eq!((next.owner, a.stale_owner(&next)), (Some(daemon), None));
    }

    #[test]
    fn a_forking_server_child_owns_the_socket_once_the_parent_closes_its_copy() {
        let (parent, child) = (task(20, "postgres"), task(21, "postgres"));
        let mut a = Attributor::new();
        queued_child(&mut a, parent);
        a.accepted(CHILD, parent);
        a.forked(20, 21);
        // Both hold it until the parent's close() of its copy, the child
        // first: it serves the connection.
        let both: Vec<u32> = a.holders(CHILD).unwrap().all().map(|t| t.pid).collect();
        assert_eq!(both, [21, 20]);
        a.released(CHILD, 20);
        let after = softirq_close_wait(&mut a);
        assert_eq!(after.owner, Some(child));
        // The listener the child inherited and closed stays the parent's.
        a.released(LISTENER, 21);
        assert_eq!(a.holders(LISTENER).unwrap().owner(), Some(parent));
        assert!(
            a.take_unverified().is_empty(),
            "every step was told by an event"
        );
    }

    #[test]
    fn a_forking_server_child_owns_the_socket_before_the_parent_closes_its_copy() {
        let (parent, child) = (task(20, "postgres"), task(21, "postgres"));
        let mut a = Attributor::new();
        queued_child(&mut a, parent);
        a.accepted(CHILD, parent);
        a.forked(20, 21);
        // The client is done before the parent got round to its close().
        assert_eq!(softirq_close_wait(&mut a).owner, Some(child));
        a.released(CHILD, 20);
        assert_eq!(a.holders(CHILD).unwrap().all().count(), 1);
        // A second fork of the parent's (the next connection's backend)
        // takes nothing more of this one.
        let mut b = Attributor::new();
        queued_child(&mut b, parent);
        b.accepted(CHILD, parent);
        b.forked(20, 21);
        b.forked(20, 22);
        let all: Vec<u32> = b.holders(CHILD).unwrap().all().map(|t| t.pid).collect();
        assert_eq!(all, [21, 20, 22]);
    }

    #[test]
    fn a_helper_forked_by_a_server_that_uses_the_socket_takes_nothing() {
        let server = task(10, "server");
        let mut a = Attributor::new();
        queued_child(&mut a, server);
        a.accepted(CHILD, server);
        // The server writes its answer and shuts the sending side down
        // (process context) before it runs a helper.
        a.observe_row(&tr(
            20,
            CHILD,
            server,
            State::ESTABLISHED,
            State::FIN_WAIT1,
            "127.0.0.1:80",
            "127.0.0.1:5000",
        ));
        a.forked(10, 11);
        let all: Vec<u32> = a.holders(CHILD).unwrap().all().map(|t| t.pid).collect();
        assert_eq!(all, [10, 11]);
        a.exited(11);
        assert_eq!(a.holders(CHILD).unwrap().owner(), Some(server));
        assert_eq!(a.holders(CHILD).unwrap().all().count(), 1);
    }

    #[test]
    fn a_descriptor_passed_over_a_unix_socket_is_looked_up_when_its_sender_lets_go() {
        let (sender, receiver) = (task(40, "sender"), task(41, "receiver"));
        let mut a = Attributor::new();
        queued_child(&mut a, sender);
        a.accepted(CHILD, sender);
        // No event names the receiver: the sender's close leaves a doubt.
        a.released(CHILD, 40);
        let doubt = a.take_unverified();
        assert_eq!(doubt.iter().map(|u| u.skaddr).collect::<Vec<_>>(), [CHILD]);
        assert!(a.take_unverified().is_empty(), "handed out once");
        // Until the look-up answers, the sender stays named, not nobody.
        assert_eq!(a.holders(CHILD).unwrap().owner(), Some(sender));
        let changed = a.verified(CHILD, &[receiver]).expect("holders changed");
        assert_eq!(changed.owner(), Some(receiver));
        assert_eq!(softirq_close_wait(&mut a).owner, Some(receiver));
        // The receiver's own fork is followed like any other holder's.
        a.forked(41, 42);
        assert_eq!(a.holders(CHILD).unwrap().len(), 2);
        assert_eq!(
            a.verified(CHILD, &[]),
            None,
            "an empty look-up changes nothing"
        );
    }

    #[test]
    fn a_process_that_exits_holding_a_socket_alone_still_closes_it() {
        let server = task(50, "server");
        let mut a = Attributor::new();
        queued_child(&mut a, server);
        a.accepted(CHILD, server);
        a.exited(50);
        // Its exit closes its sockets, in its own context.
        let close = a.observe_row(&tr(
            60,
            CHILD,
            server,
            State::ESTABLISHED,
            State::FIN_WAIT1,
            "127.0.0.1:80",
            "127.0.0.1:5000",
        ));
        assert_eq!(close.owner, Some(server));
        let any = task(0, "swapper/0");
        a.observe_row(&tr(
            61,
            CHILD,
            any,
            State::FIN_WAIT1,
            State::CLOSE,
            "127.0.0.1:80",
            "127.0.0.1:5000",
        ));
        a.observe_row(&tr(
            62,
            LISTENER,
            server,
            State::LISTEN,
            State::CLOSE,
            "0.0.0.0:80",
            "0.0.0.0:0",
        ));
        assert!(
            a.take_unverified().is_empty(),
            "closed: nothing left to look up"
        );
    }
}

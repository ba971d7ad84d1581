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

use std::collections::hash_map::Entry;

use crate::fasthash::{FastMap, FastSet};
use std::net::{IpAddr, SocketAddr};

use crate::model::{Close, Holders, Origin, Row, State, Task, Transition};

#[derive(Debug)]
struct Sock {
    id: u64,
    holders: Holders,
    /// A child socket no process has accepted yet: its rows carry its
    /// listener's owner.
    queued: bool,
    /// When the socket entered its current state, if we saw that happen.
    since_ns: Option<u64>,
    /// Its latest transition (current state, addresses).
    last: Transition,
    /// `--stuck` already warned about it in its current state.
    warned: bool,
    /// The process that accepted it, until a process acts on it: a fork
    /// then hands it to the child (see [`Attributor::forked`]).
    accepted_by: Option<u32>,
}

#[derive(Debug)]
struct Listener {
    skaddr: u64,
    addr: IpAddr,
    /// A listener from the snapshot, whose kernel address is not known
    /// (`skaddr` 0), keeps its holders here; the others' are their
    /// socket's.
    holders: Holders,
}

/// A socket whose holders are not known for sure: the one known gave its
/// descriptor up (or exited) and no other is known. `ss -p` tells.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Unverified {
    pub skaddr: u64,
    pub sock: u64,
    pub t: Transition,
}

/// The sockets seen so far. Memory is bounded by the number of sockets open
/// at once: a socket is forgotten when it reaches CLOSE.
#[derive(Debug, Default)]
pub struct Attributor {
    socks: FastMap<u64, Sock>,
    /// Listening sockets by (network namespace, port).
    listeners: FastMap<(u32, u16), Vec<Listener>>,
    /// Sockets a reset was received on, until their `-> CLOSE`.
    reset_received: FastSet<u64>,
    /// Sockets from the start-up snapshot, by (netns, local, remote), until
    /// their first transition tells their kernel address.
    existing: FastMap<(u32, SocketAddr, SocketAddr), (u64, Holders)>,
    next_id: u64,
    /// Sockets whose history skipped a state: see [`Attributor::gaps`].
    gaps: u64,
    /// Sockets whose end never arrived, until taken.
    unseen_ends: Vec<UnseenEnd>,
    /// The latest closes, by address: the second copy of a close the
    /// kernel reports twice arrives when the socket is gone.
    closes: Vec<CloseSet>,
    /// The way of each set its next close goes in: the oldest (4 KB, where
    /// the sets take 256).
    close_next: Vec<u8>,
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

/// Sets of [`Attributor::closes`]: copies come a few hundred microseconds
/// apart, when a few hundred sockets have closed.
const CLOSE_SETS: usize = 4096;

/// Closes kept per set, the oldest replaced. With one, any of
/// the hundreds of closes between a close and its copy could take its set
/// (one in 30 at full churn), and the copy was shown as a socket of its own.
const CLOSE_WAYS: usize = 8;

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

/// A socket that never reported its way to CLOSE: its address started a new
/// socket while it was last seen in `state`, at `by_ns`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UnseenEnd {
    pub sock: u64,
    pub state: State,
    pub by_ns: u64,
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

    /// A socket that existed when tracing started (`t` holds its state in
    /// `new`): gets an id now, and its owner is known to its children and
    /// its first transition.
    pub fn existing(&mut self, t: &Transition, holders: Holders) -> Row {
        self.next_id += 1;
        let id = self.next_id;
        let owner = holders.owner();
        if t.new == State::LISTEN {
            self.listeners
                .entry((t.netns, t.local.port()))
                .or_default()
                .push(Listener {
                    skaddr: 0,
                    addr: t.local.ip(),
                    holders: holders.clone(),
                });
        }
        self.existing
            .insert((t.netns, t.local, t.remote), (id, holders));
        Row {
            t: *t,
            sock: id,
            owner,
            dwell_ns: None,
            close: None,
            origin: Origin::Snapshot,
            queued: false,
        }
    }

    /// A reset arrived on the socket at `skaddr`: its coming `-> CLOSE` is
    /// its consequence.
    /// Resets are not filtered in the kernel: only the sockets we follow
    /// count, and only until they close.
    pub fn reset_received(&mut self, skaddr: u64) {
        if self.socks.contains_key(&skaddr) {
            self.reset_received.insert(skaddr);
        }
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
        // A socket address can be reused once the socket is freed; a start
        // of life on a known address is a new socket, and the old one's
        // way to CLOSE never arrived.
        if starts_life(t.old, t.new) {
            if let Some(old) = self.socks.remove(&t.skaddr) {
                self.unindex(t.skaddr, &old.holders);
                self.gaps += 1;
                self.unseen_ends.push(UnseenEnd {
                    sock: old.id,
                    state: old.last.new,
                    by_ns: t.ts_ns,
                });
            }
            self.reset_received.remove(&t.skaddr);
        }
        if in_owner_context(t.old, t.new) && self.inherited.contains(&t.task.pid) {
            // The process tells its name itself: what its fork left is stale.
            self.refresh_task(t.task);
        }
        let sock = match self.socks.entry(t.skaddr) {
            Entry::Occupied(o) => {
                self.gaps += u64::from(t.old != o.get().last.new);
                o.into_mut()
            }
            Entry::Vacant(v) => {
                // A socket from the snapshot keeps its id and holders; the
                // time it entered its state stays unknown.
                let known = if starts_life(t.old, t.new) {
                    None
                } else {
                    self.existing.remove(&(t.netns, t.local, t.remote))
                };
                // A child's LISTEN -> SYN_RECV fires just before this, in
                // the same softirq: a child first seen here lost it.
                if known.is_none() && (t.old, t.new) == (State::SYN_RECV, State::ESTABLISHED) {
                    self.gaps += 1;
                }
                let queued = t.old == State::LISTEN && t.new == State::SYN_RECV;
                let (id, holders) = match known {
                    Some(k) => k,
                    None => {
                        self.next_id += 1;
                        (self.next_id, Holders::default())
                    }
                };
                if t.old == State::LISTEN && !queued {
                    // The snapshot's listener now has an address to close by,
                    // and its holders are its socket's from here on.
                    for l in self
                        .listeners
                        .get_mut(&(t.netns, t.local.port()))
                        .into_iter()
                        .flatten()
                    {
                        if l.skaddr == 0 && l.addr == t.local.ip() {
                            l.skaddr = t.skaddr;
                        }
                    }
                }
                for h in holders.all() {
                    self.by_pid.entry(h.pid).or_default().insert(t.skaddr);
                }
                v.insert(Sock {
                    id,
                    holders,
                    queued,
                    since_ns: None,
                    last: *t,
                    warned: false,
                    accepted_by: None,
                })
            }
        };
        if in_owner_context(t.old, t.new) {
            sock.queued = false;
            sock.accepted_by = None;
            if !sock.holders.contains(t.task.pid) {
                self.by_pid.entry(t.task.pid).or_default().insert(t.skaddr);
            }
            sock.holders.promote(t.task);
        }
        let queued = sock.queued;
        let owner = if queued {
            let listeners = &self.listeners;
            let socks = &self.socks;
            listener_owner(listeners, socks, t)
        } else {
            sock.holders.owner()
        };
        let sock = self.socks.get_mut(&t.skaddr).expect("inserted above");
        let mut row = Row {
            t: *t,
            sock: sock.id,
            owner,
            dwell_ns: sock.since_ns.map(|s| t.ts_ns.saturating_sub(s)),
            close: None,
            origin: Origin::Tracepoint,
            queued,
        };
        if t.new == State::CLOSE && self.reset_received.remove(&t.skaddr) && t.old != State::LISTEN
        {
            row.close = Some(if t.old == State::SYN_SENT {
                Close::Refused
            } else {
                Close::ResetReceived
            });
        }
        sock.since_ns = Some(t.ts_ns);
        sock.last = *t;
        sock.warned = false;

        if t.new == State::LISTEN {
            self.listeners
                .entry((t.netns, t.local.port()))
                .or_default()
                .push(Listener {
                    skaddr: t.skaddr,
                    addr: t.local.ip(),
                    holders: Holders::default(),
                });
        } else if t.old == State::LISTEN && t.new != State::SYN_RECV {
            self.forget_listener(t);
        }
        if t.new == State::CLOSE {
            if let Some(gone) = self.socks.remove(&t.skaddr) {
                self.unindex(t.skaddr, &gone.holders);
            }
            self.unverified.remove(&t.skaddr);
            if self.closes.is_empty() {
                self.closes.resize(CLOSE_SETS, CloseSet::default());
                self.close_next.resize(CLOSE_SETS, 0);
            }
            // Over the set's oldest: a store, which does not wait for the
            // set's line to come in as reading the set would.
            let at = close_set(t.skaddr);
            let way = usize::from(self.close_next[at]);
            self.closes[at].0[way] = close_print(t);
            self.close_next[at] = ((way + 1) % CLOSE_WAYS) as u8;
        }
        Some(row)
    }

    /// A second copy of the last change of the socket now at `t`'s
    /// address (of its start, only with the same addresses: otherwise a new
    /// socket took the address), or of the close of the one before it.
    fn is_late_copy(&self, t: &Transition) -> bool {
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
            && self
                .closes
                .get(close_set(t.skaddr))
                .is_some_and(|set| set.0.contains(&close_print(t)))
    }

    fn forget_listener(&mut self, t: &Transition) {
        let key = (t.netns, t.local.port());
        if let Some(list) = self.listeners.get_mut(&key) {
            list.retain(|l| l.skaddr != t.skaddr);
            if list.is_empty() {
                self.listeners.remove(&key);
            }
        }
    }

    fn unindex(&mut self, skaddr: u64, holders: &Holders) {
        for h in holders.all() {
            if let Some(set) = self.by_pid.get_mut(&h.pid) {
                set.remove(&skaddr);
                if set.is_empty() {
                    self.by_pid.remove(&h.pid);
                }
            }
        }
    }

    /// accept() returned the socket at `skaddr` to `task`: its owner from
    /// now on, and the only process holding it.
    pub fn accepted(&mut self, skaddr: u64, task: Task) {
        if self.inherited.contains(&task.pid) {
            self.refresh_task(task);
        }
        let Some(sock) = self.socks.get_mut(&skaddr) else {
            return;
        };
        let before = std::mem::replace(&mut sock.holders, Holders::only(task));
        sock.queued = false;
        sock.accepted_by = Some(task.pid);
        self.unindex(skaddr, &before);
        self.by_pid.entry(task.pid).or_default().insert(skaddr);
    }

    /// Process `parent` forked `child`: the child holds copies of every
    /// descriptor, so every socket the parent holds.
    pub fn forked(&mut self, parent: u32, child: u32) {
        let Some(held) = self.by_pid.get(&parent) else {
            if self.fork_listeners(parent, child) {
                self.inherited.insert(child);
            }
            return;
        };
        let held: Vec<u64> = held.iter().copied().collect();
        for skaddr in &held {
            if let Some(sock) = self.socks.get_mut(skaddr) {
                let as_parent = sock.holders.all().find(|t| t.pid == parent).copied();
                let Some(p) = as_parent else { continue };
                if sock.accepted_by.take() == Some(parent) {
                    // A forking server: the child serves the connection its
                    // parent just accepted, while the parent may take a
                    // while to close its copy (PostgreSQL's postmaster ran
                    // after its backend had served a whole session, 12 ms).
                    // A fork for anything else (a helper run on the side)
                    // gives way again when the child exits.
                    sock.holders.promote(Task { pid: child, ..p });
                } else {
                    sock.holders.add(Task { pid: child, ..p });
                }
            }
        }
        self.by_pid.entry(child).or_default().extend(held);
        self.fork_listeners(parent, child);
        self.inherited.insert(child);
    }

    /// Says whether the child got any of them.
    fn fork_listeners(&mut self, parent: u32, child: u32) -> bool {
        let mut any = false;
        for l in self.listeners.values_mut().flatten() {
            let as_parent = l.holders.all().find(|t| t.pid == parent).copied();
            if let Some(p) = as_parent {
                l.holders.add(Task { pid: child, ..p });
                any = true;
            }
        }
        any
    }

    /// The process of `row`'s owner, when it is known only from its fork:
    /// its name and cgroup should be looked up (`/proc`) before the row is
    /// shown, and given to [`Attributor::refresh_task`]. A daemon renames
    /// itself, a socket-activated service execs, right after its fork, and
    /// rows made in softirq before it acts itself would otherwise carry
    /// its parent's name.
    pub fn stale_owner(&self, row: &Row) -> Option<u32> {
        if self.inherited.is_empty() {
            return None;
        }
        row.owner
            .map(|o| o.pid)
            .filter(|pid| self.inherited.contains(pid))
    }

    /// What process `task.pid` is called, and where it runs, now: every
    /// socket it holds says so from here on.
    pub fn refresh_task(&mut self, task: Task) {
        self.inherited.remove(&task.pid);
        for l in self.listeners.values_mut().flatten() {
            l.holders.refresh(task);
        }
        for skaddr in self.by_pid.get(&task.pid).into_iter().flatten() {
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
            self.drop_index(pid, skaddr);
        } else {
            // Someone no event named holds it (a descriptor passed over a
            // Unix socket, or a second descriptor of the same process).
            self.unverified.insert(skaddr);
        }
    }

    /// Process `pid` is exiting: it holds nothing any more. A socket it
    /// held alone keeps it as its owner: the socket's close, which its exit
    /// makes, is still its doing; should no close come, someone else holds
    /// it, and the socket is looked up.
    pub fn exited(&mut self, pid: u32) {
        self.inherited.remove(&pid);
        for l in self.listeners.values_mut().flatten() {
            l.holders.remove_unless_last(pid);
        }
        let Some(held) = self.by_pid.remove(&pid) else {
            return;
        };
        for skaddr in held {
            let Some(sock) = self.socks.get_mut(&skaddr) else {
                continue;
            };
            if !sock.holders.remove_unless_last(pid) {
                self.unverified.insert(skaddr);
                // Still indexed: a fork before the exit was reported would
                // otherwise miss it.
                self.by_pid.entry(pid).or_default().insert(skaddr);
            }
        }
    }

    fn drop_index(&mut self, pid: u32, skaddr: u64) {
        if let Some(set) = self.by_pid.get_mut(&pid) {
            set.remove(&skaddr);
            if set.is_empty() {
                self.by_pid.remove(&pid);
            }
        }
    }

    /// The sockets whose holders are in doubt, to look up; each is handed
    /// out once per doubt.
    pub fn take_unverified(&mut self) -> Vec<Unverified> {
        let mut out: Vec<Unverified> = self
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
        self.unindex(skaddr, &before);
        for h in now.all() {
            self.by_pid.entry(h.pid).or_default().insert(skaddr);
        }
        Some(now)
    }

    /// The holders known of the socket at `skaddr`.
    pub fn holders(&self, skaddr: u64) -> Option<&Holders> {
        self.socks.get(&skaddr).map(|s| &s.holders)
    }

    /// Sockets that have been in a state they should not linger in for at
    /// least `threshold_ns` at `now_ns`, each reported once per state: as
    /// their last row, with `dwell_ns` the time so far.
    pub fn newly_stuck(&mut self, now_ns: u64, threshold_ns: u64) -> Vec<Row> {
        let mut stuck = Vec::new();
        for s in self.socks.values_mut() {
            let Some(since) = s.since_ns else { continue };
            let age = now_ns.saturating_sub(since);
            if s.warned || !s.last.new.can_be_stuck() || age < threshold_ns {
                continue;
            }
            s.warned = true;
            stuck.push(Row {
                t: s.last,
                sock: s.id,
                owner: s.holders.owner(),
                dwell_ns: Some(age),
                close: None,
                origin: Origin::Tracepoint,
                queued: s.queued,
            });
        }
        stuck.sort_by_key(|r| r.sock);
        stuck
    }

    /// The sockets followed now, by their current state.
    pub fn sockets_by_state(&self) -> Vec<(State, u64)> {
        let mut counts: std::collections::BTreeMap<State, u64> = Default::default();
        for s in self.socks.values() {
            *counts.entry(s.last.new).or_default() += 1;
        }
        counts.into_iter().collect()
    }

    /// Sockets whose transitions skipped a state: one left a state it was
    /// never seen entering, or its address started a new socket before it
    /// was seen closing. Every socket ends in CLOSE and each change of state
    /// fires the tracepoint, so each gap is at least one transition lost on
    /// the way (ring drops and skipped runs included, which are counted
    /// where they happen, and transitions the kernel never handed to BPF,
    /// which nothing else counts).
    pub fn gaps(&self) -> u64 {
        self.gaps
    }

    /// The sockets found since the last call whose end never arrived.
    pub fn take_unseen_ends(&mut self) -> Vec<UnseenEnd> {
        std::mem::take(&mut self.unseen_ends)
    }

    /// Sockets currently tracked.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.socks.len()
    }
}

/// The owner of the listener a child socket was cloned from: one listening on
/// the child's port in its network namespace, on its address or on the
/// wildcard. Several listeners with different owners (SO_REUSEPORT, or the
/// same port in namespaces the kernel's BTF did not let us tell apart) make
/// it unknowable from here until the child is accepted, so unknown.
fn listener_owner(
    listeners: &FastMap<(u32, u16), Vec<Listener>>,
    socks: &FastMap<u64, Sock>,
    t: &Transition,
) -> Option<Task> {
    let mut owners = listeners
        .get(&(t.netns, t.local.port()))?
        .iter()
        .filter(|l| l.addr == t.local.ip() || l.addr.is_unspecified())
        .map(|l| match socks.get(&l.skaddr) {
            Some(s) if l.skaddr != 0 => s.holders.owner(),
            _ => l.holders.owner(),
        });
    let first = owners.next()??;
    owners
        .all(|o| o.is_some_and(|o| o.pid == first.pid))
        .then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::model::{Comm, Family};

    impl Attributor {
        /// `observe` of a transition that is not a repeat.
        fn observe_row(&mut self, t: &Transition) -> Row {
            self.observe(t).expect("not a repeat")
        }
    }

    fn task(pid: u32, comm: &str) -> Task {
        Task::new(pid, comm.as_bytes())
    }

    fn tr(ts: u64, sk: u64, task_: Task, old: State, new: State, l: &str, r: &str) -> Transition {
        Transition {
            ts_ns: ts,
            skaddr: sk,
            task: task_,
            thread: Comm::default(),
            old,
            new,
            family: Family::V4,
            local: l.parse().unwrap(),
            remote: r.parse().unwrap(),
            netns: 1,
        }
    }

    const LISTENER: u64 = 0x100;
    const CHILD: u64 = 0x200;
    const CLIENT: u64 = 0x300;

    #[test]
    fn client_closes_first_owners_follow_the_kernel_not_the_interrupted_task() {
        let server = task(100, "server");
        let client = task(200, "client");
        let swapper = task(0, "swapper/0");
        let mut a = Attributor::new();
        let s = |t: &Transition| t.local.to_string();
        let steps = [
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
        ];
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
    fn a_socket_is_stuck_once_past_the_threshold_and_said_once() {
        let mut a = Attributor::new();
        let me = task(7, "app");
        let est = State::ESTABLISHED;
        a.observe_row(&tr(
            0,
            1,
            me,
            State::CLOSE,
            State::SYN_SENT,
            "1.1.1.1:0",
            "2.2.2.2:80",
        ));
        a.observe_row(&tr(
            10,
            1,
            me,
            State::SYN_SENT,
            est,
            "1.1.1.1:5",
            "2.2.2.2:80",
        ));
        a.observe_row(&tr(
            20,
            1,
            task(0, "swapper/0"),
            est,
            State::CLOSE_WAIT,
            "1.1.1.1:5",
            "2.2.2.2:80",
        ));
        assert!(
            a.newly_stuck(100, 100).is_empty(),
            "80 ns in CLOSE_WAIT is not 100"
        );
        let stuck = a.newly_stuck(120, 100);
        assert_eq!(stuck.len(), 1);
        assert_eq!(
            (
                stuck[0].t.new,
                stuck[0].owner.unwrap().pid,
                stuck[0].dwell_ns
            ),
            (State::CLOSE_WAIT, 7, Some(100))
        );
        assert!(a.newly_stuck(500, 100).is_empty(), "said once");
        // ESTABLISHED for ever is not stuck.
        a.observe_row(&tr(
            0,
            2,
            me,
            State::CLOSE,
            State::SYN_SENT,
            "1.1.1.1:0",
            "2.2.2.2:80",
        ));
        a.observe_row(&tr(
            10,
            2,
            me,
            State::SYN_SENT,
            est,
            "1.1.1.1:6",
            "2.2.2.2:80",
        ));
        assert!(a.newly_stuck(1_000_000, 100).is_empty());
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

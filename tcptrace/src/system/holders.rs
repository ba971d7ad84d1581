//! Holders: who holds a socket right now, found as `ss -p` would see it.
//! sock_diag names the socket's inode by its addresses, and every process
//! with a descriptor of that inode holds it: the kernel's iterator over
//! every process's descriptors says which ([`TaskFiles`]), or, where it
//! could not be attached, `/proc/PID/fd`, as `ss -p` reads it.
//!
//! The events the kernel programs report (accept, fork, close, exit) keep
//! the holders of each socket as they change; this is the check where they
//! cannot: a descriptor received over a Unix socket, a `--stuck` warning
//! that must name the right process, the sockets still open at the end.
//! The iterator needs no capability once attached; reading other
//! processes' descriptor tables in /proc takes CAP_SYS_PTRACE, which
//! tcptrace keeps only where the iterator is missing (see `privileges`).

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use tcptrace_core::model::Row;

use crate::kernel::task_files::TaskFiles;
use crate::system::cgroups::Cgroups;
use crate::system::snapshot::Namespace;
use crate::system::sockdiag::{self, Query};
use tcptrace_core::attribute::Unverified;
use tcptrace_core::model::State;
use tcptrace_core::model::{Comm, Task};

/// Where the processes holding a socket inode are found.
pub enum Finder {
    /// The kernel's iterator; `warned`: a failed walk was reported.
    Kernel {
        task_files: TaskFiles,
        warned: Cell<bool>,
    },
    /// `/proc/PID/fd`.
    Proc,
}

impl Finder {
    pub fn new(task_files: Option<TaskFiles>) -> Finder {
        match task_files {
            Some(task_files) => Finder::Kernel {
                task_files,
                warned: Cell::new(false),
            },
            None => Finder::Proc,
        }
    }

    /// The processes holding each of `inodes`: thread group id and name,
    /// lowest id first, each process once. Inodes nobody holds (or that
    /// only processes we may not read hold) are absent.
    pub fn owners(&self, inodes: &HashSet<u32>) -> HashMap<u32, Vec<(u32, String)>> {
        if inodes.is_empty() {
            return HashMap::new();
        }
        let started = std::time::Instant::now();
        let (task_files, warned) = match self {
            Finder::Proc => {
                let found = sockdiag::owners(inodes);
                log::debug!("/proc/PID/fd read in {:?}", started.elapsed());
                return found;
            }
            Finder::Kernel { task_files, warned } => (task_files, warned),
        };
        let mut held = match task_files.walk() {
            Ok(held) => held,
            Err(e) => {
                if !warned.replace(true) {
                    log::warn!("cannot tell who holds sockets: {e:#}");
                }
                return HashMap::new();
            }
        };
        log::debug!(
            "{} socket descriptors in the processes' tables, walked in {:?}",
            held.len(),
            started.elapsed()
        );
        held.retain(|h| inodes.contains(&h.inode));
        held.sort_unstable_by_key(|h| (h.tgid, h.fd));
        let mut found: HashMap<u32, Vec<(u32, String)>> = HashMap::new();
        for h in held {
            let holders = found.entry(h.inode).or_default();
            // Two descriptors of one process name it once.
            if holders.iter().all(|(pid, _)| *pid != h.tgid) {
                let name = h.comm.split(|&b| b == 0).next().unwrap_or_default();
                holders.push((h.tgid, String::from_utf8_lossy(name).into_owned()));
            }
        }
        found
    }
}

/// The holders of each socket in `sockets` that could be found, by socket
/// address (`Unverified::skaddr`). A socket not found (closed meanwhile, a
/// namespace we cannot look into, a holder we may not read) is absent.
pub fn look_up(
    finder: &Finder,
    namespaces: &mut [Namespace],
    cgroups: &mut Cgroups,
    sockets: &[Unverified],
) -> HashMap<u64, Vec<Task>> {
    let mut inodes: HashMap<u64, u32> = HashMap::new();
    let mut by_netns: HashMap<u32, Vec<&Unverified>> = HashMap::new();
    for s in sockets {
        by_netns.entry(s.t.netns).or_default().push(s);
    }
    for (netns, wanted) in by_netns {
        // A netns of 0 (the kernel's BTF did not tell) can only be ours.
        let Some(ns) = namespaces
            .iter_mut()
            .find(|n| n.inode == netns || netns == 0)
        else {
            continue;
        };
        let mut ports: Vec<u16> = wanted.iter().map(|s| s.t.local.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        if ports.len() > sockdiag::MAX_PORTS {
            ports.clear();
        }
        let query = Query {
            states: Query::ALL_STATES,
            ports,
        };
        let Ok(found) = ns.dumper.dump(&query) else {
            continue;
        };
        let by_addr: HashMap<(SocketAddr, SocketAddr), u32> = found
            .iter()
            .filter(|d| d.inode != 0)
            .map(|d| ((d.local, d.remote), d.inode))
            .collect();
        for s in wanted {
            if let Some(&inode) = by_addr.get(&(s.t.local, s.t.remote)) {
                inodes.insert(s.skaddr, inode);
            }
        }
    }
    let wanted: HashSet<u32> = inodes.values().copied().collect();
    let holders = finder.owners(&wanted);
    inodes
        .into_iter()
        .filter_map(|(skaddr, inode)| {
            let list = holders.get(&inode)?;
            Some((
                skaddr,
                list.iter()
                    .map(|(pid, comm)| Task {
                        pid: *pid,
                        comm: Comm::from_bytes(comm.as_bytes()),
                        cgroup: cgroups.of_pid(*pid),
                    })
                    .collect(),
            ))
        })
        .collect()
}

/// Process `pid` as it is now: its name and cgroup, read from /proc.
pub fn process(pid: u32, cgroups: &mut Cgroups) -> Option<Task> {
    let comm = sockdiag::read_comm(pid)?;
    Some(Task {
        pid,
        comm: Comm::from_bytes(comm.as_bytes()),
        cgroup: cgroups.of_pid(pid),
    })
}

/// The kernel reports a connect's `CLOSE -> SYN_SENT` before it picks the
/// local port, and nothing more until the handshake ends: a socket stuck
/// in SYN_SENT would show `:0` and match no socket by its addresses. The
/// local addresses it may have, from sock_diag: the SYN_SENT sockets with
/// its remote end and local address, narrowed to those its owner holds.
/// One address where that tells; several where it cannot (one process
/// with several identical connects pending), by `Row::sock`.
pub fn connecting_ends(
    finder: &Finder,
    namespaces: &mut [Namespace],
    rows: &[Row],
) -> HashMap<u64, Vec<SocketAddr>> {
    let mut out = HashMap::new();
    for row in rows
        .iter()
        .filter(|r| r.t.new == State::SYN_SENT && r.t.local.port() == 0)
    {
        let t = &row.t;
        let Some(ns) = namespaces
            .iter_mut()
            .find(|n| n.inode == t.netns || t.netns == 0)
        else {
            continue;
        };
        let query = Query {
            states: Query::mask(&[State::SYN_SENT]),
            ports: vec![t.remote.port()],
        };
        let Ok(found) = ns.dumper.dump(&query) else {
            continue;
        };
        let mut same_ends: Vec<_> = found
            .iter()
            .filter(|d| {
                d.remote == t.remote
                    && (t.local.ip().is_unspecified() || d.local.ip() == t.local.ip())
            })
            .collect();
        if same_ends.len() > 1
            && let Some(owner) = row.owner
        {
            let inodes: HashSet<u32> = same_ends.iter().map(|d| d.inode).collect();
            let holders = finder.owners(&inodes);
            same_ends.retain(|d| {
                holders
                    .get(&d.inode)
                    .is_some_and(|h| h.iter().any(|(pid, _)| *pid == owner.pid))
            });
        }
        let mut ends: Vec<SocketAddr> = same_ends.iter().map(|d| d.local).collect();
        ends.sort_unstable();
        if !ends.is_empty() {
            out.insert(row.sock, ends);
        }
    }
    out
}

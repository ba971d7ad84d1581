//! Holders: who holds a socket right now, found the way `ss -p` finds it.
//! sock_diag names the socket's inode by its addresses, and every
//! `/proc/PID/fd/N` linking to that inode is a process holding it.
//!
//! The events the kernel programs report (accept, fork, close, exit) keep
//! the holders of each socket as they change; this is the check where they
//! cannot: a descriptor received over a Unix socket, a `--stuck` warning
//! that must name the right process, the sockets still open at the end.
//! Reading other processes' descriptor tables takes CAP_SYS_PTRACE, the one
//! capability tcptrace keeps after attaching (see `privileges`).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use crate::attribute::Unverified;
use crate::cgroup::Cgroups;
use crate::decode::{Comm, Task};
use crate::snapshot::Namespace;
use crate::sockdiag::{self, Query};

/// The holders of each socket in `sockets` that could be found, by socket
/// address (`Unverified::skaddr`). A socket not found (closed meanwhile, a
/// namespace we cannot look into, a holder we may not read) is absent.
pub fn look_up(
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
    let holders = sockdiag::owners(&wanted);
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

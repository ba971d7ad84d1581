//! Snapshot: the sockets that already exist when tracing starts, as the
//! `netstat -an` view people know (with owners found the way `ss -p` finds
//! them), so that a service's listener and its open connections are not
//! invisible until they change.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use tcptrace_core::attribute::Attributor;

use crate::system::cgroups::Cgroups;
use crate::system::holders::Finder;
use crate::system::sockdiag::{self, DiagSocket, Dumper, Query};
use tcptrace_core::filter::Filter;
use tcptrace_core::model::State;
use tcptrace_core::model::monotonic_ns;
use tcptrace_core::model::{Comm, Task, Transition};
use tcptrace_core::model::{Holders, Row};

/// At most this many namespaces are dumped (one netlink socket each).
const MAX_NAMESPACES: usize = 64;

/// A network namespace tcptrace can look into: its inode and a sock_diag
/// socket opened inside it (while tcptrace still had the privileges to).
pub struct Namespace {
    pub inode: u32,
    pub dumper: Dumper,
}

fn inode_of(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .and_then(|m| u32::try_from(m.ino()).ok())
}

/// The namespaces to look into: the one `--netns` names, or ours and every
/// other one visible (named ones in /run/netns, and those of running
/// processes: containers).
pub fn namespaces(only: Option<u32>) -> Vec<Namespace> {
    let own = inode_of(Path::new("/proc/self/ns/net"));
    let mut paths: Vec<(u32, PathBuf)> = Vec::new();
    let mut add = |path: PathBuf| {
        if let Some(inode) = inode_of(&path)
            && only.is_none_or(|o| o == inode)
            && !paths.iter().any(|(i, _)| *i == inode)
        {
            paths.push((inode, path));
        }
    };
    add(PathBuf::from("/proc/self/ns/net"));
    for dir in ["/run/netns", "/proc"] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if dir == "/proc" {
                if e.file_name().to_string_lossy().parse::<u32>().is_ok() {
                    add(p.join("ns/net"));
                }
            } else {
                add(p);
            }
        }
    }
    paths
        .into_iter()
        .take(MAX_NAMESPACES)
        .filter_map(|(inode, path)| {
            let dumper = if Some(inode) == own {
                Dumper::here()
            } else {
                Dumper::in_netns(&path)
            };
            match dumper {
                Ok(dumper) => Some(Namespace { inode, dumper }),
                Err(e) => {
                    log::info!("cannot look into network namespace {inode}: {e:#}");
                    None
                }
            }
        })
        .collect()
}

/// Ports worth asking the kernel for, from the filters (empty: all).
pub fn kernel_ports(filter: &Filter) -> Vec<u16> {
    let spec = filter.spec();
    if spec.ports.is_empty() && spec.lports.is_empty() && spec.rports.is_empty() {
        return match spec.follow {
            Some(t) => vec![t.a.port(), t.b.port()],
            None => Vec::new(),
        };
    }
    let mut ports: Vec<u16> = [&spec.ports, &spec.lports, &spec.rports]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    ports.sort_unstable();
    ports.dedup();
    if ports.len() > sockdiag::MAX_PORTS {
        Vec::new()
    } else {
        ports
    }
}

/// What the snapshot found.
pub struct Found {
    /// Snapshot rows of the sockets that pass the filters, listeners first.
    pub rows: Vec<Row>,
    /// Those of them that are time-wait sockets (to follow to their end).
    pub timewait: Vec<Row>,
}

/// The existing sockets that pass the filters, as snapshot rows, each
/// registered with the attributor (ids, owners, listeners).
pub fn take(
    finder: &Finder,
    namespaces: &mut [Namespace],
    filter: &Filter,
    attributor: &mut Attributor,
    cgroups: &mut Cgroups,
) -> Result<Found> {
    let query = Query {
        states: Query::ALL_STATES,
        ports: kernel_ports(filter),
    };
    let mut found: Vec<(u32, DiagSocket)> = Vec::new();
    for ns in namespaces.iter_mut() {
        let sockets = ns.dumper.dump(&query).with_context(|| {
            format!("cannot list the sockets of network namespace {}", ns.inode)
        })?;
        found.extend(sockets.into_iter().map(|s| (ns.inode, s)));
    }
    let inodes: HashSet<u32> = found
        .iter()
        .map(|(_, s)| s.inode)
        .filter(|&i| i != 0)
        .collect();
    let owners: HashMap<u32, Vec<(u32, String)>> = finder.owners(&inodes);
    let now = monotonic_ns();
    // Listeners first, then the rest, like netstat; ids follow that order.
    found.sort_by_key(|(netns, s)| (s.state != State::LISTEN, *netns, s.local, s.remote));
    let mut rows = Vec::new();
    let mut timewait = Vec::new();
    for (netns, s) in found {
        // Request sockets (SYN_RECV before accept) have no socket of their
        // own yet: the tracepoint never names them either.
        if s.state == State::SYN_RECV && s.inode == 0 && !s.timewait {
            continue;
        }
        let holders: Vec<Task> = owners
            .get(&s.inode)
            .into_iter()
            .flatten()
            .map(|(pid, comm)| Task {
                pid: *pid,
                comm: Comm::from_bytes(comm.as_bytes()),
                cgroup: cgroups.of_pid(*pid),
            })
            .collect();
        let holders = Holders::from_list(&holders);
        let t = Transition {
            ts_ns: now,
            skaddr: 0,
            task: holders.owner().unwrap_or_default(),
            thread: Comm::default(),
            old: State(0),
            new: s.state,
            family: s.family,
            local: s.local,
            remote: s.remote,
            netns,
        };
        let row = attributor.existing(&t, holders);
        if filter.passes(&row) {
            if s.timewait {
                timewait.push(row);
            }
            rows.push(row);
        }
    }
    Ok(Found { rows, timewait })
}

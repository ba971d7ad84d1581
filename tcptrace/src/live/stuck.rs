//! `--stuck`: warns once per socket that stays too long in a state it
//! should leave (a handshake, a close), naming who holds it, so that a
//! leak or a hung peer shows while it happens, not in a report afterwards.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use tcptrace_core::attribute::Unverified;
use tcptrace_core::model::{Holders, Row, monotonic_ns};
use tcptrace_core::output;
use tokio::time::Instant;

use super::Stop;
use super::pipeline::Pipeline;
use crate::system::holders;

pub(super) struct StuckWatch {
    threshold: Duration,
    every: Duration,
    next: Instant,
    /// Stuck sockets per owner, for the closing summary.
    by_owner: BTreeMap<Option<(u32, String)>, u64>,
    /// Connections closed by their process and left in FIN_WAIT2.
    orphans: u64,
}

impl StuckWatch {
    /// Checks a few times per threshold: often enough to warn about a
    /// socket soon after it passes it, rarely enough to cost nothing.
    pub fn new(threshold: Duration) -> StuckWatch {
        StuckWatch {
            threshold,
            every: (threshold / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
            next: Instant::now(),
            by_owner: BTreeMap::new(),
            orphans: 0,
        }
    }

    /// Checks when due.
    pub fn tick(&mut self, pipe: &mut Pipeline) -> Result<(), Stop> {
        if Instant::now() < self.next {
            return Ok(());
        }
        self.next = Instant::now() + self.every;
        self.check(pipe)
    }

    /// Warns about sockets newly past the threshold, naming every process
    /// that holds each now (looked up, as `ss -p` would show them).
    fn check(&mut self, pipe: &mut Pipeline) -> Result<(), Stop> {
        let now = monotonic_ns();
        let threshold = self.threshold.as_nanos() as u64;
        let mut stuck: Vec<Row> = pipe
            .attributor
            .newly_stuck(now, threshold)
            .into_iter()
            .chain(pipe.tail.timewait.newly_stuck(now, threshold))
            .chain(
                pipe.tail
                    .kernel_timewait
                    .as_mut()
                    .map(|k| k.newly_stuck(now, threshold))
                    .unwrap_or_default(),
            )
            .filter(|row| pipe.tail.filter.passes(row))
            .collect();
        if stuck.is_empty() {
            return Ok(());
        }
        let connecting = holders::connecting_ends(&pipe.finder, &mut pipe.lookups, &stuck);
        for row in &mut stuck {
            if let Some([one]) = connecting.get(&row.sock).map(Vec::as_slice) {
                row.t.local = *one;
            }
        }
        // Orphans in the time-wait table have no holder to look up.
        let sockets: Vec<Unverified> = stuck
            .iter()
            .filter(|r| !r.origin.is_time_wait())
            .map(|r| Unverified {
                skaddr: r.t.skaddr,
                sock: r.sock,
                t: r.t,
            })
            .collect();
        let holders = pipe.note_holders(&sockets, true)?;
        for row in stuck {
            self.warn(&row, &holders, connecting.get(&row.sock));
        }
        Ok(())
    }

    /// One socket's warning, and its count for the summary.
    fn warn(
        &mut self,
        row: &Row,
        holders: &HashMap<u64, Holders>,
        connecting: Option<&Vec<SocketAddr>>,
    ) {
        let named: Vec<(u32, String)> = holders
            .get(&row.t.skaddr)
            .map(|h| h.all().copied().collect::<Vec<_>>())
            .unwrap_or_else(|| row.owner.into_iter().collect())
            .into_iter()
            .map(|o| {
                let mut comm = String::new();
                output::escape_comm(&o.comm.as_str(), &mut comm);
                (o.pid, comm)
            })
            .collect();
        let listed = named
            .iter()
            .map(|(pid, comm)| format!("pid {pid} ({comm})"))
            .collect::<Vec<_>>()
            .join(", ");
        let orphan = row.origin.is_time_wait();
        let who = match (orphan, named.is_empty()) {
            (true, true) => "no process holds it".to_string(),
            (true, false) => format!("no process holds it (closed by {listed})"),
            (false, true) => "owner unknown".to_string(),
            (false, false) => listed,
        };
        let meaning = if orphan {
            "orphaned: closed by its process, and the peer has not closed its side \
             (the kernel drops it after net.ipv4.tcp_fin_timeout)"
        } else if row.queued {
            "not accepted by the process yet (backlog)"
        } else {
            row.t.new.meaning()
        };
        let t = &row.t;
        eprintln!(
            "tcptrace: stuck: {who}, {} -> {} in {} for {:.1} s: {meaning} (sock {})",
            local_end(row, connecting),
            t.remote,
            t.new,
            row.dwell_ns.unwrap_or(0) as f64 / 1e9,
            row.sock
        );
        if orphan {
            self.orphans += 1;
        } else {
            *self.by_owner.entry(named.into_iter().next()).or_default() += 1;
        }
    }

    pub fn summary(&self) {
        let total: u64 = self.by_owner.values().sum::<u64>() + self.orphans;
        if total == 0 {
            return;
        }
        let mut parts: Vec<String> = self
            .by_owner
            .iter()
            .map(|(owner, n)| match owner {
                Some((pid, comm)) => format!("{n} of pid {pid} ({comm})"),
                None => format!("{n} of unknown owners"),
            })
            .collect();
        if self.orphans > 0 {
            parts.push(format!("{} orphaned (no process holds it)", self.orphans));
        }
        eprintln!(
            "tcptrace: {total} socket{} stuck longer than {}: {}",
            if total == 1 { "" } else { "s" },
            humantime::format_duration(self.threshold),
            parts.join(", ")
        );
    }
}

/// The socket's local end; several identical connects of one process
/// pending leave which port is whose untold, so all of them are listed.
fn local_end(row: &Row, connecting: Option<&Vec<SocketAddr>>) -> String {
    let t = &row.t;
    match connecting {
        Some(ends) if ends.len() > 1 => format!(
            "{}:(one of {})",
            SocketAddr::new(t.local.ip(), 0)
                .to_string()
                .trim_end_matches(":0"),
            ends.iter()
                .map(|e| e.port().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => t.local.to_string(),
    }
}

//! A connection closed first by us spends its FIN_WAIT2 in two places: its
//! socket until the kernel hands it to the time-wait table (the
//! tracepoint's `FIN_WAIT2 -> CLOSE`, microseconds for an orphan), then
//! the time-wait socket until the peer's FIN (the table's `FIN_WAIT2 ->
//! TIME_WAIT`, whose time in FIN_WAIT2 counts from the same start). Time in
//! state counts it once: from the table's row where there is one, else
//! (no table followed, or none found) from the tracepoint's.

use crate::fasthash::FastMap;
use crate::model::{Origin, Row, State};

/// How long a connection can stay in the table's FIN_WAIT2 and then
/// TIME_WAIT (see `fold::TIME_WAIT_SUBSTATE_NS`): a row still waiting after
/// that will have no table row.
const WAIT_NS: u64 = 2 * super::fold::TIME_WAIT_SUBSTATE_NS;

#[derive(Debug, Default)]
pub(super) struct FinWait2 {
    /// Socket id -> (time in FIN_WAIT2 the tracepoint gave, when).
    waiting: FastMap<u64, (u64, u64)>,
    prune_ns: u64,
}

impl FinWait2 {
    /// The time in FIN_WAIT2 that `r` (which left FIN_WAIT2) adds, if any
    /// now: a handing to the table waits for the table's row.
    pub(super) fn settle(&mut self, r: &Row) -> Option<u64> {
        let ns = r.dwell_ns?;
        if r.t.old != State::FIN_WAIT2 {
            return Some(ns);
        }
        match r.origin {
            Origin::Tracepoint if r.t.new == State::CLOSE && r.close.is_none() => {
                self.waiting.insert(r.sock, (ns, r.t.ts_ns));
                None
            }
            // Counted from its start only when the close was seen.
            o if o.is_time_wait() => self.waiting.remove(&r.sock).map(|_| ns),
            _ => Some(ns),
        }
    }

    /// The tracepoint's times of connections whose table row can no
    /// longer come, at `now_ns`.
    pub(super) fn expired(&mut self, now_ns: u64) -> Vec<u64> {
        let mut out = Vec::new();
        if now_ns < self.prune_ns {
            return out;
        }
        self.waiting.retain(|_, &mut (ns, at)| {
            let keep = now_ns.saturating_sub(at) <= WAIT_NS;
            if !keep {
                out.push(ns);
            }
            keep
        });
        self.prune_ns = now_ns.saturating_add(10_000_000_000);
        out
    }

    /// The tracepoint's times of those still waiting at the end.
    pub(super) fn waiting(&self) -> impl Iterator<Item = u64> + '_ {
        self.waiting.values().map(|&(ns, _)| ns)
    }
}

//! Everything between the rings and the outputs, one event at a time:
//! decode, attribute (socket, holders), order (a row may wait for an event
//! the kernel stamps just after it), follow into the time-wait table,
//! filter, then print, record, count. The ordering decisions are
//! tcptrace-core's [`Order`]; this drives it with the capture's reads.

use std::collections::HashMap;

use tcptrace_common::Event;
use tcptrace_core::analyse::Analysis;
use tcptrace_core::attribute::{Attributor, Unverified};
use tcptrace_core::decode::{Decoded, classify};
use tcptrace_core::filter::{Admit, Filter};
use tcptrace_core::model::{
    Holders, HoldersNote, Item, Origin, Row, Timing, Transition, intern_reason, monotonic_ns,
};
use tcptrace_core::order::{Order, Sink};
use tcptrace_core::output::metrics::Metrics;
use tcptrace_core::timewait::KernelTimeWait;

use super::Stop;
use super::outputs::Outputs;
use super::summary::Tally;
use crate::kernel::capture::{Capture, SETTLE_NS};
use crate::system::cgroups::Cgroups;
use crate::system::holders;
use crate::system::snapshot;
use crate::system::timewait::TimeWait;

pub(super) struct Pipeline {
    pub attributor: Attributor,
    /// Rows not out yet, and the time-wait table's rows to merge in.
    pub order: Order,
    pub tail: Tail,
    /// Names of the kernel's reset reasons, by number.
    pub reset_reasons: Vec<Option<&'static str>>,
    /// Reused between reads of the rings.
    pub batch: Vec<Event>,
    pub cgroups: Cgroups,
    /// Namespaces to look up holders in, and how (see `holders`).
    pub lookups: Vec<snapshot::Namespace>,
    pub finder: holders::Finder,
    /// The accept, close, fork and exit hooks are attached.
    pub owner_hooks: bool,
}

/// What a row meets once the order lets it go: a field of its own, so that
/// the order can hand rows to it while both are borrowed.
pub(super) struct Tail {
    pub timewait: TimeWait,
    pub following_timewait: bool,
    /// Where the kernel reports time-wait sockets (then `timewait` is
    /// neither fed nor polled).
    pub kernel_timewait: Option<KernelTimeWait>,
    pub filter: Filter,
    pub outputs: Outputs,
    pub tally: Tally,
    pub count: Option<u64>,
    pub metrics: Option<Metrics>,
    /// With `-- COMMAND`: the rows shown, for the summary at the end.
    pub analysis: Option<Analysis>,
}

impl Pipeline {
    /// Processes everything in the ring now, and what the time-wait table
    /// says when it is due; `last` releases every row.
    pub fn drain(&mut self, capture: &mut Capture, last: bool) -> Result<(), Stop> {
        if self.tail.timewait.due() {
            self.order.table_rows(self.tail.timewait.poll());
        }
        if last {
            self.order.finishing();
        }
        let mut batch = std::mem::take(&mut self.batch);
        let result = self.process(capture, &mut batch, last);
        self.batch = batch;
        result?;
        if last {
            // Once the ring's last rows had their chance to date them.
            self.order.table_rows(self.tail.timewait.finish());
        }
        self.order.release(&mut self.tail)
    }

    fn process(
        &mut self,
        capture: &mut Capture,
        batch: &mut Vec<Event>,
        last: bool,
    ) -> Result<(), Stop> {
        loop {
            batch.clear();
            let reading_from = monotonic_ns();
            let more = capture.read(batch, last);
            // The rings hand out an event up to `SETTLE_NS` after its time:
            // every event older than this has been read now. It holds once
            // this batch is processed: until then, a row placed by it (a
            // full queue releases mid-batch) could go out ahead of older
            // rows still in the batch.
            let read_to = (!more).then(|| reading_from.saturating_sub(SETTLE_NS));
            self.tail.tally.undecodable = capture.undecodable();
            for e in batch.iter() {
                self.tail.tally.seen += 1;
                self.event(e)?;
            }
            if let Some(t) = read_to {
                self.order.read_up_to(t);
            }
            for end in self.attributor.take_unseen_ends() {
                self.tail.outputs.gap(&end)?;
            }
            if !more {
                return Ok(());
            }
        }
    }

    fn event(&mut self, e: &Event) -> Result<(), Stop> {
        // Transitions and rows are matched by reference where they were
        // returned: moved out, each was copied once more (a tenth of the
        // tracer's CPU under full churn).
        match classify(e) {
            Decoded::State(ref mut t) => return self.transition(t, e.cgroup),
            Decoded::Accept {
                skaddr, mut task, ..
            } => {
                task.cgroup = self.cgroups.path(e.cgroup, task.pid);
                self.attributor.accepted(skaddr, task);
            }
            Decoded::Fork { parent, child } => self.attributor.forked(parent, child),
            Decoded::Release { skaddr, pid } => self.attributor.released(skaddr, pid),
            Decoded::Exit { pid } => self.attributor.exited(pid),
            Decoded::Reset {
                skaddr,
                received: true,
                ..
            } => self.attributor.reset_received(skaddr),
            Decoded::TimeWait { made: true, t } => {
                if let Some(k) = &mut self.tail.kernel_timewait {
                    k.made(&t);
                }
            }
            // In ring order with the rows, so that it meets the connection
            // once its `-> CLOSE` has gone out.
            Decoded::TimeWait { made: false, t } => {
                let row = Row {
                    t,
                    sock: 0,
                    owner: None,
                    dwell_ns: None,
                    close: None,
                    origin: Origin::TimeWaitKernel,
                    timing: Timing::Exact,
                    queued: false,
                };
                return self.order.push(&row, &mut self.tail);
            }
            Decoded::Reset { skaddr, reason, .. } => {
                let name = self
                    .reset_reasons
                    .get(usize::from(reason))
                    .copied()
                    .flatten();
                return self.order.reset_sent(skaddr, name, &mut self.tail);
            }
        }
        Ok(())
    }

    fn transition(&mut self, t: &mut Transition, cgroup: u64) -> Result<(), Stop> {
        if t.task.pid != 0 {
            t.task.cgroup = self.cgroups.path(cgroup, t.task.pid);
        }
        match self.attributor.observe(t) {
            Some(ref mut row) => {
                // Without the accept hook nothing tells when a queued child
                // was accepted: say nothing.
                row.queued &= self.owner_hooks;
                if let Some(pid) = self.attributor.stale_owner(row) {
                    let task = holders::process(pid, &mut self.cgroups)
                        .or(row.owner)
                        .unwrap_or_default();
                    self.attributor.refresh_task(task);
                    row.owner = Some(task);
                }
                self.order.push(row, &mut self.tail)
            }
            None => {
                self.tail.tally.repeated += 1;
                Ok(())
            }
        }
    }

    /// Looks up who holds `sockets` now; where that differs from what
    /// their rows said (or, with `all`, in any case), the recording notes
    /// it. Returns the holders found, by socket address.
    pub fn note_holders(
        &mut self,
        sockets: &[Unverified],
        all: bool,
    ) -> Result<HashMap<u64, Holders>, Stop> {
        let mut out = HashMap::new();
        if sockets.is_empty() {
            return Ok(out);
        }
        let found = holders::look_up(&self.finder, &mut self.lookups, &mut self.cgroups, sockets);
        let now = monotonic_ns();
        for s in sockets {
            let changed = found
                .get(&s.skaddr)
                .and_then(|list| self.attributor.verified(s.skaddr, list));
            let Some(known) = self.attributor.holders(s.skaddr).cloned() else {
                continue;
            };
            if changed.is_some() || all {
                let row = Row {
                    t: s.t,
                    sock: s.sock,
                    owner: known.owner(),
                    dwell_ns: None,
                    close: None,
                    origin: Origin::Tracepoint,
                    queued: false,
                    timing: Timing::Exact,
                };
                if self.tail.filter.passes(&row)
                    && !known.is_empty()
                    && let Some(r) = &mut self.tail.outputs.recorder
                {
                    r.note(&HoldersNote::new(now, s.sock, &known))
                        .map_err(Stop::RecordFailed)?;
                }
            }
            out.insert(s.skaddr, known);
        }
        Ok(out)
    }
}

impl Tail {
    /// Filters one row and emits what passes (with a held connect first).
    fn show(&mut self, row: &Row) -> Result<(), Stop> {
        match self.filter.admit(row) {
            Admit::Hidden => self.tally.hidden += 1,
            Admit::Held => {}
            Admit::Show(held) => {
                for r in held.as_deref().into_iter().chain(std::iter::once(row)) {
                    self.emit(r)?;
                }
            }
        }
        Ok(())
    }

    fn emit(&mut self, r: &Row) -> Result<(), Stop> {
        self.outputs.emit(r)?;
        if let Some(m) = &mut self.metrics {
            m.count(r);
        }
        if let Some(a) = &mut self.analysis {
            a.add(Item::Row(*r));
        }
        match r.origin {
            Origin::Tracepoint => self.tally.shown += 1,
            Origin::Snapshot => self.tally.snapshot += 1,
            Origin::TimeWait => self.tally.timewait += 1,
            Origin::TimeWaitKernel => {
                self.tally.timewait += 1;
                self.tally.timewait_kernel += 1;
            }
        }
        let transitions = self.tally.shown + self.tally.timewait;
        if self.count.is_some_and(|n| transitions >= n) {
            return Err(Stop::Done);
        }
        Ok(())
    }
}

impl Sink for Tail {
    type Error = Stop;

    fn ring_row(&mut self, row: &Row) -> Result<(), Stop> {
        if let Some(k) = &mut self.kernel_timewait {
            // A time-wait socket's change becomes its connection's row.
            if row.origin == Origin::TimeWaitKernel {
                return match k.changed(&row.t) {
                    Some(r) => self.show(&r),
                    None => Ok(()),
                };
            }
            let entered = k.closed(row);
            self.show(row)?;
            if let Some(r) = entered {
                self.show(&r)?;
            }
            if self.outputs.stdout_full() {
                self.outputs.flush()?;
            }
            return Ok(());
        }
        // Final now (a sent reset has had its chance): an orderly close is
        // followed into the time-wait table, and a connection taking over a
        // time-wait socket ends the connection that left it.
        if self.following_timewait {
            if let Some(end) = self.timewait.reused(row) {
                self.show(&end)?;
            }
            if let Some(end) = self.timewait.watch(row) {
                self.show(&end)?;
            }
        }
        self.show(row)?;
        if self.outputs.stdout_full() {
            self.outputs.flush()?;
        }
        Ok(())
    }

    fn table_row(&mut self, row: &Row) -> Result<(), Stop> {
        self.show(row)
    }
}

/// The reset reason table, by number, for rows to point into.
pub(super) fn reason_names(table: &[(u8, String)]) -> Vec<Option<&'static str>> {
    let mut names = vec![None; 256];
    for (n, name) in table {
        names[usize::from(*n)] = Some(intern_reason(name));
    }
    names
}

//! What the live run tells on stderr besides rows: warnings about what it
//! could not see (lost, missed, skipped transitions; time-wait sockets not
//! followed) as they happen, and the closing line with its counts, so that
//! a reader knows how complete the rows were.

use tcptrace_core::analyse::{self, Analysis};
use tcptrace_core::model::Counters;
use tcptrace_core::words::plural;

use crate::kernel::capture::Capture;

/// Counts for the closing line.
#[derive(Default)]
pub(super) struct Tally {
    /// Ring entries read.
    pub seen: u64,
    /// Transitions shown (the tracepoint's).
    pub shown: u64,
    /// Rows of existing sockets shown.
    pub snapshot: u64,
    /// Changes of connections in time-wait shown: found in the table, or
    /// (`timewait_kernel` of them) reported by the kernel.
    pub timewait: u64,
    pub timewait_kernel: u64,
    pub hidden: u64,
    pub undecodable: u64,
    /// Transitions the kernel delivered a second time, shown once.
    pub repeated: u64,
}

/// What was already warned about, so that each warning says what is new.
#[derive(Default)]
pub(super) struct Warned {
    pub lost: Counters,
    pub gaps: u64,
}

impl Warned {
    /// Warns about what was lost or skipped since the last call.
    pub fn update(&mut self, capture: &Capture, gaps: u64) {
        self.lost = warn_lost(capture, self.lost);
        self.gaps = warn_gaps(gaps, self.gaps);
    }
}

/// Warns about sockets found with gaps in their history since the last
/// warning; returns the new total. Besides the losses counted above, the
/// kernel sometimes handles transitions without running any BPF program or
/// counting a skip: these gaps are the only trace they leave.
pub(super) fn warn_gaps(now: u64, reported: u64) -> u64 {
    if now > reported {
        eprintln!(
            "tcptrace: warning: {} states: transitions between them never arrived ({now} in \
             all)",
            plural(now - reported, "socket skipped", "sockets skipped")
        );
    }
    now.max(reported)
}

/// The kernel side's counters. Lost transitions are never silent: a
/// kernel that will not let them be read is said so, once, rather than
/// shown as none.
pub(super) fn counters(capture: &Capture) -> Counters {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SAID: AtomicBool = AtomicBool::new(false);
    capture.counters().unwrap_or_else(|e| {
        if !SAID.swap(true, Ordering::Relaxed) {
            eprintln!(
                "tcptrace: warning: cannot read the kernel's counts of lost and filtered \
                 transitions ({e:#}); the counts shown leave them out"
            );
        }
        Counters::default()
    })
}

/// Warns about transitions lost (ring full) or missed (the kernel skipped
/// the program) since the last warning; returns the new totals.
pub(super) fn warn_lost(capture: &Capture, reported: Counters) -> Counters {
    let now = counters(capture);
    if now.lost > reported.lost {
        eprintln!(
            "tcptrace: warning: {} transitions lost: the ring buffer was full ({} lost in all)",
            now.lost - reported.lost,
            now.lost
        );
    }
    if now.missed > reported.missed {
        eprintln!(
            "tcptrace: warning: the kernel skipped the tracer for {} that no other program \
             emitted instead: a program of the tracer was already running on that CPU ({} in \
             all)",
            plural(now.missed - reported.missed, "transition", "transitions"),
            now.missed
        );
    }
    if now.hooks_missed > reported.hooks_missed {
        eprintln!(
            "tcptrace: warning: the kernel skipped the owner hooks (accept, close, fork, exit) \
             {}: another BPF program was running on that CPU, and as many changes of holder \
             went unseen; those sockets may name an earlier holder ({} in all)",
            plural(now.hooks_missed - reported.hooks_missed, "time", "times"),
            now.hooks_missed
        );
    }
    Counters {
        lost: now.lost.max(reported.lost),
        missed: now.missed.max(reported.missed),
        hooks_missed: now.hooks_missed.max(reported.hooks_missed),
        filtered: now.filtered,
    }
}

/// Closed connections the time-wait table could not follow: their ends
/// are missing from the rows.
pub(super) fn warn_timewait_missed(missed: u64) {
    if missed > 0 {
        eprintln!(
            "tcptrace: warning: {} not followed into the time-wait table (more than 65536 at \
             once, or in a namespace tcptrace could not open)",
            plural(missed, "closed connection was", "closed connections were")
        );
    }
}

pub(super) fn warn_undecodable(undecodable: u64) {
    if undecodable > 0 {
        eprintln!("tcptrace: warning: {undecodable} ring entries could not be decoded");
    }
}

/// The closing line: what was shown, from where, and what was not.
pub(super) fn stats_line(tally: &Tally, counters: &Counters, gaps: u64) -> String {
    let mut extra = String::new();
    if tally.repeated > 0 {
        extra.push_str(&format!(
            " ({} delivered twice by the kernel, shown once)",
            tally.repeated
        ));
    }
    if tally.snapshot > 0 {
        extra.push_str(&format!(
            ", {}",
            plural(tally.snapshot, "existing socket", "existing sockets")
        ));
    }
    let polled = tally.timewait - tally.timewait_kernel;
    if polled > 0 {
        extra.push_str(&format!(
            ", {} from the time-wait table",
            plural(polled, "change", "changes")
        ));
    }
    if tally.timewait_kernel > 0 {
        extra.push_str(&format!(
            ", {} in time-wait",
            plural(tally.timewait_kernel, "change", "changes")
        ));
    }
    let gaps = if gaps > 0 {
        format!(", {} with gaps", plural(gaps, "socket", "sockets"))
    } else {
        String::new()
    };
    format!(
        "tcptrace: {}{extra}, {} filtered, {} lost, {} missed by the kernel{gaps}",
        plural(tally.shown, "transition shown", "transitions shown"),
        tally.hidden + counters.filtered,
        counters.lost,
        counters.missed
    )
}

/// What the traced command did to the listening ports, for stderr.
pub(super) fn restart_summary(analysis: &Analysis) -> String {
    analyse::listeners_text(&analysis.report(10))
}

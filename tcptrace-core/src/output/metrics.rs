//! Metrics: counters a Prometheus server scrapes from `--metrics ADDR`, so a
//! fleet's existing monitoring aggregates many hosts.
//!
//! The hot path only bumps plain integers in fixed arrays; the OpenMetrics
//! text (prometheus-client's encoder) is built when a scrape comes, which is
//! a few times a minute.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::model::State;
use crate::model::{Close, Origin, Row};
use crate::model::{Counters, OtlpCounts};

#[derive(Default)]
pub struct Metrics {
    /// Shown transitions, by (old, new) state number.
    transitions: Box<[[u64; State::SLOTS]; State::SLOTS]>,
    /// Closes by reset: sent, received, refused.
    resets: [u64; 3],
    /// Rows from the time-wait table.
    timewait: u64,
    /// How accept() and close() are hooked ("fentry", "syscalls",
    /// "none"): the system-call path taxes the whole host, which a fleet
    /// wants to see.
    owner_path: Option<&'static str>,
    timewait_path: Option<&'static str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    old: String,
    new: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    pub fn with_owner_path(mut self, path: &'static str) -> Metrics {
        self.owner_path = Some(path);
        self
    }

    pub fn with_timewait_path(mut self, path: &'static str) -> Metrics {
        self.timewait_path = Some(path);
        self
    }

    pub fn count(&mut self, row: &Row) {
        match row.origin {
            Origin::Tracepoint => {
                self.transitions[row.t.old.slot()][row.t.new.slot()] += 1;
            }
            Origin::TimeWait | Origin::TimeWaitKernel => self.timewait += 1,
            Origin::Snapshot => {}
        }
        match row.close {
            Some(Close::ResetSent(_)) => self.resets[0] += 1,
            Some(Close::ResetReceived) => self.resets[1] += 1,
            Some(Close::Refused) => self.resets[2] += 1,
            None => {}
        }
    }

    /// The OpenMetrics text of a scrape. `sockets` counts the sockets
    /// tcptrace knows of, by current state; `gaps` those whose history
    /// skipped a state.
    /// `otlp`: with `--otlp`, what became of the rows sent to the
    /// collector.
    pub fn render(
        &self,
        counters: &Counters,
        sockets: &[(State, u64)],
        gaps: u64,
        otlp: Option<&OtlpCounts>,
    ) -> String {
        let mut registry = Registry::with_prefix("tcptrace");
        let transitions = Family::<TransitionLabels, Counter>::default();
        for (old, row) in self.transitions.iter().enumerate() {
            for (new, &n) in row.iter().enumerate() {
                if n > 0 {
                    let labels = TransitionLabels {
                        old: State(old as u8).to_string(),
                        new: State(new as u8).to_string(),
                    };
                    transitions.get_or_create(&labels).inc_by(n);
                }
            }
        }
        registry.register(
            "transitions",
            "TCP state transitions shown, by old and new state",
            transitions,
        );
        let resets = Family::<KindLabels, Counter>::default();
        for (kind, n) in ["sent", "received", "refused"].iter().zip(self.resets) {
            resets
                .get_or_create(&KindLabels {
                    kind: kind.to_string(),
                })
                .inc_by(n);
        }
        registry.register("resets", "Closes caused by a reset, by direction", resets);
        let lost = Family::<KindLabels, Counter>::default();
        lost.get_or_create(&KindLabels {
            kind: "ring_full".into(),
        })
        .inc_by(counters.lost);
        lost.get_or_create(&KindLabels {
            kind: "kernel_skipped".into(),
        })
        .inc_by(counters.missed);
        registry.register("lost_events", "Transitions tcptrace could not show", lost);
        let mut count = |name: &str, help: &str, n: u64| {
            let c: Counter = Counter::default();
            c.inc_by(n);
            registry.register(name, help, c);
        };
        count(
            "owner_hooks_skipped",
            "Runs of the accept, close, fork and exit hooks the kernel skipped: changes of holder not seen",
            counters.hooks_missed,
        );
        count(
            "sockets_with_gaps",
            "Sockets whose history skipped a state: transitions between them never arrived",
            gaps,
        );
        count(
            "timewait_changes",
            "Changes of connections in time-wait, polled from the kernel's table or reported by it",
            self.timewait,
        );
        if let Some(path) = self.owner_path {
            let info = Family::<PathLabels, Gauge>::default();
            info.get_or_create(&PathLabels { path: path.into() }).set(1);
            registry.register(
                "owner_path",
                "How accept() and close() are hooked: fentry, or syscalls (every system call on the host pays)",
                info,
            );
        }
        if let Some(path) = self.timewait_path {
            let info = Family::<PathLabels, Gauge>::default();
            info.get_or_create(&PathLabels { path: path.into() }).set(1);
            registry.register(
                "timewait_path",
                "How connections are followed through time-wait: kernel (as it happens), polled (the time-wait table every 250 ms), or none",
                info,
            );
        }
        let per_state = Family::<StateLabels, Gauge>::default();
        for (state, n) in sockets {
            per_state
                .get_or_create(&StateLabels {
                    state: state.to_string(),
                })
                .set(*n as i64);
        }
        registry.register(
            "sockets",
            "Sockets tcptrace follows, by current state",
            per_state,
        );
        if let Some(o) = otlp {
            let records = Family::<ResultLabels, Counter>::default();
            for (result, n) in [
                ("sent", o.sent),
                ("dropped", o.dropped),
                ("spooled", o.spooled),
            ] {
                records
                    .get_or_create(&ResultLabels {
                        result: result.into(),
                    })
                    .inc_by(n);
            }
            registry.register(
                "otlp_records",
                "Rows handed to the OTLP collector: sent (acknowledged), dropped (lost), spooled (written to the disk spool while it was away)",
                records,
            );
            let waiting: Gauge = Gauge::default();
            waiting.set(o.waiting as i64);
            registry.register(
                "otlp_waiting_records",
                "Rows not yet acknowledged by the OTLP collector (in memory or in the disk spool)",
                waiting,
            );
        }
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_path_is_an_info_gauge_when_known() {
        let text =
            Metrics::new()
                .with_owner_path("fentry")
                .render(&Counters::default(), &[], 0, None);
        assert!(
            text.contains("tcptrace_owner_path{path=\"fentry\"} 1"),
            "{text}"
        );
        let text = Metrics::new().render(&Counters::default(), &[], 0, None);
        assert!(!text.contains("owner_path"), "{text}");
        assert!(!text.contains("otlp"), "{text}");
    }

    #[test]
    fn otlp_records_are_counted_by_result() {
        let counts = OtlpCounts {
            sent: 7,
            dropped: 2,
            spooled: 3,
            waiting: 1,
        };
        let text = Metrics::new().render(&Counters::default(), &[], 0, Some(&counts));
        for line in [
            "tcptrace_otlp_records_total{result=\"sent\"} 7",
            "tcptrace_otlp_records_total{result=\"dropped\"} 2",
            "tcptrace_otlp_records_total{result=\"spooled\"} 3",
            "tcptrace_otlp_waiting_records 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn the_time_wait_path_is_an_info_gauge_beside_the_owner_path() {
        let text = Metrics::new()
            .with_owner_path("fentry")
            .with_timewait_path("kernel")
            .render(&Counters::default(), &[], 0, None);
        assert!(
            text.contains("tcptrace_timewait_path{path=\"kernel\"} 1"),
            "{text}"
        );
        let text = Metrics::new().render(&Counters::default(), &[], 0, None);
        assert!(!text.contains("timewait_path"), "{text}");
    }
}

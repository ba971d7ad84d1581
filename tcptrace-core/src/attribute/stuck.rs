//! Stuck: the sockets followed, looked over as a whole rather than one
//! transition at a time.
//!
//! A socket left in a state it should not linger in (`--stuck`) makes no
//! transition to tell it; only a look at every socket's time in its state
//! finds it, and the same look counts the sockets in each state. Both run
//! when asked (a `--stuck` check, a metrics scrape), never per event.

use crate::model::{Origin, Row, State};

use super::Attributor;

impl Attributor {
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
                timing: crate::model::Timing::Exact,
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

    /// Sockets currently tracked.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.socks.len()
    }
}

#[cfg(test)]
mod tests {
    use crate::attribute::Attributor;
    use crate::attribute::testkit::*;
    use crate::model::*;

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
}

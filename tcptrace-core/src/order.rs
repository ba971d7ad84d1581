//! Order: when a row may go out, so that output stays in time order while
//! a row can still learn something from an event the kernel stamps just
//! after it.
//!
//! Two such events: the reset the kernel sends on an abort (reported after
//! the `-> CLOSE` it causes), and, before Linux 6.6, a child socket's
//! addresses (its first row has none; the next one, at once, has them). A
//! row that may be completed so waits until every event up to
//! [`FOLLOWS_NS`] after it has been read; rows behind it queue in ring
//! order. A row nothing waits ahead of goes out at once, without a copy
//! through the queue: the common case under churn. Rows the time-wait table
//! gives (it is polled, not traced) join the ring's by time, once every
//! ring event older than them has been read. They carry the kernel's time
//! where it is known, often older than ring rows already out: those go out
//! at the next release, after the rows already out (a reader of the output
//! sees them as late as the poll that found them; a recording keeps that
//! order, so that a replay prints what the live run printed).
//!
//! Kernel-free: the live driver feeds rows, sent resets and the read mark,
//! and a [`Sink`] takes what may go out.

use std::collections::VecDeque;

use crate::model::{Close, Row, State, may_await_sent_reset};

/// How long after a row the kernel stamps the event that completes it (the
/// reset it sends, a child's addresses), with room for an emulated CPU: the
/// two are microseconds apart in the same softirq on real hardware.
pub const FOLLOWS_NS: u64 = 10_000_000;

/// Queued rows at which those free to go are let go at once, not at the
/// end of the read: a long read under churn would otherwise hold them all.
const FULL: usize = 4096;

/// Where rows go once they may.
pub trait Sink {
    type Error;
    /// A ring row, final now: its reset has had its chance to arrive.
    fn ring_row(&mut self, row: &Row) -> Result<(), Self::Error>;
    /// A row the time-wait table gave, in its place among the ring's.
    fn table_row(&mut self, row: &Row) -> Result<(), Self::Error>;
}

/// The rows not yet out, and what has been read.
#[derive(Default)]
pub struct Order {
    /// Ring rows in ring order, behind one that waits.
    pending: VecDeque<Pending>,
    /// The time-wait table's rows, waiting for the ring events older than
    /// them.
    table: VecDeque<Row>,
    /// Every ring event stamped before this has been read.
    read_to: u64,
    /// Nothing more will be read: no row waits any longer.
    last: bool,
    /// This kernel reports a child's first row before its addresses
    /// (before 6.6): later rows fill them in. Newer kernels never pay for
    /// the search.
    addressless_children: bool,
}

struct Pending {
    row: Row,
    /// Waiting for an event the kernel stamps just after it (a sent reset,
    /// a child's addresses), until every event up to `FOLLOWS_NS` later has
    /// been read. Counted in time, not in reads: the poll runs every
    /// millisecond under load, and on a slow (emulated) machine the second
    /// event can come later than the next read.
    waits: bool,
}

impl Order {
    pub fn new() -> Order {
        Order::default()
    }

    /// A row of the ring, in ring order: out at once when it waits for
    /// nothing and nothing waits ahead of it, queued otherwise.
    pub fn push<S: Sink>(&mut self, row: &Row, sink: &mut S) -> Result<(), S::Error> {
        let addressless = lacks_child_addresses(row);
        self.addressless_children |= addressless;
        if self.addressless_children {
            fill_child_addresses(&mut self.pending, row);
        }
        let waits = may_await_sent_reset(row) || addressless;
        if waits || !self.pending.is_empty() {
            self.pending.push_back(Pending { row: *row, waits });
            self.release_if_full(sink)
        } else {
            release_row(&mut self.table, row, sink)
        }
    }

    /// The kernel sent a reset on `skaddr`: the abort waiting for it says
    /// so, and waits no more.
    pub fn reset_sent<S: Sink>(
        &mut self,
        skaddr: u64,
        reason: Option<&'static str>,
        sink: &mut S,
    ) -> Result<(), S::Error> {
        if let Some(p) = self
            .pending
            .iter_mut()
            .rev()
            .find(|p| p.waits && p.row.t.skaddr == skaddr && may_await_sent_reset(&p.row))
        {
            p.row.close = Some(Close::ResetSent(reason));
            p.waits = false;
        }
        self.release_if_full(sink)
    }

    /// Rows of sockets that existed before tracing began: they wait for
    /// nothing, and go out now with any row queued before them.
    pub fn existing<S: Sink>(
        &mut self,
        rows: impl IntoIterator<Item = Row>,
        sink: &mut S,
    ) -> Result<(), S::Error> {
        for row in rows {
            self.pending.push_back(Pending { row, waits: false });
        }
        self.release_from(true, sink)
    }

    /// Rows the time-wait table gave. Each joins the others by time: a
    /// read dates a change back to the kernel's moment where it can (a
    /// time-wait socket entering TIME_WAIT with the `-> CLOSE` that made
    /// it), earlier than rows of an earlier read still waiting.
    pub fn table_rows(&mut self, rows: impl IntoIterator<Item = Row>) {
        for row in rows {
            let at = self.table.partition_point(|q| q.t.ts_ns <= row.t.ts_ns);
            self.table.insert(at, row);
        }
    }

    /// Every ring event stamped before `ts_ns` has been read and pushed.
    pub fn read_up_to(&mut self, ts_ns: u64) {
        self.read_to = ts_ns;
    }

    /// The rings are being read for the last time: no event can follow, so
    /// from now on every row goes out at the next release.
    pub fn finishing(&mut self) {
        self.last = true;
    }

    /// Lets go of every row from the front of the queue up to one still
    /// waiting, and of the time-wait rows the ring has been read past.
    pub fn release<S: Sink>(&mut self, sink: &mut S) -> Result<(), S::Error> {
        self.release_from(self.last, sink)
    }

    fn release_if_full<S: Sink>(&mut self, sink: &mut S) -> Result<(), S::Error> {
        if self.pending.len() >= FULL {
            self.release(sink)?;
        }
        Ok(())
    }

    fn release_from<S: Sink>(&mut self, all: bool, sink: &mut S) -> Result<(), S::Error> {
        // Rows go out from where they wait, not moved out first.
        while let Some(front) = self.pending.front() {
            if !all && front.waits && front.row.t.ts_ns.saturating_add(FOLLOWS_NS) > self.read_to {
                return Ok(());
            }
            let out = release_row(&mut self.table, &front.row, sink);
            self.pending.pop_front();
            out?;
        }
        // With no ring row waiting, a time-wait row is due once every ring
        // event older than it has been read.
        let due = if all { u64::MAX } else { self.read_to };
        release_table_to(&mut self.table, due, sink)
    }
}

/// A ring row nothing waits ahead of, after the time-wait table's rows
/// older than it.
fn release_row<S: Sink>(
    table: &mut VecDeque<Row>,
    row: &Row,
    sink: &mut S,
) -> Result<(), S::Error> {
    release_table_to(table, row.t.ts_ns, sink)?;
    sink.ring_row(row)
}

/// The time-wait table's rows up to `ts_ns`.
fn release_table_to<S: Sink>(
    table: &mut VecDeque<Row>,
    ts_ns: u64,
    sink: &mut S,
) -> Result<(), S::Error> {
    while table.front().is_some_and(|tw| tw.t.ts_ns <= ts_ns) {
        let row = table.pop_front().expect("front exists");
        sink.table_row(&row)?;
    }
    Ok(())
}

/// Before 6.6 or so the kernel reports a child's `LISTEN -> SYN_RECV` before
/// it copies the addresses in from the request, so its remote end reads
/// `0.0.0.0:0`; the `SYN_RECV -> ESTABLISHED` that follows at once has
/// them. That row is still waiting here: it gets them too, so that
/// `--rport`, `--follow` and reports see the connection from its first row.
fn fill_child_addresses(pending: &mut VecDeque<Pending>, row: &Row) {
    if (row.t.old, row.t.new) != (State::SYN_RECV, State::ESTABLISHED) {
        return;
    }
    if let Some(first) = pending
        .iter_mut()
        .rev()
        .take(64)
        .find(|p| p.row.sock == row.sock && lacks_child_addresses(&p.row))
    {
        first.row.t.local = row.t.local;
        first.row.t.remote = row.t.remote;
        first.waits = false;
    }
}

/// A child's first row as kernels before 6.6 report it; it waits (like a
/// possible abort) so that the row with the addresses can reach it.
#[inline]
fn lacks_child_addresses(row: &Row) -> bool {
    (row.t.old, row.t.new) == (State::LISTEN, State::SYN_RECV) && row.t.remote.port() == 0
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use crate::model::{Comm, Family, Origin, Task, Transition};

    const MS: u64 = 1_000_000;

    fn row(sock: u64, old: State, new: State, remote: &str) -> Row {
        Row {
            t: Transition {
                ts_ns: 0,
                skaddr: sock,
                task: Task::default(),
                thread: Comm::default(),
                old,
                new,
                family: Family::V4,
                local: "127.0.0.1:80".parse().unwrap(),
                remote: remote.parse().unwrap(),
                netns: 1,
            },
            sock,
            owner: None,
            dwell_ns: None,
            close: None,
            origin: Origin::Tracepoint,
            queued: true,
            timing: crate::model::Timing::Exact,
        }
    }

    fn at(ms: u64, mut r: Row) -> Row {
        r.t.ts_ns = ms * MS;
        r
    }

    /// An open connection closing: may be an abort, so it waits.
    fn abort(sock: u64, ms: u64) -> Row {
        at(
            ms,
            row(sock, State::ESTABLISHED, State::CLOSE, "10.0.0.2:5000"),
        )
    }

    /// A row nothing completes later.
    fn plain(sock: u64, ms: u64) -> Row {
        at(
            ms,
            row(sock, State::SYN_SENT, State::ESTABLISHED, "10.0.0.2:5000"),
        )
    }

    fn time_wait(sock: u64, ms: u64) -> Row {
        let mut r = at(
            ms,
            row(sock, State::TIME_WAIT, State::CLOSE, "10.0.0.2:5000"),
        );
        r.origin = Origin::TimeWait;
        r
    }

    /// What went out, in order.
    #[derive(Default)]
    struct Out(Vec<Row>);

    impl Out {
        /// The socket of each row out, in order.
        fn socks(&self) -> Vec<u64> {
            self.0.iter().map(|r| r.sock).collect()
        }
    }

    impl Sink for Out {
        type Error = Infallible;
        fn ring_row(&mut self, row: &Row) -> Result<(), Infallible> {
            self.0.push(*row);
            Ok(())
        }
        fn table_row(&mut self, row: &Row) -> Result<(), Infallible> {
            assert_eq!(
                row.origin,
                Origin::TimeWait,
                "only table rows come this way"
            );
            self.0.push(*row);
            Ok(())
        }
    }

    #[test]
    fn a_row_nothing_waits_for_goes_out_at_once() {
        let (mut order, mut out) = (Order::new(), Out::default());
        order.push(&plain(1, 1), &mut out).unwrap();
        assert_eq!(out.socks(), [1], "out before any release");
    }

    #[test]
    fn a_row_waiting_for_its_reset_gets_it_and_goes_out_with_it() {
        let (mut order, mut out) = (Order::new(), Out::default());
        order.push(&abort(1, 1), &mut out).unwrap();
        order.release(&mut out).unwrap();
        assert!(out.0.is_empty(), "an abort waits for its reset");

        order
            .reset_sent(1, Some("NOT_SPECIFIED"), &mut out)
            .unwrap();
        order.release(&mut out).unwrap();
        assert_eq!(out.socks(), [1]);
        assert_eq!(
            out.0[0].close,
            Some(Close::ResetSent(Some("NOT_SPECIFIED")))
        );
    }

    #[test]
    fn a_reset_on_another_socket_leaves_the_abort_waiting() {
        let (mut order, mut out) = (Order::new(), Out::default());
        order.push(&abort(1, 1), &mut out).unwrap();
        order.reset_sent(2, None, &mut out).unwrap();
        order.release(&mut out).unwrap();
        assert!(out.0.is_empty());
    }

    #[test]
    fn an_abort_without_a_reset_goes_out_after_10_ms_of_later_events() {
        let (mut order, mut out) = (Order::new(), Out::default());
        order.push(&abort(1, 1), &mut out).unwrap();

        order.read_up_to(11 * MS - 1);
        order.release(&mut out).unwrap();
        assert!(out.0.is_empty(), "a reset may still come");

        order.read_up_to(11 * MS);
        order.release(&mut out).unwrap();
        assert_eq!(out.socks(), [1]);
        assert_eq!(out.0[0].close, None, "a close with no reset says none");
    }

    #[test]
    fn rows_behind_a_waiting_row_keep_their_order() {
        let (mut order, mut out) = (Order::new(), Out::default());
        order.push(&abort(1, 1), &mut out).unwrap();
        order.push(&plain(2, 2), &mut out).unwrap();
        order.push(&plain(3, 3), &mut out).unwrap();
        assert!(out.0.is_empty(), "nothing passes the waiting row");

        order.reset_sent(1, None, &mut out).unwrap();
        order.release(&mut out).unwrap();
        assert_eq!(out.socks(), [1, 2, 3]);
    }

    #[test]
    fn a_row_after_the_queue_emptied_goes_out_at_once_again() {
        let (mut order, mut out) = (Order::new(), Out::default());
        order.push(&abort(1, 1), &mut out).unwrap();
        order.reset_sent(1, None, &mut out).unwrap();
        order.release(&mut out).unwrap();
        order.push(&plain(2, 2), &mut out).unwrap();
        assert_eq!(out.socks(), [1, 2]);
    }

    #[test]
    fn a_time_wait_row_goes_out_between_the_rows_it_falls_between() {
        let (mut order, mut out) = (Order::new(), Out::default());
        order.push(&plain(1, 1), &mut out).unwrap();
        order.table_rows([time_wait(2, 2)]);
        order.push(&plain(3, 3), &mut out).unwrap();
        assert_eq!(out.socks(), [1, 2, 3]);
    }

    #[test]
    fn a_time_wait_row_goes_out_between_queued_rows_by_time() {
        let (mut order, mut out) = (Order::new(), Out::default());
        order.push(&abort(1, 1), &mut out).unwrap();
        order.push(&plain(3, 3), &mut out).unwrap();
        order.table_rows([time_wait(2, 2), time_wait(4, 4)]);
        order.reset_sent(1, None, &mut out).unwrap();
        order.read_up_to(5 * MS);
        order.release(&mut out).unwrap();
        assert_eq!(out.socks(), [1, 2, 3, 4]);
    }

    #[test]
    fn a_time_wait_row_waits_until_the_ring_has_been_read_past_it() {
        let (mut order, mut out) = (Order::new(), Out::default());
        order.table_rows([time_wait(1, 5)]);
        order.read_up_to(5 * MS - 1);
        order.release(&mut out).unwrap();
        assert!(
            out.0.is_empty(),
            "a ring event older than it may still come"
        );

        order.read_up_to(5 * MS);
        order.release(&mut out).unwrap();
        assert_eq!(out.socks(), [1]);
    }

    #[test]
    fn a_time_wait_row_dated_before_rows_already_out_goes_out_at_the_next_release() {
        let (mut order, mut out) = (Order::new(), Out::default());
        order.push(&plain(1, 1), &mut out).unwrap();
        order.push(&plain(3, 300), &mut out).unwrap();
        order.read_up_to(300 * MS);
        // The read 250 ms after the close found the time-wait socket it
        // made: dated back to that close, after a later read's older row.
        order.table_rows([time_wait(5, 260)]);
        order.table_rows([time_wait(2, 1)]);
        order.release(&mut out).unwrap();
        assert_eq!(out.socks(), [1, 3, 2, 5]);
    }

    #[test]
    fn a_full_queue_goes_out_before_the_read_ends() {
        let (mut order, mut out) = (Order::new(), Out::default());
        order.push(&abort(1, 0), &mut out).unwrap();
        // The abort's 10 ms have been read, but its release comes at the
        // end of the read under way; rows pile up behind it meanwhile.
        order.read_up_to(20 * MS);
        for sock in 2..FULL as u64 {
            order.push(&plain(sock, 20), &mut out).unwrap();
        }
        assert!(out.0.is_empty(), "{} rows queued", FULL - 1);

        order.push(&plain(FULL as u64, 20), &mut out).unwrap();
        assert_eq!(out.socks(), (1..=FULL as u64).collect::<Vec<_>>());
    }

    #[test]
    fn a_full_queue_keeps_a_row_whose_reset_may_still_come() {
        let (mut order, mut out) = (Order::new(), Out::default());
        order.push(&abort(1, 0), &mut out).unwrap();
        for sock in 2..=FULL as u64 + 1 {
            order.push(&plain(sock, 1), &mut out).unwrap();
        }
        assert!(out.0.is_empty());

        order.reset_sent(1, None, &mut out).unwrap();
        assert_eq!(out.0.len(), FULL + 1, "the reset lets the full queue go");
    }

    #[test]
    fn the_last_read_lets_every_row_go() {
        let (mut order, mut out) = (Order::new(), Out::default());
        order.push(&abort(1, 1), &mut out).unwrap();
        order.push(&plain(2, 2), &mut out).unwrap();
        order.table_rows([time_wait(3, 3)]);
        order.finishing();
        order.release(&mut out).unwrap();
        assert_eq!(out.socks(), [1, 2, 3]);
    }

    #[test]
    fn existing_sockets_go_out_at_once_in_the_order_given() {
        let (mut order, mut out) = (Order::new(), Out::default());
        let mut rows = [plain(2, 0), abort(1, 0)];
        for r in &mut rows {
            r.origin = Origin::Snapshot;
        }
        order.existing(rows, &mut out).unwrap();
        assert_eq!(out.socks(), [2, 1], "a snapshot's close waits for no reset");
    }

    #[test]
    fn a_childs_first_row_gets_the_clients_address_older_kernels_leave_out() {
        let mut pending = VecDeque::new();
        for r in [
            row(7, State::LISTEN, State::SYN_RECV, "0.0.0.0:0"),
            row(8, State::LISTEN, State::SYN_RECV, "0.0.0.0:0"),
        ] {
            pending.push_back(Pending {
                row: r,
                waits: false,
            });
        }
        fill_child_addresses(
            &mut pending,
            &row(7, State::SYN_RECV, State::ESTABLISHED, "127.0.0.1:5000"),
        );
        assert_eq!(pending[0].row.t.remote, "127.0.0.1:5000".parse().unwrap());
        // Another child's row keeps waiting for its own.
        assert_eq!(pending[1].row.t.remote.port(), 0);
    }

    #[test]
    fn a_childs_first_row_waits_for_its_addresses_and_goes_out_with_them() {
        let (mut order, mut out) = (Order::new(), Out::default());
        order
            .push(
                &row(7, State::LISTEN, State::SYN_RECV, "0.0.0.0:0"),
                &mut out,
            )
            .unwrap();
        order
            .push(
                &row(8, State::LISTEN, State::SYN_RECV, "0.0.0.0:0"),
                &mut out,
            )
            .unwrap();
        assert!(
            out.0.is_empty(),
            "a child's first row waits for its addresses"
        );

        let established = row(7, State::SYN_RECV, State::ESTABLISHED, "127.0.0.1:5000");
        order.push(&established, &mut out).unwrap();
        order.release(&mut out).unwrap();
        assert_eq!(out.socks(), [7], "the other child's row still waits");
        assert_eq!(out.0[0].t.remote, "127.0.0.1:5000".parse().unwrap());
    }
}

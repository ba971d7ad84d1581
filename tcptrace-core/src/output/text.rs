//! Text rows: aligned columns under a header line, states coloured by
//! meaning on a terminal.
//!
//! Columns are padded by hand: `Formatter::pad` costs more than the rest of
//! the row, and this runs for every row shown or replayed. Each column is
//! its own step, in the order the header names them.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, Write};

use super::bytes::{is_plain, pad, push_addr, push_frac, push_micros, push_u64, put};
use super::{Printer, TimeFormat, escape_comm};
use crate::cgroup;
use crate::model::{Origin, Phase, Row, State, Task, Timing, Transition};

/// Width of an address column: fits `255.255.255.255:65535`.
const ADDR_WIDTH: usize = 21;
const COMM_WIDTH: usize = 15;
/// Width of a state column: fits `ESTABLISHED`.
const STATE_WIDTH: usize = 11;

/// SGR colours by phase: opening cyan, listening blue, established green,
/// closing yellow, closed dim; resets red.
fn sgr(phase: Phase) -> &'static str {
    match phase {
        Phase::Opening => "\x1b[36m",
        Phase::Listening => "\x1b[34m",
        Phase::Established => "\x1b[32m",
        Phase::Closing => "\x1b[33m",
        Phase::Closed => "\x1b[2m",
        Phase::Unknown => "",
    }
}
const SGR_RESET: &str = "\x1b[0m";
const SGR_ALERT: &str = "\x1b[1;31m";

impl Printer {
    pub(super) fn text_header(&self, out: &mut impl Write) -> io::Result<()> {
        let time = match self.style.time {
            TimeFormat::Local => "TIME           ",
            TimeFormat::Utc => "TIME            ",
            TimeFormat::Relative => "      TIME",
            TimeFormat::None => "",
        };
        if !time.is_empty() {
            write!(out, "{time}  ")?;
        }
        write!(
            out,
            "{:>7}  {:<COMM_WIDTH$}  {:<ADDR_WIDTH$}  {:<ADDR_WIDTH$}  {:>11}    {:<11}  {:>10}  SOCK",
            "PID", "COMM", "LADDR:LPORT", "RADDR:RPORT", "OLD", "NEW", "MS"
        )?;
        if self.style.wide {
            out.write_all(b"       NETNS  UNIT")?;
        }
        if self.style.show_skaddr {
            out.write_all(b"  SKADDR")?;
        }
        out.write_all(b"\n")
    }

    /// One row, its columns in the header's order, then its notes.
    pub(super) fn text(&mut self, b: &mut Vec<u8>, row: &Row) {
        if self.style.time != TimeFormat::None {
            self.time_text(b, row.t.ts_ns);
            put(b, b"  ");
        }
        self.owner_columns(b, row.owner.as_ref());
        put(b, b"  ");
        address_columns(b, &row.t);
        self.state_columns(b, row);
        put(b, b"  ");
        dwell_column(b, row.dwell_ns);
        put(b, b"  ");
        push_u64(b, row.sock);
        if self.style.wide {
            put(b, b"  ");
            netns_column(b, row.t.netns);
            put(b, b"  ");
            self.unit_column(b, row.owner.and_then(|o| o.cgroup));
        }
        // 0: no address known (a snapshot row, a recording made without it).
        if self.style.show_skaddr {
            match row.t.skaddr {
                0 => put(b, b"  -"),
                a => {
                    let _ = write!(b, "  {a:#x}");
                }
            }
        }
        self.notes(b, row);
        b.push(b'\n');
    }

    /// The time column.
    fn time_text(&mut self, b: &mut Vec<u8>, ts_ns: u64) {
        if self.style.time == TimeFormat::Relative {
            self.scratch.clear();
            let us = self.relative_us(ts_ns);
            let sign = if us < 0 { "-" } else { "" };
            let us = us.unsigned_abs();
            let _ = write!(
                self.scratch,
                "{sign}{}.{:06}",
                us / 1_000_000,
                us % 1_000_000
            );
            let pad = 10usize.saturating_sub(self.scratch.len());
            self.scratch.insert_str(0, &"          "[..pad]);
            put(b, self.scratch.as_bytes());
            return;
        }
        let (sec, us) = self.split_wall(ts_ns);
        self.refresh_prefix(sec, "%H:%M:%S");
        put(b, self.cached_prefix.as_bytes());
        push_micros(b, us);
        if self.style.time == TimeFormat::Utc {
            put(b, self.cached_zone.as_bytes());
        }
    }

    /// PID and COMM: dashes when the owner is not known.
    fn owner_columns(&mut self, b: &mut Vec<u8>, owner: Option<&Task>) {
        let Some(o) = owner else {
            pad_left(b, b"-", 7);
            put(b, b"  ");
            pad_right_chars(b, "-", COMM_WIDTH);
            return;
        };
        pad_left(b, itoa::Buffer::new().format(o.pid).as_bytes(), 7);
        put(b, b"  ");
        let comm = o.comm.as_bytes();
        if is_plain(comm) {
            put(b, comm);
            pad(b, COMM_WIDTH.saturating_sub(comm.len()));
        } else {
            self.scratch.clear();
            escape_comm(&o.comm.as_str(), &mut self.scratch);
            pad_right_chars(b, &self.scratch, COMM_WIDTH);
        }
    }

    /// OLD -> NEW; a snapshot row has no old state. Coloured, the padding
    /// stays outside the colour codes, so that columns stay aligned.
    fn state_columns(&self, b: &mut Vec<u8>, row: &Row) {
        let t = &row.t;
        let old = if row.origin == Origin::Snapshot {
            None
        } else {
            Some(t.old)
        };
        let name = |s: State| -> Cow<'static, str> {
            match s.name() {
                "" => Cow::Owned(s.to_string()),
                known => Cow::Borrowed(known),
            }
        };
        let (old_name, new_name) = (old.map_or(Cow::Borrowed("-"), name), name(t.new));
        if !self.style.color {
            pad_left(b, old_name.as_bytes(), STATE_WIDTH);
            put(b, b" -> ");
            pad_right_chars(b, &new_name, STATE_WIDTH);
            return;
        }
        pad_left(b, b"", STATE_WIDTH.saturating_sub(old_name.len()));
        match old {
            Some(o) => {
                let _ = write!(b, "{}{old_name}{SGR_RESET}", sgr(o.phase()));
            }
            None => put(b, old_name.as_bytes()),
        }
        let _ = write!(b, " -> {}{new_name}{SGR_RESET}", sgr(t.new.phase()));
        pad_left(b, b"", STATE_WIDTH.saturating_sub(new_name.len()));
    }

    /// The owner's container (its name where this host knows it, else the
    /// id's first 12 digits), else its systemd unit, else a dash.
    fn unit_column(&mut self, b: &mut Vec<u8>, cgroup: Option<&'static str>) {
        match (
            cgroup.and_then(cgroup::container),
            cgroup.and_then(cgroup::unit),
        ) {
            (Some(id), _) => {
                put(b, b"container:");
                match cgroup.and_then(|p| self.names.of(p)) {
                    Some(name) => {
                        self.scratch.clear();
                        escape_comm(name, &mut self.scratch);
                        put(b, self.scratch.as_bytes());
                    }
                    None => put(b, &id.as_bytes()[..12]),
                }
            }
            (None, Some(unit)) => {
                self.scratch.clear();
                escape_comm(unit, &mut self.scratch);
                put(b, self.scratch.as_bytes());
            }
            (None, None) => b.push(b'-'),
        }
    }

    /// After the columns: where the row came from, if not the tracepoint,
    /// and how the socket closed, if by a reset.
    fn notes(&self, b: &mut Vec<u8>, row: &Row) {
        match row.origin {
            Origin::Tracepoint => {}
            Origin::Snapshot => put(b, b"  snapshot"),
            Origin::TimeWait => put(b, b"  time-wait table"),
            Origin::TimeWaitKernel => put(b, b"  time-wait (kernel)"),
        }
        // A time only known to the time-wait socket's timer, or to the
        // poll, says so: its MS is no better.
        match row.timing {
            Timing::Exact => {}
            Timing::Timer => put(b, b" (time: timer)"),
            Timing::Poll => put(b, b" (time: poll)"),
        }
        if row.queued {
            put(b, b"  queued");
        }
        if let Some(c) = row.close {
            let (on, off) = if self.style.color {
                (SGR_ALERT, SGR_RESET)
            } else {
                ("", "")
            };
            let _ = match c.reset_reason() {
                Some(reason) => write!(b, "  {on}{} ({reason}){off}", c.name()),
                None => write!(b, "  {on}{}{off}", c.name()),
            };
        }
    }
}

/// LADDR:LPORT and RADDR:RPORT, each followed by its gap.
fn address_columns(b: &mut Vec<u8>, t: &Transition) {
    for addr in [t.local, t.remote] {
        let start = b.len();
        push_addr(b, &addr);
        let used = b.len() - start;
        pad(b, ADDR_WIDTH.saturating_sub(used));
        put(b, b"  ");
    }
}

/// Milliseconds in the old state, to the microsecond; a dash when the
/// socket was not seen entering it.
fn dwell_column(b: &mut Vec<u8>, dwell_ns: Option<u64>) {
    match dwell_ns {
        Some(ns) => {
            let us = ns / 1000;
            let mut digits = itoa::Buffer::new();
            let whole = digits.format(us / 1000);
            pad(b, 6usize.saturating_sub(whole.len()));
            put(b, whole.as_bytes());
            b.push(b'.');
            push_frac(b, us % 1000, 3);
        }
        None => pad_left(b, b"-", 10),
    }
}

fn netns_column(b: &mut Vec<u8>, netns: u32) {
    match netns {
        0 => pad_left(b, b"-", 10),
        n => pad_left(b, itoa::Buffer::new().format(n).as_bytes(), 10),
    }
}

/// `bytes` right-aligned in `width` columns (ASCII).
fn pad_left(b: &mut Vec<u8>, bytes: &[u8], width: usize) {
    pad(b, width.saturating_sub(bytes.len()));
    put(b, bytes);
}

/// `s` left-aligned in `width` columns, counted in characters as `{:<w}`.
fn pad_right_chars(b: &mut Vec<u8>, s: &str, width: usize) {
    put(b, s.as_bytes());
    let n = if s.is_ascii() {
        s.len()
    } else {
        s.chars().count()
    };
    pad(b, width.saturating_sub(n));
}

#[cfg(test)]
mod tests {
    use super::super::tests::{render, row};
    use super::super::{OutputFormat, Style};
    use super::*;

    fn text(time: TimeFormat) -> Style {
        Style {
            format: OutputFormat::Text,
            time,
            show_skaddr: false,
            wide: false,
            color: false,
        }
    }

    #[test]
    fn text_row_escapes_the_comm_and_hides_the_kernel_address() {
        let s = render(text(TimeFormat::Utc), &row());
        let mut lines = s.lines();
        let header = lines.next().unwrap();
        let line = lines.next().unwrap();
        assert_eq!(
            line,
            "10:00:01.234567Z     4242  evil\\x1b[2Jname  [::1]:6389             [::1]:53525            ESTABLISHED -> CLOSE_WAIT       12.345  3"
        );
        // Columns line up with the header.
        assert_eq!(
            header.find("PID").unwrap() + 3,
            line.find("4242").unwrap() + 4
        );
        assert!(!s.contains("dead"));
    }

    #[test]
    fn a_time_wait_row_says_how_well_its_time_is_known() {
        let mut r = row();
        r.origin = Origin::TimeWait;
        for (timing, note) in [
            (Timing::Exact, "  time-wait table\n"),
            (Timing::Timer, "  time-wait table (time: timer)\n"),
            (Timing::Poll, "  time-wait table (time: poll)\n"),
        ] {
            r.timing = timing;
            let line = render(text(TimeFormat::None), &r);
            assert!(line.ends_with(&format!("3{note}")), "{line:?}");
        }
    }

    #[test]
    fn unknown_owner_and_dwell_are_dashes_not_zeros() {
        let mut r = row();
        r.owner = None;
        r.dwell_ns = None;
        let s = render(text(TimeFormat::None), &r);
        let line = s.lines().nth(1).unwrap();
        assert!(line.starts_with("      -  -  "), "{line}");
        assert!(line.ends_with("CLOSE_WAIT            -  3"), "{line}");
    }

    #[test]
    fn colour_wraps_states_without_moving_columns() {
        let mut style = text(TimeFormat::None);
        let plain = render(style, &row());
        style.color = true;
        let coloured = render(style, &row());
        assert!(coloured.contains("\x1b[32mESTABLISHED\x1b[0m -> \x1b[33mCLOSE_WAIT\x1b[0m"));
        let strip = |s: &str| {
            let mut out = String::new();
            let mut in_sgr = false;
            for c in s.chars() {
                match (in_sgr, c) {
                    (false, '\x1b') => in_sgr = true,
                    (true, 'm') => in_sgr = false,
                    (false, c) => out.push(c),
                    _ => {}
                }
            }
            out
        };
        assert_eq!(strip(&coloured), plain);
    }

    #[test]
    fn relative_time_counts_from_the_start() {
        let s = render(text(TimeFormat::Relative), &row());
        assert!(s.lines().nth(1).unwrap().starts_with("  1.234567  "));
    }
}

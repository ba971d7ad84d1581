//! Output: one row per transition, as aligned text ([`text`]) or as JSON
//! Lines ([`json`]), and the metrics endpoint's counters ([`metrics`]).
//!
//! The [`Printer`] holds what both row formats share: the style, the clock
//! with the time prefix cached per second, and scratch space. It runs for
//! every event shown, so rows are written straight into the output buffer
//! by the helpers in `bytes`: no allocation per row, and the date part of
//! timestamps is only formatted when the second changes.

mod bytes;
pub mod json;
pub mod metrics;
mod text;

use std::fmt::Write as _;
use std::io::{self, Write};

use chrono::{DateTime, Local, TimeZone, Utc};

use crate::cgroup;
use crate::model::{Clock, Row};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TimeFormat {
    /// Wall-clock time in the local time zone.
    Local,
    /// Wall-clock time in UTC.
    Utc,
    /// Seconds since tracing started.
    Relative,
    /// No time column.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns with a header line.
    Text,
    /// One JSON object per line (fields in docs/json.md).
    Json,
}

/// How rows are written.
#[derive(Clone, Copy, Debug)]
pub struct Style {
    pub format: OutputFormat,
    pub time: TimeFormat,
    pub show_skaddr: bool,
    /// Text: a NETNS column.
    pub wide: bool,
    /// Text: states coloured by meaning (a terminal only).
    pub color: bool,
}

/// `--color`: when to colour text output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// On a terminal, unless NO_COLOR is set or TERM is dumb.
    Auto,
    Always,
    Never,
}

impl ColorChoice {
    /// Colour for output on `fd`: never into files or pipes under `auto`.
    pub fn enabled(self, fd: i32) -> bool {
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                // SAFETY: isatty only inspects the descriptor.
                let tty = unsafe { libc::isatty(fd) } == 1;
                tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && std::env::var_os("TERM").is_none_or(|t| t != "dumb")
            }
        }
    }
}

pub struct Printer {
    style: Style,
    clock: Clock,
    /// The wall-clock second the cached prefix is for.
    cached_sec: i64,
    cached_prefix: String,
    /// `Z`, or the local offset (`+01:00`) of that second.
    cached_zone: String,
    scratch: String,
    /// A JSON row being built.
    line: Vec<u8>,
    names: cgroup::ContainerNames,
}

impl Printer {
    pub fn new(style: Style, clock: Clock) -> Printer {
        Printer {
            style,
            clock,
            cached_sec: i64::MIN,
            cached_prefix: String::new(),
            cached_zone: String::new(),
            line: Vec::with_capacity(512),
            scratch: String::with_capacity(64),
            names: cgroup::ContainerNames::default(),
        }
    }

    /// Another recording's clock (reading several runs at once).
    pub fn set_clock(&mut self, clock: Clock) {
        if clock != self.clock {
            self.clock = clock;
            self.cached_sec = i64::MIN;
        }
    }

    /// The text header line; JSON rows need none.
    pub fn header(&self, out: &mut impl Write) -> io::Result<()> {
        match self.style.format {
            OutputFormat::Text => self.text_header(out),
            OutputFormat::Json => Ok(()),
        }
    }

    pub fn row(&mut self, out: &mut impl Write, row: &Row) -> io::Result<()> {
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        self.row_into(&mut line, row);
        let written = out.write_all(&line);
        self.line = line;
        written
    }

    /// Appends the row to `out`, built in place: live output and recordings
    /// buffer in a Vec, and a copy of each row into it cost as much as a
    /// field.
    pub fn row_into(&mut self, out: &mut Vec<u8>, row: &Row) {
        match self.style.format {
            OutputFormat::Text => self.text(out, row),
            OutputFormat::Json => self.json(out, row),
        }
    }

    fn relative_us(&self, ts_ns: u64) -> i64 {
        (ts_ns as i64 - self.clock.start_ns as i64) / 1000
    }

    fn split_wall(&self, ts_ns: u64) -> (i64, u32) {
        let wall = self.clock.wall_ns(ts_ns);
        (
            wall.div_euclid(1_000_000_000),
            (wall.rem_euclid(1_000_000_000) / 1000) as u32,
        )
    }

    fn refresh_prefix(&mut self, sec: i64, fmt: &'static str) {
        // The cache key includes the format so text and JSON never mix.
        let key = sec ^ (fmt.len() as i64) << 56;
        if key == self.cached_sec {
            return;
        }
        self.cached_sec = key;
        self.cached_prefix.clear();
        self.cached_zone.clear();
        let _ = match self.style.time {
            TimeFormat::Utc => DateTime::<Utc>::from_timestamp(sec, 0).map(|d| {
                self.cached_zone.push('Z');
                write!(self.cached_prefix, "{}", d.format(fmt))
            }),
            _ => Local.timestamp_opt(sec, 0).earliest().map(|d| {
                let _ = write!(self.cached_zone, "{}", d.format("%:z"));
                write!(self.cached_prefix, "{}", d.format(fmt))
            }),
        };
    }
}

/// Process names are chosen by the process: control characters (an escape
/// sequence could rewrite the terminal) and backslashes are escaped.
pub fn escape_comm(comm: &str, out: &mut String) {
    for c in comm.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Comm, Family, Origin, State, Task, Transition};

    /// The clock rows are rendered with in tests.
    const CLOCK: Clock = Clock {
        // 2026-11-22T10:00:00Z at monotonic 1000 s.
        offset_ns: 1_795_341_600_000_000_000 - 1_000_000_000_000,
        start_ns: 1_000_000_000_000,
    };

    /// An IPv6 row whose owner's name holds an escape sequence.
    pub(super) fn row() -> Row {
        Row {
            t: Transition {
                ts_ns: 1_000_000_000_000 + 1_234_567_891,
                skaddr: 0xffff_8880_dead_beef,
                task: Task::new(1, b"swapper/0"),
                thread: Comm::default(),
                old: State::ESTABLISHED,
                new: State::CLOSE_WAIT,
                family: Family::V6,
                local: "[::1]:6389".parse().unwrap(),
                remote: "[::1]:53525".parse().unwrap(),
                netns: 4026531840,
            },
            sock: 3,
            owner: Some(Task::new(4242, b"evil\x1b[2Jname")),
            dwell_ns: Some(12_345_678),
            close: None,
            origin: Origin::Tracepoint,
            queued: false,
            timing: crate::model::Timing::Exact,
        }
    }

    /// The header and the row, as one style writes them.
    pub(super) fn render(style: Style, row: &Row) -> String {
        let mut p = Printer::new(style, CLOCK);
        let mut out = Vec::new();
        p.header(&mut out).unwrap();
        p.row(&mut out, row).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn escape_comm_keeps_printable_text() {
        let mut s = String::new();
        escape_comm("café\\\u{7f}\u{9b}x", &mut s);
        assert_eq!(s, "café\\\\\\x7f\\x9bx");
    }
}

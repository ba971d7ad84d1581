//! Format: one row per transition, as aligned text or as JSON Lines.
//!
//! This runs for every event shown, so it writes straight into the output
//! buffer: no allocation per row, and the date part of timestamps is only
//! formatted when the second changes.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::IpAddr;

use chrono::{DateTime, Local, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::attribute::{Origin, Row};
use crate::state::{Phase, State};

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
    /// One JSON object per line (fields in the README).
    Json,
}

/// Turns the kernel's CLOCK_MONOTONIC timestamps into wall-clock time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, in nanoseconds.
    pub offset_ns: i64,
    /// Monotonic time tracing started at: zero of `--time relative`.
    pub start_ns: u64,
}

impl Clock {
    /// Samples both clocks now.
    pub fn now() -> Clock {
        let mono1 = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        let mono2 = clock_ns(libc::CLOCK_MONOTONIC);
        let mono = mono1 + (mono2 - mono1) / 2;
        Clock {
            offset_ns: (real - mono) as i64,
            start_ns: mono as u64,
        }
    }

    pub fn wall_ns(&self, mono_ns: u64) -> i64 {
        mono_ns as i64 + self.offset_ns
    }
}

/// CLOCK_MONOTONIC now, the clock of the kernel's timestamps.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and pointer; cannot fail for these clocks.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
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

/// Width of an address column: fits `255.255.255.255:65535`.
const ADDR_WIDTH: usize = 21;
const COMM_WIDTH: usize = 15;

pub struct Printer {
    style: Style,
    clock: Clock,
    /// The wall-clock second the cached prefix is for.
    cached_sec: i64,
    cached_prefix: String,
    /// `Z`, or the local offset (`+01:00`) of that second.
    cached_zone: String,
    scratch: String,
}

impl Printer {
    pub fn new(style: Style, clock: Clock) -> Printer {
        Printer {
            style,
            clock,
            cached_sec: i64::MIN,
            cached_prefix: String::new(),
            cached_zone: String::new(),
            scratch: String::with_capacity(64),
        }
    }

    /// Another recording's clock (reading several runs at once).
    pub fn set_clock(&mut self, clock: Clock) {
        if clock != self.clock {
            self.clock = clock;
            self.cached_sec = i64::MIN;
        }
    }

    pub fn header(&self, out: &mut impl Write) -> io::Result<()> {
        if self.style.format == OutputFormat::Json {
            return Ok(());
        }
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
            out.write_all(b"       NETNS")?;
        }
        if self.style.show_skaddr {
            out.write_all(b"  SKADDR")?;
        }
        out.write_all(b"\n")
    }

    pub fn row(&mut self, out: &mut impl Write, row: &Row) -> io::Result<()> {
        match self.style.format {
            OutputFormat::Text => self.text(out, row),
            OutputFormat::Json => self.json(out, row),
        }
    }

    fn text(&mut self, out: &mut impl Write, row: &Row) -> io::Result<()> {
        let t = &row.t;
        if self.style.time != TimeFormat::None {
            self.time_text(t.ts_ns);
            out.write_all(self.scratch.as_bytes())?;
            out.write_all(b"  ")?;
        }
        match &row.owner {
            Some(o) => {
                self.scratch.clear();
                escape_comm(&o.comm.as_str(), &mut self.scratch);
                write!(out, "{:>7}  {:<COMM_WIDTH$}  ", o.pid, self.scratch)?
            }
            None => write!(out, "{:>7}  {:<COMM_WIDTH$}  ", "-", "-")?,
        }
        write!(out, "{:<ADDR_WIDTH$}  {:<ADDR_WIDTH$}  ", t.local, t.remote)?;
        if row.origin == Origin::Snapshot {
            // Existing socket: no transition, just its state.
            if self.style.color {
                let new = t.new.to_string();
                let pad = " ".repeat(11usize.saturating_sub(new.len()));
                write!(
                    out,
                    "{:>11} -> {}{new}{SGR_RESET}{pad}  ",
                    "-",
                    sgr(t.new.phase())
                )?;
            } else {
                write!(out, "{:>11} -> {:<11}  ", "-", t.new)?;
            }
        } else if self.style.color {
            // Padding outside the colour codes, so columns stay aligned.
            let (old, new) = (t.old.to_string(), t.new.to_string());
            let pad = |s: &str, w: usize| " ".repeat(w.saturating_sub(s.len()));
            write!(
                out,
                "{}{}{old}{SGR_RESET} -> {}{new}{SGR_RESET}{}  ",
                pad(&old, 11),
                sgr(t.old.phase()),
                sgr(t.new.phase()),
                pad(&new, 11)
            )?;
        } else {
            write!(out, "{:>11} -> {:<11}  ", t.old, t.new)?;
        }
        match row.dwell_ns {
            Some(ns) => {
                let us = ns / 1000;
                self.scratch.clear();
                let _ = write!(self.scratch, "{}.{:03}", us / 1000, us % 1000);
                write!(out, "{:>10}", self.scratch)?
            }
            None => write!(out, "{:>10}", "-")?,
        }
        write!(out, "  {}", row.sock)?;
        if self.style.wide {
            match t.netns {
                0 => write!(out, "  {:>10}", "-")?,
                n => write!(out, "  {n:>10}")?,
            }
        }
        if self.style.show_skaddr {
            write!(out, "  {:#x}", t.skaddr)?;
        }
        match row.origin {
            Origin::Tracepoint => {}
            Origin::Snapshot => out.write_all(b"  snapshot")?,
            Origin::TimeWait => out.write_all(b"  time-wait table")?,
        }
        if let Some(c) = row.close {
            let (on, off) = if self.style.color {
                (SGR_ALERT, SGR_RESET)
            } else {
                ("", "")
            };
            match c.reset_reason() {
                Some(reason) => write!(out, "  {on}{} ({reason}){off}", c.name())?,
                None => write!(out, "  {on}{}{off}", c.name())?,
            }
        }
        out.write_all(b"\n")
    }

    fn json(&mut self, out: &mut impl Write, row: &Row) -> io::Result<()> {
        let t = &row.t;
        let time = match self.style.time {
            TimeFormat::Local | TimeFormat::Utc => {
                self.time_rfc3339(t.ts_ns);
                Some(JsonTime::Wall(Cow::Borrowed(&self.scratch)))
            }
            TimeFormat::Relative => Some(JsonTime::Seconds(self.relative_us(t.ts_ns) as f64 / 1e6)),
            TimeFormat::None => None,
        };
        let comm = row.owner.map(|o| o.comm);
        let j = JsonRow {
            time,
            ts_ns: t.ts_ns,
            sock: row.sock,
            pid: row.owner.map(|o| o.pid),
            comm: comm.as_ref().map(|c| c.as_str()),
            family: Cow::Borrowed(t.family.name()),
            netns: (t.netns != 0).then_some(t.netns),
            laddr: t.local.ip(),
            lport: t.local.port(),
            raddr: t.remote.ip(),
            rport: t.remote.port(),
            old: (row.origin != Origin::Snapshot).then_some(t.old),
            new: t.new,
            ms: row.dwell_ns.map(|ns| (ns / 1000) as f64 / 1000.0),
            close: row.close.map(|c| Cow::Borrowed(c.name())),
            reset_reason: row.close.and_then(|c| c.reset_reason()).map(Cow::Borrowed),
            origin: Cow::Borrowed(row.origin.name()),
            skaddr: self.style.show_skaddr.then_some(Hex(t.skaddr)),
        };
        serde_json::to_writer(&mut *out, &j)?;
        out.write_all(b"\n")
    }

    fn relative_us(&self, ts_ns: u64) -> i64 {
        (ts_ns as i64 - self.clock.start_ns as i64) / 1000
    }

    /// Text time column into `scratch`.
    fn time_text(&mut self, ts_ns: u64) {
        self.scratch.clear();
        if self.style.time == TimeFormat::Relative {
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
            return;
        }
        let (sec, us) = self.split_wall(ts_ns);
        self.refresh_prefix(sec, "%H:%M:%S");
        let _ = write!(self.scratch, "{}.{us:06}", self.cached_prefix);
        if self.style.time == TimeFormat::Utc {
            self.scratch.push_str(&self.cached_zone);
        }
    }

    /// RFC 3339 time into `scratch`.
    fn time_rfc3339(&mut self, ts_ns: u64) {
        let (sec, us) = self.split_wall(ts_ns);
        self.refresh_prefix(sec, "%Y-%m-%dT%H:%M:%S");
        self.scratch.clear();
        let _ = write!(self.scratch, "{}.{us:06}", self.cached_prefix);
        self.scratch.push_str(&self.cached_zone);
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

/// The JSON object of one transition; the README documents every field.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct JsonRow<'a> {
    #[serde(skip_serializing_if = "Option::is_none", default, borrow)]
    pub time: Option<JsonTime<'a>>,
    pub ts_ns: u64,
    pub sock: u64,
    pub pid: Option<u32>,
    #[serde(borrow)]
    pub comm: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub family: Cow<'a, str>,
    /// Inode of the socket's network namespace; null when not known.
    #[serde(default)]
    pub netns: Option<u32>,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    /// Null for a snapshot row: the socket existed, its last transition was
    /// not seen.
    pub old: Option<State>,
    pub new: State,
    pub ms: Option<f64>,
    /// "reset sent", "reset received", "refused", or null.
    #[serde(default, borrow)]
    pub close: Option<Cow<'a, str>>,
    /// The kernel's reason for a reset it sent (`TCP_ABORT_ON_LINGER`, ...).
    #[serde(default, borrow)]
    pub reset_reason: Option<Cow<'a, str>>,
    /// "tracepoint", "snapshot" or "timewait".
    #[serde(default = "tracepoint", borrow)]
    pub origin: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub skaddr: Option<Hex>,
}

fn tracepoint() -> Cow<'static, str> {
    Cow::Borrowed("tracepoint")
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum JsonTime<'a> {
    Wall(#[serde(borrow)] Cow<'a, str>),
    Seconds(f64),
}

/// A kernel address, shown only with `--show-skaddr`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hex(pub u64);

impl Serialize for Hex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:#x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Hex, D::Error> {
        let s = <Cow<'de, str>>::deserialize(d)?;
        u64::from_str_radix(s.trim_start_matches("0x"), 16)
            .map(Hex)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for State {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.name() {
            "" => s.collect_str(self),
            name => s.serialize_str(name),
        }
    }
}

impl<'de> Deserialize<'de> for State {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<State, D::Error> {
        let s = <Cow<'de, str>>::deserialize(d)?;
        State::from_name(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown TCP state {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Comm, Family, Task, Transition};

    const CLOCK: Clock = Clock {
        // 2026-11-22T10:00:00Z at monotonic 1000 s.
        offset_ns: 1_795_341_600_000_000_000 - 1_000_000_000_000,
        start_ns: 1_000_000_000_000,
    };

    fn row() -> Row {
        Row {
            t: Transition {
                ts_ns: 1_000_000_000_000 + 1_234_567_891,
                skaddr: 0xffff_8880_dead_beef,
                task: Task {
                    pid: 1,
                    comm: Comm::from_bytes(b"swapper/0"),
                },
                old: State::ESTABLISHED,
                new: State::CLOSE_WAIT,
                family: Family::V6,
                local: "[::1]:6389".parse().unwrap(),
                remote: "[::1]:53525".parse().unwrap(),
                netns: 4026531840,
            },
            sock: 3,
            owner: Some(Task {
                pid: 4242,
                comm: Comm::from_bytes(b"evil\x1b[2Jname"),
            }),
            dwell_ns: Some(12_345_678),
            close: None,
            origin: Origin::Tracepoint,
        }
    }

    fn render(style: Style, row: &Row) -> String {
        let mut p = Printer::new(style, CLOCK);
        let mut out = Vec::new();
        p.header(&mut out).unwrap();
        p.row(&mut out, row).unwrap();
        String::from_utf8(out).unwrap()
    }

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

    #[test]
    fn json_row_has_every_field_typed() {
        let style = Style {
            format: OutputFormat::Json,
            time: TimeFormat::Utc,
            show_skaddr: true,
            wide: false,
            color: false,
        };
        let s = render(style, &row());
        let v: serde_json::Value = serde_json::from_str(s.trim()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "time": "2026-11-22T10:00:01.234567Z",
                "ts_ns": 1_001_234_567_891u64,
                "sock": 3,
                "pid": 4242,
                "comm": "evil\u{1b}[2Jname",
                "family": "ipv6",
                "netns": 4026531840u32,
                "laddr": "::1",
                "lport": 6389,
                "raddr": "::1",
                "rport": 53525,
                "old": "ESTABLISHED",
                "new": "CLOSE_WAIT",
                "ms": 12.345,
                "close": null,
                "reset_reason": null,
                "origin": "tracepoint",
                "skaddr": "0xffff8880deadbeef",
            })
        );
        // The raw escape byte never reaches the output.
        assert!(!s.contains('\u{1b}'));
        let back: JsonRow = serde_json::from_str(s.trim()).unwrap();
        assert_eq!(back.old, Some(State::ESTABLISHED));
    }

    #[test]
    fn escape_comm_keeps_printable_text() {
        let mut s = String::new();
        escape_comm("café\\\u{7f}\u{9b}x", &mut s);
        assert_eq!(s, "café\\\\\\x7f\\x9bx");
    }
}

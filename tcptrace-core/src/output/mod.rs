//! Format: one row per transition, as aligned text or as JSON Lines.
//!
//! This runs for every event shown, so it writes straight into the output
//! buffer: no allocation per row, and the date part of timestamps is only
//! formatted when the second changes.

pub mod metrics;

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::IpAddr;
use std::ptr;

use chrono::{DateTime, Local, TimeZone, Utc};

use crate::cgroup;
use crate::model::{Clock, Origin, Phase, Row, State};

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
            out.write_all(b"       NETNS  UNIT")?;
        }
        if self.style.show_skaddr {
            out.write_all(b"  SKADDR")?;
        }
        out.write_all(b"\n")
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

    /// Columns padded by hand: `Formatter::pad` costs more than the rest of
    /// the row, and this runs for every row shown or replayed.
    fn text(&mut self, b: &mut Vec<u8>, row: &Row) {
        let t = &row.t;
        if self.style.time != TimeFormat::None {
            self.time_text(b, t.ts_ns);
            put(b, b"  ");
        }
        match &row.owner {
            Some(o) => {
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
            None => {
                pad_left(b, b"-", 7);
                put(b, b"  ");
                pad_right_chars(b, "-", COMM_WIDTH);
            }
        }
        put(b, b"  ");
        for addr in [t.local, t.remote] {
            let start = b.len();
            push_addr(b, &addr);
            let used = b.len() - start;
            pad(b, ADDR_WIDTH.saturating_sub(used));
            put(b, b"  ");
        }
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
        if self.style.color {
            // Padding outside the colour codes, so columns stay aligned.
            pad_left(b, b"", 11usize.saturating_sub(old_name.len()));
            match old {
                Some(o) => {
                    let _ = write!(b, "{}{old_name}{SGR_RESET}", sgr(o.phase()));
                }
                None => put(b, old_name.as_bytes()),
            }
            let _ = write!(b, " -> {}{new_name}{SGR_RESET}", sgr(t.new.phase()));
            pad_left(b, b"", 11usize.saturating_sub(new_name.len()));
        } else {
            pad_left(b, old_name.as_bytes(), 11);
            put(b, b" -> ");
            pad_right_chars(b, &new_name, 11);
        }
        put(b, b"  ");
        match row.dwell_ns {
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
        put(b, b"  ");
        push_u64(b, row.sock);
        if self.style.wide {
            put(b, b"  ");
            match t.netns {
                0 => pad_left(b, b"-", 10),
                n => pad_left(b, itoa::Buffer::new().format(n).as_bytes(), 10),
            }
            put(b, b"  ");
            let cgroup = row.owner.and_then(|o| o.cgroup);
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
        // 0: no address known (a snapshot row, a recording made without it).
        if self.style.show_skaddr {
            match t.skaddr {
                0 => put(b, b"  -"),
                a => {
                    let _ = write!(b, "  {a:#x}");
                }
            }
        }
        match row.origin {
            Origin::Tracepoint => {}
            Origin::Snapshot => put(b, b"  snapshot"),
            Origin::TimeWait => put(b, b"  time-wait table"),
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
        b.push(b'\n');
    }

    /// Written by hand, not through serde: this runs for every row of a
    /// recording, and the field names and most values are known ASCII.
    fn json(&mut self, b: &mut Vec<u8>, row: &Row) {
        let t = &row.t;
        b.push(b'{');
        match self.style.time {
            TimeFormat::Local | TimeFormat::Utc => {
                put(b, b"\"time\":\"");
                self.time_rfc3339(b, t.ts_ns);
                put(b, b"\",");
            }
            TimeFormat::Relative => {
                let us = self.relative_us(t.ts_ns);
                put(b, b"\"time\":");
                if us < 0 {
                    b.push(b'-');
                }
                let us = us.unsigned_abs();
                push_u64(b, us / 1_000_000);
                b.push(b'.');
                push_frac(b, us % 1_000_000, 6);
                b.push(b',');
            }
            TimeFormat::None => {}
        }
        put(b, b"\"ts_ns\":");
        push_u64(b, t.ts_ns);
        put(b, b",\"sock\":");
        push_u64(b, row.sock);
        match &row.owner {
            Some(o) => {
                put(b, b",\"pid\":");
                push_u64(b, u64::from(o.pid));
                put(b, b",\"comm\":");
                push_json_string(b, &o.comm.as_str());
                let thread = t.thread.as_bytes();
                if !thread.is_empty() && thread != o.comm.as_bytes() {
                    put(b, b",\"thread\":");
                    push_json_string(b, &t.thread.as_str());
                }
                if let Some(path) = o.cgroup {
                    put(b, b",\"cgroup\":");
                    push_json_string(b, path);
                    if let Some(unit) = cgroup::unit(path) {
                        put(b, b",\"unit\":");
                        push_json_string(b, unit);
                    }
                    if let Some(id) = cgroup::container(path) {
                        put(b, b",\"container\":");
                        push_json_string(b, id);
                        if let Some(name) = self.names.of(path) {
                            put(b, b",\"container_name\":");
                            push_json_string(b, name);
                        }
                    }
                }
            }
            None => put(b, b",\"pid\":null,\"comm\":null"),
        }
        if row.queued {
            put(b, b",\"queued\":true");
        }
        push_field_str(b, "family", t.family.name());
        put(b, b",\"netns\":");
        match t.netns {
            0 => put(b, b"null"),
            n => push_u64(b, u64::from(n)),
        }
        put(b, b",\"laddr\":\"");
        push_ip(b, &t.local.ip());
        put(b, b"\",\"lport\":");
        push_u64(b, u64::from(t.local.port()));
        put(b, b",\"raddr\":\"");
        push_ip(b, &t.remote.ip());
        put(b, b"\",\"rport\":");
        push_u64(b, u64::from(t.remote.port()));
        if row.origin == Origin::Snapshot {
            put(b, b",\"old\":null");
        } else {
            push_field_state(b, "old", t.old);
        }
        push_field_state(b, "new", t.new);
        put(b, b",\"ms\":");
        match row.dwell_ns {
            Some(ns) => {
                let us = ns / 1000;
                push_u64(b, us / 1000);
                b.push(b'.');
                push_frac(b, us % 1000, 3);
            }
            None => put(b, b"null"),
        }
        match row.close {
            Some(c) => push_field_str(b, "close", c.name()),
            None => put(b, b",\"close\":null"),
        }
        match row.close.and_then(|c| c.reset_reason()) {
            Some(r) => {
                put(b, b",\"reset_reason\":");
                push_json_string(b, r);
            }
            None => put(b, b",\"reset_reason\":null"),
        }
        push_field_str(b, "origin", row.origin.name());
        if self.style.show_skaddr {
            match t.skaddr {
                0 => put(b, b",\"skaddr\":null"),
                a => {
                    let _ = write!(b, ",\"skaddr\":\"{a:#x}\"");
                }
            }
        }
        put(b, b"}\n");
    }

    fn relative_us(&self, ts_ns: u64) -> i64 {
        (ts_ns as i64 - self.clock.start_ns as i64) / 1000
    }

    /// The text time column.
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

    /// The time in RFC 3339.
    fn time_rfc3339(&mut self, b: &mut Vec<u8>, ts_ns: u64) {
        let (sec, us) = self.split_wall(ts_ns);
        self.refresh_prefix(sec, "%Y-%m-%dT%H:%M:%S");
        put(b, self.cached_prefix.as_bytes());
        push_micros(b, us);
        put(b, self.cached_zone.as_bytes());
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

/// Appends `s` to `b`. A row is some twenty pieces a few bytes long, and
/// `extend_from_slice` calls memcpy for any length it cannot see at compile
/// time: those calls cost more than the copying, a sixth of a printing run's
/// CPU. Up to 32 bytes this copies with two overlapping moves of a fixed
/// size instead, which compile to a few instructions.
#[inline(always)]
fn put(b: &mut Vec<u8>, s: &[u8]) {
    let n = s.len();
    if n > 32 {
        b.extend_from_slice(s);
        return;
    }
    b.reserve(32);
    let len = b.len();
    // SAFETY: `reserve` left room for 32 bytes from `len`. Every copy reads
    // within `s` (each pair covers `0..n` from both ends, so never past
    // `n`) and writes within `len..len + n`, exactly the bytes `set_len`
    // then counts as initialised.
    unsafe {
        let (src, dst) = (s.as_ptr(), b.as_mut_ptr().add(len));
        if n >= 16 {
            ptr::copy_nonoverlapping(src, dst, 16);
            ptr::copy_nonoverlapping(src.add(n - 16), dst.add(n - 16), 16);
        } else if n >= 8 {
            ptr::copy_nonoverlapping(src, dst, 8);
            ptr::copy_nonoverlapping(src.add(n - 8), dst.add(n - 8), 8);
        } else if n >= 4 {
            ptr::copy_nonoverlapping(src, dst, 4);
            ptr::copy_nonoverlapping(src.add(n - 4), dst.add(n - 4), 4);
        } else if n > 0 {
            *dst = *src;
            *dst.add(n / 2) = *src.add(n / 2);
            *dst.add(n - 1) = *src.add(n - 1);
        }
        b.set_len(len + n);
    }
}

/// Appends `n` spaces (see [`put`]: `resize` calls memset).
#[inline(always)]
fn pad(b: &mut Vec<u8>, mut n: usize) {
    const SPACES: [u8; 32] = [b' '; 32];
    while n > SPACES.len() {
        put(b, &SPACES);
        n -= SPACES.len();
    }
    put(b, &SPACES[..n]);
}

/// True if `bytes` print as they are in text and in a JSON string: printable
/// ASCII without quote or backslash. Nearly every command name is.
fn is_plain(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|&c| (b' '..=b'~').contains(&c) && c != b'\\' && c != b'"')
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

/// `.` and six digits of microseconds.
fn push_micros(b: &mut Vec<u8>, us: u32) {
    let mut digits = [b'.', b'0', b'0', b'0', b'0', b'0', b'0'];
    let mut n = us;
    for d in digits[1..].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    put(b, &digits);
}

/// An address as `Display` shows it; IPv4 without the formatting machinery.
fn push_ip(b: &mut Vec<u8>, ip: &IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let (text, len) = ipv4_text(v4);
            put(b, &text[..len]);
        }
        IpAddr::V6(v6) => {
            let _ = write!(b, "{v6}");
        }
    }
}

/// `ADDR:PORT`, IPv6 in brackets, as `SocketAddr`'s `Display`.
fn push_addr(b: &mut Vec<u8>, addr: &std::net::SocketAddr) {
    let mut digits = itoa::Buffer::new();
    let port = digits.format(addr.port());
    match addr.ip() {
        IpAddr::V4(v4) => {
            // The octets are built apart and copied in at once: a copy per
            // octet cost more than the digits.
            let (mut text, len) = ipv4_text(&v4);
            text[len] = b':';
            put(b, &text[..=len]);
            put(b, port.as_bytes());
        }
        IpAddr::V6(v6) => {
            let _ = write!(b, "[{v6}]:");
            put(b, port.as_bytes());
        }
    }
}

/// Each byte's decimal digits (left-aligned) and their count.
const OCTETS: [([u8; 3], u8); 256] = {
    let mut t = [([0u8; 3], 0u8); 256];
    let mut n = 0;
    while n < 256 {
        let (h, d, u) = ((n / 100) as u8, (n / 10 % 10) as u8, (n % 10) as u8);
        t[n] = match n {
            0..=9 => ([b'0' + u, 0, 0], 1),
            10..=99 => ([b'0' + d, b'0' + u, 0], 2),
            _ => ([b'0' + h, b'0' + d, b'0' + u], 3),
        };
        n += 1;
    }
    t
};

/// Dotted quad, room left for `:` and a port: (bytes, length). Each octet
/// is a fixed three-byte copy, advanced by its length.
fn ipv4_text(ip: &std::net::Ipv4Addr) -> ([u8; 24], usize) {
    let mut text = [0u8; 24];
    let mut len = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        let (digits, n) = OCTETS[usize::from(octet)];
        text[len..len + 3].copy_from_slice(&digits);
        len += usize::from(n);
    }
    (text, len)
}

/// Digits by `itoa`, which does two at a time from a table: a row has up
/// to seven numbers, the timestamp fourteen digits long.
fn push_u64(b: &mut Vec<u8>, n: u64) {
    put(b, itoa::Buffer::new().format(n).as_bytes());
}

/// `n` as exactly `width` digits (the fraction after a decimal point).
fn push_frac(b: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [b'0'; 9];
    for d in digits[..width].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    put(b, &digits[..width]);
}

/// `,"name":"value"` for values known to need no escaping. Inlined, so
/// that each name is a constant copy.
#[inline(always)]
fn push_field_str(b: &mut Vec<u8>, name: &str, value: &str) {
    put(b, b",\"");
    put(b, name.as_bytes());
    put(b, b"\":\"");
    put(b, value.as_bytes());
    b.push(b'"');
}

#[inline(always)]
fn push_field_state(b: &mut Vec<u8>, name: &str, state: State) {
    match state.name() {
        "" => push_field_str(b, name, &state.to_string()),
        known => push_field_str(b, name, known),
    }
}

/// A JSON string: quotes, backslashes and every control character escaped.
fn push_json_string(b: &mut Vec<u8>, s: &str) {
    if is_plain(s.as_bytes()) {
        put(b, b"\"");
        put(b, s.as_bytes());
        put(b, b"\"");
        return;
    }
    b.push(b'"');
    for c in s.chars() {
        match c {
            '"' => put(b, b"\\\""),
            '\\' => put(b, b"\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(b, "\\u{:04x}", c as u32);
            }
            c => {
                let mut utf8 = [0u8; 4];
                put(b, c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    b.push(b'"');
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
    use crate::model::*;
    use crate::model::{Comm, Family, Task, Transition};
    use crate::recording::json::JsonRow;

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
        }
    }

    #[test]
    fn addresses_and_numbers_print_as_display_does() {
        for octet in 0..=255u8 {
            for port in [0u16, 9, 10, 99, 100, 6389, 65535] {
                let addr = std::net::SocketAddr::from(([octet, 0, 255 - octet, 10], port));
                let mut b = Vec::new();
                push_addr(&mut b, &addr);
                assert_eq!(String::from_utf8(b).unwrap(), addr.to_string());
                let mut b = Vec::new();
                push_ip(&mut b, &addr.ip());
                assert_eq!(String::from_utf8(b).unwrap(), addr.ip().to_string());
            }
        }
        let v6: std::net::SocketAddr = "[fe80::1:2]:443".parse().unwrap();
        let mut b = Vec::new();
        push_addr(&mut b, &v6);
        assert_eq!(String::from_utf8(b).unwrap(), v6.to_string());
        for n in [0u64, 7, 10, 99, 100, 12_345, u64::MAX] {
            let mut b = Vec::new();
            push_u64(&mut b, n);
            assert_eq!(String::from_utf8(b).unwrap(), n.to_string());
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

    /// Every length `put` copies in its own way, and past them, after a
    /// prefix that leaves the vector's end anywhere in a block.
    #[test]
    fn put_and_pad_append_exactly_what_they_are_given() {
        let source: Vec<u8> = (1..=80).collect();
        for before in 0..3 {
            for n in 0..=source.len() {
                let mut b = vec![b'x'; before];
                put(&mut b, &source[..n]);
                pad(&mut b, n);
                let mut want = vec![b'x'; before];
                want.extend_from_slice(&source[..n]);
                want.resize(before + 2 * n, b' ');
                assert_eq!(b, want, "{before} before, {n} bytes");
            }
        }
    }

    #[test]
    fn comm_with_quotes_or_backslashes_takes_the_escaping_path() {
        assert!(is_plain(b"tt-churn 2"));
        for odd in [&b"a\\b"[..], b"a\"b", b"a\x7fb", b"a\x1bb", b"\xc3\xa9"] {
            assert!(!is_plain(odd), "{odd:?}");
        }
        let mut b = Vec::new();
        push_json_string(&mut b, "say \"hi\"\\");
        assert_eq!(b, br#""say \"hi\"\\""#);
    }

    #[test]
    fn escape_comm_keeps_printable_text() {
        let mut s = String::new();
        escape_comm("café\\\u{7f}\u{9b}x", &mut s);
        assert_eq!(s, "café\\\\\\x7f\\x9bx");
    }
}

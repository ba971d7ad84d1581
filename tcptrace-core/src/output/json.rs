//! JSON Lines rows: one object per transition, and [`Key`], the one list of
//! the keys a row has.
//!
//! Three pieces of code know the keys: this writer, serde's
//! [`JsonRow`](crate::recording::json::JsonRow) and the reader's fast path
//! (`recording::read`). They all take them from [`Key`], so that a key
//! renamed or added there reaches every one: the fast reader matches `Key`
//! exhaustively, and tests hold serde's fields and the written order to it.
//! It lives here, below the recording stage, because recordings write their
//! rows with this writer.
//!
//! Rows are written by hand, not through serde: this runs for every row of
//! a recording, and the keys and most values are known ASCII.

use std::io::Write as _;

use super::bytes::{is_plain, push_frac, push_ip, push_micros, push_u64, put};
use super::{Printer, TimeFormat};
use crate::cgroup;
use crate::model::{Origin, Row, State, Timing, Transition};

/// Declares [`Key`] from `Variant = "name"` pairs, with each key's pieces
/// of JSON made at compile time: the writer copies `,"name":` in one go.
macro_rules! keys {
    ($( $(#[$doc:meta])* $key:ident = $name:literal, )*) => {
        /// A key of a JSON row (docs/json.md), in the order rows write them.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Key {
            $( $(#[$doc])* $key, )*
        }

        impl Key {
            /// Every key, in the order rows write them.
            pub const ALL: &[Key] = &[$(Key::$key),*];

            pub const fn name(self) -> &'static str {
                match self {
                    $(Key::$key => $name,)*
                }
            }

            /// `,"name":`, a value to follow.
            #[inline(always)]
            pub const fn field(self) -> &'static [u8] {
                match self {
                    $(Key::$key => concat!(",\"", $name, "\":").as_bytes(),)*
                }
            }

            /// `,"name":"`, a string to follow.
            #[inline(always)]
            pub const fn quoted(self) -> &'static [u8] {
                match self {
                    $(Key::$key => concat!(",\"", $name, "\":\"").as_bytes(),)*
                }
            }

            /// `,"name":null`.
            #[inline(always)]
            pub const fn null(self) -> &'static [u8] {
                match self {
                    $(Key::$key => concat!(",\"", $name, "\":null").as_bytes(),)*
                }
            }

            /// The key spelled `bytes`. Compared as bytes: the reader looks
            /// up every key of every row, and a UTF-8 check each cost more
            /// than the lookup.
            #[inline]
            pub fn of(bytes: &[u8]) -> Option<Key> {
                // Constants, so that the match compiles as literals would:
                // by length, then by byte.
                #[allow(non_upper_case_globals)]
                mod spelled {
                    $(pub const $key: &[u8] = $name.as_bytes();)*
                }
                match bytes {
                    $(spelled::$key => Some(Key::$key),)*
                    _ => None,
                }
            }
        }
    };
}

keys! {
    /// Wall-clock time, or seconds since the start; absent for `--time
    /// none`. Not read back: derived again from `ts_ns` and the clock.
    Time = "time",
    /// CLOCK_MONOTONIC, nanoseconds.
    TsNs = "ts_ns",
    Sock = "sock",
    /// The owner's pid, or null.
    Pid = "pid",
    /// The owner's process name, or null.
    Comm = "comm",
    /// The calling thread's name, only where it is not the process's.
    Thread = "thread",
    /// The owner's cgroup v2 path, when known.
    Cgroup = "cgroup",
    /// Derived from the cgroup path.
    Unit = "unit",
    /// Derived from the cgroup path.
    Container = "container",
    /// From this host's container runtimes: not read back.
    ContainerName = "container_name",
    /// `true`, only on a connection still in its listener's queue.
    Queued = "queued",
    Family = "family",
    /// The network namespace's inode, or null.
    Netns = "netns",
    Laddr = "laddr",
    Lport = "lport",
    Raddr = "raddr",
    Rport = "rport",
    /// Null on a snapshot row.
    Old = "old",
    New = "new",
    /// Milliseconds in `old`, or null.
    Ms = "ms",
    Close = "close",
    ResetReason = "reset_reason",
    Origin = "origin",
    /// "timer" or "poll": how well a time-wait table row's time is known;
    /// absent when it is the kernel's own.
    Timing = "timing",
    /// Only with `--show-skaddr`.
    Skaddr = "skaddr",
}

impl Printer {
    /// One row, its keys in [`Key`]'s order.
    pub(super) fn json(&mut self, b: &mut Vec<u8>, row: &Row) {
        let t = &row.t;
        self.json_open(b, t.ts_ns);
        // The first key after `{` or the time: its comma is already there.
        put(b, &Key::TsNs.field()[1..]);
        push_u64(b, t.ts_ns);
        put(b, Key::Sock.field());
        push_u64(b, row.sock);
        self.json_owner(b, row);
        json_socket(b, t);
        json_states(b, row);
        json_close(b, row);
        if row.timing != Timing::Exact {
            push_field_str(b, Key::Timing, row.timing.name());
        }
        if self.style.show_skaddr {
            match t.skaddr {
                0 => put(b, Key::Skaddr.null()),
                a => {
                    put(b, Key::Skaddr.quoted());
                    let _ = write!(b, "{a:#x}\"");
                }
            }
        }
        put(b, b"}\n");
    }

    /// `{`, and the time with its comma unless there is none.
    fn json_open(&mut self, b: &mut Vec<u8>, ts_ns: u64) {
        b.push(b'{');
        match self.style.time {
            TimeFormat::Local | TimeFormat::Utc => {
                put(b, &Key::Time.quoted()[1..]);
                self.time_rfc3339(b, ts_ns);
                put(b, b"\",");
            }
            TimeFormat::Relative => {
                let us = self.relative_us(ts_ns);
                put(b, &Key::Time.field()[1..]);
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
    }

    /// The time in RFC 3339.
    fn time_rfc3339(&mut self, b: &mut Vec<u8>, ts_ns: u64) {
        let (sec, us) = self.split_wall(ts_ns);
        self.refresh_prefix(sec, "%Y-%m-%dT%H:%M:%S");
        put(b, self.cached_prefix.as_bytes());
        push_micros(b, us);
        put(b, self.cached_zone.as_bytes());
    }

    /// Who holds the socket: pid and comm (null when unknown), then the
    /// thread, cgroup and what it tells, when there are.
    fn json_owner(&mut self, b: &mut Vec<u8>, row: &Row) {
        match &row.owner {
            Some(o) => {
                put(b, Key::Pid.field());
                push_u64(b, u64::from(o.pid));
                put(b, Key::Comm.field());
                push_json_string(b, &o.comm.as_str());
                let thread = row.t.thread.as_bytes();
                if !thread.is_empty() && thread != o.comm.as_bytes() {
                    put(b, Key::Thread.field());
                    push_json_string(b, &row.t.thread.as_str());
                }
                if let Some(path) = o.cgroup {
                    self.json_cgroup(b, path);
                }
            }
            None => {
                put(b, Key::Pid.null());
                put(b, Key::Comm.null());
            }
        }
        if row.queued {
            put(b, Key::Queued.field());
            put(b, b"true");
        }
    }

    fn json_cgroup(&mut self, b: &mut Vec<u8>, path: &'static str) {
        put(b, Key::Cgroup.field());
        push_json_string(b, path);
        if let Some(unit) = cgroup::unit(path) {
            put(b, Key::Unit.field());
            push_json_string(b, unit);
        }
        if let Some(id) = cgroup::container(path) {
            put(b, Key::Container.field());
            push_json_string(b, id);
            if let Some(name) = self.names.of(path) {
                put(b, Key::ContainerName.field());
                push_json_string(b, name);
            }
        }
    }
}

/// Family, network namespace, addresses and ports.
fn json_socket(b: &mut Vec<u8>, t: &Transition) {
    push_field_str(b, Key::Family, t.family.name());
    put(b, Key::Netns.field());
    match t.netns {
        0 => put(b, b"null"),
        n => push_u64(b, u64::from(n)),
    }
    put(b, Key::Laddr.quoted());
    push_ip(b, &t.local.ip());
    b.push(b'"');
    put(b, Key::Lport.field());
    push_u64(b, u64::from(t.local.port()));
    put(b, Key::Raddr.quoted());
    push_ip(b, &t.remote.ip());
    b.push(b'"');
    put(b, Key::Rport.field());
    push_u64(b, u64::from(t.remote.port()));
}

/// The states left and entered, and the time spent in the one left.
fn json_states(b: &mut Vec<u8>, row: &Row) {
    if row.origin == Origin::Snapshot {
        put(b, Key::Old.null());
    } else {
        push_field_state(b, Key::Old, row.t.old);
    }
    push_field_state(b, Key::New, row.t.new);
    put(b, Key::Ms.field());
    match row.dwell_ns {
        Some(ns) => {
            let us = ns / 1000;
            push_u64(b, us / 1000);
            b.push(b'.');
            push_frac(b, us % 1000, 3);
        }
        None => put(b, b"null"),
    }
}

/// How the socket closed, if by a reset, and where the row came from.
fn json_close(b: &mut Vec<u8>, row: &Row) {
    match row.close {
        Some(c) => push_field_str(b, Key::Close, c.name()),
        None => put(b, Key::Close.null()),
    }
    match row.close.and_then(|c| c.reset_reason()) {
        Some(r) => {
            put(b, Key::ResetReason.field());
            push_json_string(b, r);
        }
        None => put(b, Key::ResetReason.null()),
    }
    push_field_str(b, Key::Origin, row.origin.name());
}

/// `,"name":"value"` for values known to need no escaping. Inlined, so
/// that each key is a constant copy.
#[inline(always)]
fn push_field_str(b: &mut Vec<u8>, key: Key, value: &str) {
    put(b, key.quoted());
    put(b, value.as_bytes());
    b.push(b'"');
}

#[inline(always)]
fn push_field_state(b: &mut Vec<u8>, key: Key, state: State) {
    match state.name() {
        "" => push_field_str(b, key, &state.to_string()),
        known => push_field_str(b, key, known),
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

#[cfg(test)]
mod tests {
    use super::super::tests::{render, row};
    use super::super::{OutputFormat, Style};
    use super::*;
    use crate::model::Close;
    use crate::recording::json::JsonRow;

    fn json(time: TimeFormat, show_skaddr: bool) -> Style {
        Style {
            format: OutputFormat::Json,
            time,
            show_skaddr,
            wide: false,
            color: false,
        }
    }

    #[test]
    fn json_row_has_every_field_typed() {
        let s = render(json(TimeFormat::Utc, true), &row());
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

    /// A row with every key it can have (but a container's name, which
    /// only this host's runtimes know) writes them all, in [`Key`]'s
    /// order, and no other.
    #[test]
    fn a_full_row_writes_every_key_in_order() {
        let id = "0123456789abcdef".repeat(4);
        let path = format!("/system.slice/docker-{id}.scope");
        let mut r = row();
        r.t.thread = crate::model::Comm::from_bytes(b"worker");
        r.owner.as_mut().unwrap().cgroup = crate::cgroup::intern(&path);
        r.queued = true;
        r.close = Some(Close::ResetSent(Some("TCP_STATE")));
        r.timing = crate::model::Timing::Timer;
        let s = render(json(TimeFormat::Utc, true), &r);
        let written: Vec<Key> = Key::ALL
            .iter()
            .copied()
            .filter(|&k| k != Key::ContainerName)
            .collect();
        let at: Vec<usize> = written
            .iter()
            .map(|k| {
                let quoted = format!("\"{}\":", k.name());
                s.find(&quoted).unwrap_or_else(|| panic!("{quoted} in {s}"))
            })
            .collect();
        assert!(at.is_sorted(), "keys out of order: {s}");
        let v: serde_json::Value = serde_json::from_str(s.trim()).unwrap();
        assert_eq!(v.as_object().unwrap().len(), written.len(), "{s}");
    }

    /// The pieces the writer copies are the key, framed.
    #[test]
    fn each_key_is_framed_as_json() {
        for &k in Key::ALL {
            let name = k.name();
            assert_eq!(k.field(), format!(",\"{name}\":").as_bytes());
            assert_eq!(k.quoted(), format!(",\"{name}\":\"").as_bytes());
            assert_eq!(k.null(), format!(",\"{name}\":null").as_bytes());
            assert_eq!(Key::of(name.as_bytes()), Some(k));
        }
        assert_eq!(Key::of(b"ts_n"), None);
        assert_eq!(Key::of(b"TS_NS"), None);
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
}

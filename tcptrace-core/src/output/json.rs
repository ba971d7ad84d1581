//! JSON Lines rows: one object per transition.
//!
//! Rows are written by hand, not through serde: this runs for every row of
//! a recording, and the field names and most values are known ASCII.

use std::io::Write as _;

use super::bytes::{is_plain, push_frac, push_ip, push_micros, push_u64, put};
use super::{Printer, TimeFormat};
use crate::cgroup;
use crate::model::{Origin, Row, State, Transition};

impl Printer {
    /// One row, its fields in the order docs/json.md lists them.
    pub(super) fn json(&mut self, b: &mut Vec<u8>, row: &Row) {
        let t = &row.t;
        self.json_open(b, t.ts_ns);
        put(b, b"\"ts_ns\":");
        push_u64(b, t.ts_ns);
        put(b, b",\"sock\":");
        push_u64(b, row.sock);
        self.json_owner(b, row);
        json_socket(b, t);
        json_states(b, row);
        json_close(b, row);
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

    /// `{`, and the time with its comma unless there is none.
    fn json_open(&mut self, b: &mut Vec<u8>, ts_ns: u64) {
        b.push(b'{');
        match self.style.time {
            TimeFormat::Local | TimeFormat::Utc => {
                put(b, b"\"time\":\"");
                self.time_rfc3339(b, ts_ns);
                put(b, b"\",");
            }
            TimeFormat::Relative => {
                let us = self.relative_us(ts_ns);
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
                put(b, b",\"pid\":");
                push_u64(b, u64::from(o.pid));
                put(b, b",\"comm\":");
                push_json_string(b, &o.comm.as_str());
                let thread = row.t.thread.as_bytes();
                if !thread.is_empty() && thread != o.comm.as_bytes() {
                    put(b, b",\"thread\":");
                    push_json_string(b, &row.t.thread.as_str());
                }
                if let Some(path) = o.cgroup {
                    self.json_cgroup(b, path);
                }
            }
            None => {
                put(b, b",\"pid\":null,\"comm\":null");
            }
        }
        if row.queued {
            put(b, b",\"queued\":true");
        }
    }

    fn json_cgroup(&mut self, b: &mut Vec<u8>, path: &'static str) {
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

/// Family, network namespace, addresses and ports.
fn json_socket(b: &mut Vec<u8>, t: &Transition) {
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
}

/// The states left and entered, and the time spent in the one left.
fn json_states(b: &mut Vec<u8>, row: &Row) {
    if row.origin == Origin::Snapshot {
        put(b, b",\"old\":null");
    } else {
        push_field_state(b, "old", row.t.old);
    }
    push_field_state(b, "new", row.t.new);
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
}

/// How the socket closed, if by a reset, and where the row came from.
fn json_close(b: &mut Vec<u8>, row: &Row) {
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

#[cfg(test)]
mod tests {
    use super::super::tests::{render, row};
    use super::super::{OutputFormat, Style};
    use super::*;
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

//! The stages' tests tell their scenarios as rows of port 80's service,
//! written as a recording's JSON, so that each reads like the recording
//! it stands for.

use super::{Analysis, Report};
use crate::recording::read::parse_line;

/// A row of port 80's service in the recording's JSON.
pub(super) fn row(sock: u64, ts_ms: u64, old: &str, new: &str, extra: &str) -> String {
    let (laddr, lport, rport) = if old == "SYN_SENT" || new == "SYN_SENT" {
        ("127.0.0.1", 40000 + sock, 80)
    } else {
        ("127.0.0.1", 80, 40000 + sock)
    };
    format!(
        r#"{{"ts_ns":{},"sock":{sock},"pid":7,"comm":"srv","family":"ipv4","netns":5,"laddr":"{laddr}","lport":{lport},"raddr":"127.0.0.1","rport":{rport},"old":"{old}","new":"{new}","ms":null{extra}}}"#,
        ts_ms * 1_000_000
    )
}

pub(super) fn analyse(lines: &[String]) -> Report {
    let mut a = Analysis::new();
    for l in lines {
        a.add(parse_line(l.as_bytes()).unwrap());
    }
    a.report(10)
}

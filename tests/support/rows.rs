//! tcptrace's JSON rows as typed values, grouped by socket, and the rows a
//! scenario expects, written as the transitions and owners they name.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ss::Holder;

/// A client that closes first, from its connect to the end of FIN_WAIT2.
pub const CLIENT_CLOSES: &str = "CLOSE>SYN_SENT>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE";
/// A server's accepted socket whose peer closed first.
pub const SERVER_PASSIVE: &str = "LISTEN>SYN_RECV>ESTABLISHED>CLOSE_WAIT>LAST_ACK>CLOSE";
/// A listener, opened and closed.
pub const LISTENER: &str = "CLOSE>LISTEN>CLOSE";

/// One JSON row (`--format json`, `read --format json`). Fields tcptrace
/// leaves out where they say nothing are `None`; fields this struct does
/// not name are kept in `other`, so two rows compare whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// RFC 3339 text, or seconds with `--time relative`; none with
    /// `--time none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Value>,
    pub ts_ns: u64,
    pub sock: u64,
    /// The owner; null when no process is known.
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// The calling thread, where its name is not the process's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// Made while the socket waited in its listener's queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<bool>,
    pub family: String,
    pub netns: Option<u64>,
    pub laddr: String,
    pub lport: u16,
    pub raddr: String,
    pub rport: u16,
    /// None on a snapshot row: no transition was seen.
    pub old: Option<String>,
    pub new: String,
    /// Time in the old state; unknown on a socket's first row.
    pub ms: Option<f64>,
    pub close: Option<String>,
    pub reset_reason: Option<String>,
    /// `tracepoint`, `snapshot`, `timewait`...
    pub origin: String,
    /// `timer` or `poll` where a time-wait table row's time is known only
    /// to its timer or to the poll; none where it is the kernel's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<String>,
    /// With `--show-skaddr` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skaddr: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl Row {
    /// Parses one JSON line; a line that is not a row fails the test.
    pub fn parse(line: &str) -> Row {
        serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON row {line:?}: {e}"))
    }

    /// `OLD>NEW` (`?` for a snapshot row's unknown old state).
    pub fn change(&self) -> String {
        format!("{}>{}", self.old.as_deref().unwrap_or("?"), self.new)
    }

    /// Whether the row is the change `old` -> `new`.
    pub fn is(&self, old: &str, new: &str) -> bool {
        self.old.as_deref() == Some(old) && self.new == new
    }

    /// Whether the row names this owner.
    pub fn owned_by(&self, pid: u32, comm: &str) -> bool {
        self.pid == Some(pid) && self.comm.as_deref() == Some(comm)
    }

    /// The row without what differs between two tracers watching the same
    /// thing: timestamps, socket ids and time in state.
    pub fn without_time(&self) -> Row {
        Row {
            time: None,
            ts_ns: 0,
            sock: 0,
            ms: None,
            ..self.clone()
        }
    }
}

/// As JSON, for failure messages.
impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

/// Every row tcptrace showed for one socket.
#[derive(Debug)]
pub struct Life {
    pub sock: u64,
    pub rows: Vec<Row>,
}

impl Life {
    /// The rows grouped by socket, in order of first appearance.
    pub fn group(rows: Vec<Row>) -> Vec<Life> {
        let mut by_sock: BTreeMap<u64, Life> = BTreeMap::new();
        let mut order = Vec::new();
        for row in rows {
            let sock = row.sock;
            by_sock
                .entry(sock)
                .or_insert_with(|| {
                    order.push(sock);
                    Life {
                        sock,
                        rows: Vec::new(),
                    }
                })
                .rows
                .push(row);
        }
        order
            .into_iter()
            .map(|s| by_sock.remove(&s).expect("present"))
            .collect()
    }

    /// The states the socket went through: `CLOSE>SYN_SENT>ESTABLISHED...`.
    pub fn path(&self) -> String {
        let mut s = self.rows[0].old.as_deref().unwrap_or("?").to_string();
        for r in &self.rows {
            s.push('>');
            s.push_str(&r.new);
        }
        s
    }

    /// Milliseconds spent in `state`, from the row that left it.
    pub fn ms_in(&self, state: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.old.as_deref() == Some(state))
            .and_then(|r| r.ms)
    }

    /// The local port once known (a connect reports port 0 first).
    pub fn lport(&self) -> u16 {
        self.rows.iter().map(|r| r.lport).max().unwrap_or(0)
    }

    pub fn rport(&self) -> u16 {
        self.rows.iter().map(|r| r.rport).max().unwrap_or(0)
    }

    /// Asserts every row names this owner.
    pub fn assert_owner(&self, pid: u32, comm: &str) {
        for r in &self.rows {
            assert_eq!(
                (r.pid, r.comm.as_deref()),
                (Some(pid), Some(comm)),
                "owner of {} in socket {}: {r}",
                self.path(),
                self.sock
            );
        }
    }
}

/// Finds the one socket that went through exactly `path`.
pub fn life<'a>(lives: &'a [Life], path: &str) -> &'a Life {
    let found: Vec<&Life> = lives.iter().filter(|l| l.path() == path).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one socket going {path}; saw {:?}",
        lives.iter().map(Life::path).collect::<Vec<_>>()
    );
    found[0]
}

/// One expected row: the change, who the row names, "queued", and the
/// calling thread's name where it is not the process's.
#[derive(Clone, Debug)]
pub struct Want {
    change: String,
    who: Holder,
    queued: bool,
    thread: Option<String>,
}

impl Want {
    /// The change `OLD>NEW`, made by (or charged to) `who`.
    pub fn row(change: &str, who: &Holder) -> Want {
        Want {
            change: change.to_string(),
            who: who.clone(),
            queued: false,
            thread: None,
        }
    }

    /// Made while the socket waited in the listener's queue.
    pub fn queued(self) -> Want {
        Want {
            queued: true,
            ..self
        }
    }

    /// Made by a thread of another name than the process's.
    pub fn thread(self, name: &str) -> Want {
        Want {
            thread: Some(name.to_string()),
            ..self
        }
    }

    /// Every row of `life`, as it is, naming `who` and nothing more.
    pub fn every_row(life: &Life, who: &Holder) -> Vec<Want> {
        life.rows
            .iter()
            .map(|r| Want::row(&r.change(), who))
            .collect()
    }

    fn shown(&self) -> String {
        format!(
            "{} pid={} comm={:?} queued={} thread={}",
            self.change,
            self.who.pid,
            self.who.comm,
            if self.queued { "true" } else { "-" },
            self.thread
                .as_ref()
                .map_or("-".into(), |t| format!("{t:?}")),
        )
    }
}

/// A row as [`Want::shown`] writes one, to compare a socket's rows whole.
fn shown(r: &Row) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    format!(
        "{} pid={} comm={} queued={} thread={}",
        r.change(),
        r.pid.map_or("null".into(), |p| p.to_string()),
        r.comm.as_ref().map_or("null".into(), |c| format!("{c:?}")),
        opt(r.queued.map(|q| q.to_string())),
        opt(r.thread.as_ref().map(|t| format!("{t:?}"))),
    )
}

/// Asserts every row of `life`, in order.
pub fn assert_rows(life: &Life, wanted: &[Want]) {
    let got: Vec<String> = life.rows.iter().map(shown).collect();
    let expected: Vec<String> = wanted.iter().map(Want::shown).collect();
    assert_eq!(
        got,
        expected,
        "rows of socket {} ({})",
        life.sock,
        life.path()
    );
}

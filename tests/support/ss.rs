//! What `ss -tanpH` shows inside a namespace: the truth the owner tests
//! check tcptrace's rows against, taken from the kernel's socket tables and
//! /proc, never from tcptrace.

use std::collections::BTreeSet;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// A process holding a socket, as `ss -p` names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Holder {
    pub comm: String,
    pub pid: u32,
}

impl Holder {
    pub fn new(comm: &str, pid: u32) -> Holder {
        Holder {
            comm: comm.to_string(),
            pid,
        }
    }
}

/// One line of `ss -tanpH`.
#[derive(Clone, Debug)]
pub struct SsSocket {
    /// As ss writes it: `LISTEN`, `ESTAB`, `CLOSE-WAIT`, `TIME-WAIT`...
    pub state: String,
    pub local: String,
    pub peer: String,
    /// The processes holding it, one each, sorted; none for a socket in a
    /// listener's queue, an orphan or a time-wait one.
    pub holders: Vec<Holder>,
}

impl SsSocket {
    /// Whether it is in `state`, written as ss shows it or as its filters
    /// take it (`fin-wait-1`, `established`).
    pub fn is(&self, state: &str) -> bool {
        self.state.eq_ignore_ascii_case(state)
            || (self.state == "ESTAB" && state.eq_ignore_ascii_case("established"))
    }

    /// Whether its local end has port `port`.
    pub fn on_port(&self, port: u16) -> bool {
        self.local.ends_with(&format!(":{port}"))
    }
}

/// The lines of `ss -tanpH` (the full listing: with a state filter, ss
/// leaves the state column out).
pub fn parse(text: &str) -> Vec<SsSocket> {
    text.lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 5 {
                return None;
            }
            Some(SsSocket {
                state: cols[0].to_string(),
                local: cols[3].to_string(),
                peer: cols[4].to_string(),
                holders: holders(&cols[5..].join(" ")),
            })
        })
        .collect()
}

/// `users:(("name",pid=N,fd=M),...)` as holders, one per process, sorted.
fn holders(text: &str) -> Vec<Holder> {
    let mut found = BTreeSet::new();
    for part in text.split("((").flat_map(|p| p.split("),(")) {
        let Some(rest) = part.strip_prefix('"') else {
            continue;
        };
        let Some((comm, rest)) = rest.split_once("\",pid=") else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        found.insert(Holder {
            comm: comm.to_string(),
            pid: pid.parse().expect("pid is a number"),
        });
    }
    found.into_iter().collect()
}

/// `ss -tanpH` in the namespace mounted at `path` (from a thread that
/// holds no [`Netns`], a sampler's).
pub fn in_namespace(path: &str) -> Vec<SsSocket> {
    let out = Command::new("nsenter")
        .arg(format!("--net={path}"))
        .args(["ss", "-tanpH"])
        .output()
        .expect("ss runs");
    assert!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&String::from_utf8_lossy(&out.stdout))
}

impl Netns {
    /// Every TCP socket of the namespace and who holds it, now. Run with
    /// `nsenter`, whose name is what a socket of the test's own that the
    /// fork briefly copied is closed under.
    pub fn ss(&self) -> Vec<SsSocket> {
        in_namespace(&self.path())
    }

    /// Polls `ss` (up to `limit`) until a socket matches; returns it.
    pub fn wait_for_socket(
        &self,
        what: &str,
        limit: Duration,
        matches: impl Fn(&SsSocket) -> bool,
    ) -> SsSocket {
        let deadline = Instant::now() + limit;
        loop {
            let now = self.ss();
            if let Some(s) = now.iter().find(|s| matches(s)) {
                return s.clone();
            }
            assert!(Instant::now() < deadline, "never saw {what} in ss: {now:?}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many sockets of the namespace are in `state` now.
    pub fn ss_count(&self, state: &str) -> u64 {
        self.ss().iter().filter(|s| s.is(state)).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_with_two_holders_names_each_once() {
        let text = "LISTEN 0 511 127.0.0.1:8080 0.0.0.0:* \
            users:((\"nginx\",pid=13,fd=6),(\"nginx\",pid=12,fd=6),(\"nginx\",pid=12,fd=7))\n\
            TIME-WAIT 0 0 127.0.0.1:8080 127.0.0.1:40000\n";
        let got = parse(text);
        assert_eq!(got.len(), 2);
        assert!(got[0].is("listen") && got[0].on_port(8080));
        assert_eq!(
            got[0].holders,
            [Holder::new("nginx", 12), Holder::new("nginx", 13)]
        );
        assert!(got[1].is("time-wait") && got[1].holders.is_empty());
        assert_eq!(got[1].peer, "127.0.0.1:40000");
    }
}

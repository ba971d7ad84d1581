//! Filter: which transitions are shown.
//!
//! Family and port filters are also compiled into the kernel program (see
//! [`Filter::kernel_ports`]), so unwanted traffic costs no ring space; they
//! are checked again here so that replaying a recording filters the same way.
//! Process filters need the owner, which only userspace knows.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use tcptrace_ebpf::{FAMILY_V4, FAMILY_V6, PORT_ANY, PORT_LOCAL, PORT_REMOTE};

use crate::attribute::Row;
use crate::cgroup;
use crate::decode::Family;
use crate::fasthash::FastMap;
use crate::state::State;

/// What the user asked to see. Empty lists mean "any". Recordings keep it
/// in their header.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Spec {
    pub ports: Vec<u16>,
    pub lports: Vec<u16>,
    pub rports: Vec<u16>,
    #[serde(with = "family_name")]
    pub family: Option<Family>,
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    /// systemd units (`redis-server` or `redis-server.service`).
    pub units: Vec<String>,
    /// cgroup v2 paths: the owner's cgroup is one of them or below.
    pub cgroups: Vec<String>,
    #[serde(with = "tuple_text")]
    pub follow: Option<Tuple>,
    /// Inode of the one network namespace to watch.
    pub netns: Option<u32>,
}

impl Spec {
    /// The filters in words, for the line that says what is traced and for
    /// reports.
    pub fn describe(&self) -> String {
        let list = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let mut parts = Vec::new();
        if !self.ports.is_empty() {
            parts.push(format!("port {}", list(&self.ports)));
        }
        if !self.lports.is_empty() {
            parts.push(format!("local port {}", list(&self.lports)));
        }
        if !self.rports.is_empty() {
            parts.push(format!("remote port {}", list(&self.rports)));
        }
        match self.family {
            Some(Family::V4) => parts.push("IPv4 only".into()),
            Some(Family::V6) => parts.push("IPv6 only".into()),
            None => {}
        }
        if !self.pids.is_empty() {
            let pids: Vec<String> = self.pids.iter().map(u32::to_string).collect();
            parts.push(format!("pid {}", pids.join(",")));
        }
        if !self.comms.is_empty() {
            parts.push(format!("process {}", self.comms.join(",")));
        }
        if !self.units.is_empty() {
            parts.push(format!("unit {}", self.units.join(",")));
        }
        if !self.cgroups.is_empty() {
            parts.push(format!("cgroup {}", self.cgroups.join(",")));
        }
        if let Some(t) = self.follow {
            parts.push(format!("connection {},{}", t.a, t.b));
        }
        if let Some(n) = self.netns {
            parts.push(format!("network namespace {n}"));
        }
        if parts.is_empty() {
            "all TCP sockets".into()
        } else {
            parts.join(", ")
        }
    }
}

mod family_name {
    use super::Family;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(f: &Option<Family>, s: S) -> Result<S::Ok, S::Error> {
        match f {
            Some(f) => s.serialize_str(f.name()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Family>, D::Error> {
        match Option::<String>::deserialize(d)?.as_deref() {
            None => Ok(None),
            Some("ipv4") => Ok(Some(Family::V4)),
            Some("ipv6") => Ok(Some(Family::V6)),
            Some(other) => Err(serde::de::Error::custom(format!(
                "unknown family {other:?}"
            ))),
        }
    }
}

mod tuple_text {
    use super::Tuple;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<Tuple>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.collect_str(&format_args!("{},{}", t.a, t.b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Tuple>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let (a, b) = text
            .split_once(',')
            .ok_or_else(|| serde::de::Error::custom("a tuple is LADDR:LPORT,RADDR:RPORT"))?;
        let parse = |x: &str| x.parse().map_err(serde::de::Error::custom);
        Ok(Some(Tuple {
            a: parse(a)?,
            b: parse(b)?,
        }))
    }
}

/// One connection, as `LADDR:LPORT,RADDR:RPORT`. Matches both of its
/// sockets when both ends are local.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub a: SocketAddr,
    pub b: SocketAddr,
}

impl Tuple {
    fn matches(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        (local == self.a && remote == self.b) || (local == self.b && remote == self.a)
    }

    /// A connect's `CLOSE -> SYN_SENT` has local port 0 (the port is chosen
    /// just after): it may be the start of this connection.
    fn may_start(&self, row: &Row) -> bool {
        let (l, r) = (row.t.local, row.t.remote);
        row.t.old == State::CLOSE
            && row.t.new == State::SYN_SENT
            && l.port() == 0
            && [(self.a, self.b), (self.b, self.a)]
                .iter()
                .any(|(me, peer)| r == *peer && (l.ip() == me.ip() || l.ip().is_unspecified()))
    }
}

/// The filter bits of each port, as the kernel program's port map holds them.
pub struct PortBits(Box<[u8; 65536]>);

impl PortBits {
    pub fn get(&self, port: u16) -> u8 {
        self.0[usize::from(port)]
    }

    /// Ports with any bit set, and their bits.
    pub fn marked(&self) -> impl Iterator<Item = (u16, u8)> + '_ {
        (0..=u16::MAX)
            .map(|p| (p, self.get(p)))
            .filter(|(_, b)| *b != 0)
    }
}

pub enum Admit {
    /// Not shown.
    Hidden,
    /// Kept back until the socket's next event says whether it belongs.
    Held,
    /// Shown, after the held event of the same socket, if any (boxed: rare,
    /// and a row is large next to the other answers).
    Show(Option<Box<Row>>),
}

pub struct Filter {
    spec: Spec,
    bits: PortBits,
    /// Which of PORT_ANY / PORT_LOCAL / PORT_REMOTE the user gave.
    wanted: u8,
    /// Connects kept back by `--follow`, by socket id.
    held: FastMap<u64, Row>,
}

impl Filter {
    pub fn new(spec: Spec) -> Filter {
        let mut bits = Box::new([0u8; 65536]);
        let mut wanted = 0;
        for (list, bit) in [
            (&spec.ports, PORT_ANY),
            (&spec.lports, PORT_LOCAL),
            (&spec.rports, PORT_REMOTE),
        ] {
            for &p in list {
                bits[usize::from(p)] |= bit;
                wanted |= bit;
            }
        }
        Filter {
            spec,
            bits: PortBits(bits),
            wanted,
            held: FastMap::default(),
        }
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Families the kernel program keeps.
    pub fn kernel_families(&self) -> u32 {
        match self.spec.family {
            Some(Family::V4) => FAMILY_V4,
            Some(Family::V6) => FAMILY_V6,
            None => FAMILY_V4 | FAMILY_V6,
        }
    }

    /// Port bits and the filters in force for the kernel program. `--follow`
    /// without port filters narrows the kernel to the tuple's two ports.
    pub fn kernel_ports(&self) -> (PortBits, u8) {
        let mut bits = PortBits(self.bits.0.clone());
        let mut wanted = self.wanted;
        if let (Some(f), 0) = (self.spec.follow, wanted) {
            bits.0[usize::from(f.a.port())] |= PORT_ANY;
            bits.0[usize::from(f.b.port())] |= PORT_ANY;
            wanted = PORT_ANY;
        }
        // Kernels before 6.6 report a child's `LISTEN -> SYN_RECV` before it
        // has the remote address: let remote port 0 through, and decide once
        // the next row has filled it in (`live`).
        if wanted & PORT_REMOTE != 0 {
            bits.0[0] |= PORT_REMOTE;
        }
        (bits, wanted)
    }

    fn ports_pass(&self, local: u16, remote: u16) -> bool {
        let (l, r) = (self.bits.get(local), self.bits.get(remote));
        (self.wanted & PORT_ANY == 0 || (l | r) & PORT_ANY != 0)
            && (self.wanted & PORT_LOCAL == 0 || l & PORT_LOCAL != 0)
            && (self.wanted & PORT_REMOTE == 0 || r & PORT_REMOTE != 0)
    }

    fn owner_passes(&self, row: &Row) -> bool {
        let spec = &self.spec;
        if spec.pids.is_empty()
            && spec.comms.is_empty()
            && spec.units.is_empty()
            && spec.cgroups.is_empty()
        {
            return true;
        }
        let Some(owner) = row.owner else {
            return false;
        };
        let cgroup = owner.cgroup.unwrap_or("/");
        (spec.pids.is_empty() || spec.pids.contains(&owner.pid))
            && (spec.comms.is_empty()
                || spec
                    .comms
                    .iter()
                    .any(|c| comm_matches(c, owner.comm.as_bytes())))
            && (spec.units.is_empty()
                || cgroup::unit(cgroup)
                    .is_some_and(|u| spec.units.iter().any(|w| cgroup::unit_matches(u, w))))
            && (spec.cgroups.is_empty()
                || spec.cgroups.iter().any(|w| cgroup::is_within(cgroup, w)))
    }

    /// Whether the filters (follow included, held connects aside) let a
    /// socket's row through: for reports about a socket, such as `--stuck`.
    pub fn passes(&self, row: &Row) -> bool {
        let t = &row.t;
        self.spec.family.is_none_or(|f| f == t.family)
            && self.spec.netns.is_none_or(|n| n == t.netns)
            && self.ports_pass(t.local.port(), t.remote.port())
            && self.owner_passes(row)
            && self
                .spec
                .follow
                .is_none_or(|f| f.matches(t.local, t.remote))
    }

    pub fn admit(&mut self, row: &Row) -> Admit {
        let t = &row.t;
        let stateless = self.spec.family.is_none_or(|f| f == t.family)
            && self.spec.netns.is_none_or(|n| n == t.netns)
            && self.ports_pass(t.local.port(), t.remote.port())
            && self.owner_passes(row);
        let Some(follow) = self.spec.follow else {
            return if stateless {
                Admit::Show(None)
            } else {
                Admit::Hidden
            };
        };
        let held = self.held.remove(&row.sock).map(Box::new);
        if !stateless {
            return Admit::Hidden;
        }
        if follow.matches(t.local, t.remote) {
            Admit::Show(held)
        } else if follow.may_start(row) {
            self.held.insert(row.sock, *row);
            Admit::Held
        } else {
            Admit::Hidden
        }
    }
}

/// `--comm` names longer than the kernel's 15 bytes match the truncated name.
fn comm_matches(wanted: &str, comm: &[u8]) -> bool {
    let wanted = wanted.as_bytes();
    wanted[..wanted.len().min(15)] == *comm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribute::Origin;
    use crate::decode::{Comm, Task, Transition};

    fn row(sk: u64, old: State, new: State, l: &str, r: &str, owner: Option<u32>) -> Row {
        let task = |pid| Task::new(pid, b"nginx");
        let local: SocketAddr = l.parse().unwrap();
        Row {
            t: Transition {
                ts_ns: 0,
                skaddr: sk,
                task: task(1),
                thread: Comm::default(),
                old,
                new,
                family: if local.is_ipv4() {
                    Family::V4
                } else {
                    Family::V6
                },
                local,
                remote: r.parse().unwrap(),
                netns: 1,
            },
            sock: sk,
            owner: owner.map(task),
            dwell_ns: None,
            close: None,
            origin: Origin::Tracepoint,
            queued: false,
        }
    }

    fn shown(a: Admit) -> Option<Option<u64>> {
        match a {
            Admit::Show(held) => Some(held.map(|h| h.sock)),
            _ => None,
        }
    }

    #[test]
    fn port_filters_combine_any_local_and_remote() {
        let f = Filter::new(Spec {
            ports: vec![80, 443],
            lports: vec![5000],
            ..Spec::default()
        });
        assert!(f.ports_pass(5000, 443));
        assert!(!f.ports_pass(5000, 444));
        assert!(!f.ports_pass(443, 5000));
        let (bits, wanted) = f.kernel_ports();
        assert_eq!(wanted, PORT_ANY | PORT_LOCAL);
        assert_eq!(
            bits.marked().collect::<Vec<_>>(),
            [(80, 1), (443, 1), (5000, 2)]
        );
    }

    #[test]
    fn a_remote_port_filter_lets_the_kernel_pass_a_child_without_its_address_yet() {
        let f = Filter::new(Spec {
            rports: vec![40000],
            ..Spec::default()
        });
        let (bits, wanted) = f.kernel_ports();
        assert_eq!(wanted, PORT_REMOTE);
        assert_eq!(
            bits.marked().collect::<Vec<_>>(),
            [(0, PORT_REMOTE), (40000, PORT_REMOTE)]
        );
        // Userspace still decides on the address the row ends up with.
        assert!(!f.ports_pass(6389, 0));
        assert!(f.ports_pass(6389, 40000));
    }

    #[test]
    fn follow_holds_the_connect_until_its_port_is_known() {
        let tuple = Tuple {
            a: "127.0.0.1:40000".parse().unwrap(),
            b: "127.0.0.1:6389".parse().unwrap(),
        };
        let mut f = Filter::new(Spec {
            follow: Some(tuple),
            ..Spec::default()
        });
        let c = State::CLOSE;
        let held = f.admit(&row(
            1,
            c,
            State::SYN_SENT,
            "127.0.0.1:0",
            "127.0.0.1:6389",
            Some(9),
        ));
        assert!(matches!(held, Admit::Held));
        let other = f.admit(&row(
            2,
            c,
            State::SYN_SENT,
            "127.0.0.1:0",
            "127.0.0.1:6389",
            Some(9),
        ));
        assert!(matches!(other, Admit::Held));
        // The other connect got another port: it and its held event go.
        let est = State::ESTABLISHED;
        let r = f.admit(&row(
            2,
            State::SYN_SENT,
            est,
            "127.0.0.1:40001",
            "127.0.0.1:6389",
            None,
        ));
        assert!(matches!(r, Admit::Hidden));
        let r = f.admit(&row(
            1,
            State::SYN_SENT,
            est,
            "127.0.0.1:40000",
            "127.0.0.1:6389",
            None,
        ));
        assert_eq!(shown(r), Some(Some(1)));
        // The server side of the same connection, reversed.
        let r = f.admit(&row(
            3,
            State::LISTEN,
            State::SYN_RECV,
            "127.0.0.1:6389",
            "127.0.0.1:40000",
            None,
        ));
        assert_eq!(shown(r), Some(None));
        assert!(f.held.is_empty());
        let (bits, wanted) = f.kernel_ports();
        assert_eq!(
            (bits.get(40000), bits.get(6389), wanted),
            (PORT_ANY, PORT_ANY, PORT_ANY)
        );
    }

    #[test]
    fn pid_filter_hides_unknown_owners() {
        let mut f = Filter::new(Spec {
            pids: vec![7],
            ..Spec::default()
        });
        let r = |o| {
            row(
                1,
                State::ESTABLISHED,
                State::CLOSE_WAIT,
                "1.1.1.1:1",
                "2.2.2.2:2",
                o,
            )
        };
        assert!(matches!(f.admit(&r(Some(7))), Admit::Show(None)));
        assert!(matches!(f.admit(&r(Some(8))), Admit::Hidden));
        assert!(matches!(f.admit(&r(None)), Admit::Hidden));
    }

    #[test]
    fn comm_filter_matches_the_kernels_truncated_name() {
        assert!(comm_matches("a-very-long-process-name", b"a-very-long-pro"));
        assert!(comm_matches("nginx", b"nginx"));
        assert!(!comm_matches("nginx", b"nginx2"));
        // The kernel cuts bytes, not characters.
        assert!(comm_matches("ééééééééé", &"ééééééééé".as_bytes()[..15]));
    }

    #[test]
    fn family_filter() {
        let mut f = Filter::new(Spec {
            family: Some(Family::V6),
            ..Spec::default()
        });
        assert_eq!(f.kernel_families(), FAMILY_V6);
        let v4 = row(
            1,
            State::CLOSE,
            State::LISTEN,
            "0.0.0.0:80",
            "0.0.0.0:0",
            None,
        );
        assert!(matches!(f.admit(&v4), Admit::Hidden));
        let v6 = row(1, State::CLOSE, State::LISTEN, "[::]:80", "[::]:0", None);
        assert!(matches!(f.admit(&v6), Admit::Show(None)));
    }
}

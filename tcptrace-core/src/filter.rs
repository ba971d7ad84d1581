//! Filter: which transitions are shown.
//!
//! Family and port filters are also compiled into the kernel program (see
//! [`Filter::kernel_ports`]), so unwanted traffic costs no ring space; they
//! are checked again here so that replaying a recording filters the same way.
//! Process filters need the owner, which only userspace knows.

use std::net::IpAddr;

use tcptrace_common::{FAMILY_V4, FAMILY_V6, PORT_ANY, PORT_LOCAL, PORT_REMOTE};

use crate::cgroup;
use crate::fasthash::FastMap;
use crate::model::{Family, Net, Row, Spec};

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

/// Up to this many ports are matched by compares rather than by `bits`.
const FEW_PORTS: usize = 8;

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
    /// The marked ports and their bits, when there are few: a row's
    /// ephemeral port indexes anywhere in the 64 KiB of `bits`, a cache
    /// miss that was four fifths of `admit` under churn; a few compares
    /// touch nothing.
    few: Option<Vec<(u16, u8)>>,
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
        let bits = PortBits(bits);
        let marked: Vec<(u16, u8)> = bits.marked().collect();
        Filter {
            spec,
            few: (marked.len() <= FEW_PORTS).then_some(marked),
            bits,
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

    fn port_bits(&self, port: u16) -> u8 {
        match &self.few {
            Some(few) => few.iter().find(|&&(p, _)| p == port).map_or(0, |&(_, b)| b),
            None => self.bits.get(port),
        }
    }

    fn ports_pass(&self, local: u16, remote: u16) -> bool {
        if self.wanted == 0 {
            return true;
        }
        let (l, r) = (self.port_bits(local), self.port_bits(remote));
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

    /// The state and address filters, which need nothing but the row.
    fn row_passes(&self, row: &Row) -> bool {
        let (spec, t) = (&self.spec, &row.t);
        let within = |nets: &[Net], ip: IpAddr| nets.iter().any(|n| n.contains(ip));
        (spec.states.is_empty() || spec.states.contains(&t.old) || spec.states.contains(&t.new))
            && (spec.laddrs.is_empty() || within(&spec.laddrs, t.local.ip()))
            && (spec.raddrs.is_empty() || within(&spec.raddrs, t.remote.ip()))
            && (spec.addrs.is_empty()
                || within(&spec.addrs, t.local.ip())
                || within(&spec.addrs, t.remote.ip()))
    }

    /// Whether the filters (follow included, held connects aside) let a
    /// socket's row through: for reports about a socket, such as `--stuck`.
    pub fn passes(&self, row: &Row) -> bool {
        let t = &row.t;
        self.spec.family.is_none_or(|f| f == t.family)
            && self.spec.netns.is_none_or(|n| n == t.netns)
            && self.ports_pass(t.local.port(), t.remote.port())
            && self.owner_passes(row)
            && self.row_passes(row)
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
            && self.owner_passes(row)
            && self.row_passes(row);
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
    use crate::model::Origin;
    use crate::model::*;
    use crate::model::{Comm, Task, Transition};
    use std::net::SocketAddr;

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
            timing: crate::model::Timing::Exact,
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

    /// A few ports are compared, more are looked up in the table: both
    /// answer alike.
    #[test]
    fn few_ports_filter_as_the_table_does() {
        let spec = |n: u16| Spec {
            ports: (0..n).map(|i| 80 + i).collect(),
            lports: vec![5000, 80],
            rports: vec![443, 81],
            ..Spec::default()
        };
        assert!(Filter::new(spec(20)).few.is_none());
        let few = Filter::new(spec(2));
        assert!(few.few.is_some());
        let mut table = Filter::new(spec(2));
        table.few = None;
        let ports = [80u16, 81, 82, 443, 5000, 0, 12345, 65535];
        for l in ports {
            for r in ports {
                assert_eq!(few.ports_pass(l, r), table.ports_pass(l, r), "{l} {r}");
            }
        }
        assert!(few.ports_pass(80, 443));
        assert!(few.ports_pass(5000, 81));
        assert!(!few.ports_pass(5000, 443));
        assert!(!few.ports_pass(81, 443));
    }

    #[test]
    fn networks_contain_their_addresses_in_either_family() {
        let net = |s: &str| s.parse::<Net>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(net("10.0.0.0/8").contains(ip("10.200.3.4")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("0.0.0.0/0").contains(ip("192.0.2.1")));
        assert!(net("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!net("127.0.0.1").contains(ip("127.0.0.2")));
        // A dual-stack socket talking IPv4 shows a mapped address.
        assert!(net("127.0.0.0/8").contains(ip("::ffff:127.0.0.9")));
        assert!(net("fd00::/8").contains(ip("fdab::1")));
        assert!(!net("fd00::/8").contains(ip("fe80::1")));
        assert!(net("[::1]").contains(ip("::1")));
        assert!(!net("::1/128").contains(ip("127.0.0.1")));
        assert_eq!(net("10.1.2.3/8").to_string(), "10.1.2.3/8");
        assert_eq!(
            "10.0.0.0/33".parse::<Net>().unwrap_err(),
            "\"33\" is not a prefix length for 10.0.0.0; it is 0 to 32"
        );
        assert_eq!(
            "localhost".parse::<Net>().unwrap_err(),
            "\"localhost\" is not an IPv4 or IPv6 address"
        );
    }

    #[test]
    fn state_and_address_filters_keep_rows_entering_or_leaving_and_within() {
        let mut f = Filter::new(Spec {
            states: vec![State::CLOSE_WAIT],
            raddrs: vec!["127.0.0.0/8".parse().unwrap()],
            ..Spec::default()
        });
        let mut shown = |old, new, remote| {
            matches!(
                f.admit(&row(1, old, new, "127.0.0.1:80", remote, Some(1))),
                Admit::Show(_)
            )
        };
        let est = State::ESTABLISHED;
        assert!(shown(est, State::CLOSE_WAIT, "127.0.0.2:4000"));
        assert!(shown(State::CLOSE_WAIT, State::LAST_ACK, "127.0.0.2:4000"));
        assert!(!shown(State::SYN_RECV, est, "127.0.0.2:4000"));
        assert!(!shown(est, State::CLOSE_WAIT, "[::1]:4000"));
        // Recordings keep the filters by name.
        let spec = f.spec().clone();
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains(r#""states":["CLOSE_WAIT"]"#), "{json}");
        assert!(json.contains(r#""raddrs":["127.0.0.0/8"]"#), "{json}");
        assert_eq!(serde_json::from_str::<Spec>(&json).unwrap(), spec);
        assert_eq!(
            spec.describe(),
            "entering or leaving CLOSE_WAIT, remote address 127.0.0.0/8"
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

//! What the user asked to see ([`Spec`]): kept in every recording's header
//! and compiled into a [`crate::filter::Filter`].

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::model::{Family, Row, State};

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
    /// Rows entering or leaving one of these states.
    #[serde(with = "state_names")]
    pub states: Vec<State>,
    /// Local address within one of these networks.
    pub laddrs: Vec<Net>,
    /// Remote address within one of these networks.
    pub raddrs: Vec<Net>,
    /// Either address within one of these networks.
    pub addrs: Vec<Net>,
}

/// An address with a prefix length: `10.0.0.0/8`, `::1/128`, or a bare
/// address (the whole length).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Net {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Net {
    /// Whether `ip` is in the network; an IPv4-mapped IPv6 address (a
    /// dual-stack socket talking IPv4) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Net, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 or IPv6 address"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(format!(
                        "{p:?} is not a prefix length for {addr}; it is 0 to {max}"
                    ));
                }
            },
        };
        Ok(Net { addr, prefix })
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl From<Net> for String {
    fn from(n: Net) -> String {
        n.to_string()
    }
}

impl TryFrom<String> for Net {
    type Error = String;

    fn try_from(s: String) -> Result<Net, String> {
        s.parse()
    }
}

mod state_names {
    use super::State;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(states: &[State], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(states.iter().map(|st| st.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<State>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|n| {
                State::from_name(n)
                    .ok_or_else(|| serde::de::Error::custom(format!("unknown state {n:?}")))
            })
            .collect()
    }
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
        if !self.states.is_empty() {
            let names: Vec<&str> = self.states.iter().map(|s| s.name()).collect();
            parts.push(format!("entering or leaving {}", names.join(",")));
        }
        let nets = |v: &[Net]| v.iter().map(Net::to_string).collect::<Vec<_>>().join(",");
        for (list, what) in [
            (&self.laddrs, "local address"),
            (&self.raddrs, "remote address"),
            (&self.addrs, "address"),
        ] {
            if !list.is_empty() {
                parts.push(format!("{what} {}", nets(list)));
            }
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
    pub(crate) fn matches(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        (local == self.a && remote == self.b) || (local == self.b && remote == self.a)
    }

    /// A connect's `CLOSE -> SYN_SENT` has local port 0 (the port is chosen
    /// just after): it may be the start of this connection.
    pub(crate) fn may_start(&self, row: &Row) -> bool {
        let (l, r) = (row.t.local, row.t.remote);
        row.t.old == State::CLOSE
            && row.t.new == State::SYN_SENT
            && l.port() == 0
            && [(self.a, self.b), (self.b, self.a)]
                .iter()
                .any(|(me, peer)| r == *peer && (l.ip() == me.ip() || l.ip().is_unspecified()))
    }
}

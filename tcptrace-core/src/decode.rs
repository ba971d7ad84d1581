//! Decode: turn the raw [`Event`] bytes from the ring into a [`Transition`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tcptrace_common::{
    AF_INET, Event, KIND_ACCEPT, KIND_EXIT, KIND_FORK, KIND_RELEASE, KIND_RESET_RECEIVED,
    KIND_RESET_SENT, KIND_TW_CHANGED, KIND_TW_MADE,
};

use crate::model::{Comm, Family, State, Task, Transition};

/// Why a ring entry could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct ShortEntry(pub usize);

impl fmt::Display for ShortEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ring entry of {} bytes is shorter than an event ({} bytes)",
            self.0,
            size_of::<Event>()
        )
    }
}

/// What a ring entry says.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    State(Transition),
    /// accept() gave the socket to `task` (`thread` made the call).
    Accept {
        skaddr: u64,
        task: Task,
        thread: Comm,
        cgroup: u64,
    },
    /// Process `parent` forked `child`: the child holds what it held.
    Fork {
        parent: u32,
        child: u32,
    },
    /// Process `pid` closed a descriptor of `skaddr`; another reference
    /// remains.
    Release {
        skaddr: u64,
        pid: u32,
    },
    /// Process `pid` is exiting.
    Exit {
        pid: u32,
    },
    /// A reset on a socket: received ones come before the socket's `->
    /// CLOSE`, sent ones (aborts) just after it.
    Reset {
        skaddr: u64,
        received: bool,
        /// The kernel's `sk_rst_reason` number (sent resets only).
        reason: u8,
    },
    /// A time-wait socket (`t.skaddr`) made (`made`: `t.old` is the state
    /// its full socket leaves, `t.new` its substate), moved on to TIME_WAIT
    /// or ended (`t.new` CLOSE); addresses and namespace are the
    /// connection's.
    TimeWait {
        made: bool,
        t: Transition,
    },
}

pub fn decode(bytes: &[u8]) -> Result<Decoded, ShortEntry> {
    event(bytes).map(|e| classify(&e))
}

/// The event in a ring entry.
pub fn event(bytes: &[u8]) -> Result<Event, ShortEntry> {
    if bytes.len() < size_of::<Event>() {
        return Err(ShortEntry(bytes.len()));
    }
    // SAFETY: length checked above; Event is plain old data, and the ring
    // gives no alignment guarantee, hence read_unaligned.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

pub fn classify(e: &Event) -> Decoded {
    match e.kind {
        KIND_ACCEPT => Decoded::Accept {
            skaddr: e.skaddr,
            task: Task::new(e.pid, &e.comm),
            thread: Comm::from_bytes(&e.thread),
            cgroup: e.cgroup,
        },
        KIND_FORK => Decoded::Fork {
            parent: e.pid,
            child: e.child,
        },
        KIND_RELEASE => Decoded::Release {
            skaddr: e.skaddr,
            pid: e.pid,
        },
        KIND_EXIT => Decoded::Exit { pid: e.pid },
        KIND_RESET_SENT | KIND_RESET_RECEIVED => Decoded::Reset {
            skaddr: e.skaddr,
            received: e.kind == KIND_RESET_RECEIVED,
            reason: e.reset_reason,
        },
        KIND_TW_MADE | KIND_TW_CHANGED => Decoded::TimeWait {
            made: e.kind == KIND_TW_MADE,
            t: from_event(e),
        },
        _ => Decoded::State(from_event(e)),
    }
}

pub fn from_event(e: &Event) -> Transition {
    let (family, saddr, daddr) = if e.family == AF_INET {
        (Family::V4, ipv4(&e.saddr), ipv4(&e.daddr))
    } else {
        (Family::V6, ipv6(&e.saddr), ipv6(&e.daddr))
    };
    Transition {
        ts_ns: e.ts_ns,
        skaddr: e.skaddr,
        task: Task::new(e.pid, &e.comm),
        thread: Comm::from_bytes(&e.thread),
        old: State(e.oldstate),
        new: State(e.newstate),
        family,
        local: SocketAddr::new(saddr, e.sport),
        remote: SocketAddr::new(daddr, e.dport),
        netns: e.netns,
    }
}

fn ipv4(b: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

/// An IPv4-mapped address (a dual-stack socket talking IPv4) is shown as the
/// IPv4 address it is.
fn ipv6(b: &[u8; 16]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(*b)).to_canonical()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn raw_event(family: u16, saddr: &[u8], daddr: &[u8]) -> Event {
        let mut e = Event {
            pid: 42,
            oldstate: 7,
            newstate: 2,
            family,
            dport: 6389,
            comm: *b"redis-cli\0\0\0\0\0\0\0",
            thread: *b"redis-cli\0\0\0\0\0\0\0",
            netns: 4026531840,
            ..Event::new(tcptrace_common::KIND_STATE, 5_000, 0xffff_8880_1234_5678)
        };
        e.saddr[..saddr.len()].copy_from_slice(saddr);
        e.daddr[..daddr.len()].copy_from_slice(daddr);
        e
    }

    fn bytes(e: &Event) -> Vec<u8> {
        // SAFETY: reading the bytes of a repr(C) POD value.
        unsafe { std::slice::from_raw_parts((e as *const Event).cast::<u8>(), size_of::<Event>()) }
            .to_vec()
    }

    #[test]
    fn ipv4_event_decodes_to_addresses_ports_and_states() {
        let e = raw_event(AF_INET, &[127, 0, 0, 1], &[10, 1, 2, 3]);
        let Decoded::State(t) = decode(&bytes(&e)).unwrap() else {
            panic!("a state event")
        };
        assert_eq!(t.family, Family::V4);
        assert_eq!(t.local, "127.0.0.1:0".parse().unwrap());
        assert_eq!(t.remote, "10.1.2.3:6389".parse().unwrap());
        assert_eq!((t.old, t.new), (State::CLOSE, State::SYN_SENT));
        assert_eq!(t.task.pid, 42);
        assert_eq!(t.task.comm.as_str(), "redis-cli");
    }

    #[test]
    fn ipv4_mapped_ipv6_is_shown_as_ipv4() {
        let mapped: Ipv6Addr = "::ffff:192.0.2.7".parse().unwrap();
        let e = raw_event(10, &mapped.octets(), &Ipv6Addr::LOCALHOST.octets());
        let Decoded::State(t) = decode(&bytes(&e)).unwrap() else {
            panic!("a state event")
        };
        assert_eq!(t.family, Family::V6);
        assert_eq!(t.local.ip(), "192.0.2.7".parse::<IpAddr>().unwrap());
        assert_eq!(t.remote.ip(), "::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn reset_events_decode_by_kind() {
        let mut e = raw_event(AF_INET, &[0; 4], &[0; 4]);
        e.kind = KIND_RESET_SENT;
        e.reset_reason = 12;
        let want = Decoded::Reset {
            skaddr: e.skaddr,
            received: false,
            reason: 12,
        };
        assert_eq!(decode(&bytes(&e)), Ok(want));
    }

    #[test]
    fn short_entry_is_an_error_not_a_panic() {
        assert_eq!(decode(&[0u8; 8]), Err(ShortEntry(8)));
    }

    #[test]
    fn comm_stops_at_nul_and_keeps_at_most_15_bytes() {
        assert_eq!(Comm::from_bytes(b"abc\0def").as_bytes(), b"abc");
        assert_eq!(Comm::from_bytes(&[b'x'; 20]).as_bytes().len(), 15);
        assert_eq!(Comm::from_bytes(b"\xff\x1b").as_str(), "\u{fffd}\u{1b}");
    }
}

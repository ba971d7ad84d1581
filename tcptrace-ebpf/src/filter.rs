//! The family, port and namespace filters, applied in the kernel so that
//! a busy host's other connections cost a few loads each and never reach
//! the rings. Shared by the state programs, the socket callback (which
//! follows only the sockets these keep) and accept().
use aya_ebpf::{macros::map, maps::Array};
use tcptrace_common::{AF_INET, AF_INET6, FAMILY_V4, FAMILY_V6, PORT_ANY, PORT_LOCAL, PORT_REMOTE};

use crate::{
    config::config,
    kernel::{Kernel, Probed},
};

#[map]
static PORTS: Array<u8> = Array::with_max_entries(65536, 0);

/// The socket's network namespace if the family, port and namespace
/// filters keep it.
#[inline(always)]
pub(crate) fn kept<K: Kernel>(sk: K) -> Option<u32> {
    let family: u16 = sk.at(config!(sock.family));
    let sport = u16::from_be(sk.at(config!(sock.sport)));
    let dport = u16::from_be(sk.at(config!(sock.dport)));
    if !family_and_ports_pass(family, sport, dport) {
        return None;
    }
    netns_of(sk)
}

/// [`kept`] for a socket known only by its address, where each field is a
/// probe: the family and ports in one.
#[inline(always)]
pub(crate) fn kept_probed(sk: Probed) -> Option<u32> {
    let head: u64 = sk.at(config!(task.head));
    let dport = u16::from_be(head as u16);
    let sport = (head >> config!(task.head_num_shift)) as u16;
    let family = (head >> config!(task.head_family_shift)) as u16;
    if !family_and_ports_pass(family, sport, dport) {
        return None;
    }
    netns_of(sk)
}

/// [`kept`] for a time-wait socket (`struct inet_timewait_sock`), whose
/// local port is `skc_num` (the full socket's `inet_sport` is not there).
/// Its namespace is always read: userspace matches it to the connection.
#[inline(always)]
pub(crate) fn kept_timewait<K: Kernel>(tw: K) -> Option<u32> {
    let family: u16 = tw.at(config!(timewait.family));
    let sport: u16 = tw.at(config!(timewait.num));
    let dport = u16::from_be(tw.at(config!(timewait.dport)));
    if !family_and_ports_pass(family, sport, dport) {
        return None;
    }
    namespace_passes(namespace(tw, config!(timewait.net)))
}

#[inline(always)]
fn family_and_ports_pass(family: u16, sport: u16, dport: u16) -> bool {
    let family_bit = match family {
        AF_INET => FAMILY_V4,
        AF_INET6 => FAMILY_V6,
        _ => 0,
    };
    config!(families) & family_bit != 0 && ports_pass(sport, dport)
}

/// The socket's network namespace (inode), if the namespace filter keeps
/// it; 0 without a filter for a probed socket, whose namespace nobody
/// reads.
#[inline(always)]
fn netns_of<K: Kernel>(sk: K) -> Option<u32> {
    let netns_only = config!(netns_only);
    if netns_only == 0 && !K::TYPED {
        return Some(0);
    }
    namespace_passes(namespace(sk, config!(sock.net)))
}

/// The inode of the namespace of a socket whose `struct net *` is at `net`.
#[inline(always)]
fn namespace<K: Kernel>(sk: K, net: u32) -> u32 {
    let net = sk.follow(net);
    if net.is_null() {
        0
    } else {
        net.at(config!(sock.inum))
    }
}

#[inline(always)]
fn namespace_passes(netns: u32) -> Option<u32> {
    let netns_only = config!(netns_only);
    if netns_only != 0 && netns != netns_only {
        return None;
    }
    Some(netns)
}

#[inline(always)]
fn ports_pass(sport: u16, dport: u16) -> bool {
    let wanted = config!(port_filters) as u8;
    if wanted == 0 {
        return true;
    }
    let local = PORTS.get(u32::from(sport)).copied().unwrap_or(0);
    let remote = PORTS.get(u32::from(dport)).copied().unwrap_or(0);
    (wanted & PORT_ANY == 0 || (local | remote) & PORT_ANY != 0)
        && (wanted & PORT_LOCAL == 0 || local & PORT_LOCAL != 0)
        && (wanted & PORT_REMOTE == 0 || remote & PORT_REMOTE != 0)
}

//! A small client of the kernel's sock_diag netlink interface (what `ss`
//! uses), for TCP sockets, and the `ss -p` way of finding a socket's owner.
//!
//! Two uses: a snapshot of the sockets that exist when tcptrace starts, and
//! following connections in the kernel's time-wait table (`FIN_WAIT2` and
//! `TIME_WAIT` substates of time-wait sockets) cheaply even when the host
//! holds 100k of them. The second is why the port filter runs *in the
//! kernel* (inet_diag bytecode): sockets that do not match are never copied
//! to user space.
//!
//! # Why hand-written
//!
//! The request is one fixed 56-byte struct plus, optionally, one attribute;
//! the only reply we read is one fixed 72-byte struct per socket (its
//! attributes are skipped). The rust-netlink crates
//! (netlink-packet-sock-diag, netlink-sys, netlink-packet-core) would not
//! make that clearly simpler: their `InetRequest` has no way to carry the
//! `INET_DIAG_REQ_BYTECODE` attribute, so the request would still be
//! assembled by hand, and they bring four crates for what is ~100 lines of
//! byte layout. So: `libc` for the socket, byte offsets from
//! `include/uapi/linux/inet_diag.h` for the rest, and no `unsafe` outside
//! the few system calls.
//!
//! # Kernel ABI used
//!
//! - Request: `nlmsghdr` (type `SOCK_DIAG_BY_FAMILY`, flags
//!   `NLM_F_REQUEST | NLM_F_DUMP`) + `inet_diag_req_v2` + optional
//!   `INET_DIAG_REQ_BYTECODE` attribute. One request per address family:
//!   the kernel keeps only sockets of the family asked for, and a dual-stack
//!   socket talking IPv4 is an `AF_INET6` socket.
//! - Reply: a multi-part stream of `inet_diag_msg`, ended by `NLMSG_DONE`
//!   (or `NLMSG_ERROR`).
//! - Time-wait sockets come with `idiag_timer == 3`, `idiag_state` = their
//!   substate (`FIN_WAIT2` or `TIME_WAIT`), uid and inode 0, and
//!   `idiag_expires` = the time-wait timer's remaining milliseconds.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

use tcptrace_core::model::Family;
use tcptrace_core::model::State;

/// One socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// The socket's family: a dual-stack socket is `V6` even when its
    /// addresses are IPv4 (shown as such, like the rest of tcptrace).
    pub family: Family,
    /// Kernel numbering; for time-wait sockets, their substate
    /// (`FIN_WAIT2` or `TIME_WAIT`).
    pub state: State,
    pub local: SocketAddr,
    /// `0.0.0.0:0` or `[::]:0` for listeners.
    pub remote: SocketAddr,
    /// Socket inode, as in `/proc/PID/fd/N -> socket:[INODE]`; 0 for
    /// sockets no process holds (time-wait, orphans, request sockets).
    pub inode: u32,
    /// Owner's uid (0 for time-wait and request sockets).
    pub uid: u32,
    /// The kernel's socket cookie: unique for the boot, unlike addresses.
    pub cookie: u64,
    /// Milliseconds until the socket's pending timer fires, 0 when none;
    /// for time-wait sockets, the remaining time-wait time.
    pub expires_ms: u32,
    /// A time-wait socket (the kernel's `inet_timewait_sock`, reported with
    /// `idiag_timer == 3`), as opposed to a full socket in the same state.
    pub timewait: bool,
}

/// What to dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// Bit mask `1 << state`, e.g. `1 << 6 | 1 << 5` for `TIME_WAIT` and
    /// `FIN_WAIT2`. Asking for `SYN_RECV` also gets request sockets. 0: none.
    pub states: u32,
    /// Empty: any port. Else only sockets whose local *or* remote port is in
    /// the list, filtered in the kernel (like `ss '( sport = :X or dport =
    /// :X )'`). At most [`MAX_PORTS`].
    pub ports: Vec<u16>,
}

impl Query {
    /// Every TCP state, `ESTABLISHED` (1) to `CLOSING` (11); request
    /// sockets come with `SYN_RECV`. Not the pseudo-state 13 that kernels
    /// since 6.7 offer for sockets that are only bound (`ss state
    /// bound-inactive`): asking for it makes the kernel also walk its bind
    /// table, which doubled the cost of a dump among 100k time-wait sockets.
    pub const ALL_STATES: u32 = (1 << 12) - 2;

    /// The `states` mask for these states.
    pub fn mask(states: &[State]) -> u32 {
        states
            .iter()
            .filter(|s| s.0 < 32)
            .fold(0, |m, s| m | 1 << s.0)
    }
}

/// The most ports a [`Query`] can filter on: the bytecode's jump offsets and
/// the attribute's length are 16-bit.
pub const MAX_PORTS: usize = 2_700;

/// Dumps TCP sockets (IPv4 and IPv6) of the network namespace the calling
/// thread is in. Needs no privileges (CAP_NET_ADMIN only adds attributes we
/// do not read).
///
/// Cost: whatever the filter, the kernel walks its host-wide established
/// hash table (time-wait sockets included) once per family, skipping other
/// namespaces' sockets; the filter saves the copying and parsing of the
/// sockets that do not match. Measured on 2 vCPUs, kernel 6.18: ~0.35 ms
/// on an idle host; among 100k non-matching time-wait sockets ~8-13 ms with
/// a port filter vs ~30 ms without (which returns all 100k). All of it is
/// system time on the calling thread.
pub fn dump(q: &Query) -> Result<Vec<DiagSocket>> {
    Dumper::here()?.dump(q)
}

/// A sock_diag socket bound for life to the network namespace it was opened
/// in: opened while tcptrace still has its privileges, it keeps dumping that
/// namespace after they are dropped (setns would need CAP_SYS_ADMIN again).
pub struct Dumper {
    sock: NetlinkSocket,
    seq: u32,
}

impl Dumper {
    /// In the calling thread's network namespace.
    pub fn here() -> Result<Dumper> {
        Ok(Dumper {
            sock: NetlinkSocket::open()?,
            seq: 0,
        })
    }

    /// In the network namespace at `netns_path` (needs CAP_SYS_ADMIN now,
    /// nothing later).
    pub fn in_netns(netns_path: &Path) -> Result<Dumper> {
        in_netns(netns_path, Dumper::here)?
    }

    pub fn dump(&mut self, q: &Query) -> Result<Vec<DiagSocket>> {
        let mut out = Vec::new();
        if q.states == 0 {
            return Ok(out);
        }
        let bytecode = port_filter(&q.ports)?;
        for family in [libc::AF_INET, libc::AF_INET6] {
            self.seq = self.seq.wrapping_add(1).max(1);
            let req = request(family as u8, q.states, bytecode.as_deref(), self.seq);
            self.sock
                .send(&req)
                .context("sock_diag: sending the dump request")?;
            self.sock
                .receive_dump(self.seq, &mut out)
                .with_context(|| {
                    format!("sock_diag: dumping {} TCP sockets", family_name(family))
                })?;
        }
        Ok(out)
    }
}

/// Same as [`dump`], inside the network namespace at `netns_path` (e.g.
/// `/run/netns/NAME` or `/proc/PID/ns/net`). The work is done on a
/// short-lived thread that joins the namespace, so the rest of the process
/// stays where it is. Needs CAP_SYS_ADMIN (setns).
pub fn dump_in(netns_path: &Path, q: &Query) -> Result<Vec<DiagSocket>> {
    in_netns(netns_path, || dump(q))?
}

/// Runs `f` on a new thread that has joined the network namespace at
/// `path` (`setns(CLONE_NEWNET)` changes only the calling thread). Sockets
/// created by `f` belong to that namespace for their whole life, whichever
/// thread uses them later. A panic in `f` is passed on.
fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let ns = fs::File::open(path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            // SAFETY: plain system call on a descriptor we own; it affects
            // only this thread, which ends when `f` returns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("setns({}, CLONE_NEWNET)", path.display()));
            }
            Ok(f())
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Holders of socket inodes, found the way `ss -p` does: every
/// `/proc/PID/fd/N` that links to `socket:[INODE]`. Each holder is a thread
/// group id (as numbered in the pid namespace of our `/proc`) and its
/// `comm`; a socket shared by several processes (a listener inherited by
/// workers) has them all, lowest pid first. Inodes not found (no process
/// holds them, or they are in processes we may not look into) are absent.
/// Processes that exit during the scan are skipped.
pub fn owners(inodes: &HashSet<u32>) -> HashMap<u32, Vec<(u32, String)>> {
    let mut found = HashMap::new();
    if inodes.is_empty() {
        return found;
    }
    let Ok(proc) = fs::read_dir("/proc") else {
        return found;
    };
    // /proc lists thread group leaders only, which is what we want.
    let mut pids: Vec<u32> = proc
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        // Gone already, or not ours to read: either way, next.
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        // Read once, on the first match: most processes hold none of ours.
        let mut comm: Option<Option<String>> = None;
        for fd in fds {
            let Ok(fd) = fd else {
                break; // the process exited while we read its table
            };
            let Ok(target) = fs::read_link(fd.path()) else {
                continue; // that descriptor was closed meanwhile
            };
            let Some(inode) = socket_inode(target.as_os_str().as_bytes()) else {
                continue;
            };
            if !inodes.contains(&inode) {
                continue;
            }
            match comm.get_or_insert_with(|| read_comm(pid)) {
                Some(comm) => {
                    let holders: &mut Vec<(u32, String)> = found.entry(inode).or_default();
                    // Two descriptors of one process name it once.
                    if holders.last().is_none_or(|(last, _)| *last != pid) {
                        holders.push((pid, comm.clone()));
                    }
                }
                None => break, // exited: what it held is not its any more
            }
        }
    }
    found
}

/// `socket:[12345]` -> 12345.
fn socket_inode(link: &[u8]) -> Option<u32> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// A process's `comm` (chosen by the process: not trusted to be UTF-8).
pub(crate) fn read_comm(pid: u32) -> Option<String> {
    let bytes = fs::read(format!("/proc/{pid}/comm")).ok()?;
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    Some(String::from_utf8_lossy(bytes).into_owned())
}

fn family_name(family: libc::c_int) -> &'static str {
    if family == libc::AF_INET {
        Family::V4.name()
    } else {
        Family::V6.name()
    }
}

// ---------------------------------------------------------------------------
// Kernel ABI numbers not in libc (include/uapi/linux/sock_diag.h,
// inet_diag.h) and the sizes of the structures we read and write.

/// `SOCK_DIAG_BY_FAMILY`: request and reply message type.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// Request attribute carrying the filter program.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// Bytecode operations (`enum` in inet_diag.h).
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_S_EQ: u8 = 11;
const INET_DIAG_BC_D_EQ: u8 = 12;
/// `idiag_timer` of a time-wait socket.
const TIMER_TIMEWAIT: u8 = 3;

const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_req_v2`.
const REQ_V2_LEN: usize = 56;
/// `struct inet_diag_msg`.
const DIAG_MSG_LEN: usize = 72;
const NLA_HDRLEN: usize = 4;
/// `struct inet_diag_bc_op`: `u8 code; u8 yes; u16 no;` (host order).
const BC_OP_LEN: usize = 4;
/// A port comparison: the op, then a second op whose `no` holds the port.
const BC_PORT_LEN: usize = 2 * BC_OP_LEN;

/// Bigger than any message of a dump: the kernel builds them at most 32 KiB.
const RECV_BUF: usize = 64 * 1024;
/// How long one receive may wait for the kernel before the dump gives up.
const RECV_TIMEOUT_S: u8 = 10;

// ---------------------------------------------------------------------------
// The port filter.

/// The inet_diag program keeping sockets whose source or destination port
/// is one of `ports`, or `None` for no filter.
///
/// The kernel's interpreter (`inet_diag_bc_run`) walks the program with a
/// byte offset: each op jumps `yes` bytes forward if its condition holds,
/// `no` bytes if not (`JMP`'s condition never holds). The socket is kept if
/// the walk lands exactly on the end, dropped if it jumps past it. The
/// verifier (`inet_diag_bc_audit`) wants every `no` target to be reachable
/// by `yes` jumps from the start, and `no` <= remaining length + 4.
///
/// For conditions `c1 .. cn` (`sport == p`, `dport == p` for each port):
///
/// ```text
/// c1: {S_EQ, yes 8, no 12} {0, 0, p1}   hold: on to j1; else: skip j1 to c2
/// j1: {JMP,  yes 4, no <to end>}        reached only if c1 held: keep
/// c2: {D_EQ, yes 8, no 12} {0, 0, p1}
/// j2: ...
/// cn: {D_EQ, yes 8, no 12} {0, 0, pk}   hold: end (keep); else: end + 4 (drop)
/// ```
fn port_filter(ports: &[u16]) -> Result<Option<Vec<u8>>> {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() {
        return Ok(None);
    }
    if ports.len() > MAX_PORTS {
        bail!(
            "{} ports to filter on: at most {MAX_PORTS} fit in one sock_diag filter",
            ports.len()
        );
    }
    let conditions = 2 * ports.len();
    let len = conditions * (BC_PORT_LEN + BC_OP_LEN) - BC_OP_LEN;
    let mut bc = Vec::with_capacity(len);
    let op = |bc: &mut Vec<u8>, code: u8, yes: u8, no: usize| {
        bc.push(code);
        bc.push(yes);
        // Fits: len (< MAX_PORTS * 24) is below 65536.
        bc.extend_from_slice(&(no as u16).to_ne_bytes());
    };
    for (i, (code, port)) in ports
        .iter()
        .flat_map(|&p| [(INET_DIAG_BC_S_EQ, p), (INET_DIAG_BC_D_EQ, p)])
        .enumerate()
    {
        op(&mut bc, code, BC_PORT_LEN as u8, BC_PORT_LEN + BC_OP_LEN);
        op(&mut bc, 0, 0, usize::from(port));
        if i + 1 < conditions {
            let to_end = len - bc.len();
            op(&mut bc, INET_DIAG_BC_JMP, BC_OP_LEN as u8, to_end);
        }
    }
    debug_assert_eq!(bc.len(), len);
    Ok(Some(bc))
}

// ---------------------------------------------------------------------------
// The request.

/// `nlmsghdr` + `inet_diag_req_v2` + the bytecode attribute if any.
fn request(family: u8, states: u32, bytecode: Option<&[u8]>, seq: u32) -> Vec<u8> {
    let attr_len = bytecode.map_or(0, |bc| NLA_HDRLEN + bc.len());
    let total = NLMSG_HDRLEN + REQ_V2_LEN + attr_len;
    let mut m = Vec::with_capacity(total);
    // nlmsghdr
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    // inet_diag_req_v2: family, protocol, extensions (none), pad, states,
    // then the socket id (ports, addresses, interface, cookie), all zero:
    // a dump matches on them only when set.
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.resize(NLMSG_HDRLEN + REQ_V2_LEN, 0);
    if let Some(bc) = bytecode {
        m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        m.extend_from_slice(bc); // a multiple of 4 long: no padding needed
    }
    debug_assert_eq!(m.len(), total);
    m
}

// ---------------------------------------------------------------------------
// The socket.

struct NetlinkSocket(OwnedFd);

impl NetlinkSocket {
    /// A sock_diag socket of the calling thread's network namespace.
    fn open() -> Result<NetlinkSocket> {
        // SAFETY: plain system call; the descriptor is owned right below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("opening a sock_diag netlink socket");
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let sock = NetlinkSocket(unsafe { OwnedFd::from_raw_fd(fd) });
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT_S.into(),
            tv_usec: 0,
        };
        // SAFETY: the option value is a valid timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("setting SO_RCVTIMEO");
        }
        Ok(sock)
    }

    /// Sends to the kernel (an unconnected netlink socket's default peer).
    fn send(&self, msg: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: the buffer is valid for its length.
            let n = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
            match n {
                n if n >= 0 && n as usize == msg.len() => return Ok(()),
                n if n >= 0 => return Err(io::Error::other("short send to netlink")),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Reads the replies to request `seq` until `NLMSG_DONE`.
    fn receive_dump(&self, seq: u32, out: &mut Vec<DiagSocket>) -> Result<()> {
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            // MSG_TRUNC: the datagram's real length, to notice a cut one.
            // SAFETY: the buffer is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        bail!("no answer from the kernel within {RECV_TIMEOUT_S} s")
                    }
                    _ => return Err(e).context("receiving from netlink"),
                }
            }
            let n = n as usize;
            if n > buf.len() {
                bail!("netlink message of {n} bytes cut to {}", buf.len());
            }
            if parse_datagram(&buf[..n], seq, out)? == Progress::Done {
                return Ok(());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Parsing replies. Everything is bounds-checked: a short or odd message is
// an error (or skipped), never a panic.

#[derive(Debug, PartialEq, Eq)]
enum Progress {
    More,
    Done,
}

/// One datagram: any number of netlink messages, each 4-byte aligned.
fn parse_datagram(mut data: &[u8], seq: u32, out: &mut Vec<DiagSocket>) -> Result<Progress> {
    while !data.is_empty() {
        let Some(hdr) = data.get(..NLMSG_HDRLEN) else {
            bail!("netlink: {} stray bytes after the last message", data.len());
        };
        let len = ne_u32(hdr, 0) as usize;
        let kind = ne_u16(hdr, 4);
        let msg_seq = ne_u32(hdr, 8);
        if len < NLMSG_HDRLEN || len > data.len() {
            bail!(
                "netlink: message claims {len} bytes, {} available",
                data.len()
            );
        }
        let payload = &data[NLMSG_HDRLEN..len];
        data = data.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        if msg_seq != seq {
            continue; // not an answer to this request
        }
        match kind {
            k if k == libc::NLMSG_DONE as u16 => {
                // The payload is the dump's final status.
                match payload.get(..4).map(|b| ne_u32(b, 0) as i32) {
                    Some(err) if err < 0 => {
                        return Err(io::Error::from_raw_os_error(err.saturating_neg()))
                            .context("the dump ended with an error");
                    }
                    _ => return Ok(Progress::Done),
                }
            }
            k if k == libc::NLMSG_ERROR as u16 => {
                let Some(err) = payload.get(..4).map(|b| ne_u32(b, 0) as i32) else {
                    bail!("netlink: error message of {} bytes", payload.len());
                };
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(err.saturating_neg()))
                        .context("the kernel refused the request");
                }
                // 0 is an acknowledgement: nothing to do.
            }
            k if k == libc::NLMSG_OVERRUN as u16 => bail!("netlink: overrun, data lost"),
            SOCK_DIAG_BY_FAMILY => {
                if let Some(s) = parse_diag_msg(payload)? {
                    out.push(s);
                }
            }
            _ => {} // NLMSG_NOOP and anything new
        }
    }
    Ok(Progress::More)
}

/// An `inet_diag_msg` (its attributes, after it, are ignored). `None` for a
/// family other than IPv4/IPv6, which a TCP dump does not send.
fn parse_diag_msg(payload: &[u8]) -> Result<Option<DiagSocket>> {
    let Some(m) = payload.get(..DIAG_MSG_LEN) else {
        bail!(
            "sock_diag: reply of {} bytes, an inet_diag_msg is {DIAG_MSG_LEN}",
            payload.len()
        );
    };
    let family = match libc::c_int::from(m[0]) {
        libc::AF_INET => Family::V4,
        libc::AF_INET6 => Family::V6,
        _ => return Ok(None),
    };
    // inet_diag_sockid at offset 4: ports (big-endian), addresses (network
    // order, IPv4 in the first 4 bytes), interface, cookie (two host u32).
    let port = |at: usize| u16::from_be_bytes([m[at], m[at + 1]]);
    let addr = |at: usize| -> IpAddr {
        let mut b = [0u8; 16];
        b.copy_from_slice(&m[at..at + 16]);
        match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(b)).to_canonical(),
        }
    };
    Ok(Some(DiagSocket {
        family,
        state: State(m[1]),
        local: SocketAddr::new(addr(8), port(4)),
        remote: SocketAddr::new(addr(24), port(6)),
        cookie: u64::from(ne_u32(m, 44)) | u64::from(ne_u32(m, 48)) << 32,
        expires_ms: ne_u32(m, 52),
        uid: ne_u32(m, 64),
        inode: ne_u32(m, 68),
        timewait: m[2] == TIMER_TIMEWAIT,
    }))
}

/// Host-order u32 at `at`; callers have checked the length.
fn ne_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn ne_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    // --- bytecode -------------------------------------------------------

    #[test]
    fn no_ports_no_filter() {
        assert_eq!(port_filter(&[]).unwrap(), None);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn filter_bytes_for_one_port_match_the_kernel_layout() {
        // inet_diag_bc_op = { u8 code, u8 yes, u16 no }, no in host order.
        #[rustfmt::skip]
        let want: &[u8] = &[
            // 0: sport == 80? yes: +8 (to the jump), no: +12 (past it)
            11, 8, 12, 0,   0, 0, 80, 0,
            // 8: jump to the end (keep): +12
            1, 4, 12, 0,
            // 12: dport == 80? yes: +8 = end (keep), no: +12 = end + 4 (drop)
            12, 8, 12, 0,   0, 0, 80, 0,
        ];
        assert_eq!(port_filter(&[80]).unwrap().unwrap(), want);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn filter_bytes_for_two_ports_sorted_and_deduplicated() {
        #[rustfmt::skip]
        let want: &[u8] = &[
            11, 8, 12, 0,   0, 0, 0x16, 0,      // sport == 22
            1, 4, 36, 0,                        // jump +36 = end (44)
            12, 8, 12, 0,   0, 0, 0x16, 0,      // dport == 22
            1, 4, 24, 0,                        // jump +24 = end
            11, 8, 12, 0,   0, 0, 0xbb, 0x01,   // sport == 443
            1, 4, 12, 0,                        // jump +12 = end
            12, 8, 12, 0,   0, 0, 0xbb, 0x01,   // dport == 443
        ];
        assert_eq!(port_filter(&[443, 22, 443]).unwrap().unwrap(), want);
    }

    /// The kernel's interpreter, as `inet_diag_bc_run` behaves, for the ops
    /// we emit: true if the walk lands exactly on the end.
    fn kernel_run(bc: &[u8], sport: u16, dport: u16) -> bool {
        let mut at = 0usize;
        while at < bc.len() {
            let (code, yes, no) = (bc[at], bc[at + 1], ne_u16(bc, at + 2));
            let hold = match code {
                INET_DIAG_BC_JMP => false,
                INET_DIAG_BC_S_EQ => sport == ne_u16(bc, at + 6),
                INET_DIAG_BC_D_EQ => dport == ne_u16(bc, at + 6),
                other => panic!("unexpected op {other}"),
            };
            at += if hold {
                usize::from(yes)
            } else {
                usize::from(no)
            };
        }
        at == bc.len()
    }

    /// The checks of `inet_diag_bc_audit` that apply to our ops.
    fn kernel_audit(bc: &[u8]) -> bool {
        // Offsets reachable from the start by `yes` jumps.
        let mut on_yes_path = HashSet::new();
        let mut at = 0usize;
        while at < bc.len() {
            on_yes_path.insert(at);
            at += usize::from(bc[at + 1]);
        }
        on_yes_path.insert(at);
        let mut at = 0usize;
        while at < bc.len() {
            let len = bc.len() - at;
            let (code, yes, no) = (
                bc[at],
                usize::from(bc[at + 1]),
                usize::from(ne_u16(bc, at + 2)),
            );
            let min = if code == INET_DIAG_BC_JMP { 4 } else { 8 };
            if code != INET_DIAG_BC_JMP && len < 8 {
                return false;
            }
            if no < min || no > len + 4 || no % 4 != 0 {
                return false;
            }
            if no < len && !on_yes_path.contains(&(at + no)) {
                return false;
            }
            if yes < min || yes > len + 4 || yes % 4 != 0 {
                return false;
            }
            at += yes;
        }
        at == bc.len()
    }

    #[test]
    fn filter_keeps_exactly_the_sockets_on_a_listed_port() {
        for ports in [vec![80], vec![22, 80, 443], (1..=50).collect(), vec![0]] {
            let bc = port_filter(&ports).unwrap().unwrap();
            assert!(kernel_audit(&bc), "{ports:?}");
            for sport in [0, 1, 22, 50, 51, 80, 443, 8080] {
                for dport in [0, 1, 22, 50, 51, 80, 443, 8080] {
                    let want = ports.contains(&sport) || ports.contains(&dport);
                    assert_eq!(
                        kernel_run(&bc, sport, dport),
                        want,
                        "{ports:?} {sport} {dport}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_largest_filter_fits_and_one_more_port_is_refused() {
        let ports: Vec<u16> = (1..=MAX_PORTS as u16).collect();
        let bc = port_filter(&ports).unwrap().unwrap();
        assert!(NLA_HDRLEN + bc.len() <= usize::from(u16::MAX));
        assert!(kernel_audit(&bc));
        assert!(kernel_run(&bc, 9999, MAX_PORTS as u16));
        assert!(!kernel_run(&bc, 9999, MAX_PORTS as u16 + 1));
        let too_many: Vec<u16> = (1..=MAX_PORTS as u16 + 1).collect();
        assert!(port_filter(&too_many).is_err());
    }

    #[test]
    fn request_layout() {
        let bc = port_filter(&[80]).unwrap().unwrap();
        let m = request(libc::AF_INET6 as u8, 1 << 6, Some(&bc), 7);
        assert_eq!(m.len(), 16 + 56 + 4 + 20);
        assert_eq!(ne_u32(&m, 0) as usize, m.len());
        assert_eq!(ne_u16(&m, 4), SOCK_DIAG_BY_FAMILY);
        assert_eq!(ne_u16(&m, 6), 0x301); // NLM_F_REQUEST | NLM_F_DUMP
        assert_eq!(ne_u32(&m, 8), 7);
        assert_eq!(&m[16..20], &[10, 6, 0, 0]);
        assert_eq!(ne_u32(&m, 20), 1 << 6);
        assert!(m[24..72].iter().all(|&b| b == 0));
        assert_eq!(
            (ne_u16(&m, 72), ne_u16(&m, 74)),
            (24, INET_DIAG_REQ_BYTECODE)
        );
        assert_eq!(&m[76..], &bc[..]);
        assert_eq!(request(2, 1, None, 1).len(), 72);
    }

    // --- reply parsing --------------------------------------------------

    fn nlmsg(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    fn diag_msg(family: u8, state: u8, timer: u8, src: &[u8], sport: u16) -> Vec<u8> {
        let mut m = vec![0u8; DIAG_MSG_LEN];
        m[0] = family;
        m[1] = state;
        m[2] = timer;
        m[4..6].copy_from_slice(&sport.to_be_bytes());
        m[6..8].copy_from_slice(&443u16.to_be_bytes());
        m[8..8 + src.len()].copy_from_slice(src);
        m[24..28].copy_from_slice(&[10, 0, 0, 9]);
        m[44..48].copy_from_slice(&0x89ab_cdefu32.to_ne_bytes());
        m[48..52].copy_from_slice(&0x0123_4567u32.to_ne_bytes());
        m[52..56].copy_from_slice(&59_000u32.to_ne_bytes());
        m[64..68].copy_from_slice(&1000u32.to_ne_bytes());
        m[68..72].copy_from_slice(&4242u32.to_ne_bytes());
        // an attribute after the struct (INET_DIAG_SHUTDOWN), to be skipped
        m.extend_from_slice(&[5, 0, 8, 0, 0, 0, 0, 0]);
        m
    }

    #[test]
    fn parses_a_multipart_dump_and_stops_at_done() {
        let mut dgram = nlmsg(20, 1, &diag_msg(2, 1, 0, &[127, 0, 0, 1], 5000));
        let mapped = "::ffff:192.0.2.7".parse::<Ipv6Addr>().unwrap().octets();
        dgram.extend(nlmsg(20, 1, &diag_msg(10, 6, 3, &mapped, 5001)));
        dgram.extend(nlmsg(20, 99, &diag_msg(2, 1, 0, &[1, 1, 1, 1], 1))); // other seq
        let mut out = Vec::new();
        assert_eq!(parse_datagram(&dgram, 1, &mut out).unwrap(), Progress::More);
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0],
            DiagSocket {
                family: Family::V4,
                state: State::ESTABLISHED,
                local: "127.0.0.1:5000".parse().unwrap(),
                remote: "10.0.0.9:443".parse().unwrap(),
                inode: 4242,
                uid: 1000,
                cookie: 0x0123_4567_89ab_cdef,
                expires_ms: 59_000,
                timewait: false,
            }
        );
        assert_eq!(out[1].family, Family::V6);
        assert_eq!(out[1].state, State::TIME_WAIT);
        assert_eq!(out[1].local, "192.0.2.7:5001".parse().unwrap());
        assert!(out[1].timewait);

        let done = nlmsg(3, 1, &0i32.to_ne_bytes());
        assert_eq!(parse_datagram(&done, 1, &mut out).unwrap(), Progress::Done);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn errors_are_reported() {
        let mut out = Vec::new();
        let mut err = (-libc::EINVAL).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0; 16]); // the request's header, echoed
        let e = parse_datagram(&nlmsg(2, 1, &err), 1, &mut out).unwrap_err();
        assert_eq!(
            e.downcast_ref::<io::Error>()
                .and_then(io::Error::raw_os_error),
            Some(libc::EINVAL),
            "{e:#}"
        );
        // An acknowledgement (error 0) is not an error.
        let ack = nlmsg(2, 1, &[0; 20]);
        assert_eq!(parse_datagram(&ack, 1, &mut out).unwrap(), Progress::More);
        // A dump that ends with a negative status.
        let done = nlmsg(3, 1, &(-libc::EINTR).to_ne_bytes());
        assert!(parse_datagram(&done, 1, &mut out).is_err());
    }

    #[test]
    fn short_and_odd_messages_are_errors_not_panics() {
        let mut out = Vec::new();
        let whole = nlmsg(20, 1, &diag_msg(2, 1, 0, &[127, 0, 0, 1], 1));
        // Every truncation of a valid datagram.
        for cut in 1..whole.len() {
            assert!(
                parse_datagram(&whole[..cut], 1, &mut out).is_err(),
                "cut at {cut}"
            );
        }
        // A length below the header's, or beyond the datagram.
        let mut bad = whole.clone();
        bad[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(parse_datagram(&bad, 1, &mut out).is_err());
        bad[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_datagram(&bad, 1, &mut out).is_err());
        // A reply too short for an inet_diag_msg; an error without its code.
        assert!(parse_datagram(&nlmsg(20, 1, &[2; 40]), 1, &mut out).is_err());
        assert!(parse_datagram(&nlmsg(2, 1, &[]), 1, &mut out).is_err());
        // A done without a status; an unknown family (skipped); noop.
        assert_eq!(
            parse_datagram(&nlmsg(3, 1, &[]), 1, &mut out).unwrap(),
            Progress::Done
        );
        let unknown = nlmsg(20, 1, &diag_msg(44, 1, 0, &[], 1));
        assert_eq!(
            parse_datagram(&unknown, 1, &mut out).unwrap(),
            Progress::More
        );
        assert_eq!(
            parse_datagram(&nlmsg(1, 1, &[]), 1, &mut out).unwrap(),
            Progress::More
        );
        assert_eq!(parse_datagram(&[], 1, &mut out).unwrap(), Progress::More);
        assert!(out.is_empty());
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_inode(b"socket:[]"), None);
        assert_eq!(socket_inode(b"socket:[+1]"), None);
        assert_eq!(socket_inode(b"socket:[99999999999]"), None);
        assert_eq!(socket_inode(b"pipe:[12345]"), None);
        assert_eq!(socket_inode(b"/dev/null"), None);
    }

    #[test]
    fn state_masks() {
        assert_eq!(
            Query::mask(&[State::TIME_WAIT, State::FIN_WAIT2]),
            1 << 6 | 1 << 5
        );
        assert_eq!(Query::mask(&[State(40)]), 0);
    }

    // --- against the kernel (root, fresh network namespaces) -------------

    /// A fresh network namespace with loopback up, deleted on drop (also
    /// when the test fails).
    struct Netns {
        name: String,
        path: PathBuf,
    }

    fn ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("running ip");
        assert!(status.success(), "ip {args:?}: {status}");
    }

    impl Netns {
        fn new(tag: &str) -> Netns {
            static N: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "tcptrace-sd-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            ip(&["netns", "add", &name]);
            let ns = Netns {
                path: PathBuf::from("/run/netns").join(&name),
                name,
            };
            ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
            ns
        }

        /// Runs `f` on a thread inside the namespace.
        fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            in_netns(&self.path, f).unwrap()
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    fn inode_of(fd: &impl AsRawFd) -> u32 {
        let meta = fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        meta.ino() as u32
    }

    #[test]
    fn dump_in_a_namespace_filters_by_port_in_the_kernel() {
        let ns = Netns::new("dump");
        let (listener, other, client, server, v6) = ns.run(|| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let other = TcpListener::bind("127.0.0.1:0").unwrap();
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            // IPv6: a dual-stack listener, reached over IPv4 (addresses
            // come back IPv4-mapped and are shown as IPv4).
            let v6 = TcpListener::bind("[::]:0").unwrap();
            (listener, other, client, server, v6)
        });
        let port = listener.local_addr().unwrap().port();
        let (c, s) = (client.local_addr().unwrap(), server.local_addr().unwrap());
        let q = |ports: Vec<u16>| Query {
            states: Query::ALL_STATES,
            ports,
        };

        let got = dump_in(&ns.path, &q(vec![port])).unwrap();
        let mut summary: Vec<_> = got.iter().map(|d| (d.state, d.local, d.remote)).collect();
        summary.sort();
        let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let mut want = vec![
            (State::LISTEN, listener.local_addr().unwrap(), any),
            (State::ESTABLISHED, c, s),
            (State::ESTABLISHED, s, c),
        ];
        want.sort();
        assert_eq!(summary, want, "{got:#?}");
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        for d in &got {
            assert_eq!(d.family, Family::V4);
            assert_eq!(d.uid, uid);
            assert_ne!(d.cookie, 0);
            assert!(!d.timewait);
        }
        let inode = |state: State, local: SocketAddr| {
            let d = got.iter().find(|d| (d.state, d.local) == (state, local));
            d.unwrap().inode
        };
        let l = listener.local_addr().unwrap();
        assert_eq!(inode(State::LISTEN, l), inode_of(&listener));
        assert_eq!(inode(State::ESTABLISHED, c), inode_of(&client));
        assert_eq!(inode(State::ESTABLISHED, s), inode_of(&server));
        let cookies: HashSet<u64> = got.iter().map(|d| d.cookie).collect();
        assert_eq!(cookies.len(), 3);

        // A port nobody uses: nothing, though the namespace has sockets.
        // Below the ephemeral range all these ports come from: nobody's.
        let unused = 9;
        assert_eq!(dump_in(&ns.path, &q(vec![unused])).unwrap(), vec![]);
        // Two ports: both listeners' worth.
        let two = dump_in(&ns.path, &q(vec![port, other.local_addr().unwrap().port()])).unwrap();
        assert_eq!(two.len(), 4);
        // No filter: everything, including the IPv6 listener.
        let all = dump_in(&ns.path, &q(vec![])).unwrap();
        assert_eq!(all.len(), 5, "{all:#?}");
        let v6d = all.iter().find(|d| d.family == Family::V6).unwrap();
        assert_eq!(v6d.local, v6.local_addr().unwrap());
        assert_eq!(v6d.state, State::LISTEN);
        // The largest filter passes the kernel's verifier and still works.
        let mut many: Vec<u16> = (1..MAX_PORTS as u16).collect();
        many.push(port);
        assert_eq!(dump_in(&ns.path, &q(many)).unwrap().len(), 3);
        // Only some states.
        let est = dump_in(
            &ns.path,
            &Query {
                states: Query::mask(&[State::ESTABLISHED]),
                ports: vec![port],
            },
        )
        .unwrap();
        assert_eq!(est.len(), 2);

        // A dual-stack socket talking IPv4 is reported as IPv6 with IPv4
        // addresses.
        let (v4c, v6s) = ns.run(|| {
            let port = v6.local_addr().unwrap().port();
            let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            (c, v6.accept().unwrap().0)
        });
        let v6port = v6.local_addr().unwrap().port();
        let got = dump_in(&ns.path, &q(vec![v6port])).unwrap();
        let accepted = got.iter().find(|d| d.inode == inode_of(&v6s)).unwrap();
        assert_eq!(accepted.family, Family::V6);
        assert_eq!(
            accepted.local,
            format!("127.0.0.1:{v6port}").parse().unwrap()
        );
        assert_eq!(accepted.remote, v4c.local_addr().unwrap());

        // The calling thread's own namespace is not the test namespace.
        let here = dump(&q(vec![port])).unwrap();
        assert!(here.iter().all(|d| !cookies.contains(&d.cookie)));
        drop((client, server, other));
    }

    #[test]
    fn time_wait_sockets_are_seen_with_their_timer() {
        let ns = Netns::new("tw");
        let (listener, client, mut server) = ns.run(|| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            (l, c, s)
        });
        let port = listener.local_addr().unwrap().port();
        let client_addr = client.local_addr().unwrap();
        drop(client); // the client closes first: it is the one to wait
        assert_eq!(server.read(&mut [0u8; 1]).unwrap(), 0, "EOF");
        drop(server);

        let q = Query {
            states: Query::mask(&[State::TIME_WAIT, State::FIN_WAIT2]),
            ports: vec![port],
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        let tw = loop {
            let got = dump_in(&ns.path, &q).unwrap();
            // Nothing else: the listener and the server side are in
            // states not asked for (or gone).
            assert!(got.len() <= 1, "{got:#?}");
            match got.into_iter().next() {
                Some(d) if d.state == State::TIME_WAIT => break d,
                other if Instant::now() > deadline => panic!("no TIME_WAIT socket: {other:?}"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        assert_eq!(tw.local, client_addr);
        assert_eq!(tw.remote, listener.local_addr().unwrap());
        assert!(tw.timewait);
        assert_eq!((tw.inode, tw.uid), (0, 0));
        assert!(
            tw.expires_ms > 0 && tw.expires_ms <= 60_000,
            "{}",
            tw.expires_ms
        );
        assert_ne!(tw.cookie, 0);
    }

    #[test]
    fn owners_finds_this_process() {
        let ns = Netns::new("own");
        let listener = ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
        let inode = inode_of(&listener);
        let got = dump_in(
            &ns.path,
            &Query {
                states: Query::ALL_STATES,
                ports: vec![listener.local_addr().unwrap().port()],
            },
        )
        .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].inode, inode);

        let owners = owners(&HashSet::from([inode, 1])); // 1: no such socket
        let comm = read_comm(std::process::id()).unwrap();
        assert_eq!(
            owners,
            HashMap::from([(inode, vec![(std::process::id(), comm.clone())])])
        );
        assert!(super::owners(&HashSet::new()).is_empty());

        // A child that inherits the descriptor holds it too, as ss -p says.
        use std::os::unix::process::CommandExt;
        let fd = listener.as_raw_fd();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("5");
        // SAFETY: fcntl on a descriptor we own, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::fcntl(fd, libc::F_SETFD, 0);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let both = super::owners(&HashSet::from([inode]));
        let _ = child.kill();
        let _ = child.wait();
        let mut want = vec![
            (std::process::id(), comm),
            (child.id(), "sleep".to_string()),
        ];
        want.sort();
        assert_eq!(both, HashMap::from([(inode, want)]));
    }

    // --- cost with many time-wait sockets (not run by default) ----------

    /// CPU time (user + system) of the calling thread, to the nanosecond.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime fills the struct it is given.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// Median wall and CPU time of `runs` calls of `f`, and its last result.
    fn measure<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, Duration, T) {
        let mut wall = Vec::new();
        let mut cpu = Vec::new();
        let mut last = None;
        for _ in 0..runs {
            let (w, c) = (Instant::now(), thread_cpu());
            last = Some(f());
            cpu.push(thread_cpu() - c);
            wall.push(w.elapsed());
        }
        wall.sort();
        cpu.sort();
        (wall[runs / 2], cpu[runs / 2], last.unwrap())
    }

    /// Client-closes-first connections to `listener` from 127.0.0.1 to
    /// 127.0.0.N (N = 1..=64, so ports do not run out): each leaves one
    /// client-side time-wait socket. Stops at `n` or at `deadline`.
    fn make_time_wait(listener: &TcpListener, n: usize, deadline: Instant) -> usize {
        let port = listener.local_addr().unwrap().port();
        for i in 0..n {
            if i % 1024 == 0 && Instant::now() > deadline {
                return i;
            }
            let dst = Ipv4Addr::new(127, 0, 0, 1 + (i % 64) as u8);
            let c = TcpStream::connect((dst, port)).unwrap();
            let (s, _) = listener.accept().unwrap();
            drop(c);
            drop(s);
        }
        n
    }

    /// `cargo test -p tcptrace --release sockdiag::tests::bench -- --ignored
    /// --nocapture` (TCPTRACE_BENCH_TW: how many non-matching time-wait
    /// sockets, 100000 by default). Prints median wall and CPU time of one
    /// dump with ~100 matching time-wait sockets alone, then with the many
    /// non-matching ones added.
    #[test]
    #[ignore = "benchmark: makes ~100k time-wait sockets for a minute"]
    fn bench_dump_among_many_time_wait_sockets() {
        let many: usize = std::env::var("TCPTRACE_BENCH_TW")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let ns = Netns::new("bench");
        let deadline = Instant::now() + Duration::from_secs(40);
        let (hit, miss, n_hit) = ns.run(|| {
            let hit = TcpListener::bind("0.0.0.0:0").unwrap();
            let miss = TcpListener::bind("0.0.0.0:0").unwrap();
            let n_hit = make_time_wait(&hit, 100, deadline);
            (hit, miss, n_hit)
        });
        let port = hit.local_addr().unwrap().port();
        let tw = Query::mask(&[State::TIME_WAIT, State::FIN_WAIT2]);
        let queries = [
            ("port filter", tw, vec![port]),
            ("no filter", tw, vec![]),
            ("port filter, all states", Query::ALL_STATES, vec![port]),
            ("port filter, mask u32::MAX", u32::MAX, vec![port]),
        ]
        .map(|(name, states, ports)| (name, Query { states, ports }));
        let runs = 9;
        let report = |label: &str| {
            println!("{label}: median of {runs} dumps");
            let in_ns = ns.run(|| {
                queries
                    .clone()
                    .map(|(name, q)| (name, measure(runs, || dump(&q).unwrap().len())))
            });
            // From the host namespace: the kernel walks the same global
            // hash table and skips the other namespace's sockets.
            let host = measure(runs, || dump(&queries[0].1).unwrap().len());
            let lines = in_ns
                .into_iter()
                .chain([("port filter, from host netns", host)]);
            for (name, (wall, cpu, got)) in lines {
                println!("  {name:<29} {got:>7} sockets  wall {wall:>9.2?}  cpu {cpu:>9.2?}");
            }
            let ss = measure(3, || {
                Command::new("ip")
                    .args(["netns", "exec", &ns.name, "ss", "-tanH"])
                    .args(["state", "time-wait", "state", "fin-wait-2"])
                    .arg(format!("( sport = :{port} or dport = :{port} )"))
                    .output()
                    .unwrap()
                    .stdout
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .count()
            });
            println!(
                "  {:<29} {:>7} sockets  wall {:>9.2?}  (whole `ip netns exec ss` run)",
                "ss, port filter", ss.2, ss.0
            );
        };

        report(&format!("{n_hit} matching time-wait sockets"));
        let made = Instant::now();
        let n_miss = ns.run(|| make_time_wait(&miss, many, deadline));
        let made = made.elapsed();
        println!("made {n_miss} other connections (client closes first) in {made:.1?}");
        report(&format!(
            "{n_hit} matching + {n_miss} other time-wait sockets"
        ));
    }

    #[test]
    fn a_missing_namespace_is_an_error() {
        let e = dump_in(
            Path::new("/run/netns/tcptrace-no-such-ns"),
            &Query {
                states: Query::ALL_STATES,
                ports: vec![],
            },
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("tcptrace-no-such-ns"), "{e:#}");
    }
}

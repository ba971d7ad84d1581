//! What the eBPF program and userspace agree on: the event it emits, the
//! configuration it is loaded with, and the names of the maps between them.
//!
//! This crate is built twice: for the BPF target (by `tcptrace/build.rs`,
//! through aya-build) and for the host as a library of userspace, with the
//! `user` feature, which only adds the `aya::Pod` impls.
#![no_std]

/// One `inet_sock_set_state` transition of a TCP socket, or (by `kind`) a
/// reset sent or received on a socket.
///
/// Addresses are in network byte order; an IPv4 address is in the first four
/// bytes. Ports are in host byte order (the tracepoint already converts them).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC, nanoseconds.
    pub ts_ns: u64,
    /// The kernel's `struct sock *`. Userspace groups events by it and never
    /// shows it unless asked.
    pub skaddr: u64,
    /// Thread group id of the task the kernel ran in. Only meaningful for
    /// transitions made in process context (see `attribute` in userspace).
    pub pid: u32,
    /// Inode of the socket's network namespace (as `ls -l /proc/PID/ns/net`
    /// shows it); 0 when the kernel's BTF did not say where to find it.
    pub netns: u32,
    pub oldstate: u8,
    pub newstate: u8,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// `comm` of the task the kernel ran in, NUL padded.
    pub comm: [u8; 16],
    /// [`KIND_STATE`], [`KIND_RESET_SENT`] or [`KIND_RESET_RECEIVED`]. A
    /// reset event carries only `ts_ns`, `skaddr` and `reset_reason`.
    pub kind: u8,
    /// `enum sk_rst_reason` of a reset sent (names in the format file).
    pub reset_reason: u8,
    /// Explicit, so that the whole struct is written and no kernel stack
    /// bytes travel through the ring as padding.
    pub _pad: [u8; 6],
}

pub const KIND_STATE: u8 = 0;
pub const KIND_RESET_SENT: u8 = 1;
pub const KIND_RESET_RECEIVED: u8 = 2;

/// Where the reset tracepoints (`tcp:tcp_send_reset`,
/// `tcp:tcp_receive_reset`) keep the fields we read. `record_len` 0 means
/// the tracepoint is absent and the program does nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetLayout {
    pub record_len: u32,
    pub skaddr: u32,
    pub reason: u32,
    /// 0 when the tracepoint has no reason (before 6.10, and for receive).
    pub reason_size: u32,
}

/// Where each field sits in the tracepoint's record, as its format file says.
///
/// Offsets are in bytes from the start of the record. Userspace checks every
/// offset against [`RECORD_MAX`] before loading, so the program can trust it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Bytes to copy out of the record: the end of its last field we read.
    pub record_len: u32,
    pub skaddr: u32,
    pub oldstate: u32,
    pub newstate: u32,
    pub sport: u32,
    pub dport: u32,
    pub family: u32,
    pub protocol: u32,
    /// 1 on kernels before 5.6, 2 since.
    pub protocol_size: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub saddr_v6: u32,
    pub daddr_v6: u32,
}

/// The program's load-time configuration (a read-only global, so the
/// verifier sees its values as constants).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    pub layout: Layout,
    /// Bit set of the families to keep: [`FAMILY_V4`], [`FAMILY_V6`].
    pub families: u32,
    /// Bit set of the port filters in force: [`PORT_ANY`], [`PORT_LOCAL`],
    /// [`PORT_REMOTE`]. The same bits mark each port in the [`PORTS_MAP`].
    pub port_filters: u32,
    pub reset_sent: ResetLayout,
    pub reset_received: ResetLayout,
    pub netns: NetnsLayout,
}

/// How to read a socket's network namespace inode: `*(u64 *)(sk + sk_net)`
/// is its `struct net *`, and `*(u32 *)(net + inum)` the inode. Offsets come
/// from the kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsLayout {
    /// 0: not known, do not read.
    pub enabled: u32,
    pub sk_net: u32,
    pub inum: u32,
    /// Keep only this namespace (0: all).
    pub only: u32,
}

/// The largest record the program copies; the tracepoint's is 72 bytes today.
pub const RECORD_MAX: usize = 128;

pub const FAMILY_V4: u32 = 1;
pub const FAMILY_V6: u32 = 2;

/// `--port`: the local or the remote port is marked.
pub const PORT_ANY: u8 = 1;
/// `--lport`: the local port is marked.
pub const PORT_LOCAL: u8 = 2;
/// `--rport`: the remote port is marked.
pub const PORT_REMOTE: u8 = 4;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Name of the global holding [`Config`].
pub const CONFIG_GLOBAL: &str = "CONFIG";
/// Ring buffers of [`Event`]s, one per CPU modulo [`RINGS`]: `EVENTS_0`,
/// `EVENTS_1`, ... A single ring shared by all CPUs made every reserve
/// contend for its lock and producer position.
pub const EVENTS_MAPS: [&str; RINGS] = [
    "EVENTS_0", "EVENTS_1", "EVENTS_2", "EVENTS_3", "EVENTS_4", "EVENTS_5", "EVENTS_6", "EVENTS_7",
];
pub const RINGS: usize = 8;
/// Array of 65536 `u8`: the port filter bits of each port.
pub const PORTS_MAP: &str = "PORTS";
/// Per-CPU array of `u64` counters, indexed by the `COUNTER_*` constants.
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Events dropped because the ring buffer was full.
pub const COUNTER_LOST: u32 = 0;
/// Events the program filtered out (other protocol, family or port).
pub const COUNTER_FILTERED: u32 = 1;
pub const COUNTERS_LEN: u32 = 2;
/// Names of the programs in the object file.
pub const PROGRAM: &str = "inet_sock_set_state";
pub const PROGRAM_RESET_SENT: &str = "tcp_send_reset";
pub const PROGRAM_RESET_RECEIVED: &str = "tcp_receive_reset";

/// All rings together: half a second of 500k events/s at 96 bytes (event
/// and ring header) is 24 MB. Userspace shares it out among the rings the
/// machine's CPUs use (the kernel wants a power of two for each) and shrinks
/// the others to [`RING_UNUSED_BYTES`].
pub const RING_BYTES: u32 = 32 << 20;
/// The smallest ring the kernel accepts (one page); the object declares
/// every ring this small, so that a ring userspace does not size costs
/// nothing.
pub const RING_UNUSED_BYTES: u32 = 4096;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain old data, `repr(C)`, every bit pattern valid.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
}

//! What the eBPF program and userspace agree on: the event it emits, the
//! configuration it is loaded with, and the names of the maps between them.
//!
//! This crate is built twice: for the BPF target (as a dependency of
//! tcptrace-ebpf, which `tcptrace/build.rs` builds through aya-build) and
//! for the host, where tcptrace-core decodes with it and the binary loads
//! with it; the binary turns on the `user` feature, which only adds the
//! `aya::Pod` impls.
#![no_std]

/// One `inet_sock_set_state` transition of a TCP socket, or (by `kind`) a
/// reset or a change of who holds a socket.
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
    /// cgroup v2 id of the task, where `pid` is set: the inode of its
    /// directory under the cgroup2 mount.
    pub cgroup: u64,
    /// Thread group id of the task the kernel ran in, for the transitions
    /// [`in_owner_context`] names and the process events; 0 for the others.
    pub pid: u32,
    /// Inode of the socket's network namespace (as `ls -l /proc/PID/ns/net`
    /// shows it); 0 when the kernel's BTF did not say where to find it.
    pub netns: u32,
    /// [`KIND_FORK`]: the new process's thread group id.
    pub child: u32,
    pub oldstate: u8,
    pub newstate: u8,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The process's name (its thread group leader's `comm`), NUL padded;
    /// set where `pid` is.
    pub comm: [u8; 16],
    /// The calling thread's `comm`, where `pid` is set.
    pub thread: [u8; 16],
    /// One of the `KIND_*` constants. A reset event carries only `ts_ns`,
    /// `skaddr` and `reset_reason`.
    pub kind: u8,
    /// `enum sk_rst_reason` of a reset sent (names in the format file).
    pub reset_reason: u8,
    /// Explicit, so that the whole struct is written and no kernel stack
    /// bytes travel through the ring as padding.
    pub _pad: [u8; 2],
}

impl Event {
    /// An event of `kind` about the socket `skaddr` (0: none) at `ts_ns`,
    /// with every other field zero: what each kind carries is filled in by
    /// the program that emits it, and nothing else travels.
    pub const fn new(kind: u8, ts_ns: u64, skaddr: u64) -> Event {
        Event {
            ts_ns,
            skaddr,
            cgroup: 0,
            pid: 0,
            netns: 0,
            child: 0,
            oldstate: 0,
            newstate: 0,
            family: 0,
            sport: 0,
            dport: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            comm: [0; 16],
            thread: [0; 16],
            kind,
            reset_reason: 0,
            _pad: [0; 2],
        }
    }
}

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
/// Userspace's `State` (and its one table of names) is built on these.
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
}

/// Transitions the kernel only makes from a system call of the process
/// holding the socket, so the current task is the socket's owner. The
/// program reads pid and comm for these alone (that costs ~20 ns a
/// transition), and userspace learns owners from them.
///
/// Deliberately absent: `* -> CLOSE` from SYN_SENT or ESTABLISHED (an abort
/// from close() with SO_LINGER 0, but just as often a reset arriving in
/// softirq) and everything a packet or timer drives.
pub const fn in_owner_context(old: u8, new: u8) -> bool {
    use tcp_state::*;
    matches!(
        (old, new),
        (CLOSE, SYN_SENT)
            | (CLOSE, LISTEN)
            | (LISTEN, CLOSE)
            | (ESTABLISHED, FIN_WAIT1)
            | (SYN_RECV, FIN_WAIT1)
            | (CLOSE_WAIT, LAST_ACK)
    )
}

pub const KIND_STATE: u8 = 0;
pub const KIND_RESET_SENT: u8 = 1;
pub const KIND_RESET_RECEIVED: u8 = 2;
/// accept() returned the socket `skaddr` to process `pid`.
pub const KIND_ACCEPT: u8 = 3;
/// Process `pid` forked `child`, which holds copies of its descriptors.
pub const KIND_FORK: u8 = 4;
/// Process `pid` closed a descriptor of the socket `skaddr` that was not
/// the last reference to it: someone else still holds it.
pub const KIND_RELEASE: u8 = 5;
/// Process `pid` is exiting (its thread group leader is).
pub const KIND_EXIT: u8 = 6;
/// The kernel made a time-wait socket (`skaddr`) for a connection whose
/// full socket was in `oldstate` (FIN_WAIT2 or CLOSING), which that socket
/// leaves for CLOSE just after; `newstate` is its substate (FIN_WAIT2: an
/// orphan waiting for the peer's FIN; TIME_WAIT). The addresses, ports and
/// namespace are the time-wait socket's, as for a transition.
pub const KIND_TW_MADE: u8 = 7;
/// A time-wait socket (`skaddr`) changed substate (`FIN_WAIT2 ->
/// TIME_WAIT`: the peer's FIN) or ended (`-> CLOSE`: expiry, a new
/// connection taking it over, a reset, its namespace going). Fields as for
/// [`KIND_TW_MADE`].
pub const KIND_TW_CHANGED: u8 = 8;

/// What a reset tracepoint (`tcp:tcp_send_reset`, `tcp:tcp_receive_reset`)
/// passes its tp_btf program: the socket first, always; `tcp_send_reset`'s
/// third argument is the reason from 6.10, which added it to the record
/// too, so the format file in tracefs tells.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetLayout {
    /// Nonzero: the tracepoint is there and understood, and its program is
    /// attached.
    pub present: u32,
    /// Nonzero: argument 2 is the `enum sk_rst_reason`.
    pub reason_arg: u32,
}

/// Where a TCP socket keeps the fields of a transition, in bytes from the
/// start of its `struct tcp_sock`, from the kernel's BTF. The program reads
/// them itself (the tracepoint's own record is not built for a tp_btf
/// program), so this is the kernel's layout, not one compiled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLayout {
    /// `skc_family`: u16.
    pub family: u32,
    /// `inet_sport`: big-endian u16. Not `skc_num`, which is already 0 when
    /// `-> CLOSE` fires; the tracepoint's own record uses this one too.
    pub sport: u32,
    /// `skc_dport`: big-endian u16.
    pub dport: u32,
    /// `inet_saddr`, `skc_daddr`: IPv4, 4 bytes.
    pub saddr: u32,
    pub daddr: u32,
    /// `skc_v6_rcv_saddr`, `skc_v6_daddr`: IPv6, 16 bytes.
    pub saddr_v6: u32,
    pub daddr_v6: u32,
    /// `skc_net.net`: the `struct net *`; `inum` is where that keeps the
    /// namespace's inode (`ns.inum`).
    pub net: u32,
    pub inum: u32,
    /// `bpf_sock_ops_cb_flags` (u8): whether the kernel calls the socket
    /// callback ([`PROGRAM_CALLBACK`]) on this socket's state changes. 0 when
    /// the kernel has none; then the callback is not attached.
    pub ops_flags: u32,
}

/// Where the kernel keeps what tells a process's name and the sockets
/// behind its descriptors, in bytes, from the kernel's BTF (like
/// [`SockLayout`]). The programs that read these run in process context
/// and walk `current->files->fdt->fd[fd]->private_data->sk`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskLayout {
    /// `task_struct.tgid`, `.pid` (i32), `.group_leader` (pointer),
    /// `.comm` (16 bytes), `.files` (pointer).
    pub tgid: u32,
    pub pid: u32,
    pub group_leader: u32,
    pub comm: u32,
    pub files: u32,
    /// `files_struct.fdt` (pointer).
    pub fdt: u32,
    /// `fdtable.max_fds` (u32), `fdtable.fd` (pointer to the array).
    pub max_fds: u32,
    pub fd: u32,
    /// `file.private_data` (the `struct socket *` of a socket), and its
    /// reference count (`f_ref` from 6.13, `f_count` before).
    pub private_data: u32,
    pub f_refs: u32,
    /// The count's value when one reference is left: 0 for `f_ref`
    /// (`file_ref_t` counts from zero), 1 for `f_count`.
    pub f_refs_one: u32,
    /// `socket.sk`, and `sock.sk_socket`, which points back at it.
    pub sk: u32,
    pub sk_socket: u32,
    /// Where `struct sock` keeps `skc_dport`, and how far `skc_num` (the
    /// local port, host order) and `skc_family` lie past it, in bits: the
    /// three are neighbours, read in one probe from a socket known only by
    /// its address.
    pub head: u32,
    pub head_num_shift: u32,
    pub head_family_shift: u32,
    /// Nonzero where the kernel has `bpf_get_current_task_btf` (5.11 on):
    /// the programs then read the current task with plain loads the
    /// verifier checks against BTF, rather than a probe a field (some
    /// 30 ns each, on every close() of the host).
    pub typed: u32,
}

/// Where the kernel keeps the fields of a time-wait socket, in bytes from
/// the start of its `struct inet_timewait_sock` (which begins with a
/// `struct sock_common`, like every socket), from the kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeWaitLayout {
    /// `skc_state` of a full socket (`struct sock` also begins with its
    /// `sock_common`): the state it leaves.
    pub state: u32,
    /// `skc_family` (u16), `skc_num` (local port, host order, u16),
    /// `skc_dport` (big-endian u16).
    pub family: u32,
    pub num: u32,
    pub dport: u32,
    /// `skc_rcv_saddr`, `skc_daddr`: IPv4; `skc_v6_rcv_saddr`,
    /// `skc_v6_daddr`: IPv6.
    pub saddr: u32,
    pub daddr: u32,
    pub saddr_v6: u32,
    pub daddr_v6: u32,
    /// `skc_net.net`: the `struct net *` (its inode where
    /// [`SockLayout::inum`] says).
    pub net: u32,
    /// `tw_substate` (u8).
    pub substate: u32,
}

/// What [`PROGRAM_TASK_FILES`] reads of each descriptor: `file.f_op`,
/// `file.f_inode`, `inode.i_ino`, in bytes, from the kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileLayout {
    pub f_op: u32,
    pub f_inode: u32,
    pub i_ino: u32,
    /// Nonzero where the kernel has `bpf_sock_from_file` (5.11 on), which
    /// tells a socket's file for sure. Before, the program reports every
    /// file whose private data points at a socket pointing back at it,
    /// with its `f_op`, and userspace keeps those whose `f_op` is that of
    /// [`FileLayout::reference_fd`]: `socket_file_ops`, which only sockets have.
    pub sock_from_file: u32,
    /// A socket descriptor of tcptrace's own, kept open while it runs: the
    /// program marks it ([`HeldSocket::reference`]) whatever the filters.
    pub reference_fd: u32,
}

/// One descriptor of a process that refers to a TCP (or other inet) socket
/// the filters keep, as [`PROGRAM_TASK_FILES`] writes it to its reader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldSocket {
    /// The kernel's `struct sock *`, as in [`Event::skaddr`].
    pub skaddr: u64,
    /// The file's `f_op`; see [`FileLayout::sock_from_file`].
    pub f_op: u64,
    /// Thread group id (as the kernel numbers it, like [`Event::pid`]).
    pub tgid: u32,
    /// The socket's inode, as in `/proc/PID/fd/N -> socket:[INODE]`.
    pub inode: u32,
    /// The descriptor's number.
    pub fd: u32,
    /// Nonzero for tcptrace's own [`FileLayout::reference_fd`].
    pub reference: u32,
    /// The process's name (its thread group leader's `comm`).
    pub comm: [u8; 16],
}

/// The program's load-time configuration (a read-only global, so the
/// verifier sees its values as constants).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    pub sock: SockLayout,
    pub task: TaskLayout,
    pub file: FileLayout,
    /// Bit set of the families to keep: [`FAMILY_V4`], [`FAMILY_V6`].
    pub families: u32,
    /// Bit set of the port filters in force: [`PORT_ANY`], [`PORT_LOCAL`],
    /// [`PORT_REMOTE`]. The same bits mark each port in the [`PORTS_MAP`].
    pub port_filters: u32,
    /// Keep only the network namespace with this inode (0: all).
    pub netns_only: u32,
    /// Nonzero when userspace attaches [`PROGRAM_CALLBACK`]: only then may
    /// a transition the callback claims be left to it.
    pub callback: u32,
    pub reset_sent: ResetLayout,
    pub reset_received: ResetLayout,
    pub timewait: TimeWaitLayout,
}

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
/// Transitions [`PROGRAM`] was skipped for and [`PROGRAM_CATCHER`] saw.
pub const COUNTER_CAUGHT: u32 = 2;
/// Transitions [`PROGRAM`] was skipped for that [`PROGRAM_CALLBACK`] had
/// already emitted.
pub const COUNTER_COVERED: u32 = 3;
pub const COUNTERS_LEN: u32 = 4;
/// Names of the programs in the object file.
pub const PROGRAM: &str = "inet_sock_set_state";
/// Attached after [`PROGRAM`], to the same tracepoint: emits the
/// transitions made while [`PROGRAM`] ran on the same CPU, which the
/// kernel does not run it for.
pub const PROGRAM_CATCHER: &str = "catch_nested";
/// A `sock_ops` program on the root cgroup: the kernel calls it from inside
/// every state change of the sockets it asks to follow (all it sees
/// connect or accept), just before the tracepoint. It emits their
/// transitions the task does not make itself, which the kernel sometimes
/// runs the tracepoint's programs for not at all.
pub const PROGRAM_CALLBACK: &str = "socket_callback";
pub const PROGRAM_RESET_SENT: &str = "tcp_send_reset";
pub const PROGRAM_RESET_RECEIVED: &str = "tcp_receive_reset";
/// On `syscalls:sys_exit_accept4` and `sys_exit_accept`: who accepted.
pub const PROGRAM_ACCEPT: &str = "accepted";
/// On `syscalls:sys_enter_close`: a socket's descriptor closed while
/// another reference remains (a fork's parent, an SCM_RIGHTS sender).
pub const PROGRAM_RELEASE: &str = "released";
/// fexit on `inet_accept`: [`PROGRAM_ACCEPT`] where the kernel allows
/// fentry and fexit, which tax only the functions they hook.
pub const PROGRAM_ACCEPT_FEXIT: &str = "accept_returned";
/// fentry on `filp_close`, and fexit on the function close() takes the
/// file out of the table with from 6.6 on: [`PROGRAM_RELEASE`] likewise.
pub const PROGRAM_CLOSE_FENTRY: &str = "file_closing";
pub const PROGRAM_CLOSE_FEXIT: &str = "fd_closed";
/// On `sched_process_fork` and `sched_process_exit` (tp_btf): holders
/// gained and lost without any change of state.
pub const PROGRAM_FORK: &str = "forked";
pub const PROGRAM_EXIT: &str = "exited";
/// fentry on `inet_twsk_hashdance` (`inet_twsk_hashdance_schedule` from
/// 6.12): a time-wait socket made, in the kernel's tables ([`KIND_TW_MADE`]).
pub const PROGRAM_TW_MADE: &str = "time_wait_made";
/// fentry and fexit on `tcp_timewait_state_process`: a segment for a
/// time-wait socket, which the peer's FIN moves from substate FIN_WAIT2
/// to TIME_WAIT ([`KIND_TW_CHANGED`]).
pub const PROGRAM_TW_SEGMENT: &str = "time_wait_segment";
pub const PROGRAM_TW_SEGMENT_DONE: &str = "time_wait_segment_done";
/// fentry on `inet_twsk_kill`: a time-wait socket taken out of the
/// tables, whatever ended it ([`KIND_TW_CHANGED`] to CLOSE).
pub const PROGRAM_TW_KILLED: &str = "time_wait_killed";
/// An `iter/task_file` iterator: every descriptor of every process that
/// refers to a socket the filters keep, as [`HeldSocket`]s. Who holds a
/// socket, found without reading other processes' `/proc/PID/fd`.
pub const PROGRAM_TASK_FILES: &str = "task_sockets";

/// All rings together: half a second of 500k events/s at 120 bytes (event
/// and ring header) is 30 MB. Userspace shares it out among the rings the
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

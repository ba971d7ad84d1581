//! The configuration userspace writes into the object before loading it:
//! the kernel's field offsets (they vary by version and build), the
//! filters and which optional programs run. A read-only global, so the
//! verifier sees each field as a constant and drops the branches a kernel
//! cannot take.
use tcptrace_common::{Config, FileLayout, ResetLayout, SockLayout, TaskLayout, TimeWaitLayout};

#[unsafe(no_mangle)]
pub(crate) static CONFIG: Config = Config {
    sock: SockLayout {
        family: 0,
        sport: 0,
        dport: 0,
        saddr: 0,
        daddr: 0,
        saddr_v6: 0,
        daddr_v6: 0,
        net: 0,
        inum: 0,
        ops_flags: 0,
    },
    task: TaskLayout {
        tgid: 0,
        pid: 0,
        group_leader: 0,
        comm: 0,
        files: 0,
        fdt: 0,
        max_fds: 0,
        fd: 0,
        private_data: 0,
        f_refs: 0,
        f_refs_one: 0,
        sk: 0,
        sk_socket: 0,
        head: 0,
        head_num_shift: 0,
        head_family_shift: 0,
        typed: 0,
    },
    file: FileLayout {
        f_op: 0,
        f_inode: 0,
        i_ino: 0,
        sock_from_file: 0,
        reference_fd: 0,
    },
    families: 0,
    port_filters: 0,
    netns_only: 0,
    callback: 0,
    reset_sent: NO_RESETS,
    reset_received: NO_RESETS,
    timewait: TimeWaitLayout {
        state: 0,
        family: 0,
        num: 0,
        dport: 0,
        saddr: 0,
        daddr: 0,
        saddr_v6: 0,
        daddr_v6: 0,
        net: 0,
        substate: 0,
    },
};

/// A field of the configuration userspace wrote into the object before
/// loading it (`config!(sock.family)`). Volatile, or the compiler would fold
/// in the zeros above; field by field, because a volatile read of the
/// whole struct loads every field of it each time.
macro_rules! config {
    ($($field:tt)+) => {
        unsafe { core::ptr::read_volatile(&raw const $crate::config::CONFIG.$($field)+) }
    };
}
pub(crate) use config;

const NO_RESETS: ResetLayout = ResetLayout {
    present: 0,
    reason_arg: 0,
};

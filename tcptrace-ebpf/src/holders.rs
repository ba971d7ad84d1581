//! Who holds each socket, asked of the kernel instead of `/proc/PID/fd`
//! (which takes CAP_SYS_PTRACE for other users' processes): an
//! `iter/task_file` iterator. Userspace runs it by reading an iterator
//! descriptor; the kernel calls it for every open file of every process
//! and it writes one record per descriptor of a socket the filters keep.
use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid,
    generated::{bpf_seq_write, bpf_sock_from_file},
};
use tcptrace_common::HeldSocket;

use crate::{
    config::config,
    filter::kept_probed,
    kernel::{Direct, Kernel, Probed},
    owners::file_socket,
};

/// The kernel's `struct bpf_iter__task_file`: the iterator's context.
#[repr(C)]
pub struct TaskFile {
    /// `struct bpf_iter_meta *`, whose first member is the `seq_file *`
    /// the records go to.
    meta: *const *mut u8,
    task: *const u8,
    fd: u32,
    _pad: u32,
    file: *const u8,
}

/// aya-ebpf has no macro for iterators: the section names the program's
/// type and what it iterates over.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub extern "C" fn task_sockets(ctx: *const TaskFile) -> i32 {
    // Each field is loaded from the context as the verifier wants it:
    // one aligned load at the member's offset.
    let (meta, task, fd, file) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx).meta),
            core::ptr::read_volatile(&raw const (*ctx).task),
            core::ptr::read_volatile(&raw const (*ctx).fd),
            core::ptr::read_volatile(&raw const (*ctx).file),
        )
    };
    // The last call of a walk has neither.
    if task.is_null() || file.is_null() {
        return 0;
    }
    let (task, file) = (Direct(task), Direct(file));
    let tgid: i32 = task.at(config!(task.tgid));
    let reference = tgid as u32 == (bpf_get_current_pid_tgid() >> 32) as u32
        && fd == config!(file.reference_fd);
    let sk = if config!(file.sock_from_file) != 0 {
        let socket = unsafe { bpf_sock_from_file(file.0 as *mut _) } as *const u8;
        Probed(socket).nonnull().map(|s| s.follow(config!(task.sk)))
    } else {
        file_socket(Probed(file.0))
    };
    let sk = match sk.and_then(|sk| sk.nonnull()) {
        Some(sk) if reference || kept_probed(sk).is_some() => sk,
        _ if reference => Probed(core::ptr::null()),
        _ => return 0,
    };
    // A probe: 5.10's verifier was never shown a typed load spanning
    // elements of `comm`.
    let leader = Probed(task.follow(config!(task.group_leader)).0);
    let comm: [u64; 2] = [
        leader.at(config!(task.comm)),
        leader.at(config!(task.comm) + 8),
    ];
    let record = HeldSocket {
        skaddr: sk.0 as u64,
        f_op: file.at(config!(file.f_op)),
        tgid: tgid as u32,
        inode: file
            .follow(config!(file.f_inode))
            .at::<u64>(config!(file.i_ino)) as u32,
        fd,
        reference: u32::from(reference),
        comm: unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(comm) },
    };
    unsafe {
        bpf_seq_write(
            (*meta).cast(),
            (&raw const record).cast(),
            size_of::<HeldSocket>() as u32,
        );
    }
    0
}

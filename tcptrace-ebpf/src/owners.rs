//! Owners: which process holds a socket. accept() hands a socket to a
//! process, close() of one of several references takes it from one, fork()
//! shares every descriptor, exit() drops them all. The transitions alone
//! name only the task that made them; these events let userspace follow a
//! socket from process to process.
use aya_ebpf::{
    EbpfContext,
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, fentry, fexit, tracepoint},
    programs::{BtfTracePointContext, FEntryContext, FExitContext, TracePointContext},
};
use tcptrace_common::{Event, KIND_ACCEPT, KIND_EXIT, KIND_FORK, KIND_RELEASE};

use crate::{
    config::config,
    emit::emit,
    filter::kept_probed,
    kernel::{Direct, Kernel, Probed, current_task, current_task_btf, current_task_untyped},
};

/// The `struct file` behind descriptor `fd` of the current process.
#[inline(always)]
fn file_of_fd(fd: u64) -> Option<Probed> {
    if config!(task.typed) != 0 {
        file_of(Direct(current_task_btf()), fd)
    } else {
        file_of(Probed(current_task_untyped()), fd)
    }
}

/// `task->files->fdt->fd[fd]`. The array takes a probe either way: the
/// verifier allows typed loads only at constant offsets.
#[inline(always)]
fn file_of<K: Kernel>(task: K, fd: u64) -> Option<Probed> {
    let fdt = task.follow(config!(task.files)).follow(config!(task.fdt));
    if fdt.is_null() || fd >= u64::from(fdt.at::<u32>(config!(task.max_fds))) {
        return None;
    }
    Probed(fdt.at::<u64>(config!(task.fd)) as *const u8)
        .follow(fd as u32 * 8)
        .nonnull()
}

/// The current process's descriptor table (`task->files`), NULL once it
/// has let go of it at exit.
#[inline(always)]
fn current_files() -> u64 {
    if config!(task.typed) != 0 {
        Direct(current_task_btf()).at(config!(task.files))
    } else {
        Probed(current_task_untyped()).at(config!(task.files))
    }
}

/// The `struct sock` of a file if it is a socket's: its `private_data`
/// is a `struct socket` whose sock points back at it. Any other file's
/// private data fails that test.
#[inline(always)]
pub(crate) fn file_socket(file: Probed) -> Option<Probed> {
    let socket = file.follow(config!(task.private_data)).nonnull()?;
    let sk = socket.follow(config!(task.sk)).nonnull()?;
    (sk.at::<u64>(config!(task.sk_socket)) == socket.0 as u64).then_some(sk)
}

/// An event about a socket or a process rather than a transition: the
/// current task's, with only `skaddr` and `kind` besides.
#[inline(always)]
fn task_event(kind: u8, skaddr: u64) -> Event {
    let mut event = Event::new(kind, unsafe { bpf_ktime_get_ns() }, skaddr);
    current_task(&mut event);
    event
}

/// accept() and accept4() returning: the process now holds the socket,
/// from here on its owner (before, it waited in the listener's queue).
/// Attached to both syscalls' exit tracepoints, whose records agree: the
/// return value (the new descriptor) at offset 16.
#[tracepoint]
pub fn accepted(ctx: TracePointContext) -> u32 {
    let fd = unsafe { *(ctx.as_ptr() as *const i64).add(2) };
    if fd >= 0
        && let Some(file) = file_of_fd(fd as u64)
    {
        accept(file_socket(file));
    }
    0
}

/// [`accepted`] where the kernel allows fexit, without taxing every
/// system call: `inet_accept(sock, newsock, ...)` returning, in the
/// accepting task (accept4's own, or io_uring's worker of the same
/// process). Its second argument is the new `struct socket` on 5.10 to
/// 6.12 alike, where `inet_csk_accept`'s return value moves with its
/// argument count; `newsock->sk` stays NULL when accepting failed.
#[fexit]
pub fn accept_returned(ctx: FExitContext) -> i32 {
    let newsock = Probed(ctx.arg::<*const u8>(1));
    accept(newsock.follow(config!(task.sk)).nonnull());
    0
}

#[inline(always)]
fn accept(sk: Option<Probed>) {
    if let Some(sk) = sk
        && kept_probed(sk).is_some()
    {
        emit(task_event(KIND_ACCEPT, sk.0 as u64));
    }
}

/// close() of a socket's descriptor that is not its last reference:
/// nothing changes state, yet this process no longer holds it (a forking
/// server's parent, a sender of SCM_RIGHTS). The last reference's close
/// shows as a transition instead.
#[tracepoint]
pub fn released(ctx: TracePointContext) -> u32 {
    let fd = unsafe { *(ctx.as_ptr() as *const u64).add(2) };
    if let Some(file) = file_of_fd(fd) {
        release(file);
    }
    0
}

/// [`released`] where the kernel allows fentry: `filp_close(file, files)`,
/// which close() goes through before 6.6, and dup2(), close_range() and
/// close-on-exec on every version. An exit closes its files there too,
/// after `task->files` is gone: the exit event already said so.
#[fentry]
pub fn file_closing(ctx: FEntryContext) -> i32 {
    let files: u64 = ctx.arg(1);
    if files != 0 && files == current_files() {
        release(Probed(ctx.arg::<*const u8>(0)));
    }
    0
}

/// close() from 6.6 on, which no longer calls `filp_close`: the file
/// `file_close_fd(fd)` (`close_fd_get_file` in 6.6 and 6.7) took out of
/// the table, its descriptor's reference not yet dropped.
#[fexit]
pub fn fd_closed(ctx: FExitContext) -> i32 {
    if let Some(file) = Probed(ctx.arg::<*const u8>(1)).nonnull() {
        release(file);
    }
    0
}

/// Not filtered: the count, read first, ends almost every run, and
/// userspace knows which sockets it follows.
#[inline(always)]
fn release(file: Probed) {
    let refs: i64 = file.at(config!(task.f_refs));
    if refs <= i64::from(config!(task.f_refs_one)) {
        return;
    }
    if let Some(sk) = file_socket(file) {
        emit(task_event(KIND_RELEASE, sk.0 as u64));
    }
}

/// A new process (not a thread) holds copies of its parent's descriptors.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn forked(ctx: BtfTracePointContext) -> i32 {
    let parent = Direct(ctx.arg(0));
    let child = Direct(ctx.arg(1));
    let (parent_tgid, child_tgid): (i32, i32) =
        (parent.at(config!(task.tgid)), child.at(config!(task.tgid)));
    if parent_tgid != child_tgid {
        let mut event = task_event(KIND_FORK, 0);
        event.child = child_tgid as u32;
        emit(event);
    }
    0
}

/// A process ends: it holds nothing from here on. Its leader's exit
/// stands for it (a leader that exits before its threads is rare).
#[btf_tracepoint(function = "sched_process_exit")]
pub fn exited(ctx: BtfTracePointContext) -> i32 {
    let task = Direct(ctx.arg(0));
    let (pid, tgid): (i32, i32) = (task.at(config!(task.pid)), task.at(config!(task.tgid)));
    if pid == tgid {
        emit(task_event(KIND_EXIT, 0));
    }
    0
}

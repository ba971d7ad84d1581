//! Reading the kernel's objects at the offsets userspace found for this
//! kernel, so one object loads on every version: typed pointers by plain
//! loads the verifier checks against BTF, any other by a probe. And who
//! the current task is, which the state and owner programs both report.
use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    bpf_get_current_task, bpf_probe_read_kernel, generated,
};
use tcptrace_common::Event;

use crate::config::config;

/// Fills in who the current task is: its process (thread group id, the
/// leader's name, cgroup) and the thread's own name.
#[inline(always)]
pub(crate) fn current_task(event: &mut Event) {
    event.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    event.thread = bpf_get_current_comm().unwrap_or_default();
    event.cgroup = unsafe { bpf_get_current_cgroup_id() };
    event.comm = if config!(task.typed) != 0 {
        process_name(Direct(current_task_btf()), event.thread)
    } else {
        process_name(Probed(current_task_untyped()), event.thread)
    };
}

/// The name of `task`'s process: its thread group leader's. Most tasks
/// lead their process, and their own name (`thread`) is the process's.
#[inline(always)]
fn process_name<K: Kernel>(task: K, thread: [u8; 16]) -> [u8; 16] {
    let leader = task.follow(config!(task.group_leader));
    if leader.is_null() || leader.addr() == task.addr() {
        return thread;
    }
    // Word by word: a typed load may span elements of `comm`, not the array.
    let words: [u64; 2] = [
        leader.at(config!(task.comm)),
        leader.at(config!(task.comm) + 8),
    ];
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) }
}

/// The current task as a pointer the verifier knows the type of (5.11 on):
/// its fields are plain loads. Only called where `task.typed` says the
/// helper exists; the configuration is a constant to the verifier, so the
/// other branch is never checked on an older kernel.
#[inline(always)]
pub(crate) fn current_task_btf() -> *const u8 {
    unsafe { generated::bpf_get_current_task_btf() as *const u8 }
}

#[inline(always)]
pub(crate) fn current_task_untyped() -> *const u8 {
    unsafe { bpf_get_current_task() as *const u8 }
}

/// Reads fields of a kernel object at load-time offsets.
pub(crate) trait Kernel: Copy {
    /// Plain loads (cheap) rather than a probe a field.
    const TYPED: bool;
    fn at<T: Copy + Default>(self, offset: u32) -> T;
    /// The object a pointer field points at.
    fn follow(self, offset: u32) -> Self;
    fn is_null(self) -> bool;
    fn addr(self) -> u64;
}

/// A pointer the verifier knows the type of (a tp_btf argument): plain
/// loads, which it checks against the kernel's BTF.
#[derive(Clone, Copy)]
pub(crate) struct Direct(pub(crate) *const u8);

impl Kernel for Direct {
    const TYPED: bool = true;
    #[inline(always)]
    fn at<T: Copy + Default>(self, offset: u32) -> T {
        read(self.0, offset)
    }
    #[inline(always)]
    fn follow(self, offset: u32) -> Direct {
        Direct(read(self.0, offset))
    }
    #[inline(always)]
    fn is_null(self) -> bool {
        self.0.is_null()
    }
    #[inline(always)]
    fn addr(self) -> u64 {
        self.0 as u64
    }
}

/// Any other kernel pointer: each field through `bpf_probe_read_kernel`;
/// a fault reads as zero.
#[derive(Clone, Copy)]
pub(crate) struct Probed(pub(crate) *const u8);

impl Kernel for Probed {
    const TYPED: bool = false;
    #[inline(always)]
    fn at<T: Copy + Default>(self, offset: u32) -> T {
        if self.0.is_null() {
            return T::default();
        }
        unsafe { bpf_probe_read_kernel(self.0.add(offset as usize).cast::<T>()) }
            .unwrap_or_default()
    }
    #[inline(always)]
    fn follow(self, offset: u32) -> Probed {
        Probed(self.at::<u64>(offset) as *const u8)
    }
    #[inline(always)]
    fn is_null(self) -> bool {
        self.0.is_null()
    }
    #[inline(always)]
    fn addr(self) -> u64 {
        self.0 as u64
    }
}

impl Probed {
    #[inline(always)]
    pub(crate) fn nonnull(self) -> Option<Probed> {
        (!self.0.is_null()).then_some(self)
    }
}

/// A field of the socket at the load-time offset `offset`. The offset is a
/// constant to the verifier (read-only global), which checks the access
/// against the kernel's BTF; a fault reads as zero.
#[inline(always)]
pub(crate) fn read<T: Copy>(base: *const u8, offset: u32) -> T {
    unsafe { core::ptr::read_volatile(base.add(offset as usize).cast::<T>()) }
}

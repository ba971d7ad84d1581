//! Capture: copy each TCP `inet_sock_set_state` transition that passes the
//! family and port filters into the ring buffer. Everything else (names,
//! owners, time, output) is userspace's job; this runs for every transition
//! on the host, so it stays short.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{self, bpf_skc_to_tcp_sock},
    },
    macros::{btf_tracepoint, map, sock_ops, tracepoint},
    maps::{Array, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
    programs::{BtfTracePointContext, SockOpsContext, TracePointContext},
};
use aya_log_ebpf::error;
use tcptrace_common::{
    AF_INET, AF_INET6, COUNTER_CAUGHT, COUNTER_COVERED, COUNTER_FILTERED, COUNTER_LOST,
    COUNTERS_LEN, Config, Event, FAMILY_V4, FAMILY_V6, KIND_ACCEPT, KIND_EXIT, KIND_FORK,
    KIND_RELEASE, KIND_RESET_RECEIVED, KIND_RESET_SENT, KIND_STATE, PORT_ANY, PORT_LOCAL,
    PORT_REMOTE, RING_UNUSED_BYTES, RINGS, ResetLayout, SockLayout, TaskLayout, in_owner_context,
};

#[unsafe(no_mangle)]
static CONFIG: Config = Config {
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
    families: 0,
    port_filters: 0,
    netns_only: 0,
    callback: 0,
    reset_sent: NO_RESETS,
    reset_received: NO_RESETS,
};

/// A field of the configuration userspace wrote into the object before
/// loading it (`config!(sock.family)`). Volatile, or the compiler would fold
/// in the zeros above; field by field, because a volatile read of the
/// whole struct loads every field of it each time.
macro_rules! config {
    ($($field:tt)+) => {
        unsafe { core::ptr::read_volatile(&raw const CONFIG.$($field)+) }
    };
}

const NO_RESETS: ResetLayout = ResetLayout {
    present: 0,
    reason_arg: 0,
};

/// Declares the rings (every one a page: userspace sizes the ones in use)
/// and `reserve`, which picks the ring of a CPU. A map is named per arm
/// because the verifier needs a constant map in each helper call.
macro_rules! rings {
    ($($cpu:literal => $name:ident),+) => {
        $(
            #[map]
            static $name: RingBuf = RingBuf::with_byte_size(RING_UNUSED_BYTES, 0);
        )+

        #[inline(always)]
        fn reserve(ring: usize) -> Option<RingBufEntry<Event>> {
            match ring {
                $($cpu => $name.reserve::<Event>(0),)+
                _ => None,
            }
        }
    };
}

rings!(0 => EVENTS_0, 1 => EVENTS_1, 2 => EVENTS_2, 3 => EVENTS_3,
       4 => EVENTS_4, 5 => EVENTS_5, 6 => EVENTS_6, 7 => EVENTS_7);

#[map]
static PORTS: Array<u8> = Array::with_max_entries(65536, 0);

/// Per CPU, the transitions emitted whose tracepoint runs have not all
/// come yet, on two stacks.
///
/// On `handled`, `inet_sock_set_state` pushes each transition it has
/// dealt with, and the catcher pops its own: if it is not there, the main
/// program was skipped. Transitions a softirq makes between the two
/// programs' runs (a busy softirq can make dozens) push and pop in pairs,
/// so they never bury an outer claim. While the catcher runs
/// (`catching`), a nested transition pushes nothing: its own catcher run
/// will be skipped, and a burst of such claims would otherwise overwrite
/// the running catcher's, which then emits its transition a second time.
///
/// On `emitted`, the socket callback pushes each transition it emitted,
/// and whichever tracepoint program deals with it pops it. Apart, because
/// the kernel sometimes runs the callback and not the tracepoint, for
/// hundreds of transitions in a row: their claims are never popped, and on
/// `handled` they would overwrite the claim of the transition those
/// softirqs interrupted.
///
/// A claim left behind is emptied when a pop finds one below it, or
/// overwritten once it is the oldest of the ring.
#[repr(C)]
struct Claims {
    catching: u64,
    /// `inet_sock_set_state` is running (it never runs nested in itself).
    in_main: u64,
    handled: Stack,
    emitted: Stack,
}

#[repr(C)]
struct Stack {
    /// The top: `slots[next % CLAIM_SLOTS]` is the next free slot.
    next: u64,
    slots: [[u64; 2]; CLAIM_SLOTS],
}

const CLAIM_SLOTS: usize = 16;

#[map]
static CLAIMS: PerCpuArray<Claims> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// The transition a run of the programs below was called for.
struct Firing {
    sk: *const c_void,
    oldstate: u8,
    newstate: u8,
}

impl Firing {
    #[inline(always)]
    fn of(ctx: &BtfTracePointContext) -> Firing {
        Firing {
            sk: ctx.arg(0),
            oldstate: ctx.arg::<u32>(1) as u8,
            newstate: ctx.arg::<u32>(2) as u8,
        }
    }

    #[inline(always)]
    fn claim(&self) -> [u64; 2] {
        [
            self.sk as u64,
            u64::from(self.oldstate) << 8 | u64::from(self.newstate),
        ]
    }

    /// The socket as a `struct tcp_sock`; NULL unless a full TCP socket
    /// (not SCTP or an MPTCP parent). The typed pointer lets the program
    /// read past `struct sock` into `inet_sock`, where the source address
    /// and port live.
    #[inline(always)]
    fn tcp_sock(&self) -> *const u8 {
        unsafe { bpf_skc_to_tcp_sock(self.sk as *mut c_void) as *const u8 }
    }

    /// Whether the kernel called the socket callback for this transition,
    /// which then emitted it (unless the task makes it: those it leaves to
    /// the tracepoint, for their pid and comm).
    #[inline(always)]
    fn left_to_callback(&self, tp: *const u8) -> bool {
        config!(callback) != 0
            && !in_owner_context(self.oldstate, self.newstate)
            && read::<u8>(tp, config!(sock.ops_flags)) as u32 & BPF_SOCK_OPS_STATE_CB_FLAG != 0
    }

    /// True if the socket callback emitted this transition; its claim is
    /// popped, so that one emission answers one tracepoint run.
    #[inline(always)]
    fn taken_from_callback(&self, tp: *const u8, claims: *mut Claims) -> bool {
        self.left_to_callback(tp) && unsafe { Stack::pop(&raw mut (*claims).emitted, self.claim()) }
    }
}

/// The kernel runs a tp_btf program at most once per CPU at a time: a
/// transition made by a softirq that interrupts this program (a timer, the
/// loopback's receive path) skips it and counts a recursion miss.
/// `catch_nested`, attached after it, emits exactly those.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let firing = Firing::of(&ctx);
    let Some(claims) = CLAIMS.get_ptr_mut(0) else {
        return 0;
    };
    let in_main = unsafe { &raw mut (*claims).in_main };
    unsafe { in_main.write_volatile(1) };
    let tp = firing.tcp_sock();
    if tp.is_null() {
        count(COUNTER_FILTERED);
    } else if !firing.taken_from_callback(tp, claims) {
        set_state::<true>(&firing, tp);
    }
    // Last, so that a transition nested anywhere before this finds no
    // claim of its own and is emitted by the catcher.
    if unsafe { (&raw const (*claims).catching).read_volatile() } == 0 {
        unsafe { Stack::push(&raw mut (*claims).handled, firing.claim()) };
    }
    unsafe { in_main.write_volatile(0) };
    0
}

/// Runs after `inet_sock_set_state` for every transition. If that program
/// did not claim this very transition it was skipped, nested in its own
/// run on this CPU, and this one emits the transition instead, unless the
/// socket callback did.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn catch_nested(ctx: BtfTracePointContext) -> i32 {
    let firing = Firing::of(&ctx);
    let Some(claims) = CLAIMS.get_ptr_mut(0) else {
        return 0;
    };
    let catching = unsafe { &raw mut (*claims).catching };
    unsafe { catching.write_volatile(1) };
    // Inside the main program's run on this CPU, this transition's own
    // run of it was surely skipped: no need to look for its claim, and a
    // stale claim of the same change at a reused socket address must not
    // pass for it.
    let nested_in_main = unsafe { (&raw const (*claims).in_main).read_volatile() } != 0;
    if nested_in_main || !unsafe { Stack::pop(&raw mut (*claims).handled, firing.claim()) } {
        let tp = firing.tcp_sock();
        if tp.is_null() {
            count(COUNTER_FILTERED);
        } else if firing.taken_from_callback(tp, claims) {
            count(COUNTER_COVERED);
        } else {
            count(COUNTER_CAUGHT);
            set_state::<true>(&firing, tp);
        }
    }
    unsafe { catching.write_volatile(0) };
    0
}

/// Called by the kernel at the start of each state change of a socket it
/// was asked to follow, before the tracepoint, from the same context. The
/// kernel has been seen to run the tracepoint's programs not at all for a
/// burst of softirq transitions (FIN_WAIT1 -> FIN_WAIT2 -> CLOSE) while it
/// still calls this; so this emits the socket's transitions a packet or
/// timer drives, and the tracepoint's programs leave those to it. Sockets
/// are followed from connect() or accept(): the transitions before that
/// stay with the tracepoint alone.
#[sock_ops]
pub fn socket_callback(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // Only for sockets the filters keep: the kernel calls a flagged
            // socket's callback at every change of state (seven or so a
            // connection), which for any other would only drop it.
            if followed(&ctx) {
                // Keeps the flags another program may have asked for.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        BPF_SOCK_OPS_STATE_CB => on_state_change(&ctx),
        _ => {}
    }
    1
}

/// Whether the family, port and namespace filters keep the connection the
/// callback was called for (its ports are set by now: connect chose the
/// local one, and a child has both).
#[inline(always)]
fn followed(ctx: &SockOpsContext) -> bool {
    let sk = callback_sock(ctx);
    if sk.is_null() {
        return false;
    }
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) } as *const u8;
    !tp.is_null() && kept(Direct(tp)).is_some()
}

/// The socket the callback was called for.
#[inline(always)]
fn callback_sock(ctx: &SockOpsContext) -> *const c_void {
    unsafe { (*ctx.ops).__bindgen_anon_2.sk as *const c_void }
}

#[inline(always)]
fn on_state_change(ctx: &SockOpsContext) {
    let firing = Firing {
        sk: callback_sock(ctx),
        oldstate: ctx.arg(0) as u8,
        newstate: ctx.arg(1) as u8,
    };
    if firing.sk.is_null() || in_owner_context(firing.oldstate, firing.newstate) {
        return;
    }
    let tp = firing.tcp_sock();
    if tp.is_null() {
        return;
    }
    // Never the task: sock_ops programs may not ask for it before 6.13 or
    // so, and the callback only emits transitions no task makes.
    set_state::<false>(&firing, tp);
    let Some(claims) = CLAIMS.get_ptr_mut(0) else {
        return;
    };
    unsafe {
        if (&raw const (*claims).in_main).read_volatile() != 0
            && (&raw const (*claims).catching).read_volatile() != 0
        {
            // Nested in the catcher nested in the main program: the kernel
            // will skip both for this transition, and count the main
            // one's skip; this emission answers it.
            count(COUNTER_COVERED);
        } else {
            Stack::push(&raw mut (*claims).emitted, firing.claim());
        }
    }
}

/// A softirq can interrupt these between any two instructions and push
/// and pop claims of its own, so every access is volatile, in the order
/// written: that order is what keeps the stack whole.
impl Stack {
    /// Reserves the top slot, then fills it: interrupted in between, a
    /// nested push lands above the reserved slot and pops back to it.
    /// Filling first would let a nested push overwrite this claim.
    #[inline(always)]
    unsafe fn push(this: *mut Stack, claim: [u64; 2]) {
        unsafe {
            let next = (&raw const (*this).next).read_volatile();
            (&raw mut (*this).next).write_volatile(next.wrapping_add(1));
            let at = next as usize % CLAIM_SLOTS;
            (&raw mut (*this).slots[at][0]).write_volatile(claim[0]);
            (&raw mut (*this).slots[at][1]).write_volatile(claim[1]);
        }
    }

    /// Pops `claim` and whatever stale claims lie above it; false if it is
    /// not on the stack.
    #[inline(always)]
    unsafe fn pop(this: *mut Stack, [sk, states]: [u64; 2]) -> bool {
        let next = unsafe { (&raw const (*this).next).read_volatile() };
        // From the top: nearly always the claim is the one just made.
        let mut depth = 0;
        for back in 1..=CLAIM_SLOTS as u64 {
            let at = next.wrapping_sub(back);
            let slot =
                unsafe { (&raw const (*this).slots[at as usize % CLAIM_SLOTS]).read_volatile() };
            // Field by field: the verifier allows comparing the socket
            // pointer, not arithmetic on it, which comparing arrays becomes.
            if slot[0] == sk && slot[1] == states {
                depth = back;
                break;
            }
        }
        if depth == 0 {
            return false;
        }
        // Empty what is popped before letting go of it: the search runs
        // round the whole ring, and a popped copy of the same change by a
        // later socket at the same address would pass for its claim.
        for back in 1..=CLAIM_SLOTS as u64 {
            if back > depth {
                break;
            }
            let at = next.wrapping_sub(back) as usize % CLAIM_SLOTS;
            // Word by word: the array at once compiles to a call to memset.
            unsafe {
                (&raw mut (*this).slots[at][0]).write_volatile(0);
                (&raw mut (*this).slots[at][1]).write_volatile(0);
            }
        }
        unsafe { (&raw mut (*this).next).write_volatile(next.wrapping_sub(depth)) };
        true
    }
}

/// Emits the transition `f` of the TCP socket `tp` unless a filter drops it.
/// `TASK`: the program may ask who the current task is (not the socket
/// callback: the verifier of older kernels refuses those helpers there,
/// even on a path that never runs).
#[inline(always)]
fn set_state<const TASK: bool>(f: &Firing, tp: *const u8) {
    let sk = Direct(tp);
    let Some(netns) = kept(sk) else {
        count(COUNTER_FILTERED);
        return;
    };
    let family: u16 = sk.at(config!(sock.family));
    let mut saddr = [0u32; 4];
    let mut daddr = [0u32; 4];
    if family == AF_INET {
        saddr[0] = sk.at(config!(sock.saddr));
        daddr[0] = sk.at(config!(sock.daddr));
    } else {
        // Word by word: the verifier allows a load within one member of
        // `in6_addr`, and its widest is a 32-bit word.
        for i in 0..4 {
            saddr[i] = sk.at(config!(sock.saddr_v6) + 4 * i as u32);
            daddr[i] = sk.at(config!(sock.daddr_v6) + 4 * i as u32);
        }
    }
    let mut event = Event {
        netns,
        oldstate: f.oldstate,
        newstate: f.newstate,
        family,
        sport: u16::from_be(sk.at(config!(sock.sport))),
        dport: u16::from_be(sk.at(config!(sock.dport))),
        saddr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(saddr) },
        daddr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(daddr) },
        ..Event::new(KIND_STATE, unsafe { bpf_ktime_get_ns() }, f.sk as u64)
    };
    // Nobody uses the task of the other transitions: it is whoever a
    // packet or timer interrupted.
    if TASK && in_owner_context(f.oldstate, f.newstate) {
        current_task(&mut event);
    }
    emit(event);
}

/// The socket's network namespace if the family, port and namespace
/// filters keep it.
#[inline(always)]
fn kept<K: Kernel>(sk: K) -> Option<u32> {
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
fn kept_probed(sk: Probed) -> Option<u32> {
    let head: u64 = sk.at(config!(task.head));
    let dport = u16::from_be(head as u16);
    let sport = (head >> config!(task.head_num_shift)) as u16;
    let family = (head >> config!(task.head_family_shift)) as u16;
    if !family_and_ports_pass(family, sport, dport) {
        return None;
    }
    netns_of(sk)
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
    let net = sk.follow(config!(sock.net));
    let netns = if net.is_null() {
        0
    } else {
        net.at(config!(sock.inum))
    };
    if netns_only != 0 && netns != netns_only {
        return None;
    }
    Some(netns)
}

/// Fills in who the current task is: its process (thread group id, the
/// leader's name, cgroup) and the thread's own name.
#[inline(always)]
fn current_task(event: &mut Event) {
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
fn current_task_btf() -> *const u8 {
    unsafe { generated::bpf_get_current_task_btf() as *const u8 }
}

#[inline(always)]
fn current_task_untyped() -> *const u8 {
    unsafe { bpf_get_current_task() as *const u8 }
}

/// Reads fields of a kernel object at load-time offsets.
trait Kernel: Copy {
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
struct Direct(*const u8);

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
struct Probed(*const u8);

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

/// The `struct sock` of a file if it is a socket's: its `private_data`
/// is a `struct socket` whose sock points back at it. Any other file's
/// private data fails that test.
#[inline(always)]
fn file_socket(file: Probed) -> Option<Probed> {
    let socket = file.follow(config!(task.private_data)).nonnull()?;
    let sk = socket.follow(config!(task.sk)).nonnull()?;
    (sk.at::<u64>(config!(task.sk_socket)) == socket.0 as u64).then_some(sk)
}

impl Probed {
    #[inline(always)]
    fn nonnull(self) -> Option<Probed> {
        (!self.0.is_null()).then_some(self)
    }
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
    if fd < 0 {
        return 0;
    }
    if let Some(sk) = file_of_fd(fd as u64).and_then(file_socket)
        && kept_probed(sk).is_some()
    {
        emit(task_event(KIND_ACCEPT, sk.0 as u64));
    }
    0
}

/// close() of a socket's descriptor that is not its last reference:
/// nothing changes state, yet this process no longer holds it (a forking
/// server's parent, a sender of SCM_RIGHTS). The last reference's close
/// shows as a transition instead. Not filtered here: the count, read
/// first, ends almost every run, and userspace knows which sockets it
/// follows.
#[tracepoint]
pub fn released(ctx: TracePointContext) -> u32 {
    let fd = unsafe { *(ctx.as_ptr() as *const u64).add(2) };
    let Some(file) = file_of_fd(fd) else {
        return 0;
    };
    let refs: i64 = file.at(config!(task.f_refs));
    if refs <= i64::from(config!(task.f_refs_one)) {
        return 0;
    }
    if let Some(sk) = file_socket(file) {
        emit(task_event(KIND_RELEASE, sk.0 as u64));
    }
    0
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

/// A field of the socket at the load-time offset `offset`. The offset is a
/// constant to the verifier (read-only global), which checks the access
/// against the kernel's BTF; a fault reads as zero.
#[inline(always)]
fn read<T: Copy>(base: *const u8, offset: u32) -> T {
    unsafe { core::ptr::read_volatile(base.add(offset as usize).cast::<T>()) }
}

/// Resets tell userspace how a socket closed: received ones fire before the
/// socket's `-> CLOSE`, sent ones (an abort) just after it. tp_btf like the
/// others: under churn a reset comes with most connections (a full time-wait
/// table answers the peer's FIN with one), and a classic tracepoint would
/// have the kernel build its whole record (addresses and all) first.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    let reason = if config!(reset_sent.reason_arg) != 0 {
        let reason: u32 = ctx.arg(2);
        if reason > 255 {
            // Cold: the kernel's list of reasons outgrew the event's byte.
            error!(&ctx, "reset reason {} does not fit the event", reason);
        }
        reason.min(255) as u8
    } else {
        0
    };
    reset(ctx.arg(0), reason, KIND_RESET_SENT);
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    reset(ctx.arg(0), 0, KIND_RESET_RECEIVED);
    0
}

#[inline(always)]
fn reset(sk: *const c_void, reason: u8, kind: u8) {
    if sk.is_null() {
        // A reset answering a segment no socket owns: no transition to explain.
        return;
    }
    emit(Event {
        reset_reason: reason,
        ..Event::new(kind, unsafe { bpf_ktime_get_ns() }, sk as u64)
    });
}

/// Everything is read before reserving: a reserved entry must be submitted or
/// discarded on every path. No wake-up: the reader polls the ring, which keeps
/// the cost of waking it out of every event.
#[inline(always)]
fn emit(event: Event) {
    // Each CPU writes its own ring (userspace merges them by time): no
    // producer waits for another CPU's reserve.
    let entry = reserve(unsafe { bpf_get_smp_processor_id() } as usize % RINGS);
    match entry {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(BPF_RB_NO_WAKEUP as u64);
        }
        None => count(COUNTER_LOST),
    }
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

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer while we run.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

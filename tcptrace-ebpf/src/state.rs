//! State changes: the `inet_sock_set_state` program and its catcher, and
//! the bookkeeping (claims) by which they and the socket callback emit
//! each transition exactly once. This runs for every transition on the
//! host, so it stays short: the family and port filters, then the
//! socket's addresses into the ring; names, owners and time are
//! userspace's job.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_STATE_CB_FLAG,
    helpers::{bpf_ktime_get_ns, generated::bpf_skc_to_tcp_sock},
    macros::{btf_tracepoint, map},
    maps::PerCpuArray,
    programs::BtfTracePointContext,
};
use tcptrace_common::{
    AF_INET, COUNTER_CAUGHT, COUNTER_COVERED, COUNTER_FILTERED, Event, KIND_STATE, in_owner_context,
};

use crate::{
    config::config,
    emit::{count, emit},
    filter::kept,
    kernel::{Direct, Kernel, current_task, read},
};

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
pub(crate) struct Claims {
    pub(crate) catching: u64,
    /// `inet_sock_set_state` is running (it never runs nested in itself).
    pub(crate) in_main: u64,
    handled: Stack,
    pub(crate) emitted: Stack,
}

#[repr(C)]
pub(crate) struct Stack {
    /// The top: `slots[next % CLAIM_SLOTS]` is the next free slot.
    next: u64,
    slots: [[u64; 2]; CLAIM_SLOTS],
}

const CLAIM_SLOTS: usize = 16;

#[map]
pub(crate) static CLAIMS: PerCpuArray<Claims> = PerCpuArray::with_max_entries(1, 0);

/// The transition a run of the programs below, or of the socket callback,
/// was called for.
pub(crate) struct Firing {
    pub(crate) sk: *const c_void,
    pub(crate) oldstate: u8,
    pub(crate) newstate: u8,
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
    pub(crate) fn claim(&self) -> [u64; 2] {
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
    pub(crate) fn tcp_sock(&self) -> *const u8 {
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

/// A softirq can interrupt these between any two instructions and push
/// and pop claims of its own, so every access is volatile, in the order
/// written: that order is what keeps the stack whole.
impl Stack {
    /// Reserves the top slot, then fills it: interrupted in between, a
    /// nested push lands above the reserved slot and pops back to it.
    /// Filling first would let a nested push overwrite this claim.
    #[inline(always)]
    pub(crate) unsafe fn push(this: *mut Stack, claim: [u64; 2]) {
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
pub(crate) fn set_state<const TASK: bool>(f: &Firing, tp: *const u8) {
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

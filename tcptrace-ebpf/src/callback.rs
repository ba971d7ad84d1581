//! The socket callback: a sock_ops program the kernel calls at each state
//! change of the sockets it is asked to follow, even where it skips the
//! tracepoint's programs. It emits the transitions a packet or timer
//! drives for the sockets the filters keep, and leaves a claim so that
//! the tracepoint's programs do not emit them again.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::generated::bpf_skc_to_tcp_sock,
    macros::sock_ops,
    programs::SockOpsContext,
};
use tcptrace_common::{COUNTER_COVERED, in_owner_context};

use crate::{
    emit::count,
    filter::kept,
    kernel::Direct,
    state::{CLAIMS, Firing, Stack, set_state},
};

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

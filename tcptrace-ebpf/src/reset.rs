//! Resets, as events about a socket rather than a transition: userspace
//! pairs each with the socket's `-> CLOSE` to tell an abort or a refusal
//! from an orderly close. Unfiltered and without addresses: userspace
//! knows which sockets it follows, so each run stays a few instructions.
use core::ffi::c_void;

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use aya_log_ebpf::error;
use tcptrace_common::{Event, KIND_RESET_RECEIVED, KIND_RESET_SENT};

use crate::{config::config, emit::emit};

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

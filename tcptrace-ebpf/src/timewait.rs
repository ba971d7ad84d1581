//! Time-wait from the kernel, where fentry/fexit load: the tracepoint
//! reports a closing connection's full socket `-> CLOSE`, while the
//! connection lives on as a small time-wait socket that no tracepoint
//! follows. These programs report that socket's life as it happens: made
//! (with the substate it really has), its substate changed by the peer's
//! FIN, and its end, whatever caused it. Each is rare next to the state
//! changes (one of each per actively closed connection), and every one is
//! filtered like a transition.
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{fentry, fexit, map},
    maps::PerCpuArray,
    programs::{FEntryContext, FExitContext},
};
use tcptrace_common::{
    AF_INET, COUNTER_FILTERED, Event, KIND_TW_CHANGED, KIND_TW_MADE,
    tcp_state::{CLOSE, FIN_WAIT2, TIME_WAIT},
};

use crate::{
    config::config,
    emit::{count, emit},
    filter::kept_timewait,
    kernel::{Direct, Kernel},
};

/// `inet_twsk_hashdance(tw, sk, hashinfo)` (and from 6.12
/// `inet_twsk_hashdance_schedule(tw, sk, hashinfo, timeo)`): the
/// time-wait socket goes into the tables in place of the full socket,
/// whose state is still the one it leaves. Hooked here rather than at
/// `tcp_time_wait`, which also runs when no time-wait socket could be
/// made (the table is full) and the connection simply ends.
#[fentry]
pub fn time_wait_made(ctx: FEntryContext) -> i32 {
    let tw = Direct(ctx.arg(0));
    let sk = Direct(ctx.arg(1));
    let old: u8 = sk.at(config!(timewait.state));
    let substate: u8 = tw.at(config!(timewait.substate));
    time_wait_event(KIND_TW_MADE, tw, old, substate);
    0
}

/// Per CPU, the time-wait socket in substate FIN_WAIT2 that
/// `tcp_timewait_state_process` is handling a segment of (softirqs do not
/// nest on a CPU), for its fexit to tell whether the segment moved it on.
#[map]
static IN_FIN_WAIT2: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[fentry]
pub fn time_wait_segment(ctx: FEntryContext) -> i32 {
    let tw = Direct(ctx.arg(0));
    let substate: u8 = tw.at(config!(timewait.substate));
    if let Some(slot) = IN_FIN_WAIT2.get_ptr_mut(0) {
        unsafe { *slot = if substate == FIN_WAIT2 { tw.addr() } else { 0 } };
    }
    0
}

/// The peer's FIN reached an orphan waiting in FIN_WAIT2: TIME_WAIT now.
/// The caller still holds the socket, also when the segment ended it.
#[fexit]
pub fn time_wait_segment_done(ctx: FExitContext) -> i32 {
    let tw = Direct(ctx.arg(0));
    let Some(slot) = IN_FIN_WAIT2.get_ptr_mut(0) else {
        return 0;
    };
    let was = unsafe { core::mem::replace(&mut *slot, 0) };
    if was == tw.addr() && tw.at::<u8>(config!(timewait.substate)) == TIME_WAIT {
        time_wait_event(KIND_TW_CHANGED, tw, FIN_WAIT2, TIME_WAIT);
    }
    0
}

/// `inet_twsk_kill(tw)`: taken out of the tables, once per time-wait
/// socket, from its timer (TIME_WAIT's 60 s, or `tcp_fin_timeout` for an
/// orphan still in FIN_WAIT2) or from `inet_twsk_deschedule_put` (a new
/// connection taking the addresses over, a reset, the namespace going).
#[fentry]
pub fn time_wait_killed(ctx: FEntryContext) -> i32 {
    let tw = Direct(ctx.arg(0));
    let substate: u8 = tw.at(config!(timewait.substate));
    time_wait_event(KIND_TW_CHANGED, tw, substate, CLOSE);
    0
}

/// Emits `kind` for the time-wait socket `tw` unless a filter drops it.
#[inline(always)]
fn time_wait_event(kind: u8, tw: Direct, old: u8, new: u8) {
    let Some(netns) = kept_timewait(tw) else {
        count(COUNTER_FILTERED);
        return;
    };
    let family: u16 = tw.at(config!(timewait.family));
    let mut saddr = [0u32; 4];
    let mut daddr = [0u32; 4];
    if family == AF_INET {
        saddr[0] = tw.at(config!(timewait.saddr));
        daddr[0] = tw.at(config!(timewait.daddr));
    } else {
        // Word by word, as for a full socket: the verifier allows a load
        // within one member of `in6_addr`.
        for i in 0..4 {
            saddr[i] = tw.at(config!(timewait.saddr_v6) + 4 * i as u32);
            daddr[i] = tw.at(config!(timewait.daddr_v6) + 4 * i as u32);
        }
    }
    emit(Event {
        netns,
        oldstate: old,
        newstate: new,
        family,
        sport: tw.at(config!(timewait.num)),
        dport: u16::from_be(tw.at(config!(timewait.dport))),
        saddr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(saddr) },
        daddr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(daddr) },
        ..Event::new(kind, unsafe { bpf_ktime_get_ns() }, tw.addr())
    });
}

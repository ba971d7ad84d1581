//! Capture: copy each TCP `inet_sock_set_state` transition that passes the
//! family and port filters into the ring buffer. Everything else (names,
//! owners, time, output) is userspace's job; this runs for every transition
//! on the host, so it stays short.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext, Global,
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
    },
    macros::{map, tracepoint},
    maps::{Array, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
    programs::TracePointContext,
};
use aya_log_ebpf::error;
use tcptrace_ebpf::{
    AF_INET, AF_INET6, COUNTER_FILTERED, COUNTER_LOST, COUNTERS_LEN, Config, Event, FAMILY_V4,
    FAMILY_V6, IPPROTO_TCP, KIND_RESET_RECEIVED, KIND_RESET_SENT, KIND_STATE, Layout, NetnsLayout,
    PORT_ANY, PORT_LOCAL, PORT_REMOTE, RECORD_MAX, RING_UNUSED_BYTES, RINGS, ResetLayout,
};

#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config {
    layout: Layout {
        record_len: 0,
        skaddr: 0,
        oldstate: 0,
        newstate: 0,
        sport: 0,
        dport: 0,
        family: 0,
        protocol: 0,
        protocol_size: 0,
        saddr: 0,
        daddr: 0,
        saddr_v6: 0,
        daddr_v6: 0,
    },
    families: 0,
    port_filters: 0,
    reset_sent: NO_RESETS,
    reset_received: NO_RESETS,
    netns: NetnsLayout {
        enabled: 0,
        sk_net: 0,
        inum: 0,
        only: 0,
    },
});

const NO_RESETS: ResetLayout = ResetLayout {
    record_len: 0,
    skaddr: 0,
    reason: 0,
    reason_size: 0,
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

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if let Err(err) = try_inet_sock_set_state(&ctx) {
        // Cold: only a record the kernel would not let us read gets here.
        error!(&ctx, "cannot read the inet_sock_set_state record: {}", err);
    }
    0
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let cfg = CONFIG.load();
    let l = &cfg.layout;
    let len = l.record_len as usize;
    if len == 0 || len > RECORD_MAX {
        return Err(-22);
    }
    // One read of the whole record: the offsets are load-time values, and the
    // verifier only allows constant offsets into the context itself.
    let mut rec = [0u8; RECORD_MAX];
    unsafe { bpf_probe_read_kernel_buf(ctx.as_ptr() as *const u8, &mut rec[..len]) }
        .map_err(i64::from)?;

    let protocol = if l.protocol_size == 1 {
        u16::from(field::<u8>(&rec, l.protocol))
    } else {
        field::<u16>(&rec, l.protocol)
    };
    let family = field::<u16>(&rec, l.family);
    let family_bit = match family {
        AF_INET => FAMILY_V4,
        AF_INET6 => FAMILY_V6,
        _ => 0,
    };
    let sport = field::<u16>(&rec, l.sport);
    let dport = field::<u16>(&rec, l.dport);
    if protocol != IPPROTO_TCP || cfg.families & family_bit == 0 || !ports_pass(&cfg, sport, dport)
    {
        count(COUNTER_FILTERED);
        return Ok(());
    }
    let skaddr = field::<u64>(&rec, l.skaddr);
    let netns = netns_of(&cfg.netns, skaddr);
    if cfg.netns.only != 0 && netns != cfg.netns.only {
        count(COUNTER_FILTERED);
        return Ok(());
    }

    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if family == AF_INET {
        saddr[..4].copy_from_slice(&field::<[u8; 4]>(&rec, l.saddr));
        daddr[..4].copy_from_slice(&field::<[u8; 4]>(&rec, l.daddr));
    } else {
        saddr = field::<[u8; 16]>(&rec, l.saddr_v6);
        daddr = field::<[u8; 16]>(&rec, l.daddr_v6);
    }
    let event = Event {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        skaddr,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        netns,
        oldstate: field::<u32>(&rec, l.oldstate) as u8,
        newstate: field::<u32>(&rec, l.newstate) as u8,
        family,
        sport,
        dport,
        saddr,
        daddr,
        comm: bpf_get_current_comm().unwrap_or_default(),
        kind: KIND_STATE,
        reset_reason: 0,
        _pad: [0; 6],
    };
    emit(event);
    Ok(())
}

/// Resets tell userspace how a socket closed: received ones fire before the
/// socket's `-> CLOSE`, sent ones (an abort) just after it.
#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let _ = try_reset(&ctx, &CONFIG.load().reset_sent, KIND_RESET_SENT);
    0
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let _ = try_reset(&ctx, &CONFIG.load().reset_received, KIND_RESET_RECEIVED);
    0
}

fn try_reset(ctx: &TracePointContext, l: &ResetLayout, kind: u8) -> Result<(), i64> {
    let len = l.record_len as usize;
    if len == 0 || len > RECORD_MAX {
        return Ok(());
    }
    let mut rec = [0u8; RECORD_MAX];
    unsafe { bpf_probe_read_kernel_buf(ctx.as_ptr() as *const u8, &mut rec[..len]) }
        .map_err(i64::from)?;
    let skaddr = field::<u64>(&rec, l.skaddr);
    if skaddr == 0 {
        // A reset answering a segment no socket owns: no transition to explain.
        return Ok(());
    }
    let reason = if l.reason_size == 4 {
        field::<u32>(&rec, l.reason).min(255) as u8
    } else {
        0
    };
    emit(Event {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        skaddr,
        pid: 0,
        netns: 0,
        oldstate: 0,
        newstate: 0,
        family: 0,
        sport: 0,
        dport: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        comm: [0; 16],
        kind,
        reset_reason: reason,
        _pad: [0; 6],
    });
    Ok(())
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

/// The inode of the socket's network namespace, 0 if it cannot be read.
#[inline(always)]
fn netns_of(l: &NetnsLayout, skaddr: u64) -> u32 {
    if l.enabled == 0 {
        return 0;
    }
    let net: u64 =
        unsafe { bpf_probe_read_kernel((skaddr + u64::from(l.sk_net)) as *const u64) }.unwrap_or(0);
    if net == 0 {
        return 0;
    }
    unsafe { bpf_probe_read_kernel((net + u64::from(l.inum)) as *const u32) }.unwrap_or(0)
}

/// A field of the record at `offset`. Userspace has checked that every
/// offset leaves room for its field; the check here is for the verifier.
#[inline(always)]
fn field<T: Copy + Default>(rec: &[u8; RECORD_MAX], offset: u32) -> T {
    let offset = offset as usize;
    if offset > RECORD_MAX - core::mem::size_of::<T>() {
        return T::default();
    }
    unsafe { core::ptr::read_unaligned(rec.as_ptr().add(offset).cast::<T>()) }
}

#[inline(always)]
fn ports_pass(cfg: &Config, sport: u16, dport: u16) -> bool {
    let wanted = cfg.port_filters as u8;
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

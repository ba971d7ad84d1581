//! The way out to userspace: the per-CPU rings every program emits its
//! events into, and the counters of what the programs filtered, caught or
//! lost, which userspace reads to tell a quiet host from a lossy capture.
use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::bpf_get_smp_processor_id,
    macros::map,
    maps::{PerCpuArray, RingBuf, ring_buf::RingBufEntry},
};
use tcptrace_common::{COUNTER_LOST, COUNTERS_LEN, Event, RING_UNUSED_BYTES, RINGS};

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
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// Everything is read before reserving: a reserved entry must be submitted or
/// discarded on every path. No wake-up: the reader polls the ring, which keeps
/// the cost of waking it out of every event.
#[inline(always)]
pub(crate) fn emit(event: Event) {
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
pub(crate) fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer while we run.
        unsafe { *counter += 1 };
    }
}

//! The kernel's clock (CLOCK_MONOTONIC) and the wall clock.

/// Turns the kernel's CLOCK_MONOTONIC timestamps into wall-clock time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, in nanoseconds.
    pub offset_ns: i64,
    /// Monotonic time tracing started at: zero of `--time relative`.
    pub start_ns: u64,
}

impl Clock {
    /// Samples both clocks now.
    pub fn now() -> Clock {
        let mono1 = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        let mono2 = clock_ns(libc::CLOCK_MONOTONIC);
        let mono = mono1 + (mono2 - mono1) / 2;
        Clock {
            offset_ns: (real - mono) as i64,
            start_ns: mono as u64,
        }
    }

    pub fn wall_ns(&self, mono_ns: u64) -> i64 {
        mono_ns as i64 + self.offset_ns
    }
}

/// CLOCK_MONOTONIC now, the clock of the kernel's timestamps.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and pointer; cannot fail for these clocks.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

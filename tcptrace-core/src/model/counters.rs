//! What the kernel side counts: events lost, filtered, skipped.

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Events the ring had no room for.
    pub lost: u64,
    /// Events the program dropped by protocol, family or port.
    pub filtered: u64,
    /// Runs of the main program the kernel skipped (`recursion_misses`: a
    /// program of the tracer was already running on that CPU) that neither
    /// the catcher nor the socket callback emitted instead.
    pub missed: u64,
    /// Runs of the owner hooks (accept, close, fork, exit) the kernel
    /// skipped: a change of holder tcptrace did not see.
    pub hooks_missed: u64,
}

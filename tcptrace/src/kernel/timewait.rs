//! Time-wait from the kernel: the programs that report a closed
//! connection's time-wait socket as the kernel makes, moves on and ends
//! it (fentry/fexit), where the kernel allows them. Elsewhere the
//! time-wait table is polled (`system::timewait`).

use anyhow::{Result, anyhow};
use aya::Ebpf;
use aya::programs::{FEntry, FExit};
use tcptrace_common::{
    PROGRAM_TW_KILLED, PROGRAM_TW_MADE, PROGRAM_TW_SEGMENT, PROGRAM_TW_SEGMENT_DONE, TimeWaitLayout,
};

use super::btf::Btf;
use super::capture::{program, raw_fd, refusal};

/// How connections are followed once the tracepoint reports their socket
/// closed into time-wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeWaitPath {
    /// fentry/fexit on the kernel's time-wait functions: every change as
    /// it happens, in every namespace.
    Kernel,
    /// The time-wait table read with sock_diag every 250 ms or more.
    Polled,
    Off,
}

impl TimeWaitPath {
    /// Its name in the metrics.
    pub fn name(self) -> &'static str {
        match self {
            TimeWaitPath::Kernel => "kernel",
            TimeWaitPath::Polled => "polled",
            TimeWaitPath::Off => "none",
        }
    }

    /// The line said at start, after the owners line.
    pub fn announcement(self) -> Option<&'static str> {
        match self {
            TimeWaitPath::Kernel => Some("tcptrace: time-wait: from the kernel (fentry)"),
            TimeWaitPath::Polled => Some(
                "tcptrace: time-wait: polled from the time-wait table every 250 ms, in the \
                 namespaces that existed at start",
            ),
            TimeWaitPath::Off => None,
        }
    }
}

/// Where this kernel keeps a time-wait socket's fields; None (logged) if
/// its BTF lacks one, and time-wait is then polled.
pub(super) fn layout(btf: &Btf) -> Option<TimeWaitLayout> {
    let common = |member: &str| {
        let found = btf.member_offset("sock_common", member);
        if found.is_none() {
            log::debug!("time-wait is polled: the kernel's BTF has no sock_common.{member}");
        }
        found
    };
    // Both a full socket and a time-wait socket begin with their
    // sock_common; a layout where they would not is refused here.
    if btf.member_offset("inet_timewait_sock", "__tw_common") != Some(0)
        || btf.member_offset("sock", "__sk_common") != Some(0)
    {
        log::debug!("time-wait is polled: sockets do not begin with their sock_common");
        return None;
    }
    Some(TimeWaitLayout {
        state: common("skc_state")?,
        family: common("skc_family")?,
        num: common("skc_num")?,
        dport: common("skc_dport")?,
        saddr: common("skc_rcv_saddr")?,
        daddr: common("skc_daddr")?,
        saddr_v6: common("skc_v6_rcv_saddr")?,
        daddr_v6: common("skc_v6_daddr")?,
        net: btf.path_offset("sock_common", &["skc_net", "net"])?,
        substate: btf.member_offset("inet_timewait_sock", "tw_substate")?,
    })
}

/// Attaches the time-wait programs, all or none: with some missing, a
/// connection could be seen entering time-wait and never leaving it.
/// Returns their descriptors.
pub(super) fn attach(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<Vec<i32>> {
    let attached = attach_all(ebpf, btf);
    if attached.is_err() {
        unload(ebpf);
    }
    attached
}

fn attach_all(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<Vec<i32>> {
    Ok(vec![
        // Renamed in 6.12, when it took over arming the timer.
        fentry(
            ebpf,
            btf,
            PROGRAM_TW_MADE,
            &["inet_twsk_hashdance_schedule", "inet_twsk_hashdance"],
        )?,
        fentry(
            ebpf,
            btf,
            PROGRAM_TW_SEGMENT,
            &["tcp_timewait_state_process"],
        )?,
        {
            let p = program::<FExit>(ebpf, PROGRAM_TW_SEGMENT_DONE)?;
            p.load("tcp_timewait_state_process", btf)
                .map_err(|e| refusal(e).context("fexit on tcp_timewait_state_process"))?;
            p.attach().map_err(|e| anyhow!(e))?;
            raw_fd(p.fd().map_err(|e| anyhow!(e))?)?
        },
        fentry(ebpf, btf, PROGRAM_TW_KILLED, &["inet_twsk_kill"])?,
    ])
}

/// fentry on the first of `functions` this kernel has.
fn fentry(ebpf: &mut Ebpf, btf: &aya::Btf, name: &str, functions: &[&str]) -> Result<i32> {
    let p = program::<FEntry>(ebpf, name)?;
    let mut refused = anyhow!("no function to attach {name} to");
    for function in functions {
        match p.load(function, btf) {
            Ok(()) => {
                p.attach().map_err(|e| {
                    anyhow!(e).context(format!("cannot attach fentry to {function}"))
                })?;
                return raw_fd(p.fd().map_err(|e| anyhow!(e))?);
            }
            Err(e) => refused = refusal(e).context(format!("fentry on {function}")),
        }
    }
    Err(refused)
}

fn unload(ebpf: &mut Ebpf) {
    for name in [PROGRAM_TW_MADE, PROGRAM_TW_SEGMENT, PROGRAM_TW_KILLED] {
        if let Ok(p) = program::<FEntry>(ebpf, name) {
            let _ = p.unload();
        }
    }
    if let Ok(p) = program::<FExit>(ebpf, PROGRAM_TW_SEGMENT_DONE) {
        let _ = p.unload();
    }
}

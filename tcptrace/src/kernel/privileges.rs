//! What the kernel will ask of us, checked up front so the answer is a
//! sentence instead of an EPERM from deep inside the loader.

use std::fs;

pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The effective capability set of this process.
pub fn effective() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s))
        .unwrap_or(0)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Names of the capabilities missing for loading and attaching the tracer.
/// CAP_SYS_ADMIN alone is also enough (it is what kernels before 5.8 ask).
pub fn missing_for_tracing(eff: u64) -> Vec<&'static str> {
    let has = |cap: u32| eff & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Vec::new();
    }
    [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|(_, name)| name)
        .collect()
}

/// Sets the calling thread's nice value to `nice`, unless it already runs
/// at that priority or higher. Must run before [`drop_all_but`]: going below the
/// current value needs CAP_SYS_NICE.
pub fn prioritize(nice: i32) -> std::io::Result<()> {
    // SAFETY: getpriority/setpriority on the calling thread (who = 0); errno
    // is reset first because -1 is also a valid priority.
    unsafe {
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, 0);
        if now == -1 && *libc::__errno_location() != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if nice >= now {
            return Ok(());
        }
        if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Gives up every capability for good (effective, permitted, inheritable,
/// ambient) but those in `keep`, and those only if held now. Called once the
/// programs are attached and the files are open: from then on the process
/// only reads what it already holds (rings, counters, the iterator's
/// link), so a bug in the rest of the run cannot be used to do more.
pub fn drop_all_but(keep: &[u32]) -> std::io::Result<()> {
    // SAFETY: prctl with constant arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let kept = effective() & keep.iter().fold(0u64, |m, cap| m | 1 << cap);
    let word = |i: u32| (kept >> (32 * i)) as u32;
    let data = [
        Data {
            effective: word(0),
            permitted: word(0),
            inheritable: 0,
        },
        Data {
            effective: word(1),
            permitted: word(1),
            inheritable: 0,
        },
    ];
    // SAFETY: capset with a version-3 header and its two data words.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Loading and attaching the socket callback (a cgroup `sock_ops`
/// program) also needs CAP_NET_ADMIN; CAP_SYS_ADMIN covers it as well.
pub fn can_attach_callback(eff: u64) -> bool {
    eff & (1 << CAP_NET_ADMIN | 1 << CAP_SYS_ADMIN) != 0
}

pub fn can_mount(eff: u64) -> bool {
    eff & (1 << CAP_SYS_ADMIN) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cap_eff_from_proc_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c000000000\n";
        let eff = parse_cap_eff(status).unwrap();
        assert_eq!(missing_for_tracing(eff), Vec::<&str>::new());
        assert!(!can_mount(eff));
        assert!(!can_attach_callback(eff));
        assert!(can_attach_callback(eff | 1 << CAP_NET_ADMIN));
    }

    #[test]
    fn names_each_missing_capability() {
        assert_eq!(missing_for_tracing(0), ["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(missing_for_tracing(1 << CAP_BPF), ["CAP_PERFMON"]);
        assert!(missing_for_tracing(1 << CAP_SYS_ADMIN).is_empty());
    }
}

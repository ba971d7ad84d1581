//! The BPF statistics' own cost per program run, measured with an empty
//! program.
//!
//! `kernel.bpf_stats_enabled` times each program run with two clock reads
//! around it, and on this kind of VM those cost more than a short program:
//! an empty program on the same tracepoint measures some 30 ns per run. The
//! tracer runs several programs per transition, so the raw figure carries
//! that cost several times over; the bench shows it, and the figure with it
//! taken out.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Result, bail};

use super::stats::fdinfo_field;

unsafe extern "C" {
    fn syscall(number: i64, ...) -> i64;
    fn __errno_location() -> *mut i32;
}

#[cfg(target_arch = "x86_64")]
const SYS_BPF: i64 = 321;
#[cfg(target_arch = "aarch64")]
const SYS_BPF: i64 = 280;

const BPF_PROG_LOAD: i64 = 5;
const BPF_RAW_TRACEPOINT_OPEN: i64 = 17;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;

/// An empty program attached to a tracepoint; detached and unloaded on
/// drop.
pub struct EmptyProgram {
    prog: OwnedFd,
    _link: OwnedFd,
}

impl EmptyProgram {
    pub fn attach(tracepoint: &str) -> Result<EmptyProgram> {
        // r0 = 0; exit.
        let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
        let license = b"GPL\0";
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_RAW_TRACEPOINT.to_ne_bytes());
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..59].copy_from_slice(b"bench_empty");
        let prog = bpf(BPF_PROG_LOAD, &attr)
            .map_err(|e| anyhow::anyhow!("cannot load the empty program: {e}"))?;
        let name = format!("{tracepoint}\0");
        let mut attr = [0u8; 128];
        attr[0..8].copy_from_slice(&(name.as_ptr() as u64).to_ne_bytes());
        attr[8..12].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &attr)
            .map_err(|e| anyhow::anyhow!("cannot attach the empty program to {tracepoint}: {e}"))?;
        Ok(EmptyProgram { prog, _link: link })
    }

    /// Its (run_time_ns, run_cnt) so far.
    pub fn stats(&self) -> Result<(u64, u64)> {
        let path = format!("/proc/self/fdinfo/{}", self.prog.as_raw_fd());
        let text = fs::read_to_string(&path)?;
        let field = |key: &str| fdinfo_field(&text, key);
        match (field("run_time_ns"), field("run_cnt")) {
            (Some(t), Some(c)) => Ok((t, c)),
            _ => bail!("{path} has no run_time_ns or run_cnt"),
        }
    }
}

fn bpf(cmd: i64, attr: &[u8; 128]) -> std::result::Result<OwnedFd, std::io::Error> {
    // SAFETY: attr is a zero-padded bpf_attr for `cmd` whose pointers
    // (instructions, license, name) outlive the call.
    let fd = unsafe { syscall(SYS_BPF, cmd, attr.as_ptr(), attr.len() as u32) };
    if fd < 0 {
        // SAFETY: errno of this thread, read right after the failing call.
        return Err(std::io::Error::from_raw_os_error(unsafe {
            *__errno_location()
        }));
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

//! The kernel's answer to "which processes hold this socket": the
//! `iter/task_file` program ([`PROGRAM_TASK_FILES`]) walks every open
//! file of every process in our pid namespace and writes a [`HeldSocket`]
//! for each descriptor of a socket the filters keep.
//!
//! The program is loaded and linked while tcptrace still has its
//! capabilities; each walk then only needs a new iterator descriptor made
//! from that link (`BPF_ITER_CREATE`), which no capability guards once the
//! link exists (Linux 5.10 with unprivileged BPF disabled refuses every
//! bpf() call without CAP_BPF: [`TaskFiles::usable_without_capabilities`]
//! tells). So tcptrace keeps no CAP_SYS_PTRACE to read other processes'
//! `/proc/PID/fd`.
//!
//! aya's own link hands its descriptor out only once, so the link and the
//! iterators are made here, with the bpf() system call.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, anyhow};
use tcptrace_common::HeldSocket;

const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;

/// A linked iterator program, ready to walk.
pub struct TaskFiles {
    link: OwnedFd,
    /// tcptrace's own socket, whose descriptor the program marks: on
    /// kernels without `bpf_sock_from_file` its `f_op` tells socket files
    /// from the others.
    _reference: OwnedFd,
    /// The program tells sockets for sure (`bpf_sock_from_file`).
    sock_from_file: bool,
}

/// A socket of tcptrace's own for the program to recognise: any socket
/// has the same file operations. Made before the program is loaded, which
/// takes its descriptor's number.
pub fn reference_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket() returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The `bpf()` system call with an attribute of up to 64 bytes.
fn bpf(cmd: libc::c_long, attr: &[u32; 16]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a zeroed bpf_attr prefix of 64 bytes; the kernel
    // reads no further than the size given.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), size_of_val(attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

impl TaskFiles {
    /// Links the loaded program `program_fd`.
    pub fn link(program_fd: RawFd, reference: OwnedFd, sock_from_file: bool) -> Result<TaskFiles> {
        let mut attr = [0u32; 16];
        attr[0] = program_fd as u32;
        attr[2] = BPF_TRACE_ITER;
        let link = bpf(BPF_LINK_CREATE, &attr).context("cannot link the iterator")?;
        Ok(TaskFiles {
            link,
            _reference: reference,
            sock_from_file,
        })
    }

    /// Every descriptor of a socket the filters keep, in every process
    /// (by thread group id, then descriptor), as the kernel has them now.
    pub fn walk(&self) -> Result<Vec<HeldSocket>> {
        let mut attr = [0u32; 16];
        attr[0] = self.link.as_raw_fd() as u32;
        let iterator = bpf(BPF_ITER_CREATE, &attr).context("cannot start the iterator")?;
        let mut bytes = Vec::new();
        File::from(iterator)
            .read_to_end(&mut bytes)
            .context("cannot read the iterator")?;
        let mut found: Vec<HeldSocket> = bytes
            .chunks_exact(size_of::<HeldSocket>())
            // SAFETY: HeldSocket is plain old data, each chunk its size.
            .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<HeldSocket>()) })
            .collect();
        let own = found.iter().find(|h| h.reference != 0).map(|h| h.f_op);
        if !self.sock_from_file {
            let ops =
                own.ok_or_else(|| anyhow!("the iterator did not see tcptrace's own socket"))?;
            found.retain(|h| h.f_op == ops);
        }
        found.retain(|h| h.reference == 0 && h.skaddr != 0);
        Ok(found)
    }

    /// Whether a walk works without any capability, as it must once they
    /// are dropped: tried in a thread that gives its own up (capabilities
    /// belong to a thread), so this one keeps them.
    pub fn usable_without_capabilities(&self) -> bool {
        std::thread::scope(|s| {
            s.spawn(|| crate::kernel::privileges::drop_all_but(&[]).is_ok() && self.walk().is_ok())
                .join()
                .unwrap_or(false)
        })
    }
}

//! tracefs: where tracepoint ids and formats live. A fresh machine may not
//! have it mounted; aya needs it to attach, and we need the format file.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};

use crate::kernel::privileges;

const MOUNT_POINT: &str = "/sys/kernel/tracing";
const LEGACY: &str = "/sys/kernel/debug/tracing";

/// The directory of the tracepoint's files, mounting tracefs if needed.
pub fn event_dir(category: &str, name: &str) -> Result<PathBuf> {
    let rel = Path::new("events").join(category).join(name);
    for root in [MOUNT_POINT, LEGACY] {
        let dir = Path::new(root).join(&rel);
        if dir.join("format").exists() {
            return Ok(dir);
        }
    }
    if Path::new(MOUNT_POINT).join("events").exists() {
        bail!(
            "this kernel has no {category}:{name} tracepoint ({} is missing); \
             tcptrace needs Linux 4.16 or later",
            Path::new(MOUNT_POINT).join(&rel).display()
        );
    }
    if !privileges::can_mount(privileges::effective()) {
        bail!(
            "tracefs is not mounted, and mounting it needs CAP_SYS_ADMIN; \
             run `mount -t tracefs tracefs {MOUNT_POINT}` as root, then tcptrace again"
        );
    }
    mount_tracefs().map_err(|e| {
        anyhow!(
            "tracefs is not mounted and mounting it at {MOUNT_POINT} failed ({e}); \
             run `mount -t tracefs tracefs {MOUNT_POINT}` as root"
        )
    })?;
    log::info!("mounted tracefs at {MOUNT_POINT}");
    let dir = Path::new(MOUNT_POINT).join(&rel);
    if !dir.join("format").exists() {
        bail!(
            "this kernel has no {category}:{name} tracepoint ({} is missing)",
            dir.display()
        );
    }
    Ok(dir)
}

fn mount_tracefs() -> io::Result<()> {
    let c = |s: &str| CString::new(s).expect("no NUL in constant");
    let (src, target, fstype) = (c("tracefs"), c(MOUNT_POINT), c("tracefs"));
    // SAFETY: valid NUL-terminated strings, no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

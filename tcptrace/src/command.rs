//! The command traced by `tcptrace -- COMMAND`: a restart, a deploy, a test.
//!
//! It runs as the user who invoked tcptrace (the sudo caller under sudo), so
//! wrapping a command in tcptrace never gives it more rights than typing it.

use std::ffi::{CString, OsString};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ExitStatus};

use anyhow::{Result, anyhow, bail};

/// Who the command runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, as the user's login gets them.
    pub groups: Vec<u32>,
}

/// A command checked before tracing starts: a typo costs nothing.
#[derive(Debug)]
pub struct Prepared {
    program: PathBuf,
    args: Vec<OsString>,
    user: Option<User>,
    /// The command as typed, for messages.
    shown: String,
}

/// The running command.
pub struct Running {
    child: Child,
    shown: String,
}

impl Prepared {
    /// Finds the program and the user to run it as. Errors are bad input.
    pub fn new(argv: &[OsString]) -> Result<Prepared> {
        let Some((first, args)) = argv.split_first() else {
            bail!("no command after `--`");
        };
        let program = find_program(first)?;
        let shown = argv
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Prepared {
            program,
            args: args.to_vec(),
            user: sudo_caller()?,
            shown,
        })
    }

    /// The capabilities starting it as another user needs: held until then.
    pub fn needs_setuid(&self) -> bool {
        self.user.is_some()
    }

    pub fn start(&self) -> Result<Running> {
        let mut cmd = std::process::Command::new(&self.program);
        cmd.args(&self.args);
        if let Some(u) = &self.user {
            let User { uid, gid, groups } = u.clone();
            // Groups first, the uid last: each step needs the rights the
            // next one gives up. (std's own uid/gid run before pre_exec.)
            // SAFETY: setgroups, setgid and setuid are async-signal-safe;
            // the list was built before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let shown = self.shown.clone();
        let child = cmd
            .spawn()
            .map_err(|e| anyhow!("cannot run {shown}: {e}"))?;
        Ok(Running { child, shown })
    }
}

impl Running {
    /// The exit status once the command has ended.
    pub fn ended(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn shown(&self) -> &str {
        &self.shown
    }
}

/// tcptrace's exit status for the command's: its code, or 128 + the signal
/// that ended it, as a shell reports it.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
        (None, None) => 1,
    }
}

/// How the command ended, in words.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(0), _) => "exited successfully".into(),
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        (None, None) => "ended".into(),
    }
}

/// The program as exec would find it, or why not.
fn find_program(name: &OsString) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let path = PathBuf::from(name);
    if name.to_string_lossy().contains('/') {
        if executable(&path) {
            return Ok(path);
        }
        bail!("cannot run {}: no such executable file", path.display());
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&search)
        .map(|dir| dir.join(&path))
        .find(|p| executable(p))
        .ok_or_else(|| anyhow!("cannot run {}: not found in PATH", path.display()))
}

/// The user who ran `sudo tcptrace`, when that is how tcptrace runs.
fn sudo_caller() -> Result<Option<User>> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return Ok(None);
    }
    let number = |var: &str| -> Result<Option<u32>> {
        match std::env::var(var) {
            Ok(v) => v
                .parse()
                .map(Some)
                .map_err(|_| anyhow!("{var}={v:?} is not a number")),
            Err(_) => Ok(None),
        }
    };
    let (Some(uid), Some(gid)) = (number("SUDO_UID")?, number("SUDO_GID")?) else {
        return Ok(None);
    };
    if uid == 0 {
        return Ok(None);
    }
    let groups = match std::env::var("SUDO_USER") {
        Ok(name) => group_list(&name, gid),
        Err(_) => vec![gid],
    };
    Ok(Some(User { uid, gid, groups }))
}

/// The user's groups, as login would set them (getgrouplist).
fn group_list(name: &str, gid: u32) -> Vec<u32> {
    let Ok(cname) = CString::new(name) else {
        return vec![gid];
    };
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        // SAFETY: the buffer holds n entries; n is updated to the count.
        let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n as usize);
            return groups;
        }
        if n as usize <= groups.len() {
            return vec![gid];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_is_named() {
        let e = Prepared::new(&["tcptrace-no-such-program".into()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot run tcptrace-no-such-program: not found in PATH"
        );
        let e = Prepared::new(&["/nonexistent/restart".into()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot run /nonexistent/restart: no such executable file"
        );
    }

    #[test]
    fn the_exit_status_passes_on_as_a_shell_would() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
        assert_eq!(
            describe(ExitStatus::from_raw(libc::SIGTERM)),
            "was killed by signal 15"
        );
    }
}

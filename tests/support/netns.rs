//! A fresh network namespace per test, deleted on drop (also when the test
//! fails half-way), and what runs inside it.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use crate::host::{next_seq, run_ok};

/// A fresh network namespace with loopback up.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = format!("tcptrace-test-{}-{}", std::process::id(), next_seq());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        // Made before `lo` is up: a failure there still deletes it.
        let ns = Netns { name };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    /// The namespace's inode, as tcptrace reports it.
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.path())
            .expect("namespace exists")
            .ino()
    }

    /// Its bind mount, which `--netns` and `nsenter --net` take.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Sets a sysctl inside the namespace (net.* sysctls are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        run_ok(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "sh",
            "-c",
            &format!("echo '{value}' > {path}"),
        ]));
    }

    /// Starts `cmd` inside the namespace.
    pub fn spawn(&self, cmd: &mut Command) -> Child {
        let file = std::fs::File::open(self.path()).expect("the namespace's bind mount exists");
        let fd = file.as_raw_fd();
        // SAFETY: setns is async-signal-safe; fd stays open until after spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn in namespace");
        drop(file);
        child
    }

    /// Waits (up to 10 s) until no socket of the namespace is in `state`
    /// (as `ss` shows it, e.g. `FIN-WAIT-1`): the kernel finishes a close
    /// after the process returned, on a delayed ACK, later when loaded.
    pub fn settle(&self, state: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ss().iter().any(|s| s.is(state)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `n` orderly connections to `addr`, one after the other, the client
    /// closing first; returns when both peers are done.
    pub fn connections(&self, addr: &str, n: usize) {
        use crate::peer::{ClientMode, ServerMode};
        let server = self
            .server(addr, ServerMode::WaitPeerClose)
            .conns(n)
            .start();
        self.client(addr, ClientMode::Close).repeat(n).run();
        server.finish();
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

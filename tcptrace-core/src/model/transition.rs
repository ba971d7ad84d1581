//! A transition as the kernel reported it, and the task that made it.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;

use crate::model::State;

/// One transition, as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub skaddr: u64,
    /// The task the kernel ran in: the socket's owner only in process context.
    pub task: Task,
    /// The name of the thread that made the call, in process context (the
    /// task's `comm` is its process's name).
    pub thread: Comm,
    pub old: State,
    pub new: State,
    pub family: Family,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Inode of the socket's network namespace; 0 when not known.
    pub netns: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

/// A process: thread group id, its name (the thread group leader's `comm`,
/// as `ps` and `ss -p` show it) and its cgroup v2 path, once known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Task {
    pub pid: u32,
    pub comm: Comm,
    pub cgroup: Option<&'static str>,
}

impl Task {
    pub fn new(pid: u32, comm: &[u8]) -> Task {
        Task {
            pid,
            comm: Comm::from_bytes(comm),
            cgroup: None,
        }
    }
}

/// A task's `comm`: at most 15 bytes, chosen by the process itself (so never
/// trusted to be printable).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm([u8; 16]);

impl Comm {
    pub fn from_bytes(bytes: &[u8]) -> Comm {
        let mut c = [0u8; 16];
        let n = bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(bytes.len())
            .min(15);
        c[..n].copy_from_slice(&bytes[..n]);
        Comm(c)
    }

    pub fn as_bytes(&self) -> &[u8] {
        let n = self.0.iter().position(|&b| b == 0).unwrap_or(16);
        &self.0[..n]
    }

    /// The name as text; bytes that are not UTF-8 become U+FFFD. Control
    /// characters are kept: escaping is the output's job.
    pub fn as_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(self.as_bytes())
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

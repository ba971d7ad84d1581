//! What the attribution tests share: a transition written in one line, and
//! the kernel addresses of the sockets their scenarios follow.

use crate::model::{Comm, Family, Row, State, Task, Transition};

use super::Attributor;

impl Attributor {
    /// `observe` of a transition that is not a repeat.
    pub(super) fn observe_row(&mut self, t: &Transition) -> Row {
        self.observe(t).expect("not a repeat")
    }
}

pub(super) fn task(pid: u32, comm: &str) -> Task {
    Task::new(pid, comm.as_bytes())
}

pub(super) fn tr(
    ts: u64,
    sk: u64,
    task_: Task,
    old: State,
    new: State,
    l: &str,
    r: &str,
) -> Transition {
    Transition {
        ts_ns: ts,
        skaddr: sk,
        task: task_,
        thread: Comm::default(),
        old,
        new,
        family: Family::V4,
        local: l.parse().unwrap(),
        remote: r.parse().unwrap(),
        netns: 1,
    }
}

pub(super) const LISTENER: u64 = 0x100;
pub(super) const CHILD: u64 = 0x200;
pub(super) const CLIENT: u64 = 0x300;

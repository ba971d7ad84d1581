//! A row: a transition with what tcptrace knows about its socket (its id,
//! its holders, how long it spent in the state it leaves, why it closed).

use crate::model::{State, Task, Transition};

/// A transition with what tcptrace knows about its socket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Row {
    pub t: Transition,
    /// Small id, unique for one run, grouping the events of one socket.
    pub sock: u64,
    pub owner: Option<Task>,
    /// Time spent in `t.old`, when the socket was seen entering it.
    pub dwell_ns: Option<u64>,
    /// How a `-> CLOSE` came about, when a reset says so.
    pub close: Option<Close>,
    pub origin: Origin,
    /// The socket waits in its listener's queue: `owner` is the listener's,
    /// no process has accepted it yet.
    pub queued: bool,
    /// How well `t.ts_ns` (and so `dwell_ns`) is known: the kernel's own
    /// time for every traced row; a time-wait table row may only be known
    /// to its timer's tick or to the poll.
    pub timing: Timing,
}

/// How well a row's time is known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Timing {
    /// The kernel's time of the change (a traced row, or a time-wait row
    /// that took the moment of the `-> CLOSE` it belongs to).
    #[default]
    Exact,
    /// Derived from the time-wait socket's timer, as sock_diag reports it:
    /// known to the kernel's tick (4 ms at HZ=250).
    Timer,
    /// Only known to lie between two reads of the time-wait table: the
    /// row is stamped when the read found the change.
    Poll,
}

impl Timing {
    /// As JSON writes it (`"timing"`, absent when exact).
    pub fn name(self) -> &'static str {
        match self {
            Timing::Exact => "exact",
            Timing::Timer => "timer",
            Timing::Poll => "poll",
        }
    }

    pub fn from_name(name: &str) -> Option<Timing> {
        [Timing::Exact, Timing::Timer, Timing::Poll]
            .into_iter()
            .find(|t| t.name() == name)
    }
}

/// Where a row comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A transition the kernel reported as it happened.
    Tracepoint,
    /// A socket that existed when tcptrace started, in its state then.
    Snapshot,
    /// A change seen in the kernel's time-wait table (polled).
    TimeWait,
    /// A change of a time-wait socket the kernel reported as it happened
    /// (fentry/fexit on its time-wait functions).
    TimeWaitKernel,
}

impl Origin {
    pub fn name(self) -> &'static str {
        match self {
            Origin::Tracepoint => "tracepoint",
            Origin::Snapshot => "snapshot",
            Origin::TimeWait => "timewait",
            Origin::TimeWaitKernel => "timewait-kernel",
        }
    }

    /// A row of a connection after its socket closed into time-wait,
    /// polled or reported by the kernel: the same to everything downstream.
    pub fn is_time_wait(self) -> bool {
        matches!(self, Origin::TimeWait | Origin::TimeWaitKernel)
    }

    pub fn from_name(name: &str) -> Option<Origin> {
        [
            Origin::Tracepoint,
            Origin::Snapshot,
            Origin::TimeWait,
            Origin::TimeWaitKernel,
        ]
        .into_iter()
        .find(|o| o.name() == name)
    }
}

/// Why a socket closed, as the reset tracepoints tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// We sent a reset (an abort), with the kernel's reason when it gives one.
    ResetSent(Option<&'static str>),
    /// The peer reset an open connection.
    ResetReceived,
    /// The peer answered our SYN with a reset.
    Refused,
}

impl Close {
    pub fn name(self) -> &'static str {
        match self {
            Close::ResetSent(_) => "reset sent",
            Close::ResetReceived => "reset received",
            Close::Refused => "refused",
        }
    }

    pub fn reset_reason(self) -> Option<&'static str> {
        match self {
            Close::ResetSent(r) => r,
            _ => None,
        }
    }

    pub fn from_name(name: &str, reason: Option<&str>) -> Option<Close> {
        match name {
            "reset sent" => Some(Close::ResetSent(reason.map(intern_reason))),
            "reset received" => Some(Close::ResetReceived),
            "refused" => Some(Close::Refused),
            _ => None,
        }
    }
}

/// Reset reason names live as long as the process: there are a few dozen.
pub fn intern_reason(name: &str) -> &'static str {
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<Vec<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    if names.len() >= 1024 {
        return "OTHER";
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.push(leaked);
    leaked
}

/// A `-> CLOSE` from these states may be an abort, whose reset the kernel
/// reports just after the transition: such rows wait for it briefly.
pub fn may_await_sent_reset(row: &Row) -> bool {
    row.t.new == State::CLOSE
        && row.close.is_none()
        && matches!(
            row.t.old,
            State::ESTABLISHED | State::CLOSE_WAIT | State::SYN_RECV | State::FIN_WAIT1
        )
}

/// The processes holding a socket: the owner first (the one that made it,
/// accepted it, or acted on it last), then the others, as a fork left
/// them. Usually one, so the rest stays unallocated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Holders {
    owner: Option<Task>,
    others: Vec<Task>,
}

impl Holders {
    pub fn only(task: Task) -> Holders {
        Holders {
            owner: Some(task),
            others: Vec::new(),
        }
    }

    /// From a list (`ss -p`'s view): the first is the owner.
    pub fn from_list(list: &[Task]) -> Holders {
        Holders {
            owner: list.first().copied(),
            others: list.get(1..).unwrap_or_default().to_vec(),
        }
    }

    pub fn owner(&self) -> Option<Task> {
        self.owner
    }

    pub fn all(&self) -> impl Iterator<Item = &Task> {
        self.owner.iter().chain(&self.others)
    }

    pub fn len(&self) -> usize {
        self.all().count()
    }

    pub fn is_empty(&self) -> bool {
        self.owner.is_none()
    }

    pub(crate) fn contains(&self, pid: u32) -> bool {
        self.all().any(|t| t.pid == pid)
    }

    /// `task` is what its process is called now (and where it runs).
    pub(crate) fn refresh(&mut self, task: Task) {
        for t in self.owner.iter_mut().chain(&mut self.others) {
            if t.pid == task.pid {
                *t = task;
            }
        }
    }

    /// `task` acted on the socket itself: it holds it, first.
    pub(crate) fn promote(&mut self, task: Task) {
        if self.owner.is_some_and(|o| o.pid == task.pid) {
            self.owner = Some(task);
            return;
        }
        self.others.retain(|t| t.pid != task.pid);
        if let Some(old) = self.owner.replace(task) {
            self.others.insert(0, old);
        }
    }

    pub(crate) fn add(&mut self, task: Task) {
        if !self.contains(task.pid) {
            match self.owner {
                None => self.owner = Some(task),
                Some(_) => self.others.push(task),
            }
        }
    }

    /// Drops `pid` unless it is the last holder known: a socket is never
    /// left without one by an event (its last holder's close shows as a
    /// transition). Says whether it was dropped.
    pub(crate) fn remove_unless_last(&mut self, pid: u32) -> bool {
        if self.len() < 2 || !self.contains(pid) {
            return false;
        }
        if self.owner.is_some_and(|o| o.pid == pid) {
            self.owner = Some(self.others.remove(0));
        } else {
            self.others.retain(|t| t.pid != pid);
        }
        true
    }
}

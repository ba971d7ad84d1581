//! TCP states as the kernel numbers them (`include/net/tcp_states.h`).
//! This is the one table of state names in tcptrace.

use std::fmt;

use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use tcptrace_common::tcp_state;

/// A kernel TCP state. Numbers the table does not know are kept and shown as
/// `STATE_<n>` rather than guessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct State(pub u8);

const NAMES: [&str; 13] = [
    "STATE_0",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Opening,
    Listening,
    Established,
    Closing,
    Closed,
    Unknown,
}

// The whole set, named once; code names only the states it reasons about.
#[allow(dead_code)]
impl State {
    pub const ESTABLISHED: State = State(tcp_state::ESTABLISHED);
    pub const SYN_SENT: State = State(tcp_state::SYN_SENT);
    pub const SYN_RECV: State = State(tcp_state::SYN_RECV);
    pub const FIN_WAIT1: State = State(tcp_state::FIN_WAIT1);
    pub const FIN_WAIT2: State = State(tcp_state::FIN_WAIT2);
    pub const TIME_WAIT: State = State(tcp_state::TIME_WAIT);
    pub const CLOSE: State = State(tcp_state::CLOSE);
    pub const CLOSE_WAIT: State = State(tcp_state::CLOSE_WAIT);
    pub const LAST_ACK: State = State(tcp_state::LAST_ACK);
    pub const LISTEN: State = State(tcp_state::LISTEN);
    pub const CLOSING: State = State(tcp_state::CLOSING);
}

impl State {
    /// Size of a table indexed by [`State::slot`].
    pub const SLOTS: usize = 16;

    /// An index for tables by state (counts, charts): each state the
    /// kernel has its own, and any number past them shares the last.
    pub fn slot(self) -> usize {
        usize::from(self.0).min(Self::SLOTS - 1)
    }

    /// The kernel's name, as `ss` and the tracepoint's own output print it.
    pub fn name(self) -> &'static str {
        NAMES
            .get(usize::from(self.0))
            .filter(|_| self.0 != 0)
            .copied()
            .unwrap_or("")
    }

    /// Inverse of [`State::name`] (and of `Display` for unknown states).
    pub fn from_name(name: &str) -> Option<State> {
        if let Some(i) = NAMES.iter().skip(1).position(|n| *n == name) {
            return Some(State(i as u8 + 1));
        }
        name.strip_prefix("STATE_")?.parse().ok().map(State)
    }

    /// What a socket lingering in this state means, for people.
    pub fn meaning(self) -> &'static str {
        match self {
            State::CLOSE_WAIT => {
                "the peer closed and the owning process has not called close(): \
                 often a descriptor leak"
            }
            State::FIN_WAIT2 => "half-closed: we closed, the peer has not",
            State::FIN_WAIT1 => "we closed; our FIN is not acknowledged yet",
            State::SYN_SENT => "connecting: no answer to the SYN yet",
            State::SYN_RECV => "the peer has not completed the handshake",
            State::LAST_ACK => "both closed; the peer has not acknowledged our FIN",
            State::CLOSING => "both closed at once; waiting for the ACK of our FIN",
            State::ESTABLISHED => "open",
            State::LISTEN => "listening",
            _ => "",
        }
    }

    /// What the state means for the connection, for colouring by meaning.
    pub fn phase(self) -> Phase {
        match self {
            State::SYN_SENT | State::SYN_RECV | State(12) => Phase::Opening,
            State::LISTEN => Phase::Listening,
            State::ESTABLISHED => Phase::Established,
            State::CLOSE => Phase::Closed,
            State(0) | State(13..) => Phase::Unknown,
            _ => Phase::Closing,
        }
    }

    /// States a socket should not stay in for long (`--stuck`).
    pub fn can_be_stuck(self) -> bool {
        matches!(
            self,
            State::CLOSE_WAIT
                | State::FIN_WAIT2
                | State::LAST_ACK
                | State::SYN_SENT
                | State::SYN_RECV
        )
    }

    /// Every state the kernel names.
    pub fn all() -> impl Iterator<Item = State> {
        (1..NAMES.len() as u8).map(State)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            "" => write!(f, "STATE_{}", self.0),
            name => f.pad(name),
        }
    }
}

impl Serialize for State {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.name() {
            "" => s.collect_str(self),
            name => s.serialize_str(name),
        }
    }
}

impl<'de> Deserialize<'de> for State {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<State, D::Error> {
        let s = <Cow<'de, str>>::deserialize(d)?;
        State::from_name(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown TCP state {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_from_name() {
        for s in State::all().chain([State(0), State(42)]) {
            assert_eq!(State::from_name(&s.to_string()), Some(s), "{s}");
        }
        assert_eq!(State::from_name("ESTABLISHED"), Some(State::ESTABLISHED));
        assert_eq!(State::from_name("established"), None);
    }

    #[test]
    fn unknown_numbers_are_shown_not_guessed() {
        assert_eq!(State(99).to_string(), "STATE_99");
        assert_eq!(format!("{:<12}|", State::LISTEN), "LISTEN      |");
    }
}

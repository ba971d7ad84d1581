//! The JSON Lines row schema, for reading recordings back.

use std::borrow::Cow;

use crate::model::State;
use serde::Deserialize;
use std::net::IpAddr;

/// One transition as a recording holds it, for reading back (rows are
/// written by [`Printer`]); the README documents every field. `time` is not
/// read: it is derived again from `ts_ns` and the header's clock.
#[derive(Deserialize, Debug, Clone, PartialEq)]
pub struct JsonRow<'a> {
    pub ts_ns: u64,
    pub sock: u64,
    pub pid: Option<u32>,
    #[serde(borrow)]
    pub comm: Option<Cow<'a, str>>,
    /// The calling thread's name, where it is not the process's.
    #[serde(default, borrow)]
    pub thread: Option<Cow<'a, str>>,
    /// The owner's cgroup v2 path; `unit` and `container` are derived
    /// from it and not read back.
    #[serde(default, borrow)]
    pub cgroup: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub unit: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub container: Option<Cow<'a, str>>,
    /// The listener's owner: no process has accepted the socket yet.
    #[serde(default)]
    pub queued: bool,
    #[serde(borrow)]
    pub family: Cow<'a, str>,
    /// Inode of the socket's network namespace; null when not known.
    #[serde(default)]
    pub netns: Option<u32>,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    /// Null for a snapshot row: the socket existed, its last transition was
    /// not seen.
    pub old: Option<State>,
    pub new: State,
    pub ms: Option<f64>,
    /// "reset sent", "reset received", "refused", or null.
    #[serde(default, borrow)]
    pub close: Option<Cow<'a, str>>,
    /// The kernel's reason for a reset it sent (`TCP_ABORT_ON_LINGER`, ...).
    #[serde(default, borrow)]
    pub reset_reason: Option<Cow<'a, str>>,
    /// "tracepoint", "snapshot" or "timewait".
    #[serde(default = "tracepoint", borrow)]
    pub origin: Cow<'a, str>,
    #[serde(default)]
    pub skaddr: Option<Hex>,
}

fn tracepoint() -> Cow<'static, str> {
    Cow::Borrowed("tracepoint")
}

/// A kernel address, shown only with `--show-skaddr`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hex(pub u64);

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Hex, D::Error> {
        let s = <Cow<'de, str>>::deserialize(d)?;
        u64::from_str_radix(s.trim_start_matches("0x"), 16)
            .map(Hex)
            .map_err(serde::de::Error::custom)
    }
}

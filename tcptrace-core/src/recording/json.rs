//! The JSON Lines row schema, for reading recordings back: what serde
//! makes of a row the printer wrote.
//!
//! The keys are those of [`crate::output::json::Key`]: serde reads each
//! field under its own name, and a test holds those names to `Key`, so
//! that a key renamed or added there cannot be missed here. Rows as
//! tcptrace writes them take a faster path (`read::fast_row`), which fills
//! this same struct.

use std::borrow::Cow;
use std::net::IpAddr;

use serde::Deserialize;

use crate::model::State;

/// One transition as a recording holds it, for reading back (rows are
/// written by [`crate::output::Printer`]); docs/json.md documents every
/// field. The fields are `Key`'s keys, in its order; `time` and
/// `container_name` are not read: they are derived again from `ts_ns` and
/// the header's clock, and from this host's container runtimes.
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
    /// "timer" or "poll"; absent (recordings before it, and rows whose
    /// time is the kernel's own): exact.
    #[serde(default, borrow)]
    pub timing: Option<Cow<'a, str>>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Clock, Header, Spec};
    use crate::output::json::Key;
    use serde::de::{self, Deserializer, Visitor};

    /// A deserializer that only notes the fields a struct asks for.
    struct FieldNames<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for FieldNames<'_> {
        type Error = de::value::Error;

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("only the field names were wanted"))
        }

        fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }

    /// serde reads every key a row is written with, in the same order,
    /// under the same name: all but the two derived again.
    #[test]
    fn serde_reads_the_keys_rows_are_written_with() {
        let mut fields: &'static [&'static str] = &[];
        let _ = JsonRow::deserialize(FieldNames(&mut fields));
        let written: Vec<&str> = Key::ALL
            .iter()
            .filter(|&&k| k != Key::Time && k != Key::ContainerName)
            .map(|k| k.name())
            .collect();
        assert_eq!(fields, written);
    }

    #[test]
    fn header_round_trips_with_filters() {
        let spec = Spec {
            ports: vec![6389],
            follow: Some(crate::model::Tuple {
                a: "[::1]:1".parse().unwrap(),
                b: "[::1]:2".parse().unwrap(),
            }),
            family: Some(crate::model::Family::V6),
            ..Spec::default()
        };
        let h = Header::new(
            Clock {
                offset_ns: 5,
                start_ns: 7,
            },
            spec,
        );
        let text = serde_json::to_string(&h).unwrap();
        assert!(text.starts_with("{\"type\":\"header\""), "{text}");
        assert!(text.contains("\"follow\":\"[::1]:1,[::1]:2\""), "{text}");
        let back: Header = serde_json::from_str(&text).unwrap();
        assert_eq!(back, h);
    }
}

//! tcptrace's pipeline, without the kernel: what happens to a transition
//! between the ring buffer and the screen, the recording or the report.
//!
//! The stages, in the order a transition meets them:
//! [`decode`] (ring bytes to a [`model::Transition`]), [`attribute`]
//! (its socket, holders and time in state: a [`model::Row`]), [`order`]
//! (when a row may go out, in time order), [`filter`], [`output`] (text,
//! JSON Lines, metrics), [`recording`] (write, and read back) and
//! [`analyse`] (reports from recordings); [`timewait`] follows the
//! time-wait sockets the kernel reports, where it can. [`model`] holds the types they
//! share; nothing here loads a program or needs privileges, so
//! `cargo test -p tcptrace-core` runs anywhere.

pub mod analyse;
pub mod attribute;
pub mod cgroup;
pub mod decode;
pub mod fasthash;
pub mod filter;
pub mod model;
pub mod order;
pub mod output;
pub mod recording;
pub mod timewait;
pub mod words;

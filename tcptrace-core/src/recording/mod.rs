//! Record: write transitions to a file that survives its writer, and read
//! them back.
//!
//! Two formats: the compact binary one (the default; see
//! docs/recording-format.md), and JSON Lines, for log shippers
//! (`--write-format json`, or a file name ending in `.jsonl`). Both hold
//! the same things: a header, one record per transition (exactly what
//! `--format json --time utc` prints), notes about sockets, and on a clean
//! exit a stats record.
//!
//! - [`write`]: the [`Recorder`], which buffers records, writes them whole
//!   and rotates files;
//! - [`binary`]: the binary format's encoding and decoding;
//! - `direct`: the file's output, past the page cache at high rates;
//! - [`json`]: the JSON row as serde reads it back (its keys are
//!   [`crate::output::json::Key`]);
//! - [`read`]: replay, either format, one file or a rotation, or a file
//!   still being written.

pub mod binary;
mod direct;
pub mod json;
pub mod read;
pub mod write;

pub use write::{Note, Options, Recorder, WriteFailure, WriteFormat};

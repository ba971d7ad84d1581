//! Analyse: turn a recording into an incident report.
//!
//! One pass, streaming: per-socket state lives only while the socket is
//! open, and time-in-state distributions are histograms, so memory follows
//! the number of sockets open at once, not the length of the recording.
//!
//! The stages, in the order a recording meets them: `fold.rs` folds each
//! item into an [`Analysis`] (the only stage that sees every row),
//! `report.rs` turns what it kept into a [`Report`] of plain values (what
//! `--format json` prints), `text.rs` lays that out as tables, and
//! [`html`] draws it as a page of pictures.

mod finwait2;
mod fold;
pub mod html;
mod report;
#[cfg(test)]
mod scenario;
mod text;

pub use fold::{Analysis, Counts, Ending, ending};
pub use report::{
    DownRow, DwellRow, EndpointRow, HolderRow, ListenPort, ListenerRow, OpenRow, ProcessRow,
    Report, ServiceOpen, StateCount, StillOpen, TimeWaitRow,
};
pub use text::listeners_text;

//! The types every stage shares, at the bottom of the pipeline: a TCP
//! [`State`], a [`Transition`] as the kernel reported it, a [`Row`] (a
//! transition with its socket's id and holders), what a user asked to see
//! ([`Spec`]) and the other [`Item`]s a recording holds.

mod clock;
mod counters;
mod items;
mod row;
mod spec;
mod state;
mod transition;

pub use clock::*;
pub use counters::*;
pub use items::*;
pub use row::*;
pub use spec::*;
pub use state::*;
pub use transition::*;

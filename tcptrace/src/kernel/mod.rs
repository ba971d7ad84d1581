//! The kernel side: what the kernel allows ([`privileges`], [`tracefs`],
//! [`btf`], [`layout`]), loading and attaching the eBPF programs
//! ([`object`], [`capture`]), reading their rings ([`ring`]), asking who
//! holds a socket ([`task_files`]); the time-wait programs, where the
//! kernel allows them ([`timewait`]).

pub mod btf;
pub mod capture;
pub mod layout;
pub mod object;
pub mod privileges;
pub mod ring;
pub mod task_files;
pub mod timewait;
pub mod tracefs;

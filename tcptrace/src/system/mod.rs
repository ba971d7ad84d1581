//! Looking at the system rather than tracing it: sockets through sock_diag
//! ([`sockdiag`]), the sockets open at start ([`snapshot`]), the time-wait
//! table ([`timewait`]), which processes hold a socket ([`holders`]) and
//! which cgroup a process is in ([`cgroups`]).

pub mod cgroups;
pub mod holders;
pub mod snapshot;
pub mod sockdiag;
pub mod timewait;

//! tcptrace's binary: the command line ([`cli`]), the live and offline
//! drivers ([`live`], [`offline`]), the kernel side ([`kernel`]: loading,
//! attaching, reading the rings) and the system look-ups ([`system`]:
//! sock_diag, the time-wait table, holders, cgroups). The pipeline itself,
//! kernel-free, is tcptrace-core. A library so that the fuzz targets can
//! reach the argument parser.

pub mod cli;
pub mod command;
pub mod endpoint;
pub mod kernel;
pub mod live;
pub mod offline;
pub mod otlp;
pub mod system;

/// Why tcptrace stopped without doing its job; each kind has its status.
pub enum Failure {
    /// Bad input (a file that exists, a corrupt recording): status 2.
    BadInput(anyhow::Error),
    /// Missing privileges: the message says which.
    Privileges(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

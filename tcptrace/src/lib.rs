//! tcptrace's library: everything but `main`, so that fuzz targets and
//! benchmarks can reach the parsers. Each module does one job:
//! `capture` (eBPF), `decode`, `attribute` (and `holders`, its look-ups),
//! `filter`, `format`, `record`, `replay`, `analyse`, and the live and
//! offline drivers.

pub mod analyse;
pub mod attribute;
pub mod btf;
pub mod capture;
pub mod cgroup;
pub mod cli;
pub mod command;
pub mod decode;
pub mod fasthash;
pub mod filter;
pub mod format;
pub mod holders;
pub mod html;
pub mod layout;
pub mod live;
pub mod metrics;
pub mod object;
pub mod offline;
pub mod privileges;
pub mod record;
pub mod replay;
pub mod ring;
pub mod snapshot;
pub mod sockdiag;
pub mod state;
pub mod timewait;
pub mod tracefs;

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

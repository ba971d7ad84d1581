//! What the real-kernel tests share, one piece per job: network namespaces
//! that clean up after themselves ([`netns`]), the scenario peers started in
//! them ([`peer`]), what `ss` says about their sockets ([`ss`]), the
//! tcptrace process under test ([`tracer`]), its JSON rows as typed values
//! and the rows a scenario expects ([`rows`]), and the odds and ends of the
//! host the tests lean on ([`host`]).

pub mod host;
pub mod netns;
pub mod peer;
pub mod rows;
pub mod ss;
pub mod tracer;

pub use host::{
    Pty, TempDir, chromium, chromium_dom, loaded_bpf_programs, monotonic_ns, prog_exists,
    svg_chart, thread_names, unique_port, wait_until,
};
pub use netns::Netns;
pub use peer::{Churn, ClientMode, Peer, PeerBuilder, Release, ServerMode, peer_bin};
pub use rows::{CLIENT_CLOSES, LISTENER, Life, Row, SERVER_PASSIVE, Want, assert_rows, life};
pub use ss::{Holder, SsSocket};
pub use tracer::{Output, Tracer, TracerBuilder, as_nobody, is_stats_line, tcptrace, tcptrace_bin};

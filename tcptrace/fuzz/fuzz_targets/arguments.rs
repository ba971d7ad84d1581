//! Every argument value goes through tcptrace's parsers: whatever the
//! bytes, the answer is a parsed command line or a clap error, never a
//! panic.
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use tcptrace::cli::Cli;

fuzz_target!(|data: &[u8]| {
    let args = data
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned());
    match Cli::try_parse_from(std::iter::once("tcptrace".to_string()).chain(args)) {
        Ok(cli) => drop(cli.live.filter.spec().describe()),
        Err(e) => drop(e.to_string()),
    }
});

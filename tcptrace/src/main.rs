//! tcptrace: every TCP state transition the kernel makes, as it happens.

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

use tcptrace::cli::{Cli, Command};
use tcptrace::{Failure, live, offline};

/// Bad command line or bad input.
const EXIT_USAGE: u8 = 2;
/// Could not trace (privileges, kernel, I/O).
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    init_logging(cli.debug);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tcptrace: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = match cli.command {
        None => runtime.block_on(live::run(cli.live)),
        Some(Command::Read(args)) => offline::read(args).map(|()| 0),
        Some(Command::Report(args)) => offline::report(args).map(|()| 0),
        Some(Command::Generate { what }) => tcptrace::cli::generate(what, &mut std::io::stdout())
            .map(|()| 0)
            .map_err(|e| Failure::Other(anyhow::anyhow!("cannot write to stdout: {e}"))),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(Failure::BadInput(e)) => {
            eprintln!("tcptrace: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Privileges(msg)) => {
            eprintln!("tcptrace: {msg}");
            ExitCode::from(EXIT_FAILURE)
        }
        Err(Failure::Other(e)) => {
            eprintln!("tcptrace: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Help and version go to stdout with status 0; anything else is one line
/// naming the problem, and status 2.
fn usage_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            // clap's first paragraph, on one line: "the following required
            // arguments were not provided: --write <FILE>".
            let text = e.to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = first.join(" ");
            let first = first.strip_prefix("error: ").unwrap_or(&first);
            eprintln!("tcptrace: {first} (see tcptrace --help)");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn init_logging(debug: bool) {
    // aya warns when the kernel refuses the object's BTF (generic Rust type names); a
    // tracepoint program does not need it, so that is noise for users.
    let default = if debug {
        "debug"
    } else {
        "warn,aya::bpf=error"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp(None)
        .format_target(false)
        .init();
}

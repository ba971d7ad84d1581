//! The live run: drain the ring, attribute, filter, print; until a signal,
//! `--duration` or `--count` says stop.
//!
//! The eBPF program never wakes us (a wake-up per event costs more than the
//! rest of the event). We poll: drain everything, then sleep a millisecond,
//! longer while nothing happens. The ring holds over half a second of the
//! fastest churn this kind of machine reaches, so a sleep never loses events.

use std::io::{self, BufWriter, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, sleep, sleep_until};

use crate::attribute::Attributor;
use crate::capture::{Capture, Counters, StartError};
use crate::cli::Cli;
use crate::decode::decode;
use crate::filter::{Admit, Filter};
use crate::format::{Clock, OutputFormat, Printer};

const POLL_BUSY: Duration = Duration::from_millis(1);
const POLL_IDLE_MAX: Duration = Duration::from_millis(16);
/// How often the kernel's lost counter is read.
const LOSS_CHECK: Duration = Duration::from_millis(200);

pub enum Failure {
    /// Missing privileges: the message says which.
    Privileges(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

/// Counts for the closing line.
#[derive(Default)]
struct Tally {
    shown: u64,
    hidden: u64,
    undecodable: u64,
}

enum Stop {
    Running,
    /// Signal, duration or count: finish cleanly.
    Done,
    /// Nobody reads our output any more (`tcptrace | head`).
    PipeClosed,
}

pub async fn run(cli: Cli) -> Result<(), Failure> {
    let mut filter = Filter::new(cli.filter.spec());
    let mut capture = Capture::start(&filter).map_err(|e| match e {
        StartError::Privileges(m) => Failure::Privileges(m),
        StartError::Other(e) => Failure::Other(e),
    })?;
    let clock = Clock::now();
    let mut printer = Printer::new(cli.output.style(), clock);
    let mut out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let mut attributor = Attributor::new();
    let mut tally = Tally::default();

    if cli.output.format == OutputFormat::Text && !cli.output.no_header {
        printer.header(&mut out).context("cannot write to stdout")?;
        out.flush().ok();
    }
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    // Tests and scripts wait for this line: from here on nothing is missed.
    eprintln!(
        "tcptrace: tracing {}; Ctrl-C to stop",
        cli.filter.describe()
    );

    let deadline = cli.duration.map(|d| Instant::now() + d);
    let mut reported_lost = 0u64;
    let mut next_loss_check = Instant::now() + LOSS_CHECK;
    let mut idle = POLL_BUSY;
    let mut stop = Stop::Running;
    loop {
        let before = tally.shown + tally.hidden;
        let drained = drain(
            &mut capture,
            &mut attributor,
            &mut filter,
            &mut printer,
            &mut out,
            &mut tally,
            cli.count,
        );
        capture.flush_logs();
        match drained.and_then(|s| out.flush().map(|()| s)) {
            Ok(s) => {
                if !matches!(s, Stop::Running) {
                    stop = s;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => stop = Stop::PipeClosed,
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context("cannot write to stdout")
                    .into());
            }
        }
        if Instant::now() >= next_loss_check {
            next_loss_check = Instant::now() + LOSS_CHECK;
            reported_lost = warn_lost(&capture, reported_lost);
        }
        if !matches!(stop, Stop::Running) {
            break;
        }
        idle = if tally.shown + tally.hidden == before {
            (idle * 2).min(POLL_IDLE_MAX)
        } else {
            POLL_BUSY
        };
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            _ = sleep(idle) => {}
            _ = sigint.recv() => stop = Stop::Done,
            _ = sigterm.recv() => stop = Stop::Done,
            _ = sighup.recv() => stop = Stop::Done,
            _ = sleep_until(deadline.unwrap_or(far)) => stop = Stop::Done,
        }
        if matches!(stop, Stop::Done) {
            // What is already in the ring happened before the stop: show it.
            let last = drain(
                &mut capture,
                &mut attributor,
                &mut filter,
                &mut printer,
                &mut out,
                &mut tally,
                cli.count,
            );
            match last.and_then(|_| out.flush()) {
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context("cannot write to stdout")
                        .into());
                }
                Ok(()) => {}
            }
            break;
        }
    }
    let counters = capture.counters().unwrap_or_default();
    warn_lost(&capture, reported_lost);
    if tally.undecodable > 0 {
        eprintln!(
            "tcptrace: warning: {} ring entries could not be decoded",
            tally.undecodable
        );
    }
    eprintln!(
        "tcptrace: {} transitions shown, {} filtered, {} lost",
        tally.shown,
        tally.hidden + counters.filtered,
        counters.lost
    );
    Ok(())
}

/// Processes everything in the ring now.
fn drain(
    capture: &mut Capture,
    attributor: &mut Attributor,
    filter: &mut Filter,
    printer: &mut Printer,
    out: &mut impl Write,
    tally: &mut Tally,
    count: Option<u64>,
) -> io::Result<Stop> {
    while let Some(item) = capture.next() {
        let t = match decode(&item) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("{e}");
                tally.undecodable += 1;
                continue;
            }
        };
        drop(item);
        let row = attributor.observe(&t);
        match filter.admit(row) {
            Admit::Hidden => tally.hidden += 1,
            Admit::Held => {}
            Admit::Show(held) => {
                for r in held.iter().chain(std::iter::once(&row)) {
                    printer.row(out, r)?;
                    tally.shown += 1;
                    if count.is_some_and(|n| tally.shown >= n) {
                        return Ok(Stop::Done);
                    }
                }
            }
        }
    }
    Ok(Stop::Running)
}

/// Warns about events lost since the last warning; returns the new total.
fn warn_lost(capture: &Capture, reported: u64) -> u64 {
    let Counters { lost, .. } = capture.counters().unwrap_or_default();
    if lost > reported {
        eprintln!(
            "tcptrace: warning: {} transitions lost: the ring buffer was full ({lost} lost in all)",
            lost - reported
        );
    }
    lost.max(reported)
}

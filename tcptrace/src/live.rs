//! The live run: drain the ring, attribute, filter, print and record; until
//! a signal, `--duration` or `--count` says stop.
//!
//! The eBPF program never wakes us (a wake-up per event costs more than the
//! rest of the event). We poll: drain everything, then sleep a millisecond,
//! longer while nothing happens. The ring holds over half a second of the
//! fastest churn this kind of machine reaches, so a sleep never loses events.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, sleep, sleep_until};

use crate::Failure;
use crate::attribute::{Attributor, Row};
use crate::capture::{Capture, Counters, StartError};
use crate::cli::LiveArgs;
use crate::decode::decode;
use crate::filter::{Admit, Filter};
use crate::format::{Clock, OutputFormat, Printer};
use crate::privileges;
use crate::record::{self, Header, Recorder, Stats};

const POLL_BUSY: Duration = Duration::from_millis(1);
const POLL_IDLE_MAX: Duration = Duration::from_millis(16);
/// How often the kernel's lost counter is read.
const LOSS_CHECK: Duration = Duration::from_millis(200);
const STDOUT_BUFFER: usize = 1 << 16;

/// Counts for the closing line.
#[derive(Default)]
struct Tally {
    shown: u64,
    hidden: u64,
    undecodable: u64,
}

/// Why the loop ends.
enum Stop {
    /// Signal, duration or count: finish cleanly.
    Done,
    /// Nobody reads our output any more (`tcptrace | head`): finish quietly.
    PipeClosed,
    /// The recording could not be written: finish, then fail.
    RecordFailed(record::WriteFailure),
}

/// Where shown rows go: the terminal (unless `-q`) and the recording.
struct Outputs {
    printer: Printer,
    stdout: Option<Vec<u8>>,
    recorder: Option<Recorder>,
    lost_output: u64,
}

impl Outputs {
    fn emit(&mut self, row: &Row) -> Result<(), Stop> {
        if let Some(buf) = &mut self.stdout {
            self.printer
                .row(buf, row)
                .expect("writing to a Vec cannot fail");
        }
        if let Some(r) = &mut self.recorder {
            r.row(row).map_err(Stop::RecordFailed)?;
        }
        Ok(())
    }

    /// Writes what is pending: stdout now, the recording on its cadence.
    fn flush(&mut self) -> Result<(), Stop> {
        self.flush_stdout()?;
        if let Some(r) = &mut self.recorder {
            r.tick().map_err(Stop::RecordFailed)?;
        }
        Ok(())
    }

    fn flush_stdout(&mut self) -> Result<(), Stop> {
        if let Some(buf) = &mut self.stdout
            && !buf.is_empty()
        {
            match write_stdout(buf) {
                Ok(()) => buf.clear(),
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(Stop::PipeClosed),
                Err(e) => {
                    eprintln!("tcptrace: cannot write to stdout: {e}");
                    return Err(Stop::PipeClosed);
                }
            }
        }
        Ok(())
    }
}

/// Writes to fd 1 without std's line buffering (one write per batch).
fn write_stdout(buf: &[u8]) -> io::Result<()> {
    let fd = io::stdout().as_raw_fd();
    // SAFETY: fd 1 stays open for the life of the process; ManuallyDrop keeps
    // this File from closing it.
    let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    f.write_all(buf)
}

pub async fn run(args: LiveArgs) -> Result<(), Failure> {
    let spec = args.filter.spec();
    let mut filter = Filter::new(spec.clone());
    // One clock for the terminal and the recording, so that a replay's
    // relative times match the live ones. The recording is created before
    // tracing starts: a bad path costs nothing.
    let clock = Clock::now();
    let recorder = match &args.record.write {
        Some(path) => Some(
            Recorder::create(
                record::Options {
                    path: path.clone(),
                    force: args.record.force,
                    rotate_size: args.record.rotate_size,
                    rotate_keep: args.record.rotate_keep,
                },
                Header::new(clock, spec.clone()),
            )
            .map_err(Failure::BadInput)?,
        ),
        None => None,
    };
    let mut capture = Capture::start(&filter).map_err(|e| match e {
        StartError::Privileges(m) => Failure::Privileges(m),
        StartError::Other(e) => Failure::Other(e),
    })?;
    // Attached, files open: nothing ahead needs a capability.
    if let Err(e) = privileges::drop_all() {
        log::warn!("cannot drop capabilities: {e}");
    }
    let printer = Printer::new(args.output.style(), clock);
    let mut stdout = (!args.record.quiet).then(|| Vec::with_capacity(STDOUT_BUFFER * 2));
    if let Some(buf) = &mut stdout
        && args.output.format == OutputFormat::Text
        && !args.output.no_header
    {
        printer.header(buf).expect("writing to a Vec cannot fail");
    }
    let mut outputs = Outputs {
        printer,
        stdout,
        recorder,
        lost_output: 0,
    };
    let mut attributor = Attributor::new();
    let mut tally = Tally::default();

    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let recording = outputs
        .recorder
        .as_ref()
        .map(|r| format!(", recording to {}", r.path().display()))
        .unwrap_or_default();
    // Tests and scripts wait for this line: from here on nothing is missed.
    eprintln!(
        "tcptrace: tracing {}{recording}; Ctrl-C to stop",
        spec.describe()
    );
    let started = Instant::now();

    let deadline = args.duration.map(|d| Instant::now() + d);
    let mut reported_lost = Counters::default();
    let mut next_loss_check = Instant::now() + LOSS_CHECK;
    let mut idle = POLL_BUSY;
    let stop = loop {
        let before = tally.shown + tally.hidden;
        let drained = drain(
            &mut capture,
            &mut attributor,
            &mut filter,
            &mut outputs,
            &mut tally,
            args.count,
        );
        capture.flush_logs();
        if let Err(stop) = drained.and_then(|()| outputs.flush()) {
            break stop;
        }
        if Instant::now() >= next_loss_check {
            next_loss_check = Instant::now() + LOSS_CHECK;
            reported_lost = warn_lost(&capture, reported_lost);
        }
        idle = if tally.shown + tally.hidden == before {
            (idle * 2).min(POLL_IDLE_MAX)
        } else {
            POLL_BUSY
        };
        let far = Instant::now() + Duration::from_secs(3600);
        let signalled = tokio::select! {
            _ = sleep(idle) => false,
            _ = sigint.recv() => true,
            _ = sigterm.recv() => true,
            _ = sighup.recv() => true,
            _ = sleep_until(deadline.unwrap_or(far)) => true,
        };
        if signalled {
            // A second Ctrl-C during the final drain ends the process at once.
            // SAFETY: restoring the default disposition of a signal.
            unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
            // What is already in the ring happened before the stop: show it.
            let last = drain(
                &mut capture,
                &mut attributor,
                &mut filter,
                &mut outputs,
                &mut tally,
                args.count,
            );
            break last
                .and_then(|()| outputs.flush())
                .err()
                .unwrap_or(Stop::Done);
        }
    };

    // Rows of the last batch (a --count reached mid-batch, a failed
    // recording) still go to the terminal.
    if !matches!(stop, Stop::PipeClosed) {
        let _ = outputs.flush_stdout();
    }
    let counters = capture.counters().unwrap_or_default();
    warn_lost(&capture, reported_lost);
    drop(capture);
    if tally.undecodable > 0 {
        eprintln!(
            "tcptrace: warning: {} ring entries could not be decoded",
            tally.undecodable
        );
    }
    let mut failure = None;
    if let Stop::RecordFailed(f) = stop {
        outputs.lost_output += f.lost;
        failure = Some(f.message);
    } else if let Some(r) = outputs.recorder.take() {
        let stats = Stats {
            kind: "stats".into(),
            events: r.events,
            lost_ring: counters.lost,
            missed_kernel: counters.missed,
            lost_output: outputs.lost_output,
            duration_s: started.elapsed().as_secs_f64(),
        };
        if let Err(f) = r.finish(stats) {
            failure = Some(f.message);
        }
    }
    eprintln!(
        "tcptrace: {} transitions shown, {} filtered, {} lost, {} missed by the kernel",
        tally.shown,
        tally.hidden + counters.filtered,
        counters.lost,
        counters.missed
    );
    match failure {
        Some(message) => Err(Failure::Other(anyhow!(message))),
        None => Ok(()),
    }
}

/// Processes everything in the ring now.
fn drain(
    capture: &mut Capture,
    attributor: &mut Attributor,
    filter: &mut Filter,
    outputs: &mut Outputs,
    tally: &mut Tally,
    count: Option<u64>,
) -> Result<(), Stop> {
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
                    outputs.emit(r)?;
                    tally.shown += 1;
                    if count.is_some_and(|n| tally.shown >= n) {
                        return Err(Stop::Done);
                    }
                }
            }
        }
        if outputs
            .stdout
            .as_ref()
            .is_some_and(|b| b.len() >= STDOUT_BUFFER)
        {
            outputs.flush()?;
        }
    }
    Ok(())
}

/// Warns about transitions lost (ring full) or missed (the kernel skipped
/// the program) since the last warning; returns the new totals.
fn warn_lost(capture: &Capture, reported: Counters) -> Counters {
    let now = capture.counters().unwrap_or_default();
    if now.lost > reported.lost {
        eprintln!(
            "tcptrace: warning: {} transitions lost: the ring buffer was full ({} lost in all)",
            now.lost - reported.lost,
            now.lost
        );
    }
    if now.missed > reported.missed {
        eprintln!(
            "tcptrace: warning: the kernel skipped the tracer {} times: another BPF program \
             was running on that CPU ({} in all)",
            now.missed - reported.missed,
            now.missed
        );
    }
    Counters {
        lost: now.lost.max(reported.lost),
        missed: now.missed.max(reported.missed),
        filtered: now.filtered,
    }
}

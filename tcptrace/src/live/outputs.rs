//! Where shown rows go: the terminal (unless `-q`), the recording and the
//! OTLP collector (`--otlp`, through its exporter's channel). The
//! terminal's rows gather in a buffer written in one go per poll, not a
//! write per row.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};

use tcptrace_core::attribute::UnseenEnd;
use tcptrace_core::model::{Clock, Gap, Row};
use tcptrace_core::output::{OutputFormat, Printer};
use tcptrace_core::recording::Recorder;

use super::Stop;
use crate::cli::LiveArgs;
use crate::otlp::Feed;

/// The terminal's buffer is written out once it holds this much.
pub(super) const STDOUT_BUFFER: usize = 1 << 16;

pub(super) struct Outputs {
    pub printer: Printer,
    pub stdout: Option<Vec<u8>>,
    pub recorder: Option<Recorder>,
    pub otlp: Option<Feed>,
    pub lost_output: u64,
}

impl Outputs {
    /// The terminal as `args` ask (with the header line for text), and the
    /// recording opened already.
    pub fn new(
        args: &LiveArgs,
        clock: Clock,
        recorder: Option<Recorder>,
        otlp: Option<Feed>,
    ) -> Outputs {
        let printer = Printer::new(args.output.style(), clock);
        let mut stdout = (!args.record.quiet).then(|| Vec::with_capacity(STDOUT_BUFFER * 2));
        if let Some(buf) = &mut stdout
            && args.output.format == OutputFormat::Text
            && !args.output.no_header
        {
            printer.header(buf).expect("writing to a Vec cannot fail");
        }
        Outputs {
            printer,
            stdout,
            recorder,
            otlp,
            lost_output: 0,
        }
    }

    pub fn emit(&mut self, row: &Row) -> Result<(), Stop> {
        if let Some(buf) = &mut self.stdout {
            self.printer.row_into(buf, row);
        }
        if let Some(r) = &mut self.recorder {
            r.row(row).map_err(Stop::RecordFailed)?;
        }
        if let Some(f) = &mut self.otlp {
            f.push(row);
        }
        Ok(())
    }

    /// Notes in the recording a socket whose end never arrived, so that a
    /// report does not take it for one still open.
    pub fn gap(&mut self, end: &UnseenEnd) -> Result<(), Stop> {
        if let Some(r) = &mut self.recorder {
            r.note(&Gap {
                kind: "gap".into(),
                sock: end.sock,
                state: end.state.to_string(),
                ts_ns: end.by_ns,
            })
            .map_err(Stop::RecordFailed)?;
        }
        Ok(())
    }

    /// The terminal's buffer is full enough to write out.
    pub fn stdout_full(&self) -> bool {
        self.stdout
            .as_ref()
            .is_some_and(|b| b.len() >= STDOUT_BUFFER)
    }

    /// Writes what is pending: stdout now, the recording on its cadence.
    pub fn flush(&mut self) -> Result<(), Stop> {
        self.flush_stdout()?;
        if let Some(r) = &mut self.recorder {
            r.tick().map_err(Stop::RecordFailed)?;
        }
        Ok(())
    }

    pub fn flush_stdout(&mut self) -> Result<(), Stop> {
        if let Some(buf) = &mut self.stdout
            && !buf.is_empty()
        {
            match write_stdout(buf) {
                Ok(()) => buf.clear(),
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(Stop::PipeClosed),
                Err(e) => return Err(Stop::OutputFailed(format!("cannot write to stdout: {e}"))),
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

//! The live run: drain the rings, attribute, filter, print and record;
//! until a signal, `--duration` or `--count` says stop.
//!
//! The eBPF program never wakes us (a wake-up per event costs more than the
//! rest of the event). We poll: drain everything, then sleep a millisecond,
//! longer while nothing happens. The rings hold over half a second of the
//! fastest churn this kind of machine reaches, so a sleep never loses events
//! as long as this thread gets the CPU it needs, hence `--nice`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, sleep, sleep_until};

use crate::Failure;
use crate::cli::LiveArgs;
use crate::command;
use crate::kernel::capture::{Capture, SETTLE_NS, StartError};
use crate::kernel::privileges;
use crate::system::cgroups::Cgroups;
use crate::system::holders;
use crate::system::snapshot;
use crate::system::timewait::TimeWait;
use tcptrace_common::Event;
use tcptrace_core::analyse::{self, Analysis};
use tcptrace_core::attribute::{Attributor, UnseenEnd, Unverified};
use tcptrace_core::decode::{Decoded, classify};
use tcptrace_core::filter::{Admit, Filter};
use tcptrace_core::model::{
    Clock, Close, Counters, Gap, Header, Holders, HoldersNote, Item, Origin, Row, State, Stats,
    intern_reason, may_await_sent_reset, monotonic_ns,
};
use tcptrace_core::output::metrics::Metrics;
use tcptrace_core::output::{self, OutputFormat, Printer};
use tcptrace_core::recording::{self, Recorder};
use tcptrace_core::words::plural;

const POLL_BUSY: Duration = Duration::from_millis(1);
const POLL_IDLE_MAX: Duration = Duration::from_millis(16);
/// How often the kernel's lost counter is read.
const LOSS_CHECK: Duration = Duration::from_millis(200);
const STDOUT_BUFFER: usize = 1 << 16;
/// How long after a row the kernel stamps the event that completes it (the
/// reset it sends, a child's addresses), with room for an emulated CPU: the
/// two are microseconds apart in the same softirq on real hardware.
const FOLLOWS_NS: u64 = 10_000_000;
/// How often sockets whose holders no event told are looked up (a /proc
/// walk each time there are any).
const LOOKUP_EVERY: Duration = Duration::from_millis(250);

/// Counts for the closing line.
#[derive(Default)]
struct Tally {
    /// Ring entries read.
    seen: u64,
    /// Transitions shown (the tracepoint's).
    shown: u64,
    /// Rows of existing sockets shown.
    snapshot: u64,
    /// Changes found in the time-wait table and shown.
    timewait: u64,
    hidden: u64,
    undecodable: u64,
    /// Transitions the kernel delivered a second time, shown once.
    repeated: u64,
}

/// Why the loop ends.
enum Stop {
    /// Signal, duration or count: finish cleanly.
    Done,
    /// Nobody reads our output any more (`tcptrace | head`): finish quietly.
    PipeClosed,
    /// The recording could not be written: finish, then fail.
    RecordFailed(recording::WriteFailure),
    /// stdout failed otherwise (a full disk under `> file`): finish, then fail.
    OutputFailed(String),
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
            self.printer.row_into(buf, row);
        }
        if let Some(r) = &mut self.recorder {
            r.row(row).map_err(Stop::RecordFailed)?;
        }
        Ok(())
    }

    /// Notes in the recording a socket whose end never arrived, so that a
    /// report does not take it for one still open.
    fn gap(&mut self, end: &UnseenEnd) -> Result<(), Stop> {
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

/// Traces until told to stop; the exit status is 0, or the traced
/// command's.
pub async fn run(args: LiveArgs) -> Result<u8, Failure> {
    let command = if args.command.is_empty() {
        None
    } else {
        Some(command::Prepared::new(&args.command).map_err(Failure::BadInput)?)
    };
    let spec = args.filter.spec();
    let filter = Filter::new(spec.clone());
    // One clock for the terminal and the recording, so that a replay's
    // relative times match the live ones. The recording is created before
    // tracing starts: a bad path costs nothing.
    let clock = Clock::now();
    let recorder = match &args.record.write {
        Some(path) => Some(
            Recorder::create(
                recording::Options {
                    path: path.clone(),
                    force: args.record.force,
                    rotate_size: args.record.rotate_size,
                    rotate_keep: args.record.rotate_keep,
                    format: args.record.write_format,
                    skaddr: args.output.show_skaddr,
                },
                Header::new(clock, spec.clone()),
            )
            .map_err(Failure::BadInput)?,
        ),
        None => None,
    };
    let mut capture = Capture::start(&filter, !args.no_owner_hooks).map_err(|e| match e {
        StartError::Privileges(m) => Failure::Privileges(m),
        StartError::Other(e) => Failure::Other(e),
    })?;
    // Sockets that exist already, and netlink sockets in each namespace for
    // following time-wait: both need privileges we are about to drop.
    let mut attributor = Attributor::new();
    let mut cgroups = Cgroups::new();
    let mut namespaces = if args.no_snapshot && args.no_timewait {
        Vec::new()
    } else {
        snapshot::namespaces(spec.netns)
    };
    // Sockets whose holders change unseen are looked up later, in these.
    let lookups = snapshot::namespaces(spec.netns);
    let existing = if args.no_snapshot {
        None
    } else {
        match snapshot::take(&mut namespaces, &filter, &mut attributor, &mut cgroups) {
            Ok(found) => Some(found),
            Err(e) => {
                eprintln!("tcptrace: warning: no snapshot of the existing sockets: {e:#}");
                None
            }
        }
    };
    let mut timewait = TimeWait::new(
        if args.no_timewait {
            Vec::new()
        } else {
            namespaces
        },
        snapshot::kernel_ports(&filter),
    );
    if let Some(found) = &existing {
        for row in &found.timewait {
            timewait.watch_existing(row);
        }
    }
    // Bound now: a port below 1024 needs a capability we are about to drop.
    let metrics_listener = match args.metrics {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|e| Failure::BadInput(anyhow!("cannot serve metrics on {addr}: {e}")))?,
        ),
        None => None,
    };
    // This thread drains the ring: it must not wait behind the workload.
    if let Err(e) = privileges::prioritize(args.nice) {
        eprintln!(
            "tcptrace: warning: cannot raise the priority to nice {} ({e}); under full \
             load events may be lost (needs CAP_SYS_NICE; --nice 0 silences this)",
            args.nice
        );
    }
    // Attached, files open: nothing ahead needs a capability but reading
    // other processes' descriptor tables, to tell who holds a socket.
    // Starting the command as the sudo caller needs two more, until then.
    let keep_for_command: &[u32] = match &command {
        Some(c) if c.needs_setuid() => &[
            privileges::CAP_SYS_PTRACE,
            privileges::CAP_SETUID,
            privileges::CAP_SETGID,
        ],
        _ => &[privileges::CAP_SYS_PTRACE],
    };
    if let Err(e) = privileges::drop_all_but(keep_for_command) {
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
    let outputs = Outputs {
        printer,
        stdout,
        recorder,
        lost_output: 0,
    };
    let mut pipe = Pipeline {
        attributor,
        timewait,
        following_timewait: !args.no_timewait,
        filter,
        outputs,
        tally: Tally::default(),
        count: args.count,
        pending: VecDeque::new(),
        reset_reasons: reason_names(capture.reset_reasons()),
        metrics: metrics_listener.as_ref().map(|_| Metrics::new()),
        batch: Vec::new(),
        cgroups,
        lookups,
        next_lookup: Instant::now(),
        analysis: command.as_ref().map(|_| {
            // The header gives the summary wall-clock times.
            let mut a = Analysis::new();
            a.add(Item::Header(Box::new(Header::new(clock, spec.clone()))));
            a
        }),
        timewait_rows: VecDeque::new(),
        ring_read_to: 0,
        owner_hooks: !args.no_owner_hooks,
        addressless_children: false,
    };
    if let Some(found) = existing {
        for row in found.rows {
            pipe.pending.push_back(Pending { row, waits: false });
        }
        pipe.release(true).ok();
        pipe.outputs.flush_stdout().ok();
    }

    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let recording = pipe
        .outputs
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

    let mut deadline = args.duration.map(|d| Instant::now() + d);
    let mut traced = Traced::default();
    if let Some(c) = &command {
        match c.start() {
            Ok(running) => traced.running = Some(running),
            Err(e) => {
                eprintln!("tcptrace: {e:#}");
                traced.status = Some(COMMAND_NOT_STARTED);
                deadline = Some(Instant::now());
            }
        }
        if let Err(e) = privileges::drop_all_but(&[privileges::CAP_SYS_PTRACE]) {
            log::warn!("cannot drop capabilities: {e}");
        }
    }
    let mut stuck = args.stuck.map(|threshold| StuckWatch {
        threshold,
        every: (threshold / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
        next: Instant::now(),
        by_owner: BTreeMap::new(),
        orphans: 0,
    });
    let mut reported_lost = Counters::default();
    let mut reported_gaps = 0;
    let mut next_loss_check = Instant::now() + LOSS_CHECK;
    let mut idle = POLL_BUSY;
    let mut stop_failure: Option<Stop> = None;
    let stop = loop {
        let before = pipe.tally.seen;
        let drained = pipe.drain(&mut capture, false);
        capture.flush_logs();
        if let Err(stop) = drained.and_then(|()| pipe.outputs.flush()) {
            break stop;
        }
        if let Some(w) = &mut stuck
            && Instant::now() >= w.next
        {
            w.next = Instant::now() + w.every;
            if let Err(stop) = w.check(&mut pipe) {
                break stop;
            }
        }
        if Instant::now() >= pipe.next_lookup {
            pipe.next_lookup = Instant::now() + LOOKUP_EVERY;
            let unverified = pipe.attributor.take_unverified();
            if let Err(stop) = pipe.note_holders(&unverified, false) {
                break stop;
            }
        }
        if let Some(status) = traced.running.as_mut().and_then(command::Running::ended) {
            let linger = args.linger.unwrap_or(DEFAULT_LINGER);
            if let Some(running) = traced.running.take() {
                eprintln!(
                    "tcptrace: {} {}; tracing {} more",
                    running.shown(),
                    command::describe(status),
                    humantime::format_duration(linger)
                );
            }
            traced.status = Some(command::exit_code(status));
            deadline = Some(Instant::now() + linger);
        }
        if Instant::now() >= next_loss_check {
            next_loss_check = Instant::now() + LOSS_CHECK;
            reported_lost = warn_lost(&capture, reported_lost);
            reported_gaps = warn_gaps(pipe.attributor.gaps(), reported_gaps);
        }
        idle = if pipe.tally.seen == before {
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
            Some(stream) = scrape(metrics_listener.as_ref()) => {
                if let Some(m) = &pipe.metrics {
                    let counters = capture.counters().unwrap_or_default();
                    let body = m.render(
                        &counters,
                        &pipe.attributor.sockets_by_state(),
                        pipe.attributor.gaps(),
                    );
                    tokio::spawn(crate::endpoint::answer(stream, body));
                }
                false
            }
        };
        if signalled {
            // A second Ctrl-C during the final drain ends the process at once.
            // SAFETY: restoring the default disposition of a signal.
            unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
            // What is already in the ring happened before the stop: show it.
            let last = pipe.drain(&mut capture, true);
            break last
                .and_then(|()| pipe.outputs.flush())
                .err()
                .unwrap_or(Stop::Done);
        }
    };

    if let Some(w) = &stuck {
        w.summary();
    }
    // The recording ends with who holds each socket still open, as `ss -p`
    // sees it now: what a report of the recording names for them.
    if matches!(stop, Stop::Done) && pipe.outputs.recorder.is_some() {
        let open = pipe.attributor.open_sockets();
        if let Err(e) = pipe.note_holders(&open, true) {
            stop_failure = Some(e);
        }
    }
    let stop = stop_failure.unwrap_or(stop);
    let Pipeline {
        mut outputs,
        tally,
        timewait,
        analysis,
        ..
    } = pipe;
    if timewait.missed > 0 {
        eprintln!(
            "tcptrace: warning: {} not followed into the time-wait table (more than 65536 at \
             once, or in a namespace tcptrace could not open)",
            plural(
                timewait.missed,
                "closed connection was",
                "closed connections were"
            )
        );
    }
    // Rows of the last batch (a --count reached mid-batch, a failed
    // recording) still go to the terminal.
    if !matches!(stop, Stop::PipeClosed | Stop::OutputFailed(_)) {
        let _ = outputs.flush_stdout();
    }
    let counters = capture.counters().unwrap_or_default();
    warn_lost(&capture, reported_lost);
    let gaps = warn_gaps(pipe.attributor.gaps(), reported_gaps);
    drop(capture);
    if tally.undecodable > 0 {
        eprintln!(
            "tcptrace: warning: {} ring entries could not be decoded",
            tally.undecodable
        );
    }
    let mut failure = match &stop {
        Stop::OutputFailed(message) => Some(message.clone()),
        _ => None,
    };
    if let Stop::RecordFailed(f) = stop {
        outputs.lost_output += f.lost;
        failure = Some(f.message);
    } else if let Some(r) = outputs.recorder.take() {
        let stats = Stats {
            kind: "stats".into(),
            events: r.events,
            lost_ring: counters.lost,
            missed_kernel: counters.missed,
            repeated: tally.repeated,
            gaps,
            lost_output: outputs.lost_output,
            duration_s: started.elapsed().as_secs_f64(),
        };
        if let Err(f) = r.finish(stats) {
            failure = Some(f.message);
        }
    }
    let mut extra = String::new();
    if tally.repeated > 0 {
        extra.push_str(&format!(
            " ({} delivered twice by the kernel, shown once)",
            tally.repeated
        ));
    }
    if tally.snapshot > 0 {
        extra.push_str(&format!(
            ", {}",
            plural(tally.snapshot, "existing socket", "existing sockets")
        ));
    }
    if tally.timewait > 0 {
        extra.push_str(&format!(
            ", {} from the time-wait table",
            plural(tally.timewait, "change", "changes")
        ));
    }
    let gaps = if gaps > 0 {
        format!(", {} with gaps", plural(gaps, "socket", "sockets"))
    } else {
        String::new()
    };
    eprintln!(
        "tcptrace: {}{extra}, {} filtered, {} lost, {} missed by the kernel{gaps}",
        plural(tally.shown, "transition shown", "transitions shown"),
        tally.hidden + counters.filtered,
        counters.lost,
        counters.missed
    );
    if let Some(analysis) = &analysis {
        eprint!("{}", restart_summary(analysis));
    }
    if let Some(running) = &traced.running {
        eprintln!(
            "tcptrace: stopped while {} (pid {}) was still running",
            running.shown(),
            running.pid()
        );
    }
    match failure {
        Some(message) => Err(Failure::Other(anyhow!(message))),
        None => Ok(traced.exit_code()),
    }
}

/// With `-- COMMAND`, how long to go on tracing after it has ended.
const DEFAULT_LINGER: Duration = Duration::from_secs(3);
/// A command that could not be started, as a shell says it.
const COMMAND_NOT_STARTED: u8 = 127;
/// Stopped by a signal while the command still ran.
const INTERRUPTED: u8 = 130;

/// The command of `tcptrace -- COMMAND`, while it runs and once it ended.
#[derive(Default)]
struct Traced {
    running: Option<command::Running>,
    status: Option<u8>,
}

impl Traced {
    fn exit_code(&self) -> u8 {
        match (&self.running, self.status) {
            (Some(_), _) => INTERRUPTED,
            (None, Some(code)) => code,
            (None, None) => 0,
        }
    }
}

/// What the traced command did to the listening ports, for stderr.
fn restart_summary(analysis: &Analysis) -> String {
    analyse::listeners_text(&analysis.report(10))
}

/// Everything between the ring and the outputs.
struct Pipeline {
    attributor: Attributor,
    timewait: TimeWait,
    following_timewait: bool,
    filter: Filter,
    outputs: Outputs,
    tally: Tally,
    count: Option<u64>,
    /// Rows in ring order, not yet released. A possible abort waits here
    /// for the reset the kernel reports just after it; rows behind
    /// it wait too, so output stays in order.
    pending: VecDeque<Pending>,
    /// Names of the kernel's reset reasons, by number.
    reset_reasons: Vec<Option<&'static str>>,
    metrics: Option<Metrics>,
    /// Reused between reads of the rings.
    batch: Vec<Event>,
    cgroups: Cgroups,
    /// Namespaces to look up holders in (see `holders`).
    lookups: Vec<snapshot::Namespace>,
    next_lookup: Instant,
    /// With `-- COMMAND`: the rows shown, for the summary at the end.
    analysis: Option<Analysis>,
    /// Rows the time-wait table gave, waiting for the ring events that
    /// happened before them.
    timewait_rows: VecDeque<Row>,
    /// Every ring event stamped before this has been read.
    ring_read_to: u64,
    /// The accept, close, fork and exit hooks are attached.
    owner_hooks: bool,
    /// This kernel reports a child's first row before its addresses
    /// (before 6.6): later rows fill them in. Newer kernels never pay for
    /// the search.
    addressless_children: bool,
}

struct Pending {
    row: Row,
    /// Waiting for an event the kernel stamps just after it (a sent reset,
    /// a child's addresses), until every event up to `FOLLOWS_NS` later has
    /// been read. Counted in time, not in reads: the poll runs every
    /// millisecond under load, and on a slow (emulated) machine the second
    /// event can come later than the next read.
    waits: bool,
}

impl Pipeline {
    /// Processes everything in the ring now, and what the time-wait table
    /// says when it is due; `last` releases every row.
    fn drain(&mut self, capture: &mut Capture, last: bool) -> Result<(), Stop> {
        if self.timewait.due() {
            self.timewait_rows.extend(self.timewait.poll());
        }
        let mut batch = std::mem::take(&mut self.batch);
        let result = self.process(capture, &mut batch, last);
        self.batch = batch;
        result?;
        self.release(last)?;
        Ok(())
    }

    fn process(
        &mut self,
        capture: &mut Capture,
        batch: &mut Vec<Event>,
        last: bool,
    ) -> Result<(), Stop> {
        loop {
            batch.clear();
            let reading_from = monotonic_ns();
            let more = capture.read(batch, last);
            // The rings hand out an event up to `SETTLE_NS` after its time:
            // every event older than this has been read now. It holds once
            // this batch is processed: until then, a row placed by it (a
            // full queue releases mid-batch) could go out ahead of older
            // rows still in the batch.
            let read_to = (!more).then(|| reading_from.saturating_sub(SETTLE_NS));
            self.tally.undecodable = capture.undecodable();
            for e in batch.iter() {
                self.tally.seen += 1;
                // Transitions and rows are matched by reference where they
                // were returned: moved out, each was copied once more (a
                // tenth of the tracer's CPU under full churn).
                match classify(e) {
                    Decoded::State(ref mut t) => {
                        if t.task.pid != 0 {
                            t.task.cgroup = self.cgroups.path(e.cgroup, t.task.pid);
                        }
                        match self.attributor.observe(t) {
                            Some(ref mut row) => {
                                // Without the accept hook nothing tells when
                                // a queued child was accepted: say nothing.
                                row.queued &= self.owner_hooks;
                                if let Some(pid) = self.attributor.stale_owner(row) {
                                    let task = holders::process(pid, &mut self.cgroups)
                                        .or(row.owner)
                                        .unwrap_or_default();
                                    self.attributor.refresh_task(task);
                                    row.owner = Some(task);
                                }
                                let addressless = lacks_child_addresses(row);
                                self.addressless_children |= addressless;
                                if self.addressless_children {
                                    fill_child_addresses(&mut self.pending, row);
                                }
                                let waits = may_await_sent_reset(row) || addressless;
                                if waits || !self.pending.is_empty() {
                                    self.pending.push_back(Pending { row: *row, waits });
                                } else {
                                    // Nothing ahead of it: out at once, not
                                    // copied through the queue.
                                    self.release_row(row)?;
                                }
                            }
                            None => self.tally.repeated += 1,
                        }
                    }
                    Decoded::Accept {
                        skaddr, mut task, ..
                    } => {
                        task.cgroup = self.cgroups.path(e.cgroup, task.pid);
                        self.attributor.accepted(skaddr, task);
                    }
                    Decoded::Fork { parent, child } => self.attributor.forked(parent, child),
                    Decoded::Release { skaddr, pid } => self.attributor.released(skaddr, pid),
                    Decoded::Exit { pid } => self.attributor.exited(pid),
                    Decoded::Reset {
                        skaddr,
                        received: true,
                        ..
                    } => self.attributor.reset_received(skaddr),
                    Decoded::Reset { skaddr, reason, .. } => {
                        let name = self
                            .reset_reasons
                            .get(usize::from(reason))
                            .copied()
                            .flatten();
                        if let Some(p) = self.pending.iter_mut().rev().find(|p| {
                            p.waits && p.row.t.skaddr == skaddr && may_await_sent_reset(&p.row)
                        }) {
                            p.row.close = Some(Close::ResetSent(name));
                            p.waits = false;
                        }
                    }
                }
                if self.pending.len() >= 4096 {
                    self.release(last)?;
                }
            }
            if let Some(t) = read_to {
                self.ring_read_to = t;
            }
            for end in self.attributor.take_unseen_ends() {
                self.outputs.gap(&end)?;
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// Filters one row and emits what passes (with a held connect first).
    fn show(&mut self, row: &Row) -> Result<(), Stop> {
        match self.filter.admit(row) {
            Admit::Hidden => self.tally.hidden += 1,
            Admit::Held => {}
            Admit::Show(held) => {
                for r in held.as_deref().into_iter().chain(std::iter::once(row)) {
                    self.outputs.emit(r)?;
                    if let Some(m) = &mut self.metrics {
                        m.count(r);
                    }
                    if let Some(a) = &mut self.analysis {
                        a.add(Item::Row(*r));
                    }
                    match r.origin {
                        Origin::Tracepoint => self.tally.shown += 1,
                        Origin::Snapshot => self.tally.snapshot += 1,
                        Origin::TimeWait => self.tally.timewait += 1,
                    }
                    let transitions = self.tally.shown + self.tally.timewait;
                    if self.count.is_some_and(|n| transitions >= n) {
                        return Err(Stop::Done);
                    }
                }
            }
        }
        Ok(())
    }

    /// Filters and emits rows from the front of the queue, up to one still
    /// waiting for an event that follows it.
    fn release(&mut self, all: bool) -> Result<(), Stop> {
        // Rows are shown from where they wait, not moved out first.
        let mut pending = std::mem::take(&mut self.pending);
        let result = self.release_from(&mut pending, all);
        self.pending = pending;
        result
    }

    fn release_from(&mut self, pending: &mut VecDeque<Pending>, all: bool) -> Result<(), Stop> {
        loop {
            let Some(front) = pending.front() else {
                // With no ring row waiting, a time-wait row is due once
                // every ring event older than it has been read.
                return self.show_timewait_to(if all { u64::MAX } else { self.ring_read_to });
            };
            if !all
                && front.waits
                && front.row.t.ts_ns.saturating_add(FOLLOWS_NS) > self.ring_read_to
            {
                break;
            }
            let shown = self.release_row(&front.row);
            pending.pop_front();
            shown?;
        }
        Ok(())
    }

    /// Shows the time-wait table's rows up to `ts_ns`.
    fn show_timewait_to(&mut self, ts_ns: u64) -> Result<(), Stop> {
        while self
            .timewait_rows
            .front()
            .is_some_and(|tw| tw.t.ts_ns <= ts_ns)
        {
            let row = self.timewait_rows.pop_front().expect("front exists");
            self.show(&row)?;
        }
        Ok(())
    }

    /// Shows a ring row that nothing waits ahead of, after the time-wait
    /// table's rows older than it (they join the ring's in time order).
    fn release_row(&mut self, row: &Row) -> Result<(), Stop> {
        self.show_timewait_to(row.t.ts_ns)?;
        // Final now (a sent reset has had its chance): an orderly close is
        // followed into the time-wait table, and a connection taking over a
        // time-wait socket ends the connection that left it.
        if self.following_timewait {
            if let Some(end) = self.timewait.reused(row) {
                self.show(&end)?;
            }
            self.timewait.watch(row);
        }
        self.show(row)?;
        if self
            .outputs
            .stdout
            .as_ref()
            .is_some_and(|b| b.len() >= STDOUT_BUFFER)
        {
            self.outputs.flush()?;
        }
        Ok(())
    }
}

impl Pipeline {
    /// Looks up who holds `sockets` now; where that differs from what
    /// their rows said (or, with `all`, in any case), the recording notes
    /// it. Returns the holders found, by socket address.
    fn note_holders(
        &mut self,
        sockets: &[Unverified],
        all: bool,
    ) -> Result<std::collections::HashMap<u64, Holders>, Stop> {
        let mut out = std::collections::HashMap::new();
        if sockets.is_empty() {
            return Ok(out);
        }
        let found = holders::look_up(&mut self.lookups, &mut self.cgroups, sockets);
        let now = monotonic_ns();
        for s in sockets {
            let changed = found
                .get(&s.skaddr)
                .and_then(|list| self.attributor.verified(s.skaddr, list));
            let Some(known) = self.attributor.holders(s.skaddr).cloned() else {
                continue;
            };
            if changed.is_some() || all {
                let row = Row {
                    t: s.t,
                    sock: s.sock,
                    owner: known.owner(),
                    dwell_ns: None,
                    close: None,
                    origin: Origin::Tracepoint,
                    queued: false,
                };
                if self.filter.passes(&row)
                    && !known.is_empty()
                    && let Some(r) = &mut self.outputs.recorder
                {
                    r.note(&HoldersNote::new(now, s.sock, &known))
                        .map_err(Stop::RecordFailed)?;
                }
            }
            out.insert(s.skaddr, known);
        }
        Ok(out)
    }
}

/// Before 6.6 or so the kernel reports a child's `LISTEN -> SYN_RECV` before
/// it copies the addresses in from the request, so its remote end reads
/// `0.0.0.0:0`; the `SYN_RECV -> ESTABLISHED` that follows at once has
/// them. That row is still waiting here: it gets them too, so that
/// `--rport`, `--follow` and reports see the connection from its first row.
fn fill_child_addresses(pending: &mut VecDeque<Pending>, row: &Row) {
    if (row.t.old, row.t.new) != (State::SYN_RECV, State::ESTABLISHED) {
        return;
    }
    if let Some(first) = pending
        .iter_mut()
        .rev()
        .take(64)
        .find(|p| p.row.sock == row.sock && lacks_child_addresses(&p.row))
    {
        first.row.t.local = row.t.local;
        first.row.t.remote = row.t.remote;
        first.waits = false;
    }
}

/// A child's first row as kernels before 6.6 report it; it waits (like a
/// possible abort) so that the row with the addresses can reach it.
fn lacks_child_addresses(row: &Row) -> bool {
    (row.t.old, row.t.new) == (State::LISTEN, State::SYN_RECV) && row.t.remote.port() == 0
}

/// The next scrape connection, or never when metrics are off.
async fn scrape(listener: Option<&tokio::net::TcpListener>) -> Option<tokio::net::TcpStream> {
    match listener {
        Some(l) => l.accept().await.ok().map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// `--stuck`: warns once per socket that stays too long where it should not.
struct StuckWatch {
    threshold: Duration,
    every: Duration,
    next: Instant,
    /// Stuck sockets per owner, for the closing summary.
    by_owner: BTreeMap<Option<(u32, String)>, u64>,
    /// Connections closed by their process and left in FIN_WAIT2.
    orphans: u64,
}

impl StuckWatch {
    /// Warns about sockets newly past the threshold, naming every process
    /// that holds each now (looked up, as `ss -p` would show them).
    fn check(&mut self, pipe: &mut Pipeline) -> Result<(), Stop> {
        let now = monotonic_ns();
        let threshold = self.threshold.as_nanos() as u64;
        let stuck: Vec<Row> = pipe
            .attributor
            .newly_stuck(now, threshold)
            .into_iter()
            .chain(pipe.timewait.newly_stuck(now, threshold))
            .filter(|row| pipe.filter.passes(row))
            .collect();
        if stuck.is_empty() {
            return Ok(());
        }
        let mut stuck = stuck;
        let connecting = holders::connecting_ends(&mut pipe.lookups, &stuck);
        for row in &mut stuck {
            if let Some([one]) = connecting.get(&row.sock).map(Vec::as_slice) {
                row.t.local = *one;
            }
        }
        // Orphans in the time-wait table have no holder to look up.
        let sockets: Vec<Unverified> = stuck
            .iter()
            .filter(|r| r.origin != Origin::TimeWait)
            .map(|r| Unverified {
                skaddr: r.t.skaddr,
                sock: r.sock,
                t: r.t,
            })
            .collect();
        let holders = pipe.note_holders(&sockets, true)?;
        for row in stuck {
            let named: Vec<(u32, String)> = holders
                .get(&row.t.skaddr)
                .map(|h| h.all().copied().collect::<Vec<_>>())
                .unwrap_or_else(|| row.owner.into_iter().collect())
                .into_iter()
                .map(|o| {
                    let mut comm = String::new();
                    output::escape_comm(&o.comm.as_str(), &mut comm);
                    (o.pid, comm)
                })
                .collect();
            let listed = named
                .iter()
                .map(|(pid, comm)| format!("pid {pid} ({comm})"))
                .collect::<Vec<_>>()
                .join(", ");
            let orphan = row.origin == Origin::TimeWait;
            let who = match (orphan, named.is_empty()) {
                (true, true) => "no process holds it".to_string(),
                (true, false) => format!("no process holds it (closed by {listed})"),
                (false, true) => "owner unknown".to_string(),
                (false, false) => listed,
            };
            let meaning = if orphan {
                "orphaned: closed by its process, and the peer has not closed its side \
                 (the kernel drops it after net.ipv4.tcp_fin_timeout)"
            } else if row.queued {
                "not accepted by the process yet (backlog)"
            } else {
                row.t.new.meaning()
            };
            let t = &row.t;
            // Several identical connects of one process pending: which
            // port is whose, nothing tells.
            let local = match connecting.get(&row.sock) {
                Some(ends) if ends.len() > 1 => format!(
                    "{}:(one of {})",
                    std::net::SocketAddr::new(t.local.ip(), 0)
                        .to_string()
                        .trim_end_matches(":0"),
                    ends.iter()
                        .map(|e| e.port().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => t.local.to_string(),
            };
            eprintln!(
                "tcptrace: stuck: {who}, {local} -> {} in {} for {:.1} s: {meaning} (sock {})",
                t.remote,
                t.new,
                row.dwell_ns.unwrap_or(0) as f64 / 1e9,
                row.sock
            );
            if orphan {
                self.orphans += 1;
            } else {
                *self.by_owner.entry(named.into_iter().next()).or_default() += 1;
            }
        }
        Ok(())
    }

    fn summary(&self) {
        let total: u64 = self.by_owner.values().sum::<u64>() + self.orphans;
        if total == 0 {
            return;
        }
        let mut parts: Vec<String> = self
            .by_owner
            .iter()
            .map(|(owner, n)| match owner {
                Some((pid, comm)) => format!("{n} of pid {pid} ({comm})"),
                None => format!("{n} of unknown owners"),
            })
            .collect();
        if self.orphans > 0 {
            parts.push(format!("{} orphaned (no process holds it)", self.orphans));
        }
        eprintln!(
            "tcptrace: {total} socket{} stuck longer than {}: {}",
            if total == 1 { "" } else { "s" },
            humantime::format_duration(self.threshold),
            parts.join(", ")
        );
    }
}

/// The reset reason table, by number, for rows to point into.
fn reason_names(table: &[(u8, String)]) -> Vec<Option<&'static str>> {
    let mut names = vec![None; 256];
    for (n, name) in table {
        names[usize::from(*n)] = Some(intern_reason(name));
    }
    names
}

/// Warns about sockets found with gaps in their history since the last
/// warning; returns the new total. Besides the losses counted above, the
/// kernel sometimes handles transitions without running any BPF program or
/// counting a skip: these gaps are the only trace they leave.
fn warn_gaps(now: u64, reported: u64) -> u64 {
    if now > reported {
        eprintln!(
            "tcptrace: warning: {} states: transitions between them never arrived ({now} in \
             all)",
            plural(now - reported, "socket skipped", "sockets skipped")
        );
    }
    now.max(reported)
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
            "tcptrace: warning: the kernel skipped the tracer for {} that no other program \
             emitted instead: a program of the tracer was already running on that CPU ({} in \
             all)",
            plural(now.missed - reported.missed, "transition", "transitions"),
            now.missed
        );
    }
    if now.hooks_missed > reported.hooks_missed {
        eprintln!(
            "tcptrace: warning: the kernel skipped the owner hooks (accept, close, fork, exit) \
             {}: another BPF program was running on that CPU, and as many changes of holder \
             went unseen; those sockets may name an earlier holder ({} in all)",
            plural(now.hooks_missed - reported.hooks_missed, "time", "times"),
            now.hooks_missed
        );
    }
    Counters {
        lost: now.lost.max(reported.lost),
        missed: now.missed.max(reported.missed),
        hooks_missed: now.hooks_missed.max(reported.hooks_missed),
        filtered: now.filtered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcptrace_core::model::{Comm, Family, Task, Transition};

    fn row(sock: u64, old: State, new: State, remote: &str) -> Row {
        Row {
            t: Transition {
                ts_ns: 0,
                skaddr: sock,
                task: Task::default(),
                thread: Comm::default(),
                old,
                new,
                family: Family::V4,
                local: "127.0.0.1:80".parse().unwrap(),
                remote: remote.parse().unwrap(),
                netns: 1,
            },
            sock,
            owner: None,
            dwell_ns: None,
            close: None,
            origin: Origin::Tracepoint,
            queued: true,
        }
    }

    #[test]
    fn a_childs_first_row_gets_the_clients_address_older_kernels_leave_out() {
        let mut pending = VecDeque::new();
        for r in [
            row(7, State::LISTEN, State::SYN_RECV, "0.0.0.0:0"),
            row(8, State::LISTEN, State::SYN_RECV, "0.0.0.0:0"),
        ] {
            pending.push_back(Pending {
                row: r,
                waits: false,
            });
        }
        fill_child_addresses(
            &mut pending,
            &row(7, State::SYN_RECV, State::ESTABLISHED, "127.0.0.1:5000"),
        );
        assert_eq!(pending[0].row.t.remote, "127.0.0.1:5000".parse().unwrap());
        // Another child's row keeps waiting for its own.
        assert_eq!(pending[1].row.t.remote.port(), 0);
    }
}

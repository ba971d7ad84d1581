//! The live run: drain the rings, attribute, order, filter, print and
//! record; until a signal, `--duration` or `--count` says stop.
//!
//! The eBPF program never wakes us (a wake-up per event costs more than the
//! rest of the event). We poll: drain everything, then sleep a millisecond
//! (4 ms under heavy traffic), longer while nothing happens. The rings hold
//! over half a second of the fastest churn this kind of machine reaches, so
//! a sleep never loses events as long as this thread gets the CPU it needs,
//! hence `--nice`.
//!
//! Here is the driver: set up (the recording, the capture, what exists
//! already, then privileges dropped), poll until told to stop, sum up. What
//! happens to each event is [`pipeline`]'s; where rows go, [`outputs`]';
//! `--stuck`, [`stuck`]'s; the warnings and the closing line, [`summary`]'s.

mod outputs;
mod pipeline;
mod stuck;
mod summary;

use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::{Instant, sleep, sleep_until};

use crate::Failure;
use crate::cli::{LiveArgs, OwnerHooks};
use crate::command;
use crate::endpoint;
use crate::kernel::capture::{Capture, Hooks, StartError};
use crate::kernel::privileges;
use crate::kernel::timewait::TimeWaitPath;
use crate::otlp;
use crate::system::cgroups::Cgroups;
use crate::system::holders::Finder;
use crate::system::snapshot::{self, Found};
use crate::system::timewait::TimeWait;
use tcptrace_core::analyse::Analysis;
use tcptrace_core::attribute::Attributor;
use tcptrace_core::filter::Filter;
use tcptrace_core::model::{Clock, Counters, Header, Item, Spec, Stats};
use tcptrace_core::order::Order;
use tcptrace_core::output::metrics::Metrics;
use tcptrace_core::recording::{self, Recorder};
use tcptrace_core::timewait::KernelTimeWait;

use outputs::Outputs;
use pipeline::{Pipeline, Tail};
use stuck::StuckWatch;
use summary::{Tally, Warned};

const POLL_BUSY: Duration = Duration::from_millis(1);
const POLL_IDLE_MAX: Duration = Duration::from_millis(16);
/// The sleep after a round that read at least [`LOADED_ROUND`] events.
/// Each wake-up is a timer, a switch and the runtime, and the round after
/// it starts on caches the churn has refilled meanwhile: on this project's
/// VM under full churn the same build spent about 720 ns of CPU an event
/// sleeping 1 ms and about 500 sleeping 4 or 8 ms. Rows wait 5 ms or more
/// for the merge of the rings anyway, so a longer sleep under load delays
/// little that was not waiting already.
const POLL_LOADED: Duration = Duration::from_millis(4);
/// Events in one round that make the next sleep [`POLL_LOADED`]: some
/// 100,000 a second at the 1 ms sleep, 32,000 at 4 ms. Slower traffic
/// keeps its 1 ms.
const LOADED_ROUND: u64 = 128;
/// How often the kernel's lost counter is read.
const LOSS_CHECK: Duration = Duration::from_millis(200);
/// How often sockets whose holders no event told are looked up (a /proc
/// walk each time there are any).
const LOOKUP_EVERY: Duration = Duration::from_millis(250);
/// With `-- COMMAND`, how long to go on tracing after it has ended.
const DEFAULT_LINGER: Duration = Duration::from_secs(3);
/// At the end, how long the collector may take to acknowledge what is
/// left before it goes to the spool.
const OTLP_PATIENCE: Duration = Duration::from_secs(5);
/// A command that could not be started, as a shell says it.
const COMMAND_NOT_STARTED: u8 = 127;
/// Stopped by a signal while the command still ran.
const INTERRUPTED: u8 = 130;

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

/// Traces until told to stop; the exit status is 0, or the traced
/// command's.
pub async fn run(args: LiveArgs) -> Result<u8, Failure> {
    let command = if args.command.is_empty() {
        None
    } else {
        Some(command::Prepared::new(&args.command).map_err(Failure::BadInput)?)
    };
    let mut live = set_up(&args, command.as_ref())?;
    let stop = live.poll().await;
    live.finish(stop)
}

/// The run once set up: what the poll loop works with.
struct Live {
    capture: Capture,
    pipe: Pipeline,
    signals: Signals,
    metrics_listener: Option<tokio::net::TcpListener>,
    traced: Traced,
    /// `--duration`, or the end of the linger after the command.
    deadline: Option<Instant>,
    linger: Duration,
    stuck: Option<StuckWatch>,
    warned: Warned,
    next_loss_check: Instant,
    next_lookup: Instant,
    /// The sleep between rounds: longer while nothing happens.
    idle: Duration,
    started: Instant,
}

/// Everything up to the line saying tracing has begun, and the command
/// started.
fn set_up(args: &LiveArgs, command: Option<&command::Prepared>) -> Result<Live, Failure> {
    let spec = args.filter.spec();
    let (capture, pipe, metrics_listener) = attach(args, command, &spec)?;
    let signals = Signals::new()?;
    announce(&spec, &pipe.tail.outputs);
    let started = Instant::now();
    let mut live = Live {
        capture,
        pipe,
        signals,
        metrics_listener,
        traced: Traced::default(),
        deadline: args.duration.map(|d| Instant::now() + d),
        linger: args.linger.unwrap_or(DEFAULT_LINGER),
        stuck: None,
        warned: Warned::default(),
        next_loss_check: started,
        next_lookup: started,
        idle: POLL_BUSY,
        started,
    };
    if let Some(c) = command {
        live.start_command(c);
    }
    live.stuck = args.stuck.map(StuckWatch::new);
    live.next_loss_check = Instant::now() + LOSS_CHECK;
    Ok(live)
}

/// Opens the recording, loads and attaches the programs, takes the sockets
/// that exist already, shows them, and drops the privileges no longer
/// needed.
fn attach(
    args: &LiveArgs,
    command: Option<&command::Prepared>,
    spec: &Spec,
) -> Result<(Capture, Pipeline, Option<tokio::net::TcpListener>), Failure> {
    let filter = Filter::new(spec.clone());
    // One clock for the terminal and the recording, so that a replay's
    // relative times match the live ones. The recording is created before
    // tracing starts: a bad path costs nothing.
    let clock = Clock::now();
    let recorder = open_recording(args, clock, spec)?;
    let otlp = start_otlp(args, clock)?;
    let hooks = match (args.no_owner_hooks, args.owner_hooks) {
        (true, _) => Hooks::Off,
        (false, OwnerHooks::Auto) => Hooks::Auto,
        (false, OwnerHooks::Syscalls) => Hooks::Syscalls,
    };
    // The forced fallback forces the polled time-wait table too, so that
    // one kernel tests both paths.
    let want_kernel_timewait = !args.no_timewait && hooks != Hooks::Syscalls;
    let mut capture =
        Capture::start(&filter, hooks, want_kernel_timewait).map_err(|e| match e {
            StartError::Privileges(m) => Failure::Privileges(m),
            StartError::Other(e) => Failure::Other(e),
        })?;
    if let Some(line) = capture.owner_path().announcement() {
        eprintln!("{line}");
    }
    let timewait_path = match (args.no_timewait, capture.timewait_attached()) {
        (true, _) => TimeWaitPath::Off,
        (false, true) => TimeWaitPath::Kernel,
        (false, false) => TimeWaitPath::Polled,
    };
    if let Some(line) = timewait_path.announcement() {
        eprintln!("{line}");
    }
    let mut attributor = Attributor::new();
    let mut cgroups = Cgroups::new();
    let finder = Finder::new(capture.take_task_files());
    let (existing, timewait, lookups, kernel_timewait) = look_around(
        args,
        spec,
        &filter,
        &finder,
        &mut attributor,
        &mut cgroups,
        timewait_path,
    );
    let metrics_listener = bind_metrics(args)?;
    lower_privileges(args, command, capture.capabilities_needed());
    let mut pipe = Pipeline {
        attributor,
        order: Order::new(),
        tail: Tail {
            timewait,
            following_timewait: timewait_path == TimeWaitPath::Polled,
            kernel_timewait,
            filter,
            outputs: Outputs::new(args, clock, recorder, otlp),
            tally: Tally::default(),
            count: args.count,
            metrics: metrics_listener.as_ref().map(|_| {
                Metrics::new()
                    .with_owner_path(capture.owner_path().name())
                    .with_timewait_path(timewait_path.name())
            }),
            analysis: command.map(|_| analysis(clock, spec)),
        },
        reset_reasons: pipeline::reason_names(capture.reset_reasons()),
        batch: Vec::new(),
        cgroups,
        lookups,
        finder,
        owner_hooks: !args.no_owner_hooks,
    };
    if let Some(found) = existing {
        pipe.order.existing(found.rows, &mut pipe.tail).ok();
        pipe.tail.outputs.flush_stdout().ok();
    }
    Ok((capture, pipe, metrics_listener))
}

fn open_recording(args: &LiveArgs, clock: Clock, spec: &Spec) -> Result<Option<Recorder>, Failure> {
    let Some(path) = &args.record.write else {
        return Ok(None);
    };
    let options = recording::Options {
        path: path.clone(),
        force: args.record.force,
        rotate_size: args.record.rotate_size,
        rotate_keep: args.record.rotate_keep,
        format: args.record.write_format,
        skaddr: args.output.show_skaddr,
    };
    Recorder::create(options, Header::new(clock, spec.clone()))
        .map(Some)
        .map_err(Failure::BadInput)
}

/// `--otlp`: the exporter, started before tracing so that a bad spool
/// costs nothing. The spool is the flag's, else beside the recording, else
/// the default directory, which may be missing where tcptrace is not
/// installed: then records wait in memory only, and it is said.
fn start_otlp(args: &LiveArgs, clock: Clock) -> Result<Option<otlp::Feed>, Failure> {
    let Some(endpoint) = &args.otlp.otlp else {
        return Ok(None);
    };
    let dir = otlp::spool_dir(
        args.otlp.otlp_spool.as_deref(),
        args.record.write.as_deref(),
    );
    let limit = args
        .otlp
        .otlp_spool_size
        .unwrap_or(otlp::DEFAULT_SPOOL_SIZE);
    let chosen = args.otlp.otlp_spool.is_some() || args.record.write.is_some();
    let headers = &args.otlp.otlp_headers;
    let nice = Some(args.nice);
    let exporter = match otlp::Exporter::start(endpoint, headers, Some((&dir, limit)), false, nice)
    {
        Ok(e) => e,
        Err(e) if !chosen && !e.to_string().contains("another tcptrace") => {
            eprintln!(
                "tcptrace: warning: otlp: no spool ({e:#}); while the collector is away, records                  wait in memory only (--otlp-spool DIR keeps them on disk)"
            );
            otlp::Exporter::start(endpoint, headers, None, false, nice).map_err(Failure::Other)?
        }
        Err(e) => return Err(Failure::BadInput(e)),
    };
    Ok(Some(otlp::Feed::new(exporter, args.output.style(), clock)))
}

/// Sockets that exist already, and netlink sockets in each namespace for
/// following time-wait: both need privileges about to be dropped. Returns
/// the snapshot, the time-wait table's follower, and the namespaces to
/// look holders up in later.
fn look_around(
    args: &LiveArgs,
    spec: &Spec,
    filter: &Filter,
    finder: &Finder,
    attributor: &mut Attributor,
    cgroups: &mut Cgroups,
    path: TimeWaitPath,
) -> (
    Option<Found>,
    TimeWait,
    Vec<snapshot::Namespace>,
    Option<KernelTimeWait>,
) {
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
        match snapshot::take(finder, &mut namespaces, filter, attributor, cgroups) {
            Ok(found) => Some(found),
            Err(e) => {
                eprintln!("tcptrace: warning: no snapshot of the existing sockets: {e:#}");
                None
            }
        }
    };
    let followed = if path == TimeWaitPath::Polled {
        namespaces
    } else {
        Vec::new()
    };
    let mut timewait = TimeWait::new(followed, snapshot::kernel_ports(filter));
    let mut kernel = (path == TimeWaitPath::Kernel).then(KernelTimeWait::new);
    if let Some(found) = &existing {
        for row in &found.timewait {
            match &mut kernel {
                Some(k) => k.watch_existing(row),
                None if path == TimeWaitPath::Polled => timewait.watch_existing(row),
                None => {}
            }
        }
    }
    (existing, timewait, lookups, kernel)
}

/// Bound now: a port below 1024 needs a capability about to be dropped.
fn bind_metrics(args: &LiveArgs) -> Result<Option<tokio::net::TcpListener>, Failure> {
    let Some(addr) = args.metrics else {
        return Ok(None);
    };
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map(Some)
        .map_err(|e| Failure::BadInput(anyhow!("cannot serve metrics on {addr}: {e}")))
}

/// Raises this thread's priority (it drains the ring: it must not wait
/// behind the workload), then drops the capabilities nothing ahead needs.
/// `needed`: what reading the kernel side still takes on this kernel
/// ([`Capture::capabilities_needed`]).
fn lower_privileges(args: &LiveArgs, command: Option<&command::Prepared>, needed: &[u32]) {
    if let Err(e) = privileges::prioritize(args.nice) {
        eprintln!(
            "tcptrace: warning: cannot raise the priority to nice {} ({e}); under full \
             load events may be lost (needs CAP_SYS_NICE; --nice 0 silences this)",
            args.nice
        );
    }
    // Attached, files open, the iterator that tells who holds a socket
    // linked: nothing ahead needs a capability but what this kernel asks
    // for reading our own BPF objects. Starting the command as the sudo
    // caller needs two more, until then.
    let keep_for_command: &[u32] = match command {
        Some(c) if c.needs_setuid() => &[privileges::CAP_SETUID, privileges::CAP_SETGID],
        _ => &[],
    };
    if let Err(e) = privileges::drop_all_but(&[keep_for_command, needed].concat()) {
        log::warn!("cannot drop capabilities: {e}");
    }
}

/// With `-- COMMAND`, the rows shown go here for the summary at the end;
/// the header gives it the wall-clock times.
fn analysis(clock: Clock, spec: &Spec) -> Analysis {
    let mut a = Analysis::new();
    a.add(Item::Header(Box::new(Header::new(clock, spec.clone()))));
    a
}

/// Tests and scripts wait for this line: from here on nothing is missed.
fn announce(spec: &Spec, outputs: &Outputs) {
    let recording = outputs
        .recorder
        .as_ref()
        .map(|r| format!(", recording to {}", r.path().display()))
        .unwrap_or_default();
    eprintln!(
        "tcptrace: tracing {}{recording}; Ctrl-C to stop",
        spec.describe()
    );
}

/// The signals that stop the run.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    fn new() -> Result<Signals, Failure> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            hangup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        })
    }
}

impl Live {
    /// Polls until a signal, the deadline, `--count` or a failure says
    /// stop.
    async fn poll(&mut self) -> Stop {
        loop {
            if let Err(stop) = self.round() {
                return stop;
            }
            if self.sleep().await {
                return self.last_drain();
            }
        }
    }

    /// Drains the rings, then does what is due: stuck sockets, holders to
    /// look up, the command's end, loss warnings.
    fn round(&mut self) -> Result<(), Stop> {
        let before = self.pipe.tail.tally.seen;
        let drained = self.pipe.drain(&mut self.capture, false);
        self.capture.flush_logs();
        drained.and_then(|()| self.pipe.tail.outputs.flush())?;
        if let Some(w) = &mut self.stuck {
            w.tick(&mut self.pipe)?;
        }
        if Instant::now() >= self.next_lookup {
            self.next_lookup = Instant::now() + LOOKUP_EVERY;
            let unverified = self.pipe.attributor.take_unverified();
            self.pipe.note_holders(&unverified, false)?;
        }
        self.command_ended();
        if Instant::now() >= self.next_loss_check {
            self.next_loss_check = Instant::now() + LOSS_CHECK;
            self.warned
                .update(&self.capture, self.pipe.attributor.gaps());
        }
        self.idle = match self.pipe.tail.tally.seen - before {
            0 => (self.idle * 2).min(POLL_IDLE_MAX),
            n if n >= LOADED_ROUND => POLL_LOADED,
            _ => POLL_BUSY,
        };
        Ok(())
    }

    /// Sleeps until the next round, answering a metrics scrape meanwhile;
    /// true when a signal or the deadline says stop.
    async fn sleep(&mut self) -> bool {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut scraped = None;
        let stop = tokio::select! {
            _ = sleep(self.idle) => false,
            _ = self.signals.interrupt.recv() => true,
            _ = self.signals.terminate.recv() => true,
            _ = self.signals.hangup.recv() => true,
            _ = sleep_until(self.deadline.unwrap_or(far)) => true,
            Some(stream) = endpoint::scrape(self.metrics_listener.as_ref()) => {
                scraped = Some(stream);
                false
            }
        };
        if let Some(stream) = scraped {
            self.serve_metrics(stream);
        }
        stop
    }

    fn serve_metrics(&self, stream: tokio::net::TcpStream) {
        if let Some(m) = &self.pipe.tail.metrics {
            let counters = summary::counters(&self.capture);
            let otlp = self
                .pipe
                .tail
                .outputs
                .otlp
                .as_ref()
                .map(|f| f.exporter.shared().counts());
            let body = m.render(
                &counters,
                &self.pipe.attributor.sockets_by_state(),
                self.pipe.attributor.gaps(),
                otlp.as_ref(),
            );
            tokio::spawn(endpoint::answer(stream, body));
        }
    }

    /// After a stop: what is already in the ring happened before it, so it
    /// is shown.
    fn last_drain(&mut self) -> Stop {
        // A second Ctrl-C during the final drain ends the process at once.
        // SAFETY: restoring the default disposition of a signal.
        unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
        let last = self.pipe.drain(&mut self.capture, true);
        last.and_then(|()| self.pipe.tail.outputs.flush())
            .err()
            .unwrap_or(Stop::Done)
    }

    fn start_command(&mut self, command: &command::Prepared) {
        match command.start() {
            Ok(running) => self.traced.running = Some(running),
            Err(e) => {
                eprintln!("tcptrace: {e:#}");
                self.traced.status = Some(COMMAND_NOT_STARTED);
                self.deadline = Some(Instant::now());
            }
        }
        if let Err(e) = privileges::drop_all_but(self.capture.capabilities_needed()) {
            log::warn!("cannot drop capabilities: {e}");
        }
    }

    /// The traced command has ended: tracing goes on for the linger.
    fn command_ended(&mut self) {
        let Some(status) = self
            .traced
            .running
            .as_mut()
            .and_then(command::Running::ended)
        else {
            return;
        };
        if let Some(running) = self.traced.running.take() {
            eprintln!(
                "tcptrace: {} {}; tracing {} more",
                running.shown(),
                command::describe(status),
                humantime::format_duration(self.linger)
            );
        }
        self.traced.status = Some(command::exit_code(status));
        self.deadline = Some(Instant::now() + self.linger);
    }

    /// Sums up: who holds the sockets still open (into the recording), the
    /// warnings, the recording closed, the closing line; the exit status.
    fn finish(mut self, stop: Stop) -> Result<u8, Failure> {
        if let Some(w) = &self.stuck {
            w.summary();
        }
        let stop = self.note_open_holders(stop);
        let Live {
            capture,
            pipe,
            traced,
            warned,
            started,
            ..
        } = self;
        let Tail {
            mut outputs,
            tally,
            timewait,
            following_timewait,
            kernel_timewait,
            analysis,
            ..
        } = pipe.tail;
        let timewait_path = match (kernel_timewait.is_some(), following_timewait) {
            (true, _) => TimeWaitPath::Kernel,
            (false, true) => TimeWaitPath::Polled,
            (false, false) => TimeWaitPath::Off,
        };
        let capture_paths = [capture.owner_path().name(), timewait_path.name()];
        summary::warn_timewait_missed(timewait.missed);
        // Rows of the last batch (a --count reached mid-batch, a failed
        // recording) still go to the terminal.
        if !matches!(stop, Stop::PipeClosed | Stop::OutputFailed(_)) {
            let _ = outputs.flush_stdout();
        }
        let counters = summary::counters(&capture);
        summary::warn_lost(&capture, warned.lost);
        let gaps = summary::warn_gaps(pipe.attributor.gaps(), warned.gaps);
        drop(capture);
        summary::warn_undecodable(tally.undecodable);
        // Before the recording closes: its stats say what became of the
        // records.
        let otlp = outputs
            .otlp
            .take()
            .map(|f| f.exporter.finish(Some(OTLP_PATIENCE)));
        let otlp_counts = otlp.as_ref().map(|o| o.counts);
        let failure = close_recording(
            &mut outputs,
            stop,
            &tally,
            &counters,
            gaps,
            started,
            Stats {
                otlp: otlp_counts,
                owner_path: Some(capture_paths[0].to_string()),
                timewait_path: Some(capture_paths[1].to_string()),
                ..Stats::default()
            },
        );
        let otlp_part = otlp.map(|o| o.stats_part()).unwrap_or_default();
        eprintln!(
            "{}{otlp_part}",
            summary::stats_line(&tally, &counters, gaps)
        );
        if let Some(analysis) = &analysis {
            eprint!("{}", summary::restart_summary(analysis));
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

    /// The recording ends with who holds each socket still open, as `ss -p`
    /// sees it now: what a report of the recording names for them.
    fn note_open_holders(&mut self, stop: Stop) -> Stop {
        if matches!(stop, Stop::Done) && self.pipe.tail.outputs.recorder.is_some() {
            let open = self.pipe.attributor.open_sockets();
            if let Err(e) = self.pipe.note_holders(&open, true) {
                return e;
            }
        }
        stop
    }
}

/// Ends the recording with its stats; returns what failed, if anything
/// (stdout, or the recording), for the exit status.
fn close_recording(
    outputs: &mut Outputs,
    stop: Stop,
    tally: &Tally,
    counters: &Counters,
    gaps: u64,
    started: Instant,
    // What the run adds beyond the counts: the OTLP counts, the paths.
    extra: Stats,
) -> Option<String> {
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
            ..extra
        };
        if let Err(f) = r.finish(stats) {
            failure = Some(f.message);
        }
    }
    failure
}
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

//! The command line. Each flag is documented where it is defined; the value
//! parsers below turn bad input into one sentence naming the problem.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};

use tcptrace_core::model::Family;
use tcptrace_core::model::State;
use tcptrace_core::model::{Net, Spec, Tuple};
use tcptrace_core::output::{ColorChoice, OutputFormat, Style, TimeFormat};
use tcptrace_core::words::io_reason;

const EXAMPLES: &str = "\
Examples:
  Restart a service and see what its clients met (exit status: the command's):
    sudo tcptrace --port 6379 -w restart.tcpt -- systemctl restart redis-server
  Watch a service's sockets, by its systemd unit, while restarting it by hand:
    sudo tcptrace --unit redis-server
  Follow one connection, both of its sockets, from its SYN on:
    sudo tcptrace --follow 127.0.0.1:53525,127.0.0.1:6379
  Only the sockets a process owns, as JSON for jq:
    sudo tcptrace --pid 4242 --format json | jq .
  Record for days, rotating files at 100 MiB, keeping ten:
    sudo tcptrace -q --port 6379 -w /var/log/tcptrace/redis.tcpt --rotate-size 100M --rotate-keep 10
  Investigate it afterwards:
    tcptrace report /var/log/tcptrace/redis.tcpt --html report.html
    tcptrace read /var/log/tcptrace/redis.tcpt --state CLOSE_WAIT
  Warn about sockets stuck in CLOSE_WAIT and friends for over 30 s:
    sudo tcptrace --stuck 30s -q
  Stop by itself after ten seconds:
    sudo tcptrace --port 443 --duration 10s";

/// Show every TCP state transition the kernel makes, as it happens.
///
/// Each line is one transition of one socket: when it happened, the process
/// that owns the socket, its addresses, the state it left and the one it
/// entered, and how long it stayed in the state it left.
#[derive(Parser, Debug)]
#[command(name = "tcptrace", version, after_help = EXAMPLES, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub live: LiveArgs,

    /// Show tcptrace's own diagnostics, and those of its eBPF program, on
    /// stderr (RUST_LOG=debug does the same).
    #[arg(long, global = true, help_heading = None)]
    pub debug: bool,
}

// Parsed once per run: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print a recording made with --write, exactly as the live run would
    /// have printed it, with the same filters and formats.
    Read(ReadArgs),
    /// Analyse a recording: what clients met on each listening port,
    /// connections and how they ended, time in each state, sockets still
    /// open and who held them, busiest processes.
    Report(ReportArgs),
    /// Write the man page or shell completions to stdout (used by `cargo
    /// xtask install`).
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: Generated,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OwnerHooks {
    /// fentry/fexit where the kernel allows them, else the fallback.
    Auto,
    /// The fallback, even where fentry would load: the system-call
    /// tracepoints for accept() and close(), the time-wait table polled.
    #[value(name = "fallback", alias = "syscalls")]
    Syscalls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Generated {
    Man,
    /// tcptrace-read(1).
    ManRead,
    /// tcptrace-report(1).
    ManReport,
    Bash,
    Zsh,
    Fish,
}

/// The man page or a completion script, generated from these definitions so
/// they can never disagree with `--help`.
pub fn generate(what: Generated, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let shell = match what {
        Generated::Man => return clap_mangen::Man::new(cmd).render(out),
        Generated::ManRead | Generated::ManReport => {
            let (name, page) = if what == Generated::ManRead {
                ("read", "tcptrace-read")
            } else {
                ("report", "tcptrace-report")
            };
            cmd.build();
            let sub = cmd
                .find_subcommand(name)
                .expect("the subcommand is defined above")
                .clone()
                .name(page);
            return clap_mangen::Man::new(sub).render(out);
        }
        Generated::Bash => clap_complete::Shell::Bash,
        Generated::Zsh => clap_complete::Shell::Zsh,
        Generated::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "tcptrace", out);
    Ok(())
}

/// Tracing live (no subcommand).
#[derive(Args, Debug)]
pub struct LiveArgs {
    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub output: OutputArgs,

    #[command(flatten)]
    pub record: RecordArgs,

    #[command(flatten)]
    pub otlp: OtlpArgs,

    /// Stop after this long (for example 30s, 5m, 1h30m; a bare number is seconds).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration,
          conflicts_with = "command")]
    pub duration: Option<Duration>,

    /// With a COMMAND: keep tracing this long after it has ended, for the
    /// connections a restart closes and the clients that come back after
    /// it returns [default: 3s].
    #[arg(long, value_name = "DURATION", value_parser = parse_any_duration,
          requires = "command")]
    pub linger: Option<Duration>,

    /// Trace while COMMAND runs, then `--linger` more; print on stderr what
    /// happened to the listening ports (when nothing listened, connects
    /// refused) and exit with COMMAND's exit status. COMMAND runs as the
    /// user who invoked tcptrace (under sudo: the sudo caller), and is
    /// started once tracing has begun.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,

    /// Stop after this many transitions have been shown.
    #[arg(short = 'c', long, value_name = "N", value_parser = parse_count)]
    pub count: Option<u64>,

    /// Warn (once per socket, on stderr) when a socket stays longer than
    /// DURATION in CLOSE_WAIT, FIN_WAIT2, LAST_ACK, SYN_SENT or SYN_RECV,
    /// naming its owner and what the state means.
    #[arg(long, value_name = "DURATION", value_parser = parse_stuck)]
    pub stuck: Option<Duration>,

    /// Serve Prometheus/OpenMetrics counters at http://ADDR/metrics
    /// (HOST:PORT, or :PORT for every interface): transitions by state,
    /// resets, lost events, sockets per state.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub metrics: Option<SocketAddr>,

    /// Do not start with the sockets that already exist (the snapshot, like
    /// `netstat -an`).
    #[arg(long)]
    pub no_snapshot: bool,

    /// Do not follow closed connections in the kernel's time-wait table
    /// (FIN_WAIT2 -> TIME_WAIT -> gone).
    #[arg(long)]
    pub no_timewait: bool,

    /// Do not hook accept(), close(), fork and exit to follow who holds each
    /// socket. On the system-call path (see --owner-hooks) every system
    /// call on the host costs more while they are attached (about 60-90 ns
    /// here, 180 ns for a close: `cargo xtask hook-cost`). Without them a socket's owner is the process of its
    /// last transition made in process context, and who holds it is looked
    /// up (as `ss -p` does) for --stuck and at the end.
    #[arg(long)]
    pub no_owner_hooks: bool,

    /// Which kernel hooks follow owners and time-wait. `auto` (the
    /// default) tries fentry/fexit programs on the kernel functions that
    /// accept(), close() and time-wait go through, which cost only those
    /// calls, and falls back where the kernel refuses them (a lockdown
    /// kernel, one without BPF trampolines): system-call tracepoints for
    /// accept() and close(), which put every system call of every process
    /// on the host on the kernel's slow path while attached, and the
    /// time-wait table read every 250 ms. `fallback` forces those, to
    /// compare the two on one kernel. The lines `tcptrace: owners: ...` and
    /// `tcptrace: time-wait: ...` at start say which run. Also spelt
    /// `--owner-hooks`, and `syscalls` for `fallback`. --no-owner-hooks
    /// wins over it for owners; given twice, the last counts (a test
    /// harness adds it to every run).
    #[arg(long = "hooks", visible_alias = "owner-hooks", value_enum, value_name = "HOW",
          default_value_t = OwnerHooks::Auto, overrides_with = "owner_hooks")]
    pub owner_hooks: OwnerHooks,

    /// Scheduling priority (nice value, -20 to 19) of the thread that reads
    /// the ring. The default, -5, puts it ahead of the traced workload: under
    /// a churn that keeps every CPU busy, an equal share of CPU was too little
    /// to drain the ring while recording and events were lost. 0 keeps the
    /// priority tcptrace was started with. Lowering it needs CAP_SYS_NICE
    /// (root has it); without, tcptrace says so and runs as it was started.
    #[arg(long, value_name = "N", default_value_t = -5, value_parser = parse_nice,
          allow_negative_numbers = true)]
    pub nice: i32,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Recording")]
pub struct RecordArgs {
    /// Also record every transition shown to FILE (`tcptrace read` and
    /// `tcptrace report` read it back). Compact binary, unless the name ends
    /// in `.jsonl` or --write-format says otherwise.
    #[arg(short = 'w', long = "write", value_name = "FILE", value_parser = parse_output_path)]
    pub write: Option<PathBuf>,

    /// How to write the recording: `binary` (about 20 bytes a transition),
    /// or `json`: JSON Lines, one object per transition as `--format json`
    /// prints it, for log shippers. Default: `json` for a FILE ending in
    /// `.jsonl`, `binary` otherwise.
    #[arg(long, value_enum, value_name = "FORMAT", requires = "write")]
    pub write_format: Option<tcptrace_core::recording::WriteFormat>,

    /// Print nothing on stdout (with --write: only record).
    #[arg(short = 'q', long)]
    pub quiet: bool,

    /// Start a new file when the current one reaches SIZE (like tcpdump -C):
    /// FILE is always the newest, older ones become FILE.1, FILE.2, ...
    /// SIZE takes K, M or G suffixes (powers of 1024).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "write")]
    pub rotate_size: Option<u64>,

    /// Keep at most N files of a rotation, deleting the oldest (like tcpdump -W).
    #[arg(long, value_name = "N", value_parser = parse_keep, requires = "rotate_size")]
    pub rotate_keep: Option<u32>,

    /// Overwrite FILE if it exists (a symlink is refused all the same).
    #[arg(long, requires = "write")]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct ReadArgs {
    /// Recordings to read (`-` for stdin); the files of a rotation read as
    /// one stream, in time order.
    #[arg(value_name = "FILE", required = true, value_parser = parse_input_path)]
    pub files: Vec<PathBuf>,

    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub output: OutputArgs,

    /// Skip lines that are not valid records (in a binary recording:
    /// damaged chunks), with a warning, instead of stopping at the first.
    #[arg(long)]
    pub lenient: bool,

    /// Keep reading, like `tail -F`: print FILE from its start, then what
    /// is appended to it, and when the writer rotates it (or starts again),
    /// go on with the new FILE. For log shippers, with `--format json`.
    #[arg(long, conflicts_with = "otlp")]
    pub tail: bool,

    /// Instead of printing, record the rows (those the filters keep) and
    /// notes to FILE, as `--write` does: converts between the binary format
    /// and JSON Lines, joins a rotation set into one file.
    #[arg(short = 'w', long = "write", value_name = "FILE", value_parser = parse_output_path,
          conflicts_with_all = ["tail", "otlp"])]
    pub write: Option<PathBuf>,

    /// Format of the --write FILE: `binary`, or `json` (JSON Lines).
    /// Default: `json` for a FILE ending in `.jsonl`, `binary` otherwise.
    #[arg(long, value_enum, value_name = "FORMAT", requires = "write")]
    pub write_format: Option<tcptrace_core::recording::WriteFormat>,

    /// Overwrite the --write FILE if it exists.
    #[arg(long, requires = "write")]
    pub force: bool,

    #[command(flatten)]
    pub otlp: OtlpArgs,
}

/// `--otlp` and its companions (docs/fleets.md).
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "OpenTelemetry")]
pub struct OtlpArgs {
    /// Also send every row shown to an OpenTelemetry collector, as OTLP log
    /// records over HTTP (protobuf, gzip): http://HOST[:PORT][/PATH], port
    /// 4318 and path /v1/logs unless given. Plain http only: send to the
    /// node's own collector and let it forward with TLS. With `read`: ship
    /// a recording, and exit once the collector has acknowledged it all.
    #[arg(long, value_name = "URL", value_parser = crate::otlp::parse_endpoint)]
    pub otlp: Option<crate::otlp::Endpoint>,

    /// An HTTP header for every OTLP request, as NAME=VALUE (for
    /// authentication: `Authorization=Bearer TOKEN`). Repeatable.
    #[arg(long = "otlp-header", value_name = "NAME=VALUE", requires = "otlp",
          value_parser = crate::otlp::parse_header, action = ArgAction::Append)]
    pub otlp_headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,

    /// Where records wait while the collector is unreachable, after a
    /// bounded queue in memory: by default FILE.otlp-spool beside the
    /// --write FILE, else /var/lib/tcptrace/otlp-spool (`read` waits for
    /// the collector instead, unless given one). A later run sends what an
    /// earlier one left.
    #[arg(long, value_name = "DIR", requires = "otlp")]
    pub otlp_spool: Option<PathBuf>,

    /// The spool's bound: beyond it records are dropped, and counted.
    /// SIZE takes K, M or G suffixes [default: 256M].
    #[arg(long, value_name = "SIZE", value_parser = parse_spool_size, requires = "otlp")]
    pub otlp_spool_size: Option<u64>,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Recordings to analyse (`-` for stdin).
    #[arg(value_name = "FILE", required = true, value_parser = parse_input_path)]
    pub files: Vec<PathBuf>,

    /// Report format: `text` (tables), or `json` (the whole report as one
    /// JSON document).
    #[arg(long, value_enum, default_value_t = OutputFormat::Text, hide_possible_values = true)]
    pub format: OutputFormat,

    /// Instead of the summary, the full timeline of one connection, both
    /// sides, with the time spent in each state.
    #[arg(long, value_name = "LADDR:LPORT,RADDR:RPORT", value_parser = parse_tuple)]
    pub follow: Option<Tuple>,

    /// Also write the report as a self-contained HTML page with pictures:
    /// availability per listening port, sockets per state over time,
    /// connection lifelines, time-in-state histograms.
    #[arg(long, value_name = "FILE.html", value_parser = parse_output_path)]
    pub html: Option<PathBuf>,

    /// Rows in each "top" table.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: usize,

    /// Skip lines that are not valid records, with a warning.
    #[arg(long)]
    pub lenient: bool,
}

#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Filters")]
pub struct FilterArgs {
    /// Only sockets with this local or remote port. Repeat the flag or give a
    /// comma-separated list to watch several.
    #[arg(short = 'p', long = "port", value_name = "PORT", value_delimiter = ',',
          value_parser = parse_port, action = ArgAction::Append)]
    pub ports: Vec<u16>,

    /// Only sockets with this local port (a server's listening port, a
    /// client's ephemeral one).
    #[arg(long = "lport", value_name = "PORT", value_delimiter = ',',
          value_parser = parse_port, action = ArgAction::Append)]
    pub lports: Vec<u16>,

    /// Only sockets with this remote port.
    #[arg(long = "rport", value_name = "PORT", value_delimiter = ',',
          value_parser = parse_port, action = ArgAction::Append)]
    pub rports: Vec<u16>,

    /// Only IPv4 sockets.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,

    /// Only IPv6 sockets (including dual-stack sockets talking IPv4).
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,

    /// Only sockets owned by this process id. Repeatable.
    #[arg(long = "pid", value_name = "PID", value_delimiter = ',',
          value_parser = parse_pid, action = ArgAction::Append)]
    pub pids: Vec<u32>,

    /// Only sockets owned by a process with this name (its `comm`, at most
    /// 15 bytes; longer names match their first 15). Repeatable.
    #[arg(long = "comm", value_name = "NAME", value_parser = parse_comm,
          action = ArgAction::Append)]
    pub comms: Vec<String>,

    /// Only sockets owned by a process of this systemd unit (from its cgroup:
    /// `redis-server` or `redis-server.service`). Repeatable.
    #[arg(long = "unit", value_name = "NAME", value_parser = parse_unit,
          action = ArgAction::Append)]
    pub units: Vec<String>,

    /// Only sockets owned by a process in this cgroup v2 path or below it
    /// (`/system.slice/nginx.service`, as /proc/PID/cgroup shows it).
    /// Repeatable.
    #[arg(long = "cgroup", value_name = "PATH", value_parser = parse_cgroup,
          action = ArgAction::Append)]
    pub cgroups: Vec<String>,

    /// Only one connection, given as LADDR:LPORT,RADDR:RPORT (IPv6 in
    /// brackets). Both of its sockets appear when both ends are local,
    /// including the connect's CLOSE -> SYN_SENT, which the kernel reports
    /// before the local port is chosen.
    #[arg(long, value_name = "LADDR:LPORT,RADDR:RPORT", value_parser = parse_tuple)]
    pub follow: Option<Tuple>,

    /// Only sockets in this network namespace: its inode number (as `ls -l
    /// /proc/PID/ns/net` shows it) or a path to it (/proc/PID/ns/net,
    /// /run/netns/NAME).
    #[arg(long, value_name = "INODE|PATH", value_parser = parse_netns, conflicts_with = "netns_of")]
    pub netns: Option<u32>,

    /// Only sockets in the network namespace of this process.
    #[arg(long, value_name = "PID", value_parser = parse_netns_of)]
    pub netns_of: Option<u32>,

    /// Only transitions entering or leaving one of these states (names as
    /// shown: CLOSE_WAIT, TIME_WAIT, ...; comma-separated or repeated).
    #[arg(long = "state", value_name = "STATE", value_delimiter = ',',
          value_parser = parse_state, action = ArgAction::Append)]
    pub states: Vec<State>,

    /// Only sockets whose local address is ADDR, or within ADDR/PREFIX
    /// (IPv4 or IPv6 CIDR, e.g. 10.0.0.0/8 or fd00::/8). Repeatable.
    #[arg(long = "laddr", value_name = "ADDR[/PREFIX]", value_delimiter = ',',
          value_parser = parse_net, action = ArgAction::Append)]
    pub laddrs: Vec<Net>,

    /// Only sockets whose remote address is ADDR, or within ADDR/PREFIX.
    /// Repeatable.
    #[arg(long = "raddr", value_name = "ADDR[/PREFIX]", value_delimiter = ',',
          value_parser = parse_net, action = ArgAction::Append)]
    pub raddrs: Vec<Net>,

    /// Only sockets with either address ADDR, or within ADDR/PREFIX.
    /// Repeatable.
    #[arg(long = "addr", value_name = "ADDR[/PREFIX]", value_delimiter = ',',
          value_parser = parse_net, action = ArgAction::Append)]
    pub addrs: Vec<Net>,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Output")]
pub struct OutputArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,

    /// How to show when each transition happened.
    #[arg(long, value_enum, default_value_t = TimeFormat::Local)]
    pub time: TimeFormat,

    /// Also show each socket's kernel address (a kernel pointer: keep it out
    /// of reports you share).
    #[arg(long)]
    pub show_skaddr: bool,

    /// Leave out the header line of the text format.
    #[arg(long)]
    pub no_header: bool,

    /// Wide text: also show each socket's network namespace (NETNS).
    #[arg(long)]
    pub wide: bool,

    /// Colour states by meaning (opening, established, closing, closed,
    /// reset). `auto` colours only a terminal, and respects NO_COLOR.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto, value_name = "WHEN")]
    pub color: ColorChoice,
}

impl FilterArgs {
    pub fn spec(&self) -> Spec {
        Spec {
            ports: self.ports.clone(),
            lports: self.lports.clone(),
            rports: self.rports.clone(),
            family: match (self.ipv4, self.ipv6) {
                (true, _) => Some(Family::V4),
                (_, true) => Some(Family::V6),
                _ => None,
            },
            pids: self.pids.clone(),
            comms: self.comms.clone(),
            units: self.units.clone(),
            cgroups: self.cgroups.clone(),
            follow: self.follow,
            netns: self.netns.or(self.netns_of),
            states: self.states.clone(),
            laddrs: self.laddrs.clone(),
            raddrs: self.raddrs.clone(),
            addrs: self.addrs.clone(),
        }
    }
}

impl OutputArgs {
    pub fn style(&self) -> Style {
        Style {
            format: self.format,
            time: self.time,
            show_skaddr: self.show_skaddr,
            wide: self.wide,
            color: self.color.enabled(1),
        }
    }
}

fn parse_state(s: &str) -> Result<State, String> {
    let name = s.trim().to_ascii_uppercase().replace('-', "_");
    State::from_name(&name)
        .filter(|st| st.0 != 0 && !st.name().is_empty())
        .ok_or_else(|| {
            format!(
                "{s:?} is not a TCP state; the states are {}",
                State::all()
                    .map(|st| st.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

fn parse_net(s: &str) -> Result<Net, String> {
    s.trim().parse()
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("port 0 is not a port a connection can use; ports are 1-65535".into()),
        Ok(p) if p > 65535 => Err(format!("port {p} is out of range; ports are 1-65535")),
        Ok(p) => Ok(p as u16),
        Err(_) => Err(format!("{s:?} is not a port number; ports are 1-65535")),
    }
}

fn parse_pid(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("pid 0 is not a process".into()),
        Ok(p) if p <= 1 << 22 => Ok(p),
        Ok(p) => Err(format!("pid {p} is larger than any Linux pid (4194304)")),
        Err(_) => Err(format!("{s:?} is not a process id")),
    }
}

fn parse_unit(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains('/') || s.chars().any(char::is_control) {
        return Err(format!(
            "{s:?} is not a systemd unit name (redis-server or redis-server.service)"
        ));
    }
    Ok(s.to_string())
}

fn parse_cgroup(s: &str) -> Result<String, String> {
    if !s.starts_with('/') || s.chars().any(char::is_control) {
        return Err(format!(
            "{s:?} is not a cgroup path; give it as /proc/PID/cgroup shows it, from / \
             (/system.slice/nginx.service)"
        ));
    }
    Ok(s.to_string())
}

fn parse_comm(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the process name is empty".into());
    }
    if s.bytes().any(|b| b == 0) {
        return Err("a process name cannot contain a NUL byte".into());
    }
    Ok(s.to_string())
}

fn parse_nice(s: &str) -> Result<i32, String> {
    match s.trim().parse::<i32>() {
        Ok(n) if (-20..=19).contains(&n) => Ok(n),
        Ok(n) => Err(format!("nice value {n} is out of range; it is -20 to 19")),
        Err(_) => Err(format!("{s:?} is not a nice value (-20 to 19)")),
    }
}

fn parse_count(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("a count of 0 would show nothing; give 1 or more".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a number of transitions")),
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_any_duration(s)?;
    if d.is_zero() {
        return Err("a duration of 0 would stop at once; give a positive duration".into());
    }
    Ok(d)
}

/// `--stuck`'s threshold: 0 would call every socket stuck.
fn parse_stuck(s: &str) -> Result<Duration, String> {
    let d = parse_any_duration(s)?;
    if d.is_zero() {
        return Err(
            "a threshold of 0 would call every socket stuck; give how long a socket may \
             stay in one state, like 30s"
                .into(),
        );
    }
    Ok(d)
}

/// A duration, 0 included (a bare number is seconds).
fn parse_any_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    match s.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration ({e}); write it like 30s, 5m or 1h30m")),
    }
}

/// SIZE in bytes: a number with an optional K, M or G (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write it like 500K, 100M or 2G"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large a size"))?;
    if bytes < 4096 {
        return Err(format!(
            "a rotation size of {bytes} bytes is too small; give at least 4K"
        ));
    }
    Ok(bytes)
}

/// `--otlp-spool-size`: a size as --rotate-size takes it.
fn parse_spool_size(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.replace("a rotation size", "a spool size"))
}

fn parse_keep(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("keeping 0 files would keep nothing; give 1 or more".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a number of files")),
    }
}

/// A recording's path: checked here for what can be known before tracing
/// (the rest, such as an existing file, when it is created).
fn parse_output_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("the file name is empty".into());
    }
    let p = PathBuf::from(s);
    if p.is_dir() {
        return Err(format!("{s} is a directory; give a file name"));
    }
    Ok(p)
}

fn parse_input_path(s: &str) -> Result<PathBuf, String> {
    if s == "-" {
        return Ok(PathBuf::from(s));
    }
    let p = PathBuf::from(s);
    match std::fs::metadata(&p) {
        Ok(m) if m.is_dir() => Err(format!("{s} is a directory, not a recording")),
        Ok(_) => std::fs::File::open(&p)
            .map(|_| p)
            .map_err(|e| format!("cannot open {s}: {}", io_reason(&e))),
        Err(e) => Err(format!("cannot open {s}: {}", io_reason(&e))),
    }
}

/// A network namespace: an inode number, or a path whose inode it is.
fn parse_netns(s: &str) -> Result<u32, String> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(n) = s.trim().parse::<u32>() {
        return if n == 0 {
            Err("0 is not a namespace inode".into())
        } else {
            Ok(n)
        };
    }
    let meta = std::fs::metadata(s).map_err(|e| {
        format!(
            "{s:?} is neither a namespace inode number nor a readable path ({})",
            io_reason(&e)
        )
    })?;
    u32::try_from(meta.ino())
        .map_err(|_| format!("{s} has an inode number too large for a namespace"))
}

fn parse_netns_of(s: &str) -> Result<u32, String> {
    let pid = parse_pid(s)?;
    parse_netns(&format!("/proc/{pid}/ns/net"))
        .map_err(|_| format!("no process {pid} (or its network namespace cannot be read)"))
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    full.parse::<SocketAddr>().map_err(|_| {
        format!("{s:?} is not an address to listen on; write it as HOST:PORT or :PORT")
    })
}

fn parse_endpoint(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 => Err(format!(
            "{s:?} has port 0; a connection's ports are 1-65535"
        )),
        Ok(a) => Ok(a),
        Err(_) if !s.starts_with('[') && s.matches(':').count() > 1 => Err(format!(
            "{s:?} looks like an IPv6 address without brackets; write it as [ADDR]:PORT"
        )),
        Err(_) => Err(format!("{s:?} is not an ADDR:PORT endpoint")),
    }
}

fn parse_tuple(s: &str) -> Result<Tuple, String> {
    let parts: Vec<&str> = s.split(',').collect();
    let [a, b] = parts[..] else {
        return Err(format!(
            "{s:?} is not a connection; write it as LADDR:LPORT,RADDR:RPORT"
        ));
    };
    let (a, b) = (parse_endpoint(a)?, parse_endpoint(b)?);
    if a.is_ipv4() != b.is_ipv4() {
        return Err(format!("{a} and {b} are of different address families"));
    }
    Ok(Tuple { a, b })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_hooks_default_to_auto_and_the_last_given_counts() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from([&["tcptrace"], args].concat())
                .unwrap()
                .live
                .owner_hooks
        };
        assert_eq!(parse(&[]), OwnerHooks::Auto);
        assert_eq!(parse(&["--owner-hooks", "syscalls"]), OwnerHooks::Syscalls);
        assert_eq!(parse(&["--hooks", "fallback"]), OwnerHooks::Syscalls);
        assert_eq!(parse(&["--hooks", "syscalls"]), OwnerHooks::Syscalls);
        let twice = ["--owner-hooks", "syscalls", "--owner-hooks", "auto"];
        assert_eq!(parse(&twice), OwnerHooks::Auto);
    }

    #[test]
    fn ports_accept_lists_and_repeats() {
        let cli = Cli::try_parse_from(["tcptrace", "-p", "80,443", "--port", "6389"]).unwrap();
        assert_eq!(cli.live.filter.ports, [80, 443, 6389]);
        assert_eq!(cli.live.filter.spec().describe(), "port 80,443,6389");
    }

    #[test]
    fn bad_values_name_the_problem() {
        let cases = [
            (vec!["-p", "0"], "port 0 is not a port"),
            (vec!["-p", "65536"], "port 65536 is out of range"),
            (vec!["-p", "abc"], "\"abc\" is not a port number"),
            (vec!["-4", "-6"], "cannot be used with"),
            (vec!["--follow", "1.2.3.4:80"], "is not a connection"),
            (
                vec!["--follow", "::1:80,::1:81"],
                "IPv6 address without brackets",
            ),
            (
                vec!["--follow", "1.2.3.4:80,[::1]:81"],
                "different address families",
            ),
            (vec!["--follow", "1.2.3.4:0,1.2.3.4:81"], "has port 0"),
            (vec!["--duration", "soon"], "is not a duration"),
            (vec!["--duration", "0s"], "a duration of 0"),
            (vec!["--count", "0"], "a count of 0"),
            (vec!["--pid", "x"], "is not a process id"),
            (vec!["--time", "tomorrow"], "invalid value"),
        ];
        for (args, want) in cases {
            let err = Cli::try_parse_from(std::iter::once("tcptrace").chain(args.iter().copied()))
                .expect_err(&format!("{args:?} should be refused"));
            assert!(err.to_string().contains(want), "{args:?}: {err}");
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn follow_accepts_ipv4_and_bracketed_ipv6() {
        let t = parse_tuple("[::1]:40000,[::1]:6389").unwrap();
        assert_eq!(t.a, "[::1]:40000".parse().unwrap());
        let t = parse_tuple("127.0.0.1:40000,127.0.0.1:6389").unwrap();
        assert_eq!(t.b.port(), 6389);
    }

    /// Argument lists kept from fuzzing: parsed or refused, never a panic.
    #[test]
    fn fuzz_regressions_parse_or_fail_cleanly() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/regressions/arguments");
        let mut files = 0;
        for entry in std::fs::read_dir(dir).expect("regressions are kept") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let args = data
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned());
            let parsed = Cli::try_parse_from(std::iter::once("tcptrace".to_string()).chain(args));
            if let Err(e) = parsed {
                assert_eq!(e.exit_code(), 2, "{e}");
            }
            files += 1;
        }
        assert!(files >= 4, "{files} regression inputs");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    }
}

//! Capture: load the eBPF program with the filters compiled in, attach it to
//! `sock:inet_sock_set_state`, and hand out what it puts in the ring.

use std::collections::VecDeque;
use std::fs;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, PerCpuArray},
    programs::{BtfTracePoint, CgroupAttachMode, FEntry, FExit, Iter, SockOps, TracePoint},
};
use tcptrace_common::{
    CONFIG_GLOBAL, COUNTER_CAUGHT, COUNTER_COVERED, COUNTER_FILTERED, COUNTER_LOST, COUNTERS_MAP,
    Config, EVENTS_MAPS, Event, FileLayout, PORTS_MAP, PROGRAM, PROGRAM_CALLBACK, PROGRAM_CATCHER,
    PROGRAM_TASK_FILES, RING_BYTES, RING_UNUSED_BYTES, RINGS, SockLayout, TaskLayout,
};

use crate::kernel::btf::Btf;
use crate::kernel::ring::Ring;
use crate::kernel::task_files::{self, TaskFiles};
use crate::kernel::{layout, object, privileges, timewait, tracefs};
use crate::system::cgroups;
use tcptrace_common::{
    PROGRAM_ACCEPT, PROGRAM_ACCEPT_FEXIT, PROGRAM_CLOSE_FENTRY, PROGRAM_CLOSE_FEXIT, PROGRAM_EXIT,
    PROGRAM_FORK, PROGRAM_RELEASE, PROGRAM_RESET_RECEIVED, PROGRAM_RESET_SENT, ResetLayout,
};
use tcptrace_core::decode;
use tcptrace_core::filter::{Filter, PortBits};
use tcptrace_core::model::{Counters, monotonic_ns};

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// Entries read from one ring in one call, at most: bounds the memory a
/// large backlog takes on its way through.
const BATCH: usize = 16384;
/// How long after its timestamp an event may still be on its way into a
/// ring (an interrupt or the hypervisor can stop a CPU between the
/// program's clock read and its commit). Events younger than this wait for
/// the next read, so that the merge of the rings stays in time order.
pub const SETTLE_NS: u64 = 5_000_000;

/// An attached tracer. Dropping it detaches the program.
pub struct Capture {
    rings: Vec<Ring>,
    /// Each ring's events read and not yet handed out, in time order.
    /// Queues, so that an event waits where it is: it is copied in once and
    /// out once, however many reads it waits through.
    waiting: Vec<VecDeque<Event>>,
    /// Scratch space for a ring's new events, kept to reuse its allocation.
    fresh: Vec<Event>,
    undecodable: u64,
    counters: PerCpuArray<MapData, u64>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The main program's descriptor, for its statistics in
    /// /proc/self/fdinfo.
    program_fd: i32,
    /// The owner hooks attached, whose skips are counted.
    hook_fds: Vec<i32>,
    reset_reasons: Vec<(u8, String)>,
    owner_path: OwnerPath,
    /// Whether the time-wait programs are attached.
    timewait_attached: bool,
    /// Capabilities the run needs once attached (see
    /// [`Capture::capabilities_needed`]).
    keep: Vec<u32>,
    /// The iterator that tells who holds a socket, until taken.
    task_files: Option<TaskFiles>,
    /// Owns the program and its link.
    _ebpf: Ebpf,
}

/// Which owner hooks to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hooks {
    Off,
    /// fentry/fexit where the kernel allows them, else system calls.
    Auto,
    Syscalls,
}

/// How accept() and close() are followed (fork and exit are tp_btf
/// programs either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerPath {
    /// fentry/fexit on the kernel functions: only those calls pay.
    Fentry,
    /// System-call tracepoints: while one is attached, every system call
    /// of every thread on the host takes the kernel's slow path.
    Syscalls,
    Off,
}

impl OwnerPath {
    /// Its name in the metrics.
    pub fn name(self) -> &'static str {
        match self {
            OwnerPath::Fentry => "fentry",
            OwnerPath::Syscalls => "syscalls",
            OwnerPath::Off => "none",
        }
    }

    /// The line said at start, before `tcptrace: tracing`: the tracepoints
    /// tax the whole host, which whoever runs tcptrace should know.
    pub fn announcement(self) -> Option<&'static str> {
        match self {
            OwnerPath::Fentry => Some("tcptrace: owners: fentry"),
            OwnerPath::Syscalls => Some(
                "tcptrace: owners: system-call tracepoints: every system call on this host \
                 pays ~80 ns while tracing",
            ),
            OwnerPath::Off => None,
        }
    }
}

/// Why tracing could not start; main maps the kinds to exit statuses.
#[derive(Debug)]
pub enum StartError {
    Privileges(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(e: anyhow::Error) -> Self {
        StartError::Other(e)
    }
}

fn privilege_message(missing: &[&str]) -> String {
    format!(
        "tracing TCP state transitions needs the CAP_BPF and CAP_PERFMON capabilities \
         (missing: {}); run tcptrace as root, for example `sudo tcptrace`",
        missing.join(", ")
    )
}

impl Capture {
    /// `hooks`: also attach the programs that follow who holds each
    /// socket (accept, close, fork, exit), and how. `timewait`: follow
    /// time-wait sockets with fentry/fexit if the kernel allows them.
    pub fn start(filter: &Filter, hooks: Hooks, timewait: bool) -> Result<Capture, StartError> {
        let (release, btf_data) = check_kernel()?;
        let kernel_btf = Btf::parse(&btf_data).context(BTF_PATH)?;
        let sock = sock_layout(&kernel_btf)?;
        let task = task_layout(&kernel_btf, &release);
        let timewait_layout = timewait.then(|| timewait::layout(&kernel_btf)).flatten();
        let file = file_layout(&kernel_btf, &release);
        drop(kernel_btf);
        // The iterator's reference socket; without one, no iterator.
        let reference = task_files::reference_socket()
            .map_err(|e| log::warn!("{}", without_iterator(&anyhow!(e))))
            .ok();
        let callback_cgroup = callback_cgroup(&sock);
        let (ports, port_filters) = filter.kernel_ports();
        let (reset_sent, reset_received, reasons) = reset_layouts();
        let config = Config {
            sock,
            task: task.unwrap_or_default(),
            file: FileLayout {
                reference_fd: reference
                    .as_ref()
                    .map_or(u32::MAX, |r| r.as_raw_fd() as u32),
                ..file.unwrap_or_default()
            },
            families: filter.kernel_families(),
            port_filters: u32::from(port_filters),
            netns_only: filter.spec().netns.unwrap_or(0),
            callback: u32::from(callback_cgroup.is_some()),
            reset_sent,
            reset_received,
            timewait: timewait_layout.unwrap_or_default(),
        };
        log::debug!("program configuration: {config:?}");

        let ring_sizes = ring_sizes(
            aya::util::nr_cpus()
                .map_err(|(_, e)| anyhow!(e).context("cannot read the number of possible CPUs"))?,
        );
        let mut ebpf = load(&config, ring_sizes)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("eBPF-side logging is off: {e}");
                None
            }
        };
        fill_port_map(&mut ebpf, &ports)?;

        let btf = aya::Btf::parse(&btf_data, aya::Endianness::default())
            .map_err(|e| anyhow!(e).context(BTF_PATH))?;
        let program_fd = attach_state_programs(&mut ebpf, &btf)?;
        if let Some(root) = callback_cgroup
            && let Err(e) = attach_callback(&mut ebpf, &root)
        {
            log::warn!("{}", without_callback(&format!("{e:#}")));
        }
        attach_reset_programs(&mut ebpf, &btf, [reset_sent, reset_received]);
        let (hook_fds, owner_path) = if task.is_some() && hooks != Hooks::Off {
            attach_holder_programs(&mut ebpf, &btf, hooks, &release)
        } else {
            (Vec::new(), OwnerPath::Off)
        };
        let timewait_attached = timewait_layout.is_some()
            && match timewait::attach(&mut ebpf, &btf) {
                Ok(_) => true,
                Err(e) => {
                    log::debug!("time-wait is polled: {e:#}");
                    false
                }
            };
        let task_files = match (task, file, reference) {
            (Some(_), Some(file), Some(reference)) => {
                match attach_task_files(&mut ebpf, &btf, reference, file.sock_from_file != 0) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        log::warn!("{}", without_iterator(&e));
                        None
                    }
                }
            }
            _ => None,
        };

        // Parsing the kernel's BTF (twice: ours and aya's) takes some 15 MiB
        // of heap. Handing it back before the rings are mapped keeps it out
        // of the peak RSS, which the rings dominate from here on.
        drop(btf);
        drop(btf_data);
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::malloc_trim(0);
        }

        let rings = take_rings(&mut ebpf, ring_sizes)?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(COUNTERS_MAP)
                .ok_or_else(|| anyhow!("no {COUNTERS_MAP} map"))?,
        )
        .map_err(|e| anyhow!(e))?;
        let mut keep = Vec::new();
        if !readable_without_capabilities(&counters)
            || task_files
                .as_ref()
                .is_some_and(|t| !t.usable_without_capabilities())
        {
            keep.push(privileges::CAP_BPF);
        }
        if task_files.is_none() {
            keep.push(privileges::CAP_SYS_PTRACE);
        }
        Ok(Capture {
            keep,
            task_files,
            waiting: rings.iter().map(|_| VecDeque::new()).collect(),
            rings,
            fresh: Vec::new(),
            undecodable: 0,
            counters,
            logger,
            program_fd,
            hook_fds,
            reset_reasons: reasons,
            owner_path,
            timewait_attached,
            _ebpf: ebpf,
        })
    }

    /// The capabilities the run still needs once attached: none on most
    /// kernels. CAP_BPF on those that refuse every bpf() command to a
    /// process without it, the descriptors it holds included (Debian 11's
    /// 5.10 with unprivileged BPF disabled): reading the counters (lost,
    /// filtered) and walking the iterator. CAP_SYS_PTRACE where the
    /// iterator could not be attached: holders are then found in other
    /// processes' `/proc/PID/fd`.
    pub fn capabilities_needed(&self) -> &[u32] {
        &self.keep
    }

    /// The iterator that tells who holds a socket, if it is attached
    /// (once: it moves to whoever looks holders up).
    pub fn take_task_files(&mut self) -> Option<TaskFiles> {
        self.task_files.take()
    }

    pub fn owner_path(&self) -> OwnerPath {
        self.owner_path
    }

    /// The time-wait programs are attached: time-wait sockets are reported
    /// from the kernel, not polled.
    pub fn timewait_attached(&self) -> bool {
        self.timewait_attached
    }

    /// Names of the kernel's reset reasons, by number.
    pub fn reset_reasons(&self) -> &[(u8, String)] {
        &self.reset_reasons
    }

    /// Appends the next events to `out`, in time order, and says whether
    /// more may be waiting. Without `all`, the events of the last few
    /// milliseconds stay back until an event of another CPU that happened
    /// before them has surely arrived; `all` (at the end) hands out
    /// everything.
    pub fn read(&mut self, out: &mut Vec<Event>, all: bool) -> bool {
        if self.rings.len() == 1 {
            let start = out.len();
            let n = drain_ring(&mut self.rings[0], out, &mut self.undecodable);
            in_time_order(&mut out[start..]);
            return n == BATCH;
        }
        let mut cutoff = if all {
            u64::MAX
        } else {
            monotonic_ns().saturating_sub(SETTLE_NS)
        };
        let mut more = false;
        for (ring, waiting) in self.rings.iter_mut().zip(&mut self.waiting) {
            self.fresh.clear();
            let n = drain_ring(ring, &mut self.fresh, &mut self.undecodable);
            in_time_order(&mut self.fresh);
            if n == BATCH {
                more = true;
                // The rest of this ring is newer than what was read of it.
                if let Some(last) = self.fresh.last() {
                    cutoff = cutoff.min(last.ts_ns);
                }
            }
            enqueue(waiting, &self.fresh);
        }
        merge(&mut self.waiting, cutoff, out);
        more
    }

    /// Ring entries too short to be an event (a mismatched eBPF object).
    pub fn undecodable(&self) -> u64 {
        self.undecodable
    }

    pub fn counters(&self) -> Result<Counters> {
        let sum = |i: u32| -> Result<u64> {
            Ok(self
                .counters
                .get(&i, 0)
                .with_context(|| format!("cannot read counter {i}"))?
                .iter()
                .sum())
        };
        // The catcher's own misses are transitions the main program did
        // not miss (it had finished, or the catcher would not run alone).
        let skipped = recursion_misses(self.program_fd);
        let (caught, covered) = (sum(COUNTER_CAUGHT)?, sum(COUNTER_COVERED)?);
        log::trace!(
            "runs skipped by the kernel: {skipped}, emitted by the catcher: {caught}, \
             by the socket callback: {covered}"
        );
        Ok(Counters {
            lost: sum(COUNTER_LOST)?,
            filtered: sum(COUNTER_FILTERED)?,
            missed: skipped.saturating_sub(caught + covered),
            hooks_missed: self.hook_fds.iter().map(|&fd| recursion_misses(fd)).sum(),
        })
    }

    /// Writes pending eBPF-side log records to the `log` logger.
    pub fn flush_logs(&mut self) {
        if let Some(l) = &mut self.logger {
            l.flush();
        }
    }
}

/// What tracing needs before anything is loaded: the capabilities, a
/// kernel new enough, and its BTF. Returns the kernel release and the BTF.
fn check_kernel() -> Result<(String, Vec<u8>), StartError> {
    let missing = privileges::missing_for_tracing(privileges::effective());
    if !missing.is_empty() {
        return Err(StartError::Privileges(privilege_message(&missing)));
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim().to_string();
    if let Some(why) = too_old(&release) {
        return Err(StartError::Other(anyhow!(why)));
    }
    let btf_data = fs::read(BTF_PATH).with_context(|| {
        format!(
            "cannot read the kernel's BTF ({BTF_PATH}); tracing needs a kernel built with \
             CONFIG_DEBUG_INFO_BTF (`tcptrace read` and `report` still work on recordings)"
        )
    })?;
    Ok((release, btf_data))
}

/// The object's maps, sized for this machine, with the configuration in
/// its CONFIG global.
fn load(config: &Config, ring_sizes: [u32; RINGS]) -> Result<Ebpf, StartError> {
    let mut loader = EbpfLoader::new();
    loader.override_global(CONFIG_GLOBAL, config, true);
    for (name, size) in EVENTS_MAPS.iter().zip(ring_sizes) {
        loader.map_max_entries(name, size);
    }
    loader
        .load(object::loadable()?.bytes())
        .map_err(|e| load_error(anyhow!(e).context("cannot load the eBPF maps")))
}

fn fill_port_map(ebpf: &mut Ebpf, ports: &PortBits) -> Result<()> {
    let mut port_map: Array<_, u8> = Array::try_from(
        ebpf.map_mut(PORTS_MAP)
            .ok_or_else(|| anyhow!("the eBPF object has no {PORTS_MAP} map"))?,
    )
    .map_err(|e| anyhow!(e))?;
    for (port, bits) in ports.marked() {
        port_map
            .set(u32::from(port), bits, 0)
            .map_err(|e| anyhow!(e).context("cannot fill the port filter map"))?;
    }
    Ok(())
}

/// The main program and its catcher; returns the main program's descriptor
/// (its run statistics tell skipped runs).
fn attach_state_programs(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<i32, StartError> {
    // The catcher must run after the main program for each transition:
    // the kernel calls a tracepoint's programs in the order they attach.
    let mut program_fd = 0;
    for name in [PROGRAM, PROGRAM_CATCHER] {
        let program: &mut BtfTracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
            .try_into()
            .map_err(|e| anyhow!("{e}"))?;
        program.load(layout::NAME, btf).map_err(|e| {
            load_error(refusal(e).context(format!("cannot load the eBPF program {name}")))
        })?;
        if name == PROGRAM {
            use std::os::fd::{AsFd, AsRawFd};
            program_fd = program.fd().map_err(|e| anyhow!(e))?.as_fd().as_raw_fd();
        }
        program.attach().map_err(|e| {
            load_error(anyhow!(e).context(format!(
                "cannot attach to the {}:{} tracepoint",
                layout::CATEGORY,
                layout::NAME
            )))
        })?;
    }
    Ok(program_fd)
}

/// Resets only annotate closes: without them tcptrace still traces, so a
/// failure here is a warning.
fn attach_reset_programs(ebpf: &mut Ebpf, btf: &aya::Btf, layouts: [ResetLayout; 2]) {
    for (name, l) in [PROGRAM_RESET_SENT, PROGRAM_RESET_RECEIVED]
        .into_iter()
        .zip(layouts)
    {
        if l.present == 0 {
            continue;
        }
        let attached = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))
            .and_then(|p| <&mut BtfTracePoint>::try_from(p).map_err(|e| anyhow!("{e}")))
            .and_then(|p| {
                p.load(name, btf).map_err(|e| anyhow!(e))?;
                p.attach().map_err(|e| anyhow!(e))
            });
        if let Err(e) = attached {
            log::warn!("resets will not be annotated: cannot attach to tcp:{name}: {e:#}");
        }
    }
}

/// The rings userspace sized (the others are one unused page each).
fn take_rings(ebpf: &mut Ebpf, ring_sizes: [u32; RINGS]) -> Result<Vec<Ring>> {
    let mut rings = Vec::new();
    for (name, size) in EVENTS_MAPS.iter().zip(ring_sizes) {
        if size == RING_UNUSED_BYTES {
            continue;
        }
        let Some(Map::RingBuf(data)) = ebpf.take_map(name) else {
            return Err(anyhow!("the eBPF object has no ring buffer {name}"));
        };
        use std::os::fd::AsFd;
        let ring = Ring::map(data.fd().as_fd(), size as usize)
            .with_context(|| format!("cannot map the ring buffer {name}"))?;
        rings.push(ring);
    }
    Ok(rings)
}

/// Where to attach the socket callback, if it can be: the root of the
/// cgroup v2 hierarchy. Says why not otherwise; tracing goes on without.
/// Whether the counters map can be read without capabilities, as the run
/// reads it after dropping them. Tried rather than guessed from the
/// version: in a thread of its own that gives its capabilities up
/// (capabilities belong to a thread), so this one keeps them.
fn readable_without_capabilities(counters: &PerCpuArray<MapData, u64>) -> bool {
    std::thread::scope(|s| {
        s.spawn(|| privileges::drop_all_but(&[]).is_ok() && counters.get(&COUNTER_LOST, 0).is_ok())
            .join()
            .unwrap_or(false)
    })
}

fn callback_cgroup(sock: &SockLayout) -> Option<std::path::PathBuf> {
    let why_not = if sock.ops_flags == 0 {
        "this kernel's sockets have no BPF callback flags".to_string()
    } else if !privileges::can_attach_callback(privileges::effective()) {
        "attaching it needs CAP_NET_ADMIN".to_string()
    } else {
        match cgroups::root() {
            Ok(root) => return Some(root),
            Err(e) => format!("{e:#}"),
        }
    };
    log::warn!("{}", without_callback(&why_not));
    None
}

fn without_callback(why: &str) -> String {
    format!(
        "the socket callback is not attached ({why}): transitions the kernel does not run \
         tracepoint programs for (seen under heavy connection churn) are reported as gaps \
         instead of shown"
    )
}

/// The programs that follow who holds a socket between its transitions:
/// accept() returning, a fork, a close() that leaves other references,
/// a process's exit. Without one, the owner of the sockets it concerns is
/// the one learned from transitions, and tracing goes on. Returns the
/// descriptors of those attached, and how accept() and close() are hooked.
fn attach_holder_programs(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    hooks: Hooks,
    release: &str,
) -> (Vec<i32>, OwnerPath) {
    let mut fds = Vec::new();
    let mut path = OwnerPath::Syscalls;
    if hooks == Hooks::Auto {
        match attach_function_programs(ebpf, btf, release) {
            Ok(found) => {
                fds = found;
                path = OwnerPath::Fentry;
            }
            Err(e) => {
                log::debug!("accept() and close() take the system-call tracepoints: {e:#}");
                unload(ebpf);
            }
        }
    }
    if path == OwnerPath::Syscalls {
        fds = attach_syscall_programs(ebpf);
    }
    fds.extend(attach_process_programs(ebpf, btf));
    (fds, path)
}

/// From this kernel on close() takes the file out of the table itself,
/// and never calls `filp_close`.
const CLOSE_WITHOUT_FILP_CLOSE: (u32, u32) = (6, 6);

/// accept() and close() by fentry/fexit, all or none: a kernel that
/// refuses one (lockdown, no BPF trampoline, a function renamed or
/// inlined) gets the system-call tracepoints for both.
fn attach_function_programs(ebpf: &mut Ebpf, btf: &aya::Btf, release: &str) -> Result<Vec<i32>> {
    let close_fd_functions: &[&str] =
        if version(release).is_none_or(|v| v >= CLOSE_WITHOUT_FILP_CLOSE) {
            // Renamed in 6.8.
            &["file_close_fd", "close_fd_get_file"]
        } else {
            &[]
        };
    let mut fds = vec![
        attach_fexit(ebpf, btf, PROGRAM_ACCEPT_FEXIT, &["inet_accept"])?,
        attach_fentry(ebpf, btf, PROGRAM_CLOSE_FENTRY, "filp_close")?,
    ];
    if !close_fd_functions.is_empty() {
        fds.push(attach_fexit(
            ebpf,
            btf,
            PROGRAM_CLOSE_FEXIT,
            close_fd_functions,
        )?);
    }
    Ok(fds)
}

fn attach_fentry(ebpf: &mut Ebpf, btf: &aya::Btf, name: &str, function: &str) -> Result<i32> {
    let p = program::<FEntry>(ebpf, name)?;
    p.load(function, btf)
        .map_err(|e| refusal(e).context(format!("fentry on {function}")))?;
    p.attach()
        .map_err(|e| anyhow!(e).context(format!("cannot attach fentry to {function}")))?;
    raw_fd(p.fd().map_err(|e| anyhow!(e))?)
}

/// fexit on the first of `functions` this kernel has.
fn attach_fexit(ebpf: &mut Ebpf, btf: &aya::Btf, name: &str, functions: &[&str]) -> Result<i32> {
    let p = program::<FExit>(ebpf, name)?;
    let mut refused = anyhow!("no function to attach {name} to");
    for function in functions {
        match p.load(function, btf) {
            Ok(()) => {
                p.attach().map_err(|e| {
                    anyhow!(e).context(format!("cannot attach fexit to {function}"))
                })?;
                return raw_fd(p.fd().map_err(|e| anyhow!(e))?);
            }
            Err(e) => refused = refusal(e).context(format!("fexit on {function}")),
        }
    }
    Err(refused)
}

pub(super) fn raw_fd(fd: &aya::programs::ProgramFd) -> Result<i32> {
    use std::os::fd::{AsFd, AsRawFd};
    Ok(fd.as_fd().as_raw_fd())
}

/// Detaches and unloads what of the fentry/fexit programs loaded: a half-attached path
/// would report some closes twice.
fn unload(ebpf: &mut Ebpf) {
    if let Ok(p) = program::<FEntry>(ebpf, PROGRAM_CLOSE_FENTRY) {
        let _ = p.unload();
    }
    for name in [PROGRAM_ACCEPT_FEXIT, PROGRAM_CLOSE_FEXIT] {
        if let Ok(p) = program::<FExit>(ebpf, name) {
            let _ = p.unload();
        }
    }
}

/// accept() and close() by their system-call tracepoints, as everywhere
/// before fentry: each program that attaches, attaches alone.
fn attach_syscall_programs(ebpf: &mut Ebpf) -> Vec<i32> {
    let mut fds = Vec::new();
    let classic: [(&str, &[&str]); 2] = [
        (PROGRAM_ACCEPT, &["sys_exit_accept4", "sys_exit_accept"]),
        (PROGRAM_RELEASE, &["sys_enter_close"]),
    ];
    for (name, syscalls) in classic {
        let attached = program::<TracePoint>(ebpf, name).and_then(|p| {
            p.load().map_err(refusal)?;
            for syscall in syscalls {
                p.attach("syscalls", syscall).map_err(|e| {
                    anyhow!(e).context(format!("cannot attach to syscalls:{syscall}"))
                })?;
            }
            raw_fd(p.fd().map_err(|e| anyhow!(e))?)
        });
        match attached {
            Ok(fd) => fds.push(fd),
            Err(e) => log::warn!("{}", without_holders(name, &e)),
        }
    }
    fds
}

fn attach_process_programs(ebpf: &mut Ebpf, btf: &aya::Btf) -> Vec<i32> {
    let mut fds = Vec::new();
    for (name, tracepoint) in [
        (PROGRAM_FORK, "sched_process_fork"),
        (PROGRAM_EXIT, "sched_process_exit"),
    ] {
        let attached = program::<BtfTracePoint>(ebpf, name).and_then(|p| {
            p.load(tracepoint, btf).map_err(refusal)?;
            p.attach()
                .map_err(|e| anyhow!(e).context(format!("cannot attach to sched:{tracepoint}")))?;
            raw_fd(p.fd().map_err(|e| anyhow!(e))?)
        });
        match attached {
            Ok(fd) => fds.push(fd),
            Err(e) => log::warn!("{}", without_holders(name, &e)),
        }
    }
    fds
}

/// Loads and links the iterator over every process's descriptors.
fn attach_task_files(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    reference: std::os::fd::OwnedFd,
    sock_from_file: bool,
) -> Result<TaskFiles> {
    let p = program::<Iter>(ebpf, PROGRAM_TASK_FILES)?;
    p.load("task_file", btf).map_err(refusal)?;
    let fd = raw_fd(p.fd().map_err(|e| anyhow!(e))?)?;
    TaskFiles::link(fd, reference, sock_from_file)
}

fn without_iterator(e: &anyhow::Error) -> String {
    format!(
        "the iterator over processes' descriptors is not attached ({e:#}): tcptrace keeps \
         CAP_SYS_PTRACE to find who holds a socket in /proc/PID/fd"
    )
}

fn without_holders(program: &str, e: &anyhow::Error) -> String {
    format!(
        "the program {program} is not attached ({e:#}): sockets it would have followed from \
         one process to another keep the owner learned from their transitions"
    )
}

/// The program `name` of the object, as a `P`.
pub(super) fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
        .try_into()
        .map_err(|e| anyhow!("{e}"))
}

/// A program the kernel refused, in one line: the verifier's last word,
/// not its whole log (that goes to `--debug`).
pub(super) fn refusal(e: aya::programs::ProgramError) -> anyhow::Error {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            log::debug!("verifier log:\n{log}");
            let reason = log
                .lines()
                .map(str::trim)
                .rfind(|l| {
                    !l.is_empty()
                        && !l.starts_with("processed ")
                        && !l.starts_with("verification time")
                        && !l.starts_with("stack depth")
                        && !l.starts_with("-- END PROG LOAD LOG --")
                })
                .unwrap_or("no verifier log")
                .to_string();
            anyhow!("the kernel refused it: {reason} ({io_error})")
        }
        other => anyhow!(other),
    }
}

/// Loads the socket callback and attaches it to the cgroup at `root`.
fn attach_callback(ebpf: &mut Ebpf, root: &std::path::Path) -> Result<()> {
    let cgroup = fs::File::open(root)
        .with_context(|| format!("cannot open the cgroup {}", root.display()))?;
    let program: &mut SockOps = ebpf
        .program_mut(PROGRAM_CALLBACK)
        .ok_or_else(|| anyhow!("the eBPF object has no program {PROGRAM_CALLBACK}"))?
        .try_into()
        .map_err(|e| anyhow!("{e}"))?;
    program.load().map_err(refusal)?;
    // aya attaches through a BPF link, which the kernel always adds next
    // to the cgroup's other programs, and which refuses any mode flag.
    program
        .attach(&cgroup, CgroupAttachMode::Single)
        .map_err(|e| anyhow!(e).context(format!("cannot attach it to {}", root.display())))?;
    log::debug!("socket callback attached to {}", root.display());
    Ok(())
}

/// The kernel's count of runs of a program it skipped (its fdinfo).
fn recursion_misses(program_fd: i32) -> u64 {
    fs::read_to_string(format!("/proc/self/fdinfo/{program_fd}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("recursion_misses:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Appends up to [`BATCH`] events of `ring` to `out`; returns how many and
/// the time of the last.
fn drain_ring(ring: &mut Ring, out: &mut Vec<Event>, undecodable: &mut u64) -> usize {
    ring.drain(BATCH, |bytes| match decode::event(bytes) {
        Ok(e) => out.push(e),
        Err(e) => {
            log::warn!("{e}");
            *undecodable += 1;
        }
    })
}

/// One CPU's ring is in the order its events were committed, which is
/// time order but for a program that an interrupt's program overtook between
/// its clock read and its commit (a softirq's transition during a connect,
/// seen up to half a millisecond apart under churn). Rare: check, then sort.
fn in_time_order(run: &mut [Event]) {
    if !run.is_sorted_by_key(|e| e.ts_ns) {
        run.sort_by_key(|e| e.ts_ns);
    }
}

/// Adds a ring's new events (in time order) to what waits of that ring,
/// keeping it in time order. They are nearly always newer than all of it;
/// an event an interrupt overtook can be older than the last read's newest.
fn enqueue(waiting: &mut VecDeque<Event>, new: &[Event]) {
    let Some(first) = new.first() else {
        return;
    };
    if waiting.back().is_none_or(|last| last.ts_ns <= first.ts_ns) {
        waiting.extend(new.iter().copied());
        return;
    }
    for &e in new {
        let at = waiting.partition_point(|w| w.ts_ns <= e.ts_ns);
        waiting.insert(at, e);
    }
}

/// Moves the events older than `cutoff` from the fronts of the rings'
/// queues to `out`, in time order (ties go to the lower ring). A CPU's ring
/// is in time order; several CPUs sharing a ring (more CPUs than rings) can
/// break that slightly, which only reorders events of different sockets.
fn merge(waiting: &mut [VecDeque<Event>], cutoff: u64, out: &mut Vec<Event>) {
    loop {
        let mut best: Option<(usize, u64)> = None;
        for (i, w) in waiting.iter().enumerate() {
            if let Some(front) = w.front()
                && front.ts_ns < cutoff
                && best.is_none_or(|(_, ts)| front.ts_ns < ts)
            {
                best = Some((i, front.ts_ns));
            }
        }
        let Some((i, _)) = best else { return };
        out.extend(waiting[i].pop_front());
    }
}

/// The byte size of each ring: [`RING_BYTES`] shared among the rings that
/// `cpus` possible CPUs write to (CPU `i` writes ring `i % RINGS`).
fn ring_sizes(cpus: usize) -> [u32; RINGS] {
    let used = cpus.clamp(1, RINGS);
    let share = RING_BYTES / used as u32;
    // The largest power of two within the share, and no less than 4 MiB.
    let each = (1u32 << (31 - share.leading_zeros())).max(4 << 20);
    std::array::from_fn(|i| if i < used { each } else { RING_UNUSED_BYTES })
}

/// Where this kernel keeps what the program reads of a TCP socket.
fn sock_layout(btf: &Btf) -> Result<SockLayout> {
    let need = |found: Option<u32>, what: &str| {
        found.ok_or_else(|| {
            anyhow!("the kernel's BTF has no {what}; tcptrace cannot read sockets on this kernel")
        })
    };
    // The program reads through a `struct tcp_sock *`; the members below
    // are in its first members, `struct inet_sock` and `struct sock`.
    let inet = need(
        btf.path_offset("tcp_sock", &["inet_conn", "icsk_inet"]),
        "tcp_sock.inet_conn.icsk_inet",
    )?;
    let sock = need(
        btf.path_offset("inet_sock", &["sk", "__sk_common"]),
        "inet_sock.sk.__sk_common",
    )?;
    let common = |member: &str| -> Result<u32> {
        Ok(inet
            + sock
            + need(
                btf.member_offset("sock_common", member),
                &format!("sock_common.{member}"),
            )?)
    };
    Ok(SockLayout {
        family: common("skc_family")?,
        sport: inet
            + need(
                btf.member_offset("inet_sock", "inet_sport"),
                "inet_sock.inet_sport",
            )?,
        dport: common("skc_dport")?,
        saddr: inet
            + need(
                btf.member_offset("inet_sock", "inet_saddr"),
                "inet_sock.inet_saddr",
            )?,
        daddr: common("skc_daddr")?,
        saddr_v6: common("skc_v6_rcv_saddr")?,
        daddr_v6: common("skc_v6_daddr")?,
        net: inet
            + sock
            + need(
                btf.path_offset("sock_common", &["skc_net", "net"]),
                "sock_common.skc_net.net",
            )?,
        inum: need(btf.path_offset("net", &["ns", "inum"]), "net.ns.inum")?,
        // Absent from a kernel built without CONFIG_BPF: no callback then.
        ops_flags: btf
            .member_offset("tcp_sock", "bpf_sock_ops_cb_flags")
            .unwrap_or(0),
    })
}

/// Where this kernel keeps a task's process, name and descriptors, for the
/// programs that tell who holds a socket. None (with the reason logged)
/// when the BTF lacks any of it: owners are then learned from transitions
/// alone, as before.
fn task_layout(btf: &Btf, release: &str) -> Option<TaskLayout> {
    let member = |name: &str, member: &str| {
        let found = btf.member_offset(name, member);
        if found.is_none() {
            log::warn!(
                "the kernel's BTF has no {name}.{member}: accepted and handed-over sockets \
                 keep the owner learned from their transitions"
            );
        }
        found
    };
    // `file_ref_t f_ref` (6.13 on) counts references from 0; the older
    // `atomic_long_t f_count` from 1.
    let (f_refs, f_refs_one) = match btf.member_offset("file", "f_ref") {
        Some(at) => (at, 0),
        None => (member("file", "f_count")?, 1),
    };
    // `skc_dport`, `skc_num`, `skc_family`: within one 8-byte read.
    let (head, num, family) = (
        member("sock_common", "skc_dport")?,
        member("sock_common", "skc_num")?,
        member("sock_common", "skc_family")?,
    );
    if !(head < num && num < family && family + 2 <= head + 8) {
        log::warn!(
            "the kernel's struct sock_common has its ports and family apart: accepted \
             sockets keep the owner learned from their transitions"
        );
        return None;
    }
    Some(TaskLayout {
        tgid: member("task_struct", "tgid")?,
        pid: member("task_struct", "pid")?,
        group_leader: member("task_struct", "group_leader")?,
        comm: member("task_struct", "comm")?,
        files: member("task_struct", "files")?,
        fdt: member("files_struct", "fdt")?,
        max_fds: member("fdtable", "max_fds")?,
        fd: member("fdtable", "fd")?,
        private_data: member("file", "private_data")?,
        f_refs,
        f_refs_one,
        sk: member("socket", "sk")?,
        sk_socket: member("sock", "sk_socket")?,
        head,
        head_num_shift: 8 * (num - head),
        head_family_shift: 8 * (family - head),
        typed: u32::from(version(release).is_some_and(|v| v >= TYPED_TASK_KERNEL)),
    })
}

/// Where this kernel keeps what the iterator reads of a file. None (with
/// the reason logged) when the BTF lacks any of it.
fn file_layout(btf: &Btf, release: &str) -> Option<FileLayout> {
    let member = |name: &str, member: &str| {
        let found = btf.member_offset(name, member);
        if found.is_none() {
            log::warn!(
                "{}",
                without_iterator(&anyhow!("the kernel's BTF has no {name}.{member}"))
            );
        }
        found
    };
    Some(FileLayout {
        f_op: member("file", "f_op")?,
        f_inode: member("file", "f_inode")?,
        i_ino: member("inode", "i_ino")?,
        sock_from_file: u32::from(version(release).is_some_and(|v| v >= SOCK_FROM_FILE_KERNEL)),
        reference_fd: 0,
    })
}

/// What the reset tracepoints pass their programs, and the names of the
/// reasons. They only annotate closes: without tracefs or the tracepoints
/// tcptrace still traces every transition.
fn reset_layouts() -> (ResetLayout, ResetLayout, Vec<(u8, String)>) {
    let mut layouts = [ResetLayout::default(); 2];
    let mut reasons = Vec::new();
    for (name, l) in [layout::RESET_SENT, layout::RESET_RECEIVED]
        .into_iter()
        .zip(&mut layouts)
    {
        let dir = match tracefs::event_dir(layout::RESET_CATEGORY, name) {
            Ok(dir) => dir,
            Err(e) => {
                log::warn!("resets will not be annotated: {e:#}");
                break;
            }
        };
        match fs::read_to_string(dir.join("format"))
            .map_err(anyhow::Error::from)
            .and_then(|f| layout::parse_reset(&f))
        {
            Ok((found, names)) => {
                *l = found;
                if name == layout::RESET_SENT {
                    reasons = names;
                }
            }
            Err(e) => log::warn!("resets will not be annotated: tcp:{name}: {e:#}"),
        }
    }
    let [sent, received] = layouts;
    (sent, received, reasons)
}

/// The oldest kernel tcptrace traces on, and why: the BPF ring buffer
/// (5.8) carries the events; BTF-typed tracepoint programs (5.5) read the
/// socket; both came before it.
const OLDEST_KERNEL: (u32, u32) = (5, 8);

/// From this kernel on, `bpf_get_current_task_btf` gives the programs a
/// typed pointer to the current task.
const TYPED_TASK_KERNEL: (u32, u32) = (5, 11);

/// From this kernel on, `bpf_sock_from_file` tells a socket's file.
const SOCK_FROM_FILE_KERNEL: (u32, u32) = (5, 11);

/// The major and minor version of a kernel release (`uname -r`).
/// From 5.11 BPF memory is charged to the memory cgroup instead of
/// RLIMIT_MEMLOCK.
const MEMCG_CHARGED_KERNEL: (u32, u32) = (5, 11);

fn version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next()) {
        (Some(Some(major)), Some(Some(minor))) => Some((major, minor)),
        _ => None,
    }
}

/// Why a kernel release (`uname -r`) is too old to trace on, in one line.
fn too_old(release: &str) -> Option<String> {
    (version(release)? < OLDEST_KERNEL).then(|| {
        format!(
            "this kernel ({release}) is older than Linux {}.{}, which tracing needs (the BPF \
             ring buffer, BTF-typed tracepoint programs); `tcptrace read` and `report` still \
             work on recordings made elsewhere",
            OLDEST_KERNEL.0, OLDEST_KERNEL.1
        )
    })
}

/// Kernels before 5.11 charge BPF maps to the locked-memory limit, and
/// raising it needs CAP_SYS_RESOURCE: with CAP_BPF and CAP_PERFMON alone
/// the rings do not fit. Says so when that is the case here.
fn memlock_too_small() -> Option<String> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    if version(release.trim())? >= MEMCG_CHARGED_KERNEL {
        return None;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(memlock_message(release.trim(), limit.rlim_cur))
}

fn memlock_message(release: &str, limit: u64) -> String {
    format!(
        "this kernel ({release}, older than {}.{}) counts BPF maps against the \
         locked-memory limit, {} KiB for this process, and raising it needs \
         CAP_SYS_RESOURCE: run tcptrace as root, add CAP_SYS_RESOURCE, or raise the \
         limit (`ulimit -l unlimited`; LimitMEMLOCK=infinity in a systemd unit)",
        MEMCG_CHARGED_KERNEL.0,
        MEMCG_CHARGED_KERNEL.1,
        limit / 1024
    )
}

/// EPERM/EACCES from the loader mean missing privileges, whatever the
/// capability check above concluded (a seccomp filter or a lockdown can
/// still refuse): say so in the same words.
fn load_error(e: anyhow::Error) -> StartError {
    let denied = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(|io| io.raw_os_error())
            .is_some_and(|code| code == libc::EPERM || code == libc::EACCES)
            || c.to_string().contains("Operation not permitted")
    });
    if denied && let Some(why) = memlock_too_small() {
        return StartError::Privileges(format!("the kernel refused tcptrace ({e:#}); {why}"));
    }
    if denied {
        return StartError::Privileges(format!(
            "the kernel refused tcptrace ({e:#}); tracing needs the CAP_BPF and CAP_PERFMON \
             capabilities: run tcptrace as root, for example `sudo tcptrace`"
        ));
    }
    if format!("{e:#}").contains("the kernel refused it") {
        return StartError::Other(e.context(
            "this is a bug in tcptrace: please report it with the verifier log that \
             `tcptrace --debug` prints",
        ));
    }
    StartError::Other(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_locked_memory_limit_on_an_old_kernel_says_what_to_do() {
        let m = memlock_message("5.10.0-32-amd64", 65536);
        assert!(m.contains("5.10.0-32-amd64, older than 5.11"), "{m}");
        assert!(m.contains("64 KiB"), "{m}");
        assert!(
            m.contains("CAP_SYS_RESOURCE") && m.contains("LimitMEMLOCK=infinity"),
            "{m}"
        );
    }

    fn at(ts_ns: u64, skaddr: u64) -> Event {
        Event::new(tcptrace_common::KIND_STATE, ts_ns, skaddr)
    }

    fn times(v: &[Event]) -> Vec<(u64, u64)> {
        v.iter().map(|e| (e.ts_ns, e.skaddr)).collect()
    }

    #[test]
    fn a_kernel_before_5_8_is_named_with_what_it_lacks_and_what_still_works() {
        let why = too_old("5.4.0-150-generic").unwrap();
        assert!(why.starts_with("this kernel (5.4.0-150-generic) is older than Linux 5.8"));
        assert!(why.contains("`tcptrace read` and `report` still work"));
        assert!(too_old("4.19.0-27-amd64").is_some());
        for fine in [
            "5.8.0",
            "5.10.0-30-amd64",
            "6.1.0-57-amd64",
            "6.18.44-fc-v1272",
            "odd",
        ] {
            assert_eq!(too_old(fine), None, "{fine}");
        }
    }

    #[test]
    fn the_task_is_read_through_its_typed_pointer_from_5_11() {
        let typed = |release| version(release).is_some_and(|v| v >= TYPED_TASK_KERNEL);
        assert!(
            !typed("5.10.0-30-amd64"),
            "5.10 has no bpf_get_current_task_btf"
        );
        assert!(typed("5.11.0"));
        assert!(typed("6.1.0-57-amd64"));
        assert!(typed("6.18.44-fc-v1272"));
        assert!(
            !typed("odd"),
            "an unknown release takes the probes, which work everywhere"
        );
    }

    #[test]
    fn two_cpus_rings_merge_in_time_order_and_young_events_wait() {
        // CPU 0's ring still holds one event from the last read (time 5):
        // its next read brings older ones, which an interrupt overtook.
        let mut waiting = [VecDeque::from([at(5, 9)]), VecDeque::new()];
        enqueue(&mut waiting[0], &[at(1, 1), at(4, 1), at(8, 1)]);
        enqueue(&mut waiting[1], &[at(2, 2), at(4, 2), at(9, 2)]);
        let mut out = Vec::new();
        merge(&mut waiting, 8, &mut out);
        // Equal times keep ring order: CPU 0's event first.
        assert_eq!(times(&out), [(1, 1), (2, 2), (4, 1), (4, 2), (5, 9)]);
        let rest: Vec<Event> = waiting.iter().flatten().copied().collect();
        assert_eq!(times(&rest), [(8, 1), (9, 2)]);
    }

    #[test]
    fn rings_share_the_budget_among_the_cpus_that_write_them() {
        let mib = 1 << 20;
        assert_eq!(ring_sizes(1)[..2], [32 * mib, RING_UNUSED_BYTES]);
        assert_eq!(ring_sizes(2)[..3], [16 * mib, 16 * mib, RING_UNUSED_BYTES]);
        // Three CPUs get 8 MiB each: a power of two within the share.
        assert_eq!(
            ring_sizes(3)[..4],
            [8 * mib, 8 * mib, 8 * mib, RING_UNUSED_BYTES]
        );
        // More CPUs than rings: every ring is used, none below 4 MiB.
        assert_eq!(ring_sizes(64), [4 * mib; RINGS]);
    }
}

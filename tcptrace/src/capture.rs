//! Capture: load the eBPF program with the filters compiled in, attach it to
//! `sock:inet_sock_set_state`, and hand out what it puts in the ring.

use std::fs;

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf, ring_buf::RingBufItem},
    programs::TracePoint,
};
use tcptrace_ebpf::{
    CONFIG_GLOBAL, COUNTER_FILTERED, COUNTER_LOST, COUNTERS_MAP, Config, EVENTS_MAP, PORTS_MAP,
    PROGRAM,
};

use crate::btf::Btf;
use crate::filter::Filter;
use crate::{layout, privileges, tracefs};
use tcptrace_ebpf::{NetnsLayout, PROGRAM_RESET_RECEIVED, PROGRAM_RESET_SENT, ResetLayout};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcptrace"));

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Events the ring had no room for.
    pub lost: u64,
    /// Events the program dropped by protocol, family or port.
    pub filtered: u64,
    /// Times the kernel skipped the program because another BPF program was
    /// running on that CPU (`recursion_misses`): transitions never seen.
    pub missed: u64,
}

/// An attached tracer. Dropping it detaches the program.
pub struct Capture {
    ring: RingBuf<MapData>,
    counters: PerCpuArray<MapData, u64>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The program's descriptor, for its statistics in /proc/self/fdinfo.
    program_fd: i32,
    reset_reasons: Vec<(u8, String)>,
    /// Owns the program and its link.
    _ebpf: Ebpf,
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
    pub fn start(filter: &Filter) -> Result<Capture, StartError> {
        let missing = privileges::missing_for_tracing(privileges::effective());
        if !missing.is_empty() {
            return Err(StartError::Privileges(privilege_message(&missing)));
        }
        let dir = tracefs::event_dir(layout::CATEGORY, layout::NAME)?;
        let format_path = dir.join("format");
        let format = fs::read_to_string(&format_path)
            .with_context(|| format!("cannot read {}", format_path.display()))?;
        let layout = layout::parse(&format)?;
        let (ports, port_filters) = filter.kernel_ports();
        let (reset_sent, reasons) = reset_layout(&dir, layout::RESET_SENT);
        let (reset_received, _) = reset_layout(&dir, layout::RESET_RECEIVED);
        let config = Config {
            layout,
            families: filter.kernel_families(),
            port_filters: u32::from(port_filters),
            reset_sent,
            reset_received,
            netns: netns_layout(filter.spec().netns)?,
        };
        log::debug!("program configuration: {config:?}");

        let mut ebpf = EbpfLoader::new()
            .override_global(CONFIG_GLOBAL, &config, true)
            .load(OBJECT)
            .map_err(|e| load_error(anyhow!(e).context("cannot load the eBPF maps")))?;

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("eBPF-side logging is off: {e}");
                None
            }
        };

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

        let program: &mut TracePoint = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("the eBPF object has no program {PROGRAM}"))?
            .try_into()
            .map_err(|e| anyhow!("{e}"))?;
        program
            .load()
            .map_err(|e| load_error(anyhow!(e).context("the kernel refused the eBPF program")))?;
        let program_fd = {
            use std::os::fd::{AsFd, AsRawFd};
            program.fd().map_err(|e| anyhow!(e))?.as_fd().as_raw_fd()
        };
        program
            .attach(layout::CATEGORY, layout::NAME)
            .map_err(|e| {
                load_error(anyhow!(e).context(format!(
                    "cannot attach to the {}:{} tracepoint",
                    layout::CATEGORY,
                    layout::NAME
                )))
            })?;

        // Resets only annotate closes: without them tcptrace still traces.
        for (name, l) in [
            (PROGRAM_RESET_SENT, reset_sent),
            (PROGRAM_RESET_RECEIVED, reset_received),
        ] {
            if l.record_len == 0 {
                continue;
            }
            let attached = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))
                .and_then(|p| <&mut TracePoint>::try_from(p).map_err(|e| anyhow!("{e}")))
                .and_then(|p| {
                    p.load().map_err(|e| anyhow!(e))?;
                    p.attach(layout::RESET_CATEGORY, name)
                        .map_err(|e| anyhow!(e))
                });
            if let Err(e) = attached {
                log::warn!("resets will not be annotated: cannot attach to tcp:{name}: {e:#}");
            }
        }

        let ring = RingBuf::try_from(
            ebpf.take_map(EVENTS_MAP)
                .ok_or_else(|| anyhow!("no {EVENTS_MAP} map"))?,
        )
        .map_err(|e| anyhow!(e))?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(COUNTERS_MAP)
                .ok_or_else(|| anyhow!("no {COUNTERS_MAP} map"))?,
        )
        .map_err(|e| anyhow!(e))?;
        Ok(Capture {
            ring,
            counters,
            logger,
            program_fd,
            reset_reasons: reasons,
            _ebpf: ebpf,
        })
    }

    /// Names of the kernel's reset reasons, by number.
    pub fn reset_reasons(&self) -> &[(u8, String)] {
        &self.reset_reasons
    }

    /// The next event in the ring, if any. Never blocks.
    pub fn next_event(&mut self) -> Option<RingBufItem<'_>> {
        self.ring.next()
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
        Ok(Counters {
            lost: sum(COUNTER_LOST)?,
            filtered: sum(COUNTER_FILTERED)?,
            missed: self.recursion_misses(),
        })
    }

    /// The kernel's count of runs it skipped (fdinfo of the program).
    fn recursion_misses(&self) -> u64 {
        fs::read_to_string(format!("/proc/self/fdinfo/{}", self.program_fd))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("recursion_misses:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Writes pending eBPF-side log records to the `log` logger.
    pub fn flush_logs(&mut self) {
        if let Some(l) = &mut self.logger {
            l.flush();
        }
    }
}

/// Where this kernel keeps a socket's network namespace inode, from its BTF.
/// Without BTF every namespace reads as 0, which `--netns` cannot filter on.
fn netns_layout(only: Option<u32>) -> Result<NetnsLayout> {
    let found = fs::read("/sys/kernel/btf/vmlinux")
        .map_err(anyhow::Error::from)
        .and_then(|data| Btf::parse(&data))
        .and_then(|btf| {
            let sk_common = btf.member_offset("sock", "__sk_common");
            let sk_net = btf.path_offset("sock_common", &["skc_net", "net"]);
            let inum = btf.path_offset("net", &["ns", "inum"]);
            match (sk_common, sk_net, inum) {
                (Some(base), Some(sk_net), Some(inum)) => Ok((base + sk_net, inum)),
                _ => Err(anyhow!("the kernel's BTF has no sock->net->ns.inum path")),
            }
        });
    match (found, only) {
        (Ok((sk_net, inum)), _) => Ok(NetnsLayout {
            enabled: 1,
            sk_net,
            inum,
            only: only.unwrap_or(0),
        }),
        (Err(e), Some(_)) => {
            Err(e.context("--netns needs the kernel's BTF (/sys/kernel/btf/vmlinux)"))
        }
        (Err(e), None) => {
            log::warn!("network namespaces will show as unknown: {e:#}");
            Ok(NetnsLayout::default())
        }
    }
}

/// A reset tracepoint's layout; absent or unreadable means no annotation.
fn reset_layout(set_state_dir: &std::path::Path, name: &str) -> (ResetLayout, Vec<(u8, String)>) {
    let events = set_state_dir.parent().and_then(|p| p.parent());
    let path = events.map(|e| e.join(layout::RESET_CATEGORY).join(name).join("format"));
    match path.map(fs::read_to_string) {
        Some(Ok(format)) => layout::parse_reset(&format).unwrap_or_else(|e| {
            log::warn!("resets will not be annotated: tcp:{name}: {e:#}");
            Default::default()
        }),
        _ => {
            log::info!("this kernel has no tcp:{name} tracepoint: resets will not be annotated");
            Default::default()
        }
    }
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
    if denied {
        return StartError::Privileges(format!(
            "the kernel refused tcptrace ({e:#}); tracing needs the CAP_BPF and CAP_PERFMON \
             capabilities: run tcptrace as root, for example `sudo tcptrace`"
        ));
    }
    if format!("{e:#}").contains("verifier") {
        return StartError::Other(
            e.context("this is a bug in tcptrace: please report it with the verifier log above"),
        );
    }
    StartError::Other(e)
}

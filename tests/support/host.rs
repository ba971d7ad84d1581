//! The host as the tests use it: ports and scratch directories of their
//! own, the monotonic clock, a pseudo-terminal, the kernel's BPF programs,
//! a process's threads, and headless chromium for the HTML reports.

use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A number not handed out before in this test process: names of
/// namespaces and directories of tests running side by side differ.
pub(crate) fn next_seq() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// A port for one test: below the default ephemeral range, so no host
/// connection picks it as its local port, and distinct per test process and
/// test.
pub fn unique_port() -> u16 {
    let n = next_seq();
    20000 + ((std::process::id() * 37 + n * 101) % 10000) as u16
}

/// CLOCK_MONOTONIC now: the clock of tcptrace's `ts_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Waits (bounded) until `what` holds; a test that waits forever tells
/// nothing.
pub fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not after {limit:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a set-up command that must succeed.
pub(crate) fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = next_seq();
        let dir = std::env::temp_dir().join(format!("tcptrace-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A pseudo-terminal: hand its terminal side to a process, read what it
/// showed once that process is gone.
pub struct Pty {
    slave: Option<std::os::fd::OwnedFd>,
    reader: JoinHandle<String>,
}

impl Pty {
    pub fn new() -> Pty {
        use std::os::fd::FromRawFd;
        // SAFETY: plain pty calls; the descriptors become ours.
        let (master, slave) = unsafe {
            let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(master >= 0 && libc::grantpt(master) == 0 && libc::unlockpt(master) == 0);
            let name = std::ffi::CStr::from_ptr(libc::ptsname(master)).to_owned();
            let slave = libc::open(
                name.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            );
            assert!(slave >= 0);
            (
                std::fs::File::from_raw_fd(master),
                std::os::fd::OwnedFd::from_raw_fd(slave),
            )
        };
        let reader = thread::spawn(move || {
            let mut all = Vec::new();
            // Ends with EIO once no process has the terminal open.
            let _ = BufReader::new(master).read_to_end(&mut all);
            String::from_utf8_lossy(&all).into_owned()
        });
        Pty {
            slave: Some(slave),
            reader,
        }
    }

    /// The terminal side, for a child's stdout or stderr (once).
    pub fn terminal(&self) -> Stdio {
        let fd = self
            .slave
            .as_ref()
            .expect("terminal still open")
            .try_clone()
            .expect("dup");
        Stdio::from(fd)
    }

    /// Everything shown on the terminal, after its users have exited.
    pub fn screen(mut self) -> String {
        drop(self.slave.take());
        self.reader.join().expect("pty reader")
    }
}

impl Default for Pty {
    fn default() -> Self {
        Pty::new()
    }
}

const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// bpf() with a zero-padded attribute block of 128 bytes.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
    // SAFETY: the attribute block is 128 bytes, as the size says.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128) }
}

/// Names of the BPF programs loaded in the kernel, read with the bpf()
/// system call (BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID,
/// BPF_OBJ_GET_INFO_BY_FD), so no bpftool is needed.
pub fn loaded_bpf_programs() -> Vec<String> {
    // Offset of `name` in struct bpf_prog_info.
    const NAME_OFFSET: usize = 64;
    let mut names = Vec::new();
    let mut id: u32 = 0;
    loop {
        let mut attr = [0u64; 16];
        attr[0] = u64::from(id);
        if bpf(BPF_PROG_GET_NEXT_ID, &mut attr) != 0 {
            break;
        }
        id = (attr[0] >> 32) as u32;
        let mut attr = [0u64; 16];
        attr[0] = u64::from(id);
        let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr);
        if fd < 0 {
            continue;
        }
        let mut info = [0u8; 256];
        let mut attr = [0u64; 16];
        attr[0] = fd as u64 | ((info.len() as u64) << 32);
        attr[1] = info.as_mut_ptr() as u64;
        if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) == 0 {
            let raw = &info[NAME_OFFSET..NAME_OFFSET + 16];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(16);
            names.push(String::from_utf8_lossy(&raw[..end]).into_owned());
        }
        // SAFETY: closing the descriptor the kernel just gave us.
        unsafe { libc::close(fd as i32) };
    }
    names
}

/// Whether the kernel still has the BPF program `id` (a program is freed
/// once its last reference is gone).
pub fn prog_exists(id: u32) -> bool {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(id);
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr);
    if fd >= 0 {
        // SAFETY: closing the descriptor we were given.
        unsafe { libc::close(fd as i32) };
    }
    fd >= 0
}

/// The names of a process's threads now, from /proc.
pub fn thread_names(pid: u32) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim_end().to_string())
        .collect()
}

/// Debian's chromium, headless, on the page `html` (a path), with `extra`
/// flags (`--dump-dom`, `--screenshot=FILE`).
pub fn chromium(dir: &TempDir, html: &str, extra: &[&str]) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", dir.path("chromium")),
            "--window-size=1000,1400",
        ])
        .args(extra)
        .arg(format!("file://{html}"))
        .output()
        .expect("chromium (Debian's chromium package; cargo xtask test installs it)")
}

/// The page's DOM once chromium ran its scripts.
pub fn chromium_dom(dir: &TempDir, html: &str) -> String {
    String::from_utf8_lossy(&chromium(dir, html, &["--dump-dom"]).stdout).into_owned()
}

/// The chart `<svg id="ID" ...>...</svg>` of a rendered page.
pub fn svg_chart(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("<svg id=\"{id}\""))
        .unwrap_or_else(|| panic!("no chart {id}"));
    let end = start + dom[start..].find("</svg>").expect("closed svg");
    dom[start..end].to_string()
}

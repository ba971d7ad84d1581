//! A scenario peer: a TCP server or client that does one thing the kernel
//! will report, under a process name the tests can check.
//!
//! tt-peer server ADDR:PORT --mode MODE [--hold-ms N | --hold-while PATH] [--conns N]
//! tt-peer client ADDR:PORT --mode MODE [--hold-ms N | --hold-while PATH] [--bind IP]
//! (either takes --name NAME to choose its process name; a client takes
//! --repeat N to make N connections one after the other)
//!
//! --hold-while PATH holds for as long as the file PATH exists (instead of
//! --hold-ms): the test removes it once it has seen what it came to see, so
//! a slow machine makes the scenario longer, never too short to observe. A
//! pause held by a file ends after 120 s all the same, as a failure.
//!
//! A server also takes --delay-accept-ms N (connections wait in the
//! listener's queue that long before each accept), or --delay-accept-while
//! PATH (they wait there while PATH exists), and --cgroup-procs FILE
//! (it moves itself into that cgroup v2 directory before listening). Modes
//! that hand a socket to another process or thread (fork-leak, pass-fd,
//! threads, daemon) are described at `handover`.
//!
//! A server prints "ready" once listening. Each exits 0 when the scenario went
//! as planned, and 1 with a message when it did not.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::process::exit;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// A wait at a mode's pause: a fixed time, or as long as a file exists.
enum Pause {
    For(Duration),
    While(PathBuf),
}

/// A file-held pause ends by itself after this long: a test that died
/// without removing its file leaves no peer behind for good.
const PAUSE_LIMIT: Duration = Duration::from_secs(120);

impl Pause {
    fn new(ms: Option<String>, path: Option<String>) -> Pause {
        match path {
            Some(p) => Pause::While(p.into()),
            None => Pause::For(Duration::from_millis(
                ms.map_or(0, |v| v.parse().unwrap_or(0)),
            )),
        }
    }

    fn wait(&self) {
        match self {
            Pause::For(d) => sleep(*d),
            Pause::While(path) => {
                let deadline = Instant::now() + PAUSE_LIMIT;
                while path.exists() {
                    if Instant::now() > deadline {
                        fail(&format!(
                            "{} still there after {PAUSE_LIMIT:?}",
                            path.display()
                        ));
                    }
                    sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (role, addr) = match &args[..] {
        [role, addr, ..] => (
            role.as_str(),
            addr.parse::<SocketAddr>().unwrap_or_else(|e| fail(&e)),
        ),
        _ => fail(&"usage: tt-peer server|client ADDR:PORT --mode MODE"),
    };
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let mode = opt("--mode").unwrap_or_default();
    let hold = Pause::new(opt("--hold-ms"), opt("--hold-while"));
    let conns: usize = opt("--conns").map_or(1, |v| v.parse().unwrap_or(1));
    let delay = Pause::new(opt("--delay-accept-ms"), opt("--delay-accept-while"));
    let repeat: usize = opt("--repeat").map_or(1, |v| v.parse().unwrap_or(1));
    let bind = opt("--bind").map(|v| v.parse::<IpAddr>().unwrap_or_else(|e| fail(&e)));
    let default_name = if role == "server" {
        "tt-server"
    } else {
        "tt-client"
    };
    set_comm(&opt("--name").unwrap_or_else(|| default_name.into()));
    if let Some(procs) = opt("--cgroup-procs") {
        std::fs::write(&procs, std::process::id().to_string())
            .unwrap_or_else(|e| fail(&format!("{procs}: {e}")));
    }
    match role {
        "server" if HANDOVERS.contains(&mode.as_str()) => handover(addr, &mode, &hold, conns),
        "server" => server(addr, &mode, &hold, conns, &delay),
        "client" => (0..repeat).for_each(|_| client(addr, &mode, &hold, bind)),
        _ => fail(&format!("unknown role {role}")),
    }
}

fn server(addr: SocketAddr, mode: &str, hold: &Pause, conns: usize, delay: &Pause) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| fail(&e));
    println!("ready");
    std::io::stdout().flush().ok();
    if mode == "listen-only" {
        hold.wait();
        return;
    }
    for _ in 0..conns {
        delay.wait();
        let (mut s, _) = listener.accept().unwrap_or_else(|e| fail(&e));
        match mode {
            // The client closes first: we see EOF, linger in CLOSE_WAIT, close.
            "wait-peer-close" => {
                read_to_eof(&mut s);
                hold.wait();
            }
            // We close first, after a moment in ESTABLISHED.
            "close-first" => hold.wait(),
            // We abort: SO_LINGER 0, close() sends a reset.
            "reset-first" => {
                hold.wait();
                linger_zero(&s);
            }
            // The client half-closes; we answer after EOF, then close.
            "reply-after-eof" => {
                read_to_eof(&mut s);
                hold.wait();
                s.write_all(b"pong").unwrap_or_else(|e| fail(&e));
            }
            // The client resets: reading fails or ends.
            "expect-reset" => {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                }
            }
            other => fail(&format!("unknown server mode {other}")),
        }
        drop(s);
    }
}

const HANDOVERS: [&str; 4] = ["fork-leak", "pass-fd", "threads", "daemon"];

/// Servers whose sockets change hands, each connection read to EOF (the
/// client closes first):
/// - fork-leak: accept, fork, the parent closes its copy at once; the child
///   holds the socket past EOF for the hold time (the leak), then exits.
/// - pass-fd: a receiver process (named tt-receiver, forked before the
///   listener exists) gets each accepted socket over a Unix socket
///   (SCM_RIGHTS), the sender closes its copy; the receiver holds it past
///   EOF for the hold time, then closes it.
/// - threads: a thread named tt-acceptor accepts, a thread named tt-closer
///   reads to EOF, holds and closes; the listener stays with the main thread.
/// - daemon: the launcher listens, then starts a daemon (setsid, double
///   fork, renamed tt-daemon, stdio on /dev/null) that inherits the
///   listener, says "ready" and exits; the daemon serves the connections
///   (giving up after 20 s without one) and exits.
fn handover(addr: SocketAddr, mode: &str, hold: &Pause, conns: usize) {
    match mode {
        "pass-fd" => return pass_fd(addr, hold, conns),
        "threads" => return threads(addr, hold, conns),
        _ => {}
    }
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| fail(&e));
    if mode == "daemon" {
        daemonize();
        set_comm("tt-daemon");
        // A daemon that never gets its clients must not outlive the test.
        set_timeout(listener.as_raw_fd(), libc::SO_RCVTIMEO, 20);
        for _ in 0..conns {
            let (mut s, _) = listener.accept().unwrap_or_else(|e| fail(&e));
            read_to_eof(&mut s);
            hold.wait();
        }
        exit(0);
    }
    println!("ready");
    std::io::stdout().flush().ok();
    let mut children = Vec::new();
    for _ in 0..conns {
        let (mut s, _) = listener.accept().unwrap_or_else(|e| fail(&e));
        // SAFETY: this process has one thread; the child only makes
        // system calls and exits.
        match unsafe { libc::fork() } {
            -1 => fail(&std::io::Error::last_os_error()),
            0 => {
                drop(listener);
                read_to_eof(&mut s);
                hold.wait();
                // SAFETY: ends the child without running the parent's exit path.
                unsafe { libc::_exit(0) }
            }
            child => children.push(child),
        }
        drop(s);
    }
    for child in children {
        wait_child(child);
    }
    // Only now: which process made the listener's last close is then sure.
    drop(listener);
}

/// Starts the daemon and returns in it: the launcher prints "ready" once
/// the daemon runs, and exits.
fn daemonize() {
    // SAFETY: this process has one thread; fork, setsid, dup2 and _exit
    // are plain system calls.
    unsafe {
        match libc::fork() {
            -1 => fail(&std::io::Error::last_os_error()),
            0 => {}
            middle => {
                wait_child(middle);
                println!("ready");
                std::io::stdout().flush().ok();
                exit(0);
            }
        }
        libc::setsid();
        match libc::fork() {
            -1 => libc::_exit(1),
            0 => {}
            _ => libc::_exit(0),
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
        libc::close(null);
    }
}

fn pass_fd(addr: SocketAddr, hold: &Pause, conns: usize) {
    let mut pair = [0; 2];
    // SAFETY: socketpair fills the two descriptors.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) } != 0 {
        fail(&std::io::Error::last_os_error());
    }
    // SAFETY: one thread; the receiver makes system calls and exits.
    let receiver = match unsafe { libc::fork() } {
        -1 => fail(&std::io::Error::last_os_error()),
        0 => {
            set_comm("tt-receiver");
            // SAFETY: closing the sender's end in the receiver.
            unsafe { libc::close(pair[0]) };
            for _ in 0..conns {
                // SAFETY: a descriptor received is ours to own.
                let mut s = unsafe { TcpStream::from_raw_fd(recv_fd(pair[1])) };
                read_to_eof(&mut s);
                hold.wait();
            }
            // SAFETY: ends the receiver without the parent's exit path.
            unsafe { libc::_exit(0) }
        }
        pid => pid,
    };
    // SAFETY: closing the receiver's end in the sender.
    unsafe { libc::close(pair[1]) };
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| fail(&e));
    println!("ready");
    std::io::stdout().flush().ok();
    for _ in 0..conns {
        let (s, _) = listener.accept().unwrap_or_else(|e| fail(&e));
        send_fd(pair[0], s.as_raw_fd());
        drop(s);
    }
    drop(listener);
    wait_child(receiver);
}

fn threads(addr: SocketAddr, hold: &Pause, conns: usize) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| fail(&e));
    println!("ready");
    std::io::stdout().flush().ok();
    let (tx, rx) = std::sync::mpsc::channel::<TcpStream>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let shared = &listener;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            set_comm("tt-acceptor");
            for _ in 0..conns {
                let (s, _) = shared.accept().unwrap_or_else(|e| fail(&e));
                tx.send(s).unwrap_or_else(|e| fail(&e));
            }
            // Alive until the closer is done, so /proc shows every thread.
            let _ = done_rx.recv();
        });
        scope.spawn(move || {
            set_comm("tt-closer");
            for mut s in rx.iter().take(conns) {
                read_to_eof(&mut s);
                hold.wait();
            }
            let _ = done_tx.send(());
        });
    });
    drop(listener);
}

fn send_fd(over: i32, fd: i32) {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: a control buffer sized by CMSG_SPACE for one descriptor,
    // filled through the CMSG_* accessors.
    unsafe {
        let space = libc::CMSG_SPACE(size_of::<i32>() as u32) as usize;
        let mut control = vec![0u8; space];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        // size_t with glibc, socklen_t with musl (the arm64 matrix's).
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        if libc::sendmsg(over, &msg, 0) != 1 {
            fail(&std::io::Error::last_os_error());
        }
    }
}

fn recv_fd(over: i32) -> i32 {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: as in send_fd; the descriptor is read only from a
    // SCM_RIGHTS message of the expected length.
    unsafe {
        let space = libc::CMSG_SPACE(size_of::<i32>() as u32) as usize;
        let mut control = vec![0u8; space];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        if libc::recvmsg(over, &mut msg, 0) != 1 {
            fail(&"the sender sent no descriptor");
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            fail(&"no SCM_RIGHTS message");
        }
        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>())
    }
}

fn wait_child(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid
        || !libc::WIFEXITED(status)
        || libc::WEXITSTATUS(status) != 0
    {
        fail(&format!("child {pid} failed (status {status:#x})"));
    }
}

fn set_timeout(fd: i32, opt: libc::c_int, secs: i64) {
    let tv = libc::timeval {
        tv_sec: secs,
        tv_usec: 0,
    };
    // SAFETY: valid socket and option struct.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
}

fn client(addr: SocketAddr, mode: &str, hold: &Pause, bind: Option<IpAddr>) {
    if mode == "refused" {
        match connect(addr, bind) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            other => fail(&format!("expected ECONNREFUSED, got {other:?}")),
        }
    }
    let mut s = connect(addr, bind).unwrap_or_else(|e| fail(&e));
    match mode {
        "close" => hold.wait(),
        "wait-eof" => {
            read_to_eof(&mut s);
            hold.wait();
        }
        "reset" => {
            hold.wait();
            linger_zero(&s);
        }
        // The server aborts: reading ends in ECONNRESET.
        "expect-reset" => {
            let mut buf = [0u8; 64];
            match s.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => fail(&format!("expected ECONNRESET, got {other:?}")),
            }
        }
        "half-close" => {
            s.write_all(b"ping").unwrap_or_else(|e| fail(&e));
            s.shutdown(Shutdown::Write).unwrap_or_else(|e| fail(&e));
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap_or_else(|e| fail(&e));
            if got != b"pong" {
                fail(&format!("expected pong after the half-close, got {got:?}"));
            }
        }
        other => fail(&format!("unknown client mode {other}")),
    }
}

/// Connects, optionally from a given address with the port left to connect()
/// (IP_BIND_ADDRESS_NO_PORT), so the kernel reports the SYN_SENT with port 0.
fn connect(addr: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(ip) = bind else {
        return TcpStream::connect(addr);
    };
    let SocketAddr::V4(dst) = addr else {
        return Err(std::io::Error::other("--bind is IPv4 only"));
    };
    let IpAddr::V4(src) = ip else {
        return Err(std::io::Error::other("--bind is IPv4 only"));
    };
    let sockaddr = |a: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: plain socket calls on a descriptor we own; TcpStream takes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let len = size_of::<libc::sockaddr_in>() as u32;
        let src = sockaddr(src, 0);
        let dst = sockaddr(*dst.ip(), dst.port());
        if libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            4,
        ) != 0
            || libc::bind(fd, (&src as *const libc::sockaddr_in).cast(), len) != 0
            || libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// SO_LINGER with a zero timeout: close() sends a reset.
fn linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket and option struct.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    if rc != 0 {
        fail(&std::io::Error::last_os_error());
    }
}

fn read_to_eof(s: &mut TcpStream) {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap_or_else(|e| fail(&e));
}

fn set_comm(name: &str) {
    let c = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr()) };
}

fn fail(e: &dyn std::fmt::Display) -> ! {
    eprintln!("tt-peer: {e}");
    exit(1)
}

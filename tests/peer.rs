//! A scenario peer: a TCP server or client that does one thing the kernel
//! will report, under a process name the tests can check.
//!
//! tt-peer server ADDR:PORT --mode MODE [--hold-ms N] [--conns N]
//! tt-peer client ADDR:PORT --mode MODE [--hold-ms N] [--bind IP]
//! (either takes --name NAME to choose its process name; a client takes
//! --repeat N to make N connections one after the other)
//!
//! A server prints "ready" once listening. Each exits 0 when the scenario went
//! as planned, and 1 with a message when it did not.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::exit;
use std::thread::sleep;
use std::time::Duration;

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
    let hold = Duration::from_millis(opt("--hold-ms").map_or(0, |v| v.parse().unwrap_or(0)));
    let conns: usize = opt("--conns").map_or(1, |v| v.parse().unwrap_or(1));
    let repeat: usize = opt("--repeat").map_or(1, |v| v.parse().unwrap_or(1));
    let bind = opt("--bind").map(|v| v.parse::<IpAddr>().unwrap_or_else(|e| fail(&e)));
    let default_name = if role == "server" {
        "tt-server"
    } else {
        "tt-client"
    };
    set_comm(&opt("--name").unwrap_or_else(|| default_name.into()));
    match role {
        "server" => server(addr, &mode, hold, conns),
        "client" => (0..repeat).for_each(|_| client(addr, &mode, hold, bind)),
        _ => fail(&format!("unknown role {role}")),
    }
}

fn server(addr: SocketAddr, mode: &str, hold: Duration, conns: usize) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| fail(&e));
    println!("ready");
    std::io::stdout().flush().ok();
    if mode == "listen-only" {
        sleep(hold);
        return;
    }
    for _ in 0..conns {
        let (mut s, _) = listener.accept().unwrap_or_else(|e| fail(&e));
        match mode {
            // The client closes first: we see EOF, linger in CLOSE_WAIT, close.
            "wait-peer-close" => {
                read_to_eof(&mut s);
                sleep(hold);
            }
            // We close first, after a moment in ESTABLISHED.
            "close-first" => sleep(hold),
            // We abort: SO_LINGER 0, close() sends a reset.
            "reset-first" => {
                sleep(hold);
                linger_zero(&s);
            }
            // The client half-closes; we answer after EOF, then close.
            "reply-after-eof" => {
                read_to_eof(&mut s);
                sleep(hold);
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

fn client(addr: SocketAddr, mode: &str, hold: Duration, bind: Option<IpAddr>) {
    if mode == "refused" {
        match connect(addr, bind) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            other => fail(&format!("expected ECONNREFUSED, got {other:?}")),
        }
    }
    let mut s = connect(addr, bind).unwrap_or_else(|e| fail(&e));
    match mode {
        "close" => sleep(hold),
        "wait-eof" => {
            read_to_eof(&mut s);
            sleep(hold);
        }
        "reset" => {
            sleep(hold);
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

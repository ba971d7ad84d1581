//! tt-restarter: one generation of a restarted service, and the clients
//! that keep connecting to it, for the restart tests (tests/restart.rs).
//!
//! tt-restarter serve ADDR SERVE_MS HOLD_MS
//!   Listens on ADDR, accepts for SERVE_MS (reading each connection to its
//!   end, then closing it), then stops accepting for HOLD_MS so that
//!   connections wait in the queue, and closes the listener: the kernel
//!   resets what waits there. Says on stdout, with CLOCK_MONOTONIC
//!   nanoseconds (tcptrace's clock):
//!     listening NS       (after listen())
//!     queued N           (the accept queue just before the close, as the
//!                         kernel's TCP_INFO for the listener gives it)
//!     closed NS          (after close())
//!   SERVE_MS 0 serves until killed.
//!
//! tt-restarter client ADDR SECONDS INTERVAL_US
//!   Connects every INTERVAL_US for SECONDS, closing each connection at
//!   once, and says `connects N refused R` (R: ECONNREFUSED as connect()
//!   returned it).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tcptrace_tests::monotonic_ns;

/// Connections waiting in the listener's accept queue: for a listening
/// socket the kernel reports its accept backlog as tcpi_unacked.
fn queued(listener: &TcpListener) -> u32 {
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_unacked
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn serve(addr: &str, serve_ms: u64, hold_ms: u64) {
    let listener = TcpListener::bind(addr).expect("listen");
    say(format!("listening {}", monotonic_ns()));
    listener.set_nonblocking(true).expect("nonblocking");
    let until = (serve_ms > 0).then(|| Instant::now() + Duration::from_millis(serve_ms));
    while until.is_none_or(|u| Instant::now() < u) {
        match listener.accept() {
            Ok((mut conn, _)) => {
                // The client closes at once: read to its FIN, then close.
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                let mut buf = [0u8; 64];
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(200))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    std::thread::sleep(Duration::from_millis(hold_ms));
    say(format!("queued {}", queued(&listener)));
    drop(listener);
    say(format!("closed {}", monotonic_ns()));
}

fn client(addr: &str, seconds: f64, interval_us: u64) {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let (mut connects, mut refused) = (0u64, 0u64);
    let mut next = Instant::now();
    while Instant::now() < until {
        connects += 1;
        match TcpStream::connect(addr) {
            Ok(conn) => drop(conn),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => refused += 1,
            // Established, then reset by the closing listener before
            // connect() returned: a reset connection (so its rows show it),
            // not a refusal.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect: {e}"),
        }
        next += Duration::from_micros(interval_us);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    say(format!("connects {connects} refused {refused}"));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("argument {i} must be a number: {args:?}"))
    };
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1], num(2), num(3)),
        Some("client") => client(&args[1], args[2].parse().expect("SECONDS"), num(3)),
        _ => {
            eprintln!(
                "usage: tt-restarter serve ADDR SERVE_MS HOLD_MS | client ADDR SECONDS INTERVAL_US"
            );
            std::process::exit(2);
        }
    }
}

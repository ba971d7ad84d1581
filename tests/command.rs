//! `tcptrace -- COMMAND`: trace while a command (a restart) runs, then say
//! what happened and pass its exit status on.

use std::time::Instant;

use tcptrace_tests::{
    CLIENT_CLOSES, Netns, SERVER_PASSIVE, ServerMode, Tracer, life, peer_bin, tcptrace, unique_port,
};

#[test]
fn a_command_is_traced_until_it_ends_and_its_exit_status_passes_on() {
    let ns = Netns::new();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let server = ns.server(&addr, ServerMode::WaitPeerClose).start();
    let client = format!(
        "{} client {addr} --mode close; exit 3",
        peer_bin().display()
    );
    let tracer = Tracer::builder()
        .json()
        .no_snapshot()
        .port(port)
        .args(&["--linger", "1s"])
        .command(&["ip", "netns", "exec", &ns.name, "sh", "-c", &client])
        .start();
    let started = Instant::now();
    let out = tracer.wait();
    let server_pid = server.pid;
    server.finish();
    assert_eq!(out.status.code(), Some(3), "{}", out.stderr);
    assert!(
        out.stderr.contains("exited with status 3; tracing 1s more"),
        "{}",
        out.stderr
    );
    assert!(
        started.elapsed().as_secs_f64() >= 1.0,
        "tcptrace lingered after the command"
    );
    // The command's connection, both ends, all ten transitions: the
    // linger caught the server's close that follows the client's.
    let lives = out.lives();
    let c = life(&lives, CLIENT_CLOSES);
    let s = life(&lives, SERVER_PASSIVE);
    assert!(
        c.rows
            .iter()
            .all(|r| r.comm.as_deref() == Some("tt-client")),
        "{c:?}"
    );
    assert!(
        s.rows
            .iter()
            .filter(|r| r.queued.is_none())
            .all(|r| r.pid == Some(server_pid)),
        "{s:?}"
    );
}

#[test]
fn the_command_runs_as_the_sudo_caller_not_as_root() {
    let out = Tracer::builder()
        .port(unique_port())
        .args(&["--linger", "0s"])
        .command(&["sh", "-c", "echo \"as uid=$(id -u) gid=$(id -g)\" >&2"])
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .env("SUDO_USER", "nobody")
        .start()
        .wait();
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.lines().any(|l| l == "as uid=65534 gid=65534"),
        "{}",
        out.stderr
    );
    // Without sudo, root runs it as root.
    let out = Tracer::builder()
        .port(unique_port())
        .args(&["--linger", "0s"])
        .command(&["sh", "-c", "echo \"as uid=$(id -u)\" >&2"])
        .start()
        .wait();
    assert!(
        out.stderr.lines().any(|l| l == "as uid=0"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_command_that_does_not_exist_is_refused_before_tracing() {
    let out = tcptrace(&["--port", "80", "--", "tcptrace-no-such-command"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert_eq!(
        out.stderr.trim(),
        "tcptrace: cannot run tcptrace-no-such-command: not found in PATH"
    );
    let out = tcptrace(&["--duration", "1s", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("'--duration"), "{}", out.stderr);
    let out = tcptrace(&["--linger", "1s"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
}

#[test]
fn ctrl_c_while_the_command_runs_stops_tracing_with_status_130() {
    let tracer = Tracer::builder()
        .port(unique_port())
        .command(&["sleep", "30"])
        .start();
    let out = tracer.stop();
    assert_eq!(out.status.code(), Some(130), "{}", out.stderr);
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("was still running"))
        .unwrap_or_else(|| panic!("{}", out.stderr));
    // "stopped while /usr/bin/sleep 30 (pid N) was still running": the
    // test ends it, as the user would.
    let pid: i32 = line
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(line.contains("sleep 30"), "{line}");
    // SAFETY: signalling the command the test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

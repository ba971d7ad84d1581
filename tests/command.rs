//! `tcptrace -- COMMAND`: trace while a command (a restart) runs, then say
//! what happened and pass its exit status on.

use std::process::Command;
use std::time::Instant;

use tcptrace_tests::{Netns, Tracer, life, peer_bin, tcptrace, tcptrace_bin, unique_port};

fn traced(args: &[&str], command: &[&str]) -> Command {
    let mut cmd = Command::new(tcptrace_bin());
    cmd.args(args).arg("--").args(command);
    cmd
}

#[test]
fn a_command_is_traced_until_it_ends_and_its_exit_status_passes_on() {
    let ns = Netns::new();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let server = ns.peer(&["server", &addr, "--mode", "wait-peer-close"]);
    let client = format!(
        "{} client {addr} --mode close; exit 3",
        peer_bin().display()
    );
    let tracer = Tracer::start_cmd(traced(
        &[
            "--format",
            "json",
            "--no-snapshot",
            "--port",
            &port.to_string(),
            "--linger",
            "1s",
        ],
        &["ip", "netns", "exec", &ns.name, "sh", "-c", &client],
    ));
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
    let c = life(
        &lives,
        "CLOSE>SYN_SENT>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE",
    );
    let s = life(
        &lives,
        "LISTEN>SYN_RECV>ESTABLISHED>CLOSE_WAIT>LAST_ACK>CLOSE",
    );
    assert!(c.rows.iter().all(|r| r["comm"] == "tt-client"), "{c:?}");
    assert!(
        s.rows
            .iter()
            .filter(|r| r["queued"].is_null())
            .all(|r| r["pid"] == server_pid),
        "{s:?}"
    );
}

#[test]
fn the_command_runs_as_the_sudo_caller_not_as_root() {
    let mut cmd = traced(
        &["--port", &unique_port().to_string(), "--linger", "0s"],
        &["sh", "-c", "echo \"as uid=$(id -u) gid=$(id -g)\" >&2"],
    );
    cmd.env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .env("SUDO_USER", "nobody");
    let out = Tracer::start_cmd(cmd).wait();
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.lines().any(|l| l == "as uid=65534 gid=65534"),
        "{}",
        out.stderr
    );
    // Without sudo, root runs it as root.
    let out = Tracer::start_cmd(traced(
        &["--port", &unique_port().to_string(), "--linger", "0s"],
        &["sh", "-c", "echo \"as uid=$(id -u)\" >&2"],
    ))
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
    let tracer = Tracer::start_cmd(traced(
        &["--port", &unique_port().to_string()],
        &["sleep", "30"],
    ));
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

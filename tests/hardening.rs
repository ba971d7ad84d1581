//! Reliability and least privilege: what tcptrace does under signals, a
//! closed pipe, kill -9, a second tracer, minimal capabilities, and hostile
//! process names.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tcptrace_tests::{
    CLIENT_CLOSES, ClientMode, LISTENER, Netns, SERVER_PASSIVE, ServerMode, TempDir, Tracer,
    as_nobody, is_stats_line, life, loaded_bpf_programs, prog_exists, tcptrace, tcptrace_bin,
    unique_port,
};

/// The kernel keeps the first 15 bytes of a program's name.
const PROGRAM: &str = "inet_sock_set_s";

fn ours() -> usize {
    loaded_bpf_programs()
        .iter()
        .filter(|n| *n == PROGRAM)
        .count()
}

/// Before 5.19 a kernel with unprivileged BPF disabled (Debian's 5.10)
/// refuses every bpf() call to a process without CAP_BPF, those on the
/// maps and links it holds included.
fn bpf_needs_cap_bpf_after_attach() -> bool {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .is_ok_and(|v| v.trim() != "0");
    disabled && !kernel_at_least(5, 19)
}

/// Once attached, tcptrace holds no capability: who holds a socket comes
/// from its own iterator over the processes' descriptors, not from
/// /proc/PID/fd (CAP_SYS_PTRACE). Only where the kernel refuses bpf()
/// calls without CAP_BPF does CAP_BPF stay, to read its counters and walk
/// its iterator.
#[test]
fn every_capability_is_dropped_once_tracing() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder().port(port).stuck("1s").start();
    let status = std::fs::read_to_string(format!("/proc/{}/status", tracer.pid())).unwrap();
    let kept = if bpf_needs_cap_bpf_after_attach() {
        "0000008000000000" // CAP_BPF, bit 39
    } else {
        "0000000000000000"
    };
    for (set, want) in [
        ("CapEff", kept),
        ("CapPrm", kept),
        ("CapInh", "0000000000000000"),
        ("CapAmb", "0000000000000000"),
    ] {
        let line = status.lines().find(|l| l.starts_with(set)).unwrap();
        assert!(line.ends_with(want), "{line}");
    }
    // Without a capability it still tells who holds a socket where no
    // event can: a socket passed over a Unix socket between processes of
    // another user (nobody), whose descriptor tables /proc opens only to
    // CAP_SYS_PTRACE. The stuck warning names the receiver, as ss -p does.
    let addr = format!("127.0.0.1:{port}");
    let server = ns
        .server(&addr, ServerMode::PassFd)
        .as_nobody()
        .hold_ms(5000)
        .start();
    ns.client(&addr, ClientMode::Close).hold_ms(300).run();
    let receiver = ns
        .wait_for_socket(
            "the passed socket in CLOSE-WAIT",
            Duration::from_secs(10),
            |s| s.state == "CLOSE-WAIT" && s.on_port(port) && s.holders.len() == 1,
        )
        .holders;
    assert_ne!(receiver[0].pid, server.pid, "{receiver:?}");
    let named = format!(
        "stuck: pid {} ({}), 127.0.0.1:{port}",
        receiver[0].pid, receiver[0].comm
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !tracer.stderr_so_far().contains(&named) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = tracer.stop();
    server.finish();
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains(&named), "{named}: {}", out.stderr);
    assert!(
        out.stderr.contains("0 lost"),
        "counters still readable: {}",
        out.stderr
    );
}

/// The nice value in /proc/PID/stat (field 19; the name in field 2 may hold
/// spaces, so count from its closing parenthesis).
fn nice_of(pid: u32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(16).unwrap().parse().unwrap()
}

#[test]
fn the_reader_runs_ahead_of_the_workload_unless_told_not_to() {
    let port = unique_port();
    let boosted = Tracer::builder().port(port).start();
    assert_eq!(nice_of(boosted.pid()), -5);
    let chosen = Tracer::builder().port(port).args(&["--nice", "-2"]).start();
    assert_eq!(nice_of(chosen.pid()), -2);
    let kept = Tracer::builder().port(port).args(&["--nice", "0"]).start();
    assert_eq!(nice_of(kept.pid()), 0);
    for t in [boosted, chosen, kept] {
        let out = t.stop();
        assert!(out.status.success(), "{}", out.stderr);
        assert!(!out.stderr.contains("priority"), "{}", out.stderr);
    }
}

#[test]
fn cap_bpf_and_cap_perfmon_are_enough() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder()
        .only_caps(&["bpf", "perfmon"])
        .port(port)
        .json()
        .start();
    let server = ns
        .server(&format!("0.0.0.0:{port}"), ServerMode::ListenOnly)
        .start();
    let pid = server.pid;
    server.finish();
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
    life(&out.lives(), LISTENER).assert_owner(pid, "tt-server");
    // Without CAP_SYS_NICE the priority stays, and tcptrace says why; so
    // for the socket callback without CAP_NET_ADMIN.
    assert!(
        out.stderr
            .contains("cannot raise the priority to nice -5 (Permission denied")
            && out.stderr.contains("needs CAP_SYS_NICE"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("the socket callback is not attached (attaching it needs CAP_NET_ADMIN)"),
        "{}",
        out.stderr
    );
}

#[test]
fn cap_net_admin_adds_the_socket_callback() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder()
        .only_caps(&["bpf", "perfmon", "net_admin"])
        .port(port)
        .json()
        .start();
    const BPF_PROG_TYPE_SOCK_OPS: &str = "prog_type:\t13";
    let sock_ops_held = programs_held(&tracer, BPF_PROG_TYPE_SOCK_OPS);
    assert_eq!(sock_ops_held, 1, "one sock_ops program held");
    // By its name (the kernel keeps the first 15 bytes, all of this one).
    assert!(loaded_bpf_programs().iter().any(|n| n == "socket_callback"));
    ns.connections(&format!("127.0.0.1:{port}"), 1);
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
    assert!(!out.stderr.contains("socket callback"), "{}", out.stderr);
    // Its transitions and the tracepoint's make one orderly connection,
    // each change once.
    assert_eq!(out.rows().len(), 12, "{}", out.stdout);
    let lives = out.lives();
    life(&lives, CLIENT_CLOSES);
    life(&lives, SERVER_PASSIVE);
    life(&lives, LISTENER);
}

#[test]
fn a_closed_pipe_ends_the_run_quietly() {
    let ns = Netns::new();
    let port = unique_port();
    let mut child = Command::new(tcptrace_bin())
        .args(["--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut header = String::new();
    stdout.read_line(&mut header).unwrap();
    assert!(header.starts_with("TIME"), "{header}");
    drop(stdout); // like `| head -1`
    for _ in 0..3 {
        ns.server(&format!("0.0.0.0:{port}"), ServerMode::ListenOnly)
            .run();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "tcptrace kept running with nobody reading"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(!err.contains("error") && !err.contains("panicked"), "{err}");
}

#[test]
fn kill_9_leaves_no_program_attached() {
    // Other tests load the same program concurrently: wait for a moment
    // when the count is stable, then check ours comes and goes.
    let tracer = Tracer::builder().port(unique_port()).start();
    let pid = tracer.pid();
    let fdinfo: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .filter(|s| s.contains("prog_id:"))
        .collect();
    let prog_ids: Vec<u32> = fdinfo
        .iter()
        .map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    // The two tracepoint programs and the socket callback, at least.
    assert!(prog_ids.len() >= 3, "{prog_ids:?}");
    assert!(ours() >= 1);
    let out = tracer.signal(libc::SIGKILL);
    assert!(!out.status.success());
    // A program is freed once its last reference (our link) is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    for id in prog_ids {
        while prog_exists(id) {
            assert!(
                Instant::now() < deadline,
                "program {id} still loaded after kill -9"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn two_tracers_each_see_every_transition() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = || Tracer::builder().port(port).json().start();
    let (a, b) = (tracer(), tracer());
    let addr = format!("127.0.0.1:{port}");
    ns.connections(&addr, 1);
    let (a, b) = (a.stop(), b.stop());
    assert_eq!(a.rows().len(), 12);
    assert_eq!(b.rows().len(), 12);
}

#[test]
fn hostile_process_names_are_escaped() {
    let ns = Netns::new();
    let port = unique_port();
    let evil = "ev\x1b[2J\x07il\\";
    let text = Tracer::builder().port(port).start();
    let json = Tracer::builder().port(port).json().start();
    ns.server(&format!("0.0.0.0:{port}"), ServerMode::ListenOnly)
        .name(evil)
        .run();
    let (text, json) = (text.stop(), json.stop());
    assert!(
        !text.stdout.contains('\x1b') && !text.stdout.contains('\x07'),
        "{:?}",
        text.stdout
    );
    assert!(
        text.stdout.contains("ev\\x1b[2J\\x07il\\\\"),
        "{}",
        text.stdout
    );
    assert!(!json.stdout.contains('\x1b'));
    let rows = json.rows();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0].comm.as_deref(),
        Some(evil),
        "the JSON string is the name itself"
    );
}

#[test]
fn no_kernel_address_is_shown_unless_asked() {
    let ns = Netns::new();
    let port = unique_port();
    let plain = Tracer::builder().port(port).start();
    let json = Tracer::builder().port(port).json().start();
    let asked = Tracer::builder()
        .port(port)
        .json()
        .arg("--show-skaddr")
        .start();
    let addr = format!("127.0.0.1:{port}");
    ns.connections(&addr, 1);
    let looks_like_pointer = |s: &str| s.to_lowercase().contains("0xffff") || s.contains("ffff8");
    for out in [plain.stop(), json.stop()] {
        assert!(
            !looks_like_pointer(&out.stdout) && !looks_like_pointer(&out.stderr),
            "{}",
            out.stdout
        );
        assert!(!out.stdout.contains("skaddr"));
    }
    let asked = asked.stop();
    for r in asked.rows() {
        assert!(r.skaddr.as_deref().unwrap().starts_with("0xffff"), "{r}");
    }
}

#[test]
fn read_and_report_refuse_bad_files_with_status_2() {
    let dir = TempDir::new("badfiles");
    let secret = dir.path("secret.jsonl");
    std::fs::write(&secret, "{}\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["read", "/nonexistent/rec.jsonl"],
            "cannot open /nonexistent/rec.jsonl: No such file or directory",
        ),
        (&["report", "/nonexistent"], "No such file or directory"),
        (&["read", "/tmp"], "/tmp is a directory, not a recording"),
        (&["report", "/"], "is a directory"),
        (&["read"], "required arguments were not provided"),
        (&["-w", "/tmp"], "/tmp is a directory; give a file name"),
        (&["-w", ""], "the file name is empty"),
        (&["--rotate-size", "1M"], "--write"),
        (&["-w", "x", "--rotate-size", "lots"], "is not a size"),
        (&["-w", "x", "--rotate-size", "100"], "too small"),
        (
            &["-w", "x", "--rotate-size", "1M", "--rotate-keep", "0"],
            "keeping 0 files",
        ),
        (
            &["report", "/dev/null", "--follow", "[::1]:1"],
            "is not a connection",
        ),
    ];
    for (args, want) in cases {
        let out = tcptrace(args);
        let err = out.stderr;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    // Unreadable: a root-only file, read as nobody.
    let out = as_nobody(&dir, &["read", &secret]);
    let err = out.stderr;
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
}

#[test]
fn a_stalled_reader_loses_events_says_so_and_carries_on() {
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder()
        .port(port)
        .netns(&ns)
        .quiet()
        .no_timewait()
        .start();
    let churn = ns.churn(port, 5, &["--mode", "reset"]);
    // Stop the reader while the churn fills its 32 MiB ring.
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(4));
    // SAFETY: as above.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGCONT) };
    let expected = churn.expected();
    // Capture goes on after the overflow.
    ns.server(&format!("0.0.0.0:{port}"), ServerMode::ListenOnly)
        .run();
    std::thread::sleep(Duration::from_millis(500));
    let warned = tracer.stderr_so_far();
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        warned.contains("transitions lost: the ring buffer was full"),
        "{warned}"
    );
    let (shown, _, lost) = out.stats();
    assert!(lost > 0, "{}", out.stderr);
    assert!(shown > 0);
    // The churn's own count says how many there were: shown + lost covers it.
    let missed = out.missed();
    assert!(
        shown + lost + missed >= expected,
        "shown {shown} + lost {lost} + missed {missed} < expected {expected}"
    );
}

#[test]
fn a_failing_stdout_is_an_error_not_a_closed_pipe() {
    // /dev/full: every write fails with ENOSPC, unlike a reader going away.
    let out = Command::new(tcptrace_bin())
        .args(["--port", &unique_port().to_string(), "--duration", "1"])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot write to stdout: No space left on device"),
        "{err}"
    );
    assert!(
        err.lines().any(is_stats_line),
        "the stats line still comes: {err}"
    );
}

#[test]
fn a_recording_keeps_kernel_addresses_only_when_asked_and_read_shows_them() {
    let ns = Netns::new();
    let port = unique_port();
    let dir = TempDir::new("skaddr");
    let (asked_bin, asked_json, plain) = (
        dir.path("asked.tcpt"),
        dir.path("asked.jsonl"),
        dir.path("plain.tcpt"),
    );
    let asking = |file: &str| {
        Tracer::builder()
            .port(port)
            .json()
            .arg("--show-skaddr")
            .write(file)
            .start()
    };
    let live = asking(&asked_bin);
    let live_json = asking(&asked_json);
    let quiet = Tracer::builder().port(port).quiet().write(&plain).start();
    ns.connections(&format!("127.0.0.1:{port}"), 1);
    ns.settle("fin-wait-1");
    let live = live.stop();
    let live_json = live_json.stop();
    quiet.stop();
    let rows = live.rows();
    assert_eq!(rows.len(), 12, "{}", live.stdout);
    for r in &rows {
        let a = r.skaddr.as_deref().expect("an address on every traced row");
        assert!(a.starts_with("0xffff"), "{r}");
    }
    // Read back with --show-skaddr, both formats print the live rows.
    for (file, shown) in [(&asked_bin, &live), (&asked_json, &live_json)] {
        let read = tcptrace(&["read", "--format", "json", "--show-skaddr", file]);
        assert!(read.status.success(), "{}", read.stderr);
        assert_eq!(read.stdout, shown.stdout, "{file}");
        // Without it, no address, as live.
        let hidden = tcptrace(&["read", "--format", "json", file]);
        assert!(!hidden.stdout.contains("skaddr"), "{}", hidden.stdout);
    }
    // Recorded without it: nothing to show, said as such, never 0x0.
    let read = tcptrace(&["read", "--show-skaddr", "--no-header", &plain]);
    assert!(read.status.success(), "{}", read.stderr);
    assert!(!read.stdout.contains("0x"), "{}", read.stdout);
    assert!(
        read.stdout.lines().all(|l| l.contains("  -")),
        "{}",
        read.stdout
    );
}

#[test]
fn no_owner_hooks_attaches_no_syscall_or_process_hook_and_still_traces() {
    let ns = Netns::new();
    let port = unique_port();
    let programs_of = |t: &Tracer| programs_held(t, "prog_type:");
    let hooked = Tracer::builder().port(port).json().start();
    let light = Tracer::builder()
        .port(port)
        .json()
        .arg("--no-owner-hooks")
        .start();
    // accept, close, fork and exit: on system-call tracepoints one program
    // each (accept's on two syscalls); on fentry close takes a second one
    // from 6.6, where close() stopped calling filp_close.
    let hooks = if owners_line(&hooked).contains("fentry") && kernel_at_least(6, 6) {
        5
    } else {
        4
    };
    assert_eq!(programs_of(&hooked), programs_of(&light) + hooks);
    let addr = format!("127.0.0.1:{port}");
    let server = ns.server(&addr, ServerMode::WaitPeerClose).start();
    let server_pid = server.pid;
    ns.client(&addr, ClientMode::Close).run();
    server.finish();
    hooked.stop();
    let out = light.stop();
    assert!(out.status.success(), "{}", out.stderr);
    let lives = out.lives();
    let child = life(&lives, SERVER_PASSIVE);
    // A single-process server: its rows name it all the same, and none
    // claims to know the socket waited in the listener's queue.
    for r in &child.rows {
        assert_eq!(r.pid, Some(server_pid), "{r}");
        assert!(r.queued.is_none(), "{r}");
    }
}

/// Whether the running kernel is `major.minor` or newer.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (major, minor)
}

const OWNERS_BY_SYSCALLS: &str = "tcptrace: owners: system-call tracepoints: every system call \
     on this host pays ~80 ns while tracing";

/// The `tcptrace: owners:` line, which must come before `tracing`.
fn owners_line(t: &Tracer) -> String {
    let said = t.stderr_so_far();
    let lines: Vec<&str> = said.lines().collect();
    let at = |prefix: &str| lines.iter().position(|l| l.starts_with(prefix));
    let owners = at("tcptrace: owners: ").unwrap_or_else(|| panic!("no owners line: {said}"));
    let tracing = at("tcptrace: tracing ").unwrap_or_else(|| panic!("no tracing line: {said}"));
    assert!(owners < tracing, "{said}");
    lines[owners].to_string()
}

/// The forced fallback takes the system-call tracepoints (classic
/// tracepoint programs, type 5: only the accept and close hooks are); by
/// default the line names the path the programs held show. The kernel
/// matrix says which it expects (TCPTRACE_TEST_OWNERS, "fentry" or
/// "syscalls"); a kernel that refuses fentry/fexit, as this machine's
/// lockdown build does, falls back.
#[test]
fn the_owners_line_names_the_hooks_attached_and_the_flag_forces_system_calls() {
    let port = unique_port();
    let tracepoints = |t: &Tracer| programs_held(t, "prog_type:\t5");
    let forced = Tracer::builder()
        .port(port)
        .args(&["--owner-hooks", "syscalls"])
        .start();
    assert_eq!(owners_line(&forced), OWNERS_BY_SYSCALLS);
    assert_eq!(tracepoints(&forced), 2, "accept and close");
    let default = Tracer::builder().port(port).start();
    let line = owners_line(&default);
    match std::env::var("TCPTRACE_TEST_OWNERS").as_deref() {
        Ok("fentry") => assert_eq!(line, "tcptrace: owners: fentry"),
        Ok("syscalls") => assert_eq!(line, OWNERS_BY_SYSCALLS),
        _ => {}
    }
    if line == "tcptrace: owners: fentry" {
        assert_eq!(tracepoints(&default), 0, "no system-call tracepoint");
    } else {
        assert_eq!(line, OWNERS_BY_SYSCALLS);
        assert_eq!(tracepoints(&default), 2, "accept and close");
    }
    for t in [forced, default] {
        let out = t.stop();
        assert!(out.status.success(), "{}", out.stderr);
    }
}

/// BPF programs the tracer holds whose fdinfo has a line that is `line`
/// (`prog_type:\t13`: sock_ops) or, ending in `:`, starts with it.
fn programs_held(t: &Tracer, line: &str) -> usize {
    std::fs::read_dir(format!("/proc/{}/fdinfo", t.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .filter(|s| {
            s.lines()
                .any(|l| l == line || (line.ends_with(':') && l.starts_with(line)))
        })
        .count()
}

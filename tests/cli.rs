//! The command line's failures: bad arguments and missing privileges each get
//! one sentence naming the problem, and the right exit status.

use tcptrace_tests::{TempDir, as_nobody, tcptrace};

/// Exit code (-1 for a signal), stdout, stderr.
fn run(args: &[&str]) -> (i32, String, String) {
    let out = tcptrace(args);
    (out.status.code().unwrap_or(-1), out.stdout, out.stderr)
}

#[test]
fn bad_arguments_exit_2_with_one_sentence() {
    let cases: &[(&[&str], &str)] = &[
        (&["--port", "0"], "port 0 is not a port"),
        (&["--port", "65536"], "port 65536 is out of range"),
        (&["-p", "abc"], "\"abc\" is not a port number"),
        (&["--port", "80,,81"], "is not a port number"),
        (&["--lport", "-1"], "unexpected argument"),
        (&["--rport", "99999"], "out of range"),
        (&["-4", "-6"], "cannot be used with"),
        (&["--follow", "127.0.0.1:80"], "is not a connection"),
        (
            &["--follow", "127.0.0.1:80,127.0.0.1"],
            "is not an ADDR:PORT endpoint",
        ),
        (
            &["--follow", "::1:80,::1:81"],
            "IPv6 address without brackets",
        ),
        (
            &["--follow", "[::1]:80,127.0.0.1:81"],
            "different address families",
        ),
        (&["--follow", "127.0.0.1:0,127.0.0.1:81"], "has port 0"),
        (&["--follow", "a,b,c"], "is not a connection"),
        (&["--pid", "0"], "pid 0 is not a process"),
        (&["--pid", "12x"], "is not a process id"),
        (&["--comm", ""], "the process name is empty"),
        (&["--duration", "forever"], "is not a duration"),
        (&["--duration", "0"], "a duration of 0"),
        (
            &["--stuck", "0"],
            "a threshold of 0 would call every socket stuck",
        ),
        (&["--stuck", "soon"], "\"soon\" is not a duration"),
        (&["--linger", "1s"], "required arguments were not provided"),
        (&["--state", "TIME-WAITING"], "is not a TCP state"),
        (&["--laddr", "10.0.0.0/33"], "is not a prefix length"),
        (
            &["--raddr", "example.com"],
            "is not an IPv4 or IPv6 address",
        ),
        (&["--", "tcptrace-no-such-command"], "not found in PATH"),
        (&["--nice", "-21"], "nice value -21 is out of range"),
        (&["--nice", "fast"], "\"fast\" is not a nice value"),
        (&["--count", "0"], "a count of 0"),
        (&["--count", "-3"], "unexpected argument"),
        (&["--format", "xml"], "invalid value 'xml'"),
        (&["--time", "yesterday"], "invalid value 'yesterday'"),
        (&["--no-such-flag"], "unexpected argument '--no-such-flag'"),
        (&["--netns", "0"], "0 is not a namespace inode"),
        (
            &["--netns", "/no/such/ns"],
            "neither a namespace inode number nor a readable path",
        ),
        (&["--netns-of", "999999999"], "larger than any Linux pid"),
        (&["--netns-of", "4194303"], "no process 4194303"),
    ];
    let me = std::process::id().to_string();
    let both: &[&str] = &["--netns", "1", "--netns-of", &me];
    let cases = [cases, &[(both, "cannot be used with")]].concat();
    for (args, want) in &cases {
        let (code, stdout, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: one line, got {stderr:?}"
        );
        assert!(stderr.starts_with("tcptrace: "), "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: want {want:?} in {stderr:?}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn help_lists_every_flag_and_exits_0() {
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--port",
        "--lport",
        "--rport",
        "--ipv4",
        "--ipv6",
        "--pid",
        "--comm",
        "--follow",
        "--format",
        "--time",
        "--show-skaddr",
        "--no-header",
        "--duration",
        "--count",
        "--debug",
        "--netns",
        "--netns-of",
        "--wide",
        "--write",
        "--quiet",
        "--rotate-size",
        "--rotate-keep",
        "--force",
        "Examples:",
    ] {
        assert!(stdout.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn unprivileged_user_is_told_which_capabilities_are_missing() {
    let dir = TempDir::new("unpriv");
    let out = as_nobody(&dir, &["--port", "6389"]);
    let stderr = out.stderr;
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("needs the CAP_BPF and CAP_PERFMON capabilities"),
        "{stderr}"
    );
    assert!(stderr.contains("missing: CAP_BPF, CAP_PERFMON"), "{stderr}");
    assert!(stderr.contains("run tcptrace as root"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn man_page_and_completions_name_every_flag() {
    let (_, help, _) = run(&["--help"]);
    let mut flags: Vec<&str> = help
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .collect();
    flags.sort_unstable();
    flags.dedup();
    assert!(flags.len() >= 25, "{flags:?}");
    for what in ["man", "bash", "zsh", "fish"] {
        let (code, out, err) = run(&["generate", what]);
        assert_eq!(code, 0, "{what}: {err}");
        assert!(out.len() > 1000, "{what} is {} bytes", out.len());
        // roff escapes dashes.
        let text = out.replace("\\-", "-");
        for flag in &flags {
            let bare = flag.trim_start_matches("--");
            assert!(text.contains(bare), "{what} lacks {flag}");
        }
    }
    let (_, man, _) = run(&["generate", "man"]);
    assert!(man.contains(".TH tcptrace 1"), "a section 1 man page");
}

#[test]
fn read_and_report_have_man_pages_of_their_own_naming_their_flags() {
    for (sub, page) in [("read", "man-read"), ("report", "man-report")] {
        let (_, help, _) = run(&[sub, "--help"]);
        let (code, man, err) = run(&["generate", page]);
        assert_eq!(code, 0, "{page}: {err}");
        assert!(man.contains(&format!(".TH tcptrace-{sub} 1")), "{man}");
        let text = man.replace("\\-", "-");
        let flags: Vec<&str> = help
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
            .collect();
        assert!(flags.len() >= 5, "{sub}: {flags:?}");
        for flag in flags {
            assert!(text.contains(flag), "tcptrace-{sub}(1) lacks {flag}");
        }
    }
}

/// The flags a `--help` text defines: its option lines (`-p, --port <PORT>`,
/// `      --lport <PORT>`), not flags its prose or examples mention.
fn defined_flags(help: &str) -> Vec<String> {
    let mut flags: Vec<String> = help
        .lines()
        .filter(|l| l.starts_with("  ") && l.trim_start().starts_with('-'))
        .flat_map(|l| {
            l.split_whitespace()
                // A lone "-" starts a possible value's line, not a flag.
                .take_while(|w| w.starts_with('-') && w.len() > 1)
                .map(|w| w.trim_end_matches(',').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    flags.sort_unstable();
    flags.dedup();
    flags
}

/// The flags one section of docs/flags.md lists: the first column of its
/// table rows (`| \`-p, --port PORT\` | ...`), every backquoted piece.
fn documented_flags(section: &str) -> Vec<String> {
    let mut flags: Vec<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .flat_map(|l| {
            let cell = l.split(" | ").next().unwrap_or_default();
            cell.split('`')
                .step_by(2)
                .flat_map(|piece| {
                    piece
                        .split([',', ' '])
                        .filter(|w| w.starts_with('-'))
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    flags.sort_unstable();
    flags.dedup();
    flags
}

#[test]
fn flags_page_lists_exactly_the_flags_of_each_help() {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/flags.md"))
        .expect("docs/flags.md");
    let sections: Vec<(&str, &str)> = page
        .split("\n## ")
        .skip(1)
        .map(|s| s.split_once('\n').unwrap_or((s, "")))
        .collect();
    let names: Vec<&str> = sections.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        ["tcptrace", "tcptrace read", "tcptrace report"],
        "one section per command"
    );
    for (name, section) in sections {
        let args: Vec<&str> = name.split(' ').skip(1).chain(["--help"]).collect();
        let (code, help, err) = run(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        let defined = defined_flags(&help);
        assert!(defined.len() >= 7, "{name}: {defined:?}");
        let documented = documented_flags(section);
        let missing: Vec<_> = defined.iter().filter(|f| !documented.contains(f)).collect();
        let unknown: Vec<_> = documented.iter().filter(|f| !defined.contains(f)).collect();
        assert!(
            missing.is_empty(),
            "docs/flags.md, {name}: not in the table: {missing:?}"
        );
        assert!(
            unknown.is_empty(),
            "docs/flags.md, {name}: not in --help: {unknown:?}"
        );
    }
}

//! Replay: read recordings back into the rows the live run produced.
//!
//! Streaming: one line at a time, whatever the file's size. The files of a
//! rotation are put in order by their headers and read as one stream.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use crate::attribute::{Close, Origin, Row};
use crate::cli::io_reason;
use crate::decode::{Comm, Family, Task, Transition};
use crate::format::JsonRow;
use crate::record::{Header, Stats};
use crate::state::State;

/// One line of a recording.
pub enum Item {
    Header(Header),
    Row(Row),
    Stats(Stats),
}

/// A recording that cannot be read: bad input, exit status 2.
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reads every file in time order and hands each item to `sink`; an error
/// from `sink` (say, a closed stdout) stops the reading and is returned.
pub fn read<E>(
    files: &[PathBuf],
    lenient: bool,
    progress: Option<&ProgressBar>,
    mut sink: impl FnMut(Item) -> Result<(), E>,
) -> Result<Result<(), E>, BadInput> {
    for (name, reader) in ordered(files)? {
        if let Err(e) = read_one(&name, reader, lenient, progress, &mut sink)? {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

type Source = (String, Box<dyn BufRead>);

fn open(path: &Path) -> Result<Source, BadInput> {
    if path == Path::new("-") {
        return Ok((
            "<stdin>".into(),
            Box::new(BufReader::with_capacity(1 << 16, io::stdin())),
        ));
    }
    let name = path.display().to_string();
    let file =
        File::open(path).map_err(|e| BadInput(format!("cannot open {name}: {}", io_reason(&e))))?;
    Ok((name, Box::new(BufReader::with_capacity(1 << 16, file))))
}

/// Opens the files, ordered by their headers (run start, then rotation part),
/// so that a rotation set given in any order reads as one stream.
fn ordered(files: &[PathBuf]) -> Result<Vec<Source>, BadInput> {
    let mut keyed = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let (name, mut reader) = open(path)?;
        let key = {
            let head = reader
                .fill_buf()
                .map_err(|e| BadInput(format!("cannot read {name}: {}", io_reason(&e))))?;
            let first = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
            serde_json::from_slice::<Header>(first)
                .map(|h| (h.clock().wall_ns(h.start_ns), h.part))
                .unwrap_or((i64::MAX, i as u32))
        };
        keyed.push((key, i, (name, reader)));
    }
    keyed.sort_by_key(|(key, i, _)| (*key, *i));
    Ok(keyed.into_iter().map(|(_, _, s)| s).collect())
}

fn read_one<E>(
    name: &str,
    mut reader: Box<dyn BufRead>,
    lenient: bool,
    progress: Option<&ProgressBar>,
    sink: &mut impl FnMut(Item) -> Result<(), E>,
) -> Result<Result<(), E>, BadInput> {
    let mut line = Vec::with_capacity(512);
    let mut number = 0u64;
    // Progress moves in steps, not per line: it is read a million times a
    // second.
    let mut unreported = 0u64;
    loop {
        if unreported >= 1 << 16
            && let Some(p) = progress
        {
            p.inc(unreported);
            unreported = 0;
        }
        line.clear();
        let n = reader
            .by_ref()
            .take(1 << 20)
            .read_until(b'\n', &mut line)
            .map_err(|e| BadInput(format!("cannot read {name}: {}", io_reason(&e))))?;
        if n == 0 {
            if let Some(p) = progress {
                p.inc(unreported);
            }
            return Ok(Ok(()));
        }
        unreported += n as u64;
        number += 1;
        let complete = line.last() == Some(&b'\n');
        let text = trim_newline(&line);
        if text.is_empty() {
            continue;
        }
        match parse_line(text) {
            Ok(item) => {
                if let Err(e) = sink(item) {
                    return Ok(Err(e));
                }
            }
            Err(_) if !complete && at_eof(&mut reader) => {
                eprintln!(
                    "tcptrace: warning: {name}:{number}: the last line is cut off \
                     (the recording was interrupted); ignored"
                );
                return Ok(Ok(()));
            }
            Err(e) if lenient => {
                eprintln!(
                    "tcptrace: warning: {name}:{number}: skipped, not a tcptrace record: {e}"
                );
            }
            Err(e) => {
                return Err(BadInput(format!(
                    "{name}:{number}: not a tcptrace record: {e} (--lenient skips such lines)"
                )));
            }
        }
    }
}

fn at_eof(reader: &mut Box<dyn BufRead>) -> bool {
    reader.fill_buf().map(|b| b.is_empty()).unwrap_or(true)
}

fn trim_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Header and stats objects start with their "type"; rows have none.
pub fn parse_line(text: &[u8]) -> Result<Item, String> {
    if text.starts_with(b"{\"type\":\"header\"") {
        return serde_json::from_slice(text)
            .map(Item::Header)
            .map_err(|e| e.to_string());
    }
    if text.starts_with(b"{\"type\":\"stats\"") {
        return serde_json::from_slice(text)
            .map(Item::Stats)
            .map_err(|e| e.to_string());
    }
    let j: JsonRow = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    Ok(Item::Row(row_of(&j)?))
}

fn row_of(j: &JsonRow) -> Result<Row, String> {
    let family = match &*j.family {
        "ipv4" => Family::V4,
        "ipv6" => Family::V6,
        other => return Err(format!("unknown family {other:?}")),
    };
    let owner = match (j.pid, &j.comm) {
        (Some(pid), Some(comm)) => Some(Task {
            pid,
            comm: Comm::from_bytes(comm.as_bytes()),
        }),
        (None, None) => None,
        _ => return Err("pid and comm must both be set or both be null".into()),
    };
    let dwell_ns = match j.ms {
        // Up to about 30 years: enough for any socket, far from overflow.
        Some(ms) if (0.0..1e12).contains(&ms) => Some((ms * 1000.0).round() as u64 * 1000),
        Some(ms) => return Err(format!("ms {ms} is not a duration")),
        None => None,
    };
    Ok(Row {
        t: Transition {
            ts_ns: j.ts_ns,
            skaddr: j.skaddr.map_or(0, |h| h.0),
            task: owner.unwrap_or_default(),
            old: j.old.unwrap_or(State(0)),
            new: j.new,
            family,
            local: SocketAddr::new(j.laddr, j.lport),
            remote: SocketAddr::new(j.raddr, j.rport),
            netns: j.netns.unwrap_or(0),
        },
        sock: j.sock,
        owner,
        dwell_ns,
        origin: Origin::from_name(&j.origin)
            .ok_or_else(|| format!("unknown origin {:?}", j.origin))?,
        close: match &j.close {
            Some(name) => Some(
                Close::from_name(name, j.reset_reason.as_deref())
                    .ok_or_else(|| format!("unknown close {name:?}"))?,
            ),
            None => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROW: &str = r#"{"time":"2026-11-22T11:49:56.334132Z","ts_ns":724086982599,"sock":3,"pid":15682,"comm":"redis-server","family":"ipv4","laddr":"127.0.0.1","lport":6389,"raddr":"127.0.0.1","rport":43104,"old":"ESTABLISHED","new":"CLOSE_WAIT","ms":80.205}"#;

    #[test]
    fn a_row_reads_back_with_its_owner_and_dwell() {
        let Ok(Item::Row(r)) = parse_line(ROW.as_bytes()) else {
            panic!("row expected");
        };
        assert_eq!(r.sock, 3);
        assert_eq!(r.owner.unwrap().pid, 15682);
        assert_eq!(r.owner.unwrap().comm.as_str(), "redis-server");
        assert_eq!(r.dwell_ns, Some(80_205_000));
        assert_eq!(r.t.local, "127.0.0.1:6389".parse().unwrap());
        assert_eq!(r.t.new, crate::state::State::CLOSE_WAIT);
    }

    /// Inputs kept from fuzzing (`cargo xtask fuzz`) and hand-made hostile
    /// ones: each line parses or is refused, and the report over them
    /// renders, without a panic.
    #[test]
    fn fuzz_regressions_parse_or_fail_cleanly() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/regressions/recording");
        let mut files = 0;
        for entry in std::fs::read_dir(dir).expect("regressions are kept") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let mut analysis = crate::analyse::Analysis::new();
            for line in data.split(|&b| b == b'\n') {
                if let Ok(item) = parse_line(line) {
                    analysis.add(item);
                }
            }
            assert!(!analysis.report(3).text().is_empty());
            files += 1;
        }
        assert!(files >= 5, "{files} regression inputs");
        // Out-of-range state numbers are refused, not wrapped.
        let bad = std::fs::read(format!("{dir}/state-out-of-range")).unwrap();
        assert!(parse_line(bad.trim_ascii_end()).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            "{",
            "[]",
            "null",
            "{\"ts_ns\":-1}",
            &ROW.replace("ipv4", "ipx"),
            &ROW.replace("80.205", "-1"),
        ] {
            assert!(parse_line(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}

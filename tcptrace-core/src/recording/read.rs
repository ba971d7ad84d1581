//! Replay: read recordings back into the rows the live run produced.
//!
//! Streaming: one line or chunk at a time, whatever the file's size. Each
//! file's first bytes say its format (binary or JSON Lines). The files of a
//! rotation are put in order by their headers and read as one stream.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use crate::model::{
    Close, Comm, Family, Header, Item, Origin, Row, State, Task, Timing, Transition,
};
use crate::output::json::Key;
use crate::recording::binary::{self, CHUNK_HEAD, Decoder, PREAMBLE};
use crate::recording::json::{Hex, JsonRow};
use crate::words::io_reason;

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
        if let Err(e) = read_source(&name, reader, lenient, progress, &mut sink)? {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

/// Reads one recording (a file's contents, in either format) from `reader`,
/// `name` naming it in messages.
pub fn read_reader<E>(
    name: &str,
    reader: impl BufRead,
    lenient: bool,
    mut sink: impl FnMut(Item) -> Result<(), E>,
) -> Result<Result<(), E>, BadInput> {
    read_source(name, reader, lenient, None, &mut sink)
}

/// Reads one file in the format its first bytes say.
fn read_source<E>(
    name: &str,
    mut reader: impl BufRead,
    lenient: bool,
    progress: Option<&ProgressBar>,
    sink: &mut impl FnMut(Item) -> Result<(), E>,
) -> Result<Result<(), E>, BadInput> {
    let first = reader
        .fill_buf()
        .map_err(|e| BadInput(format!("cannot read {name}: {}", io_reason(&e))))?;
    // JSON starts with text; the magic with a byte text never starts with.
    if first.first() == Some(&binary::MAGIC[0]) {
        read_binary(name, reader, lenient, progress, sink)
    } else {
        read_one(name, reader, lenient, progress, sink)
    }
}

/// Reads from `reader` until `buf` is full or the input ends: how much was
/// read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn cut_off(name: &str, at: u64, bytes: usize) {
    eprintln!(
        "tcptrace: warning: {name}: the recording is cut off at byte {at} (it was interrupted \
         while writing); the last {bytes} bytes are an incomplete chunk, ignored"
    );
}

/// Reads a binary recording chunk by chunk (docs/recording-format.md).
/// A chunk the input ends inside is a cut-off end: a warning. A chunk that
/// does not add up is damage: an error naming the byte, or with `lenient`
/// a warning and the next chunk.
fn read_binary<E>(
    name: &str,
    mut reader: impl BufRead,
    lenient: bool,
    progress: Option<&ProgressBar>,
    sink: &mut impl FnMut(Item) -> Result<(), E>,
) -> Result<Result<(), E>, BadInput> {
    let io_err = |e: io::Error| BadInput(format!("cannot read {name}: {}", io_reason(&e)));
    let mut pre = [0u8; PREAMBLE];
    let n = read_full(&mut reader, &mut pre).map_err(io_err)?;
    if n < PREAMBLE && binary::MAGIC.starts_with(&pre[..n.min(binary::MAGIC.len())]) {
        cut_off(name, 0, n);
        return Ok(Ok(()));
    }
    if !binary::is_binary(&pre) {
        return Err(BadInput(format!(
            "{name}: not a tcptrace recording (it starts with neither the binary format's \
             magic nor a JSON object)"
        )));
    }
    let version = u16::from_le_bytes([pre[8], pre[9]]);
    if version != binary::VERSION {
        return Err(BadInput(format!(
            "{name}: binary recording format version {version}; this tcptrace reads version {} \
             (a newer tcptrace wrote it?)",
            binary::VERSION
        )));
    }
    let mut at = PREAMBLE as u64;
    let mut decoder = Decoder::default();
    let mut payload = Vec::new();
    let damaged = |what: String| -> Result<(), BadInput> {
        if lenient {
            eprintln!("tcptrace: warning: {name}: {what}; skipped");
            Ok(())
        } else {
            Err(BadInput(format!(
                "{name}: {what} (the recording is damaged; --lenient skips damaged chunks)"
            )))
        }
    };
    loop {
        let mut head = [0u8; CHUNK_HEAD];
        let n = read_full(&mut reader, &mut head).map_err(io_err)?;
        if n == 0 {
            return Ok(Ok(()));
        }
        if n < CHUNK_HEAD {
            cut_off(name, at, n);
            return Ok(Ok(()));
        }
        let (len, crc) = match binary::parse_head(&head) {
            Ok(h) => h,
            Err(what) => {
                // Nothing says where the next chunk starts.
                damaged(format!("byte {at}: {what}"))?;
                return Ok(Ok(()));
            }
        };
        payload.resize(len, 0);
        let n = read_full(&mut reader, &mut payload).map_err(io_err)?;
        if n < len {
            cut_off(name, at, CHUNK_HEAD + n);
            return Ok(Ok(()));
        }
        let end = at + (CHUNK_HEAD + len) as u64;
        if crc32fast::hash(&payload) != crc {
            damaged(format!(
                "byte {at}: the chunk of bytes {at}..{end} does not match its checksum"
            ))?;
        } else {
            match decoder.chunk(&payload, sink) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Ok(Err(e)),
                Err(bad) => damaged(format!(
                    "byte {}: {} (in the chunk of bytes {at}..{end})",
                    at + (CHUNK_HEAD + bad.at) as u64,
                    bad.what
                ))?,
            }
        }
        if let Some(p) = progress {
            p.inc(end - at);
        }
        at = end;
    }
}

/// Like `tail -F`: reads the file at `path` from its start and keeps
/// reading what is appended; when a new file takes the name (a rotation, or
/// the writer started again), finishes the old one and goes on with the
/// next. Files a fast rotation renamed before they were reached (FILE.2,
/// FILE.1, ...) are read in turn, not skipped. Never returns, unless reading
/// fails or `sink` does. `idle` runs before each wait (to flush the output).
pub fn tail<E>(
    path: &Path,
    lenient: bool,
    idle: &mut dyn FnMut(),
    mut sink: impl FnMut(Item) -> Result<(), E>,
) -> Result<Result<(), E>, BadInput> {
    use std::os::unix::fs::MetadataExt;
    let name = path.display().to_string();
    let mut done: Option<u64> = None;
    loop {
        let (file, shown) = loop {
            let next = successor(path, done);
            match File::open(&next) {
                // A rotation between finding the name and opening it: look
                // again.
                Ok(_) if successor(path, done) != next => continue,
                Ok(f) => break (f, next.display().to_string()),
                // Between a rotation's rename and its new file.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    idle();
                    std::thread::sleep(TAIL_POLL);
                }
                Err(e) => return Err(BadInput(format!("cannot open {name}: {}", io_reason(&e)))),
            }
        };
        let ino = file
            .metadata()
            .map_err(|e| BadInput(format!("cannot read {shown}: {}", io_reason(&e))))?
            .ino();
        let follower = Follower {
            file,
            path,
            ino,
            pos: 0,
            ended: false,
            idle: &mut *idle,
        };
        let reader = BufReader::with_capacity(1 << 16, follower);
        if let Err(e) = read_source(&shown, reader, lenient, None, &mut sink)? {
            return Ok(Err(e));
        }
        done = Some(ino);
    }
}

/// The file that follows the one with inode `done` in a rotation: the one
/// numbered just below where it is now (FILE.3 -> FILE.2, FILE.1 -> FILE);
/// FILE when it is not found (deleted by --rotate-keep, or the first).
fn successor(path: &Path, done: Option<u64>) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    if let Some(done) = done {
        let mut n = 1;
        while let Ok(m) = std::fs::metadata(numbered(n)) {
            if m.ino() == done {
                return if n == 1 {
                    path.to_path_buf()
                } else {
                    numbered(n - 1)
                };
            }
            n += 1;
        }
    }
    path.to_path_buf()
}

/// How often `tail` looks for more.
const TAIL_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// A file that does not end until another file takes its name.
struct Follower<'a> {
    file: File,
    path: &'a Path,
    ino: u64,
    pos: u64,
    ended: bool,
    idle: &'a mut dyn FnMut(),
}

impl Read for Follower<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::MetadataExt;
        loop {
            let n = self.file.read(buf)?;
            if n > 0 || self.ended {
                self.pos += n as u64;
                return Ok(n);
            }
            // Replaced, or cut back (`--force`): one last read for what
            // was written before, then this file is done.
            if std::fs::metadata(self.path).is_ok_and(|m| m.ino() != self.ino || m.len() < self.pos)
            {
                self.ended = true;
                continue;
            }
            (self.idle)();
            std::thread::sleep(TAIL_POLL);
        }
    }
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
            let header = if binary::is_binary(head) {
                binary::peek_header(head)
            } else {
                let first = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
                serde_json::from_slice::<Header>(first).ok()
            };
            header
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
    mut reader: impl BufRead,
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

fn at_eof(reader: &mut impl BufRead) -> bool {
    reader.fill_buf().map(|b| b.is_empty()).unwrap_or(true)
}

fn trim_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Header, gap and stats objects start with their "type"; rows have none.
pub fn parse_line(text: &[u8]) -> Result<Item, String> {
    if text.starts_with(b"{\"type\":\"header\"") {
        return serde_json::from_slice(text)
            .map(|h| Item::Header(Box::new(h)))
            .map_err(|e| e.to_string());
    }
    if text.starts_with(b"{\"type\":\"gap\"") {
        return serde_json::from_slice(text)
            .map(Item::Gap)
            .map_err(|e| e.to_string());
    }
    if text.starts_with(b"{\"type\":\"holders\"") {
        return serde_json::from_slice(text)
            .map(Item::Holders)
            .map_err(|e| e.to_string());
    }
    if text.starts_with(b"{\"type\":\"stats\"") {
        return serde_json::from_slice(text)
            .map(Item::Stats)
            .map_err(|e| e.to_string());
    }
    // Rows as tcptrace writes them take the fast path; anything unusual
    // (escapes, nesting, duplicate keys) goes to serde, which also words
    // the errors.
    let j = match fast_row(text) {
        Some(j) => j,
        None => serde_json::from_slice(text).map_err(|e| e.to_string())?,
    };
    Ok(Item::Row(row_of(&j)?))
}

/// A flat JSON object of strings without escapes, numbers and nulls, as
/// tcptrace writes its rows, parsed without serde's generic machinery
/// (replay reads a million of them a second). `None`: not that simple, or
/// not a valid row; serde then decides.
fn fast_row(text: &[u8]) -> Option<JsonRow<'_>> {
    let mut i = 0;
    let ws = |i: &mut usize| {
        while text.get(*i).is_some_and(|b| b.is_ascii_whitespace()) {
            *i += 1;
        }
    };
    // A string's bytes. Keys are compared as bytes, without a UTF-8 check
    // each (reading a row took 14% longer with them); values are checked.
    let bytes = |i: &mut usize| -> Option<&[u8]> {
        // At the opening quote.
        let start = *i + 1;
        let len = text
            .get(start..)?
            .iter()
            .position(|&b| b == b'"' || b == b'\\')?;
        if text[start + len] != b'"' {
            return None;
        }
        *i = start + len + 1;
        Some(&text[start..start + len])
    };
    let string = |i: &mut usize| -> Option<&str> { std::str::from_utf8(bytes(i)?).ok() };
    ws(&mut i);
    if text.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut row = blank_row();
    // Which of the required fields were given, and no key twice.
    let mut seen = 0u32;
    loop {
        ws(&mut i);
        if text.get(i) != Some(&b'"') {
            return None;
        }
        let key = bytes(&mut i)?;
        ws(&mut i);
        if text.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        ws(&mut i);
        // The value: a string, null, true, or a number.
        let mut truth = false;
        let (text_value, number): (Option<&str>, Option<&str>) = match text.get(i)? {
            b'"' => (Some(string(&mut i)?), None),
            b'n' if text.get(i..i + 4) == Some(b"null") => {
                i += 4;
                (None, None)
            }
            b't' if text.get(i..i + 4) == Some(b"true") => {
                i += 4;
                truth = true;
                (None, None)
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while text
                    .get(i)
                    .is_some_and(|b| b.is_ascii_digit() || b"-+.eE".contains(b))
                {
                    i += 1;
                }
                (None, Some(std::str::from_utf8(&text[start..i]).ok()?))
            }
            _ => return None,
        };
        let field = Key::of(key)?;
        if truth && field != Key::Queued {
            return None;
        }
        let bit = 1u32 << field as u32;
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        store(&mut row, field, text_value, number, truth)?;
        ws(&mut i);
        match text.get(i)? {
            b',' => i += 1,
            b'}' => {
                i += 1;
                break;
            }
            _ => return None,
        }
    }
    ws(&mut i);
    (i == text.len() && seen & REQUIRED == REQUIRED).then_some(row)
}

/// A row before its keys are read: what a key the fast path leaves out
/// reads as (required keys are checked apart).
fn blank_row() -> JsonRow<'static> {
    JsonRow {
        ts_ns: 0,
        sock: 0,
        pid: None,
        comm: None,
        thread: None,
        cgroup: None,
        unit: None,
        container: None,
        queued: false,
        family: Cow::Borrowed(""),
        netns: None,
        laddr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        lport: 0,
        raddr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        rport: 0,
        old: None,
        new: State(0),
        ms: None,
        close: None,
        reset_reason: None,
        origin: Cow::Borrowed("tracepoint"),
        timing: None,
        skaddr: None,
    }
}

/// Stores a value the fast path read (a string, a number, `true`, or
/// neither: null) into `row` under `key`. `None`: a value of a type the key
/// does not take (serde's to report).
fn store<'a>(
    row: &mut JsonRow<'a>,
    key: Key,
    text_value: Option<&'a str>,
    number: Option<&str>,
    truth: bool,
) -> Option<()> {
    let num = |n: Option<&str>| n.and_then(|n| n.parse::<u64>().ok());
    match key {
        // Derived again when shown (the time from `ts_ns` and the
        // clock, a container's name from this host's runtimes): not
        // read back.
        Key::Time | Key::ContainerName => {}
        Key::TsNs => row.ts_ns = num(number)?,
        Key::Sock => row.sock = num(number)?,
        Key::Pid => row.pid = opt_num(number, text_value)?,
        Key::Comm => row.comm = opt_str(number, text_value)?.map(Cow::Borrowed),
        Key::Thread => row.thread = opt_str(number, text_value)?.map(Cow::Borrowed),
        Key::Cgroup => row.cgroup = opt_str(number, text_value)?.map(Cow::Borrowed),
        Key::Unit => row.unit = opt_str(number, text_value)?.map(Cow::Borrowed),
        Key::Container => row.container = opt_str(number, text_value)?.map(Cow::Borrowed),
        Key::Queued => row.queued = truth,
        Key::Family => row.family = Cow::Borrowed(text_value?),
        Key::Netns => row.netns = opt_num(number, text_value)?,
        Key::Laddr => row.laddr = text_value?.parse().ok()?,
        Key::Lport => row.lport = number?.parse().ok()?,
        Key::Raddr => row.raddr = text_value?.parse().ok()?,
        Key::Rport => row.rport = number?.parse().ok()?,
        Key::Old => {
            row.old = match opt_str(number, text_value)? {
                Some(name) => Some(State::from_name(name)?),
                None => None,
            }
        }
        Key::New => row.new = State::from_name(text_value?)?,
        Key::Ms => row.ms = opt_num::<f64>(number, text_value)?,
        Key::Close => row.close = opt_str(number, text_value)?.map(Cow::Borrowed),
        Key::ResetReason => row.reset_reason = opt_str(number, text_value)?.map(Cow::Borrowed),
        Key::Origin => row.origin = Cow::Borrowed(text_value?),
        Key::Timing => row.timing = Some(Cow::Borrowed(text_value?)),
        Key::Skaddr => {
            row.skaddr = match (text_value, number) {
                (Some(v), _) => Some(Hex(u64::from_str_radix(v.strip_prefix("0x")?, 16).ok()?)),
                // null: no address known.
                (None, None) => None,
                (None, Some(_)) => return None,
            }
        }
    }
    Some(())
}

/// The keys a row read by the fast path must have, as bits of `seen`
/// (one per [`Key`]); the rest are absent on some rows, or not read.
const REQUIRED: u32 = {
    use Key::*;
    let required = [
        TsNs, Sock, Pid, Comm, Family, Laddr, Lport, Raddr, Rport, Old, New, Ms,
    ];
    let mut mask = 0;
    let mut n = 0;
    while n < required.len() {
        mask |= 1 << required[n] as u32;
        n += 1;
    }
    mask
};
const _: () = assert!(
    Key::ALL.len() <= u32::BITS as usize,
    "a bit of `seen` per key"
);

/// A number or null (a string is a type error: serde's to report).
fn opt_num<T: std::str::FromStr>(number: Option<&str>, text: Option<&str>) -> Option<Option<T>> {
    match (number, text) {
        (Some(n), None) => n.parse().ok().map(Some),
        (None, None) => Some(None),
        _ => None,
    }
}

/// A string or null.
fn opt_str<'a>(number: Option<&str>, text: Option<&'a str>) -> Option<Option<&'a str>> {
    match (number, text) {
        (None, t) => Some(t),
        _ => None,
    }
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
            cgroup: j.cgroup.as_deref().and_then(crate::cgroup::intern),
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
            thread: j
                .thread
                .as_deref()
                .map(|t| Comm::from_bytes(t.as_bytes()))
                .unwrap_or_default(),
            old: j.old.unwrap_or(State(0)),
            new: j.new,
            family,
            local: SocketAddr::new(j.laddr, j.lport),
            remote: SocketAddr::new(j.raddr, j.rport),
            netns: j.netns.unwrap_or(0),
        },
        sock: j.sock,
        owner,
        queued: j.queued,
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
        timing: match &j.timing {
            Some(name) => {
                Timing::from_name(name).ok_or_else(|| format!("unknown timing {name:?}"))?
            }
            None => Timing::Exact,
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
        assert_eq!(r.t.new, crate::model::State::CLOSE_WAIT);
    }

    /// A client whose FIN_WAIT1 -> FIN_WAIT2 -> CLOSE the kernel never
    /// reported: the gap note (before or after its last row) keeps it out
    /// of the sockets still open, and `read` has nothing to print for it.
    #[test]
    fn a_socket_whose_end_never_came_is_not_still_open() {
        let stuck = ROW.replace("\"new\":\"CLOSE_WAIT\"", "\"new\":\"FIN_WAIT1\"");
        let note = r#"{"type":"gap","sock":3,"state":"FIN_WAIT1","ts_ns":724086999999}"#;
        let Ok(Item::Gap(g)) = parse_line(note.as_bytes()) else {
            panic!("a gap note");
        };
        assert_eq!(
            (g.sock, g.state.as_str(), g.ts_ns),
            (3, "FIN_WAIT1", 724086999999)
        );
        let open_after = |lines: &[&str]| {
            let mut analysis = crate::analyse::Analysis::new();
            for l in lines {
                analysis.add(parse_line(l.as_bytes()).unwrap());
            }
            analysis.report(3).still_open.len()
        };
        assert_eq!(open_after(&[&stuck]), 1);
        assert_eq!(open_after(&[&stuck, note]), 0);
        assert_eq!(open_after(&[note, &stuck]), 0);
        // The report says what became of it.
        let mut analysis = crate::analyse::Analysis::new();
        for l in [stuck.as_str(), note] {
            analysis.add(parse_line(l.as_bytes()).unwrap());
        }
        let report = analysis.report(3);
        assert_eq!(report.ended_unseen, 1);
        assert!(
            report
                .text()
                .contains("ended unseen    1 socket closed without"),
            "{}",
            report.text()
        );
    }

    /// Inputs kept from fuzzing (`cargo xtask fuzz`) and hand-made hostile
    /// ones: each line parses or is refused, and the report over them
    /// renders, without a panic.
    #[test]
    fn fuzz_regressions_parse_or_fail_cleanly() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tcptrace/fuzz/regressions/recording"
        );
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

    /// The fast path reads exactly what serde reads, and leaves to serde
    /// what it does not handle.
    #[test]
    fn fast_rows_agree_with_serde() {
        let snapshot = ROW
            .replace("\"old\":\"ESTABLISHED\"", "\"old\":null")
            .replace("\"ms\":80.205", "\"ms\":null");
        let reset = ROW.replace("\"new\":\"CLOSE_WAIT\"", "\"new\":\"CLOSE\",\"close\":\"reset sent\",\"reset_reason\":\"TCP_STATE\",\"netns\":4026531833,\"origin\":\"tracepoint\",\"skaddr\":\"0xffff888012345678\"");
        let unknown_owner = ROW.replace(
            "\"pid\":15682,\"comm\":\"redis-server\"",
            "\"pid\":null,\"comm\":null",
        );
        let v6 = ROW
            .replace("\"127.0.0.1\"", "\"::1\"")
            .replace("ipv4", "ipv6");
        for line in [ROW.to_string(), snapshot, reset, unknown_owner, v6] {
            let fast = fast_row(line.as_bytes()).unwrap_or_else(|| panic!("fast path: {line}"));
            let slow: JsonRow = serde_json::from_str(&line).unwrap();
            assert_eq!(fast, slow, "{line}");
        }
        // Left to serde: escapes, nesting, duplicates, wrong types, missing fields.
        for line in [
            ROW.replace("redis-server", "redis\\u001b"),
            ROW.replace("\"ms\":80.205", "\"ms\":{}"),
            ROW.replace("\"sock\":3", "\"sock\":3,\"sock\":4"),
            ROW.replace("\"lport\":6389", "\"lport\":\"6389\""),
            ROW.replace("\"sock\":3,", ""),
            ROW.replace("\"ts_ns\":724086982599", "\"ts_ns\":1e3"),
        ] {
            assert!(fast_row(line.as_bytes()).is_none(), "{line}");
        }
        // Escapes still parse, through serde.
        let escaped = ROW.replace("redis-server", "redis\\u001b");
        let Ok(Item::Row(r)) = parse_line(escaped.as_bytes()) else {
            panic!("serde reads it");
        };
        assert_eq!(r.owner.unwrap().comm.as_str(), "redis\u{1b}");
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

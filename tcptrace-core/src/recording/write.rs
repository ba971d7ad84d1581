//! The writer: transitions into a recording file that survives its writer.
//!
//! Records reach the file whole: they are collected in a buffer and written
//! at least every [`FLUSH_EVERY`] (a JSON line, or a checksummed binary
//! chunk, at a time); if a write fails, the file is cut back to its last
//! whole one, so everything in it stays readable. With `--rotate-size` the
//! file is renamed away when full and a new one starts, with its own
//! header. JSON rows are the printer's ([`Printer`]), binary ones the
//! encoder's ([`binary::Encoder`]).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use serde::Serialize;

use super::{binary, direct};
use crate::model::{Gap, Header, HoldersNote, Row, Stats};
use crate::output::{OutputFormat, Printer, Style, TimeFormat};
use crate::words::io_reason;

/// How often buffered rows reach the file, at the latest.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Pending bytes that make a write: large, because direct writes cost
/// per call and the device takes 1 MiB as fast as 64 KiB.
const BUFFER_LIMIT: usize = 1 << 20;

/// How a recording is written (`--write-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WriteFormat {
    /// Compact binary: about 20 bytes a transition; `tcptrace read` turns it
    /// into text or JSON Lines.
    Binary,
    /// JSON Lines, as `--format json --time utc` prints rows.
    Json,
}

impl WriteFormat {
    /// The format a file name asks for: JSON Lines for `.jsonl`, binary
    /// otherwise.
    pub fn for_path(path: &Path) -> WriteFormat {
        if path.extension().is_some_and(|e| e == "jsonl") {
            WriteFormat::Json
        } else {
            WriteFormat::Binary
        }
    }
}

/// Notes that go into a recording between rows.
pub trait Note: Serialize {
    fn encode(&self, enc: &mut binary::Encoder, buf: &mut Vec<u8>);
}

impl Note for Gap {
    fn encode(&self, enc: &mut binary::Encoder, buf: &mut Vec<u8>) {
        enc.gap(buf, self);
    }
}

impl Note for HoldersNote {
    fn encode(&self, enc: &mut binary::Encoder, buf: &mut Vec<u8>) {
        enc.holders(buf, self);
    }
}

/// Where and how to record.
#[derive(Clone, Debug)]
pub struct Options {
    pub path: PathBuf,
    pub force: bool,
    pub rotate_size: Option<u64>,
    pub rotate_keep: Option<u32>,
    /// `None`: as the file name says ([`WriteFormat::for_path`]).
    pub format: Option<WriteFormat>,
    /// Keep each socket's kernel address (`--show-skaddr`): left out
    /// otherwise, so that a recording shared is free of kernel pointers.
    pub skaddr: bool,
}

enum Encoding {
    Json(Printer),
    Binary {
        enc: binary::Encoder,
        /// Where the open chunk starts in the buffer, if one is open.
        chunk: Option<usize>,
        /// Sealed chunks among the pending bytes.
        sealed: Vec<Sealed>,
        /// Rows in the open chunk.
        chunk_rows: u64,
        /// Where each record (with the dictionary records before it) ends
        /// in the open chunk's payload, and the rows up to there: a write
        /// that stops inside a chunk keeps the whole records that fit.
        marks: Vec<(u32, u32)>,
        /// Rows in the current file.
        file_rows: u64,
    },
}

/// A chunk written or to be written: offsets from the start of the pending
/// bytes.
struct Sealed {
    start: usize,
    end: usize,
    rows: u64,
    marks: Vec<(u32, u32)>,
}

pub struct Recorder {
    opts: Options,
    header: Header,
    encoding: Encoding,
    out: direct::Output,
    /// Rows among the pending bytes.
    buffered_rows: u64,
    last_flush: Instant,
    pub events: u64,
}

/// A write failed: the message says what happened and what was kept.
#[derive(Debug)]
pub struct WriteFailure {
    pub message: String,
    /// Rows that never reached the file.
    pub lost: u64,
}

impl Recorder {
    pub fn create(opts: Options, header: Header) -> Result<Recorder> {
        let file = create_file(&opts.path, opts.force)?;
        let format = opts
            .format
            .unwrap_or_else(|| WriteFormat::for_path(&opts.path));
        let encoding = match format {
            WriteFormat::Json => Encoding::Json(Printer::new(
                Style {
                    format: OutputFormat::Json,
                    time: TimeFormat::Utc,
                    show_skaddr: opts.skaddr,
                    wide: false,
                    color: false,
                },
                header.clock(),
            )),
            WriteFormat::Binary => Encoding::Binary {
                enc: binary::Encoder::keeping_skaddr(opts.skaddr),
                chunk: None,
                sealed: Vec::new(),
                chunk_rows: 0,
                marks: Vec::new(),
                file_rows: 0,
            },
        };
        let mut r = Recorder {
            opts,
            header,
            encoding,
            out: direct::Output::new(file, BUFFER_LIMIT * 2),
            buffered_rows: 0,
            last_flush: Instant::now(),
            events: 0,
        };
        r.write_header();
        r.flush().map_err(|f| anyhow!(f.message))?;
        Ok(r)
    }

    pub fn path(&self) -> &Path {
        &self.opts.path
    }

    /// Appends the current file's header to the buffer.
    fn write_header(&mut self) {
        let buf = self.out.buf();
        match &mut self.encoding {
            Encoding::Json(_) => {
                serde_json::to_writer(&mut *buf, &self.header).expect("header serializes");
                buf.push(b'\n');
            }
            Encoding::Binary { enc, chunk, .. } => {
                enc.reset();
                binary::preamble(buf);
                let at = *chunk.get_or_insert_with(|| binary::open_chunk(buf));
                debug_assert_eq!(at + binary::CHUNK_HEAD, buf.len());
                enc.header(buf, &self.header);
            }
        }
        self.mark();
    }

    /// Notes that a record ends here (binary).
    fn mark(&mut self) {
        let len = self.out.buf().len();
        if let Encoding::Binary {
            chunk: Some(at),
            marks,
            chunk_rows,
            ..
        } = &mut self.encoding
        {
            marks.push(((len - *at - binary::CHUNK_HEAD) as u32, *chunk_rows as u32));
        }
    }

    /// Opens a chunk if none is (binary).
    fn chunk_open(&mut self) {
        if let Encoding::Binary { chunk, .. } = &mut self.encoding
            && chunk.is_none()
        {
            *chunk = Some(binary::open_chunk(self.out.buf()));
        }
    }

    pub fn row(&mut self, row: &Row) -> Result<(), WriteFailure> {
        self.chunk_open();
        let before = self.out.buf().len();
        let pending_before = self.out.pending().len();
        self.encode_row(row);
        self.buffered_rows += 1;
        self.events += 1;
        if let Some(limit) = self.opts.rotate_size
            && self.out.committed() + self.out.pending().len() as u64 > limit
            && self.has_rows(pending_before)
        {
            // The row starts the next file: it is encoded again there,
            // with that file's dictionaries.
            self.out.buf().truncate(before);
            self.buffered_rows -= 1;
            self.rotate()?;
            self.chunk_open();
            self.encode_row(row);
            self.buffered_rows += 1;
        }
        if let Encoding::Binary {
            chunk_rows,
            file_rows,
            ..
        } = &mut self.encoding
        {
            *chunk_rows += 1;
            *file_rows += 1;
        }
        self.mark();
        if self.out.pending().len() >= BUFFER_LIMIT {
            self.flush()?;
        }
        Ok(())
    }

    fn encode_row(&mut self, row: &Row) {
        let buf = self.out.buf();
        match &mut self.encoding {
            Encoding::Json(p) => p.row_into(buf, row),
            Encoding::Binary { enc, .. } => enc.row(buf, row),
        }
    }

    /// Whether the current file holds a row before this one (a file is
    /// never rotated away empty, however large a row).
    fn has_rows(&self, pending_before: usize) -> bool {
        match &self.encoding {
            Encoding::Json(_) => self.out.committed() + pending_before as u64 > 0,
            Encoding::Binary { file_rows, .. } => *file_rows > 0,
        }
    }

    /// Notes a socket whose end never arrived ([`Gap`]), or who holds a
    /// socket ([`HoldersNote`]).
    pub fn note(&mut self, note: &impl Note) -> Result<(), WriteFailure> {
        self.chunk_open();
        let buf = self.out.buf();
        match &mut self.encoding {
            Encoding::Json(_) => {
                let _ = serde_json::to_writer(&mut *buf, note);
                buf.push(b'\n');
            }
            Encoding::Binary { enc, .. } => note.encode(enc, buf),
        }
        self.mark();
        if self.out.pending().len() >= BUFFER_LIMIT {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes what is buffered if the last write is older than [`FLUSH_EVERY`].
    pub fn tick(&mut self) -> Result<(), WriteFailure> {
        if self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the stats record and everything before it.
    pub fn finish(mut self, stats: Stats) -> Result<(), WriteFailure> {
        self.chunk_open();
        let buf = self.out.buf();
        match &mut self.encoding {
            Encoding::Json(_) => {
                let _ = serde_json::to_writer(&mut *buf, &stats);
                buf.push(b'\n');
            }
            Encoding::Binary { enc, .. } => enc.stats(buf, &stats),
        }
        self.mark();
        self.flush()?;
        self.out.sync_data().map_err(|e| self.failure(&e, 0))
    }

    /// Writes everything before it, with no stats record: a recording
    /// copied from one that did not end cleanly does not either.
    pub fn close(mut self) -> Result<(), WriteFailure> {
        self.flush()?;
        self.out.sync_data().map_err(|e| self.failure(&e, 0))
    }

    /// Seals the open chunk (binary): its bytes become whole.
    fn seal(&mut self) {
        let pending_start = self.out.buf().len() - self.out.pending().len();
        let buf = self.out.buf();
        if let Encoding::Binary {
            chunk,
            sealed,
            chunk_rows,
            marks,
            ..
        } = &mut self.encoding
            && let Some(at) = chunk.take()
        {
            if binary::seal_chunk(buf, at) {
                sealed.push(Sealed {
                    start: at - pending_start,
                    end: buf.len() - pending_start,
                    rows: *chunk_rows,
                    marks: std::mem::take(marks),
                });
            }
            marks.clear();
            *chunk_rows = 0;
        }
    }

    fn flush(&mut self) -> Result<(), WriteFailure> {
        self.last_flush = Instant::now();
        self.seal();
        match self.out.write_out() {
            Ok(()) => {
                self.buffered_rows = 0;
                if let Encoding::Binary { sealed, .. } = &mut self.encoding {
                    sealed.clear();
                }
                Ok(())
            }
            Err(p) => Err(self.cut_back(p.kept, &p.error)),
        }
    }

    /// After a failed write of `written` pending bytes: keeps the whole
    /// lines or chunks that reached the file and cuts off the rest, so the
    /// file stays readable to its end.
    fn cut_back(&mut self, written: usize, e: &io::Error) -> WriteFailure {
        let pending = self.out.pending();
        let (whole, rows) = match &mut self.encoding {
            Encoding::Json(_) => {
                let whole = pending[..written]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |i| i + 1);
                // Rows are the lines that are not a header or a note.
                let rows = pending[..whole]
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty() && !l.starts_with(b"{\"type\":"))
                    .count() as u64;
                (whole, rows)
            }
            Encoding::Binary { sealed, .. } => {
                let (mut whole, mut rows) = (0, 0);
                let mut shorter = None;
                for u in sealed.iter() {
                    if u.end <= written {
                        (whole, rows) = (u.end, rows + u.rows);
                        continue;
                    }
                    // The chunk the write stopped in: the whole records that
                    // reached the file make a shorter chunk.
                    let room = written.saturating_sub(u.start + binary::CHUNK_HEAD);
                    if let Some(&(len, r)) = u.marks.iter().rev().find(|m| m.0 as usize <= room)
                        && len > 0
                    {
                        shorter = Some((u.start, len as usize, u64::from(r)));
                    }
                    break;
                }
                sealed.clear();
                if let Some((start, len, r)) = shorter {
                    let head = binary::chunk_head(&pending[start + binary::CHUNK_HEAD..][..len]);
                    // A pipe cannot be patched: then only whole chunks stay.
                    if self.out.patch(start, &head).is_ok() {
                        whole = start + binary::CHUNK_HEAD + len;
                        rows += r;
                    }
                }
                (whole, rows)
            }
        };
        self.out.cut(whole);
        let lost = self.buffered_rows.saturating_sub(rows);
        self.failure(e, lost)
    }

    fn failure(&self, e: &io::Error, lost: u64) -> WriteFailure {
        WriteFailure {
            message: format!(
                "cannot write the recording {}: {}; {} transitions could not be recorded, \
                 the {} recorded before are in the file",
                self.opts.path.display(),
                io_reason(e),
                lost,
                self.events - lost,
            ),
            lost,
        }
    }

    /// Moves to a new file, which starts with its own header (and, binary,
    /// its own dictionaries).
    fn rotate(&mut self) -> Result<(), WriteFailure> {
        // The row that did not fit, to be written again in the new file.
        let moved_rows = 1;
        self.flush()?;
        let path = self.opts.path.clone();
        let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
        let io_fail = |r: &Recorder, e: io::Error| r.failure(&e, moved_rows);
        // FILE -> FILE.1 -> FILE.2 ...; past --rotate-keep, the oldest goes.
        let keep = self.opts.rotate_keep;
        let mut last = 1;
        while numbered(last).exists() {
            last += 1;
        }
        for n in (1..last).rev() {
            if keep.is_some_and(|k| n + 1 >= k) {
                let _ = fs::remove_file(numbered(n));
            } else if let Err(e) = fs::rename(numbered(n), numbered(n + 1)) {
                return Err(io_fail(self, e));
            }
        }
        if keep == Some(1) {
            let _ = fs::remove_file(&path);
        } else if let Err(e) = fs::rename(&path, numbered(1)) {
            return Err(io_fail(self, e));
        }
        let file = create_file(&path, false).map_err(|e| WriteFailure {
            message: format!("{e:#}"),
            lost: moved_rows,
        })?;
        self.out.replace_file(file);
        self.header.part += 1;
        if let Encoding::Binary { file_rows, .. } = &mut self.encoding {
            *file_rows = 0;
        }
        self.write_header();
        Ok(())
    }
}

/// Creates a recording file: mode 0600, never through a symlink, and never
/// over an existing file unless `force`.
fn create_file(path: &Path, force: bool) -> Result<File> {
    let shown = path.display();
    if let Ok(meta) = fs::symlink_metadata(path) {
        if meta.file_type().is_symlink() {
            bail!("{shown} is a symlink; tcptrace does not write through symlinks");
        }
        if meta.is_dir() {
            bail!("{shown} is a directory; give a file name");
        }
        if !force {
            bail!("{shown} exists; use --force to overwrite it");
        }
    }
    let mut o = OpenOptions::new();
    o.write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    o.open(path)
        .map_err(|e| anyhow!("cannot create the recording {shown}: {}", io_reason(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh directory, removed when dropped, even by a failing test.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("tcptrace-record-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn opts(path: &Path) -> Options {
        Options {
            path: path.to_path_buf(),
            force: false,
            rotate_size: None,
            rotate_keep: None,
            format: None,
            skaddr: false,
        }
    }

    #[test]
    fn creates_0600_refuses_existing_and_symlinks() {
        let dir = TempDir::new("create");
        let p = dir.0.join("rec.jsonl");
        let clock = Clock {
            offset_ns: 0,
            start_ns: 0,
        };
        let r = Recorder::create(opts(&p), Header::new(clock, Spec::default())).unwrap();
        r.finish(Stats::default()).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = Recorder::create(opts(&p), Header::new(clock, Spec::default()));
        assert!(
            again
                .err()
                .unwrap()
                .to_string()
                .contains("exists; use --force")
        );
        let link = p.with_extension("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let mut o = opts(&link);
        o.force = true;
        let through = Recorder::create(o, Header::new(clock, Spec::default()));
        assert!(through.err().unwrap().to_string().contains("is a symlink"));
        let mut o = opts(&p);
        o.force = true;
        assert!(Recorder::create(o, Header::new(clock, Spec::default())).is_ok());
    }
}

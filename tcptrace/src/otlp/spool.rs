//! The disk spool: requests that could not be sent while the collector was
//! away, one file each, exactly the bytes to send (gzipped protobuf), named
//! in order. A run finds what an earlier one left and sends it first.
//!
//! Bounded in bytes; a lock file keeps two tcptraces out of one spool
//! (each would send the other's files, and delete them under it).

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};

/// A spooled request: its file, how many records it holds, its size.
pub struct Spooled {
    pub path: PathBuf,
    pub records: u64,
    pub bytes: u64,
}

pub struct Spool {
    dir: PathBuf,
    /// Oldest first.
    files: VecDeque<Spooled>,
    bytes: u64,
    records: u64,
    limit: u64,
    /// The number of the next file at the back, and of the last at the
    /// front.
    next: u64,
    first: u64,
    /// Held for the life of the spool: the lock.
    _lock: fs::File,
}

const MIDDLE: u64 = 1 << 48;

/// Name of a spooled request: its place in line, then its record count.
fn name(n: u64, records: u64) -> String {
    format!("{n:020}-{records}.otlp.gz")
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".otlp.gz")?;
    let (n, records) = stem.split_once('-')?;
    Some((n.parse().ok()?, records.parse().ok()?))
}

impl Spool {
    /// Opens (creating it) the spool in `dir`, taking what an earlier run
    /// left there.
    pub fn open(dir: &Path, limit: u64) -> anyhow::Result<Spool> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the OTLP spool {}", dir.display()))?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))
            .with_context(|| format!("cannot open the OTLP spool {}", dir.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(anyhow!(
                "another tcptrace is using the OTLP spool {}; give each run its own with \
                 --otlp-spool DIR",
                dir.display()
            ));
        }
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let entry = entry?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.ends_with(".tmp") {
                // Cut short by a crash while written: never sent, and
                // whole copies of its records are nowhere else. Counted
                // by the run that wrote it as spooled; nothing to send.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            if let Some((n, records)) = parse_name(&file) {
                let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
                found.push((
                    n,
                    Spooled {
                        path: entry.path(),
                        records,
                        bytes,
                    },
                ));
            }
        }
        found.sort_by_key(|(n, _)| *n);
        // Numbers start mid-range: the end of a run puts what it could not
        // send in front of what a spool holds, so numbers go down too.
        let next = found.last().map_or(MIDDLE, |(n, _)| n + 1);
        let first = found.first().map_or(MIDDLE, |(n, _)| *n);
        let files: VecDeque<Spooled> = found.into_iter().map(|(_, s)| s).collect();
        let bytes = files.iter().map(|f| f.bytes).sum();
        let records = files.iter().map(|f| f.records).sum();
        Ok(Spool {
            dir: dir.to_path_buf(),
            files,
            bytes,
            records,
            limit,
            next,
            first,
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Records waiting in the spool.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Appends a request; an error says why it could not be kept (full,
    /// or the disk refused).
    pub fn push(&mut self, body: &[u8], records: u64) -> Result<(), String> {
        let n = self.next;
        let file = self.write(n, body, records)?;
        self.next += 1;
        if self.files.is_empty() {
            self.first = n;
        }
        self.files.push_back(file);
        Ok(())
    }

    /// Puts a request in front of the others: it is older than they are.
    pub fn push_front(&mut self, body: &[u8], records: u64) -> Result<(), String> {
        if self.files.is_empty() {
            return self.push(body, records);
        }
        let n = self.first.saturating_sub(1);
        let file = self.write(n, body, records)?;
        self.first = n;
        self.files.push_front(file);
        Ok(())
    }

    fn write(&mut self, n: u64, body: &[u8], records: u64) -> Result<Spooled, String> {
        let size = body.len() as u64;
        if self.bytes + size > self.limit {
            return Err(format!(
                "the OTLP spool {} is full ({} bytes, --otlp-spool-size)",
                self.dir.display(),
                self.limit
            ));
        }
        let path = self.dir.join(name(n, records));
        let tmp = path.with_extension("tmp");
        // Renamed once whole: a file under its final name is never cut
        // short by a crash of tcptrace. Not synced: a sync per request
        // stalled the exporter behind the disk while rows piled up, and
        // the page cache outlives tcptrace (not a power cut).
        let written = fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(body))
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(format!(
                "cannot write to the OTLP spool {}: {e}",
                self.dir.display()
            ));
        }
        self.bytes += size;
        self.records += records;
        Ok(Spooled {
            path,
            records,
            bytes: size,
        })
    }

    /// The oldest request's bytes and record count.
    pub fn front(&self) -> Option<(Vec<u8>, u64)> {
        let f = self.files.front()?;
        let body = fs::read(&f.path).ok()?;
        Some((body, f.records))
    }

    /// The oldest request is done with (sent, or refused for good).
    pub fn pop(&mut self) {
        if let Some(f) = self.files.pop_front() {
            let _ = fs::remove_file(&f.path);
            self.bytes -= f.bytes;
            self.records -= f.records;
        }
    }

    /// The oldest request cannot be read back: skipped, its records lost.
    pub fn drop_unreadable(&mut self) -> Option<Spooled> {
        let f = self.files.pop_front()?;
        let _ = fs::remove_file(&f.path);
        self.bytes -= f.bytes;
        self.records -= f.records;
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tcptrace-spool-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn requests_come_back_in_order_and_survive_a_restart() {
        let d = dir("order");
        let mut s = Spool::open(&d, 1 << 20).unwrap();
        s.push(b"first", 3).unwrap();
        s.push(b"second", 5).unwrap();
        assert_eq!(s.records(), 8);
        drop(s);
        let mut s = Spool::open(&d, 1 << 20).unwrap();
        s.push(b"third", 1).unwrap();
        s.push_front(b"zeroth", 2).unwrap();
        let mut seen = Vec::new();
        while let Some((body, n)) = s.front() {
            seen.push((String::from_utf8(body).unwrap(), n));
            s.pop();
        }
        assert_eq!(
            seen,
            [
                ("zeroth".into(), 2),
                ("first".into(), 3),
                ("second".into(), 5),
                ("third".into(), 1)
            ]
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn an_unreadable_request_is_dropped_with_its_count() {
        let d = dir("unreadable");
        fs::create_dir_all(d.join(name(MIDDLE, 7))).unwrap();
        let mut s = Spool::open(&d, 1 << 20).unwrap();
        s.push(b"next", 2).unwrap();
        assert!(s.front().is_none());
        let lost = s.drop_unreadable().unwrap();
        assert_eq!((lost.records, s.records()), (7, 2));
        assert_eq!(s.front().unwrap(), (b"next".to_vec(), 2));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_full_spool_refuses_and_a_second_user_is_refused() {
        let d = dir("full");
        let mut s = Spool::open(&d, 10).unwrap();
        s.push(b"12345678", 1).unwrap();
        assert!(s.push(b"123", 1).unwrap_err().contains("is full"));
        let other = Spool::open(&d, 10).err().unwrap().to_string();
        assert!(other.contains("another tcptrace"), "{other}");
        let _ = fs::remove_dir_all(&d);
    }
}

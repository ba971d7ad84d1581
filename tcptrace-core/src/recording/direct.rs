//! How a recording's bytes reach its file: whole 4 KiB blocks straight to
//! the device (`O_DIRECT`), the rest through the page cache.
//!
//! Why: at a million transitions a second a recording grows by 300 MB/s,
//! and copying that into the page cache cost the tracer more than half of
//! its CPU (565 of 983 ns per event; `dd` on this kind of VM: 1.46 ns per
//! byte through the page cache, 0.13 ns direct in 1 MiB writes). Direct
//! writes need the memory, the file offset and the length aligned to the
//! block, so the buffer's data starts on an aligned address and at a file
//! offset (`base`) that is a multiple of the block. What does not fill a
//! block goes through the page cache, so the file always ends with the last
//! whole line or chunk; the bytes stay in the buffer until their block is
//! full.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

pub const BLOCK: usize = 4096;

/// Smaller direct writes are not worth waiting for the device: a few rows
/// a second go through the page cache as before.
const DIRECT_MIN: usize = 256 * 1024;

/// A write stopped part way: `kept` bytes of what was pending reached the
/// file.
pub struct Partial {
    pub kept: usize,
    pub error: io::Error,
}

pub struct Output {
    file: File,
    /// Data is `buf[start..]`; `start` puts it on an aligned address.
    buf: Vec<u8>,
    start: usize,
    /// File offset of the data's first byte, a multiple of [`BLOCK`].
    base: u64,
    /// Bytes of the data already in the file (all of them whole lines).
    on_file: usize,
    /// The file's status flags; `None` once its filesystem refused direct
    /// I/O, which then stays off.
    flags: Option<libc::c_int>,
    /// Not a regular file (a named pipe to a compressor, say): written in
    /// sequence, never at offsets, never directly.
    stream: bool,
    /// Bytes written past the page cache.
    pub direct_bytes: u64,
}

impl Output {
    pub fn new(file: File, capacity: usize) -> Output {
        let (stream, flags) = how_to_write(&file);
        let mut out = Output {
            flags,
            stream,
            file,
            buf: Vec::new(),
            start: 0,
            base: 0,
            on_file: 0,
            direct_bytes: 0,
        };
        out.realign(capacity);
        out
    }

    /// Where lines are appended.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Bytes appended and not yet in the file.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start + self.on_file..]
    }

    /// Length of the file: whole lines, all of them written.
    pub fn committed(&self) -> u64 {
        self.base + self.on_file as u64
    }

    /// Writes every pending byte.
    pub fn write_out(&mut self) -> Result<(), Partial> {
        let n = self.buf.len() - self.start;
        let from = self.on_file;
        let mut at = from;
        if at == n {
            return Ok(());
        }
        let partial = |(w, error): (usize, io::Error)| Partial {
            kept: w - from,
            error,
        };
        let first = at.next_multiple_of(BLOCK).min(n);
        let last = n / BLOCK * BLOCK;
        if self.flags.is_some() && last > first && last - first >= DIRECT_MIN && self.aligned() {
            self.write_at(at, first, false).map_err(partial)?;
            at = first;
            match self.write_at(first, last, true) {
                Ok(()) => {
                    at = last;
                    self.direct_bytes += (last - first) as u64;
                }
                // The filesystem takes no direct I/O: the page cache it is.
                Err((w, e)) if w == first && e.raw_os_error() == Some(libc::EINVAL) => {
                    self.flags = None;
                }
                Err(e) => return Err(partial(e)),
            }
        }
        self.write_at(at, n, false).map_err(partial)?;
        // Whole blocks are done with; the last, partial one is written
        // again (directly, if it is worth it) once more lines fill it.
        let done = n / BLOCK * BLOCK;
        self.buf.copy_within(self.start + done.., self.start);
        self.buf.truncate(self.start + n - done);
        self.base += done as u64;
        self.on_file = n - done;
        if !self.aligned() {
            self.realign(self.buf.capacity());
        }
        Ok(())
    }

    /// Overwrites pending bytes from `at` on that already reached the file,
    /// in the buffer and in the file (a chunk's head, after a write that
    /// stopped inside the chunk). Not possible on a stream.
    pub fn patch(&mut self, at: usize, bytes: &[u8]) -> io::Result<()> {
        if self.stream {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let from = self.on_file + at;
        self.file.write_all_at(bytes, self.base + from as u64)?;
        self.buf[self.start + from..][..bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    /// After a failed write: keeps `whole` bytes of what was pending in the
    /// file and drops the rest, from the file and from the buffer.
    pub fn cut(&mut self, whole: usize) {
        let end = self.on_file + whole;
        let _ = self.file.set_len(self.base + end as u64);
        self.buf.truncate(self.start + end);
        self.on_file = end;
    }

    /// Goes on in a new, empty file; pending bytes are dropped (write them
    /// out first).
    pub fn replace_file(&mut self, file: File) {
        (self.stream, self.flags) = how_to_write(&file);
        self.file = file;
        self.buf.truncate(self.start);
        self.base = 0;
        self.on_file = 0;
    }

    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn aligned(&self) -> bool {
        (self.buf.as_ptr() as usize + self.start).is_multiple_of(BLOCK)
    }

    /// Moves the data to an aligned start (the buffer grew past its
    /// capacity, or is new).
    fn realign(&mut self, capacity: usize) {
        let data = self.buf[self.start..].to_vec();
        self.buf = Vec::with_capacity(capacity.max(data.len() * 2) + BLOCK);
        self.start = self.buf.as_ptr().align_offset(BLOCK);
        self.buf.resize(self.start, 0);
        self.buf.extend_from_slice(&data);
    }

    /// Writes data `[from, to)` at its place in the file; on failure, how far
    /// it got.
    fn write_at(&mut self, from: usize, to: usize, direct: bool) -> Result<(), (usize, io::Error)> {
        let flags = self.flags.unwrap_or(0);
        if direct && !set_flags(&self.file, flags | libc::O_DIRECT) {
            return Err((from, io::Error::from_raw_os_error(libc::EINVAL)));
        }
        let mut at = from;
        let mut result = Ok(());
        while at < to {
            let bytes = &self.buf[self.start + at..self.start + to];
            let written = if self.stream {
                (&self.file).write(bytes)
            } else {
                self.file.write_at(bytes, self.base + at as u64)
            };
            match written {
                Ok(0) => {
                    result = Err(io::ErrorKind::WriteZero.into());
                    break;
                }
                Ok(k) => at += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if direct {
            set_flags(&self.file, flags);
        }
        result.map_err(|e| (at, e))
    }
}

/// Whether `file` is a stream (not a regular file), and else its status
/// flags for toggling O_DIRECT.
fn how_to_write(file: &File) -> (bool, Option<libc::c_int>) {
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return (true, None);
    }
    // SAFETY: F_GETFL on a descriptor this File owns; no memory is passed.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    (false, (flags >= 0).then_some(flags & !libc::O_DIRECT))
}

fn set_flags(file: &File, flags: libc::c_int) -> bool {
    // SAFETY: F_SETFL on a descriptor this File owns; no memory is passed.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_every_whole_line_after_each_write_small_or_large() {
        let path = std::env::temp_dir().join(format!("tcptrace-direct-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let mut out = Output::new(file, 2 << 20);
        let mut all = Vec::new();
        // Line lengths and write sizes that fall on and off block bounds.
        let mut seed = 7u64;
        let mut next = |m: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        for round in 0..60 {
            let lines = if round % 3 == 0 { 3 } else { 2000 + next(3000) };
            for _ in 0..lines {
                let len = 1 + next(600) as usize;
                let line: Vec<u8> = (0..len)
                    .map(|i| b'a' + (i % 26) as u8)
                    .chain([b'\n'])
                    .collect();
                out.buf().extend_from_slice(&line);
                all.extend_from_slice(&line);
            }
            assert!(out.write_out().is_ok());
            assert!(out.pending().is_empty());
            assert_eq!(out.committed(), all.len() as u64);
            assert!(std::fs::read(&path).unwrap() == all, "round {round}");
        }
        assert!(
            out.direct_bytes > (all.len() / 2) as u64,
            "{} of {}",
            out.direct_bytes,
            all.len()
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_named_pipe_gets_every_byte_in_order() {
        let path = std::env::temp_dir().join(format!("tcptrace-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let reader_path = path.clone();
        let reader = std::thread::spawn(move || std::fs::read(reader_path).unwrap());
        let pipe = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut out = Output::new(pipe, 1 << 20);
        let mut all = Vec::new();
        for round in 0..8 {
            for i in 0..20_000 {
                let line = format!("{round} {i} {}\n", "x".repeat(i % 97));
                out.buf().extend_from_slice(line.as_bytes());
                all.extend_from_slice(line.as_bytes());
            }
            assert!(out.write_out().is_ok());
        }
        drop(out);
        assert!(reader.join().unwrap() == all);
        let _ = std::fs::remove_file(&path);
    }
}

//! The compact recording format (docs/recording-format.md): about 20 bytes
//! a transition where JSON Lines takes 300, and read back without parsing
//! text.
//!
//! A file is [`MAGIC`], a version, then checksummed chunks of records. The
//! writer seals one chunk per write (at least every 200 ms), so a file
//! always ends with a whole chunk unless its writer died mid-write; the
//! reader tells that cut-off end (the last chunk is short) from damage
//! (a checksum or a record that does not add up).
//!
//! Strings (process, thread and reset names, cgroup paths), addresses and
//! network namespaces are written once, as dictionary records, and rows
//! refer to them by number; times and socket ids are deltas from the
//! previous row. Dictionaries restart in every file of a rotation, so each
//! file reads alone.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::fasthash::FastMap;
use crate::model::{
    Close, Comm, Family, Gap, Header, Holder, HoldersNote, Item, Origin, Row, State, Stats, Task,
    Timing, Transition,
};

/// The first bytes of a binary recording: not text (the high first byte),
/// and the line ending catches a transfer that rewrote it.
pub const MAGIC: [u8; 8] = *b"\x89TCPTR\r\n";
/// Version of the binary layout, after the magic (little-endian u16).
pub const VERSION: u16 = 1;
/// Magic and version.
pub const PREAMBLE: usize = MAGIC.len() + 2;

/// A chunk: tag, payload length (u32), CRC-32 of the payload (u32), and a
/// check byte over the length and CRC, so that a damaged length is seen as
/// damage rather than as a file cut short.
pub const CHUNK_TAG: u8 = 0xC1;
pub const CHUNK_HEAD: usize = 10;
/// No writer makes chunks this large (it writes every MiB).
pub const CHUNK_MAX: usize = 16 << 20;

const K_HEADER: u8 = 1;
const K_STR: u8 = 2;
const K_ADDR4: u8 = 3;
const K_ADDR6: u8 = 4;
const K_NETNS: u8 = 5;
const K_ROW: u8 = 6;
const K_GAP: u8 = 7;
const K_HOLDERS: u8 = 8;
const K_STATS: u8 = 9;
const K_RESET: u8 = 10;

// Row flags.
const F_OWNER: u8 = 0x01;
const F_THREAD: u8 = 0x02;
const F_CGROUP: u8 = 0x04;
const F_QUEUED: u8 = 0x08;
const F_DWELL: u8 = 0x10;
const F_NETNS: u8 = 0x20;
const F_V6: u8 = 0x40;
/// An extra byte follows: origin, close, reset reason.
const F_EXT: u8 = 0x80;
const E_REASON: u8 = 0x10;
/// The socket's kernel address follows, 8 bytes (`--show-skaddr`).
const E_SKADDR: u8 = 0x20;
/// Two bits: how well the row's time is known (0 exact, 1 timer, 2 poll).
/// Recordings made before them read as exact.
const E_TIMING_SHIFT: u8 = 6;

/// Dictionary entries a file may hold before the writer starts them over
/// (a host with endless clients would otherwise grow them without bound).
const DICT_LIMIT: usize = 1 << 18;

/// The check byte of a chunk head.
fn head_check(len: u32, crc: u32) -> u8 {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&len.to_le_bytes());
    b[4..].copy_from_slice(&crc.to_le_bytes());
    (crc32fast::hash(&b) & 0xff) as u8
}

pub fn preamble(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
}

/// Reserves a chunk head at the end of `buf`; returns where it starts.
pub fn open_chunk(buf: &mut Vec<u8>) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&[0; CHUNK_HEAD]);
    at
}

/// Fills in the head of the chunk that starts at `at` and runs to the end
/// of `buf`; an empty chunk is taken back instead. Returns whether a chunk
/// was sealed.
pub fn seal_chunk(buf: &mut Vec<u8>, at: usize) -> bool {
    if buf.len() == at + CHUNK_HEAD {
        buf.truncate(at);
        return false;
    }
    let head = chunk_head(&buf[at + CHUNK_HEAD..]);
    buf[at..at + CHUNK_HEAD].copy_from_slice(&head);
    true
}

/// The head of a chunk with this payload.
pub fn chunk_head(payload: &[u8]) -> [u8; CHUNK_HEAD] {
    let crc = crc32fast::hash(payload);
    let len = payload.len() as u32;
    let mut head = [0u8; CHUNK_HEAD];
    head[0] = CHUNK_TAG;
    head[1..5].copy_from_slice(&len.to_le_bytes());
    head[5..9].copy_from_slice(&crc.to_le_bytes());
    head[9] = head_check(len, crc);
    head
}

fn put_varint(b: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        b.push(n as u8 | 0x80);
        n >>= 7;
    }
    b.push(n as u8);
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    (n >> 1) as i64 ^ -((n & 1) as i64)
}

fn put_bytes(b: &mut Vec<u8>, s: &[u8]) {
    put_varint(b, s.len() as u64);
    b.extend_from_slice(s);
}

/// The writer's side: which strings, addresses and namespaces this file has
/// defined, and the previous row's time and socket.
#[derive(Default)]
pub struct Encoder {
    /// Names by their 16 bytes as one number: one multiply to hash.
    comms: FastMap<u128, u32>,
    /// Interned strings (cgroup paths, reset reasons), by address.
    statics: FastMap<usize, u32>,
    owned: HashMap<String, u32>,
    strings: u32,
    /// Addresses as numbers (cheaper to hash than `IpAddr`); one numbering.
    addrs4: FastMap<u32, u32>,
    addrs6: FastMap<u128, u32>,
    netns: FastMap<u32, u32>,
    prev_ts: u64,
    prev_sock: u64,
    /// Keep each socket's kernel address: asked for with `--show-skaddr`.
    skaddr: bool,
}

impl Encoder {
    /// An encoder that keeps each row's kernel address, or leaves it out.
    pub fn keeping_skaddr(skaddr: bool) -> Encoder {
        Encoder {
            skaddr,
            ..Encoder::default()
        }
    }

    /// Starts over, as at the top of a new file.
    pub fn reset(&mut self) {
        *self = Encoder {
            skaddr: self.skaddr,
            ..Encoder::default()
        };
    }

    pub fn header(&mut self, b: &mut Vec<u8>, h: &Header) {
        b.push(K_HEADER);
        put_bytes(b, &serde_json::to_vec(h).expect("header serializes"));
    }

    pub fn stats(&mut self, b: &mut Vec<u8>, s: &Stats) {
        b.push(K_STATS);
        put_bytes(b, &serde_json::to_vec(s).expect("stats serialize"));
    }

    fn full(&self) -> bool {
        self.strings as usize + self.addrs() + self.netns.len() >= DICT_LIMIT
    }

    fn new_string(&mut self, b: &mut Vec<u8>, s: &[u8]) -> u32 {
        b.push(K_STR);
        put_bytes(b, s);
        self.strings += 1;
        self.strings - 1
    }

    fn comm(&mut self, b: &mut Vec<u8>, c: Comm) -> u32 {
        let mut raw = [0u8; 16];
        let bytes = c.as_bytes();
        raw[..bytes.len()].copy_from_slice(bytes);
        let key = u128::from_ne_bytes(raw);
        if let Some(&id) = self.comms.get(&key) {
            return id;
        }
        let id = self.new_string(b, bytes);
        self.comms.insert(key, id);
        id
    }

    fn addrs(&self) -> usize {
        self.addrs4.len() + self.addrs6.len()
    }

    fn interned(&mut self, b: &mut Vec<u8>, s: &'static str) -> u32 {
        let key = s.as_ptr() as usize;
        if let Some(&id) = self.statics.get(&key) {
            return id;
        }
        let id = self.new_string(b, s.as_bytes());
        self.statics.insert(key, id);
        id
    }

    fn text(&mut self, b: &mut Vec<u8>, s: &str) -> u32 {
        if let Some(&id) = self.owned.get(s) {
            return id;
        }
        let id = self.new_string(b, s.as_bytes());
        self.owned.insert(s.to_string(), id);
        id
    }

    fn addr(&mut self, b: &mut Vec<u8>, ip: IpAddr) -> u32 {
        let next = self.addrs() as u32;
        match ip {
            IpAddr::V4(a) => *self.addrs4.entry(a.to_bits()).or_insert_with(|| {
                b.push(K_ADDR4);
                b.extend_from_slice(&a.octets());
                next
            }),
            IpAddr::V6(a) => *self.addrs6.entry(a.to_bits()).or_insert_with(|| {
                b.push(K_ADDR6);
                b.extend_from_slice(&a.octets());
                next
            }),
        }
    }

    fn netns(&mut self, b: &mut Vec<u8>, n: u32) -> u32 {
        if let Some(&id) = self.netns.get(&n) {
            return id;
        }
        b.push(K_NETNS);
        put_varint(b, u64::from(n));
        let id = self.netns.len() as u32;
        self.netns.insert(n, id);
        id
    }

    /// Appends a row, after the dictionary records it needs. It keeps what
    /// a JSON Lines recording keeps, no more: reading either gives the same
    /// rows.
    pub fn row(&mut self, b: &mut Vec<u8>, row: &Row) {
        if self.full() {
            b.push(K_RESET);
            self.reset();
        }
        let t = &row.t;
        let mut flags = 0u8;
        let mut ext = 0u8;
        // Dictionary records go before the row that uses them.
        let mut owner = None;
        let mut thread = None;
        let mut cgroup = None;
        if let Some(o) = &row.owner {
            flags |= F_OWNER;
            owner = Some((o.pid, self.comm(b, o.comm)));
            let th = t.thread.as_bytes();
            if !th.is_empty() && th != o.comm.as_bytes() {
                flags |= F_THREAD;
                thread = Some(self.comm(b, t.thread));
            }
            if let Some(path) = o.cgroup {
                flags |= F_CGROUP;
                cgroup = Some(self.interned(b, path));
            }
        }
        let netns = (t.netns != 0).then(|| {
            flags |= F_NETNS;
            self.netns(b, t.netns)
        });
        let laddr = self.addr(b, t.local.ip());
        let raddr = self.addr(b, t.remote.ip());
        let reason = row
            .close
            .and_then(|c| c.reset_reason())
            .map(|r| self.interned(b, r));
        if row.queued {
            flags |= F_QUEUED;
        }
        if row.dwell_ns.is_some() {
            flags |= F_DWELL;
        }
        if t.family == Family::V6 {
            flags |= F_V6;
        }
        ext |= match row.origin {
            Origin::Tracepoint => 0,
            Origin::Snapshot => 1,
            Origin::TimeWait => 2,
            Origin::TimeWaitKernel => 3,
        };
        ext |= match row.close {
            None => 0,
            Some(Close::ResetSent(_)) => 1 << 2,
            Some(Close::ResetReceived) => 2 << 2,
            Some(Close::Refused) => 3 << 2,
        };
        if reason.is_some() {
            ext |= E_REASON;
        }
        ext |= match row.timing {
            Timing::Exact => 0,
            Timing::Timer => 1,
            Timing::Poll => 2,
        } << E_TIMING_SHIFT;
        let skaddr = (self.skaddr && t.skaddr != 0).then_some(t.skaddr);
        if skaddr.is_some() {
            ext |= E_SKADDR;
        }
        if ext != 0 {
            flags |= F_EXT;
        }
        b.push(K_ROW);
        b.push(flags);
        if ext != 0 {
            b.push(ext);
        }
        put_varint(b, zigzag(t.ts_ns.wrapping_sub(self.prev_ts) as i64));
        put_varint(b, zigzag(row.sock.wrapping_sub(self.prev_sock) as i64));
        self.prev_ts = t.ts_ns;
        self.prev_sock = row.sock;
        // A snapshot row has no old state (JSON writes null).
        let old = if row.origin == Origin::Snapshot {
            0
        } else {
            t.old.0
        };
        if old < 15 && t.new.0 < 16 {
            b.push(old << 4 | t.new.0);
        } else {
            b.extend_from_slice(&[0xff, old, t.new.0]);
        }
        if let Some((pid, comm)) = owner {
            put_varint(b, u64::from(pid));
            put_varint(b, u64::from(comm));
        }
        if let Some(id) = cgroup {
            put_varint(b, u64::from(id));
        }
        if let Some(id) = thread {
            put_varint(b, u64::from(id));
        }
        if let Some(id) = netns {
            put_varint(b, u64::from(id));
        }
        put_varint(b, u64::from(laddr));
        b.extend_from_slice(&t.local.port().to_le_bytes());
        put_varint(b, u64::from(raddr));
        b.extend_from_slice(&t.remote.port().to_le_bytes());
        if let Some(ns) = row.dwell_ns {
            // Microseconds: what JSON's "ms" with three decimals keeps.
            put_varint(b, ns / 1000);
        }
        if let Some(id) = reason {
            put_varint(b, u64::from(id));
        }
        if let Some(a) = skaddr {
            b.extend_from_slice(&a.to_le_bytes());
        }
    }

    pub fn gap(&mut self, b: &mut Vec<u8>, g: &Gap) {
        let state = self.text(b, &g.state);
        b.push(K_GAP);
        put_varint(b, g.sock);
        put_varint(b, g.ts_ns);
        put_varint(b, u64::from(state));
    }

    pub fn holders(&mut self, b: &mut Vec<u8>, h: &HoldersNote) {
        let ids: Vec<(u32, u32, Option<u32>)> = h
            .holders
            .iter()
            .map(|x| {
                let comm = self.text(b, &x.comm);
                let cg = x.cgroup.as_deref().map(|c| self.text(b, c));
                (x.pid, comm, cg)
            })
            .collect();
        b.push(K_HOLDERS);
        put_varint(b, h.ts_ns);
        put_varint(b, h.sock);
        put_varint(b, ids.len() as u64);
        for (pid, comm, cg) in ids {
            put_varint(b, u64::from(pid));
            put_varint(b, u64::from(comm));
            put_varint(b, cg.map_or(0, |c| u64::from(c) + 1));
        }
    }
}

/// A string of the file's dictionary, with what it becomes when used.
struct Entry {
    bytes: Box<[u8]>,
    comm: Comm,
    /// As a cgroup path, once used as one (interning takes a lock).
    cgroup: Option<Option<&'static str>>,
    reason: Option<&'static str>,
}

/// The reader's side of [`Encoder`].
#[derive(Default)]
pub struct Decoder {
    strings: Vec<Entry>,
    addrs: Vec<IpAddr>,
    netns: Vec<u32>,
    prev_ts: u64,
    prev_sock: u64,
}

/// Why a record could not be read, and where in its chunk's payload.
#[derive(Debug)]
pub struct Bad {
    pub at: usize,
    pub what: String,
}

struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn bad(&self, what: impl Into<String>) -> Bad {
        Bad {
            at: self.at,
            what: what.into(),
        }
    }

    fn u8(&mut self) -> Result<u8, Bad> {
        let b = *self
            .data
            .get(self.at)
            .ok_or_else(|| self.bad("a record runs past its chunk"))?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Bad> {
        let s = self
            .data
            .get(self.at..self.at.saturating_add(n))
            .ok_or_else(|| self.bad("a record runs past its chunk"))?;
        self.at += n;
        Ok(s)
    }

    fn varint(&mut self) -> Result<u64, Bad> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(self.bad("a number longer than 64 bits"))
    }

    fn u32(&mut self) -> Result<u32, Bad> {
        u32::try_from(self.varint()?).map_err(|_| self.bad("a number out of range"))
    }

    fn port(&mut self) -> Result<u16, Bad> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u64_le(&mut self) -> Result<u64, Bad> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn bytes(&mut self) -> Result<&'a [u8], Bad> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| self.bad("a length out of range"))?;
        self.take(n)
    }
}

impl Decoder {
    fn string(&mut self, c: &Cursor, id: u64) -> Result<&mut Entry, Bad> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.strings.get_mut(i))
            .ok_or_else(|| c.bad(format!("string {id} was never defined")))
    }

    fn text(&mut self, c: &Cursor, id: u64) -> Result<String, Bad> {
        Ok(String::from_utf8_lossy(&self.string(c, id)?.bytes).into_owned())
    }

    fn addr(&self, c: &Cursor, id: u64) -> Result<IpAddr, Bad> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.addrs.get(i))
            .copied()
            .ok_or_else(|| c.bad(format!("address {id} was never defined")))
    }

    /// Reads the records of one chunk's payload, handing each item to
    /// `sink`; a sink's error stops it and is returned inside.
    pub fn chunk<E>(
        &mut self,
        data: &[u8],
        sink: &mut impl FnMut(Item) -> Result<(), E>,
    ) -> Result<Result<(), E>, Bad> {
        let mut c = Cursor { data, at: 0 };
        while c.at < data.len() {
            let start = c.at;
            // Rows, nearly every record, go straight to the sink: each move
            // of an item is a copy of a row.
            if data[start] == K_ROW {
                c.at += 1;
                match self.row(&mut c, sink) {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => return Ok(Err(e)),
                    Err(mut e) => {
                        e.at = start;
                        return Err(e);
                    }
                }
            }
            let item = self.record(&mut c);
            let item = match item {
                Ok(item) => item,
                Err(mut e) => {
                    // Named by where the record starts, not where it broke.
                    e.at = start;
                    return Err(e);
                }
            };
            if let Some(item) = item
                && let Err(e) = sink(item)
            {
                return Ok(Err(e));
            }
        }
        Ok(Ok(()))
    }

    fn record(&mut self, c: &mut Cursor) -> Result<Option<Item>, Bad> {
        let kind = c.u8()?;
        Ok(Some(match kind {
            K_ROW => {
                let mut row = None;
                let _ = self.row(c, &mut |item| -> Result<(), ()> {
                    row = Some(item);
                    Ok(())
                })?;
                return Ok(row);
            }
            K_STR => {
                let bytes = c.bytes()?;
                if self.strings.len() >= DICT_LIMIT {
                    return Err(c.bad("more strings than a file may define"));
                }
                self.strings.push(Entry {
                    comm: Comm::from_bytes(bytes),
                    bytes: bytes.into(),
                    cgroup: None,
                    reason: None,
                });
                return Ok(None);
            }
            K_ADDR4 | K_ADDR6 => {
                let ip = if kind == K_ADDR4 {
                    let b: [u8; 4] = c.take(4)?.try_into().expect("4 bytes");
                    IpAddr::V4(Ipv4Addr::from(b))
                } else {
                    let b: [u8; 16] = c.take(16)?.try_into().expect("16 bytes");
                    IpAddr::V6(Ipv6Addr::from(b))
                };
                if self.addrs.len() >= DICT_LIMIT {
                    return Err(c.bad("more addresses than a file may define"));
                }
                self.addrs.push(ip);
                return Ok(None);
            }
            K_NETNS => {
                let n = c.u32()?;
                if self.netns.len() >= DICT_LIMIT {
                    return Err(c.bad("more namespaces than a file may define"));
                }
                self.netns.push(n);
                return Ok(None);
            }
            K_RESET => {
                *self = Decoder::default();
                return Ok(None);
            }
            K_HEADER => {
                let h: Header = serde_json::from_slice(c.bytes()?)
                    .map_err(|e| c.bad(format!("a bad header: {e}")))?;
                // Each file defines its own dictionaries.
                *self = Decoder::default();
                Item::Header(Box::new(h))
            }
            K_STATS => Item::Stats(
                serde_json::from_slice(c.bytes()?).map_err(|e| c.bad(format!("bad stats: {e}")))?,
            ),
            K_GAP => {
                let sock = c.varint()?;
                let ts_ns = c.varint()?;
                let id = c.varint()?;
                Item::Gap(Gap {
                    kind: "gap".into(),
                    sock,
                    state: self.text(c, id)?,
                    ts_ns,
                })
            }
            K_HOLDERS => {
                let ts_ns = c.varint()?;
                let sock = c.varint()?;
                let n = c.varint()?;
                let mut holders = Vec::new();
                for _ in 0..n {
                    let pid = c.u32()?;
                    let comm = c.varint()?;
                    let cg = c.varint()?;
                    holders.push(Holder {
                        pid,
                        comm: self.text(c, comm)?,
                        cgroup: match cg {
                            0 => None,
                            id => Some(self.text(c, id - 1)?),
                        },
                    });
                }
                Item::Holders(HoldersNote {
                    kind: "holders".into(),
                    ts_ns,
                    sock,
                    holders,
                })
            }
            other => return Err(c.bad(format!("unknown record kind {other}"))),
        }))
    }

    /// Decodes a row and hands it to `sink` (built in the call: a row
    /// returned up the stack is copied at each step).
    #[inline(always)]
    fn row<E>(
        &mut self,
        c: &mut Cursor,
        sink: &mut impl FnMut(Item) -> Result<(), E>,
    ) -> Result<Result<(), E>, Bad> {
        let flags = c.u8()?;
        let ext = if flags & F_EXT != 0 { c.u8()? } else { 0 };
        let ts_ns = self.prev_ts.wrapping_add(unzigzag(c.varint()?) as u64);
        let sock = self.prev_sock.wrapping_add(unzigzag(c.varint()?) as u64);
        self.prev_ts = ts_ns;
        self.prev_sock = sock;
        let states = c.u8()?;
        let (old, new) = if states == 0xff {
            (c.u8()?, c.u8()?)
        } else {
            (states >> 4, states & 15)
        };
        let mut owner = None;
        if flags & F_OWNER != 0 {
            let pid = c.u32()?;
            let id = c.varint()?;
            let comm = self.string(c, id)?.comm;
            owner = Some(Task {
                pid,
                comm,
                cgroup: None,
            });
        }
        if flags & F_CGROUP != 0 {
            let id = c.varint()?;
            let e = self.string(c, id)?;
            let path = *e
                .cgroup
                .get_or_insert_with(|| crate::cgroup::intern(&String::from_utf8_lossy(&e.bytes)));
            match &mut owner {
                Some(o) => o.cgroup = path,
                None => return Err(c.bad("a cgroup without an owner")),
            }
        }
        let thread = if flags & F_THREAD != 0 {
            if owner.is_none() {
                return Err(c.bad("a thread without an owner"));
            }
            let id = c.varint()?;
            self.string(c, id)?.comm
        } else {
            Comm::default()
        };
        let netns = if flags & F_NETNS != 0 {
            let id = c.varint()?;
            usize::try_from(id)
                .ok()
                .and_then(|i| self.netns.get(i))
                .copied()
                .ok_or_else(|| c.bad(format!("namespace {id} was never defined")))?
        } else {
            0
        };
        let id = c.varint()?;
        let local = SocketAddr::new(self.addr(c, id)?, c.port()?);
        let id = c.varint()?;
        let remote = SocketAddr::new(self.addr(c, id)?, c.port()?);
        let dwell_ns = if flags & F_DWELL != 0 {
            Some(c.varint()?.saturating_mul(1000))
        } else {
            None
        };
        let reason = if ext & E_REASON != 0 {
            let id = c.varint()?;
            let e = self.string(c, id)?;
            Some(*e.reason.get_or_insert_with(|| {
                crate::model::intern_reason(&String::from_utf8_lossy(&e.bytes))
            }))
        } else {
            None
        };
        let origin = match ext & 3 {
            0 => Origin::Tracepoint,
            1 => Origin::Snapshot,
            2 => Origin::TimeWait,
            _ => Origin::TimeWaitKernel,
        };
        let close = match (ext >> 2) & 3 {
            0 => None,
            1 => Some(Close::ResetSent(reason)),
            2 => Some(Close::ResetReceived),
            _ => Some(Close::Refused),
        };
        if reason.is_some() && !matches!(close, Some(Close::ResetSent(_))) {
            return Err(c.bad("a reset reason without a reset sent"));
        }
        let skaddr = if ext & E_SKADDR != 0 { c.u64_le()? } else { 0 };
        let timing = match ext >> E_TIMING_SHIFT {
            0 => Timing::Exact,
            1 => Timing::Timer,
            2 => Timing::Poll,
            _ => return Err(c.bad("an unknown timing")),
        };
        Ok(sink(Item::Row(Row {
            t: Transition {
                ts_ns,
                skaddr,
                task: owner.unwrap_or_default(),
                thread,
                old: State(old),
                new: State(new),
                family: if flags & F_V6 != 0 {
                    Family::V6
                } else {
                    Family::V4
                },
                local,
                remote,
                netns,
            },
            sock,
            owner,
            queued: flags & F_QUEUED != 0,
            dwell_ns,
            origin,
            close,
            timing,
        })))
    }
}

/// A chunk head read: the payload's length and CRC, or why it is not one.
pub fn parse_head(head: &[u8; CHUNK_HEAD]) -> Result<(usize, u32), String> {
    if head[0] != CHUNK_TAG {
        return Err(format!("no chunk starts here (byte {:#04x})", head[0]));
    }
    let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(head[5..9].try_into().expect("4 bytes"));
    if head[9] != head_check(len, crc) {
        return Err("a chunk head is damaged (its check byte does not match)".into());
    }
    if len == 0 || len as usize > CHUNK_MAX {
        return Err(format!("a chunk of {len} bytes"));
    }
    Ok((len as usize, crc))
}

/// Whether a recording is in this format.
pub fn is_binary(first: &[u8]) -> bool {
    first.starts_with(&MAGIC)
}

/// The header of a binary recording from its first bytes, to order the
/// files of a rotation; `None` when they do not hold it whole.
pub fn peek_header(first: &[u8]) -> Option<Header> {
    let rest = first.strip_prefix(&MAGIC)?;
    let head: &[u8; CHUNK_HEAD] = rest.get(2..2 + CHUNK_HEAD)?.try_into().ok()?;
    let (len, _) = parse_head(head).ok()?;
    let payload = rest.get(2 + CHUNK_HEAD..2 + CHUNK_HEAD + len)?;
    let mut c = Cursor {
        data: payload,
        at: 0,
    };
    if c.u8().ok()? != K_HEADER {
        return None;
    }
    serde_json::from_slice(c.bytes().ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_zigzag_round_trip() {
        for n in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, n);
            let mut c = Cursor { data: &b, at: 0 };
            assert_eq!(c.varint().unwrap(), n);
            assert_eq!(c.at, b.len());
        }
        for n in [0i64, 1, -1, i64::MAX, i64::MIN, -1000] {
            assert_eq!(unzigzag(zigzag(n)), n);
        }
    }

    /// Rows of every shape, and notes: what the binary format gives back is
    /// what JSON Lines gives back, field for field.
    #[test]
    fn rows_read_back_as_from_json_lines() {
        let rows = rows_of_every_shape();
        let (gap, holders) = gap_and_holders();
        let back = encode_and_decode(&rows, &gap, &holders);
        assert_eq!(back.len(), rows.len() + 2);
        let mut printer = json_printer();
        for (row, item) in rows.iter().zip(&back) {
            assert_reads_back_as_from_json(&mut printer, row, item);
        }
        assert!(matches!(&back[rows.len()], Item::Gap(g) if *g == gap));
        assert!(matches!(&back[rows.len() + 1], Item::Holders(h) if *h == holders));
    }

    /// A row with every field set, some of them at odd values (a thread
    /// name, a comm that is not UTF-8, a cgroup, a queued socket).
    fn full_row() -> Row {
        use crate::model::Task;
        Row {
            t: Transition {
                ts_ns: 5_000_000_123,
                skaddr: 0xffff_8880_dead_beef,
                task: Task::new(1, b"swapper/0"),
                thread: Comm::from_bytes(b"worker-3"),
                old: State::ESTABLISHED,
                new: State::CLOSE_WAIT,
                family: Family::V4,
                local: "127.0.0.1:6389".parse().unwrap(),
                remote: "10.1.2.3:53525".parse().unwrap(),
                netns: 4026531840,
            },
            sock: 3,
            owner: Some(Task {
                pid: 4242,
                comm: Comm::from_bytes(b"redis\xff\x1b"),
                cgroup: crate::cgroup::intern("/system.slice/redis.service"),
            }),
            dwell_ns: Some(12_345_678),
            close: None,
            origin: Origin::Tracepoint,
            queued: true,
            timing: crate::model::Timing::Exact,
        }
    }

    /// The full row, and variants of it: no owner nor netns, a reset sent
    /// with its reason, IPv6 from a snapshot with odd state numbers, each
    /// close cause from the TIME_WAIT walk, and time-wait rows of each
    /// timing.
    fn rows_of_every_shape() -> Vec<Row> {
        let base = full_row();
        let mut rows = vec![base];
        let mut r = base;
        r.owner = None;
        r.t.netns = 0;
        r.t.ts_ns -= 4_000_000_000;
        r.sock = 1;
        r.close = Some(Close::ResetSent(Some(crate::model::intern_reason(
            "TCP_ABORT_ON_LINGER",
        ))));
        r.t.new = State::CLOSE;
        rows.push(r);
        let mut r = base;
        r.origin = Origin::Snapshot;
        r.dwell_ns = None;
        r.t.family = Family::V6;
        r.t.local = "[::ffff:127.0.0.1]:1".parse().unwrap();
        r.t.remote = "[2001:db8::1]:65535".parse().unwrap();
        r.t.old = State(200);
        r.t.new = State(15);
        rows.push(r);
        for close in [Close::ResetReceived, Close::Refused, Close::ResetSent(None)] {
            let mut r = base;
            r.close = Some(close);
            r.origin = Origin::TimeWait;
            r.t.thread = Comm::default();
            r.sock = u64::MAX;
            rows.push(r);
        }
        // A time-wait row's time known to its timer, and one to the poll,
        // stamped before the row ahead of it.
        for timing in [Timing::Timer, Timing::Poll] {
            let mut r = base;
            r.origin = Origin::TimeWait;
            r.timing = timing;
            r.t.ts_ns -= 250_000_000;
            rows.push(r);
        }
        rows
    }

    /// A gap note and a holders note.
    fn gap_and_holders() -> (Gap, HoldersNote) {
        let gap = Gap {
            kind: "gap".into(),
            sock: 9,
            state: "FIN_WAIT1".into(),
            ts_ns: 77,
        };
        let holders = HoldersNote {
            kind: "holders".into(),
            ts_ns: 78,
            sock: 3,
            holders: vec![
                Holder {
                    pid: 1,
                    comm: "a".into(),
                    cgroup: None,
                },
                Holder {
                    pid: 2,
                    comm: "b".into(),
                    cgroup: Some("/x.slice".into()),
                },
            ],
        };
        (gap, holders)
    }

    /// The rows, then the notes, encoded in one chunk and decoded back.
    fn encode_and_decode(rows: &[Row], gap: &Gap, holders: &HoldersNote) -> Vec<Item> {
        let mut enc = Encoder::default();
        let mut b = Vec::new();
        for r in rows {
            enc.row(&mut b, r);
        }
        enc.gap(&mut b, gap);
        enc.holders(&mut b, holders);
        let mut back = Vec::new();
        let mut dec = Decoder::default();
        dec.chunk(&b, &mut |item| -> Result<(), ()> {
            back.push(item);
            Ok(())
        })
        .unwrap()
        .unwrap();
        back
    }

    fn json_printer() -> crate::output::Printer {
        use crate::model::Clock;
        use crate::output::{OutputFormat, Printer, Style, TimeFormat};
        Printer::new(
            Style {
                format: OutputFormat::Json,
                time: TimeFormat::Utc,
                show_skaddr: false,
                wide: false,
                color: false,
            },
            Clock {
                offset_ns: 0,
                start_ns: 0,
            },
        )
    }

    /// The row printed as JSON Lines and parsed back is the row decoded
    /// from the binary format, and both print the same.
    fn assert_reads_back_as_from_json(
        printer: &mut crate::output::Printer,
        row: &Row,
        item: &Item,
    ) {
        let mut line = Vec::new();
        printer.row_into(&mut line, row);
        let Ok(Item::Row(from_json)) = crate::recording::read::parse_line(line.trim_ascii_end())
        else {
            panic!("json row");
        };
        let Item::Row(from_binary) = item else {
            panic!("binary row");
        };
        // Raw comm bytes that are not UTF-8 are kept as they were, where
        // JSON has U+FFFD: they print the same.
        let mut again = Vec::new();
        printer.row_into(&mut again, from_binary);
        assert_eq!(
            String::from_utf8_lossy(&again),
            String::from_utf8_lossy(&line)
        );
        let mut from_json = from_json;
        from_json.owner = from_binary.owner;
        from_json.t.task = from_binary.t.task;
        assert_eq!(*from_binary, from_json);
    }

    #[test]
    fn dictionaries_start_over_when_full_and_rows_still_read() {
        let mut enc = Encoder::default();
        let mut b = Vec::new();
        let row = |i: u32| Row {
            t: Transition {
                ts_ns: u64::from(i),
                skaddr: 0,
                task: Task::default(),
                thread: Comm::default(),
                old: State::SYN_SENT,
                new: State::ESTABLISHED,
                family: Family::V4,
                local: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(i)), 1),
                remote: "10.0.0.1:2".parse().unwrap(),
                netns: 0,
            },
            sock: u64::from(i),
            owner: None,
            dwell_ns: None,
            close: None,
            origin: Origin::Tracepoint,
            queued: false,
            timing: crate::model::Timing::Exact,
        };
        let n = DICT_LIMIT as u32 + 10;
        for i in 0..n {
            enc.row(&mut b, &row(i));
        }
        let mut dec = Decoder::default();
        let mut i = 0;
        dec.chunk(&b, &mut |item| -> Result<(), ()> {
            let Item::Row(r) = item else { panic!() };
            assert_eq!(r, row(i));
            i += 1;
            Ok(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(i, n);
    }

    /// A small recording as the writer frames it: preamble, a header
    /// chunk, a chunk of rows and notes.
    fn framed() -> Vec<u8> {
        let mut b = Vec::new();
        preamble(&mut b);
        let mut enc = Encoder::default();
        let at = open_chunk(&mut b);
        let header = Header::new(
            crate::model::Clock {
                offset_ns: 1,
                start_ns: 2,
            },
            crate::model::Spec::default(),
        );
        enc.header(&mut b, &header);
        seal_chunk(&mut b, at);
        let at = open_chunk(&mut b);
        enc.gap(
            &mut b,
            &Gap {
                kind: "gap".into(),
                sock: 1,
                state: "FIN_WAIT1".into(),
                ts_ns: 3,
            },
        );
        let line = br#"{"ts_ns":9,"sock":3,"pid":5,"comm":"c","family":"ipv6","laddr":"::1","lport":1,"raddr":"::2","rport":2,"old":"SYN_SENT","new":"ESTABLISHED","ms":1.5,"netns":7}"#;
        let Ok(Item::Row(sample)) = crate::recording::read::parse_line(line) else {
            panic!("a row");
        };
        for _ in 0..3 {
            enc.row(&mut b, &sample);
        }
        seal_chunk(&mut b, at);
        b
    }

    /// Every byte changed, and every length cut: the reader gives rows, a
    /// warning or an error, never a panic; a cut is never called damage.
    #[test]
    fn damaged_or_cut_recordings_are_errors_or_warnings_never_panics() {
        let good = framed();
        let read = |data: &[u8], lenient: bool| {
            let mut rows = 0;
            let r =
                crate::recording::read::read_reader("t", data, lenient, |item| -> Result<(), ()> {
                    rows += matches!(item, Item::Row(_)) as usize;
                    Ok(())
                });
            (r.is_ok(), rows)
        };
        assert_eq!(read(&good, false), (true, 3));
        for cut in 0..good.len() {
            let (ok, _) = read(&good[..cut], false);
            assert!(ok, "a recording cut at {cut} is not damaged");
        }
        for i in 0..good.len() {
            for bit in [0x01, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= bit;
                let _ = read(&bad, false);
                let _ = read(&bad, true);
                let _ = Decoder::default().chunk(&bad, &mut |_| -> Result<(), ()> { Ok(()) });
            }
        }
    }

    #[test]
    fn a_damaged_chunk_head_is_damage() {
        let mut b = Vec::new();
        let at = open_chunk(&mut b);
        b.extend_from_slice(b"payload");
        assert!(seal_chunk(&mut b, at));
        let head: [u8; CHUNK_HEAD] = b[..CHUNK_HEAD].try_into().unwrap();
        assert_eq!(parse_head(&head).unwrap().0, 7);
        for i in 0..CHUNK_HEAD {
            let mut bad = head;
            bad[i] ^= 0x04;
            assert!(parse_head(&bad).is_err(), "byte {i}");
        }
    }
}

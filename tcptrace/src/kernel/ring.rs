//! Reading the kernel's BPF ring buffers in place, through their memory
//! mappings.
//!
//! aya's reader publishes the consumer position after every entry. The
//! producing CPUs read that position on every reserve, so each publication
//! moves a cache line between the reader and every tracing CPU: at half a
//! million events a second that was a visible share of the program's time.
//! Here the position is published once per batch.
//!
//! The layout is the kernel's (kernel/bpf/ringbuf.c): the first page holds
//! the consumer position and is writable; the next page holds the producer
//! position, followed by the data area mapped twice in a row, so that no
//! entry ever wraps. Each entry starts with an 8-byte header whose length
//! word carries a busy bit (still being written) and a discard bit.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const BUSY: u32 = 1 << 31;
const DISCARD: u32 = 1 << 30;
const HEADER: u64 = 8;
/// Publish the consumer position at least this often while draining a
/// large backlog, so that producers get the space back before the end.
const PUBLISH_EVERY: u64 = 1 << 20;

pub struct Ring {
    consumer: NonNull<u8>,
    /// The producer page, then the data area twice.
    producer: NonNull<u8>,
    page: usize,
    size: usize,
}

// SAFETY: the mappings belong to this value alone; the kernel side is
// synchronised through the atomic positions and headers.
unsafe impl Send for Ring {}

impl Ring {
    /// Maps the ring buffer map `fd` of `size` bytes (its max_entries).
    pub fn map(fd: BorrowedFd<'_>, size: usize) -> io::Result<Ring> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        if !size.is_power_of_two() || size < page {
            return Err(io::Error::other(format!(
                "a ring buffer of {size} bytes is not a power-of-two number of pages"
            )));
        }
        let consumer = mmap(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = match mmap(fd, page + 2 * size, libc::PROT_READ, page) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: mapped just above with this length.
                unsafe { libc::munmap(consumer.as_ptr().cast(), page) };
                return Err(e);
            }
        };
        Ok(Ring {
            consumer,
            producer,
            page,
            size,
        })
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: the first 8 bytes of the consumer page, page aligned.
        unsafe { &*self.consumer.as_ptr().cast::<AtomicU64>() }
    }

    fn producer_pos(&self) -> &AtomicU64 {
        // SAFETY: as above, on the producer page.
        unsafe { &*self.producer.as_ptr().cast::<AtomicU64>() }
    }

    /// Calls `each` with every committed entry, oldest first, at most
    /// `limit` of them, and returns how many it saw. Stops at an entry still
    /// being written: it is complete on a later call.
    pub fn drain(&mut self, limit: usize, mut each: impl FnMut(&[u8])) -> usize {
        let data = self.page;
        let mask = self.size as u64 - 1;
        // Only this process moves the consumer position.
        let mut cons = self.consumer_pos().load(Ordering::Relaxed);
        let mut published = cons;
        let mut seen = 0;
        'outer: while seen < limit {
            // Acquire pairs with the kernel's release of the producer
            // position: the headers up to it are then visible.
            let prod = self.producer_pos().load(Ordering::Acquire);
            if cons >= prod {
                break;
            }
            while cons < prod && seen < limit {
                let at = data + (cons & mask) as usize;
                // SAFETY: `at` is inside the first copy of the data area and
                // 8-byte aligned (the kernel aligns every entry).
                let word = unsafe { &*self.producer.as_ptr().add(at).cast::<AtomicU32>() };
                // Acquire pairs with the kernel's commit of the entry.
                let len = word.load(Ordering::Acquire);
                if len & BUSY != 0 {
                    break 'outer;
                }
                let n = (len & !(BUSY | DISCARD)) as usize;
                if n > self.size {
                    // Cannot happen with a sane kernel; do not read past the
                    // mapping if it does.
                    break 'outer;
                }
                if len & DISCARD == 0 {
                    // SAFETY: the entry lies within the double mapping, which
                    // is 2 * size long after the producer page.
                    let body = unsafe {
                        std::slice::from_raw_parts(
                            self.producer.as_ptr().add(at + HEADER as usize),
                            n,
                        )
                    };
                    each(body);
                    seen += 1;
                }
                cons += (n as u64 + HEADER).next_multiple_of(8);
                if cons - published >= PUBLISH_EVERY {
                    self.consumer_pos().store(cons, Ordering::Release);
                    published = cons;
                }
            }
        }
        if cons != published {
            // Release: the entries are read before the kernel may reuse them.
            self.consumer_pos().store(cons, Ordering::Release);
        }
        seen
    }

    /// Bytes written but not yet read.
    pub fn backlog(&self) -> u64 {
        let prod = self.producer_pos().load(Ordering::Acquire);
        prod.saturating_sub(self.consumer_pos().load(Ordering::Relaxed))
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: both regions were mapped in `map` with these lengths.
        unsafe {
            libc::munmap(self.consumer.as_ptr().cast(), self.page);
            libc::munmap(self.producer.as_ptr().cast(), self.page + 2 * self.size);
        }
    }
}

fn mmap(fd: BorrowedFd<'_>, len: usize, prot: i32, offset: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh shared mapping of a map fd; the kernel checks the
    // length, protection and offset against the ring's layout.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned a null mapping"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring laid out as the kernel lays it out, in anonymous memory; the
    /// test plays the producer.
    struct FakeRing {
        ring: Ring,
        prod: u64,
    }

    impl FakeRing {
        fn new(size: usize) -> FakeRing {
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
            let anon = |len: usize| {
                // SAFETY: a fresh private anonymous mapping.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                assert_ne!(p, libc::MAP_FAILED);
                NonNull::new(p.cast::<u8>()).unwrap()
            };
            FakeRing {
                ring: Ring {
                    consumer: anon(page),
                    producer: anon(page + 2 * size),
                    page,
                    size,
                },
                prod: 0,
            }
        }

        /// Writes an entry with the given header flags and publishes it.
        fn push(&mut self, body: &[u8], flags: u32) {
            let at = self.ring.page + (self.prod as usize & (self.ring.size - 1));
            // SAFETY: inside the fake data area; entries stay 8-aligned.
            unsafe {
                let base = self.ring.producer.as_ptr().add(at);
                base.cast::<u32>().write(body.len() as u32 | flags);
                std::ptr::copy_nonoverlapping(body.as_ptr(), base.add(8), body.len());
            }
            self.prod += (body.len() as u64 + HEADER).next_multiple_of(8);
            self.ring.producer_pos().store(self.prod, Ordering::Release);
        }

        fn read(&mut self, limit: usize) -> Vec<Vec<u8>> {
            let mut got = Vec::new();
            self.ring.drain(limit, |b| got.push(b.to_vec()));
            got
        }
    }

    #[test]
    fn entries_come_out_in_order_and_discarded_ones_are_skipped() {
        let mut r = FakeRing::new(1 << 16);
        r.push(b"first", 0);
        r.push(b"dropped by the program", DISCARD);
        r.push(b"second entry", 0);
        assert_eq!(r.read(10), [b"first".to_vec(), b"second entry".to_vec()]);
        // The consumer position covers all three, 8-byte aligned.
        assert_eq!(r.ring.consumer_pos().load(Ordering::Relaxed), r.prod);
        assert_eq!(r.ring.backlog(), 0);
    }

    #[test]
    fn an_entry_still_being_written_stops_the_read_until_it_is_committed() {
        let mut r = FakeRing::new(1 << 16);
        r.push(b"done", 0);
        r.push(b"busy", BUSY);
        r.push(b"after", 0);
        assert_eq!(r.read(10), [b"done".to_vec()]);
        assert_eq!(r.ring.backlog(), 2 * 16);
        // The producer commits: clears the busy bit.
        let at = r.ring.page + 16;
        let word = unsafe { &*r.ring.producer.as_ptr().add(at).cast::<AtomicU32>() };
        word.store(4, Ordering::Release);
        assert_eq!(r.read(10), [b"busy".to_vec(), b"after".to_vec()]);
    }

    #[test]
    fn a_limit_leaves_the_rest_for_the_next_read() {
        let mut r = FakeRing::new(1 << 16);
        for i in 0..5u8 {
            r.push(&[i; 8], 0);
        }
        assert_eq!(r.read(2), [vec![0; 8], vec![1; 8]]);
        assert_eq!(r.read(10).len(), 3);
    }
}

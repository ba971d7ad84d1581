//! A hash for the maps on the per-event path. Their keys (kernel socket
//! addresses, socket ids, pids, 4-tuples) are not chosen by anyone who could
//! aim collisions at tcptrace, and they are hashed millions of times a
//! second: a multiply and a fold beat SipHash here.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

const K: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        // Fold the high bits down: socket addresses differ mostly there.
        self.0 ^ (self.0 >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(K);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
pub type FastSet<K> = HashSet<K, BuildHasherDefault<FastHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_addresses_spread_over_buckets() {
        // Kernel socket addresses: 8-byte aligned, close together.
        let mut low_bits = HashSet::new();
        for i in 0..4096u64 {
            let mut h = FastHasher::default();
            h.write_u64(0xffff_8880_1000_0000 + i * 0x800);
            low_bits.insert(h.finish() & 0xfff);
        }
        assert!(
            low_bits.len() > 2400,
            "{} distinct buckets of 4096",
            low_bits.len()
        );
    }
}

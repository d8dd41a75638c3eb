//! A `BuildHasher` for map keys that already are uniformly random: keyed
//! hashes (the rate limiter's per-process SipHash of a request's key) and
//! SHA-256 digests (API keys as stored). Hashing such a key again, with
//! SipHash as `std` does by default, only costs time; this one takes the
//! key's own bits.
//!
//! Only for keys an attacker cannot choose the bits of: a map keyed by
//! client-controlled text must keep a keyed hash.

use std::hash::{BuildHasherDefault, Hasher};

/// Passes a random key's bits through as its hash.
#[derive(Debug, Default, Clone, Copy)]
pub struct PreHashedHasher(u64);

/// Builds `PreHashedHasher`s for `HashMap` and `DashMap`.
pub type PreHashed = BuildHasherDefault<PreHashedHasher>;

impl Hasher for PreHashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // A digest: its first eight bytes are as random as any.
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = self.0.rotate_left(29) ^ v;
    }

    fn write_usize(&mut self, v: usize) {
        // Slices and arrays write their length first.
        self.write_u64(v as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn keys_keep_their_bits() {
        let b = PreHashed::default();
        assert_eq!(b.hash_one(0x1234_5678_9abc_def0u64), 0x1234_5678_9abc_def0);
        let a = [7u8; 32];
        let mut c = a;
        c[0] = 8;
        assert_ne!(b.hash_one(a), b.hash_one(c));
        assert_eq!(b.hash_one(a), b.hash_one([7u8; 32]));
    }

    #[test]
    fn works_as_a_map_hasher() {
        let mut m: std::collections::HashMap<u64, u32, PreHashed> = Default::default();
        for i in 0..1000u64 {
            m.insert(i.wrapping_mul(0x9e37_79b9_7f4a_7c15), i as u32);
        }
        for i in 0..1000u64 {
            assert_eq!(
                m.get(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                Some(&(i as u32))
            );
        }
    }
}

//! Helpers shared by shmback's cross-process tests (and the `shmback-test-peer` binary), and the
//! in-process S3 server of the uploader's S3 tests and the benchmarks ([`s3_server`]).

#[cfg(feature = "s3-server")]
pub mod s3_server;

/// The payload of frame `n` from the producer with nonce `nonce`: 16 bytes of identity, then a
/// pattern derived from both, `len` bytes in all (at least 16).
pub fn pattern(nonce: u64, n: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&nonce.to_le_bytes());
    v.extend_from_slice(&n.to_le_bytes());
    let mut x = nonce ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    v
}

/// Length of frame `n` (varied, so frames wrap at every offset of the ring).
pub fn frame_len(n: u64) -> usize {
    16 + (n.wrapping_mul(2_654_435_761) % 3000) as usize
}

/// A small deterministic generator (xorshift64*), so a failing run can be replayed from its seed.
pub struct Rng(pub u64);

impl Rng {
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A value in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}

//! Harnesses shared by the cargo-fuzz targets and the tests that replay their corpus.
//! Not part of the API.

use std::sync::Arc;

use crate::batch::BatchDecoder;
use crate::frame;
use crate::model::HeapMemory;
use crate::ring::{Consumer, RingConfig};

/// Treats `data` as a stream of `[kind: u8][len: u16 LE][payload]` records, decodes each and
/// feeds the frames to a [`BatchDecoder`]. Must never panic.
pub fn decode_stream(data: &[u8]) {
    let mut dec = BatchDecoder::new();
    let mut rest = data;
    while let [kind, l0, l1, tail @ ..] = rest {
        let len = (u16::from_le_bytes([*l0, *l1]) as usize).min(tail.len());
        let (payload, next) = tail.split_at(len);
        if let Ok(f) = frame::decode(*kind, payload) {
            let _ = dec.feed(f);
        }
        rest = next;
    }
}

/// Copies `data` into a 4 KiB heap ring as if a hostile producer had written it, publishes a
/// head derived from the first 8 bytes, and reads every frame the consumer will give. Must never
/// panic; every outcome is a frame or an error.
pub fn read_hostile_ring(data: &[u8]) {
    let mem = Arc::new(HeapMemory::new(4096));
    let (head_bytes, body) = data.split_at(data.len().min(8));
    let mut h = [0u8; 8];
    h[..head_bytes.len()].copy_from_slice(head_bytes);
    {
        // SAFETY: no other party uses this memory yet; the range is inside the ring.
        let mut w = unsafe { crate::ring::Memory::write(&*mem, 0, body.len().min(4096)) };
        w.copy_from_slice(&body[..body.len().min(4096)]);
    }
    crate::ring::Memory::shared(&*mem).head.store(u64::from_le_bytes(h), std::sync::atomic::Ordering::Release);
    let mut c = Consumer::new(mem, RingConfig::default());
    let mut dec = BatchDecoder::new();
    for _ in 0..1024 {
        match c.peek() {
            Ok(Some(f)) => {
                if let Ok(fr) = f.decode() {
                    let _ = dec.feed(fr);
                }
                f.release();
            }
            Ok(None) | Err(_) => break,
        }
    }
}

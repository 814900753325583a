//! Byte layout of the segment header: what lives where, and who writes it.
//!
//! Every field is an integer atomic. Two consequences matter:
//! - any byte content of the file is a valid `Header` value (a corrupt or hostile file can give
//!   wrong numbers, which attach validates, but never undefined behaviour);
//! - concurrent access from the two processes is always through atomic operations.
//!
//! Cache-line separation uses [`Line`], a fixed 128-byte alignment. `crossbeam_utils::CachePadded`
//! is not used here on purpose: its alignment depends on the target architecture, and a layout
//! shared between processes (possibly built differently) must not.
//!
//! The full description, with every ordering and its reason, is in `PROTOCOL.md`.

use crate::sync::{AtomicU32, AtomicU64};

/// First eight bytes of every segment: `SHMBACK` and a 0x01 byte.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SHMBACK\x01");
/// Layout version. Bumped only when a field moves or changes meaning; additions go into reserved
/// space or the reverse area and keep the version (see `PROTOCOL.md`, "Versioning").
pub const LAYOUT_VERSION: u32 = 1;
/// Bytes reserved for the header; the ring starts right after it (page aligned).
pub const HEADER_SIZE: u64 = 4096;

/// `Ident::state`: the file exists but is not initialised yet.
pub const STATE_UNINIT: u32 = 0;
/// `Ident::state`: somebody is (re)initialising the header.
pub const STATE_INITIALISING: u32 = 1;
/// `Ident::state`: the header is complete; published with Release after every other field.
pub const STATE_READY: u32 = 2;

/// `Ident::flags`: the segment was created group-readable/writable on purpose.
pub const FLAG_GROUP_SHARED: u32 = 1;

/// A 128-byte aligned slot, so that fields written by different sides never share a cache line
/// (128 covers the adjacent-line prefetcher of x86 and the 128-byte lines of Apple silicon).
#[repr(C, align(128))]
#[derive(Debug, Default)]
pub struct Line<T>(pub T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The segment header, at offset 0 of the file.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Header {
    /// Identity and geometry: written once (at initialisation), then only read.
    pub ident: Line<Ident>,
    /// Everything the ring protocol shares between the two sides.
    pub ring: RingShared,
}

/// Identity and geometry of a segment.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Ident {
    /// [`MAGIC`].
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`].
    pub version: AtomicU32,
    /// [`HEADER_SIZE`]; lets a reader check where the ring starts without knowing the version.
    pub header_size: AtomicU32,
    /// [`STATE_UNINIT`], [`STATE_INITIALISING`] or [`STATE_READY`].
    pub state: AtomicU32,
    /// `FLAG_*` bits.
    pub flags: AtomicU32,
    /// Bytes in the ring; a power of two.
    pub ring_capacity: AtomicU64,
    /// Bytes of the reverse area after the ring (the consumer's want-lists).
    pub reverse_capacity: AtomicU64,
    /// Bumped every time the segment is (re)initialised; a side that remembers another value
    /// knows the ring, sequences and acks it knew are gone.
    pub generation: AtomicU64,
    /// Wall-clock creation time, nanoseconds since the Unix epoch (diagnostics only).
    pub created_unix_ns: AtomicU64,
}

/// The part of the header the ring protocol uses. The loom models allocate exactly this struct.
#[repr(C)]
#[derive(Debug, Default)]
pub struct RingShared {
    /// Producer's write position (monotonic byte count; index = head % capacity).
    /// Written by the producer with Release once per batch of frames.
    pub head: Line<AtomicU64>,
    /// Consumer's read position (monotonic). Written by the consumer with Release.
    pub tail: Line<AtomicU64>,
    /// The producer's liveness record and wake word.
    pub producer: Line<Peer>,
    /// The consumer's liveness record and wake word.
    pub consumer: Line<Peer>,
    /// Consumer → producer: durable acks and rejections.
    pub reverse: Line<Reverse>,
    /// Batch bookkeeping shared by both sides.
    pub batch: Line<BatchState>,
}

/// One side's liveness record.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Peer {
    /// Wake word this side sleeps on: `(event count << 1) | sleeping`. The other side adds 2
    /// (RMW) after publishing anything this side may wait for, and futex-wakes if the sleeping bit
    /// was set. Only the owner sets or clears the sleeping bit.
    pub wake: AtomicU32,
    /// Pid of the attached process (0 when none ever attached). Diagnostics; liveness itself is
    /// the lock this side holds on the segment file.
    pub pid: AtomicU32,
    /// Start time of that process (clock ticks since boot, `/proc/<pid>/stat` field 22), so a
    /// recycled pid is not mistaken for the same process.
    pub start_ticks: AtomicU64,
    /// Bumped by every attach of this role. A side that saw epoch E at the start of a batch and
    /// sees another value later knows its peer was replaced mid-batch.
    pub epoch: AtomicU64,
}

/// The reverse channel: what the consumer tells the producer about its batches.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Reverse {
    /// Sequence of the last batch whose snapshot is stored in the backend. Written with Release
    /// after `durable_id`.
    pub durable_seq: AtomicU64,
    /// Snapshot id (32 bytes, little-endian words) of `durable_seq`.
    pub durable_id: [AtomicU64; 4],
    /// Sequence of the last batch the consumer rejected (no snapshot). Written with Release after
    /// `rejected_code`.
    pub rejected_seq: AtomicU64,
    /// Why `rejected_seq` was rejected (see `ring::RejectCode`).
    pub rejected_code: AtomicU32,
}

/// Batch bookkeeping, and the want-list exchange (PROTOCOL.md, "The want-list"): the consumer
/// says which codec it speaks, and answers a batch's manifest with the files it wants, as a bitmap
/// in the reverse area after the ring.
#[repr(C)]
#[derive(Debug, Default)]
pub struct BatchState {
    /// Sequence of the last BEGIN the producer wrote; a new producer continues from it.
    pub begun_seq: AtomicU64,
    /// Consumer: sequence of the batch the want-list in the reverse area answers. Stored with
    /// Release after the bitmap words and `want_len`; only grows.
    pub want_seq: AtomicU64,
    /// Consumer: files (manifest order) the bitmap covers; files from here on are all wanted.
    pub want_len: AtomicU64,
    /// Consumer: the newest frame codec version it speaks (2 answers want-lists), valid only while
    /// `codec_epoch` equals the consumer's `epoch` (an older consumer never writes these fields).
    pub consumer_codec: AtomicU32,
    /// Consumer: the attach epoch `consumer_codec` was written in. Stored with Release after it.
    pub codec_epoch: AtomicU64,
}

#[cfg(not(loom))]
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<Header>() as u64 <= HEADER_SIZE);
    assert!(align_of::<Header>() == 128);
    assert!(offset_of!(Header, ring) == 128);
    assert!(offset_of!(RingShared, head) == 0);
    assert!(offset_of!(RingShared, tail) == 128);
    assert!(offset_of!(RingShared, producer) == 256);
    assert!(offset_of!(RingShared, consumer) == 384);
    assert!(offset_of!(RingShared, reverse) == 512);
    assert!(offset_of!(RingShared, batch) == 640);
    assert!(offset_of!(Ident, magic) == 0);
    assert!(offset_of!(Ident, version) == 8);
    assert!(offset_of!(Ident, header_size) == 12);
    assert!(offset_of!(Ident, state) == 16);
    assert!(offset_of!(Ident, flags) == 20);
    assert!(offset_of!(Ident, ring_capacity) == 24);
    assert!(offset_of!(Ident, reverse_capacity) == 32);
    assert!(offset_of!(Ident, generation) == 40);
    assert!(offset_of!(Ident, created_unix_ns) == 48);
    assert!(offset_of!(Peer, wake) == 0);
    assert!(offset_of!(Peer, pid) == 4);
    assert!(offset_of!(Peer, start_ticks) == 8);
    assert!(offset_of!(Peer, epoch) == 16);
    assert!(offset_of!(Reverse, durable_seq) == 0);
    assert!(offset_of!(Reverse, durable_id) == 8);
    assert!(offset_of!(Reverse, rejected_seq) == 40);
    assert!(offset_of!(Reverse, rejected_code) == 48);
    assert!(offset_of!(BatchState, begun_seq) == 0);
    assert!(offset_of!(BatchState, want_seq) == 8);
    assert!(offset_of!(BatchState, want_len) == 16);
    assert!(offset_of!(BatchState, consumer_codec) == 24);
    assert!(offset_of!(BatchState, codec_epoch) == 32);
};

//! The SPSC byte ring: producer `reserve → write → commit`, consumer `peek → read → release`,
//! waiting, waking, and the durable-ack reverse channel.
//!
//! One cohesive thing despite its length: both halves of one protocol over the same positions
//! and memory orderings; split apart, the pairing of each Release with its Acquire would span
//! files.
//!
//! The protocol is written once, against [`Memory`]: the segment in /dev/shm implements it for
//! production, [`crate::model::HeapMemory`] implements it on the heap for loom, miri and proptest.
//!
//! Positions (`head`, `tail`) are monotonic byte counts; the index in the ring is
//! `position % capacity`. Frames are [`FRAME_ALIGN`]-aligned and always contiguous: a padding
//! frame fills the end of the ring when the next frame would not fit. The producer publishes
//! `head` with Release once per batch of frames (the commit point: nothing past `head` is
//! visible, so a producer killed mid-copy leaves nothing behind); the consumer publishes `tail`
//! with Release once per batch of released frames. Each side caches the other's position.

use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use crate::frame::{FRAME_ALIGN, FRAME_HEADER_LEN, Frame, FrameHeader, FrameKind, frame_size};
use crate::layout::RingShared;
use crate::sync::{AtomicU32, AtomicU64, Ordering};
use crate::want::WantList;

/// Which side of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Writes frames (the app, through the writer crate).
    Producer,
    /// Reads frames (the uploader).
    Consumer,
}

impl Role {
    /// The other side.
    pub fn peer(self) -> Role {
        match self {
            Role::Producer => Role::Consumer,
            Role::Consumer => Role::Producer,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Producer => "producer",
            Role::Consumer => "consumer",
        })
    }
}

/// Where the ring's shared words and bytes live, and how a side sleeps, wakes and checks its peer.
///
/// # Safety
/// Implementors guarantee that `shared()` stays valid for the life of `self`, that the byte region
/// has `capacity()` bytes (a power of two, at least 64), and that `wait` returns no later than
/// `timeout` after it was called (it may return earlier, spuriously).
pub unsafe trait Memory {
    /// A readable view of ring bytes.
    type Read<'a>: Deref<Target = [u8]>
    where
        Self: 'a;
    /// A writable view of ring bytes.
    type Write<'a>: DerefMut<Target = [u8]>
    where
        Self: 'a;

    /// The shared protocol words.
    fn shared(&self) -> &RingShared;
    /// Bytes in the ring.
    fn capacity(&self) -> usize;
    /// Ring bytes `[off, off + len)` for writing.
    ///
    /// # Safety
    /// `off + len <= capacity()`, and by the ring protocol no other party reads or writes the range
    /// until the caller publishes it.
    unsafe fn write(&self, off: usize, len: usize) -> Self::Write<'_>;
    /// Ring bytes `[off, off + len)` for reading.
    ///
    /// # Safety
    /// `off + len <= capacity()`, and by the ring protocol the range is published and not yet
    /// released, so its owner does not write it. (A hostile peer still might: callers copy what
    /// they validate before trusting it.)
    unsafe fn read(&self, off: usize, len: usize) -> Self::Read<'_>;
    /// Sleeps while `*word == expected`, at most `timeout` (futex semantics).
    fn wait(&self, word: &AtomicU32, expected: u32, timeout: Duration);
    /// Wakes every sleeper on `word`.
    fn wake(&self, word: &AtomicU32);
    /// Whether the process holding `role` is alive (holds its lock).
    fn peer_alive(&self, role: Role) -> bool;
    /// `Some(name of the memory)` once its backing was found truncated or replaced and the bytes
    /// now read as zeros (the segment's SIGBUS guard sets this); every ring operation then fails
    /// with [`RingError::SegmentDamaged`]. Memory that cannot be damaged keeps the default.
    fn truncated(&self) -> Option<String> {
        None
    }
    /// The reverse area after the ring, as 64-bit words (the consumer's want-lists). Memory
    /// without one keeps the default: no want-lists, every file is sent.
    fn reverse(&self) -> &[AtomicU64] {
        &[]
    }
}

// SAFETY: delegates every method to `T`, which upholds the contract.
unsafe impl<T: Memory> Memory for std::sync::Arc<T> {
    type Read<'a>
        = T::Read<'a>
    where
        Self: 'a;
    type Write<'a>
        = T::Write<'a>
    where
        Self: 'a;
    fn shared(&self) -> &RingShared {
        (**self).shared()
    }
    fn capacity(&self) -> usize {
        (**self).capacity()
    }
    unsafe fn write(&self, off: usize, len: usize) -> Self::Write<'_> {
        // SAFETY: the caller upholds `write`'s contract, which is the same for `T`.
        unsafe { (**self).write(off, len) }
    }
    unsafe fn read(&self, off: usize, len: usize) -> Self::Read<'_> {
        // SAFETY: the caller upholds `read`'s contract, which is the same for `T`.
        unsafe { (**self).read(off, len) }
    }
    fn wait(&self, word: &AtomicU32, expected: u32, timeout: Duration) {
        (**self).wait(word, expected, timeout)
    }
    fn wake(&self, word: &AtomicU32) {
        (**self).wake(word)
    }
    fn peer_alive(&self, role: Role) -> bool {
        (**self).peer_alive(role)
    }
    fn truncated(&self) -> Option<String> {
        (**self).truncated()
    }
    fn reverse(&self) -> &[AtomicU64] {
        (**self).reverse()
    }
}

/// How a side publishes and waits.
#[derive(Clone, Copy, Debug)]
pub struct RingConfig {
    /// Publish the position after this many committed (producer) or released (consumer) bytes.
    /// `None`: an eighth of the capacity, at most 256 KiB.
    pub publish_bytes: Option<usize>,
    /// Spin this long before sleeping on the futex.
    pub spin: Duration,
    /// Longest single futex sleep; also how often a sleeper checks that its peer is alive, so a
    /// dead peer is reported within about this long.
    pub tick: Duration,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            publish_bytes: None,
            spin: if cfg!(loom) { Duration::ZERO } else { Duration::from_micros(10) },
            // Under loom a sleep lasts until woken and the peer is checked before every sleep.
            tick: if cfg!(loom) { Duration::ZERO } else { Duration::from_millis(100) },
        }
    }
}

/// Why a ring operation did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The deadline passed; the peer is alive but did not make room / send / ack in time.
    #[error("timed out waiting for the {peer} (it is alive but made no progress)")]
    Timeout {
        /// The side that was waited for.
        peer: Role,
    },
    /// The peer process is gone (dead, or its lock released) or was replaced mid-batch.
    #[error("the {peer} is gone (process exited or was restarted); resend the batch once it is back")]
    PeerGone {
        /// The side that is gone.
        peer: Role,
    },
    /// A frame payload larger than the ring allows.
    #[error("frame payload of {len} bytes exceeds the ring's maximum of {max} (capacity / 2 minus header)")]
    FrameTooLarge {
        /// Requested payload.
        len: usize,
        /// Largest payload this ring takes.
        max: usize,
    },
    /// The published ring contents are not valid frames: the producer is broken or hostile.
    #[error("ring corrupt at position {pos}: {what} (the producer is broken or hostile; its batch is rejected)")]
    Corrupt {
        /// Position of the bad frame.
        pos: u64,
        /// What is wrong.
        what: String,
    },
    /// A frame could not be encoded.
    #[error(transparent)]
    Codec(#[from] crate::frame::CodecError),
    /// The segment's file was truncated (or replaced) under the mapping; what this side read since
    /// is zeros. Drop this side and attach again: a consumer attaching re-initialises the segment
    /// once its producer is gone. Nothing in the ring was acknowledged, so nothing is lost.
    #[error(
        "segment {segment} was truncated or replaced by its producer while mapped; its batch is rejected, \
         the segment is re-created on the next attach"
    )]
    SegmentDamaged {
        /// The segment (its path).
        segment: String,
    },
    /// The consumer rejected the batch (no snapshot was made).
    #[error("the uploader rejected batch {seq}: {code}")]
    Rejected {
        /// Batch sequence.
        seq: u64,
        /// Why.
        code: RejectCode,
    },
}

/// Why the consumer rejected a batch (stored in the reverse channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectCode {
    /// The batch's frames were invalid (see the uploader's log for the frame and the reason).
    Malformed,
    /// The producer aborted the batch, or it was torn by a producer restart.
    Aborted,
    /// The uploader could not store the snapshot (backend failure; see the uploader's log).
    StorageFailed,
    /// The uploader is shutting down and abandoned the batch.
    ShuttingDown,
    /// The batch is larger than the uploader's limits (entries, manifest memory, frame size).
    TooLarge,
    /// The producer stalled: no frame for longer than the uploader's idle limit.
    Stalled,
    /// A code this build does not know.
    Other(u32),
}

impl RejectCode {
    /// The wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            RejectCode::Malformed => 1,
            RejectCode::Aborted => 2,
            RejectCode::StorageFailed => 3,
            RejectCode::ShuttingDown => 4,
            RejectCode::TooLarge => 5,
            RejectCode::Stalled => 6,
            RejectCode::Other(c) => c,
        }
    }
    /// From the wire value.
    pub fn from_u32(c: u32) -> Self {
        match c {
            1 => RejectCode::Malformed,
            2 => RejectCode::Aborted,
            3 => RejectCode::StorageFailed,
            4 => RejectCode::ShuttingDown,
            5 => RejectCode::TooLarge,
            6 => RejectCode::Stalled,
            c => RejectCode::Other(c),
        }
    }
}

impl std::fmt::Display for RejectCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectCode::Malformed => f.write_str("malformed frames"),
            RejectCode::Aborted => f.write_str("batch aborted or torn"),
            RejectCode::StorageFailed => f.write_str("storing the snapshot failed"),
            RejectCode::ShuttingDown => f.write_str("uploader shutting down"),
            RejectCode::TooLarge => f.write_str("batch over the uploader's limits"),
            RejectCode::Stalled => f.write_str("producer stalled past the uploader's idle limit"),
            RejectCode::Other(c) => write!(f, "reason code {c}"),
        }
    }
}

/// Largest payload a ring of `capacity` bytes takes in one frame. Half the ring, so that a frame
/// plus the padding before it always fits once the consumer has drained: progress is guaranteed.
pub const fn max_payload(capacity: usize) -> usize {
    capacity / 2 - FRAME_HEADER_LEN
}

fn publish_bytes(cfg: &RingConfig, capacity: usize) -> u64 {
    cfg.publish_bytes.unwrap_or((capacity / 8).min(256 << 10)).max(FRAME_ALIGN) as u64
}

/// Bumps the peer's wake word and wakes it if it sleeps. The RMW orders this after the position
/// store that precedes it: a sleeper whose own RMW on the word comes later sees the position.
fn notify<M: Memory>(mem: &M, word: &AtomicU32) {
    if word.fetch_add(2, Ordering::AcqRel) & 1 != 0 {
        mem.wake(word);
    }
}

/// Whether a sleeper gives up when its peer is dead (`Check`: every `tick`), or is waiting for
/// the peer to appear (`Ignore`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Liveness {
    Check,
    Ignore,
}

/// Spin, then sleep on `me` (this side's wake word) until `ready()`, the deadline, or the peer's
/// death. `ready` must do Acquire loads of what the peer publishes before notifying.
fn block_until<M: Memory>(
    mem: &M,
    cfg: &RingConfig,
    me: &AtomicU32,
    peer: Role,
    liveness: Liveness,
    deadline: Option<Instant>,
    mut ready: impl FnMut() -> bool,
) -> Result<(), RingError> {
    if ready() {
        return Ok(());
    }
    if !cfg.spin.is_zero() {
        let start = Instant::now();
        while start.elapsed() < cfg.spin {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            if ready() {
                return Ok(());
            }
        }
    }
    let mut last_check = Instant::now();
    loop {
        // Announce the sleep with an RMW, then re-check: a notifier whose RMW is ordered before
        // ours made its position visible to us; one ordered after ours sees the bit and wakes us.
        let armed = me.fetch_or(1, Ordering::AcqRel) | 1;
        if ready() {
            me.fetch_and(!1, Ordering::Relaxed);
            return Ok(());
        }
        // Zeros read from a truncated segment can look like "nothing yet" forever.
        if let Err(e) = intact(mem) {
            me.fetch_and(!1, Ordering::Relaxed);
            return Err(e);
        }
        let now = Instant::now();
        if liveness == Liveness::Check && now.duration_since(last_check) >= cfg.tick {
            last_check = now;
            if !mem.peer_alive(peer) {
                me.fetch_and(!1, Ordering::Relaxed);
                return if ready() { Ok(()) } else { Err(RingError::PeerGone { peer }) };
            }
        }
        let mut sleep = cfg.tick;
        if let Some(d) = deadline {
            if now >= d {
                me.fetch_and(!1, Ordering::Relaxed);
                return if ready() { Ok(()) } else { Err(RingError::Timeout { peer }) };
            }
            sleep = sleep.min(d - now);
        }
        mem.wait(me, armed, sleep);
        me.fetch_and(!1, Ordering::Relaxed);
        if ready() {
            return Ok(());
        }
    }
}

/// `SegmentDamaged` once the memory was found truncated: whatever was read since is zeros.
fn intact<M: Memory>(mem: &M) -> Result<(), RingError> {
    match mem.truncated() {
        None => Ok(()),
        Some(segment) => Err(RingError::SegmentDamaged { segment }),
    }
}

fn deadline(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

struct ProducerState {
    capacity: usize,
    /// Committed position (frames written up to here).
    head: u64,
    /// Last published head.
    published: u64,
    /// Last tail read from the consumer.
    cached_tail: u64,
    publish_bytes: u64,
}

impl ProducerState {
    fn free(&self) -> u64 {
        (self.capacity as u64).saturating_sub(self.head.wrapping_sub(self.cached_tail))
    }

    /// Takes a tail the consumer published, after checking it: the tail is shared memory, and a
    /// broken or hostile consumer must cause an error here, not an overflow.
    fn observe_tail(&mut self, tail: u64) -> Result<(), RingError> {
        let behind = self.head.wrapping_sub(tail);
        let moved = tail.wrapping_sub(self.cached_tail);
        if behind > self.capacity as u64 || moved > self.capacity as u64 || !tail.is_multiple_of(FRAME_ALIGN as u64) {
            return Err(RingError::Corrupt {
                pos: tail,
                what: format!(
                    "the consumer published tail {tail}, outside the written range [{}, {}]: the consumer \
                     is broken or the segment was reset under us; re-attach",
                    self.head.saturating_sub(self.capacity as u64),
                    self.head
                ),
            });
        }
        self.cached_tail = tail;
        Ok(())
    }

    /// Bytes needed for a frame of `total` bytes at the current head (including padding).
    fn needed(&self, total: usize) -> u64 {
        let idx = (self.head % self.capacity as u64) as usize;
        let contiguous = self.capacity - idx;
        if total <= contiguous { total as u64 } else { (contiguous + total) as u64 }
    }
}

/// The producing half of a ring. One per segment: attach makes sure of it.
pub struct Producer<M: Memory> {
    mem: M,
    st: ProducerState,
    cfg: RingConfig,
}

/// Reserved, not yet visible space for one frame's payload. Write it, then [`Reservation::commit`].
/// Dropping it uncommitted leaves nothing visible.
pub struct Reservation<'a, M: Memory> {
    mem: &'a M,
    st: &'a mut ProducerState,
    kind: FrameKind,
    off: usize,
    buf: M::Write<'a>,
}

impl<M: Memory> Producer<M> {
    /// The producing half over `mem`, continuing from the positions published there.
    pub fn new(mem: M, cfg: RingConfig) -> Self {
        let capacity = mem.capacity();
        let sh = mem.shared();
        let head = sh.head.load(Ordering::Acquire);
        let tail = sh.tail.load(Ordering::Acquire);
        // Until the tail is validated by `observe_tail`, assume the ring is full: the first
        // reserve then reads and checks it.
        let full = head.wrapping_sub(capacity as u64);
        let mut st = ProducerState {
            capacity,
            head,
            published: head,
            cached_tail: full,
            publish_bytes: publish_bytes(&cfg, capacity),
        };
        if st.observe_tail(tail).is_err() {
            st.cached_tail = full;
        }
        Self { mem, st, cfg }
    }

    /// The memory this producer writes to.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Bytes in the ring.
    pub fn capacity(&self) -> usize {
        self.st.capacity
    }

    /// Largest payload one frame can carry.
    pub fn max_payload(&self) -> usize {
        max_payload(self.st.capacity)
    }

    /// Reserves room for a frame of `kind` with a `len`-byte payload, waiting up to `timeout`
    /// for the consumer to make room.
    pub fn reserve(&mut self, kind: FrameKind, len: usize, timeout: Duration) -> Result<Reservation<'_, M>, RingError> {
        self.reserve_until(kind, len, deadline(timeout))
    }

    /// Like [`Producer::reserve`] but returns `Ok(None)` instead of waiting.
    pub fn try_reserve(&mut self, kind: FrameKind, len: usize) -> Result<Option<Reservation<'_, M>>, RingError> {
        self.maybe_publish();
        let total = self.check_len(len)?;
        let need = self.st.needed(total);
        if self.st.free() < need {
            self.st.observe_tail(self.mem.shared().tail.load(Ordering::Acquire))?;
            if self.st.free() < need {
                intact(&self.mem)?;
                return Ok(None);
            }
        }
        intact(&self.mem)?;
        Ok(Some(self.reserve_unchecked(kind, len, total)))
    }

    fn check_len(&self, len: usize) -> Result<usize, RingError> {
        let max = self.max_payload();
        if len > max {
            return Err(RingError::FrameTooLarge { len, max });
        }
        Ok(frame_size(len))
    }

    fn reserve_until(
        &mut self,
        kind: FrameKind,
        len: usize,
        deadline: Option<Instant>,
    ) -> Result<Reservation<'_, M>, RingError> {
        self.maybe_publish();
        let total = self.check_len(len)?;
        let need = self.st.needed(total);
        if self.st.free() < need {
            self.st.observe_tail(self.mem.shared().tail.load(Ordering::Acquire))?;
            if self.st.free() < need {
                // The consumer may be waiting for what we committed: publish before sleeping.
                self.publish();
                let (mem, st) = (&self.mem, &mut self.st);
                let sh = mem.shared();
                let mut bad = None;
                block_until(mem, &self.cfg, &sh.producer.wake, Role::Consumer, Liveness::Check, deadline, || {
                    if let Err(e) = st.observe_tail(sh.tail.load(Ordering::Acquire)) {
                        bad = Some(e);
                    }
                    bad.is_some() || st.free() >= need
                })?;
                if let Some(e) = bad {
                    intact(&self.mem)?;
                    return Err(e);
                }
            }
        }
        intact(&self.mem)?;
        Ok(self.reserve_unchecked(kind, len, total))
    }

    /// Room is known to be free: write padding if needed and hand out the payload bytes.
    fn reserve_unchecked(&mut self, kind: FrameKind, len: usize, total: usize) -> Reservation<'_, M> {
        let cap = self.st.capacity;
        let mut idx = (self.st.head % cap as u64) as usize;
        let contiguous = cap - idx;
        if total > contiguous {
            let pad = FrameHeader::new(FrameKind::Padding, (contiguous - FRAME_HEADER_LEN) as u32);
            // SAFETY: [idx, idx + 8) lies inside the ring (idx is 8-aligned and < cap) and between
            // head and cached_tail + capacity, which the consumer has released.
            unsafe { self.mem.write(idx, FRAME_HEADER_LEN) }.copy_from_slice(&pad.to_bytes());
            self.st.head += contiguous as u64;
            idx = 0;
        }
        let off = idx + FRAME_HEADER_LEN;
        // SAFETY: [off, off + len) is inside the ring (total fits in the contiguous room checked
        // above) and in the free part that only the producer may touch until it publishes.
        let buf = unsafe { self.mem.write(off, len) };
        Reservation { mem: &self.mem, st: &mut self.st, kind, off, buf }
    }

    /// Encodes `frame` into the ring (waiting up to `timeout` for room).
    pub fn send(&mut self, frame: &Frame<'_>, timeout: Duration) -> Result<(), RingError> {
        frame.validate()?;
        let mut r = self.reserve(frame.kind(), frame.encoded_len(), timeout)?;
        frame.encode(&mut r)?;
        r.commit();
        intact(&self.mem)
    }

    /// `Err(SegmentDamaged)` if the segment was found truncated under this side (every other
    /// operation returning a `Result` checks this too).
    pub fn check_intact(&self) -> Result<(), RingError> {
        intact(&self.mem)
    }

    /// Publishes every committed frame and wakes the consumer if it sleeps.
    pub fn flush(&mut self) {
        self.publish();
    }

    fn publish(&mut self) {
        publish_head(&self.mem, &mut self.st);
    }

    /// Publishes once a batch of frames is committed, or early when the consumer sleeps (a Relaxed
    /// peek at its wake bit: a stale value delays publication, never loses it).
    fn maybe_publish(&mut self) {
        let pending = self.st.head - self.st.published;
        if pending >= self.st.publish_bytes
            || (pending > 0 && self.mem.shared().consumer.wake.load(Ordering::Relaxed) & 1 != 0)
        {
            self.publish();
        }
    }

    /// Committed but unpublished bytes.
    pub fn unpublished(&self) -> u64 {
        self.st.head - self.st.published
    }

    /// Stream position after the last committed frame.
    pub fn position(&self) -> u64 {
        self.st.head
    }

    /// Stream position up to which frames are published (visible to the consumer).
    pub fn published_position(&self) -> u64 {
        self.st.published
    }

    /// Sequence the next batch should use (one past the last BEGIN any producer recorded).
    pub fn next_batch_seq(&self) -> u64 {
        self.mem.shared().batch.begun_seq.load(Ordering::Acquire) + 1
    }

    /// Records that a BEGIN with `seq` was written, so a restarted producer continues after it.
    pub fn record_begun(&self, seq: u64) {
        self.mem.shared().batch.begun_seq.store(seq, Ordering::Release);
    }

    /// The consumer's attach epoch now; compare it with [`Producer::wait_durable`]'s argument to
    /// learn that the consumer was replaced mid-batch. Take it for a batch only once a consumer is
    /// attached ([`Producer::wait_for_consumer`]), before BEGIN.
    pub fn consumer_epoch(&self) -> u64 {
        self.mem.shared().consumer.epoch.load(Ordering::Acquire)
    }

    /// Whether a consumer is attached now.
    pub fn consumer_alive(&self) -> bool {
        self.mem.peer_alive(Role::Consumer)
    }

    /// Waits up to `timeout` for a consumer to be attached (an attach wakes this side), for a
    /// producer that starts before its uploader. `Timeout` if none came.
    pub fn wait_for_consumer(&mut self, timeout: Duration) -> Result<(), RingError> {
        let mem = &self.mem;
        let ready = || mem.peer_alive(Role::Consumer);
        block_until(
            mem,
            &self.cfg,
            &mem.shared().producer.wake,
            Role::Consumer,
            Liveness::Ignore,
            deadline(timeout),
            ready,
        )?;
        intact(mem)
    }

    /// Whether the attached consumer answers want-lists (it wrote codec version 2 or newer for its
    /// current attach epoch). Ask only then: an older consumer would reject the WANT frame.
    pub fn consumer_answers_want_lists(&self) -> bool {
        let sh = self.mem.shared();
        let epoch = sh.consumer.epoch.load(Ordering::Acquire);
        !self.mem.reverse().is_empty()
            && sh.batch.codec_epoch.load(Ordering::Acquire) == epoch
            && sh.batch.consumer_codec.load(Ordering::Relaxed) >= 2
    }

    /// Publishes the manifest sent so far and waits for the consumer's want-list for batch `seq`
    /// of `files` files. Everything read from the reverse area is checked: an answer for another
    /// batch, a length past the batch's files or the area is `Corrupt` (the caller then sends
    /// every file); a consumer replaced since `consumer_epoch` is `PeerGone` (resend); a
    /// rejection of the batch is `Rejected` (nothing more to send).
    pub fn wait_want(
        &mut self,
        seq: u64,
        consumer_epoch: u64,
        files: u64,
        timeout: Duration,
    ) -> Result<WantList, RingError> {
        self.publish();
        let sh = self.mem.shared();
        let gone = RingError::PeerGone { peer: Role::Consumer };
        let mut outcome: Option<Result<u64, RingError>> = None;
        block_until(
            &self.mem,
            &self.cfg,
            &sh.producer.wake,
            Role::Consumer,
            Liveness::Check,
            deadline(timeout),
            || {
                let answered = sh.batch.want_seq.load(Ordering::Acquire);
                if sh.consumer.epoch.load(Ordering::Acquire) != consumer_epoch {
                    outcome = Some(Err(gone.clone()));
                } else if answered >= seq {
                    outcome = Some(Ok(answered));
                } else if sh.reverse.rejected_seq.load(Ordering::Acquire) >= seq {
                    let code = RejectCode::from_u32(sh.reverse.rejected_code.load(Ordering::Relaxed));
                    outcome = Some(Err(RingError::Rejected { seq, code }));
                }
                outcome.is_some()
            },
        )?;
        let answered = outcome.unwrap_or(Err(gone))?;
        let area = self.mem.reverse();
        let len = sh.batch.want_len.load(Ordering::Relaxed);
        let bad = if answered != seq {
            Some(format!("the want-list answers batch {answered}, this batch is {seq}"))
        } else if len > files || len > area.len() as u64 * 64 {
            Some(format!(
                "the want-list covers {len} files; the batch has {files} and the reverse area holds {}",
                area.len() as u64 * 64
            ))
        } else {
            None
        };
        if let Some(what) = bad {
            return Err(RingError::Corrupt { pos: 0, what: format!("{what} (the consumer is broken or hostile)") });
        }
        let words = area.iter().take(len.div_ceil(64) as usize).map(|w| w.load(Ordering::Relaxed)).collect();
        // Words read from zero pages are no answer.
        intact(&self.mem)?;
        if sh.consumer.epoch.load(Ordering::Acquire) != consumer_epoch {
            return Err(RingError::PeerGone { peer: Role::Consumer });
        }
        Ok(WantList::from_words(len, words))
    }

    /// Waits until the consumer reports batch `seq` durable (returns the snapshot id) or rejected.
    /// `consumer_epoch` is the value of [`Producer::consumer_epoch`] when the batch began: if the
    /// consumer was replaced since, the batch is lost with it and this returns `PeerGone`.
    pub fn wait_durable(&mut self, seq: u64, consumer_epoch: u64, timeout: Duration) -> Result<[u8; 32], RingError> {
        self.publish();
        let sh = self.mem.shared();
        let mut outcome = None;
        let gone = RingError::PeerGone { peer: Role::Consumer };
        block_until(
            &self.mem,
            &self.cfg,
            &sh.producer.wake,
            Role::Consumer,
            Liveness::Check,
            deadline(timeout),
            || {
                if sh.reverse.durable_seq.load(Ordering::Acquire) >= seq {
                    outcome = Some(Ok(()));
                } else if sh.reverse.rejected_seq.load(Ordering::Acquire) >= seq {
                    let code = RejectCode::from_u32(sh.reverse.rejected_code.load(Ordering::Relaxed));
                    outcome = Some(Err(RingError::Rejected { seq, code }));
                } else if sh.consumer.epoch.load(Ordering::Acquire) != consumer_epoch {
                    outcome = Some(Err(gone.clone()));
                }
                outcome.is_some()
            },
        )?;
        match outcome {
            Some(Ok(())) => {
                let mut id = [0u8; 32];
                for (chunk, word) in id.chunks_exact_mut(8).zip(&sh.reverse.durable_id) {
                    chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
                }
                // An id read from zero pages is no acknowledgement.
                intact(&self.mem)?;
                Ok(id)
            }
            Some(Err(e)) => Err(e),
            None => Err(gone),
        }
    }
}

fn publish_head<M: Memory>(mem: &M, st: &mut ProducerState) {
    if st.head != st.published {
        let sh = mem.shared();
        sh.head.store(st.head, Ordering::Release);
        st.published = st.head;
        notify(mem, &sh.consumer.wake);
    }
}

impl<M: Memory> Reservation<'_, M> {
    /// Makes the whole reservation one frame.
    pub fn commit(self) {
        let len = self.buf.len();
        self.commit_len(len);
    }

    /// Makes the first `used` bytes one frame (e.g. after a short `read()` into the reservation).
    ///
    /// # Panics
    /// If `used` is larger than the reservation (a caller bug, never input-dependent).
    pub fn commit_len(self, used: usize) {
        assert!(used <= self.buf.len(), "committing {used} bytes of a {}-byte reservation", self.buf.len());
        let Reservation { mem, st, kind, off, buf } = self;
        drop(buf);
        let header = FrameHeader::new(kind, used as u32);
        // The header goes in last; it becomes visible to the consumer only with the next head
        // publication (Release), which is the commit point.
        // SAFETY: [off - 8, off) is the header slot reserved together with the payload.
        unsafe { mem.write(off - FRAME_HEADER_LEN, FRAME_HEADER_LEN) }.copy_from_slice(&header.to_bytes());
        st.head += frame_size(used) as u64;
        // No publication here: `self` (and with it the payload borrow) is a live argument of this
        // call, so the bytes must not become readable before it returns. The next reserve, flush
        // or wait publishes.
    }

    /// The frame type being written.
    pub fn kind(&self) -> FrameKind {
        self.kind
    }
}

impl<M: Memory> Deref for Reservation<'_, M> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl<M: Memory> DerefMut for Reservation<'_, M> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

struct ConsumerState {
    capacity: usize,
    /// Position of the next unread frame.
    tail: u64,
    /// Last published tail.
    published: u64,
    /// Last head read from the producer.
    cached_head: u64,
    publish_bytes: u64,
}

/// The consuming half of a ring.
pub struct Consumer<M: Memory> {
    mem: M,
    st: ConsumerState,
    cfg: RingConfig,
}

/// One readable frame. Read its payload, then [`FrameRef::release`] it; dropping it without
/// release leaves it to be returned again by the next `peek`.
pub struct FrameRef<'a, M: Memory + 'a> {
    st: &'a mut ConsumerState,
    kind: u8,
    pos: u64,
    payload: M::Read<'a>,
    total: usize,
}

impl<'a, M: Memory + 'a> FrameRef<'a, M> {
    /// The frame type byte (unknown values are the codec's to reject).
    pub fn kind(&self) -> u8 {
        self.kind
    }
    /// Position of the frame in the ring stream.
    pub fn position(&self) -> u64 {
        self.pos
    }
    /// The payload, in the ring (zero-copy). Untrusted: the producer could still change it.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
    /// Decodes the payload.
    pub fn decode(&self) -> Result<Frame<'_>, crate::frame::CodecError> {
        crate::frame::decode(self.kind, &self.payload)
    }
    /// Consumes the frame; its space returns to the producer at the next tail publication.
    pub fn release(self) {
        let FrameRef { st, payload, total, .. } = self;
        drop(payload);
        st.tail += total as u64;
        // Published by the next peek (or wait/flush): the payload borrow is still a live argument
        // of this call, so the producer must not be given the bytes yet.
    }
}

fn publish_tail<M: Memory>(mem: &M, st: &mut ConsumerState) {
    if st.tail != st.published {
        let sh = mem.shared();
        sh.tail.store(st.tail, Ordering::Release);
        st.published = st.tail;
        notify(mem, &sh.producer.wake);
    }
}

impl<M: Memory> Consumer<M> {
    /// The consuming half over `mem`, continuing from the positions published there.
    pub fn new(mem: M, cfg: RingConfig) -> Self {
        let capacity = mem.capacity();
        let sh = mem.shared();
        let tail = sh.tail.load(Ordering::Acquire);
        let cached_head = sh.head.load(Ordering::Acquire);
        let st = ConsumerState {
            capacity,
            tail,
            published: tail,
            cached_head,
            publish_bytes: publish_bytes(&cfg, capacity),
        };
        Self { mem, st, cfg }
    }

    /// Tells producers that this consumer answers want-lists (PROTOCOL.md, "The want-list"):
    /// records codec version 2 for the epoch it attached in. A consumer that calls this must
    /// answer every batch that sends WANT ([`Consumer::publish_want`]); one that does not call
    /// it is never asked. Another consumer attaching later bumps the epoch, so an older build
    /// that never writes these fields is not asked either. No effect without a reverse area.
    pub fn answer_want_lists(&mut self) {
        let sh = self.mem.shared();
        if !self.mem.reverse().is_empty() {
            let epoch = sh.consumer.epoch.load(Ordering::Acquire);
            sh.batch.consumer_codec.store(u32::from(crate::frame::CODEC_VERSION), Ordering::Relaxed);
            // Release: the codec is visible to a producer that acquires the epoch it names.
            sh.batch.codec_epoch.store(epoch, Ordering::Release);
        }
    }

    /// Answers batch `seq`'s WANT: writes `list` into the reverse area, cut to what the area
    /// holds (the files past it are wanted), then `want_len` and, with Release, `want_seq`, and
    /// wakes the producer. Returns the list as published, which is what the batch's WANTED must
    /// name; [`WantList::all`] when nothing could be published (no reverse area, or `seq` not
    /// above the last answered one: the producer then times out waiting and sends everything).
    pub fn publish_want(&mut self, seq: u64, list: &WantList) -> WantList {
        let area = self.mem.reverse();
        let sh = self.mem.shared();
        if area.is_empty() || seq <= sh.batch.want_seq.load(Ordering::Acquire) {
            return WantList::all();
        }
        let list = list.truncated(area.len() as u64 * 64);
        for (slot, word) in area.iter().zip(list.words()) {
            slot.store(*word, Ordering::Relaxed);
        }
        sh.batch.want_len.store(list.covered(), Ordering::Relaxed);
        // Release: the words and the length above are visible to a producer that acquires `seq`.
        sh.batch.want_seq.fetch_max(seq, Ordering::Release);
        notify(&self.mem, &sh.producer.wake);
        list
    }

    /// The memory this consumer reads from.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Bytes in the ring.
    pub fn capacity(&self) -> usize {
        self.st.capacity
    }

    /// The next frame if one is published, without waiting. Padding is skipped here.
    /// A structurally invalid ring returns [`RingError::Corrupt`] after discarding everything
    /// published (the producer must start a new batch).
    pub fn peek(&mut self) -> Result<Option<FrameRef<'_, M>>, RingError> {
        if self.st.tail - self.st.published >= self.st.publish_bytes {
            publish_tail(&self.mem, &mut self.st);
        }
        let cap = self.st.capacity;
        loop {
            if self.st.tail == self.st.cached_head {
                self.st.cached_head = self.mem.shared().head.load(Ordering::Acquire);
                if self.st.tail == self.st.cached_head {
                    // Drained: give the producer all the room before it has to ask.
                    publish_tail(&self.mem, &mut self.st);
                    intact(&self.mem)?;
                    return Ok(None);
                }
            }
            let pos = self.st.tail;
            let avail = self.st.cached_head.wrapping_sub(pos);
            let idx = (pos % cap as u64) as usize;
            let contiguous = cap - idx;
            let bad = if !pos.is_multiple_of(FRAME_ALIGN as u64) {
                // Only an unaligned head, once discarded, leaves the tail here; reading a frame
                // header from it could cross the ring's end. The segment must be re-created.
                Some(format!("tail {pos} is not {FRAME_ALIGN}-byte aligned (an earlier head was not)"))
            } else if avail > cap as u64 {
                Some(format!("head {} is more than the capacity ({cap}) ahead of tail", self.st.cached_head))
            } else if !avail.is_multiple_of(FRAME_ALIGN as u64) {
                Some(format!("head {} is not {FRAME_ALIGN}-byte aligned", self.st.cached_head))
            } else {
                None
            };
            if let Some(what) = bad {
                return Err(self.corrupt(pos, what));
            }
            // SAFETY: idx is 8-aligned (pos is, checked above, and cap is a power of two >= 8) and
            // < cap, so [idx, idx + 8) is inside the ring; it is published (avail >= 8, as avail
            // is a non-zero multiple of 8) and not released.
            let header = FrameHeader::read(&unsafe { self.mem.read(idx, FRAME_HEADER_LEN) });
            let Some(header) = header else {
                return Err(self.corrupt(pos, "unreadable frame header".into()));
            };
            if let Err(what) = header.check_version() {
                return Err(self.corrupt(pos, what));
            }
            if header.flags != 0 {
                return Err(self.corrupt(pos, format!("frame header flags {:#x}, expected 0", header.flags)));
            }
            let len = header.len as usize;
            let total = frame_size(len);
            if total as u64 > avail || total > contiguous {
                let what = format!("frame of {len} payload bytes overruns the published data or the ring end");
                return Err(self.corrupt(pos, what));
            }
            if header.kind == FrameKind::Padding as u8 {
                if total != contiguous {
                    return Err(self.corrupt(pos, "padding frame does not end at the ring end".into()));
                }
                self.st.tail += total as u64;
                continue;
            }
            // The header just copied must not come from zero pages.
            intact(&self.mem)?;
            // SAFETY: checked above: [idx + 8, idx + 8 + len) is inside the ring and published.
            let payload = unsafe { self.mem.read(idx + FRAME_HEADER_LEN, len) };
            return Ok(Some(FrameRef { st: &mut self.st, kind: header.kind, pos, payload, total }));
        }
    }

    fn corrupt(&mut self, pos: u64, what: String) -> RingError {
        self.discard_published();
        // Zeros from a truncated segment look corrupt; say what really happened.
        match intact(&self.mem) {
            Ok(()) => RingError::Corrupt { pos, what },
            Err(e) => e,
        }
    }

    /// Drops everything published so far (after corruption, or to skip a torn batch).
    pub fn discard_published(&mut self) {
        self.st.cached_head = self.mem.shared().head.load(Ordering::Acquire);
        self.st.tail = self.st.cached_head;
        publish_tail(&self.mem, &mut self.st);
    }

    /// Waits up to `timeout` until a frame is readable. `PeerGone` means the producer is dead and
    /// the ring is drained: whatever batch it had open is torn.
    pub fn wait(&mut self, timeout: Duration) -> Result<(), RingError> {
        intact(&self.mem)?;
        if self.st.tail != self.st.cached_head {
            return Ok(());
        }
        publish_tail(&self.mem, &mut self.st);
        let (mem, st) = (&self.mem, &mut self.st);
        let sh = mem.shared();
        block_until(mem, &self.cfg, &sh.consumer.wake, Role::Producer, Liveness::Check, deadline(timeout), || {
            st.cached_head = sh.head.load(Ordering::Acquire);
            st.cached_head != st.tail
        })?;
        intact(mem)
    }

    /// Waits up to `timeout` for the next frame and returns it.
    pub fn recv(&mut self, timeout: Duration) -> Result<FrameRef<'_, M>, RingError> {
        let end = deadline(timeout);
        loop {
            let left = end.map_or(timeout, |e| e.saturating_duration_since(Instant::now()));
            self.wait(left)?;
            // A published run that was only padding leaves nothing to return: wait again.
            if self.peek_is_some()? {
                break;
            }
        }
        let pos = self.st.tail;
        // Only a producer rewriting published bytes can make the frame vanish between peeks
        // (`peek` itself reports a segment truncated meanwhile).
        self.peek()?.ok_or_else(|| RingError::Corrupt { pos, what: "published frame changed while being read".into() })
    }

    fn peek_is_some(&mut self) -> Result<bool, RingError> {
        Ok(self.peek()?.is_some())
    }

    /// Publishes released space now (instead of at the next threshold).
    pub fn flush(&mut self) {
        publish_tail(&self.mem, &mut self.st);
    }

    /// The sequence the producer last recorded as begun, if neither a durable nor a rejected
    /// acknowledgement answers it yet (a batch whose BEGIN itself could not be read).
    pub fn unanswered_begun_seq(&self) -> Option<u64> {
        let sh = self.mem.shared();
        let begun = sh.batch.begun_seq.load(Ordering::Acquire);
        let answered =
            sh.reverse.durable_seq.load(Ordering::Acquire).max(sh.reverse.rejected_seq.load(Ordering::Acquire));
        (begun > answered).then_some(begun)
    }

    /// `Some` once this ring can no longer be used: a hostile producer published a head that is
    /// not frame-aligned and discarding up to it left this consumer on an unaligned position,
    /// which every later producer would refuse or write past ([`Consumer::peek`] refuses it too).
    /// Only a new segment file mends that.
    pub fn unusable(&self) -> Option<RingError> {
        let tail = self.st.tail;
        (!tail.is_multiple_of(FRAME_ALIGN as u64)).then(|| RingError::Corrupt {
            pos: tail,
            what: format!("the producer published head {tail}, which is not {FRAME_ALIGN}-byte aligned"),
        })
    }

    /// `Err(SegmentDamaged)` if the segment was found truncated under this side. `peek`, `wait`
    /// and `recv` check this too; call it after reading a batch's last frame and before storing
    /// the batch, since a payload read after its `peek` may already have come from zero pages.
    pub fn check_intact(&self) -> Result<(), RingError> {
        intact(&self.mem)
    }

    /// Bytes the producer has published that this consumer has not released yet, at most the
    /// capacity (the head is the producer's word, so a hostile value is clamped, not trusted).
    /// For monitoring: how full the ring is now.
    pub fn filled(&self) -> usize {
        let head = self.mem.shared().head.load(Ordering::Acquire);
        head.saturating_sub(self.st.tail).min(self.st.capacity as u64) as usize
    }

    /// Whether a producer is attached now (holds its side's lock).
    pub fn producer_alive(&self) -> bool {
        self.mem.peer_alive(Role::Producer)
    }

    /// Sequence of the last batch acknowledged durable on this segment (by any consumer). A
    /// consumer that starts mid-stream skips batches at or below it: they are stored already.
    pub fn last_durable_seq(&self) -> u64 {
        self.mem.shared().reverse.durable_seq.load(Ordering::Acquire)
    }

    /// Records that batch `seq` is durable with snapshot `id`, and wakes the producer.
    /// Released frames are published first, so a successor consumer never re-reads an acked batch.
    ///
    /// `durable_seq` never goes backwards: a `seq` at or below the current one changes nothing
    /// (neither the sequence nor the id of the later batch a producer may be reading).
    pub fn publish_durable(&mut self, seq: u64, id: &[u8; 32]) {
        publish_tail(&self.mem, &mut self.st);
        let sh = self.mem.shared();
        // The consumer is the only writer (one per segment), so load-then-store cannot race with
        // another writer; fetch_max keeps the store monotonic even so.
        if seq > sh.reverse.durable_seq.load(Ordering::Acquire) {
            for (word, chunk) in sh.reverse.durable_id.iter().zip(id.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(chunk);
                word.store(u64::from_le_bytes(b), Ordering::Relaxed);
            }
            // Release: the id words above are visible to whoever acquires this sequence.
            sh.reverse.durable_seq.fetch_max(seq, Ordering::Release);
        }
        notify(&self.mem, &sh.producer.wake);
    }

    /// Records that batch `seq` was rejected, and wakes the producer. `rejected_seq` never goes
    /// backwards: a `seq` at or below the current one changes nothing.
    pub fn publish_rejected(&mut self, seq: u64, code: RejectCode) {
        publish_tail(&self.mem, &mut self.st);
        let sh = self.mem.shared();
        if seq > sh.reverse.rejected_seq.load(Ordering::Acquire) {
            sh.reverse.rejected_code.store(code.to_u32(), Ordering::Relaxed);
            sh.reverse.rejected_seq.fetch_max(seq, Ordering::Release);
        }
        notify(&self.mem, &sh.producer.wake);
    }
}

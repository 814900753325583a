//! One HTTP body as a frame source: chunks arrive from the connection's task through a bounded
//! channel (so a slow archiver slows the sender down through TCP, and memory stays at a few
//! chunks plus one frame), are cut into frames by the protocol's `FrameAssembler`, and the
//! batch's outcome goes back as the HTTP answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shmback_proto::frame::FrameKind;
use shmback_proto::stream::{FrameAssembler, StreamError};
use shmback_proto::{RingError, Role};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::producers::Producers;
use super::reply::Reply;
use crate::serve::batch::snapshot_id_bytes;
use crate::serve::options::BatchOutcome;

/// What the connection's task sends: the body's bytes, or why the body failed.
pub(crate) type Chunk = Result<Bytes, String>;

/// Where the answer goes (the connection's task, or the puller posting it to the producer).
pub(crate) type Answer = Box<dyn FnOnce(Reply) + Send>;

/// The frames of one HTTP body, and its answer.
pub(crate) struct BodySource {
    chunks: mpsc::Receiver<Chunk>,
    runtime: Handle,
    assembler: FrameAssembler,
    /// The current frame (copied out of the assembler, which then moves on).
    frame: Vec<u8>,
    current: Option<(u8, u64)>,
    /// A stream error to report from the next `peek`.
    error: Option<RingError>,
    /// The body ended (or failed, or was discarded after an error): no more chunks.
    ended: bool,
    /// A frame over the size limit was refused (a rejection is then answered 413).
    too_large: bool,
    /// The sequence of the last BEGIN seen.
    begun: Option<u64>,
    producer: String,
    producers: Arc<Producers>,
    answer: Option<Answer>,
    stop: Arc<AtomicBool>,
}

impl BodySource {
    pub(crate) fn new(
        chunks: mpsc::Receiver<Chunk>,
        runtime: Handle,
        max_frame: usize,
        producer: String,
        producers: Arc<Producers>,
        answer: Answer,
        stop: Arc<AtomicBool>,
    ) -> Self {
        BodySource {
            chunks,
            runtime,
            assembler: FrameAssembler::new(max_frame),
            frame: Vec::new(),
            current: None,
            error: None,
            ended: false,
            too_large: false,
            begun: None,
            producer,
            producers,
            answer: Some(answer),
            stop,
        }
    }

    /// Moves the next complete frame out of the assembler, if there is one.
    fn load(&mut self) {
        if self.current.is_some() || self.error.is_some() {
            return;
        }
        let position = self.assembler.position();
        match self.assembler.peek() {
            Ok(Some((kind, payload))) => {
                // The seq is BEGIN's first field, read even from a BEGIN the codec refuses
                // (bad labels): its rejection then names the batch, as the ring's recorded
                // `begun_seq` does.
                if kind == FrameKind::Begin as u8 {
                    self.begun = payload.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
                }
                self.frame.clear();
                self.frame.extend_from_slice(payload);
                self.current = Some((kind, position));
                self.assembler.release();
            }
            Ok(None) => {}
            Err(e) => {
                self.too_large |= matches!(e, StreamError::TooLarge { .. });
                self.error = Some(RingError::Corrupt { pos: position, what: e.to_string() });
                self.discard();
            }
        }
    }

    /// Nothing after a broken frame can be read: the rest of the body is dropped.
    fn discard(&mut self) {
        self.ended = true;
        self.assembler = FrameAssembler::new(0);
        self.chunks.close();
    }

    /// Waits up to `timeout` for a whole frame (or an error to report).
    pub(crate) fn wait(&mut self, timeout: Duration) -> Result<(), RingError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.load();
            if self.current.is_some() || self.error.is_some() {
                return Ok(());
            }
            if self.ended {
                if self.assembler.partial() {
                    let pos = self.assembler.position();
                    let what = "the body ended inside a frame (the connection was cut, or the client sent a \
                                truncated batch)"
                        .to_string();
                    self.error = Some(RingError::Corrupt { pos, what });
                    self.discard();
                    return Ok(());
                }
                return Err(RingError::PeerGone { peer: Role::Producer });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RingError::Timeout { peer: Role::Producer });
            }
            let chunks = &mut self.chunks;
            match self.runtime.block_on(async { tokio::time::timeout(left, chunks.recv()).await }) {
                Ok(Some(Ok(bytes))) => self.assembler.push(&bytes),
                // The connection failed mid-body: what arrived before still counts (a partial
                // frame is reported as such), nothing more will.
                Ok(Some(Err(_))) | Ok(None) => self.ended = true,
                Err(_) => return Err(RingError::Timeout { peer: Role::Producer }),
            }
        }
    }

    /// Whether a frame is ready (`Err` for a stream error, once).
    pub(crate) fn peek(&mut self) -> Result<bool, RingError> {
        self.load();
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(self.current.is_some()),
        }
    }

    /// The current frame: kind, position in the body, payload.
    pub(crate) fn current(&self) -> (u8, u64, &[u8]) {
        let (kind, pos) = self.current.unwrap_or((0, self.assembler.position()));
        (kind, pos, &self.frame)
    }

    pub(crate) fn release(&mut self) {
        self.current = None;
    }

    fn answer(&mut self, reply: Reply) {
        if let Some(answer) = self.answer.take() {
            answer(reply);
        }
    }

    pub(crate) fn publish(&mut self, outcome: &BatchOutcome) {
        let reply = match outcome {
            BatchOutcome::Stored { seq, snapshot, .. } => {
                let id = snapshot_id_bytes(snapshot);
                self.producers.record(&self.producer, *seq, id);
                Reply::stored(*seq, &id)
            }
            BatchOutcome::Rejected { seq, why, code } => Reply::rejected(*seq, *code, why, self.too_large),
        };
        self.answer(reply);
    }

    pub(crate) fn last_durable_seq(&self) -> u64 {
        self.producers.last_stored(&self.producer)
    }

    /// Answers a batch sent again after it was stored with the snapshot it was stored as.
    pub(crate) fn already_stored(&mut self, seq: u64) {
        let reply = match self.producers.stored(&self.producer, seq) {
            Some(id) => Reply::stored(seq, &id),
            None => Reply::stale(seq, &self.producer, self.producers.last_stored(&self.producer)),
        };
        self.answer(reply);
    }

    pub(crate) fn unanswered_seq(&self) -> Option<u64> {
        self.begun.filter(|_| self.answer.is_some())
    }

    /// Answered, or ended with nothing left to read.
    pub(crate) fn exhausted(&self) -> bool {
        self.answer.is_none() || (self.ended && self.current.is_none() && self.error.is_none())
    }
}

/// A body that never got an outcome (no BEGIN, nothing after a bad frame's batch, the daemon
/// stopping between batches) is still answered.
impl Drop for BodySource {
    fn drop(&mut self) {
        if self.answer.is_some() {
            let seq = self.begun.unwrap_or(0);
            let reply = if self.stop.load(Ordering::Relaxed) {
                Reply::shutting_down(seq)
            } else {
                Reply::malformed(seq, "the body held no complete batch (BEGIN … COMMIT): nothing was stored")
            };
            self.answer(reply);
        }
    }
}

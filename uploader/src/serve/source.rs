//! Where a batch's frames come from: a segment's ring, or an HTTP body (`http/body.rs`). The serve
//! loop, the pump, the readers and the snapshot gate see only this type, so both transports go
//! through the same decoder, the same batch state machine and the same gate.
//!
//! An enum rather than a trait object: a ring frame is borrowed from shared memory until it is
//! released, and the enum keeps that borrow (`FrameRef`) as it is.

use std::time::Duration;

use shmback_proto::frame::{CodecError, Frame};
use shmback_proto::{Consumer, FrameRef, RingError, Segment};

use super::batch::snapshot_id_bytes;
use super::http::body::BodySource;
use super::options::BatchOutcome;

/// The frames of one producer.
pub(crate) enum Source {
    /// A segment's ring: batches one after another for as long as the segment is served.
    Ring(Consumer<Segment>),
    /// One HTTP body: one batch, answered by the HTTP response.
    Body(Box<BodySource>),
}

/// The next frame, borrowed from its source until released.
pub(crate) enum FrameView<'a> {
    Ring(FrameRef<'a, Segment>),
    Body(&'a mut BodySource),
}

impl FrameView<'_> {
    pub(crate) fn kind(&self) -> u8 {
        match self {
            FrameView::Ring(f) => f.kind(),
            FrameView::Body(b) => b.current().0,
        }
    }

    pub(crate) fn position(&self) -> u64 {
        match self {
            FrameView::Ring(f) => f.position(),
            FrameView::Body(b) => b.current().1,
        }
    }

    pub(crate) fn payload(&self) -> &[u8] {
        match self {
            FrameView::Ring(f) => f.payload(),
            FrameView::Body(b) => b.current().2,
        }
    }

    pub(crate) fn decode(&self) -> Result<Frame<'_>, CodecError> {
        shmback_proto::frame::decode(self.kind(), self.payload())
    }

    /// Consumes the frame.
    pub(crate) fn release(self) {
        match self {
            FrameView::Ring(f) => f.release(),
            FrameView::Body(b) => b.release(),
        }
    }
}

impl Source {
    /// Waits up to `timeout` for a frame. `PeerGone`: the producer left (a ring's producer died,
    /// or the body ended); `Timeout`: nothing arrived.
    pub(crate) fn wait(&mut self, timeout: Duration) -> Result<(), RingError> {
        match self {
            Source::Ring(c) => c.wait(timeout),
            Source::Body(b) => b.wait(timeout),
        }
    }

    /// The next frame, if one is there (without waiting).
    pub(crate) fn peek(&mut self) -> Result<Option<FrameView<'_>>, RingError> {
        match self {
            Source::Ring(c) => Ok(c.peek()?.map(FrameView::Ring)),
            Source::Body(b) => Ok(b.peek()?.then_some(FrameView::Body(b))),
        }
    }

    /// Tells the producer how its batch ended: the durable ack (snapshot id) or the rejection.
    pub(crate) fn publish(&mut self, outcome: &BatchOutcome) {
        match (self, outcome) {
            (Source::Ring(c), BatchOutcome::Stored { seq, snapshot, .. }) => {
                c.publish_durable(*seq, &snapshot_id_bytes(snapshot))
            }
            (Source::Ring(c), BatchOutcome::Rejected { seq, code, .. }) => c.publish_rejected(*seq, *code),
            (Source::Body(b), outcome) => b.publish(outcome),
        }
    }

    /// The last batch this producer had stored (its frames are skipped if sent again).
    pub(crate) fn last_durable_seq(&self) -> u64 {
        match self {
            Source::Ring(c) => c.last_durable_seq(),
            Source::Body(b) => b.last_durable_seq(),
        }
    }

    /// A batch sent again after it was stored: a ring's producer reads the ack it missed from the
    /// segment; a body is answered with the stored snapshot.
    pub(crate) fn already_stored(&mut self, seq: u64) {
        if let Source::Body(b) = self {
            b.already_stored(seq);
        }
    }

    /// The sequence the producer last began, if nothing answered it yet.
    pub(crate) fn unanswered_begun_seq(&self) -> Option<u64> {
        match self {
            Source::Ring(c) => c.unanswered_begun_seq(),
            Source::Body(b) => b.unanswered_seq(),
        }
    }

    /// A source no producer can use any more, if this one is.
    pub(crate) fn unusable(&self) -> Option<RingError> {
        match self {
            Source::Ring(c) => c.unusable(),
            Source::Body(_) => None,
        }
    }

    /// Whether this source will never give another batch (a body that ended or was answered):
    /// its serve loop returns.
    pub(crate) fn exhausted(&self) -> bool {
        match self {
            Source::Ring(_) => false,
            Source::Body(b) => b.exhausted(),
        }
    }
}

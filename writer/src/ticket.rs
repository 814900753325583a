//! [`Ticket`]: a committed batch waiting for the uploader's durable ack, and the [`SnapshotId`]
//! that ack carries.

use std::time::Duration;

use shmback_proto::{Producer, Segment};

use crate::error::WriteError;
use crate::progress::Progress;

/// A hex-printed snapshot id.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotId(pub [u8; 32]);

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

/// A committed batch, waiting for the uploader to store its snapshot.
pub struct Ticket<'o> {
    pub(crate) producer: &'o mut Producer<Segment>,
    pub(crate) seq: u64,
    /// The uploader's incarnation the batch was sent to: an ack from a later one is not for it.
    pub(crate) epoch: u64,
    pub(crate) progress: Progress,
    pub(crate) elapsed: Duration,
}

impl Ticket<'_> {
    /// The batch's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// What was sent.
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// How long sending took.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Waits until the uploader has stored the batch's snapshot and returns its id. `Rejected`:
    /// no snapshot was made. `UploaderGone`: the uploader died or restarted before storing it;
    /// send the batch again.
    pub fn wait_durable(self, timeout: Duration) -> Result<SnapshotId, WriteError> {
        self.producer
            .wait_durable(self.seq, self.epoch, timeout)
            .map(SnapshotId)
            .map_err(|e| WriteError::from_ring(e, timeout))
    }
}

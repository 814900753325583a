//! [`Ticket`]: a committed batch waiting for the uploader's durable ack, and the [`SnapshotId`]
//! that ack carries.

use std::time::Duration;

use shmback_proto::{Producer, Segment};

use crate::error::WriteError;
use crate::http::Pending;
use crate::progress::Progress;

/// The id of a stored snapshot, as restic prints it (64 hex digits) when displayed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotId(
    /// The id's bytes: the SHA-256 of the snapshot file in the repository.
    pub [u8; 32],
);

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

/// A committed batch, waiting for the uploader to store its snapshot. Until
/// [`Ticket::wait_durable`] returns the id, the snapshot may not exist: an uploader that dies now
/// loses the batch, and the producer must send it again.
///
/// ```
/// use std::time::Duration;
/// use shmback_writer::{Outbox, OutboxOptions, WriteError};
///
/// # let shm = tempfile::tempdir_in("/dev/shm").unwrap();
/// # let segment = shm.path().join("shmback");
/// let mut outbox = Outbox::open(&segment, OutboxOptions::default())?;
/// # // A stand-in uploader: reads the batch and acknowledges it as snapshot 0707…07.
/// # let mut ring = shmback_proto::Segment::consumer(&segment, &Default::default()).unwrap();
/// # let uploader = std::thread::spawn(move || {
/// #     let mut batches = shmback_proto::BatchDecoder::new();
/// #     loop {
/// #         let frame = ring.recv(Duration::from_secs(20)).unwrap();
/// #         let event = batches.feed(frame.decode().unwrap()).unwrap();
/// #         let committed = match event {
/// #             shmback_proto::Event::Commit { seq, .. } => Some(seq),
/// #             _ => None,
/// #         };
/// #         frame.release();
/// #         if let Some(seq) = committed {
/// #             return ring.publish_durable(seq, &[7; 32]);
/// #         }
/// #     }
/// # });
/// let mut batch = outbox.batch();
/// batch.add_bytes("status.json", r#"{"ok":true}"#)?;
/// let ticket = batch.commit()?;   // sent: the ring holds it, the uploader has not stored it yet
/// println!("batch {} sent in {:?}", ticket.seq(), ticket.elapsed());
/// match ticket.wait_durable(Duration::from_secs(600)) {
///     Ok(id) => println!("stored as snapshot {id}"),
///     // Nothing of the batch was stored: build it again and resend once the uploader is back.
///     Err(WriteError::UploaderGone) => {}
///     Err(e) => return Err(e),
/// }
/// # uploader.join().unwrap();
/// # Ok::<(), shmback_writer::WriteError>(())
/// ```
pub struct Ticket<'o> {
    inner: Inner<'o>,
    seq: u64,
    progress: Progress,
    elapsed: Duration,
}

enum Inner<'o> {
    Ring {
        producer: &'o mut Producer<Segment>,
        /// The uploader's incarnation the batch was sent to: an ack from a later one is not for it.
        epoch: u64,
    },
    /// Boxed: a pending push holds the whole manifest, a ring ticket two words.
    Http(Box<Pending<'o>>),
}

impl<'o> Ticket<'o> {
    pub(crate) fn ring(
        producer: &'o mut Producer<Segment>,
        seq: u64,
        epoch: u64,
        progress: Progress,
        elapsed: Duration,
    ) -> Self {
        Ticket { inner: Inner::Ring { producer, epoch }, seq, progress, elapsed }
    }

    pub(crate) fn http(pending: Pending<'o>, seq: u64, progress: Progress, elapsed: Duration) -> Self {
        Ticket { inner: Inner::Http(Box::new(pending)), seq, progress, elapsed }
    }
}

impl Ticket<'_> {
    /// The batch's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Entries, files and bytes sent: the final [`Progress`].
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// From the commit call to COMMIT in the ring: the send, not the wait for the durable ack.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Waits until the uploader has stored the batch's snapshot and returns its id. `Rejected`
    /// (ring) or `Refused` (HTTP): no snapshot was made. `UploaderGone`: the uploader died or
    /// restarted before storing it; send the batch again. Over HTTP a dropped connection, 408,
    /// 429 or 503 sends the batch again (its files read again) within `timeout`.
    pub fn wait_durable(self, timeout: Duration) -> Result<SnapshotId, WriteError> {
        match self.inner {
            Inner::Ring { producer, epoch } => producer
                .wait_durable(self.seq, epoch, timeout)
                .map(SnapshotId)
                .map_err(|e| WriteError::from_ring(e, timeout)),
            Inner::Http(pending) => pending.wait(timeout),
        }
    }
}

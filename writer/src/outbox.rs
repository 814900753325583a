//! [`Outbox`]: a producer's attachment to one segment, and the options every batch shares.

use std::path::{Path, PathBuf};
use std::time::Duration;

use shmback_proto::{Labels, Producer, Segment, SegmentOptions};

use crate::batch::Batch;
use crate::error::WriteError;
use crate::send::Channel;

/// How an [`Outbox`] attaches and sends.
#[derive(Clone, Debug)]
pub struct OutboxOptions {
    /// Segment options: ring size when this side creates the segment (default 4 MiB), whether it
    /// may create it, group sharing, liveness tick.
    pub segment: SegmentOptions,
    /// Longest wait for any single step: room in the ring (backpressure) or the durable ack.
    pub timeout: Duration,
    /// Labels applied to every batch (host, tags, key/values); a batch can add tags and values.
    pub labels: Labels,
    /// Payload bytes per DATA frame (capped at the ring's maximum). Frames of 64 KiB and more move
    /// at memcpy speed (BENCHMARKS.md); 256 KiB also keeps `read()` calls few.
    pub frame_size: usize,
}

impl Default for OutboxOptions {
    fn default() -> Self {
        Self {
            segment: SegmentOptions::default(),
            timeout: Duration::from_secs(60),
            labels: Labels::default(),
            frame_size: 256 << 10,
        }
    }
}

/// A producer's handle on one segment: what a producer app keeps for its whole life. One batch at
/// a time: [`Outbox::batch`] borrows it until the batch is committed or dropped.
///
/// The uploader (`shmback run`) usually creates the segment; `Outbox::open` creates it when it is
/// not there yet, so the two can start in any order. Below, a stand-in uploader (hidden) plays
/// `shmback run`.
///
/// ```
/// use std::time::Duration;
/// use shmback_writer::{Outbox, OutboxOptions};
///
/// # let shm = tempfile::tempdir_in("/dev/shm").unwrap();
/// # let segment = shm.path().join("shmback");
/// # let data = tempfile::tempdir().unwrap();
/// # std::fs::write(data.path().join("orders.csv"), "1,2,3\n").unwrap();
/// # let data_dir = data.path();
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
/// batch.add_dir("data", data_dir)?;               // walks it; files are opened one at a time
/// batch.add_bytes("VERSION", b"42\n".to_vec())?;
/// let ticket = batch.commit()?;                   // manifest, then data, then COMMIT
/// let id = ticket.wait_durable(Duration::from_secs(600))?;
/// assert_eq!(id.to_string(), "07".repeat(32));
/// # uploader.join().unwrap();
/// # Ok::<(), shmback_writer::WriteError>(())
/// ```
pub struct Outbox {
    producer: Producer<Segment>,
    opts: OutboxOptions,
    path: PathBuf,
}

impl Outbox {
    /// Attaches to (or creates) the segment at `segment` as its producer.
    pub fn open(segment: impl AsRef<Path>, opts: OutboxOptions) -> Result<Outbox, WriteError> {
        let path = segment.as_ref().to_path_buf();
        let producer = Segment::producer(&path, &opts.segment)?;
        Ok(Outbox { producer, opts, path })
    }

    /// Starts a batch (one snapshot). Nothing is sent until [`Batch::commit`].
    pub fn batch(&mut self) -> Batch<'_> {
        let frame_size = self.frame_size();
        Batch::new(Channel {
            producer: &mut self.producer,
            segment: &self.path,
            labels: &self.opts.labels,
            timeout: self.opts.timeout,
            frame_size,
        })
    }

    /// The segment's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ring bytes of the segment.
    pub fn ring_capacity(&self) -> usize {
        self.producer.capacity()
    }

    /// Payload bytes per DATA frame actually used.
    fn frame_size(&self) -> usize {
        self.opts.frame_size.clamp(4096, self.producer.max_payload())
    }
}

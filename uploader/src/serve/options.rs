//! What a serve loop is told (its options) and what it tells its caller (one outcome per batch).

use std::time::Duration;

use rustic_core::repofile::SnapshotFile;
use shmback_proto::{RejectCode, SegmentOptions};

/// What happened to one batch.
#[derive(Debug)]
pub enum BatchOutcome {
    /// Stored as this snapshot.
    Stored {
        /// Batch sequence.
        seq: u64,
        /// The snapshot.
        snapshot: Box<SnapshotFile>,
        /// Time from BEGIN to the stored snapshot.
        elapsed: Duration,
    },
    /// Rejected: no snapshot.
    Rejected {
        /// Batch sequence.
        seq: u64,
        /// Why, for the log: names the cause and, where there is one, the fix.
        why: String,
        /// Code sent to the producer.
        code: RejectCode,
    },
}

/// Serving options.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Host recorded when a batch names none.
    pub host: String,
    /// Ring liveness tick and wait granularity.
    pub tick: Duration,
    /// Segment options (ring size when the uploader creates the segment).
    pub segment: SegmentOptions,
    /// How long a batch in flight may still take after SIGTERM before it is abandoned (no
    /// snapshot; the producer gets `Rejected(ShuttingDown)` and resends later).
    pub grace: Duration,
    /// A batch that receives no frame for this long is rejected (its producer is alive but
    /// stalled); zero waits for ever.
    pub batch_idle: Duration,
    /// Most manifest entries one batch may have; a larger batch is rejected while its manifest
    /// arrives, before it costs more memory.
    pub max_entries: u64,
    /// Most bytes one batch's manifest may keep in memory (paths and symlink targets, after
    /// sharing each path's prefix with the one before): the entry cap alone does not bound a
    /// manifest of long, unrelated paths.
    pub max_manifest_bytes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        Self {
            host: if host.is_empty() { "shmback".into() } else { host },
            tick: Duration::from_millis(100),
            segment: SegmentOptions::default(),
            // Below Kubernetes' default terminationGracePeriodSeconds (30 s), so the uploader
            // abandons the batch itself, cleanly, before the kubelet's SIGKILL.
            grace: Duration::from_secs(20),
            // Long enough for a producer reading a slow disk or waiting on a database dump; short
            // enough that a wedged producer does not hold its segment for a day.
            batch_idle: Duration::from_secs(600),
            // Several times the largest real trees we know of (a few million files).
            max_entries: 5_000_000,
            max_manifest_bytes: 1 << 30,
        }
    }
}

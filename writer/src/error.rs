//! Errors of the writer: each variant is a case a caller can act on.

use std::path::PathBuf;

use shmback_proto::frame::PathProblem;
use shmback_proto::{RejectCode, RingError, Role, SegmentError};

/// Why a batch could not be built, sent or acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The segment could not be created or attached.
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// A snapshot path is not acceptable (absolute, `..`, NUL, too long, …).
    #[error("invalid snapshot path {path:?}: {why}")]
    InvalidPath {
        /// The snapshot path, printed as UTF-8 (invalid bytes replaced).
        path: String,
        /// The rule it breaks.
        why: PathProblem,
    },
    /// The same snapshot path was added twice.
    #[error("snapshot path {path:?} was added twice to this batch")]
    Duplicate {
        /// The snapshot path, printed as UTF-8 (invalid bytes replaced).
        path: String,
    },
    /// An entry would lie below a file or symlink.
    #[error("snapshot path {path:?} lies below {parent:?}, which is not a directory in this batch")]
    NotADirectory {
        /// An entry below `parent`: the one being added, or one already in the batch when `parent`
        /// is the one being added.
        path: String,
        /// The file or symlink that `path` would lie below.
        parent: String,
    },
    /// A source could not be read (missing, unreadable, a device…).
    #[error("{path}: {source}")]
    Io {
        /// The source's filesystem path (the snapshot path for readers and bytes).
        path: PathBuf,
        /// What the OS or the reader reported.
        #[source]
        source: std::io::Error,
    },
    /// A source changed between the manifest and its data, or while it was read. The batch was
    /// aborted (no snapshot); send it again.
    #[error("{path} changed while being backed up ({what}); the batch was aborted, send it again")]
    SourceChanged {
        /// The source's filesystem path (the snapshot path for readers).
        path: PathBuf,
        /// What differs from the manifest (size, mtime, type, an early end…).
        what: String,
    },
    /// The uploader is gone (exited, killed, or restarted mid-batch). Send the batch again once it
    /// is back; nothing of this batch was acknowledged.
    #[error("the uploader is gone (exited or restarted); send the batch again once it is back")]
    UploaderGone,
    /// No uploader attached to the segment within the timeout (it is not running, or uses
    /// another segment path).
    #[error(
        "no uploader attached to {segment} within {waited:?}: start it (e.g. `shmback run --segment {segment}`) or check the segment path"
    )]
    NoUploader {
        /// The segment's path, for the `shmback run --segment` to start.
        segment: String,
        /// The outbox's timeout, which passed with no uploader.
        waited: std::time::Duration,
    },
    /// The uploader is alive but did not make progress in time.
    #[error("timed out after {0:?} waiting for the uploader (it is alive but not draining the ring)")]
    Timeout(std::time::Duration),
    /// The uploader rejected the batch: no snapshot was made.
    #[error("the uploader rejected batch {seq}: {code}; see the uploader's log")]
    Rejected {
        /// The batch, as [`crate::Ticket::seq`] numbers it.
        seq: u64,
        /// The uploader's reason; its log has the details.
        code: RejectCode,
    },
    /// Any other ring failure (a corrupt segment, a frame the codec refused).
    #[error(transparent)]
    Ring(RingError),
}

impl WriteError {
    pub(crate) fn from_ring(e: RingError, timeout: std::time::Duration) -> Self {
        match e {
            RingError::PeerGone { peer: Role::Consumer } => WriteError::UploaderGone,
            RingError::Timeout { .. } => WriteError::Timeout(timeout),
            RingError::Rejected { seq, code } => WriteError::Rejected { seq, code },
            other => WriteError::Ring(other),
        }
    }
}

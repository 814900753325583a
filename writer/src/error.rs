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
    /// The HTTP connection to the uploader failed while the batch was sent (internal to one
    /// attempt: a push resends the batch, and reports [`WriteError::Unreachable`] once it gives up).
    #[error("the connection to the uploader failed: {what}; send the batch again")]
    Connection {
        /// What the OS or the HTTP client reported.
        what: String,
    },
    /// No attempt to push the batch over HTTP got an answer before the deadline: the uploader
    /// is not running, not listening at this URL, unreachable, or kept answering busy.
    #[error(
        "could not deliver the batch to {url} within {waited:?} (last: {last}): check that the uploader \
         runs with `shmback run --listen` and that the URL (SHMBACK_TO) is right, then send again"
    )]
    Unreachable {
        /// Where the batch was pushed.
        url: String,
        /// The time spent retrying.
        waited: std::time::Duration,
        /// The last failure.
        last: String,
    },
    /// The uploader answered 401: no token, or not its token.
    #[error("the uploader refused the token: set SHMBACK_TOKEN/SHMBACK_TOKEN_FILE to the uploader's token")]
    Unauthorized,
    /// The uploader refused the batch over HTTP (400, 409, 413, 415 or another final status): no
    /// snapshot was made, and sending the same batch again would be refused again.
    #[error("the uploader refused batch {seq} ({status} {code}): {reason}; {fix}")]
    Refused {
        /// The batch's sequence.
        seq: u64,
        /// The HTTP status.
        status: u16,
        /// The `code` of the answer (`malformed`, `too-large`, `protocol`, …).
        code: String,
        /// The uploader's reason.
        reason: String,
        /// What to do about it.
        fix: &'static str,
    },
    /// A batch holding a reader (a stream such as standard input) was interrupted after the
    /// reader was consumed: it cannot be read a second time for the resend.
    #[error(
        "the connection to the uploader dropped after {path:?} (a stream) was read, and a stream \
         cannot be read twice: run the producer again to send a new batch"
    )]
    NotResendable {
        /// The snapshot path of the stream.
        path: PathBuf,
    },
    /// The HTTP transport's settings are not usable (URL, producer name, token).
    #[error("{what}")]
    Config {
        /// What is wrong and how to fix it.
        what: String,
    },
    /// The outbox has no transport of its own ([`crate::Outbox::detached`]): its batches are
    /// written with [`crate::Batch::write_to`].
    #[error(
        "this outbox is detached: write its batches with Batch::write_to, or open it with Outbox::open/Outbox::http"
    )]
    Detached,
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

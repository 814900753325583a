//! # shmback-writer
//!
//! What a producer app links to hand its files to the shmback uploader: an [`Outbox`] attached to
//! a /dev/shm segment (or pushing over HTTP to another service, [`Outbox::http`]), a [`Batch`]
//! per snapshot, a [`Ticket`] that resolves when the uploader has
//! stored the snapshot. Small on purpose: the protocol crate and std, no async runtime, no crypto.
//!
//! - Files are opened one at a time, when their data is due, and `read()` straight into reserved
//!   ring space: one copy (page cache → ring) and no whole-file buffer, so a 10 GiB file goes
//!   through a 4 MiB ring.
//! - Entries are validated when added (relative, no `..`, no NUL, bounded, no duplicates, nothing
//!   below a file) and sent in the depth-first order the uploader needs, manifest first.
//! - Backpressure blocks up to the configured timeout; nothing is dropped. An uploader that dies
//!   mid-batch is [`WriteError::UploaderGone`]: build the batch again and resend when it is back.
//! - A file that changes while it is sent aborts the batch (see [`Batch`] for the exact rule).
//!
//! See [`Outbox`] for an example, and the `shmback-send` binary for shell scripts and other
//! languages.
#![warn(missing_docs)]

mod batch;
mod entries;
mod entry_list;
mod error;
mod http;
mod outbox;
mod progress;
mod send;
mod ticket;

pub use batch::Batch;
pub use entries::EntryMeta;
pub use error::WriteError;
pub use http::{HttpOptions, Outcome, default_producer, token_from_env};
pub use outbox::{Outbox, OutboxOptions};
pub use progress::Progress;
pub use shmback_proto::{Labels, SegmentOptions};
pub use ticket::{SnapshotId, Ticket};

//! Serving segments: each committed batch becomes exactly one snapshot, and the producer's
//! durable ack is published only once that snapshot is stored.
//!
//! How a batch travels through the files of this module:
//! - `run.rs`: [`serve`] one segment, or [`serve_all`] of them (a thread each; the repository
//!   is opened before any segment is created; a segment whose file was damaged is attached again,
//!   one whose ring is unusable stops alone).
//! - `segment.rs`: the serve loop of one segment. It owns the segment's ring for as long as it
//!   serves, collects a batch's manifest (`manifest.rs`, kept compact and within
//!   [`ServeOptions::max_entries`]), and rejects at once whatever is invalid, stalled or torn.
//! - `batch.rs`: a batch with a complete manifest, archived by rustic_core into one snapshot.
//! - `pump.rs`: the ring side: consumer, decoder and the data phase's bookkeeping, behind one
//!   lock shared by the loop, the readers and the gate.
//! - `reader.rs`: the rustic side: the manifest as a `ReadSource`, files as readers that take
//!   turns on the ring.
//! - `gate.rs`: the snapshot gate in front of the backend: a snapshot is written only for a batch
//!   that ended in a valid COMMIT with every file delivered whole.
//! - `report.rs`: the one place an outcome is published, logged (rejections rate-limited) and
//!   handed to the caller.
//! - `want.rs`: the want-list, which files of a batch the archiver will read (the rest never
//!   cross the ring), decided against the parent snapshot the archive is pinned to.
//! - `shutdown.rs`, `node.rs`, `options.rs`: the grace period, manifest entries as rustic nodes,
//!   and what the caller passes in and gets back.
//!
//! Module dependencies point one way: run → segment → batch → {reader, gate} → pump → shutdown.

mod batch;
mod gate;
mod http;
mod manifest;
mod node;
mod options;
mod pump;
mod reader;
mod report;
mod run;
mod segment;
mod shutdown;
mod source;
mod want;

pub use batch::{Repo, open_repo, snapshot_id_bytes};
pub use http::{HttpOptions, OnBatch, Puller, bind, listen, pull, token_from};
pub use options::{BatchOutcome, ServeOptions};
pub use run::{serve, serve_all};

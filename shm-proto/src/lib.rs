//! # shmback-proto
//!
//! The shared-memory protocol between a producer (an app, through `shmback-writer`) and the
//! uploader (`shmback`): a segment file in /dev/shm holding a header and a lock-free
//! single-producer/single-consumer byte ring, the frames that travel in it, and the batch state
//! machine those frames follow. All of the project's `unsafe` code lives in this crate.
//!
//! Layers, bottom up:
//! - [`layout`]: the header's byte layout (every field an atomic; checked offsets).
//! - [`ring`]: the SPSC ring protocol over any [`ring::Memory`] — reserve/commit, peek/release,
//!   spin-then-futex waiting, peer liveness, the durable-ack reverse channel.
//! - [`segment`] (not under loom): the /dev/shm file — atomic creation; on attach the owner/mode
//!   rules, the header read and validated before anything is mapped, the repair of a segment its
//!   producer damaged; OFD-lock liveness — implementing [`ring::Memory`].
//! - [`fault`]: the lock-free table behind the process-wide SIGBUS guard, which turns a segment
//!   truncated under its mapping into [`RingError::SegmentDamaged`] instead of a crash.
//! - [`frame`]: the frame header and the codec of each batch frame type.
//! - [`batch`]: the batch state machine a consumer feeds decoded frames to.
//! - [`want`]: the want-list, which of a batch's files the consumer needs.
//! - [`model`]: the ring on the heap, for loom models, miri and property tests.
//!
//! ```
//! use std::time::Duration;
//! use shmback_proto::{Segment, SegmentOptions, Frame, FrameKind};
//!
//! let dir = tempfile::tempdir_in("/dev/shm").unwrap();
//! let path = dir.path().join("demo");
//! let opts = SegmentOptions { capacity: Some(64 << 10), ..Default::default() };
//! let mut producer = Segment::producer(&path, &opts).unwrap();
//! let mut consumer = Segment::consumer(&path, &opts).unwrap();
//!
//! // Zero-copy write: reserve, fill, commit; publish with flush.
//! let mut r = producer.reserve(FrameKind::Data, 5, Duration::from_secs(1)).unwrap();
//! r.copy_from_slice(b"hello");
//! r.commit();
//! producer.flush();
//!
//! let frame = consumer.recv(Duration::from_secs(1)).unwrap();
//! assert_eq!(frame.decode().unwrap(), Frame::Data(b"hello"));
//! frame.release();
//! ```
#![warn(missing_docs)]

pub mod batch;
pub mod fault;
pub mod frame;
#[doc(hidden)]
#[cfg(not(loom))]
pub mod fuzzing;
pub mod layout;
pub mod model;
pub mod ring;
#[cfg(not(loom))]
pub mod segment;
#[cfg(not(loom))]
mod sigbus;
pub mod stream;
mod sync;
#[cfg(not(loom))]
mod sys;
pub mod want;

pub use batch::{BatchDecoder, BatchError, Event};
pub use frame::{Begin, CodecError, Entry, EntryKind, Frame, FrameKind, Labels};
pub use ring::{Consumer, FrameRef, Memory, Producer, RejectCode, Reservation, RingConfig, RingError, Role};
#[cfg(not(loom))]
pub use segment::{Segment, SegmentError, SegmentInfo, SegmentOptions};
#[cfg(not(loom))]
pub use sys::{process_start_ticks, release_free_memory};
pub use want::WantList;

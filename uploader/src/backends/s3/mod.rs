//! The S3 backend: a rustic_core `WriteBackend` on `aws-sdk-s3`, for AWS, R2, B2, MinIO and Sia
//! renterd/s3d. Layout and addressing follow restic (`config`, `keys/`, `snapshots/`, `index/`,
//! `data/xx/<id>` under the prefix), so restic reads what this writes.
//!
//! - [`config`]: options, provider profiles, building the SDK client.
//! - [`ops`]: the backend: every request goes through one helper (send, classify, retry, log);
//!   pack uploads are pipelined behind a barrier.
//! - [`retry`]: exponential backoff with full jitter.
//! - [`error`]: what a failed request means, and whether to retry it.

pub mod config;
pub mod error;
pub mod ops;
pub mod retry;

pub use config::{Checksums, Provider, S3Options};
pub use error::S3Error;
pub use ops::S3Backend;

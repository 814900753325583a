//! # shmback-uploader
//!
//! The uploader drains /dev/shm rings straight into rustic_core: each committed batch becomes
//! exactly one restic-format snapshot, and the producer's ticket resolves only once that snapshot
//! is stored. The engine (batch source, snapshot gate, serve loop over one or several segments),
//! the repository commands, the demo, and the restic backends (`backends`: locations, local, S3, REST,
//! rclone, GCS, Azure, B2, SFTP, Swift) are here.
//! Design: `docs/decisions/0002-uploader-engine-plan.md`.

pub mod backends;
pub mod commands;
pub mod config;
pub mod demo;
pub mod progress;
pub mod repository;
pub mod serve;

pub use config::{Password, RepositoryConfig};
pub use serve::{BatchOutcome, Repo, ServeOptions, open_repo, serve, serve_all};

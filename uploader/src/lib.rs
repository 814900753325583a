//! # shmback-uploader
//!
//! The uploader drains /dev/shm rings straight into rustic_core: each committed batch becomes
//! exactly one restic-format snapshot, and the producer's ticket resolves only once that snapshot
//! is stored. The engine (batch source, snapshot gate, serve loop over one or several segments),
//! the repository commands (`copy` to a second repository among them), the demo, and the restic backends (`backends`: locations, local, S3, REST,
//! rclone, GCS, Azure, B2, SFTP, Swift) are here, and the supervisor of `shmback run -- APP`
//! (`supervise`, with `restore_if_empty` to bring an app's data back on a fresh machine).
//! Map of the crate: `docs/ARCHITECTURE.md`; design: `docs/decisions/0002-uploader-engine.md`
//! (serving) and `docs/decisions/0004-backends.md` (backends).
#![warn(missing_docs)]

pub mod backends;
pub mod commands;
pub mod config;
pub mod copy;
pub mod demo;
pub mod health;
pub mod hooks;
pub mod init;
pub mod locks;
pub mod monitor;
pub mod progress;
pub mod repository;
pub mod restore_if_empty;
pub mod schedule;
pub mod serve;
pub mod supervise;

pub use config::{Password, RepositoryConfig};
pub use serve::{BatchOutcome, Repo, ServeOptions, open_repo, serve, serve_all};

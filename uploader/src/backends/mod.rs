//! The restic backends, each in its own module with the variables it reads and their checks; this
//! file is the one place that picks the backend for a location ([`open`]).
//!
//! Shared pieces: [`location`] (restic's location syntax), [`env`] (the environment every backend
//! reads, empty meaning unset, secrets masked in messages), [`failure`] (the backend-neutral kind
//! of a failure, for the exit status), [`limit`] (bandwidth limits around any of them).

/// Inside an `impl ReadBackend for W` of a wrapper whose backend is `self.inner`: the methods it
/// passes through unchanged besides the two reads (location, listing, warm-up).
macro_rules! forward_read_meta {
    () => {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn list_with_size(&self, tpe: rustic_core::FileType) -> rustic_core::RusticResult<Vec<(rustic_core::Id, u32)>> {
            self.inner.list_with_size(tpe)
        }
        fn warmup_path(&self, tpe: rustic_core::FileType, id: &rustic_core::Id) -> String {
            self.inner.warmup_path(tpe, id)
        }
        fn needs_warm_up(&self) -> bool {
            self.inner.needs_warm_up()
        }
        fn warm_up(&self, tpe: rustic_core::FileType, id: &rustic_core::Id) -> rustic_core::RusticResult<()> {
            self.inner.warm_up(tpe, id)
        }
    };
}
pub(crate) use forward_read_meta;

/// `impl ReadBackend for $wrapper` passing every call through to `self.inner`: for the wrappers
/// that act on writes only (the snapshot gate, the lock fence).
macro_rules! forward_read_backend {
    ($wrapper:ty) => {
        impl rustic_core::ReadBackend for $wrapper {
            $crate::backends::forward_read_meta!();
            fn read_full(
                &self,
                tpe: rustic_core::FileType,
                id: &rustic_core::Id,
            ) -> rustic_core::RusticResult<bytes::Bytes> {
                self.inner.read_full(tpe, id)
            }
            fn read_partial(
                &self,
                tpe: rustic_core::FileType,
                id: &rustic_core::Id,
                cacheable: bool,
                offset: u32,
                length: u32,
            ) -> rustic_core::RusticResult<bytes::Bytes> {
                self.inner.read_partial(tpe, id, cacheable, offset, length)
            }
        }
    };
}
pub(crate) use forward_read_backend;

pub mod azure;
pub mod b2;
mod dal;
pub mod env;
pub mod failure;
pub mod gcs;
pub mod limit;
pub mod local;
pub mod location;
pub mod rclone;
pub mod rest;
pub mod s3;
pub mod sftp;
pub mod swift;

use std::sync::Arc;

use rustic_core::{RepositoryBackends, WriteBackend};

use self::env::Env;
use self::location::Location;
use self::s3::S3Options;

/// Builds the backend for `location`: its variables are read from `env` and checked (a missing
/// one named) before anything connects; `s3` is used by S3 locations only.
pub fn open(location: &Location, s3: &S3Options, env: &Env) -> anyhow::Result<RepositoryBackends> {
    let backend: Arc<dyn WriteBackend> = match location {
        Location::Local(path) => Arc::new(local::LocalBackend::new(path)?),
        Location::S3(loc) => Arc::new(s3::S3Backend::new(loc, s3.clone())?),
        Location::Rest { url } => rest::open(url, env)?,
        Location::Rclone { remote } => rclone::open(remote, env)?,
        Location::Gcs { bucket, prefix } => gcs::open(bucket, prefix, env)?,
        Location::Azure { container, prefix } => azure::open(container, prefix, env)?,
        Location::B2 { bucket, prefix } => b2::open(bucket, prefix, env)?,
        Location::Sftp { user, host, port, path } => sftp::open(user.as_deref(), host, *port, path, env)?,
        Location::Swift { container, prefix } => swift::open(container, prefix, env)?,
    };
    Ok(RepositoryBackends::new(backend, None))
}

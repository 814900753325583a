//! Opening a repository: the one place that turns a [`RepositoryConfig`] into a rustic_core
//! `Repository`, with one error message for a wrong password or a location holding none.

use std::sync::Arc;

use anyhow::Context;
use rustic_core::{
    ConfigOptions, Credentials, FileType, KeyOptions, OpenStatus, ReadBackend, Repository, RepositoryBackends,
    RepositoryOptions, WriteBackend,
};

use crate::backends::failure::{BackendError, FailureKind};
use crate::config::RepositoryConfig;
use crate::progress::{TerminalBars, interactive};

/// What the repository is opened for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Create it (`init`); fails if one exists.
    Create,
    /// Serve segments: no progress bars (the daemon logs one line per batch).
    Serve,
    /// An interactive command: progress bars when stderr is a terminal.
    Command,
}

/// Opens (or creates) the repository `config` names. `wrap` may put a layer in front of the
/// backend (the snapshot gate of the serve loop); pass `|b| b` for none.
pub fn open(
    config: &RepositoryConfig,
    purpose: Purpose,
    wrap: impl FnOnce(Arc<dyn WriteBackend>) -> Arc<dyn WriteBackend>,
) -> anyhow::Result<Repository<OpenStatus>> {
    let backends = crate::backends::open(&config.location, &config.s3, &config.env)?;
    if purpose != Purpose::Create && backends.repository().list(FileType::Config)?.is_empty() {
        return Err(BackendError::msg(
            FailureKind::Missing,
            format!(
                "there is no repository at {}: create one with `shmback init`, or check RESTIC_REPOSITORY",
                config.location
            ),
        )
        .into());
    }
    // The limits wrap the backend itself, so every layer above (the snapshot gate, rustic_core's
    // decryption) is paced by what actually goes over the wire.
    let limited = |be: Arc<dyn WriteBackend>| config.limits.wrap(be);
    let backends = RepositoryBackends::new(wrap(limited(backends.repository())), backends.repo_hot().map(limited));
    let opts = RepositoryOptions::default();
    let repo = if purpose == Purpose::Command && interactive() {
        Repository::new_with_progress(&opts, &backends, TerminalBars)?
    } else {
        Repository::new(&opts, &backends)?
    };
    let creds = Credentials::password(config.password.expose());
    if purpose == Purpose::Create {
        return Ok(repo.init(&creds, &KeyOptions::default(), &ConfigOptions::default())?);
    }
    repo.open(&creds)
        .with_context(|| format!("opening repository {} (wrong password, or not a repository?)", config.location))
}

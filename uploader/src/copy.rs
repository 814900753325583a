//! `shmback copy --to REPO2`: restic's `copy`. Snapshots of this repository that the target does
//! not have yet are copied there with the data they reference; blobs the target already holds are
//! not copied again (deduplicated against its index). Keys and passwords of the two may differ:
//! blobs are decrypted with the source's key and encrypted with the target's.
//!
//! A snapshot counts as present in the target when a target snapshot has it as its original
//! (restic's `original` field, which a copy sets to the id of the snapshot it copies) or has its
//! id. So a second run copies nothing, a snapshot copied by restic counts, and so does one copied
//! from a copy. rustic_core's own `relevant_copy_snapshots` compares times only; it is not used.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::Context;
use rustic_core::repofile::{SnapshotFile, SnapshotId, StringList};
use rustic_core::{
    Credentials, FileType, Id, KeyOptions, OpenStatus, Repository, RepositoryBackends, RepositoryOptions,
};

use crate::backends::failure::{BackendError, FailureKind};
use crate::config::{Password, PasswordError, PasswordSources, RepositoryConfig};
use crate::progress::{TerminalBars, interactive};

/// The flags of `shmback copy`.
#[derive(Clone, Debug, clap::Args)]
pub struct CopyArgs {
    /// The target repository (the same forms as --repo).
    // Hidden in the help, as --repo: a rest: URL may hold a password.
    #[arg(long, value_name = "REPO2", env = "SHMBACK_TO_REPOSITORY", hide_env_values = true)]
    pub to: String,
    /// File holding the target repository's password (whitespace-trimmed); else
    /// SHMBACK_TO_PASSWORD.
    #[arg(long, value_name = "FILE", env = "SHMBACK_TO_PASSWORD_FILE")]
    pub to_password_file: Option<PathBuf>,
    /// Shell command printing the target repository's password.
    #[arg(long, value_name = "COMMAND", env = "SHMBACK_TO_PASSWORD_COMMAND", hide_env_values = true)]
    pub to_password_command: Option<String>,
    /// Create the target repository if there is none at --to (with the target's password and
    /// this repository's chunker parameters, so later backups to either deduplicate alike).
    #[arg(long)]
    pub init_target: bool,
    /// Only snapshots of this host; repeatable (any of them).
    #[arg(long, value_name = "HOST")]
    pub host: Vec<String>,
    /// Only snapshots carrying these tags (comma-separated: all of them); repeatable (any of the
    /// groups), as restic's --tag.
    #[arg(long, value_name = "TAG[,TAG]")]
    pub tag: Vec<String>,
    /// Snapshots to copy (ids, id prefixes or `latest`); default: every snapshot that passes the
    /// filters.
    pub snapshots: Vec<String>,
}

/// Examples for `shmback copy --help`.
pub const COPY_EXAMPLES: &str = "Examples:
  # Everything not yet in the second repository (its password from a file):
  shmback copy --to s3:https://s3.example.com/offsite --to-password-file /run/secrets/offsite
  # Only the snapshots of host db tagged nightly, into a new local repository:
  SHMBACK_TO_PASSWORD_FILE=/run/secrets/local shmback copy --to /backups/copy --init-target --host db --tag nightly
  # Two given snapshots, at most 4 MiB/s up and 8 MiB/s down:
  shmback copy --to rest:http://backup:8000/ 1a2b3c4d latest --limit-upload 4096 --limit-download 8192";

impl CopyArgs {
    /// The target's configuration: its location and password from these flags (and
    /// SHMBACK_TO_PASSWORD), backend settings, environment and bandwidth buckets shared with
    /// `source`.
    pub fn target(&self, source: &RepositoryConfig) -> anyhow::Result<RepositoryConfig> {
        let sources = PasswordSources {
            file: self.to_password_file.clone(),
            command: self.to_password_command.clone(),
            env: std::env::var_os("SHMBACK_TO_PASSWORD").map(|v| v.to_string_lossy().into_owned()),
        };
        Ok(RepositoryConfig {
            location: self.to.parse().with_context(|| format!("--to {}", self.to))?,
            password: target_password(&sources)?,
            s3: source.s3.clone(),
            env: source.env.clone(),
            limits: source.limits.clone(),
            locks: source.locks.clone(),
        })
    }

    /// The snapshot filter these flags give.
    pub fn filter(&self) -> anyhow::Result<CopyFilter> {
        let tags = self
            .tag
            .iter()
            .map(|t| t.parse::<StringList>().map_err(|e| anyhow::anyhow!("--tag {t}: {e}")))
            .collect::<anyhow::Result<_>>()?;
        Ok(CopyFilter { hosts: self.host.clone(), tags, ids: self.snapshots.clone() })
    }
}

/// The target's password, resolved as the source's is but with the target's flag and variable
/// names in every message.
fn target_password(sources: &PasswordSources) -> anyhow::Result<Password> {
    let fix = "set SHMBACK_TO_PASSWORD_FILE (--to-password-file), SHMBACK_TO_PASSWORD_COMMAND \
               (--to-password-command) or SHMBACK_TO_PASSWORD";
    Password::resolve(sources).map_err(|e| match e {
        PasswordError::FileAndCommand => anyhow::anyhow!(
            "both a target password file and command are set (SHMBACK_TO_PASSWORD_FILE / \
             SHMBACK_TO_PASSWORD_COMMAND or --to-password-file / --to-password-command): keep one"
        ),
        PasswordError::File { path, source } => anyhow::anyhow!(
            "cannot read the target password file {}: {source}; fix SHMBACK_TO_PASSWORD_FILE (or --to-password-file)",
            path.display()
        ),
        PasswordError::CommandFailed { command, status } => anyhow::anyhow!(
            "the target password command `{command}` failed ({status}); fix SHMBACK_TO_PASSWORD_COMMAND (or \
             --to-password-command)"
        ),
        PasswordError::Empty { what } => anyhow::anyhow!(
            "an empty password is not a password: {}; put the target repository's password there",
            what.replace("RESTIC_PASSWORD", "SHMBACK_TO_PASSWORD")
        ),
        PasswordError::NoSource => anyhow::anyhow!("no password for the target repository: {fix}"),
        other => anyhow::Error::new(other).context("the target repository's password"),
    })
}

/// Which snapshots of the source to copy.
#[derive(Clone, Debug, Default)]
pub struct CopyFilter {
    /// Hosts, any of them (empty: any host).
    pub hosts: Vec<String>,
    /// Tag groups: a snapshot passes if it carries every tag of one group (empty: any tags).
    pub tags: Vec<StringList>,
    /// Snapshot ids, prefixes or `latest` (empty: all).
    pub ids: Vec<String>,
}

impl CopyFilter {
    fn matches(&self, s: &SnapshotFile) -> bool {
        (self.hosts.is_empty() || self.hosts.contains(&s.hostname)) && s.tags.matches(&self.tags)
    }
}

/// What a copy did.
#[derive(Debug)]
pub struct CopyReport {
    /// Snapshots of the source that passed the filter.
    pub selected: usize,
    /// Of those, the ones the target had already (by original id).
    pub present: usize,
    /// The ones copied (their source ids).
    pub copied: Vec<SnapshotFile>,
    /// Whether the target was created.
    pub created_target: bool,
}

/// The id a snapshot stands for: the one it was copied from, else its own.
fn original(s: &SnapshotFile) -> SnapshotId {
    s.original.unwrap_or(s.id)
}

/// Copies the snapshots of `source` that pass `filter` and are not in `target` yet, with their
/// data, to `target`; with `init_target`, creates `target` first if it holds no repository.
pub fn copy(
    source: &RepositoryConfig,
    target: &RepositoryConfig,
    filter: &CopyFilter,
    init_target: bool,
) -> anyhow::Result<CopyReport> {
    // Non-exclusive locks on both, as restic's copy takes: the source must not be pruned
    // meanwhile, and the target gets packs, index files and snapshots, as from a backup.
    let (src, _src_lock) = crate::commands::open_locked(source, false)?;
    let snaps = if filter.ids.is_empty() {
        src.get_matching_snapshots(|s| filter.matches(s))?
    } else {
        src.get_snapshots_from_strs(&filter.ids, |s| filter.matches(s))
            .with_context(|| format!("finding snapshots {}", filter.ids.join(" ")))?
    };
    let created_target = open_target(target, &src, init_target)?;
    // Opened again behind a lock (a repository just created included).
    let (dst, _dst_lock) = crate::commands::open_locked(target, false)?;
    let have: HashSet<SnapshotId> = dst.get_all_snapshots()?.iter().map(original).collect();
    let selected = snaps.len();
    let mut todo: Vec<SnapshotFile> = snaps.into_iter().filter(|s| !have.contains(&original(s))).collect();
    let present = selected - todo.len();
    let mut report = CopyReport { selected, present, copied: vec![], created_target };
    if todo.is_empty() {
        return Ok(report);
    }
    todo.sort_by(|a, b| a.time.cmp(&b.time));
    let copies: Vec<SnapshotFile> = todo
        .iter()
        .cloned()
        .map(|mut s| {
            // As restic does: the copy names the snapshot it came from, so later runs (of shmback
            // or restic) find it.
            let _ = s.original.get_or_insert(s.id);
            s
        })
        .collect();
    let src = src.to_indexed().context("reading the source repository's index")?;
    let dst = dst.to_indexed_ids().context("reading the target repository's index")?;
    src.copy(&dst, copies.iter()).with_context(|| format!("copying snapshots to {}", target.location))?;
    report.copied = todo;
    Ok(report)
}

/// Checks that the target holds a repository; with `init`, creates it (with the source's chunker
/// parameters) if there is none. Returns whether it was created.
fn open_target(target: &RepositoryConfig, src: &Repository<OpenStatus>, init: bool) -> anyhow::Result<bool> {
    let backends = crate::backends::open(&target.location, &target.s3, &target.env)?;
    let exists = !backends.repository().list(FileType::Config)?.is_empty();
    if exists {
        return Ok(false);
    }
    if !init {
        return Err(BackendError::msg(
            FailureKind::Missing,
            format!(
                "there is no repository at {} (--to): create it with `shmback copy --init-target …`, or with \
                 `shmback init` and that repository and password",
                target.location
            ),
        )
        .into());
    }
    let limited = |be| target.limits.wrap(be);
    let backends = RepositoryBackends::new(limited(backends.repository()), backends.repo_hot().map(limited));
    let opts = RepositoryOptions::default();
    let repo = if interactive() {
        Repository::new_with_progress(&opts, &backends, TerminalBars)?
    } else {
        Repository::new(&opts, &backends)?
    };
    // The source's config with a new repository id: same version, chunker polynomial and sizes,
    // compression and pack sizes (restic's `init --copy-chunker-params`, and a little more).
    let mut config = src.config().clone();
    config.id = Id::random().into();
    let creds = Credentials::password(target.password.expose());
    repo.init_with_config(&creds, &KeyOptions::default(), config)
        .with_context(|| format!("creating the target repository {}", target.location))?;
    Ok(true)
}

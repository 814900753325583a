//! Bringing an app's data back on a fresh machine: before the supervised app starts, each
//! directory given with `--restore-if-empty DIR[:SNAPSHOT-PATH]` that is missing or empty is
//! restored from the latest snapshot.
//!
//! Made for platforms whose volumes end with the lease (Akash): the first start on a new lease
//! finds DIR empty and gets the data back by itself; every later start finds it full and leaves
//! it alone. The restore itself is [`commands::restore_node`] (it never follows a symlink below
//! its destination); this module decides what to restore and makes it all-or-nothing: the
//! snapshot is restored into a staging directory inside DIR (same filesystem, even when DIR is a
//! mount point) and moved into place only once it is complete. A restore cut short (an error, a
//! SIGKILL) leaves only the staging directory, which the next start removes and restores again.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use anyhow::Context as _;
use rustic_core::repofile::{Node, SnapshotFile};
use rustic_core::{IndexedFullStatus, Repository};
use tracing::info;

use crate::commands;
use crate::config::RepositoryConfig;

/// The directory inside DIR a restore is staged in before its entries are moved into DIR.
pub const STAGING: &str = ".shmback-restore-in-progress";

/// What a fresh ext4 filesystem holds: a volume mounted at DIR with only this in it is empty.
const LOST_FOUND: &str = "lost+found";

/// One `--restore-if-empty DIR[:SNAPSHOT-PATH]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreIfEmpty {
    /// The directory to fill when it is missing or empty (absolute).
    pub dir: PathBuf,
    /// The directory in the snapshot to restore into it: relative, `/`-separated, lexically
    /// normal; empty for the snapshot's root.
    pub snapshot_path: String,
}

impl FromStr for RestoreIfEmpty {
    type Err = RestoreIfEmptyError;

    /// `DIR` (the snapshot path is DIR without its leading `/`, where `shmback-send DIR` stores
    /// it) or `DIR:SNAPSHOT-PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| RestoreIfEmptyError::BadSpec { spec: s.to_string(), why: why.to_string() };
        let (dir, path) = match s.split_once(':') {
            Some((dir, path)) => (dir, Some(path)),
            None => (s, None),
        };
        let dir = Path::new(dir);
        if !dir.is_absolute() {
            return Err(bad("DIR must be an absolute path"));
        }
        let snapshot_path = match path {
            None => normal(dir),
            Some(path) => {
                if Path::new(path).components().any(|c| c == Component::ParentDir) {
                    return Err(bad("SNAPSHOT-PATH must not contain `..`"));
                }
                normal(Path::new(path))
            }
        };
        let snapshot_path = snapshot_path.to_str().ok_or_else(|| bad("the path is not UTF-8"))?.to_string();
        Ok(RestoreIfEmpty { dir: dir.to_path_buf(), snapshot_path })
    }
}

/// `/a/./b/../c` → `a/c`: the lexically normal form without the root, as `shmback-send` stores
/// paths.
fn normal(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Which snapshots a restore may come from (by default all: on a new lease the host name is new).
#[derive(Clone, Debug, Default)]
pub struct SnapshotFilter {
    /// Only snapshots of this host.
    pub host: Option<String>,
    /// Only snapshots carrying every one of these tags.
    pub tags: Vec<String>,
}

impl SnapshotFilter {
    fn matches(&self, s: &SnapshotFile) -> bool {
        self.host.as_ref().is_none_or(|h| &s.hostname == h) && self.tags.iter().all(|t| s.tags.contains(t))
    }
}

impl fmt::Display for SnapshotFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = vec![];
        if let Some(h) = &self.host {
            parts.push(format!("host {h}"));
        }
        if !self.tags.is_empty() {
            parts.push(format!("tags {}", self.tags.join(",")));
        }
        f.write_str(&parts.join(", "))
    }
}

/// Why the app must not start: each names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RestoreIfEmptyError {
    /// A `--restore-if-empty` value that cannot be used.
    #[error("--restore-if-empty {spec}: {why} (the form is DIR[:SNAPSHOT-PATH], e.g. /data or /data:data)")]
    BadSpec {
        /// The value given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// The repository has snapshots, but none passes the filter.
    #[error(
        "--restore-if-empty: {dir} is empty and no snapshot matches {filter}; the app was not started: fix \
         --restore-host / --restore-tag (`shmback snapshots` lists hosts and tags)"
    )]
    NoMatchingSnapshot {
        /// The first directory that needed a restore.
        dir: PathBuf,
        /// The filter.
        filter: String,
    },
    /// The latest snapshot does not hold the path.
    #[error(
        "--restore-if-empty: {dir} is empty, but the latest snapshot ({snapshot}) has no `{path}`; the app was not \
         started: name the directory the snapshot holds as {dir}:SNAPSHOT-PATH (see what it holds with `shmback \
         restore {snapshot} /tmp/look`), or select the snapshots that hold it with --restore-tag / --restore-host"
    )]
    NoSuchPath {
        /// The directory to fill.
        dir: PathBuf,
        /// The snapshot looked in (short id).
        snapshot: String,
        /// The path it lacks.
        path: String,
    },
    /// The path is in the snapshot, but is not a directory.
    #[error(
        "--restore-if-empty: `{path}` in snapshot {snapshot} is not a directory, so it cannot fill the directory \
         {dir}; the app was not started: give the directory holding it as {dir}:SNAPSHOT-PATH"
    )]
    NotADirectory {
        /// The directory to fill.
        dir: PathBuf,
        /// The snapshot (short id).
        snapshot: String,
        /// The path.
        path: String,
    },
    /// A restore was cut short while its entries were being moved into place.
    #[error(
        "--restore-if-empty: {dir} holds {staging} beside other entries: a restore was interrupted while it moved \
         them into place; the app was not started: to restore again, empty {dir}; to keep what is there, remove \
         {dir}/{staging}",
        staging = STAGING
    )]
    Interrupted {
        /// The directory.
        dir: PathBuf,
    },
    /// DIR could not be read, created or filled.
    #[error(
        "--restore-if-empty: {what} {path}: {source}; the app was not started: fix the directory's permissions or mount"
    )]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// What was done for one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirOutcome {
    /// It was restored.
    Restored {
        /// The directory.
        dir: PathBuf,
        /// The snapshot (full id).
        snapshot: String,
        /// Regular files restored.
        files: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// It already held something and was left alone.
    LeftAlone {
        /// The directory.
        dir: PathBuf,
    },
    /// It was empty, but the repository has no snapshot yet (a first deployment).
    NothingToRestore {
        /// The directory.
        dir: PathBuf,
    },
}

/// What a directory holds, as far as restoring goes.
#[derive(Debug, PartialEq, Eq)]
enum DirState {
    /// Missing, or holding nothing but `lost+found` and (with `stale`) a staging directory left
    /// by an interrupted restore.
    Empty { exists: bool, stale: bool },
    /// Holding something: leave it alone.
    Occupied,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RestoreIfEmptyError {
    let path = path.to_path_buf();
    move |source| RestoreIfEmptyError::Io { what, path, source }
}

fn state(dir: &Path) -> Result<DirState, RestoreIfEmptyError> {
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(DirState::Empty { exists: false, stale: false });
        }
        Err(e) => return Err(io("reading", dir)(e)),
    };
    if !meta.is_dir() {
        return Ok(DirState::Occupied);
    }
    let (mut stale, mut others) = (false, false);
    for entry in std::fs::read_dir(dir).map_err(io("reading", dir))? {
        let name = entry.map_err(io("reading", dir))?.file_name();
        if name == STAGING {
            stale = true;
        } else if name != LOST_FOUND {
            others = true;
        }
    }
    match (others, stale) {
        (false, _) => Ok(DirState::Empty { exists: true, stale }),
        (true, false) => Ok(DirState::Occupied),
        (true, true) => Err(RestoreIfEmptyError::Interrupted { dir: dir.to_path_buf() }),
    }
}

/// Restores each directory of `specs` that is missing or empty from the latest snapshot (of those
/// `filter` lets through); leaves the others alone. Returns what was done, in order; logs it.
///
/// The repository is opened only if some directory needs a restore. An error means the app must
/// not start: some directory that should have been restored was not (the ones before it were).
pub fn restore_if_empty(
    config: &RepositoryConfig,
    specs: &[RestoreIfEmpty],
    filter: &SnapshotFilter,
) -> anyhow::Result<Vec<DirOutcome>> {
    let mut outcomes = Vec::with_capacity(specs.len());
    let mut todo = vec![];
    for spec in specs {
        match state(&spec.dir)? {
            DirState::Occupied => {
                info!(dir = %spec.dir.display(), "--restore-if-empty: the directory holds data; left alone");
                outcomes.push(DirOutcome::LeftAlone { dir: spec.dir.clone() });
            }
            DirState::Empty { exists, stale } => todo.push((spec, exists, stale)),
        }
    }
    let Some((first, ..)) = todo.first() else { return Ok(outcomes) };
    // A non-exclusive lock, as restic's restore takes: a prune elsewhere cannot remove packs
    // under the restore.
    let (repo, _lock) = commands::open_locked(config, false)?;
    let repo = repo.to_indexed().context("reading the repository's index")?;
    let all = repo.get_all_snapshots().context("listing the repository's snapshots")?;
    if all.is_empty() {
        for (spec, ..) in &todo {
            info!(dir = %spec.dir.display(), "nothing to restore: the repository has no snapshot");
            outcomes.push(DirOutcome::NothingToRestore { dir: spec.dir.clone() });
        }
        return Ok(outcomes);
    }
    let Some(snap) = all.into_iter().filter(|s| filter.matches(s)).max_by(|a, b| a.time.cmp(&b.time)) else {
        return Err(
            RestoreIfEmptyError::NoMatchingSnapshot { dir: first.dir.clone(), filter: filter.to_string() }.into()
        );
    };
    for (spec, exists, stale) in todo {
        outcomes.push(restore_dir(&repo, &snap, spec, exists, stale)?);
    }
    Ok(outcomes)
}

fn short(snap: &SnapshotFile) -> String {
    snap.id.to_hex().as_str()[..8].to_string()
}

/// The node at `path` in the snapshot, or `None` if the snapshot has no such path.
fn find(repo: &Repository<IndexedFullStatus>, snap: &SnapshotFile, path: &str) -> anyhow::Result<Option<Node>> {
    let mut node = Node::new_node(OsStr::new(""), rustic_core::repofile::NodeType::Dir, Default::default());
    node.subtree = Some(snap.tree);
    for name in path.split('/').filter(|n| !n.is_empty()) {
        let Some(tree) = node.subtree else { return Ok(None) };
        let tree = repo.get_tree(&tree).with_context(|| format!("reading snapshot {} at `{path}`", short(snap)))?;
        match tree.nodes.into_iter().find(|n| n.name() == OsStr::new(name)) {
            Some(child) => node = child,
            None => return Ok(None),
        }
    }
    Ok(Some(node))
}

fn restore_dir(
    repo: &Repository<IndexedFullStatus>,
    snap: &SnapshotFile,
    spec: &RestoreIfEmpty,
    exists: bool,
    stale: bool,
) -> anyhow::Result<DirOutcome> {
    let dir = &spec.dir;
    let path = &spec.snapshot_path;
    let node = find(repo, snap, path)?.ok_or_else(|| RestoreIfEmptyError::NoSuchPath {
        dir: dir.clone(),
        snapshot: short(snap),
        path: path.clone(),
    })?;
    if !node.is_dir() {
        return Err(
            RestoreIfEmptyError::NotADirectory { dir: dir.clone(), snapshot: short(snap), path: path.clone() }.into()
        );
    }
    if !exists {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    }
    let staging = dir.join(STAGING);
    if stale {
        info!(dir = %dir.display(), "removing what an interrupted restore left in {STAGING}");
        std::fs::remove_dir_all(&staging).map_err(io("removing", &staging))?;
    }
    let id = snap.id.to_hex().to_string();
    commands::restore_node(repo, &node, &format!("{id}:{path}"), &staging).with_context(|| {
        format!(
            "--restore-if-empty: restoring `{path}` of snapshot {} into {} failed; the app was not started \
             (the next start tries again)",
            short(snap),
            dir.display()
        )
    })?;
    let (files, bytes) = count(&staging).map_err(io("reading", &staging))?;
    // The staging directory carries the snapshot directory's mode, which may forbid taking
    // entries out of it.
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))
        .map_err(io("moving out of", &staging))?;
    for entry in std::fs::read_dir(&staging).map_err(io("reading", &staging))? {
        let name = entry.map_err(io("reading", &staging))?.file_name();
        // A fresh filesystem's own lost+found stays; the snapshot's copy of one is dropped.
        if name == LOST_FOUND && dir.join(LOST_FOUND).exists() {
            continue;
        }
        let to = dir.join(&name);
        std::fs::rename(staging.join(&name), &to).map_err(io("moving into place", &to))?;
    }
    std::fs::remove_dir_all(&staging).map_err(io("removing", &staging))?;
    info!(
        dir = %dir.display(),
        snapshot = %short(snap),
        time = %snap.time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        host = %snap.hostname,
        "restored `{path}` of the latest snapshot: {files} files, {bytes} bytes"
    );
    Ok(DirOutcome::Restored { dir: dir.clone(), snapshot: id, files, bytes })
}

/// Regular files below `dir` and their bytes (symlinks are not followed).
fn count(dir: &Path) -> std::io::Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                files += 1;
                bytes += entry.metadata()?.len();
            }
        }
    }
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<RestoreIfEmpty, RestoreIfEmptyError> {
        s.parse()
    }

    #[test]
    fn the_snapshot_path_defaults_to_dir_without_its_root() {
        assert_eq!(parse("/data").unwrap(), RestoreIfEmpty { dir: "/data".into(), snapshot_path: "data".into() });
        assert_eq!(parse("/srv/./app/../db").unwrap().snapshot_path, "srv/db");
        assert_eq!(parse("/data:/backup/data").unwrap().snapshot_path, "backup/data");
        assert_eq!(parse("/data:other").unwrap().snapshot_path, "other");
        assert_eq!(parse("/data:").unwrap().snapshot_path, "", "an empty SNAPSHOT-PATH is the snapshot's root");
        for bad in ["data", "/data:../etc"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("DIR[:SNAPSHOT-PATH]"), "{e}");
        }
    }

    #[test]
    fn a_directory_is_empty_with_only_lost_found_or_a_stale_staging_directory() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        assert_eq!(state(&d.join("missing")).unwrap(), DirState::Empty { exists: false, stale: false });
        std::fs::create_dir(d.join(LOST_FOUND)).unwrap();
        assert_eq!(state(d).unwrap(), DirState::Empty { exists: true, stale: false });
        std::fs::create_dir(d.join(STAGING)).unwrap();
        assert_eq!(state(d).unwrap(), DirState::Empty { exists: true, stale: true });
        std::fs::write(d.join("x"), "x").unwrap();
        assert!(matches!(state(d), Err(RestoreIfEmptyError::Interrupted { .. })));
        std::fs::remove_dir(d.join(STAGING)).unwrap();
        assert_eq!(state(d).unwrap(), DirState::Occupied);
        assert_eq!(state(&d.join("x")).unwrap(), DirState::Occupied, "a file is not an empty directory");
    }
}

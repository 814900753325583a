//! Repository commands besides serving: list snapshots, restore, check, repair, forget/prune.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context;
use rustic_core::repofile::{IndexId, Node, SnapshotFile};
use rustic_core::{
    CheckError, CheckOptions, ForgetGroups, Grouped, IndexedFullStatus, KeepOptions, LocalDestination, LsOptions,
    OpenStatus, PruneOptions, RepairIndexOptions, RepairSnapshotsOptions, Repository, RestoreOptions,
    SnapshotGroupCriterion,
};

use crate::config::RepositoryConfig;
use crate::locks::{self, Fence, RepoLock, UnlockReport};
use crate::repository::{self, Purpose};

/// Opens the repository for a command (no snapshot gate; progress bars on a terminal).
pub fn open_plain(config: &RepositoryConfig) -> anyhow::Result<Repository<OpenStatus>> {
    repository::open(config, Purpose::Command, |b| b)
}

/// Opens the repository for a command and takes the restic lock restic's command of the same
/// name takes (`exclusive` for forget, prune, repair and check), waiting up to `--retry-lock`
/// (`config.locks`). Writes are refused unless the lock is valid; it is released when
/// the returned [`RepoLock`] is dropped.
pub fn open_locked(config: &RepositoryConfig, exclusive: bool) -> anyhow::Result<(Repository<OpenStatus>, RepoLock)> {
    let fence = Fence::default();
    let repo = repository::open(config, Purpose::Command, |b| fence.wrap(b))?;
    let lock = RepoLock::acquire(&repo, exclusive, &config.locks, &fence, &|| false)?;
    Ok((repo, lock))
}

/// Removes stale locks (restic's `unlock`): older than 30 minutes, or left by a process of this
/// host that is gone; with `remove_all`, every lock (only when nothing else uses the repository).
pub fn unlock(config: &RepositoryConfig, remove_all: bool) -> anyhow::Result<UnlockReport> {
    Ok(locks::unlock(&open_plain(config)?, remove_all)?)
}

/// All snapshots, oldest first.
pub fn snapshots(config: &RepositoryConfig) -> anyhow::Result<Vec<SnapshotFile>> {
    let (repo, _lock) = open_locked(config, false)?;
    let mut s = repo.get_all_snapshots()?;
    s.sort_by(|a, b| a.time.cmp(&b.time));
    Ok(s)
}

/// Restores `spec` (`SNAPSHOT[:PATH]`, `latest` allowed) into `dest`.
///
/// Nothing is written outside `dest`: a symlink inside it (already there, or restored from the
/// snapshot) is never followed; one standing where the snapshot has a file or directory is
/// replaced (the link, not its target). An entry that cannot be restored (a damaged pack, a
/// blob missing from the index, a path blocked by something that is not a directory) does not
/// stop the others; a file whose contents could not be restored is removed rather than left
/// full of zeros, and the error lists every such entry.
pub fn restore(config: &RepositoryConfig, spec: &str, dest: &Path) -> anyhow::Result<()> {
    let (repo, _lock) = open_locked(config, false)?;
    let repo = repo.to_indexed()?;
    let node = repo.node_from_snapshot_path(spec, |_| true).with_context(|| format!("finding {spec}"))?;
    restore_node(&repo, &node, spec, dest)
}

/// Restores `node`, already found in `repo` (`spec` names it in messages), into `dest`, with the
/// guarantees of [`restore`]: for callers that pick the snapshot and path themselves.
pub fn restore_node(repo: &Repository<IndexedFullStatus>, node: &Node, spec: &str, dest: &Path) -> anyhow::Result<()> {
    let ls = repo.ls(node, &LsOptions::default())?;
    let dest_str = dest.to_str().context("restore destination is not UTF-8")?;
    let dest = LocalDestination::new(dest_str, true, !node.is_dir())?;
    // Ownership is restored only by a process that may change it (root, or CAP_CHOWN): as any
    // other user every chown of another's file fails, once per file (a restore init container
    // running as the app's uid). The files then belong to the user restoring, as with restic.
    let chown = may_chown();
    if !chown {
        tracing::info!(
            uid = nix::unistd::geteuid().as_raw(),
            "restoring without CAP_CHOWN: files belong to this user, their recorded owners are not restored"
        );
    }
    let opts = RestoreOptions::default().no_ownership(!chown);
    let plan = repo.prepare_restore(&opts, ls.clone(), &dest, false)?;
    repo.restore(plan, &opts, ls, &dest).map_err(|e| {
        anyhow::anyhow!(
            "restore of {spec} is incomplete: {}\nIf packs are damaged or missing, `shmback check --read-data` \
             names them and says how to repair the repository.",
            e.display_log()
        )
    })
}

/// Whether this process may give files to other users: CAP_CHOWN in its effective set (root
/// has it unless a container dropped it); if that cannot be read, whether it runs as root.
fn may_chown() -> bool {
    const CAP_CHOWN: u64 = 1 << 0;
    let effective = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim().to_string();
        u64::from_str_radix(&hex, 16).ok()
    });
    effective.map_or_else(|| nix::unistd::geteuid().is_root(), |caps| caps & CAP_CHOWN != 0)
}

/// Checks the repository's structure (and, with `read_data`, every pack's content).
///
/// Each finding is logged as it is found; a damaged pack makes the error name the pack(s) and
/// the repair steps.
pub fn check(config: &RepositoryConfig, read_data: bool) -> anyhow::Result<()> {
    check_with(config, CheckOptions::default().read_data(read_data))
}

/// [`check`] with rustic_core's options: e.g. `read_data_subset` to read only a part of the
/// packs (a percentage, or the n-th of m parts), as a scheduled check does.
pub fn check_with(config: &RepositoryConfig, opts: CheckOptions) -> anyhow::Result<()> {
    let (repo, _lock) = open_locked(config, true)?;
    let results = repo.check(opts)?;
    let damaged: BTreeSet<String> = results.0.iter().filter_map(|(_, e)| damaged_pack(e)).collect();
    if !damaged.is_empty() {
        let ids: Vec<&str> = damaged.iter().map(String::as_str).collect();
        anyhow::bail!(
            "{} damaged pack(s): {}\nFiles whose data is in them cannot be restored (restore names each one and \
             restores the rest). To repair:\n\
             1. copy each damaged pack (data/<first two hex digits>/<id> in the repository) somewhere safe, then \
             delete it from the repository (or salvage its intact blobs with restic 0.16+: `restic repair packs <id>`);\n\
             2. `shmback repair index` (the index then no longer lists the lost blobs);\n\
             3. `shmback repair snapshots --forget` (files that lost data are kept with the suffix .repaired);\n\
             4. restart `shmback run`: the next batch then stores the lost data again if the producer still has it.",
            damaged.len(),
            ids.join(", ")
        );
    }
    results.is_ok().context("repository check found errors (see above)")?;
    Ok(())
}

/// The pack a check finding says is damaged, if it says so.
fn damaged_pack(e: &CheckError) -> Option<String> {
    match e {
        CheckError::PackBlobDecryptFailed { id, .. }
        | CheckError::PackBlobDecompressFailed { id, .. }
        | CheckError::PackHeaderDecryptFailed { id }
        | CheckError::PackHashMismatch { id, .. }
        | CheckError::PackBlobHashMismatch { id, .. }
        | CheckError::PackBlobLengthMismatch { id, .. }
        | CheckError::PackHeaderMismatchIndex { id }
        | CheckError::PackHeaderLengthMismatch { id, .. }
        | CheckError::ErrorReadingPack { id, .. }
        | CheckError::ErrorCheckingPack { id, .. } => Some(id.to_hex().to_string()),
        _ => None,
    }
}

/// What `repair index` changed.
#[derive(Debug)]
pub struct RepairIndexReport {
    /// Index files before.
    pub before: usize,
    /// Index files after.
    pub after: usize,
}

/// Rebuilds the index from the packs (restic's `repair index`): packs missing from the index are
/// read and added, entries of packs that are gone are dropped. With `read_all`, every pack header
/// is read again. Nothing is written with `dry_run`.
pub fn repair_index(config: &RepositoryConfig, read_all: bool, dry_run: bool) -> anyhow::Result<RepairIndexReport> {
    let (repo, _lock) = open_locked(config, true)?;
    let before = repo.list::<IndexId>()?.count();
    repo.repair_index(&RepairIndexOptions::default().read_all(read_all), dry_run)?;
    let after = repo.list::<IndexId>()?.count();
    Ok(RepairIndexReport { before, after })
}

/// What `repair snapshots` changed.
#[derive(Debug)]
pub struct RepairSnapshotsReport {
    /// Snapshots looked at.
    pub checked: usize,
    /// New snapshots written (each names its original); 0 with `dry_run`.
    pub written: Vec<SnapshotFile>,
    /// Snapshots removed (the originals, with `forget`).
    pub removed: usize,
}

/// Repairs snapshots (restic's `repair snapshots`): in each snapshot (all, or those `ids` name)
/// a file whose data blobs are missing from the index keeps what is left under the name + `suffix`,
/// a missing directory tree becomes empty; each changed snapshot is written as a new one tagged
/// `repaired`. With `forget` the originals are removed. Nothing is written with `dry_run`.
///
/// Only blobs missing from the index count as damaged: run `repair index` first (after removing
/// damaged packs) so the index matches the packs.
pub fn repair_snapshots(
    config: &RepositoryConfig,
    ids: &[String],
    suffix: &str,
    forget: bool,
    dry_run: bool,
) -> anyhow::Result<RepairSnapshotsReport> {
    // As restic: a dry run takes no lock.
    let (repo, _lock) =
        if dry_run { (open_plain(config)?, None) } else { open_locked(config, true).map(|(r, l)| (r, Some(l)))? };
    let repo = repo.to_indexed()?;
    let snaps = if ids.is_empty() { repo.get_all_snapshots()? } else { repo.get_snapshots(ids)? };
    let checked = snaps.len();
    let old: BTreeSet<_> = repo.get_all_snapshots()?.into_iter().map(|s| s.id).collect();
    let opts = RepairSnapshotsOptions::default().delete(forget).suffix(suffix);
    repo.repair_snapshots(&opts, snaps, dry_run)?;
    let now = repo.get_all_snapshots()?;
    let written: Vec<_> = now.iter().filter(|s| !old.contains(&s.id)).cloned().collect();
    let removed = old.iter().filter(|id| !now.iter().any(|s| &s.id == *id)).count();
    Ok(RepairSnapshotsReport { checked, written, removed })
}

/// One line per snapshot: id, time, host, tags, files, size.
pub fn snapshot_line(s: &SnapshotFile) -> String {
    let (files, bytes) = s.summary.as_ref().map_or((0, 0), |x| (x.total_files_processed, x.total_bytes_processed));
    format!(
        "{}  {}  {:<12}  {:<16}  {:>8} files  {:>12} bytes",
        &s.id.to_hex().as_str()[..8],
        s.time.strftime("%Y-%m-%d %H:%M:%S"),
        s.hostname,
        s.tags.to_string(),
        files,
        bytes
    )
}

/// What `forget` decided for one snapshot.
#[derive(Debug)]
pub struct Verdict {
    /// The snapshot.
    pub snapshot: SnapshotFile,
    /// Kept (true) or removed.
    pub keep: bool,
    /// Which rules kept it.
    pub reasons: Vec<String>,
}

/// What `forget` decided, group by group.
#[derive(Debug)]
pub struct ForgetReport {
    /// Per group (host, paths…): each snapshot with keep/remove and the reasons.
    pub groups: Vec<(String, Vec<Verdict>)>,
    /// Snapshots removed (or that would be, with `dry_run`).
    pub removed: usize,
    /// Whether the repository was pruned afterwards.
    pub pruned: bool,
}

/// Applies the retention policy `keep` to every group of snapshots (`group_by`, restic's
/// `host,paths` by default) and removes the snapshots it does not keep; with `prune`, then
/// removes data no snapshot references any more. Nothing is removed with `dry_run`.
pub fn forget(
    config: &RepositoryConfig,
    keep: &KeepOptions,
    group_by: SnapshotGroupCriterion,
    prune: Option<&PruneOptions>,
    dry_run: bool,
) -> anyhow::Result<ForgetReport> {
    // As restic: a dry run takes no lock.
    let (repo, _lock) =
        if dry_run { (open_plain(config)?, None) } else { open_locked(config, true).map(|(r, l)| (r, Some(l)))? };
    forget_in(&repo, keep, group_by, prune, dry_run)
}

/// [`forget`] on a repository already open (and locked by the caller, exclusively unless
/// `dry_run`): the daemon's retention after each stored snapshot keeps one open rather than
/// deriving the key again for every batch.
pub fn forget_in(
    repo: &Repository<OpenStatus>,
    keep: &KeepOptions,
    group_by: SnapshotGroupCriterion,
    prune: Option<&PruneOptions>,
    dry_run: bool,
) -> anyhow::Result<ForgetReport> {
    let snaps = repo.get_all_snapshots()?;
    let now = rustic_core::jiff::Zoned::now();
    let groups = ForgetGroups::from_grouped_snapshots_with_retention(Grouped::from_items(snaps, group_by), keep, &now)
        .context("no retention policy: give at least one --keep-* option (e.g. --keep-last 7)")?;
    let mut report = ForgetReport { groups: vec![], removed: 0, pruned: false };
    for g in &groups.0 {
        let items =
            g.items.iter().map(|f| Verdict { snapshot: f.snapshot.clone(), keep: f.keep, reasons: f.reasons.clone() });
        report.groups.push((g.group_key.to_string(), items.collect()));
    }
    let ids = groups.into_forget_ids();
    report.removed = ids.len();
    if dry_run {
        return Ok(report);
    }
    if !ids.is_empty() {
        repo.delete_snapshots(&ids)?;
    }
    if let Some(opts) = prune {
        let plan = repo.prune_plan(opts)?;
        repo.prune(opts, plan)?;
        report.pruned = true;
    }
    Ok(report)
}

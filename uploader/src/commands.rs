//! Repository commands besides serving: list snapshots, restore, check, forget/prune.

use std::path::Path;

use anyhow::Context;
use rustic_core::repofile::SnapshotFile;
use rustic_core::{
    CheckOptions, ForgetGroups, Grouped, KeepOptions, LocalDestination, LsOptions, OpenStatus, PruneOptions,
    Repository, RestoreOptions, SnapshotGroupCriterion,
};

use crate::config::RepositoryConfig;
use crate::repository::{self, Purpose};

/// Opens the repository for a command (no snapshot gate; progress bars on a terminal).
pub fn open_plain(config: &RepositoryConfig) -> anyhow::Result<Repository<OpenStatus>> {
    repository::open(config, Purpose::Command, |b| b)
}

/// All snapshots, oldest first.
pub fn snapshots(config: &RepositoryConfig) -> anyhow::Result<Vec<SnapshotFile>> {
    let mut s = open_plain(config)?.get_all_snapshots()?;
    s.sort_by(|a, b| a.time.cmp(&b.time));
    Ok(s)
}

/// Restores `spec` (`SNAPSHOT[:PATH]`, `latest` allowed) into `dest`.
pub fn restore(config: &RepositoryConfig, spec: &str, dest: &Path) -> anyhow::Result<()> {
    let repo = open_plain(config)?.to_indexed()?;
    let node = repo.node_from_snapshot_path(spec, |_| true).with_context(|| format!("finding {spec}"))?;
    let ls = repo.ls(&node, &LsOptions::default())?;
    let dest_str = dest.to_str().context("restore destination is not UTF-8")?;
    let dest = LocalDestination::new(dest_str, true, !node.is_dir())?;
    let opts = RestoreOptions::default();
    let plan = repo.prepare_restore(&opts, ls.clone(), &dest, false)?;
    repo.restore(plan, &opts, ls, &dest)?;
    Ok(())
}

/// Checks the repository's structure (and, with `read_data`, every pack's content).
pub fn check(config: &RepositoryConfig, read_data: bool) -> anyhow::Result<()> {
    let repo = open_plain(config)?;
    let results = repo.check(CheckOptions::default().read_data(read_data))?;
    results.is_ok().context("repository check found errors (see above)")?;
    Ok(())
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
    let repo = open_plain(config)?;
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

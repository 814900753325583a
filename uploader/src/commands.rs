//! Repository commands besides serving: list snapshots, restore, check.

use std::path::Path;

use anyhow::Context;
use rustic_core::repofile::SnapshotFile;
use rustic_core::{
    CheckOptions, Credentials, LocalDestination, LsOptions, OpenStatus, Repository, RepositoryOptions, RestoreOptions,
};

/// Opens the repository at `location` without the snapshot gate (for commands that read).
pub fn open_plain(location: &str, password: &str) -> anyhow::Result<Repository<OpenStatus>> {
    let backends = rustic_backend::BackendOptions::default().repository(location).to_backends()?;
    let repo = Repository::new(&RepositoryOptions::default(), &backends)?;
    repo.open(&Credentials::password(password))
        .with_context(|| format!("opening repository {location} (wrong password, or not a repository?)"))
}

/// All snapshots, oldest first.
pub fn snapshots(location: &str, password: &str) -> anyhow::Result<Vec<SnapshotFile>> {
    let mut s = open_plain(location, password)?.get_all_snapshots()?;
    s.sort_by(|a, b| a.time.cmp(&b.time));
    Ok(s)
}

/// Restores `spec` (`SNAPSHOT[:PATH]`, `latest` allowed) into `dest`.
pub fn restore(location: &str, password: &str, spec: &str, dest: &Path) -> anyhow::Result<()> {
    let repo = open_plain(location, password)?.to_indexed()?;
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
pub fn check(location: &str, password: &str, read_data: bool) -> anyhow::Result<()> {
    let repo = open_plain(location, password)?;
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

//! One batch, once its manifest is complete: archived by rustic_core into one snapshot whose
//! file is written only if the batch's data ended in a valid COMMIT (the snapshot gate).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use rustic_core::repofile::{IndexId, SnapshotFile};
use rustic_core::{BackupOptions, IndexedIdsStatus, OpenStatus, Repository, SnapshotOptions};
use tracing::{debug, info};

use super::gate::{Gate, GatedBackend};
use super::manifest::Manifest;
use super::options::{BatchOutcome, ServeOptions};
use super::pump::{BatchEnd, Ring};
use super::reader::BatchSource;
use super::want;
use crate::backends::failure::without_empty_backtraces;
use crate::config::RepositoryConfig;
use crate::locks::{Fence, LockError, LockOptions, RepoLock};
use crate::repository::{self, Purpose};
use shmback_proto::RejectCode;

/// A repository opened for backups, with the snapshot gate in front of its backend.
pub struct Repo {
    /// Taken out while a batch is archived (with the index loaded).
    repo: Option<Repository<OpenStatus>>,
    gate: Gate,
    /// Lets writes through only while a batch holds a valid repository lock.
    fence: Fence,
    /// How each batch takes its lock (the repository config's).
    locks: LockOptions,
}

/// Opens (or, with `init`, creates) the repository `config` names, with the snapshot gate in
/// front of its backend.
pub fn open_repo(config: &RepositoryConfig, init: bool) -> anyhow::Result<Repo> {
    let gate = Gate::default();
    let fence = Fence::default();
    let purpose = if init { Purpose::Create } else { Purpose::Serve };
    let repo = repository::open(config, purpose, |be| {
        // `init` writes the config and key before any lock can exist (restic's `init` takes none).
        let be = if init { be } else { fence.wrap(be) };
        Arc::new(GatedBackend::new(be, gate.clone()))
    })?;
    let repo = Repo { repo: Some(repo), gate, fence, locks: config.locks.clone() };
    if !init {
        crate::health::repository_opened();
        repo.count_snapshots();
    }
    Ok(repo)
}

impl Repo {
    /// Refreshes the `shmback_snapshots` gauge: the snapshot files are listed, none is read. A
    /// failed listing leaves the gauge as it was (the next batch finds out more).
    fn count_snapshots(&self) {
        let Some(repo) = &self.repo else { return };
        match repo.list::<rustic_core::repofile::SnapshotId>() {
            Ok(ids) => crate::monitor::snapshots(ids.count()),
            Err(e) => debug!("counting the snapshots failed: {}", without_empty_backtraces(&format!("{e:#}"))),
        }
    }
}

/// Archives one batch whose manifest is complete and says how it went, and whether the
/// repository is still usable (an index that cannot be loaded is the repository's failure).
pub(crate) fn run_batch(
    repo: &mut Repo,
    ring: &Arc<Ring>,
    manifest: Manifest,
    opts: &ServeOptions,
) -> (BatchOutcome, anyhow::Result<()>) {
    let Manifest { begin, started, entries } = manifest;
    let seq = begin.seq;
    info!(
        seq,
        entries = entries.len(),
        bytes = entries.declared_bytes(),
        streams = entries.streams(),
        host = ?begin.labels.host,
        "batch started"
    );
    // A non-exclusive restic lock from the index load to the snapshot stored: a `restic prune`
    // (or this process's own prune) cannot delete packs this batch uploads but has not indexed.
    // The index, the parent and the want-list are prepared while restic's protocol waits after
    // writing the lock file (200 ms, most of an unchanged batch's time otherwise) and kept only
    // if the index files are still the ones loaded once the lock is confirmed: a prune that
    // changed the repository meanwhile changes its index files (it writes new ones and deletes
    // the old before deleting packs), and then all three are prepared again under the lock.
    let want = ring.lock().want_asked();
    let mut early: Option<Early> = None;
    let locked = lock_for_batch(repo, ring, &mut || {
        early = repo.repo.as_ref().and_then(|open| Early::load(open, &begin, opts, &entries, want));
    });
    let _lock = match locked {
        Ok(lock) => lock,
        Err((why, code)) => {
            ring.lock().skip_rest_of_batch();
            return (BatchOutcome::Rejected { seq, why, code }, Ok(()));
        }
    };
    // The index is loaded for each batch, not kept from the last: deduplication and the parent
    // snapshot's "unchanged file" shortcut trust it, so it must say what the repository holds
    // now (an index file removed meanwhile must not be believed), and between batches the
    // daemon holds no index in memory.
    let early = early.filter(|e| e.still_current(repo));
    let reused = early.is_some();
    let Prepared { indexed, snap, parent, list } = match early {
        Some(e) => {
            drop(repo.repo.take());
            e.prepared
        }
        None => {
            let indexed = match repo.repo.take().map(Repository::to_indexed_ids) {
                Some(Ok(indexed)) => indexed,
                failed => {
                    let e = match failed {
                        Some(Err(e)) => anyhow::Error::new(e),
                        _ => anyhow::anyhow!("the repository handle was lost by an earlier failure"),
                    };
                    ring.lock().skip_rest_of_batch();
                    let why = without_empty_backtraces(&format!("loading the repository's index failed: {e:#}"));
                    return (BatchOutcome::Rejected { seq, why, code: RejectCode::StorageFailed }, Err(e));
                }
            };
            Prepared::new(indexed, &begin, opts, &entries, want)
        }
    };
    debug!(seq, reused, "index, parent and want-list prepared");
    ring.lock().start_data();
    let result = snap.and_then(|snap| {
        if let Some(list) = list {
            list.publish(parent.as_ref(), ring, seq);
        }
        archive(&indexed, &repo.gate, snap, parent.as_ref(), BatchSource::new(entries, ring.clone()), ring)
    });
    // If archive() stopped before the snapshot write, the rest of the batch is still in the ring.
    let end = repo.gate.disarm().unwrap_or_else(|| ring.lock().finish());
    let outcome = match (result, end) {
        (Ok(snapshot), BatchEnd::Committed) => {
            BatchOutcome::Stored { seq, snapshot: Box::new(snapshot), elapsed: started.elapsed() }
        }
        (_, BatchEnd::Failed(why, code)) => BatchOutcome::Rejected { seq, why, code },
        (Err(e), BatchEnd::Committed) => BatchOutcome::Rejected {
            seq,
            why: without_empty_backtraces(&format!("storing the snapshot failed: {e:#}")),
            code: RejectCode::StorageFailed,
        },
    };
    repo.repo = Some(indexed.drop_index());
    if matches!(outcome, BatchOutcome::Stored { .. }) {
        repo.count_snapshots();
    }
    // Freed manifest, tree and index memory goes back to the system, not only to the allocator
    // (which would otherwise keep a large batch's peak for the daemon's life).
    shmback_proto::release_free_memory();
    (outcome, Ok(()))
}

/// Takes the batch's repository lock, waiting up to `--retry-lock` for conflicting ones and
/// running `settling` while restic's protocol waits; if it cannot, why (for the log and the
/// producer, who resends the batch) and the code to send. (None without a repository handle:
/// the index load reports that.)
fn lock_for_batch(
    repo: &Repo,
    ring: &Arc<Ring>,
    settling: &mut dyn FnMut(),
) -> Result<Option<RepoLock>, (String, RejectCode)> {
    let Some(open) = repo.repo.as_ref() else { return Ok(None) };
    let stopping = || ring.lock().shutdown.requested();
    RepoLock::acquire_settling(open, false, &repo.locks, &repo.fence, &stopping, settling).map(Some).map_err(|e| {
        let code = if matches!(e, LockError::Cancelled) { RejectCode::ShuttingDown } else { RejectCode::StorageFailed };
        (without_empty_backtraces(&format!("batch not stored, resend it later: {e}")), code)
    })
}

/// What a batch needs before its data: the loaded index, its snapshot, parent and want-list.
struct Prepared {
    indexed: Repository<IndexedIdsStatus>,
    snap: anyhow::Result<SnapshotFile>,
    parent: Option<SnapshotFile>,
    list: Option<want::Computed>,
}

impl Prepared {
    /// The snapshot, parent and (if the producer asked) want-list of a batch, on `indexed`.
    fn new(
        indexed: Repository<IndexedIdsStatus>,
        begin: &shmback_proto::Begin,
        opts: &ServeOptions,
        entries: &super::manifest::Entries,
        want: bool,
    ) -> Prepared {
        let snap = snapshot_for(begin, opts);
        // The parent is looked up once, answers the want-list and is the one the archive uses.
        let parent = snap.as_ref().ok().and_then(|snap| want::find_parent(&indexed, snap));
        let list = (want && snap.is_ok()).then(|| want::Computed::new(&indexed, parent.as_ref(), entries));
        Prepared { indexed, snap, parent, list }
    }
}

/// [`Prepared`] under a lock not yet confirmed, with the index files it was loaded from.
struct Early {
    index_files: BTreeSet<IndexId>,
    prepared: Prepared,
}

impl Early {
    /// None if the index cannot be listed or loaded now (it is loaded again under the lock,
    /// where a failure rejects the batch).
    fn load(
        open: &Repository<OpenStatus>,
        begin: &shmback_proto::Begin,
        opts: &ServeOptions,
        entries: &super::manifest::Entries,
        want: bool,
    ) -> Option<Early> {
        let index_files = open.list::<IndexId>().ok()?.collect();
        let indexed = open.clone().to_indexed_ids().ok()?;
        Some(Early { index_files, prepared: Prepared::new(indexed, begin, opts, entries, want) })
    }

    /// Whether the repository's index files are still the ones loaded (index files are named
    /// by their content: the same names are the same index).
    fn still_current(&self, repo: &Repo) -> bool {
        let Some(open) = repo.repo.as_ref() else { return false };
        open.list::<IndexId>().is_ok_and(|now| now.collect::<BTreeSet<_>>() == self.index_files)
    }
}

/// The snapshot file a batch becomes: host, tags and key/values from its BEGIN.
fn snapshot_for(begin: &shmback_proto::Begin, opts: &ServeOptions) -> anyhow::Result<SnapshotFile> {
    let mut sopts = SnapshotOptions::default();
    sopts.host = Some(begin.labels.host.clone().unwrap_or_else(|| opts.host.clone()));
    let tags = begin.labels.tags.join(",");
    if !tags.is_empty() {
        sopts = sopts.add_tags(&tags)?;
    }
    let mut snap = sopts.to_snapshot()?;
    if !begin.labels.meta.is_empty() {
        let lines: Vec<String> = begin.labels.meta.iter().map(|(k, v)| format!("{k}={v}")).collect();
        snap.description = Some(lines.join("\n"));
    }
    Ok(snap)
}

fn archive(
    repo: &Repository<IndexedIdsStatus>,
    gate: &Gate,
    snap: SnapshotFile,
    parent: Option<&SnapshotFile>,
    source: BatchSource,
    ring: &Arc<Ring>,
) -> anyhow::Result<SnapshotFile> {
    gate.arm(ring.clone());
    let opts = BackupOptions::default().parent_opts(want::pinned(parent));
    Ok(repo.archive(&opts, &source, snap, &[PathBuf::from("/")])?)
}

/// The 32 bytes of a snapshot id, as the durable ack carries them.
pub fn snapshot_id_bytes(s: &SnapshotFile) -> [u8; 32] {
    let hex = s.id.to_hex();
    let hex = hex.as_str().as_bytes();
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        let nib = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        *b = nib(hex[2 * i]) << 4 | nib(hex[2 * i + 1]);
    }
    out
}
